"""Compiled memory of the meta-step against the number of inner steps (iMAML vs MAML).

For each algorithm and inner-step count, builds the same jitted meta-step that
`metalearn train` runs (on synthetic data of a scripts/bench.py workload's shape), compiles
it without running it, and records XLA's memory analysis: the footprint (arguments +
outputs + temporaries - donated buffers, as the "XLA MB" column of scripts/bench.py) and
the temporaries alone. MAML backpropagates through the inner loop, so it keeps every
inner step's activations; iMAML differentiates only at the inner solution (conjugate
gradient with Hessian-vector products), so its footprint should not depend on the steps.

    python scripts/bench_memory.py                                   # Omniglot 5w1s, 1..20 steps
    python scripts/bench_memory.py --algos imaml,maml,fomaml --steps 1,5,20 --plot fig.png

Prints a table and appends JSON lines to --out (default outputs/bench/memory.jsonl).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import WORKLOADS, compiled_memory_bytes, workload_experiment  # noqa: E402

from metalearn.step import init_state, make_meta_step, replicate, task_mesh  # noqa: E402


def compiled_memory(workload: str, algo: str, inner_steps: int, meta_batch: int | None) -> dict:
    exp, source, default_batch = workload_experiment(workload, {}, {"name": algo, "inner_steps": inner_steps})
    batch = meta_batch or default_batch
    mesh = task_mesh()
    state = init_state(exp, seed=0, mesh=mesh)
    data = replicate(source.splits["train"], mesh)
    start = time.perf_counter()
    compiled = make_meta_step(exp, batch, mesh=mesh).lower(state, data).compile()
    analysis = compiled.memory_analysis()
    footprint = compiled_memory_bytes(compiled)
    return {
        "workload": workload,
        "algo": algo,
        "inner_steps": inner_steps,
        "meta_batch": batch,
        "xla_memory_mb": None if footprint is None else footprint / 2**20,
        "temp_mb": None if analysis is None else analysis.temp_size_in_bytes / 2**20,
        "compile_s": time.perf_counter() - start,
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "host": platform.node(),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for algo in sorted({r["algo"] for r in rows}):
        pts = sorted((r["inner_steps"], r["xla_memory_mb"]) for r in rows if r["algo"] == algo)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=algo)
    ax.set_xlabel("inner steps")
    ax.set_ylabel("compiled meta-step memory (MB)")
    ax.set_title(f"{rows[0]['workload']}, meta-batch {rows[0]['meta_batch']}, {rows[0]['backend']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", default="omniglot_5w1s", choices=sorted(WORKLOADS))
    parser.add_argument("--algos", default="imaml,maml")
    parser.add_argument("--steps", default="1,2,5,10,20")
    parser.add_argument("--meta-batch", type=int, default=None, help="default: the workload's")
    parser.add_argument("--out", default="outputs/bench/memory.jsonl")
    parser.add_argument("--plot", default=None, help="also write a PNG of memory vs inner steps here")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'algo':<8} {'steps':>5} {'XLA MB':>9} {'temp MB':>9} {'compile s':>9}", flush=True)
    for algo in args.algos.split(","):
        for k in map(int, args.steps.split(",")):
            row = compiled_memory(args.workload, algo, k, args.meta_batch)
            rows.append(row)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            mb, temp, secs = row["xla_memory_mb"], row["temp_mb"], row["compile_s"]
            print(f"{algo:<8} {k:>5} {mb:>9.1f} {temp:>9.1f} {secs:>9.1f}", flush=True)
    for algo in args.algos.split(","):
        mem = [r["xla_memory_mb"] for r in rows if r["algo"] == algo]
        print(f"{algo}: largest / smallest footprint = {max(mem) / min(mem):.2f}")
    if args.plot:
        plot(rows, Path(args.plot))
        print(f"wrote {args.plot}")
    print(f"appended {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
