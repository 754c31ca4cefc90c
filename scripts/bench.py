"""Meta-step throughput: meta-steps/s, tasks/s, compile time and peak memory.

Runs the same jitted meta-step that `metalearn train` uses on synthetic data of each
workload's shape (real data does not change the arithmetic). Timing excludes compilation
(the first call) and blocks on the result of the last step.

    python scripts/bench.py --quick                       # a small grid, a few minutes on CPU
    python scripts/bench.py --workloads omniglot_5w1s --algos maml,fomaml --inner-steps 1,5
    python scripts/bench.py --conv-impl im2col,xla --workloads omniglot_5w1s

Prints a table and appends JSON lines to --out (default outputs/bench/bench.jsonl).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import jax
import numpy as np
from omegaconf import OmegaConf

from metalearn.config import Config
from metalearn.tasks import image_source, sinusoid_source
from metalearn.train import init_state, make_meta_step, replicate, setup, task_mesh

# name -> (dataset overrides, model overrides, image shape or None, meta-batch size)
WORKLOADS = {
    "sinusoid": ({"name": "sinusoid", "k_shot": 10, "k_query": 10}, {"name": "mlp"}, None, 25),
    "omniglot_5w1s": (
        {"name": "omniglot", "n_way": 5, "k_shot": 1, "k_query": 5},
        {"name": "conv4", "filters": 64, "downsample": "stride"},
        (28, 28, 1),
        32,
    ),
    "omniglot_20w1s": (
        {"name": "omniglot", "n_way": 20, "k_shot": 1, "k_query": 5},
        {"name": "conv4", "filters": 64, "downsample": "stride"},
        (28, 28, 1),
        16,
    ),
    "miniimagenet_5w1s": (
        {"name": "omniglot", "n_way": 5, "k_shot": 1, "k_query": 15},
        {"name": "conv4", "filters": 32, "downsample": "maxpool"},
        (84, 84, 3),
        4,
    ),
    "miniimagenet_5w5s": (
        {"name": "omniglot", "n_way": 5, "k_shot": 5, "k_query": 15},
        {"name": "conv4", "filters": 32, "downsample": "maxpool"},
        (84, 84, 3),
        2,
    ),
}


def peak_memory_bytes() -> tuple[str, int]:
    """Peak device memory on an accelerator, else this process's peak RSS."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return "device", int(stats["peak_bytes_in_use"])
    return "rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_one(
    workload: str,
    algo: str,
    inner_steps: int,
    conv_impl: str,
    meta_batch: int | None,
    remat: bool,
    min_steps: int,
    min_seconds: float,
) -> dict:
    dataset, model, shape, default_batch = WORKLOADS[workload]
    cfg = OmegaConf.structured(Config)
    cfg.dataset = OmegaConf.merge(cfg.dataset, dataset)
    cfg.model = OmegaConf.merge(cfg.model, dict(model, conv_impl=conv_impl))
    cfg.algo.name, cfg.algo.inner_steps, cfg.algo.remat = algo, inner_steps, remat
    cfg.algo.inner_lr = 0.01
    batch = meta_batch or default_batch
    if shape is None:
        source = sinusoid_source(cfg.dataset)
    else:
        rng = np.random.default_rng(0)
        arrays = {
            s: rng.integers(0, 256, (40, 20, *shape), dtype=np.uint8) for s in ("train", "validation", "test")
        }
        source = image_source(cfg.dataset, arrays)
    exp = setup(cfg, source)
    mesh = task_mesh()  # all local devices, as in `metalearn train`
    state = init_state(exp, seed=0, mesh=mesh)
    step = make_meta_step(exp, batch, mesh=mesh)
    data = replicate(source.splits["train"], mesh)

    start = time.perf_counter()
    state, metrics = step(state, data)
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - start

    n, start = 0, time.perf_counter()
    while n < min_steps or time.perf_counter() - start < min_seconds:
        state, metrics = step(state, data)
        n += 1
        if n % 10 == 0:  # bound the dispatch queue without syncing every step
            jax.block_until_ready(metrics)
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - start
    kind, peak = peak_memory_bytes()
    return {
        "workload": workload,
        "algo": algo,
        "inner_steps": inner_steps,
        "conv_impl": conv_impl,
        "meta_batch": batch,
        "remat": remat,
        "steps_per_s": n / elapsed,
        "tasks_per_s": n * batch / elapsed,
        "compile_s": compile_s,
        "timed_steps": n,
        "peak_memory_mb": peak / 2**20,
        "memory_kind": kind,
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "host": platform.node(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default="sinusoid,omniglot_5w1s")
    parser.add_argument("--algos", default="maml,fomaml")
    parser.add_argument("--inner-steps", default="1")
    parser.add_argument("--conv-impl", default="im2col")
    parser.add_argument("--meta-batch", default="", help="comma list; default: each workload's paper value")
    parser.add_argument("--remat", default="false", help="comma list of true/false")
    parser.add_argument("--min-steps", type=int, default=10)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="sinusoid + Omniglot 5w1s, 1 inner step")
    parser.add_argument("--out", default="outputs/bench/bench.jsonl")
    args = parser.parse_args(argv)
    if args.quick:
        args.workloads, args.inner_steps, args.min_steps, args.min_seconds = (
            "sinusoid,omniglot_5w1s",
            "1",
            5,
            2.0,
        )

    def split(text: str) -> list[str]:
        return [t for t in text.split(",") if t]

    for w in split(args.workloads):
        if w not in WORKLOADS:
            sys.exit(f"bench: unknown workload {w!r}; choose from {sorted(WORKLOADS)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    header = (
        f"{'workload':<18} {'algo':<7} {'k':>2} {'conv':<6} {'batch':>5} {'remat':<5} "
        f"{'steps/s':>9} {'tasks/s':>9} {'compile s':>9} {'peak MB':>9}"
    )
    print(f"backend {jax.default_backend()}, devices {jax.devices()}")
    print(header)
    for workload in split(args.workloads):
        for algo in split(args.algos):
            for k in map(int, split(args.inner_steps)):
                for impl in split(args.conv_impl):
                    if workload == "sinusoid" and impl != split(args.conv_impl)[0]:
                        continue  # no convolutions
                    for mb in [int(b) for b in split(args.meta_batch)] or [None]:
                        for remat in [r.lower() == "true" for r in split(args.remat)]:
                            row = bench_one(
                                workload, algo, k, impl, mb, remat, args.min_steps, args.min_seconds
                            )
                            rows.append(row)
                            with out.open("a") as f:
                                f.write(json.dumps(row) + "\n")
                            print(
                                f"{workload:<18} {algo:<7} {k:>2} {impl:<6} {row['meta_batch']:>5} "
                                f"{str(remat):<5} {row['steps_per_s']:>9.2f} {row['tasks_per_s']:>9.1f} "
                                f"{row['compile_s']:>9.1f} {row['peak_memory_mb']:>9.0f}",
                                flush=True,
                            )
    print(f"appended {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
