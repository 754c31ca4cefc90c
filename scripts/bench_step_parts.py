"""Where a meta-step's time goes: each part of the training step timed on its own, inside
one compiled loop of ``--inner`` iterations (so host dispatch is amortised away), beside
the whole step in the training loop's block and one step per call.

Parts (the default config: sinusoid, MLP 1-40-40-1, second-order MAML, 25 tasks, Adam):
  sample       the meta-batch of tasks drawn on device (train.sample_tasks)
  meta_grad    the algorithm's meta-gradient for a fixed batch of tasks
  optimizer    the outer Adam update (optax) of a parameter-shaped gradient
  block step   a whole meta-step inside train.make_meta_block (blocks of --inner steps)
  call step    a whole meta-step, one compiled call per step (trainer.steps_per_call=1)

Each XLA flag set given with --xla-flags runs in its own subprocess (XLA reads XLA_FLAGS
once, at start-up), rounds alternating, so all sets see the same machine. Prints one line
per part and flag set (median over rounds, microseconds per step) and appends JSON lines
to --out.

    python scripts/bench_step_parts.py
    python scripts/bench_step_parts.py --threefry unrolled
    python scripts/bench_step_parts.py --rounds 2 --xla-flags= \\
        --xla-flags=--xla_cpu_multi_thread_eigen=false --out docs/runs/cpu_step_parts.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def use_unrolled_threefry() -> None:
    """Lower jax's threefry hash on CPU as straight-line code (what jax does on GPU) instead
    of the CPU's rolled 5-iteration loop. Same bits; private jax API, for this benchmark only."""
    from jax._src.interpreters import mlir
    from jax._src.random import threefry2x32

    rule = threefry2x32._threefry2x32_lowering_rule
    mlir.register_lowering(threefry2x32.threefry2x32_p, rule, platform="cpu")


def measure(inner: int, seconds: float) -> dict[str, float]:
    """Microseconds per meta-step of each part, in this process (XLA_FLAGS already set)."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    from omegaconf import OmegaConf

    from metalearn.config import Config
    from metalearn.train import init_state, make_meta_block, replicate, sample_tasks, setup, task_mesh

    cfg = OmegaConf.structured(Config)
    batch = cfg.trainer.meta_batch_size
    exp = setup(cfg)
    mesh = task_mesh()
    data = replicate(exp.source.splits["train"], mesh)
    state = init_state(exp, 0, mesh)
    key = jax.random.PRNGKey(0)
    tasks = sample_tasks(exp, data, key, batch, mesh)

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
        grads, _ = exp.algo.meta_grad(params, tasks, key)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--inner", type=int, default=200, help="meta-steps per compiled loop")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing window per part")
    parser.add_argument(
        "--xla-flags",
        action="append",
        help="an XLA_FLAGS value to compare (repeat; give it with '=', e.g. --xla-flags= for none)",
    )
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per run")
    parser.add_argument(
        "--threefry", choices=["rolled", "unrolled"], default="rolled", help="jax's CPU PRNG lowering"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    args.xla_flags = args.xla_flags or [""]
    if args.child:
        if args.threefry == "unrolled":
            use_unrolled_threefry()
        print(json.dumps(measure(args.inner, args.seconds)))
        return

    runs: dict[str, list[dict[str, float]]] = {flags: [] for flags in args.xla_flags}
    for r in range(args.rounds):
        order = args.xla_flags if r % 2 == 0 else list(reversed(args.xla_flags))
        for flags in order:
            env = dict(os.environ, XLA_FLAGS=flags)
            command = [
                sys.executable,
                __file__,
                "--child",
                f"--inner={args.inner}",
                f"--seconds={args.seconds}",
            ]
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
            parts = json.loads(out.strip().splitlines()[-1])
            runs[flags].append(parts)
            record = {"round": r, "xla_flags": flags, "threefry": args.threefry, "us_per_step": parts}
            record["cpus"] = os.cpu_count()
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


if __name__ == "__main__":
    main()
