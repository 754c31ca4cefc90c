"""Where the jobs of a sweep run (metalearn/launchers.py): in parallel on one machine through
Hydra's joblib launcher (one job failing on purpose), and under submitit, where a job sent the
pre-emption signal mid-run checkpoints, requeues itself and ends with the results of an
uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import metric_records, run_cli

from metalearn.launchers import parallel_jobs

# serial: its slow checks time kills and signals; CI runs them in one process.
pytestmark = pytest.mark.serial

TINY = [
    "model.hidden=[8]",
    "trainer.meta_batch_size=2",
    "trainer.log_every=10",
    "trainer.val_every=0",
    "eval.n_tasks=4",
    "trainer.progress=false",
]
TIMING = ("train_time_s", "compile_time_s", "eval_time_s", "time_s")


def test_parallel_jobs_default(monkeypatch):
    monkeypatch.delenv("METALEARN_JOBS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("METALEARN_JOBS_PER_DEVICE", "3")
    assert parallel_jobs() == 6  # per GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert parallel_jobs() == 4  # one per 4 cores without GPUs
    monkeypatch.setenv("METALEARN_JOBS", "5")
    assert parallel_jobs() == 5


@pytest.mark.slow
def test_a_joblib_sweep_of_four_jobs_with_one_failing(tmp_path, monkeypatch):
    pytest.importorskip(
        "hydra_plugins.hydra_joblib_launcher", reason='needs the joblib extra: "metalearn[joblib]"'
    )
    mlflow = pytest.importorskip("mlflow", reason='needs the mlflow extra: "metalearn[mlflow]"')
    monkeypatch.setenv("METALEARN_JOBS", "2")
    sweep = tmp_path / "sweep"
    # algo.inner_lr=1e30 passes the config checks and diverges at its first logged step.
    proc = run_cli(
        "train", "-m", "hydra/launcher=joblib", "logger=mlflow", "algo.inner_lr=0.01,0.02,0.03,1e30",
        "trainer.steps=20", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False,
    )  # fmt: skip
    assert "n_jobs=2" in proc.stdout + proc.stderr  # the launcher ran them two at a time
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("metalearn: error: 1 of 4 sweep jobs failed")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 4
    for job in jobs[:3]:  # complete: its own results and metrics
        assert json.loads((job / "results.json").read_text())["steps"] == 20, job
        assert metric_records(job)[-1]["step"] == 20
    assert "non-finite values" in (jobs[3] / "error.txt").read_text()
    assert not (jobs[3] / "results.json").exists()
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(str(sweep))  # the sweep is one experiment
    runs = client.search_runs([experiment.experiment_id])
    by_dir = {r.data.tags["metalearn.run_dir"]: r.info.status for r in runs}
    assert by_dir == {str(j): "FINISHED" for j in jobs[:3]} | {str(jobs[3]): "FAILED"}


def _job_processes(folder: Path) -> list[int]:
    """Pids of the submitit job processes (``python -m submitit.core._submit <folder>``) that
    run the jobs of ``folder`` (found in /proc: the jobs are grandchildren of the test)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if "submitit.core._submit" in words and any(w.startswith(str(folder)) for w in words):
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_a_preempted_submitit_job_requeues_and_ends_as_an_uninterrupted_run(tmp_path):
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher", reason='needs the slurm extra: "metalearn[slurm]"'
    )
    # No list values: Hydra names a sweep's job dirs after the overrides, and orbax cannot
    # restore a checkpoint whose path holds glob brackets (model.hidden=[8]).
    args = [
        "trainer.steps=20000", "trainer.log_every=500", "trainer.val_every=0", "trainer.checkpoint_every=0",
        "trainer.meta_batch_size=2", "eval.n_tasks=8", "trainer.progress=false", "seed=3", "logger=mlflow",
    ]  # fmt: skip
    pytest.importorskip("mlflow", reason='needs the mlflow extra: "metalearn[mlflow]"')
    sweep = tmp_path / "sweep"
    launcher = [sys.executable, "-m", "metalearn.cli", "train", "-m", "hydra/launcher=submitit_local"]
    proc = subprocess.Popen(
        [*launcher, "hydra.launcher.timeout_min=20", *args, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:  # mid-run: a few records logged, far from the end
            metrics = list(sweep.glob("0_*/metrics.jsonl"))
            if metrics and len(metrics[0].read_text().splitlines()) >= 4:
                break
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        pids = _job_processes(sweep / ".submitit")
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGUSR2)  # submitit's pre-emption / time-limit signal
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    [job] = [p for p in sweep.iterdir() if p.name.startswith("0_")]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*.out"))
    assert "Requeued job" in logs and "resuming" in logs
    assert not (job / ".requeued").exists()

    straight = tmp_path / "straight"
    run_cli("train", *args, f"hydra.run.dir={straight}", cwd=tmp_path)

    def results(run_dir: Path) -> dict:
        return {
            k: v for k, v in json.loads((run_dir / "results.json").read_text()).items() if k not in TIMING
        }

    assert results(job) == results(straight)
    assert metric_records(job) == metric_records(straight)
    # The resumed job continued its tracker run.
    state = json.loads((job / "trackers.json").read_text())["mlflow"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(state["tracking_uri"])
    run = client.get_run(state["run_id"])
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [
        r["step"] for r in metric_records(job) if r["split"] == "train"
    ]
