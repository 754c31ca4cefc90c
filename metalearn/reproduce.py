"""`metalearn reproduce <suite>`: run a suite of experiment presets over seeds and report.

A thin driver around ``metalearn train``: every (preset, seed) job is one
``metalearn train experiment=<preset> seed=<seed> ...`` subprocess, run one after another
with its run dir under the report folder (``<out>/runs/<preset>/seed<seed>``), so each run
is an ordinary run dir (``metalearn eval run_dir=...`` works on it). A job that fails is
recorded (``error.txt``) and the suite goes on. At the end the runs are aggregated with
:mod:`metalearn.report` into ``results.md``, ``results.csv`` and ``curves/*.png``, next to
the numbers the presets record from the papers.

Subprocesses rather than in-process calls: each job starts with a fresh JAX/XLA state and
its own Hydra run dir, exactly as a user's command would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from metalearn.errors import ConfigError, OneLineArgumentParser
from metalearn.report import write_report
from metalearn.rundir import check_writable

OMNIGLOT_ENV = "METALEARN_OMNIGLOT_DIR"
MINI_IMAGENET_ENV = "METALEARN_MINI_IMAGENET_DIR"


@dataclass(frozen=True)
class Suite:
    """Presets (conf/experiment/) run for each seed, with extra overrides for every job."""

    experiments: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    overrides: tuple[str, ...] = ()
    # Per-preset overrides on top of ``overrides`` (e.g. a smaller budget for one preset).
    per_experiment: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Expected wall time, for the listing; measured where stated.
    expected: str = ""


_OMNI_MAML = ("maml_omniglot_5w1s", "maml_omniglot_5w5s", "maml_omniglot_20w1s", "maml_omniglot_20w5s")

SUITES: dict[str, Suite] = {
    # A pipeline check, not a reproduction: tiny budgets, 2 seeds. Omniglot runs on the
    # "small" archives (the ones a CPU machine is likely to have) with small test sets.
    "smoke": Suite(
        experiments=("maml_sinusoid_k5", "maml_omniglot_5w1s"),
        seeds=(0, 1),
        overrides=("trainer.checkpoint_every=0", "eval.n_tasks=100"),
        per_experiment={
            "maml_sinusoid_k5": (
                "trainer.steps=2000",
                "trainer.log_every=50",
                "trainer.val_every=500",
                "trainer.val_tasks=100",
            ),
            "maml_omniglot_5w1s": (
                "dataset.variant=small",
                "trainer.steps=300",
                "trainer.meta_batch_size=8",
                "trainer.val_every=100",
                "trainer.val_tasks=50",
                "trainer.log_every=25",
            ),
        },
        expected="3 min 21 s measured on 2 CPU cores (cold Omniglot cache: the build included)",
    ),
    "maml_sinusoid": Suite(
        experiments=("maml_sinusoid_k5", "maml_sinusoid_k10"),
        expected="6 runs x 70k steps: about 35 s each on one H200 (about 4 min); "
        "1.5-3 min each on 2 CPU cores",
    ),
    "maml_omniglot": Suite(
        experiments=_OMNI_MAML,
        expected="12 runs x 60k steps on one H200, about 70 min: per run 5w1s 107 s (measured, small "
        "variant), 5w5s ~2 min, 20w1s ~7 min, 20w5s ~13 min (estimated from scripts/bench.py throughput)",
    ),
    "fomaml_omniglot": Suite(
        experiments=tuple(e.replace("maml_", "fomaml_", 1) for e in _OMNI_MAML),
        expected="12 runs x 60k steps on one H200, about 40 min (estimated: first order makes the "
        "5-step 20-way runs about 2.3x faster, scripts/bench.py)",
    ),
    # Issue 13's algorithms. MAML++ presets come from metalearn/algos/mamlpp.py's branch.
    "mamlpp": Suite(
        experiments=(
            "mamlpp_omniglot_5w1s",
            "mamlpp_omniglot_20w1s",
            "mamlpp_miniimagenet_5w1s",
            "mamlpp_miniimagenet_5w5s",
        ),
        expected="12 runs; accelerator-sized (not measured here)",
    ),
    "imaml": Suite(
        experiments=("imaml_omniglot_5w1s", "imaml_omniglot_20w1s", "imaml_miniimagenet_5w1s"),
        expected="9 runs of 20k-60k steps with 16-25 inner steps; accelerator-sized (not measured here)",
    ),
    "protonet": Suite(
        experiments=(
            "protonet_omniglot_5w1s",
            "protonet_omniglot_20w1s",
            "protonet_miniimagenet_5w1s",
            "protonet_miniimagenet_5w5s",
        ),
        expected="12 runs of 20k-30k single-episode steps; accelerator-sized (not measured here)",
    ),
    "protomaml": Suite(
        experiments=("protomaml_omniglot_5w1s",),
        expected="3 runs of 60k steps at MAML's Omniglot cost (first order); accelerator-sized",
    ),
    "others": Suite(
        experiments=("caml_sinusoid_k10", "metasgd_omniglot_5w1s", "reptile_omniglot_5w1s"),
        expected="9 runs on one H200: a few minutes for CAML sinusoid, 2-4 min per Omniglot run",
    ),
}


def _needs_omniglot(experiment: str) -> bool:
    return "omniglot" in experiment


def _needs_mini_imagenet(experiment: str) -> bool:
    return "miniimagenet" in experiment


def plan(
    suite: Suite,
    seeds: tuple[int, ...],
    out: Path,
    omniglot_dir: str | None,
    data_dir: str | None,
    extra: list[str],
    mini_imagenet_dir: str | None = None,
) -> tuple[list[tuple[str, int, list[str]]], list[str]]:
    """The jobs ``(experiment, seed, argv)`` and notes on what is skipped and why."""
    jobs, notes = [], []
    for exp in suite.experiments:
        args = [f"experiment={exp}", *suite.overrides, *suite.per_experiment.get(exp, ())]
        if _needs_mini_imagenet(exp):
            if not mini_imagenet_dir:
                notes.append(
                    f"skipped {exp}: needs the mini-ImageNet files; pass --mini-imagenet-dir DIR or set "
                    f"{MINI_IMAGENET_ENV}"
                )
                continue
            args.append(f"dataset.manual_dir={mini_imagenet_dir}")
            if data_dir:
                args.append(f"dataset.data_dir={data_dir}")
        if _needs_omniglot(exp):
            if not omniglot_dir:  # None or "" (an empty --manual-dir disables the env default)
                notes.append(
                    f"skipped {exp}: needs the Omniglot archives; pass --manual-dir DIR or set {OMNIGLOT_ENV}"
                )
                continue
            args.append(f"dataset.manual_dir={omniglot_dir}")
        if data_dir and _needs_omniglot(exp):
            args.append(f"dataset.data_dir={data_dir}")
        for seed in seeds:
            run_dir = out / "runs" / exp / f"seed{seed}"
            argv = [*args, f"seed={seed}", "trainer.progress=false", *extra, f"hydra.run.dir={run_dir}"]
            jobs.append((exp, seed, argv))
    return jobs, notes


def run_job(argv: list[str], log_path: Path) -> tuple[int, float]:
    """Run ``metalearn train <argv>``; stdout and stderr go to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "metalearn.cli", "train", *argv], stdout=log, stderr=subprocess.STDOUT
        )
    return proc.returncode, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(
        prog="metalearn reproduce",
        description="Run a suite of experiment presets (conf/experiment/) over seeds, then write "
        "results.md, results.csv and learning curves next to the papers' numbers.",
        epilog="suites: " + "; ".join(f"{n} ({', '.join(s.experiments)})" for n, s in SUITES.items()),
    )
    parser.add_argument("suite", choices=sorted(SUITES), help="which suite to run")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the suite's)")
    parser.add_argument(
        "--out", type=Path, default=None, help="report folder (default: outputs/reproduce/<suite>/<time>)"
    )
    parser.add_argument(
        "--manual-dir",
        default=os.environ.get(OMNIGLOT_ENV),
        help=f"folder with the Omniglot zip archives (default: ${OMNIGLOT_ENV}); "
        "Omniglot presets are skipped without it",
    )
    parser.add_argument(
        "--mini-imagenet-dir",
        default=os.environ.get(MINI_IMAGENET_ENV),
        help=f"folder with the mini-ImageNet files (default: ${MINI_IMAGENET_ENV}); "
        "mini-ImageNet presets are skipped without it",
    )
    parser.add_argument(
        "--data-dir", default=None, help="dataset cache (dataset.data_dir) for image datasets"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument(
        "overrides", nargs="*", help="extra overrides for every job, e.g. trainer.steps=1000 (they win)"
    )
    # Options may come before or after the overrides.
    args = parser.parse_intermixed_args(argv)

    suite = SUITES[args.suite]
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else suite.seeds
    out = args.out or Path("outputs/reproduce") / args.suite / time.strftime("%Y-%m-%d_%H-%M-%S")
    jobs, notes = plan(
        suite, seeds, out.resolve(), args.manual_dir, args.data_dir, args.overrides, args.mini_imagenet_dir
    )
    for note in notes:
        print(f"metalearn reproduce: {note}", flush=True)
    if args.dry_run:
        for _, _, job in jobs:
            print("metalearn train " + " ".join(job))
        return 0
    if not jobs:
        print("metalearn: error: nothing to run (every preset was skipped)", file=sys.stderr)
        return 2
    try:
        check_writable("--out", out)
    except ConfigError as err:
        print(f"metalearn: error: reproduce: {err}", file=sys.stderr)
        return 2

    print(f"metalearn reproduce {args.suite}: {len(jobs)} job(s); expected: {suite.expected}", flush=True)
    start = time.perf_counter()
    failures = 0
    for i, (exp, seed, job) in enumerate(jobs, 1):
        log_path = out / "logs" / f"{exp}_seed{seed}.log"
        code, seconds = run_job(job, log_path)
        run_dir = out / "runs" / exp / f"seed{seed}"
        if code != 0:
            failures += 1
            tail = (log_path.read_text().strip().splitlines() or ["?"])[-1]
            if run_dir.is_dir() and not (run_dir / "error.txt").exists():
                # So the report marks the run as failed even if train died before writing one.
                (run_dir / "error.txt").write_text(f"exit {code}: {tail}\n")
            print(
                f"[{i}/{len(jobs)}] {exp} seed {seed}: FAILED (exit {code}, {seconds:.0f} s): {tail}",
                flush=True,
            )
        else:
            print(f"[{i}/{len(jobs)}] {exp} seed {seed}: done in {seconds:.0f} s", flush=True)
    elapsed = time.perf_counter() - start
    write_report(out / "runs", out, title=f"metalearn reproduce {args.suite}")
    summary = f"{len(jobs)} job(s) in {elapsed:.0f} s, {failures} failed"
    with (out / "results.md").open("a") as f:
        f.write(f"\n{summary}.\n" + "".join(f"\n- {n}" for n in notes) + ("\n" if notes else ""))
    print((out / "results.md").read_text())
    print(f"metalearn reproduce: {summary}; report in {out}", flush=True)
    return 1 if failures else 0
