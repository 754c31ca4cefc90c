"""The ResNet-12 pre-train -> ProtoNet chain end to end, with each stage's cost.

Writes a synthetic mini-ImageNet-shaped image folder (84x84 colour PNGs; 64 / 16 / 20 classes
in train/ val/ test/, --per-class images each; every class a random smooth colour pattern plus
noise, so the chain has something to learn), then runs the suite
``metalearn reproduce resnet12_chain`` on it (conf/suite/resnet12_chain.yaml: supervised
pre-training of a ResNet-12 over the 64 training classes, then ProtoNet meta-trained from
its backbone by ``model.init_from``), each stage an ordinary ``metalearn train`` subprocess.

Per stage it prints and appends to --out (default outputs/bench/bench.jsonl, the file
scripts/bench.py writes) one JSON line: steps, seconds per step (the median of the logged
rates after the first, compiled, step), compile seconds, wall seconds, the stage's peak
resident memory (the subprocess's own ``ru_maxrss``, recorded by ``reproduce`` in
jobs.jsonl) and its test accuracy. On a CPU, resident memory includes the dataset.

    python scripts/bench_chain.py                          # about 10 minutes on 2 CPU cores
    python scripts/bench_chain.py --per-class 60 trainer.steps=20   # overrides go to both stages
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

SUITE = "resnet12_chain"
CLASSES = {"train": 64, "val": 16, "test": 20}  # the Ravi & Larochelle split's class counts


def write_folder(folder: Path, per_class: int, size: int, seed: int = 0) -> None:
    """train/ val/ test/ class folders of ``per_class`` PNGs (size x size x 3) each."""
    if (folder / "done").is_file():
        return
    rng = np.random.default_rng(seed)
    for split, n_classes in CLASSES.items():
        for c in range(n_classes):
            # A 4x4 colour grid upscaled: classes differ in a pattern a conv net can see.
            # Faint against the noise, so that one image is not enough to tell every class apart.
            pattern = np.kron(rng.uniform(96, 160, (4, 4, 3)), np.ones((size // 4 + 1, size // 4 + 1, 1)))
            pattern = pattern[:size, :size]
            class_dir = folder / split / f"{split}{c:03d}"  # names differ across splits
            class_dir.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image = np.clip(pattern + rng.normal(0, 64, pattern.shape), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(class_dir / f"{i:04d}.png")
    (folder / "done").write_text("complete\n")


def stage_row(run_dir: Path, job: dict) -> dict:
    """The cost of one finished stage from its run dir and its line of jobs.jsonl."""
    rates = [
        r["steps_per_s"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if r.get("split") == "train" and r.get("steps_per_s")
    ]
    results = json.loads((run_dir / "results.json").read_text())
    per_step = 1.0 / statistics.median(rates[1:] or rates) if rates else None
    return {
        "kind": "chain",
        "suite": SUITE,
        "stage": job["experiment"],
        "algo": results["algo"],
        "steps": results["steps"],
        "seconds_per_step": per_step,
        "compile_s": results.get("compile_time_s"),
        "wall_s": job["seconds"],
        "peak_rss_mib": job["peak_rss_mib"],
        "test_accuracy": results["test"]["mean"],
        "init_from": results.get("init_from"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--folder", type=Path, default=Path("outputs/bench/mini_imagenet_shaped"))
    parser.add_argument("--per-class", type=int, default=30, help="images per class (real: 600)")
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--report", type=Path, default=None, help="the suite's report folder")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/bench.jsonl"))
    parser.add_argument("overrides", nargs="*", help="extra overrides for both stages")
    args = parser.parse_args(argv)

    folder = args.folder / f"{args.image_size}px_{args.per_class}"
    write_folder(folder, args.per_class, args.image_size)
    report = args.report or Path("outputs/bench/chain") / time.strftime("%Y-%m-%d_%H-%M-%S")
    command = [
        sys.executable, "-m", "metalearn.cli", "reproduce", SUITE, "--out", str(report),
        f"dataset.path={folder}", f"dataset.data_dir={folder.parent / 'cache'}",
        f"dataset.image_size={args.image_size}", *args.overrides,
    ]  # fmt: skip
    print(" ".join(command[2:]), flush=True)
    code = subprocess.call(command)
    if code != 0:
        print(f"bench_chain: the suite failed (exit {code}); logs in {report / 'logs'}", file=sys.stderr)
        return code
    jobs = [json.loads(line) for line in (report / "jobs.jsonl").read_text().splitlines()]
    rows = [stage_row(report / "runs" / job["experiment"] / f"seed{job['seed']}", job) for job in jobs]
    print(
        f"\n{'stage':<30} {'steps':>5} {'s/step':>7} {'compile s':>9} {'wall s':>7} "
        f"{'peak MiB':>9} {'test acc':>8}"
    )
    for row in rows:
        per_step = "-" if row["seconds_per_step"] is None else f"{row['seconds_per_step']:.2f}"
        print(
            f"{row['stage']:<30} {row['steps']:>5} {per_step:>7} {row['compile_s']:>9.1f} "
            f"{row['wall_s']:>7.0f} {row['peak_rss_mib']:>9.0f} {row['test_accuracy']:>8.2%}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"appended {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
