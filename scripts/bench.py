"""Meta-step throughput: meta-steps/s, tasks/s, compile time and peak memory.

Runs the same jitted meta-step that `metalearn train` uses on synthetic data of each
workload's shape (real data does not change the arithmetic). Timing excludes compilation
(the first call) and blocks on the result of the last step.

Memory, per row: each row runs in a fresh subprocess (unless --no-isolate), so "peak MB" is
that row's own peak (device memory on an accelerator, resident set size on CPU, where it
includes the Python process and the dataset); "XLA MB" is the compiled meta-step's own
footprint from XLA's memory analysis (arguments + outputs + temporaries, minus donated
buffers), which does not depend on the process.

    python scripts/bench.py --quick                       # a small grid, a few minutes on CPU
    python scripts/bench.py --workloads omniglot_5w1s --algos maml,fomaml --inner-steps 1,5
    python scripts/bench.py --conv-impl im2col,xla --workloads omniglot_5w1s

Prints a table and appends JSON lines to --out (default outputs/bench/bench.jsonl).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from omegaconf import OmegaConf

from metalearn.config import Config
from metalearn.tasks import image_source, sinusoid_source
from metalearn.train import HostPrefetcher, init_state, make_meta_step, replicate, setup, task_mesh

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
    "miniimagenet_5w1s_resnet12": (
        {"name": "omniglot", "n_way": 5, "k_shot": 1, "k_query": 15},
        {"name": "resnet12"},
        (84, 84, 3),
        4,
    ),
}


def compiled_memory_bytes(compiled) -> int | None:
    """Arguments + outputs + temporaries of a compiled executable, minus donated (aliased)
    buffers, from XLA's memory analysis; None where the backend gives none."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not implemented on every backend / version
        return None
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    )


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
    compute_dtype: str = "float32",
    placement: str = "device",
) -> dict:
    dataset, model, shape, default_batch = WORKLOADS[workload]
    cfg = OmegaConf.structured(Config)
    cfg.dataset = OmegaConf.merge(cfg.dataset, dataset)
    cfg.model = OmegaConf.merge(cfg.model, dict(model, conv_impl=conv_impl, compute_dtype=compute_dtype))
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
        source = image_source(cfg.dataset, arrays, placement=placement)
    exp = setup(cfg, source)
    mesh = task_mesh()  # all local devices, as in `metalearn train`
    state = init_state(exp, seed=0, mesh=mesh)
    step = make_meta_step(exp, batch, mesh=mesh)
    if source.host is None:
        data = replicate(source.splits["train"], mesh)
        batches = None
    else:  # episodes gathered on the host by a prefetching thread, as in `metalearn train`
        batches = HostPrefetcher(source, state.key, batch, mesh, 0, 10**9, depth=2)
        data = next(batches)

    start = time.perf_counter()
    compiled = step.lower(state, data).compile()
    xla_bytes = compiled_memory_bytes(compiled)
    state, metrics = step(state, data)
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - start

    n, start = 0, time.perf_counter()
    while n < min_steps or time.perf_counter() - start < min_seconds:
        state, metrics = step(state, data if batches is None else next(batches))
        n += 1
        if n % 10 == 0:  # bound the dispatch queue without syncing every step
            jax.block_until_ready(metrics)
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - start
    if batches is not None:
        batches.close()
    kind, peak = peak_memory_bytes()
    return {
        "workload": workload,
        "algo": algo,
        "inner_steps": inner_steps,
        "conv_impl": conv_impl,
        "meta_batch": batch,
        "remat": remat,
        "compute_dtype": compute_dtype,
        "placement": source.placement,
        "steps_per_s": n / elapsed,
        "tasks_per_s": n * batch / elapsed,
        "compile_s": compile_s,
        "timed_steps": n,
        "peak_memory_mb": peak / 2**20,
        "memory_kind": kind,
        "xla_memory_mb": None if xla_bytes is None else xla_bytes / 2**20,
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
    parser.add_argument("--dtype", default="float32", help="comma list of model.compute_dtype values")
    parser.add_argument(
        "--placement", default="device", help="comma list: device (sampled in the step) or host (prefetched)"
    )
    parser.add_argument(
        "--no-isolate", action="store_true", help="run every row in this process (peak memory is then shared)"
    )
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row, print its JSON
    parser.add_argument("--min-steps", type=int, default=10)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="sinusoid + Omniglot 5w1s, 1 inner step")
    parser.add_argument("--out", default="outputs/bench/bench.jsonl")
    args = parser.parse_args(argv)
    if args.row:
        print("ROW " + json.dumps(bench_one(**json.loads(args.row))), flush=True)
        return
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
        f"{'dtype':<8} {'place':<6} {'steps/s':>9} {'tasks/s':>9} {'compile s':>9} "
        f"{'peak MB':>9} {'XLA MB':>8}"
    )
    print(f"backend {jax.default_backend()}, devices {jax.devices()}")
    print(header)
    specs = [
        dict(
            workload=workload,
            algo=algo,
            inner_steps=k,
            conv_impl=impl,
            meta_batch=mb,
            remat=remat,
            min_steps=args.min_steps,
            min_seconds=args.min_seconds,
            compute_dtype=dtype,
            placement=placement,
        )
        for workload, algo, k, impl, mb, remat, dtype, placement in itertools.product(
            split(args.workloads),
            split(args.algos),
            map(int, split(args.inner_steps)),
            split(args.conv_impl),
            [int(b) for b in split(args.meta_batch)] or [None],
            [r.lower() == "true" for r in split(args.remat)],
            split(args.dtype),
            split(args.placement),
        )
        # the sinusoid MLP has no convolutions: one conv_impl is enough
        if not (
            workload == "sinusoid"
            and (impl != split(args.conv_impl)[0] or placement != split(args.placement)[0])
        )
    ]
    for spec in specs:
        row = bench_one(**spec) if args.no_isolate else _isolated(spec)
        rows.append(row)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        xla = "-" if row["xla_memory_mb"] is None else f"{row['xla_memory_mb']:.0f}"
        print(
            f"{row['workload']:<18} {row['algo']:<7} {row['inner_steps']:>2} {row['conv_impl']:<6} "
            f"{row['meta_batch']:>5} {str(row['remat']):<5} {row['compute_dtype']:<8} {row['placement']:<6} "
            f"{row['steps_per_s']:>9.2f} {row['tasks_per_s']:>9.1f} {row['compile_s']:>9.1f} "
            f"{row['peak_memory_mb']:>9.0f} {xla:>8}",
            flush=True,
        )
    print(f"appended {len(rows)} rows to {out}")


def _isolated(spec: dict) -> dict:
    """Run one row in a fresh Python process so that its peak memory is its own."""
    proc = subprocess.run(
        [sys.executable, __file__, "--row", json.dumps(spec)], capture_output=True, text=True
    )
    rows = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode != 0 or not rows:
        sys.exit(f"bench: row {spec} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(rows[-1])


if __name__ == "__main__":
    main()
