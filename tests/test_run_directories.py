"""A run directory is never damaged (issue 23; docs/reliability.md, "Run directories"): locked while in
use, checked before anything is written, unique output folders, damaged files named in one line.

Runs are tiny sinusoid trainings (``conftest.SWEEP_TINY`` with an 8x8 MLP); refusals that happen
before Hydra starts run in-process (``run_cli_in_process``), the rest in subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SWEEP_TINY, run_cli, run_cli_in_process

# serial: its slow checks time kills and signals; CI runs them in one process.
pytestmark = pytest.mark.serial

TINY = (*SWEEP_TINY, "model.hidden=[8,8]")


def _train(run_dir: Path, *extra: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_cli("train", *TINY, *extra, f"hydra.run.dir={run_dir}", cwd=cwd)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One finished tiny sinusoid run (copy it before changing it)."""
    root = tmp_path_factory.mktemp("rundir")
    _train(root / "run", cwd=root)
    return root / "run"


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def _hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metalearn"), err
    return lines[0]


def _popen(*args: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, "-m", "metalearn.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _sinusoid_csvs(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    support, query = folder / "support.csv", folder / "query.csv"
    support.write_text("".join(f"{x:.2f},{2 * x:.2f}\n" for x in (-2.0, -1.0, 0.5, 1.5, 3.0)))
    query.write_text("0.25\n1.75\n")
    return support, query


# 1. A run dir is locked: a second trainer is refused, one line naming the first, exit 2.


def test_second_trainer_on_a_running_dir_is_refused_and_the_first_run_is_intact(tmp_path):
    run = tmp_path / "run"
    first = _popen("train", *TINY, "trainer.steps=90", "seed=1", f"hydra.run.dir={run}", cwd=tmp_path)
    try:
        # The first holds the lock once it prints its start line (taken before Hydra starts).
        line = first.stdout.readline()
        while line and "run dir" not in line:
            line = first.stdout.readline()
        assert line, first.stderr.read()
        second = run_cli("train", *TINY, "seed=2", f"hydra.run.dir={run}", cwd=tmp_path, check=False)
        message = _one_line_error(second.returncode, second.stderr)
        assert f"is in use by process {first.pid}" in message and "hydra.run.dir" in message
    finally:
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    _assert_one_consistent_run(run, seed=1, steps=90)


def _assert_one_consistent_run(run: Path, seed: int, steps: int) -> None:
    """config, metrics, checkpoint and results of the same job (one seed, one pass of steps)."""
    import yaml

    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert config["seed"] == seed and f"seed={seed}" in overrides
    assert config["trainer"]["steps"] == steps
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(row["step"], row["split"]) for row in rows]
    assert keys == sorted(set(keys)), "metrics.jsonl holds two runs"
    logged = [step for step, _ in keys]
    assert max(logged) == steps
    assert int(max(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit())) == steps
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == steps and results["seed"] == seed


@pytest.mark.slow
def test_two_trainings_started_together_one_refused_other_consistent(tmp_path):
    run = tmp_path / "run"
    jobs = {
        seed: _popen("train", *TINY, f"seed={seed}", f"hydra.run.dir={run}", cwd=tmp_path) for seed in (1, 2)
    }
    done = {seed: (*job.communicate(timeout=600), job.returncode) for seed, job in jobs.items()}
    winners = [seed for seed, (_, _, code) in done.items() if code == 0]
    assert len(winners) == 1, done
    (loser,) = set(done) - set(winners)
    message = _one_line_error(done[loser][2], done[loser][1])
    assert "is in use by process" in message or "already holds a run" in message
    _assert_one_consistent_run(run, seed=winners[0], steps=30)


# 2. A refused command writes nothing: every file of the run byte-identical.


@pytest.mark.parametrize(
    "change",
    [
        ("model.hidden=[16,16]",),  # the checkpoint does not fit: found after the data is built
        ("dataset=omniglot", "dataset.manual_dir={empty}"),  # the issue's case: another dataset
        pytest.param(("algo.inner_lr=-1",), marks=pytest.mark.slow),  # refused before Hydra starts
    ],
    ids=["model", "dataset", "bad-value"],
)
def test_refused_resume_leaves_every_file_byte_identical(tiny_run, tmp_path, change):
    run = _copy(tiny_run, tmp_path / "run")
    (tmp_path / "empty").mkdir()
    change = [c.format(empty=tmp_path / "empty") for c in change]
    before = _hashes(run)
    proc = run_cli("train", "trainer.resume=true", f"hydra.run.dir={run}", *change, cwd=tmp_path, check=False)
    _one_line_error(proc.returncode, proc.stderr)
    assert _hashes(run) == before


