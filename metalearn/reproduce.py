"""`metalearn reproduce <suite>`: run a suite of experiment presets over seeds and report.

A thin driver around ``metalearn train``: every (preset, seed) job is one
``metalearn train experiment=<preset> seed=<seed> ...`` subprocess, run one after another
with its run dir under the report folder (``<out>/runs/<preset>/seed<seed>``), so each run
is an ordinary run dir (``metalearn eval run_dir=...`` works on it). A job that fails is
recorded (``error.txt``) and the suite goes on. At the end the runs are aggregated with
:mod:`metalearn.report` into ``results.md``, ``results.csv`` and ``curves/*.png``, next to
the numbers the presets record from the papers.

A suite may chain its runs: an override whose value holds ``${stage:NAME}`` gets the run dir
of the suite's earlier experiment NAME for the same seed (:func:`stage_dirs`), e.g.
``model.init_from=${stage:pretrain_miniimagenet_feat_resnet12}`` meta-trains from that
pre-training. Jobs run in the suite's order, so the stage is done (or failed) by then. The
same command again with the same ``--out`` continues the suite: a job whose run dir holds
results.json (and no error.txt) is skipped, one with a started run dir is resumed
(``trainer.resume=true``, bit for bit), so a suite killed anywhere, even with SIGKILL,
finishes as if never interrupted.

The suites are config, not code: ``conf/suite/<name>.yaml`` of the packaged config directory
(:func:`suite_dir`), each with its presets, seeds, overrides for every job and per preset, and
expected wall time (:func:`load_suite`).

Subprocesses rather than in-process calls: each job starts with a fresh JAX/XLA state and
its own Hydra run dir, exactly as a user's command would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from metalearn.cli import config_dir
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
    # Expected wall time, printed when the suite starts; measured where stated.
    expected: str = ""
    # Place in the listing of ``metalearn reproduce --help``.
    order: int = 0
    # The preset an experiment entry runs when its name is not one: null runs no preset (the
    # overrides say everything; a small CPU stage, say). Default: the entry's own name.
    presets: dict[str, str | None] = field(default_factory=dict)


class SuiteError(ValueError):
    """A suite file that does not parse into a :class:`Suite` (the message names file and key)."""


def suite_dir() -> Path:
    """conf/suite/ of the packaged config directory: one ``<name>.yaml`` per suite."""
    return Path(config_dir()) / "suite"


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SuiteError(f"{where}: must be a list of strings")
    return tuple(value)


def load_suite(path: Path) -> Suite:
    """The :class:`Suite` of one YAML file (keys: experiments, seeds, overrides,
    per_experiment, expected, order; experiments required)."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise SuiteError(f"{path}: must be a mapping of suite keys")
    unknown = sorted(set(data) - {f.name for f in fields(Suite)})
    if unknown:
        raise SuiteError(f"{path}: unknown key {unknown[0]!r}")
    if "experiments" not in data:
        raise SuiteError(f"{path}: experiments: missing")
    seeds = data.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not all(type(s) is int for s in seeds):
        raise SuiteError(f"{path}: seeds: must be a list of integers")
    per_experiment = data.get("per_experiment") or {}
    if not isinstance(per_experiment, dict):
        raise SuiteError(f"{path}: per_experiment: must map preset names to lists of overrides")
    experiments = _strings(data["experiments"], f"{path}: experiments")
    stray = sorted(set(per_experiment) - set(experiments))
    if stray:
        raise SuiteError(f"{path}: per_experiment.{stray[0]}: not among the suite's experiments")
    presets = data.get("presets") or {}
    if not isinstance(presets, dict) or not all(v is None or isinstance(v, str) for v in presets.values()):
        raise SuiteError(f"{path}: presets: must map entries to a preset name or null")
    stray = sorted(set(presets) - set(experiments))
    if stray:
        raise SuiteError(f"{path}: presets.{stray[0]}: not among the suite's experiments")
    suite_overrides = _strings(data.get("overrides") or [], f"{path}: overrides")
    per = {k: _strings(v, f"{path}: per_experiment.{k}") for k, v in per_experiment.items()}
    for i, exp in enumerate(experiments):
        for override in (*suite_overrides, *per.get(exp, ())):
            for stage in STAGE_REF.findall(override):
                if stage not in experiments[:i]:
                    raise SuiteError(
                        f"{path}: {override!r} (for {exp}): ${{stage:{stage}}} must name an earlier "
                        "experiment of the suite"
                    )
    return Suite(
        experiments=experiments,
        seeds=tuple(seeds),
        overrides=suite_overrides,
        per_experiment=per,
        presets=dict(presets),
        expected=str(data.get("expected", "")),
        order=_order(data.get("order", 0), path),
    )


# ``${stage:NAME}`` in a suite's override: the run dir of its experiment NAME, same seed.
STAGE_REF = re.compile(r"\$\{stage:([^}]+)\}")


def run_dir_of(out: Path, experiment: str, seed: int) -> Path:
    """Where :func:`plan` puts the run of ``experiment`` and ``seed`` under the report folder."""
    return out / "runs" / experiment / f"seed{seed}"


def stage_dirs(override: str, out: Path, seed: int) -> str:
    """``override`` with every ``${stage:NAME}`` replaced by NAME's run dir for ``seed``."""
    return STAGE_REF.sub(lambda m: str(run_dir_of(out, m.group(1), seed)), override)


def _order(value: Any, path: Path) -> int:
    if type(value) is not int:
        raise SuiteError(f"{path}: order: must be an integer")
    return value


