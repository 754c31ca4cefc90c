"""Blocks of meta-steps per compiled call (metalearn.step.make_meta_block) against one
meta-step per call, measured three ways; each alternates the variants round by round in one
sitting, so both see the same machine (on a shared machine back-to-back runs drift more
than the effect).

``calls``: the same compiled block in one process, run with 1 step per call and with
    ``--steps-per-call`` steps per call, each for ``--seconds`` per round. Prints each
    round's rates and the median of the per-round ratios.
``runs``: whole `metalearn train` processes with ``trainer.steps_per_call=1`` and with the
    automatic blocks (``trainer.steps_per_call=0``, the default), with the given overrides
    (default: the sinusoid defaults, 70,000 meta-steps). From each run's metrics.jsonl and
    results.json: steps per second end to end (steps / training time, which includes
    compilation, validation and checkpoints), the median and 90th percentile of the
    per-log-interval rates, and the test metric (equal in both variants: the same steps are
    computed). Prints a table and the per-round ratios; ``--out`` appends JSON lines.
``parts``: where a meta-step's time goes. Each part of the step is timed on its own inside
    one compiled loop of ``--inner`` iterations (so host dispatch is amortised away), beside
    the whole step in a block and one step per call. Parts (the default config: sinusoid,
    MLP 1-40-40-1, second-order MAML, 25 tasks, Adam):

      sample       the meta-batch of tasks drawn on device (step.sample_tasks)
      meta_grad    the algorithm's meta-gradient for a fixed batch of tasks
      optimizer    the outer Adam update (optax) of a parameter-shaped gradient
      block step   a whole meta-step inside step.make_meta_block (blocks of --inner steps)
      call step    a whole meta-step, one compiled call per step (trainer.steps_per_call=1)

    Each XLA flag set given with ``--xla-flags`` runs in its own subprocess (XLA reads
    XLA_FLAGS once, at start-up). Prints one line per part and flag set (median over
    rounds, microseconds per step); ``--out`` appends JSON lines. The former
    ``--threefry unrolled`` option (jax's GPU lowering of the threefry hash registered for
    CPU) is gone: it needed jax's private ``jax._src`` modules, and it never reached the
    timing subprocess, so the rows it recorded used the default lowering.

    python scripts/bench_blocks.py calls                          # sinusoid, MAML defaults
    python scripts/bench_blocks.py calls --steps-per-call 200 --rounds 20 --seconds 1
    python scripts/bench_blocks.py runs --rounds 2 --out docs/runs/train_blocks_cpu.jsonl
    python scripts/bench_blocks.py runs --rounds 1 -- trainer.steps=5000   # a quick look
    python scripts/bench_blocks.py parts
    python scripts/bench_blocks.py parts --rounds 2 --xla-flags= \\
        --xla-flags=--xla_cpu_multi_thread_eigen=false --out docs/runs/cpu_step_parts.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _default_experiment():
    """(config, experiment, mesh, replicated training data) of the default config."""
    from omegaconf import OmegaConf

    from metalearn.config import Config
    from metalearn.step import replicate, setup, task_mesh

    cfg = OmegaConf.structured(Config)  # sinusoid, MLP 1-40-40-1, second-order MAML, Adam
    exp = setup(cfg)
    mesh = task_mesh()
    return cfg, exp, mesh, replicate(exp.source.splits["train"], mesh)


# --- calls: one compiled block, 1 against N steps per call --------------------------------


def bench_calls(args: argparse.Namespace) -> None:
    import jax

    from metalearn.step import init_state, make_meta_block

    _, exp, mesh, data = _default_experiment()
    n = args.steps_per_call
    block = make_meta_block(exp, args.meta_batch, mesh=mesh, max_steps=n)
    state = init_state(exp, 0, mesh)
    for length in (1, n):  # compile (one executable) and warm up
        state, history = block(state, data, length)
    jax.block_until_ready(history)

    def rate(length: int) -> float:
        nonlocal state
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            state, history = block(state, data, length)
            steps += length
        jax.block_until_ready(history)
        return steps / (time.perf_counter() - start)

    ratios = []
    for r in range(args.rounds):
        order = (1, n) if r % 2 == 0 else (n, 1)
        rates = {length: rate(length) for length in order}
        ratios.append(rates[n] / rates[1])
        print(
            f"round {r}: 1 step/call {rates[1]:8.0f} steps/s   {n} steps/call {rates[n]:8.0f} steps/s   "
            f"ratio {ratios[-1]:.2f}",
            flush=True,
        )
    print(
        f"median ratio {statistics.median(ratios):.2f} over {args.rounds} rounds "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f})"
    )


# --- runs: whole `metalearn train` processes ----------------------------------------------

RUN_VARIANTS = {
    "one step per call": ["trainer.steps_per_call=1"],
    "automatic blocks": ["trainer.steps_per_call=0"],
}


def one_run(overrides: list[str], run_dir: Path) -> dict:
    """One `metalearn train` process; its rates and test metric."""
    command = [sys.executable, "-m", "metalearn.cli", "train", *overrides, "trainer.progress=false"]
    start = time.perf_counter()
    subprocess.run([*command, f"hydra.run.dir={run_dir}"], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    rates = [r["steps_per_s"] for r in train[1:]]  # the first interval holds the compilation
    results = json.loads((run_dir / "results.json").read_text())
    steps = train[-1]["step"]
    return {
        "steps": steps,
        "wall_s": round(wall, 2),
        "train_time_s": round(train[-1]["time_s"], 2),
        "end_to_end_steps_per_s": round(steps / train[-1]["time_s"], 1),
        "interval_median_steps_per_s": round(statistics.median(rates), 1),
        "interval_p90_steps_per_s": round(sorted(rates)[int(0.9 * (len(rates) - 1))], 1),
        "test_mean": results["test"]["mean"],
    }


def bench_runs(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(1, args.rounds + 1):
            # Alternate which variant goes first.
            names = list(RUN_VARIANTS) if round_ % 2 else list(reversed(RUN_VARIANTS))
            for name in names:
                row = one_run([*args.overrides, *RUN_VARIANTS[name]], Path(tmp) / f"{round_}_{len(rows)}")
                row = {"round": round_, "variant": name, "overrides": args.overrides, **row}
                rows.append(row)
                print(json.dumps(row), flush=True)
    header = f"{'variant':<20} {'round':>5} {'end-to-end':>11} {'median':>8} {'p90':>8} {'test':>8}"
    print(header)
    for r in rows:
        print(
            f"{r['variant']:<20} {r['round']:>5} {r['end_to_end_steps_per_s']:>11} "
            f"{r['interval_median_steps_per_s']:>8} {r['interval_p90_steps_per_s']:>8} {r['test_mean']:>8.4f}"
        )
    for round_ in range(1, args.rounds + 1):
        by = {r["variant"]: r for r in rows if r["round"] == round_}
        one, blocks = by["one step per call"], by["automatic blocks"]
        print(
            f"round {round_}: blocks / one step per call = "
            f"{blocks['end_to_end_steps_per_s'] / one['end_to_end_steps_per_s']:.2f}x end to end, "
            f"{blocks['interval_median_steps_per_s'] / one['interval_median_steps_per_s']:.2f}x "
            "median interval"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


# --- parts: the step's parts, each in a compiled loop -------------------------------------


def measure_parts(inner: int, seconds: float) -> dict[str, float]:
    """Microseconds per meta-step of each part, in this process (XLA_FLAGS already set)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from metalearn.step import init_state, make_meta_block, sample_tasks

    cfg, exp, mesh, data = _default_experiment()
    batch = cfg.trainer.meta_batch_size
    state = init_state(exp, 0, mesh)
    key = jax.random.PRNGKey(0)
    tasks = sample_tasks(exp, data, key, batch, mesh)
    algo_state = exp.algo.init_state(state.params)

    def per_step(run, carry, steps_per_call: int) -> float:
        carry = run(carry)  # compile and warm up
        jax.block_until_ready(carry)
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            carry = run(carry)
            calls += 1
        jax.block_until_ready(carry)
        return (time.perf_counter() - start) / (calls * steps_per_call) * 1e6

    def looped(body):
        return jax.jit(lambda carry: lax.fori_loop(0, inner, body, carry))

    def sample(i, acc):
        # Each iteration draws a new batch; the sum keeps the draw from being optimised away.
        t = sample_tasks(exp, data, jax.random.fold_in(key, i + acc.astype(jnp.int32)), batch, mesh)
        return acc + 0.0 * t.support_x.sum()

    def meta_grad(i, params):
        grads, _, _ = exp.algo.meta_grad(params, algo_state, tasks, key, jnp.zeros((), jnp.int32))
        return jax.tree.map(lambda p, g: p - 1e-6 * g, params, grads)

    def optimizer(i, carry):
        params, opt_state = carry
        updates, opt_state = exp.optimizer.update(jax.tree.map(lambda p: 1e-3 * p, params), opt_state, params)
        return jax.tree.map(lambda p, u: p + u, params, updates), opt_state

    block = make_meta_block(exp, batch, mesh=mesh, max_steps=inner)
    results = {
        "sample": per_step(looped(sample), jnp.float32(0), inner),
        "meta_grad": per_step(looped(meta_grad), state.params, inner),
        "optimizer": per_step(looped(optimizer), (state.params, state.opt_state), inner),
    }
    state = init_state(exp, 0, mesh)
    results["block step"] = per_step(lambda s: block(s, data, inner)[0], state, inner)
    one = make_meta_block(exp, batch, mesh=mesh, max_steps=1)
    state = init_state(exp, 0, mesh)
    results["call step"] = per_step(lambda s: one(s, data, 1)[0], state, 1)
    return {name: round(us, 1) for name, us in results.items()}


