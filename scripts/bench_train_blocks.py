"""Side-by-side `metalearn train` runs with one dispatch per meta-step
(``trainer.steps_per_call=1``) and with automatic blocks of steps per call (the default,
``trainer.steps_per_call=0``), alternated round by round in one sitting so both variants
see the same machine.

Each run is a separate `metalearn train` process with the given overrides (default: the
sinusoid defaults, 70,000 meta-steps). From each run's ``metrics.jsonl`` and
``results.json`` it reports the training rate end to end (steps / training time, which
includes compilation, validation and checkpoints) and the median and 90th percentile of the
per-log-interval rates, plus the test metric (equal in both variants: the same steps are
computed). Prints a table and the per-round ratios, and writes them as JSON lines.

    python scripts/bench_train_blocks.py --rounds 2 --out docs/runs/train_blocks_cpu.jsonl
    python scripts/bench_train_blocks.py --rounds 1 -- trainer.steps=5000   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "one step per call": ["trainer.steps_per_call=1"],
    "automatic blocks": ["trainer.steps_per_call=0"],
}


def one_run(overrides: list[str], run_dir: Path) -> dict:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per run")
    parser.add_argument("overrides", nargs="*", help="extra `metalearn train` overrides (after --)")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(1, args.rounds + 1):
            names = list(VARIANTS) if round_ % 2 else list(reversed(VARIANTS))  # alternate who goes first
            for name in names:
                row = one_run([*args.overrides, *VARIANTS[name]], Path(tmp) / f"{round_}_{len(rows)}")
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


if __name__ == "__main__":
    main()
