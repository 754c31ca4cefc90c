"""Pre-emption and failure paths: SIGINT (exit 130), a second signal while the stop's
checkpoint is being written, an exception inside the host prefetcher's thread, and an
unexpected exception in one job of a sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import make_cfg, run_cli

from metalearn.checkpoint import checkpoint_steps

TINY_TRAINER = {
    "meta_batch_size": 2,
    "log_every": 10,
    "checkpoint_every": 0,
    "val_every": 0,
    "progress": False,
}


def _last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, ValueError):
        return 0


class _NotHandled(Exception):
    pass


def test_sigint_checkpoints_the_current_step_and_exits_130(tmp_path):
    """In this process: SIGINT once the run has logged step 20; train() must finish the step,
    checkpoint it and raise Preempted with exit code 130 (the CLI's exit status)."""
    from metalearn.loop_control import Preempted
    from metalearn.train import train

    cfg = make_cfg(model={"hidden": [8]}, trainer={**TINY_TRAINER, "steps": 10**7}, eval={"n_tasks": 2})
    run_dir = tmp_path / "run"

    def unhandled(signum, frame):  # train() did not take over SIGINT: fail, don't hang
        raise _NotHandled("SIGINT reached the previous handler")

    def send_when_running():
        deadline = time.monotonic() + 300
        while _last_step(run_dir) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, unhandled)
    try:
        threading.Thread(target=send_when_running, daemon=True).start()
        with pytest.raises(Preempted) as caught:
            train(cfg, run_dir, "RESUME-COMMAND")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert signal.getsignal(signal.SIGINT) is previous
    err = caught.value
    assert err.exit_code == 130
    message = str(err)
    assert message.startswith("SIGINT at step ") and message.endswith("resume with: RESUME-COMMAND")
    stopped = int(message.split()[3].rstrip(":"))
    assert stopped >= 20 and checkpoint_steps(run_dir) == [stopped]  # that step, checkpointed
    assert not (run_dir / "results.json").exists()


_SLOW_SAVE = """
import pathlib, time
import metalearn.train as t
_save = t.CheckpointWriter.save
def save(self, state):
    pathlib.Path({marker!r}).write_text(str(int(state.step)))
    time.sleep(30)
    print("save finished", flush=True)
    return _save(self, state)
t.CheckpointWriter.save = save
"""


def test_second_signal_during_the_checkpoint_exits_at_once(tmp_path):
    """The stop's checkpoint save is slowed (and marks its start); a second SIGINT sent then
    must end the process at once with 130, without finishing the save."""
    run_dir, marker = tmp_path / "run", tmp_path / "saving"
    args = [
        "train", "model.hidden=[8]", "trainer.steps=10000000", "trainer.meta_batch_size=2",
        "trainer.log_every=10", "trainer.checkpoint_every=0", "trainer.val_every=0",
        "trainer.progress=false", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    prelude = _SLOW_SAVE.format(marker=str(marker))
    main = f"import sys\nfrom metalearn.cli import main\nsys.argv = ['metalearn', *{args!r}]\nmain()"
    proc = subprocess.Popen(
        [sys.executable, "-c", f"{prelude}\n{main}"],
        cwd=tmp_path,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while _last_step(run_dir) < 10:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "second SIGINT: exiting now" in err
    assert "save finished" not in out  # it did not wait for the checkpoint
    assert not (run_dir / "results.json").exists()


def test_an_exception_in_the_prefetch_thread_surfaces_in_the_training_loop():
    from metalearn.prefetch import HostPrefetcher
    from metalearn.step import task_mesh

    def broken_indices(split, keys):
        raise RuntimeError("gather failed on the host")

    source = SimpleNamespace(host=SimpleNamespace(indices=broken_indices))
    import jax

    prefetcher = HostPrefetcher(source, jax.random.PRNGKey(0), 2, task_mesh(), start=0, stop=5)
    outcome = {}

    def consume():
        try:
            next(prefetcher)
            outcome["value"] = "a batch"
        except BaseException as err:  # noqa: BLE001 - recorded for the assertion
            outcome["value"] = err

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    reader.join(timeout=60)
    prefetcher.close()
    assert not reader.is_alive(), "the error was swallowed: the loop would wait forever"
    assert isinstance(outcome["value"], RuntimeError) and "gather failed" in str(outcome["value"])


_CRASH_SEED_0 = """
import metalearn.train as t
_train = t.train
def train(cfg, *args, **kwargs):
    if cfg.seed == 0:
        raise RuntimeError("unexpected failure in this job")
    return _train(cfg, *args, **kwargs)
t.train = train
"""


def test_sweep_keeps_other_jobs_and_records_an_unexpected_exception(tmp_path):
    """Not a MetalearnError but any exception: the job's error.txt names it, the later job
    still runs and writes its results, and the sweep exits 2 counting the failure. (A
    subprocess: an exception escaping Hydra in this process would break pytest's output.)"""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "train", "-m", "seed=0,1", "model.hidden=[8]", "trainer.steps=3", "trainer.log_every=3",
        "trainer.val_every=0", "trainer.checkpoint_every=0", "trainer.progress=false",
        "eval.n_tasks=4", f"hydra.sweep.dir={sweep}",
        cwd=tmp_path, check=False, prelude=_CRASH_SEED_0,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "1 of 2 sweep jobs failed" in proc.stderr.strip().splitlines()[-1]
    (bad,) = sweep.glob("0_*")
    (good,) = sweep.glob("1_*")
    assert json.loads((good / "results.json").read_text())["seed"] == 1
    error = (bad / "error.txt").read_text()
    assert error.splitlines()[0] == "RuntimeError: unexpected failure in this job"
    assert "Traceback" in error  # the traceback, for a bug report
    assert not (bad / "results.json").exists()
