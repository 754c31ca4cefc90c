"""Meta-step throughput: meta-steps/s, tasks/s, compile time, peak memory, and where each
row stands against the hardware (a roofline).

Runs the same jitted meta-step that `metalearn train` uses on synthetic data of each
workload's shape (real data does not change the arithmetic). Timing excludes compilation
(the first call) and blocks on the result of the last step.

Memory, per row: each row runs in a fresh subprocess (unless --no-isolate), so "peak MB" is
that row's own peak (device memory on an accelerator, resident set size on CPU, where it
includes the Python process and the dataset); "XLA MB" is the compiled meta-step's own
footprint from XLA's memory analysis (arguments + outputs + temporaries, minus donated
buffers), which does not depend on the process.

Roofline, per row: "GF/step" is the meta-step's floating-point operations from XLA's cost
analysis of the compiled step (``jitted.lower(...).compile().cost_analysis()``; XLA counts
a loop body once, so the count is taken on a copy of the step whose ``lax.scan`` loops are
unrolled), "GF/s" the achieved rate (GF/step x steps/s) and "%peak" its fraction of the
device's peak, measured at the start of the run by a large matmul of the compute dtype
(or given with --peak-gflops). "%bw" is likewise XLA's "bytes accessed" per step x steps/s
against a measured streaming bandwidth (an elementwise pass over a large array; or
--peak-gbps). XLA's byte count assumes no cache reuse across its fused kernels, so %bw is
an upper estimate of memory traffic.

Beside GF/step: "GB/step" (XLA's bytes accessed per step, counted like the FLOPs), "F/B" the
step's arithmetic intensity (FLOPs per byte), "roof" the roof that bounds the step on this
device ("memory" where F/B is below the ridge point, measured peak FLOP/s / measured
bandwidth, else "compute") and "%roof" the achieved FLOP/s against that roof
(min(peak, F/B x bandwidth)). --count-only compiles and counts without running the step
(cheap, and independent of whatever else runs on the machine); its timing columns are "-".

--steps-per-call N times blocks of N meta-steps per call (the training loop's
``make_meta_block``) instead of one call per step; the gap shows the dispatch cost.

    python scripts/bench.py --quick                       # a small grid, a few minutes on CPU
    python scripts/bench.py --workloads omniglot_5w1s --algos maml,fomaml --inner-steps 1,5
    python scripts/bench.py --conv-impl im2col,xla --workloads omniglot_5w1s
    python scripts/bench.py --workloads sinusoid --algos maml --steps-per-call 1,100
    python scripts/bench.py --count-only --workloads miniimagenet_5w1s --algos maml --inner-steps 5

Prints a table and appends JSON lines to --out (default outputs/bench/bench.jsonl).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import jaxprs_in_params
from omegaconf import OmegaConf

from metalearn.config import Config, schemas, section_config
from metalearn.prefetch import HostPrefetcher
from metalearn.step import init_state, make_meta_block, make_meta_step, replicate, setup, task_mesh
from metalearn.tasks import image_source, sinusoid_source

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


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list in older jax versions
    return cost or {}


def _has_loops(jaxpr) -> tuple[bool, bool]:
    """(has a ``scan`` of more than one iteration, has a ``while`` loop) anywhere in ``jaxpr``."""
    scan = loop = False
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan" and eqn.params.get("length", 1) > 1:
            scan = True
        if eqn.primitive.name == "while":
            loop = True
        for sub in jaxprs_in_params(eqn.params):
            s, w = _has_loops(sub)
            scan, loop = scan or s, loop or w
    return scan, loop


@contextlib.contextmanager
def _unrolled_scans():
    """Every ``lax.scan`` traced inside is fully unrolled (for counting FLOPs only)."""
    scan = jax.lax.scan

    def unrolled(f, init, xs=None, length=None, reverse=False, unroll=1, **kwargs):
        return scan(f, init, xs, length=length, reverse=reverse, unroll=True, **kwargs)

    jax.lax.scan = unrolled
    try:
        yield
    finally:
        jax.lax.scan = scan


def step_cost(compiled, make_step, state, data) -> tuple[float | None, float | None, str]:
    """(FLOPs, bytes accessed, how counted) of one meta-step from XLA's cost analysis of
    ``compiled``, the step ``make_step()`` compiled for (state, data).

    XLA's HloCostAnalysis counts the body of a loop once, whatever its trip count, so when
    the step has scans (inner steps, PGD steps) the count is taken from a second compilation
    with them unrolled. A remaining ``while`` loop makes the figure a lower bound."""
    scan, loop = _has_loops(jax.make_jaxpr(make_step())(state, data).jaxpr)
    if scan:
        with _unrolled_scans():
            compiled = make_step().lower(state, data).compile()
    cost = _cost(compiled)
    how = "xla" + (", scans unrolled" if scan else "") + (", lower bound (while loop)" if loop else "")
    flops, nbytes = cost.get("flops"), cost.get("bytes accessed")
    return (None if flops is None else float(flops)), (None if nbytes is None else float(nbytes)), how


def roofline(
    flops: float | None, nbytes: float | None, peak_flops: float | None, peak_bytes: float | None
) -> dict:
    """Where a step of ``flops`` FLOPs and ``nbytes`` bytes accessed stands on the roofline
    of a device with peaks ``peak_flops`` (FLOP/s) and ``peak_bytes`` (bytes/s).

    ``arithmetic_intensity``: FLOPs per byte of the step; ``ridge_intensity``: the device's
    FLOPs per byte at which both roofs meet (peak FLOP/s / peak bytes/s);
    ``bound``: "memory" if the step's intensity is below the ridge (the bandwidth roof,
    intensity x bandwidth, is the lower one), else "compute"; ``roof_flops_per_s``: the
    lower roof, the highest FLOP/s the step could reach. Missing inputs give None.
    """
    intensity = None if not flops or not nbytes else flops / nbytes
    ridge = None if not peak_flops or not peak_bytes else peak_flops / peak_bytes
    if intensity is None or ridge is None:
        return {
            "arithmetic_intensity": intensity,
            "ridge_intensity": ridge,
            "bound": None,
            "roof_flops_per_s": None,
        }
    memory_bound = intensity < ridge
    return {
        "arithmetic_intensity": intensity,
        "ridge_intensity": ridge,
        "bound": "memory" if memory_bound else "compute",
        "roof_flops_per_s": intensity * peak_bytes if memory_bound else peak_flops,
    }


def _best_seconds(fn, arg, reps: int) -> tuple[float, object]:
    arg = fn(arg)
    jax.block_until_ready(arg)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        arg = fn(arg)
        jax.block_until_ready(arg)
        best = min(best, time.perf_counter() - start)
    return best, arg


def measure_peaks(dtype: str = "float32", reps: int = 10) -> tuple[float, float]:
    """(FLOP/s of a large square matmul of ``dtype``, bytes/s of a streaming elementwise
    pass over a large float32 array), best of ``reps`` timed calls on the default device."""
    cpu = jax.default_backend() == "cpu"
    n = 1024 if cpu else 8192
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype) / n**0.5
    # a @ a repeated: the result stays of order one, and each call depends on the last.
    seconds, _ = _best_seconds(jax.jit(lambda x: x @ a, donate_argnums=0), a + 0, reps)
    flops = 2 * n**3 / seconds
    x = jnp.ones((2**26 if cpu else 2**28,), jnp.float32)  # 256 MB / 1 GB, past every cache
    seconds, _ = _best_seconds(jax.jit(lambda v: v * 0.5 + 0.5, donate_argnums=0), x, reps)
    return flops, 2 * x.nbytes / seconds  # read and write


def peak_memory_bytes() -> tuple[str, int]:
    """Peak device memory on an accelerator, else this process's peak RSS."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return "device", int(stats["peak_bytes_in_use"])
    return "rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _own_keys(group: str, values: dict) -> dict:
    """``values`` without the keys the chosen schema of ``group`` does not have."""
    fields = schemas(group)[values["name"]].__dataclass_fields__
    return {k: v for k, v in values.items() if k in fields}