def load_suites(folder: Path | None = None) -> dict[str, Suite]:
    """Every suite of ``folder`` (default :func:`suite_dir`), by name (the file's stem), in
    the order of their ``order`` key, then name."""
    suites = {p.stem: load_suite(p) for p in sorted((folder or suite_dir()).glob("*.yaml"))}
    return dict(sorted(suites.items(), key=lambda item: (item[1].order, item[0])))


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
        preset = suite.presets.get(exp, exp)
        args = [
            *([f"experiment={preset}"] if preset else []),
            *suite.overrides,
            *suite.per_experiment.get(exp, ()),
        ]
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
            run_dir = run_dir_of(out, exp, seed)
            chained = [stage_dirs(a, out, seed) for a in args]
            argv = [*chained, f"seed={seed}", "trainer.progress=false", *extra, f"hydra.run.dir={run_dir}"]
            jobs.append((exp, seed, argv))
    return jobs, notes


def run_job(argv: list[str], log_path: Path, append: bool = False) -> tuple[int, float, float]:
    """Run ``metalearn train <argv>``: see :func:`run_measured`."""
    return run_measured([sys.executable, "-m", "metalearn.cli", "train", *argv], log_path, append)


def _high_water_mib(pid: int) -> float | None:
    """VmHWM of a running process in MiB (Linux), None where /proc does not say."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def run_measured(command: list[str], log_path: Path, append: bool = False) -> tuple[int, float, float]:
    """Run ``command``; stdout and stderr go to ``log_path`` (after what it holds with
    ``append``). Returns (exit code, wall seconds, the command's peak resident memory in MiB).

    The peak is the child's own high-water mark (VmHWM in /proc/<pid>/status, read every
    0.1 s until it exits): ``getrusage``'s ru_maxrss of a child also counts the parent's
    pages at the fork. Where /proc is absent (macOS) ru_maxrss is used."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    peak = None
    with log_path.open("a" if append else "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                seen = _high_water_mib(proc.pid)
                peak = seen if peak is None or (seen is not None and seen > peak) else peak
                time.sleep(0.1)
        except BaseException:  # e.g. Ctrl-C: stop the job too rather than leave it running
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    if peak is None:  # ru_maxrss: KiB on Linux, bytes on macOS
        peak = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return proc.returncode, time.perf_counter() - start, peak


def _rerun_state(run_dir: Path) -> str:
    """ "done" (results.json and no error.txt: skipped on a rerun), "started" (anything else
    there: resumed) or "new" (no run dir yet)."""
    if (run_dir / "results.json").is_file() and not (run_dir / "error.txt").exists():
        return "done"
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return "started"
    return "new"


def main(argv: list[str] | None = None) -> int:
    try:
        suites = load_suites()
    except (OSError, yaml.YAMLError, SuiteError) as err:
        print(f"metalearn: error: suite config: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    parser = OneLineArgumentParser(
        prog="metalearn reproduce",
        description="Run a suite of experiment presets (conf/experiment/) over seeds, then write "
        "results.md, results.csv and learning curves next to the papers' numbers.",
        epilog="suites: " + "; ".join(f"{n} ({', '.join(s.experiments)})" for n, s in suites.items()),
    )
    # Checked below rather than by argparse's choices, so that an unknown name is one line.
    parser.add_argument("suite", metavar="{" + ",".join(sorted(suites)) + "}", help="which suite to run")
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

    if args.suite not in suites:
        print(
            f"metalearn: error: unknown suite {args.suite!r} (one of: {', '.join(sorted(suites))}; "
            f"conf/suite/<name>.yaml)",
            file=sys.stderr,
        )
        return 2
    suite = suites[args.suite]
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else suite.seeds
    out = args.out or Path("outputs/reproduce") / args.suite / time.strftime("%Y-%m-%d_%H-%M-%S")
    # One tracker group (MLflow experiment, W&B group) for the suite's runs, if a logger is chosen.
    extra = [f"logger.group=reproduce/{args.suite}/{out.name}", *args.overrides]
    jobs, notes = plan(
        suite, seeds, out.resolve(), args.manual_dir, args.data_dir, extra, args.mini_imagenet_dir
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
        run_dir = run_dir_of(out, exp, seed)
        state = _rerun_state(run_dir)
        if state == "done":
            print(f"[{i}/{len(jobs)}] {exp} seed {seed}: done already ({run_dir})", flush=True)
            continue
        if state == "started":  # an interrupted earlier invocation: continue that run (and its log)
            job = [*job[:-1], "trainer.resume=true", job[-1]]
        code, seconds, peak_mib = run_job(job, log_path, append=state == "started")
        record = {"experiment": exp, "seed": seed, "exit": code, "seconds": seconds, "peak_rss_mib": peak_mib}
        with (out / "jobs.jsonl").open("a") as f:  # one line per job run (a resumed job adds one)
            f.write(json.dumps({**record, "resumed": state == "started"}) + "\n")
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
            print(
                f"[{i}/{len(jobs)}] {exp} seed {seed}: done in {seconds:.0f} s, "
                f"peak memory {peak_mib:.0f} MiB",
                flush=True,
            )
    elapsed = time.perf_counter() - start
    write_report(out / "runs", out, title=f"metalearn reproduce {args.suite}")
    summary = f"{len(jobs)} job(s) in {elapsed:.0f} s, {failures} failed"
    with (out / "results.md").open("a") as f:
        f.write(f"\n{summary}.\n" + "".join(f"\n- {n}" for n in notes) + ("\n" if notes else ""))
    print((out / "results.md").read_text())
    print(f"metalearn reproduce: {summary}; report in {out}", flush=True)
    return 1 if failures else 0
