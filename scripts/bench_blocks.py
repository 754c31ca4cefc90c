"""Side-by-side timing of the training loop's compiled block (train.make_meta_block) run
one meta-step per call against blocks of N steps per call, interleaved in one process.

Each round times both variants for --seconds each, alternating which goes first, so
both see the same machine load (useful on a shared machine, where back-to-back runs drift
more than the effect). Prints each round and the median of the per-round ratios.

    python scripts/bench_blocks.py                                # sinusoid, MAML defaults
    python scripts/bench_blocks.py --steps-per-call 200 --rounds 20 --seconds 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
from omegaconf import OmegaConf

from metalearn.config import Config
from metalearn.train import init_state, make_meta_block, replicate, setup, task_mesh


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps-per-call", type=int, default=200)
    parser.add_argument("--meta-batch", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args(argv)

    cfg = OmegaConf.structured(Config)  # sinusoid, MLP 1-40-40-1, second-order MAML, Adam
    exp = setup(cfg)
    mesh = task_mesh()
    data = replicate(exp.source.splits["train"], mesh)
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


if __name__ == "__main__":
    main()
