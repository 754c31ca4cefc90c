"""PyTorch baseline for scripts/bench.py: MAML written the usual PyTorch way.

A Python loop over the tasks of a meta-batch, each adapted with explicit ("fast")
weights and a functional forward pass (F.linear / F.conv2d), second order through
``torch.autograd.grad(..., create_graph=True)``, one ``backward()`` per task into the
meta-parameters' ``.grad`` and one Adam step per meta-batch. That is the structure of the
original PyTorch MAML ports and of learn2learn's MAML wrapper; it is what metalearn's
single jitted, vmapped meta-step is compared against in docs/performance.md.

The workloads match scripts/bench.py in model, data shapes and hyperparameters:

- ``sinusoid``: MLP 1-40-40-1 (ReLU), meta-batch 25, K=10 support + 10 query points,
  MSE, 1 inner step with lr 0.01, Adam 1e-3.
- ``omniglot_5w1s``: Conv4 (4 x [3x3 conv, 64 filters, stride 2, BatchNorm with batch
  statistics, ReLU] + linear head) on 28x28x1 images, 5-way 1-shot with 5 queries per
  class, meta-batch 32, cross-entropy, 1 inner step with lr 0.4, Adam 1e-3.

Random synthetic data is drawn on the fly on the target device (the arithmetic does not
depend on the pixel values). Timing starts after ``--warmup`` meta-steps and, on CUDA,
synchronises before reading the clock.

torch is not a metalearn dependency and nothing in the package imports this script.
Install it next to metalearn first, e.g. ``pip install torch==2.13.0`` (a CPU wheel is
enough for ``--device cpu``; a CUDA build for ``--device cuda``):

    python scripts/bench_torch_maml.py                        # both workloads, CPU, 2 threads
    python scripts/bench_torch_maml.py --threads 2 --workloads sinusoid
    python scripts/bench_torch_maml.py --device cuda --first-order

Prints a table and appends JSON lines to --out (default outputs/bench/bench_torch.jsonl)
with the same keys as scripts/bench.py where they apply.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# name -> meta-batch, inner lr, and the shapes of one task
WORKLOADS = {
    "sinusoid": {"meta_batch": 25, "inner_lr": 0.01, "k_shot": 10, "k_query": 10},
    "omniglot_5w1s": {
        "meta_batch": 32,
        "inner_lr": 0.4,
        "n_way": 5,
        "k_shot": 1,
        "k_query": 5,
        "filters": 64,
    },
}


# ---------------------------------------------------------------- models (functional)


def init_mlp(device: torch.device, hidden: tuple[int, ...] = (40, 40)) -> list[torch.Tensor]:
    """[W0, b0, W1, b1, ..., W_head, b_head] for 1 -> hidden -> 1 (PyTorch's Linear init)."""
    params, width = [], 1
    for out in (*hidden, 1):
        layer = torch.nn.Linear(width, out)
        params += [layer.weight.detach(), layer.bias.detach()]
        width = out
    return [p.to(device).requires_grad_() for p in params]


def mlp_forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    n = len(params) // 2
    for i in range(n):
        x = F.linear(x, params[2 * i], params[2 * i + 1])
        if i < n - 1:
            x = F.relu(x)
    return x


def init_conv4(device: torch.device, n_way: int, filters: int) -> list[torch.Tensor]:
    """Per block [conv weight, conv bias, bn scale, bn bias], then [head W, head b]."""
    params, channels = [], 1
    for _ in range(4):
        conv = torch.nn.Conv2d(channels, filters, 3)
        params += [conv.weight.detach(), conv.bias.detach(), torch.ones(filters), torch.zeros(filters)]
        channels = filters
    head = torch.nn.Linear(filters * 2 * 2, n_way)  # 28 -> 14 -> 7 -> 4 -> 2
    params += [head.weight.detach(), head.bias.detach()]
    return [p.to(device).requires_grad_() for p in params]


def conv4_forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x: (B, 1, 28, 28) -> logits. BatchNorm always uses the batch's statistics
    (training=True, no running averages), as in metalearn's Conv4 and MAML's code."""
    for i in range(4):
        w, b, scale, shift = params[4 * i : 4 * i + 4]
        x = F.conv2d(x, w, b, stride=2, padding=1)
        x = F.batch_norm(x, None, None, scale, shift, training=True)
        x = F.relu(x)
    return F.linear(x.flatten(1), params[-2], params[-1])


# ---------------------------------------------------------------- tasks (synthetic)


def sinusoid_tasks(spec: dict, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """meta_batch tasks y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]."""
    b, n = spec["meta_batch"], spec["k_shot"] + spec["k_query"]
    amp = torch.empty(b, 1, 1, device=device).uniform_(0.1, 5.0)
    phase = torch.empty(b, 1, 1, device=device).uniform_(0.0, torch.pi)
    x = torch.empty(b, n, 1, device=device).uniform_(-5.0, 5.0)
    y = amp * torch.sin(x - phase)
    k = spec["k_shot"]
    return [(x[t, :k], y[t, :k], x[t, k:], y[t, k:]) for t in range(b)]


def image_tasks(spec: dict, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """meta_batch N-way tasks of random 28x28 images: N*K support and N*Q query images."""
    b, n, k, q = spec["meta_batch"], spec["n_way"], spec["k_shot"], spec["k_query"]
    support = torch.rand(b, n * k, 1, 28, 28, device=device)
    query = torch.rand(b, n * q, 1, 28, 28, device=device)
    ys = torch.arange(n, device=device).repeat_interleave(k)
    yq = torch.arange(n, device=device).repeat_interleave(q)
    return [(support[t], ys, query[t], yq) for t in range(b)]


# ---------------------------------------------------------------- MAML


def maml_step(
    params: list[torch.Tensor],
    opt: torch.optim.Optimizer,
    forward,
    loss_fn,
    tasks: list[tuple[torch.Tensor, ...]],
    inner_lr: float,
    inner_steps: int,
    first_order: bool,
) -> torch.Tensor:
    """One meta-step: adapt each task in turn, accumulate d(query loss)/d(params) / T."""
    opt.zero_grad(set_to_none=True)
    total = torch.zeros((), device=params[0].device)
    for xs, ys, xq, yq in tasks:
        fast = params
        for _ in range(inner_steps):
            grads = torch.autograd.grad(loss_fn(forward(fast, xs), ys), fast, create_graph=not first_order)
            fast = [w - inner_lr * g for w, g in zip(fast, grads, strict=True)]
        loss = loss_fn(forward(fast, xq), yq) / len(tasks)
        loss.backward()  # frees this task's graph before the next task is adapted
        total += loss.detach()
    opt.step()
    return total


def bench_one(workload: str, args: argparse.Namespace, device: torch.device) -> dict:
    spec = WORKLOADS[workload]
    torch.manual_seed(0)
    if workload == "sinusoid":
        params, forward, loss_fn, sample = init_mlp(device), mlp_forward, F.mse_loss, sinusoid_tasks
    else:
        params = init_conv4(device, spec["n_way"], spec["filters"])
        forward, loss_fn, sample = conv4_forward, F.cross_entropy, image_tasks
    opt = torch.optim.Adam(params, lr=1e-3)

    def step() -> torch.Tensor:
        return maml_step(
            params,
            opt,
            forward,
            loss_fn,
            sample(spec, device),
            spec["inner_lr"],
            args.inner_steps,
            args.first_order,
        )

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - start

    n, start = 0, time.perf_counter()
    while n < args.min_steps or time.perf_counter() - start < args.min_seconds:
        loss = step()
        n += 1
    sync()
    elapsed = time.perf_counter() - start
    if not torch.isfinite(torch.as_tensor(loss)):
        raise SystemExit(f"bench_torch_maml: non-finite loss on {workload}")
    return {
        "workload": workload,
        "algo": "fomaml" if args.first_order else "maml",
        "inner_steps": args.inner_steps,
        "impl": "torch-per-task-loop",
        "meta_batch": spec["meta_batch"],
        "steps_per_s": n / elapsed,
        "tasks_per_s": n * spec["meta_batch"] / elapsed,
        "warmup_s": warmup_s,
        "timed_steps": n,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "backend": f"torch-{device.type}",
        "torch": torch.__version__,
        "host": platform.node(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default="sinusoid,omniglot_5w1s")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--first-order", action="store_true", help="no create_graph (FOMAML)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min-steps", type=int, default=10)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--out", default="outputs/bench/bench_torch.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    workloads = [w for w in args.workloads.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"bench_torch_maml: unknown workload {w!r}; choose from {sorted(WORKLOADS)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")
    print(f"{'workload':<18} {'algo':<7} {'k':>2} {'batch':>5} {'steps/s':>9} {'tasks/s':>9} {'warmup s':>9}")
    for w in workloads:
        row = bench_one(w, args, device)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"{w:<18} {row['algo']:<7} {row['inner_steps']:>2} {row['meta_batch']:>5} "
            f"{row['steps_per_s']:>9.2f} {row['tasks_per_s']:>9.1f} {row['warmup_s']:>9.1f}",
            flush=True,
        )
    print(f"appended {len(workloads)} rows to {out}")


if __name__ == "__main__":
    main()