def workload_experiment(workload: str, model: dict, algo: dict, placement: str = "device") -> tuple:
    """(Experiment, task source, default meta-batch) of ``WORKLOADS[workload]`` with ``model``
    settings over the workload's and ``algo`` settings over the defaults (inner_lr 0.01).

    Image workloads get random uint8 data, 40 classes x 20 images of the workload's shape per
    split: a meta-step's cost does not depend on the pixel values.
    """
    dataset, model_defaults, shape, default_batch = WORKLOADS[workload]
    cfg = OmegaConf.structured(Config)
    cfg.dataset = section_config("dataset", dataset)
    # The bench's switches (conv_impl, remat) apply where the model or algorithm has them.
    cfg.model = section_config("model", _own_keys("model", dict(model_defaults, **model)))
    cfg.algo = section_config("algo", _own_keys("algo", {"name": "maml", **algo, "inner_lr": 0.01}))
    if shape is None:
        source = sinusoid_source(cfg.dataset)
    else:
        rng = np.random.default_rng(0)
        arrays = {
            s: rng.integers(0, 256, (40, 20, *shape), dtype=np.uint8) for s in ("train", "validation", "test")
        }
        source = image_source(cfg.dataset, arrays, placement=placement)
    return setup(cfg, source), source, default_batch


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
    steps_per_call: int = 1,
    peak_flops: float | None = None,
    peak_bytes: float | None = None,
    count_only: bool = False,
    pool_impl: str = "reduce_window",
) -> dict:
    """One row (see the module docstring). ``count_only``: compile and count the step
    (FLOPs, bytes, XLA memory) without running it; the timing fields are then None."""
    exp, source, default_batch = workload_experiment(
        workload,
        {"conv_impl": conv_impl, "pool_impl": pool_impl, "compute_dtype": compute_dtype},
        {"name": algo, "inner_steps": inner_steps, "remat": remat},
        placement,
    )
    batch = meta_batch or default_batch
    mesh = task_mesh()  # all local devices, as in `metalearn train`
    state = init_state(exp, seed=0, mesh=mesh)
    if source.host is not None and steps_per_call != 1:
        raise SystemExit("bench: --steps-per-call > 1 needs placement=device (the loop's host path is 1)")
    step = make_meta_step(exp, batch, mesh=mesh)
    if steps_per_call == 1:
        run = step
    else:  # blocks of steps_per_call steps per call, as the training loop runs them
        block = make_meta_block(exp, batch, mesh=mesh, max_steps=steps_per_call)
        run = lambda state, data: block(state, data, steps_per_call)  # noqa: E731
    if source.host is None:
        data = replicate(source.splits["train"], mesh)
        batches = None
    else:  # episodes gathered on the host by a prefetching thread, as in `metalearn train`
        batches = HostPrefetcher(source, state.key, batch, mesh, 0, 10**9, depth=2)
        data = next(batches)

    start = time.perf_counter()
    compiled = step.lower(state, data).compile()
    xla_bytes = compiled_memory_bytes(compiled)
    if not count_only:
        state, metrics = run(state, data)
        jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - start
    flops, nbytes, counted = step_cost(compiled, lambda: make_meta_step(exp, batch, mesh=mesh), state, data)

    n, elapsed = 0, 0.0
    if not count_only:
        start = time.perf_counter()
        while n < min_steps or time.perf_counter() - start < min_seconds:
            state, metrics = run(state, data if batches is None else next(batches))
            n += steps_per_call
            if n % (10 * steps_per_call) == 0:  # bound the dispatch queue without syncing every call
                jax.block_until_ready(metrics)
        jax.block_until_ready((state, metrics))
        elapsed = time.perf_counter() - start
    if batches is not None:
        batches.close()
    kind, peak = peak_memory_bytes()
    rate = n / elapsed if n else None
    achieved = None if flops is None or rate is None else flops * rate
    traffic = None if nbytes is None or rate is None else nbytes * rate
    roof = roofline(flops, nbytes, peak_flops, peak_bytes)
    return {
        "workload": workload,
        "algo": algo,
        "inner_steps": inner_steps,
        "conv_impl": conv_impl,
        "pool_impl": pool_impl,
        "meta_batch": batch,
        "remat": remat,
        "compute_dtype": compute_dtype,
        "placement": source.placement,
        "steps_per_call": steps_per_call,
        "steps_per_s": rate,
        "tasks_per_s": None if rate is None else rate * batch,
        "flops_per_step": flops,
        "bytes_per_step": nbytes,
        "flops_counted": counted,
        **roof,
        "achieved_flops_per_s": achieved,
        "peak_flops_per_s": peak_flops,
        "peak_fraction": None if achieved is None or not peak_flops else achieved / peak_flops,
        "roof_fraction": None
        if achieved is None or not roof["roof_flops_per_s"]
        else achieved / roof["roof_flops_per_s"],
        "achieved_bytes_per_s": traffic,
        "peak_bytes_per_s": peak_bytes,
        "bandwidth_fraction": None if traffic is None or not peak_bytes else traffic / peak_bytes,
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
    parser.add_argument(
        "--pool-impl", default="reduce_window", help="comma list of model.pool_impl values (max-pool models)"
    )
    parser.add_argument("--meta-batch", default="", help="comma list; default: each workload's paper value")
    parser.add_argument("--remat", default="false", help="comma list of true/false")
    parser.add_argument("--dtype", default="float32", help="comma list of model.compute_dtype values")
    parser.add_argument(
        "--placement", default="device", help="comma list: device (sampled in the step) or host (prefetched)"
    )
    parser.add_argument(
        "--steps-per-call", default="1", help="comma list: meta-steps per jitted call (blocks, as in train)"
    )
    parser.add_argument(
        "--peak-gflops", type=float, help="the device's peak GFLOP/s for %%peak (default: measured, matmul)"
    )
    parser.add_argument(
        "--peak-gbps", type=float, help="the device's memory bandwidth in GB/s for %%bw (default: measured)"
    )
    parser.add_argument(
        "--no-isolate", action="store_true", help="run every row in this process (peak memory is then shared)"
    )
    parser.add_argument(
        "--count-only",
        action="store_true",
        help="compile and count FLOPs and bytes per step (XLA cost analysis) without timing the step",
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
        f"{'workload':<18} {'algo':<7} {'k':>2} {'conv':<6} {'pool':<6} {'batch':>5} {'remat':<5} "
        f"{'dtype':<8} {'place':<6} {'spc':>4} {'steps/s':>9} {'tasks/s':>9} {'compile s':>9} "
        f"{'peak MB':>9} {'XLA MB':>8} {'GF/step':>9} {'GB/step':>8} {'F/B':>6} {'roof':<7} "
        f"{'GF/s':>8} {'%peak':>6} {'%bw':>6} {'%roof':>6}"
    )
    print(f"backend {jax.default_backend()}, devices {jax.devices()}")
    peaks = {}
    for dtype in split(args.dtype):
        flops, nbytes = measure_peaks(dtype)
        flops = flops if args.peak_gflops is None else args.peak_gflops * 1e9
        nbytes = nbytes if args.peak_gbps is None else args.peak_gbps * 1e9
        peaks[dtype] = (flops, nbytes)
        how_f = "given" if args.peak_gflops else "matmul, measured"
        how_b = "given" if args.peak_gbps else "streaming, measured"
        print(
            f"peak {dtype}: {flops / 1e9:.1f} GFLOP/s ({how_f}), {nbytes / 1e9:.1f} GB/s ({how_b}); "
            f"ridge {flops / nbytes:.1f} FLOP/B: a step of fewer FLOPs per byte is bound by memory"
        )
    print(header)
    specs = [
        dict(
            workload=workload,
            algo=algo,
            inner_steps=k,
            conv_impl=impl,
            pool_impl=pool,
            meta_batch=mb,
            remat=remat,
            min_steps=args.min_steps,
            min_seconds=args.min_seconds,
            compute_dtype=dtype,
            placement=placement,
            steps_per_call=spc,
            peak_flops=peaks[dtype][0],
            peak_bytes=peaks[dtype][1],
            count_only=args.count_only,
        )
        for workload, algo, k, impl, pool, mb, remat, dtype, placement, spc in itertools.product(
            split(args.workloads),
            split(args.algos),
            map(int, split(args.inner_steps)),
            split(args.conv_impl),
            split(args.pool_impl),
            [int(b) for b in split(args.meta_batch)] or [None],
            [r.lower() == "true" for r in split(args.remat)],
            split(args.dtype),
            split(args.placement),
            map(int, split(args.steps_per_call)),
        )
        # the sinusoid MLP has no convolutions: one conv_impl is enough
        if not (
            workload == "sinusoid"
            and (
                impl != split(args.conv_impl)[0]
                or placement != split(args.placement)[0]
                or pool != split(args.pool_impl)[0]
            )
        )
    ]
    for spec in specs:
        row = bench_one(**spec) if args.no_isolate else _isolated(spec)
        rows.append(row)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(format_row(row), flush=True)
    print(f"appended {len(rows)} rows to {out}")


def format_row(row: dict) -> str:
    def num(value, fmt: str, scale: float = 1.0) -> str:
        width = int("".join(c for c in fmt.split(".")[0] if c.isdigit()))
        return f"{'-':>{width}}" if value is None else format(value * scale, fmt)

    return (
        f"{row['workload']:<18} {row['algo']:<7} {row['inner_steps']:>2} {row['conv_impl']:<6} "
        f"{row.get('pool_impl', 'reduce_window')[:6]:<6} "
        f"{row['meta_batch']:>5} {str(row['remat']):<5} {row['compute_dtype']:<8} {row['placement']:<6} "
        f"{row['steps_per_call']:>4} {num(row['steps_per_s'], '>9.2f')} {num(row['tasks_per_s'], '>9.1f')} "
        f"{row['compile_s']:>9.1f} {row['peak_memory_mb']:>9.0f} {num(row['xla_memory_mb'], '>8.0f')} "
        f"{num(row['flops_per_step'], '>9.4f', 1e-9)} {num(row['bytes_per_step'], '>8.3f', 1e-9)} "
        f"{num(row.get('arithmetic_intensity'), '>6.2f')} {row.get('bound') or '-':<7} "
        f"{num(row['achieved_flops_per_s'], '>8.2f', 1e-9)} "
        f"{num(row['peak_fraction'], '>6.1%')} {num(row['bandwidth_fraction'], '>6.1%')} "
        f"{num(row.get('roof_fraction'), '>6.1%')}"
    )


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