def bench_parts(args: argparse.Namespace) -> None:
    args.xla_flags = args.xla_flags or [""]
    if args.child:
        print(json.dumps(measure_parts(args.inner, args.seconds)))
        return

    runs: dict[str, list[dict[str, float]]] = {flags: [] for flags in args.xla_flags}
    for r in range(args.rounds):
        order = args.xla_flags if r % 2 == 0 else list(reversed(args.xla_flags))
        for flags in order:
            env = dict(os.environ, XLA_FLAGS=flags)
            command = [
                sys.executable,
                __file__,
                "parts",
                "--child",
                f"--inner={args.inner}",
                f"--seconds={args.seconds}",
            ]
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
            parts = json.loads(out.strip().splitlines()[-1])
            runs[flags].append(parts)
            record = {"round": r, "xla_flags": flags, "us_per_step": parts, "cpus": os.cpu_count()}
            print(json.dumps(record), flush=True)
            if args.out is not None:
                with args.out.open("a") as f:
                    f.write(json.dumps(record) + "\n")

    print(f"\nmedian microseconds per meta-step over {args.rounds} round(s), {args.inner} steps per loop")
    names = list(runs[args.xla_flags[0]][0])
    print(f"{'part':12s}" + "".join(f"  {flags or '(no flags)':>36s}" for flags in args.xla_flags))
    for name in names:
        cells = [statistics.median(p[name] for p in runs[flags]) for flags in args.xla_flags]
        print(f"{name:12s}" + "".join(f"  {c:36.1f}" for c in cells))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    modes = parser.add_subparsers(dest="mode", required=True)

    calls = modes.add_parser("calls", help="one compiled block in one process: 1 against N steps per call")
    calls.add_argument("--steps-per-call", type=int, default=200)
    calls.add_argument("--meta-batch", type=int, default=25)
    calls.add_argument("--rounds", type=int, default=10)
    calls.add_argument("--seconds", type=float, default=1.0, help="timing window per variant and round")
    calls.set_defaults(run=bench_calls)

    runs = modes.add_parser("runs", help="whole `metalearn train` runs: steps_per_call=1 against automatic")
    runs.add_argument("--rounds", type=int, default=2)
    runs.add_argument("--out", type=Path, default=None, help="append one JSON line per run")
    runs.add_argument("overrides", nargs="*", help="extra `metalearn train` overrides (after --)")
    runs.set_defaults(run=bench_runs)

    parts = modes.add_parser("parts", help="each part of the meta-step in a compiled loop, per XLA flag set")
    parts.add_argument("--rounds", type=int, default=2)
    parts.add_argument("--inner", type=int, default=200, help="meta-steps per compiled loop")
    parts.add_argument("--seconds", type=float, default=2.0, help="timing window per part")
    parts.add_argument(
        "--xla-flags",
        action="append",
        help="an XLA_FLAGS value to compare (repeat; give it with '=', e.g. --xla-flags= for none)",
    )
    parts.add_argument("--out", type=Path, default=None, help="append one JSON line per run")
    parts.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parts.set_defaults(run=bench_parts)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