def test_record_is_written_by_rename_and_matches_hydras_layout(tiny_run):
    """.hydra/ holds what Hydra writes (config, hydra, overrides), no temporary files."""
    names = sorted(p.name for p in (tiny_run / ".hydra").iterdir())
    assert names == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert "output_subdir: .hydra" in (tiny_run / ".hydra" / "hydra.yaml").read_text()
    assert not list(tiny_run.rglob("*.tmp"))


# 3. Output folders are unique whatever the timing.


@pytest.mark.parametrize("command", ["eval", pytest.param("predict", marks=pytest.mark.slow)])
def test_two_evals_or_predicts_started_together_write_two_folders(tiny_run, tmp_path, command):
    run = _copy(tiny_run, tmp_path / "run")
    support, query = _sinusoid_csvs(tmp_path / "csv")
    args = [f"run_dir={run}"] + ([f"support={support}", f"query={query}"] if command == "predict" else [])
    jobs = [_popen(command, *args, cwd=tmp_path) for _ in range(2)]
    outs = [job.communicate(timeout=600) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outs
    folders = sorted((run / command).iterdir())
    assert len(folders) == 2
    product = "results.json" if command == "eval" else "predictions.csv"
    assert all((folder / product).is_file() for folder in folders)
    if command == "eval":  # the path printed is the path written
        printed = sorted(out.strip().splitlines()[-1].rsplit(" ", 1)[-1] for out, _ in outs)
        assert printed == sorted(str(folder / product) for folder in folders)


@pytest.mark.slow
def test_two_trainings_without_a_run_dir_started_together_get_two_dirs(tmp_path):
    jobs = [_popen("train", *TINY, cwd=tmp_path) for _ in range(2)]
    outs = [job.communicate(timeout=600) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outs
    results = sorted(tmp_path.glob("outputs/*/*/results.json"))
    assert len(results) == 2
    printed = sorted(out.strip().splitlines()[-1].rsplit(" ", 1)[-1] for out, _ in outs)
    assert printed == sorted(str(p) for p in results)


def test_unique_dir_adds_a_suffix_on_collision(tmp_path):
    from metalearn.rundir import unique_dir

    made = [unique_dir(tmp_path / "eval" / "2026-01-01_00-00-00") for _ in range(3)]
    assert [p.name for p in made] == ["2026-01-01_00-00-00", "2026-01-01_00-00-00-2", "2026-01-01_00-00-00-3"]


# 4. A dir holding any earlier run's files is refused for a new training; empty run dir.


def test_dir_with_results_but_no_checkpoints_is_refused(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints")
    before = _hashes(run)
    code, _, err = run_cli_in_process("train", *TINY, f"hydra.run.dir={run}")
    message = _one_line_error(code, err)
    assert "already holds a run" in message and "results.json" in message and "trainer.resume=true" in message
    assert _hashes(run) == before


@pytest.mark.parametrize("value", ["", "''"])
def test_empty_run_dir_is_an_error(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli_in_process("train", *TINY, f"hydra.run.dir={value}")
    assert "hydra.run.dir" in _one_line_error(code, err)
    assert list(tmp_path.iterdir()) == []


# 5. Damaged or missing run files: one line, exit 2, the file and what to do.


@pytest.mark.parametrize(
    ("content", "says"), [("{{ not: yaml: [", "is not a valid config"), ("", "is empty")]
)
@pytest.mark.parametrize("command", ["eval", "predict"])
def test_damaged_or_empty_run_config_is_one_line(tiny_run, tmp_path, command, content, says):
    run = _copy(tiny_run, tmp_path / "run")
    (run / ".hydra" / "config.yaml").write_text(content)
    support, query = _sinusoid_csvs(tmp_path / "csv")
    extra = [f"support={support}", f"query={query}"] if command == "predict" else []
    code, _, err = run_cli_in_process(command, f"run_dir={run}", *extra)
    message = _one_line_error(code, err)
    assert str(run / ".hydra" / "config.yaml") in message and says in message
    assert not (run / command).exists()


def test_predict_on_a_run_without_checkpoint_is_one_line_without_a_record_note(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints")
    (run / "preprocessing.json").unlink()
    support, query = _sinusoid_csvs(tmp_path / "csv")
    code, out, err = run_cli_in_process("predict", f"run_dir={run}", f"support={support}", f"query={query}")
    assert "no checkpoint" in _one_line_error(code, err)
    assert "recorded" not in out


@pytest.mark.parametrize("target", ["/proc/metalearn-x", "/sys/metalearn-x"])
def test_kernel_filesystems_are_refused_as_run_dirs(target):
    code, _, err = run_cli_in_process("train", *TINY, f"hydra.run.dir={target}")
    assert "kernel filesystem" in _one_line_error(code, err)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder that cannot be written: a read-only tmpfs as root (os.access says yes to
    root everywhere, so chmod would not do), else chmod 555."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(folder)], capture_output=True
        )
        if mounted.returncode != 0:
            pytest.skip("root without permission to mount a read-only tmpfs")
        yield folder
        subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_read_only_run_dir_is_refused(read_only_dir):
    code, _, err = run_cli_in_process("train", *TINY, f"hydra.run.dir={read_only_dir / 'run'}")
    assert "is not writable" in _one_line_error(code, err)


def test_report_errors_are_one_line(tiny_run, tmp_path, read_only_dir):
    for args, says in (
        ([str(tmp_path / "missing")], "no such directory"),
        ([str(tiny_run.parent), "--out", str(read_only_dir / "report")], "is not writable"),
        ([str(tiny_run.parent), "--out", "/proc/metalearn-report"], "kernel filesystem"),
        ([str(tiny_run.parent), "--sort", "nonsense"], "invalid choice"),
    ):
        code, _, err = run_cli_in_process("report", *args)
        assert says in _one_line_error(code, err), args


def test_reproduce_unknown_suite_is_one_line():
    code, _, err = run_cli_in_process("reproduce", "no_such_suite")
    assert "unknown suite 'no_such_suite'" in _one_line_error(code, err)


# 6. Sweeps: every job checked before the first starts, whatever the order.


@pytest.mark.parametrize("values", ["-1,0.1", "0.1,-1"])
def test_sweep_refuses_a_bad_job_in_any_position_before_starting(tmp_path, values):
    sweep = tmp_path / "sweep"
    code, _, err = run_cli_in_process(
        "train", "-m", f"algo.inner_lr={values}", "algo=maml,fomaml", *TINY, f"hydra.sweep.dir={sweep}"
    )
    message = _one_line_error(code, err)
    assert "2 of 4 sweep jobs refused" in message
    assert "[algo.inner_lr=-1,algo=maml]" in message and "[algo.inner_lr=-1,algo=fomaml]" in message
    assert not sweep.exists()


# Smaller: the non-finite-loss error starts a line of its own, not the progress bar's.


@pytest.mark.slow
def test_training_error_is_not_printed_on_the_progress_bar_line(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "trainer.progress=true", "algo.inner_lr=1e30", f"hydra.run.dir={run}"]
    proc = run_cli("train", *args, cwd=tmp_path, check=False)
    last = proc.stderr.rstrip("\n").split("\n")[-1]
    assert proc.returncode == 2 and last.startswith("metalearn: error: non-finite values"), proc.stderr


# Timing: the lock is released by the kernel when its holder dies.


def test_lock_of_a_killed_trainer_is_released(tmp_path):
    from metalearn.rundir import lock_run_dir, release_locks

    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from metalearn.rundir import lock_run_dir; "
            f"lock_run_dir({str(run)!r}, True, 'hydra.run.dir'); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(Exception, match=f"in use by process {holder.pid}"):
            lock_run_dir(run, True, "hydra.run.dir")
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 10
    assert lock_run_dir(run, True, "hydra.run.dir") and time.time() < deadline
    release_locks()


def test_only_process_zero_of_a_multi_process_job_takes_the_run_dir():
    """Every process of a multi-process job runs `metalearn train` on the same dir: process 0
    checks and locks it, the others must not be refused by its lock."""
    from metalearn.distributed import secondary_process

    job = {"JAX_COORDINATOR_ADDRESS": "host:1234", "JAX_NUM_PROCESSES": "2"}
    assert secondary_process("auto", {**job, "JAX_PROCESS_ID": "1"})
    assert not secondary_process("auto", {**job, "JAX_PROCESS_ID": "0"})
    assert not secondary_process("auto", {}) and not secondary_process("off", {**job, "JAX_PROCESS_ID": "1"})
    assert secondary_process("on", {"OMPI_COMM_WORLD_RANK": "3"})
