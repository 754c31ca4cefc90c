"""Reliability of training runs: kill and resume, pre-emption, non-finite values, damaged
checkpoints. Subprocesses with a tiny sinusoid model."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import metric_records

from metalearn.checkpoint import CHECKPOINT_DIR, checkpoint_steps

# serial: its slow checks time kills and signals; CI runs them in one process.
pytestmark = pytest.mark.serial

BASE = [
    "train",
    "dataset=sinusoid",
    "model.hidden=[8]",
    "trainer.meta_batch_size=4",
    "trainer.log_every=10",
    "trainer.checkpoint_every=10",
    "trainer.val_every=100",
    "trainer.val_tasks=5",
    "trainer.progress=false",
    "eval.n_tasks=5",
    "seed=3",
]
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "metalearn.cli", *args]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, ValueError):
        return 0


def final_params(run_dir: Path) -> list[np.ndarray]:
    import orbax.checkpoint as ocp

    step = checkpoint_steps(run_dir)[0]
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore((run_dir / CHECKPOINT_DIR / str(step) / "default").resolve())
    return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


@pytest.mark.slow
def test_sigkill_three_times_then_resume_matches_uninterrupted(tmp_path):
    """Also: blocks of several meta-steps per call (trainer.steps_per_call=0, automatic)
    against one step per call, with on_nan=skip. Checkpoints every 30 steps and logs every
    10, so a kill usually lands in a block after the last checkpoint, and a resumed run
    cuts its blocks differently (its first block is one step)."""
    args = [*(a for a in BASE if "checkpoint_every" not in a), "trainer.checkpoint_every=30"]
    args += ["trainer.steps=300", "trainer.on_nan=skip"]
    ref = tmp_path / "ref"
    proc = run(*args, "trainer.steps_per_call=1", f"hydra.run.dir={ref}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    killed = tmp_path / "killed"
    rng = random.Random(0)
    resume = []
    for target in sorted(rng.sample(range(20, 130, 10), 3)):  # >= 20 steps left after each
        p = subprocess.Popen(
            cli(*args, *resume, f"hydra.run.dir={killed}"),
            cwd=tmp_path,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while last_step(killed) < target and p.poll() is None:
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL, "the run ended before it could be killed"
        resume = ["trainer.resume=true"]
    proc = run(*args, *resume, f"hydra.run.dir={killed}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    assert metric_records(killed) == metric_records(ref)
    for a, b in zip(final_params(killed), final_params(ref), strict=True):
        assert np.array_equal(a, b)
    test = lambda d: json.loads((d / "results.json").read_text())["test"]
    assert test(killed) == test(ref)
    assert len(checkpoint_steps(killed)) == 3  # trainer.keep_checkpoints


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    p = subprocess.Popen(
        cli(*BASE, "trainer.steps=1000000", f"hydra.run.dir={run_dir}"),
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while last_step(run_dir) < 20:
        assert p.poll() is None, p.communicate()
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)  # of 1000000 steps: it stopped, it did not finish
    assert p.returncode == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "SIGTERM" in lines[0], err
    assert f"trainer.resume=true hydra.run.dir={run_dir}" in lines[0]
    # It stopped at the step the message names, and checkpointed exactly that step (the
    # step it was in when signalled; the wall-clock time to get there depends on the load).
    stopped_at = int(lines[0].split("SIGTERM at step ")[1].split(":")[0])
    assert checkpoint_steps(run_dir)[0] == stopped_at >= 20
    assert max(r["step"] for r in metric_records(run_dir)) <= stopped_at
    # The signal's checkpoint is complete: a short resume continues from it.
    proc = run(
        "train",
        "trainer.resume=true",
        f"trainer.steps={stopped_at + 5}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"resuming {run_dir} from step {stopped_at}" in proc.stdout


# Slow tier (two CLI training processes, run in CI); on_nan=skip inside blocks of steps is
# also checked in-process in the default run (test_blocks).
@pytest.mark.slow
def test_nan_stops_with_last_good_checkpoint_intact_and_skip_finishes(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(*BASE, "trainer.steps=20", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    good = run_dir / CHECKPOINT_DIR / "20"
    before = {p: p.read_bytes() for p in good.rglob("*") if p.is_file()}

    # Resume with an inner learning rate that overflows at once: the step-30 check stops.
    proc = run(
        "train",
        "trainer.resume=true",
        "trainer.steps=40",
        "algo.inner_lr=1e30",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "non-finite values at step 30" in lines[0], proc.stderr
    assert checkpoint_steps(run_dir)[0] == 20
    assert {p: p.read_bytes() for p in good.rglob("*") if p.is_file()} == before

    skip_dir = tmp_path / "skip"
    proc = run(
        *BASE,
        "trainer.steps=20",
        "algo.inner_lr=1e30",
        "trainer.on_nan=skip",
        f"hydra.run.dir={skip_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    train = [r for r in metric_records(skip_dir) if r["split"] == "train"]
    assert train[-1]["skipped_steps"] == 20
    assert all(np.isfinite(a).all() for a in final_params(skip_dir))


# Slow tier (CLI end to end, three training processes); corrupt-checkpoint handling on the
# shared sweep is in the default run (test_bad_inputs).
@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(*BASE, "trainer.steps=30", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    newest = run_dir / CHECKPOINT_DIR / "30"
    victim = max(
        (p for p in newest.rglob("*") if p.is_file() and "ocdbt" in str(p)), key=lambda p: p.stat().st_size
    )
    victim.write_bytes(victim.read_bytes()[:-7])  # truncated
    shutil.rmtree(run_dir / CHECKPOINT_DIR / "20" / "default")  # half written

    proc = run("eval", f"run_dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "checkpoints/30 is unusable" in proc.stdout and "checkpoints/20 is unusable" in proc.stdout
    result = json.loads(next((run_dir / "eval").glob("*/results.json")).read_text())
    assert result["steps"] == 10

    # Resume sets the damaged steps aside (renamed, not deleted) and trains them again.
    proc = run("train", "trainer.resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert checkpoint_steps(run_dir) == [30, 20, 10]
    assert (run_dir / CHECKPOINT_DIR / "corrupt-30").is_dir()


def test_no_usable_checkpoint_is_a_data_error(tmp_path):
    from metalearn.checkpoint import restore_latest
    from metalearn.errors import DataError

    (tmp_path / CHECKPOINT_DIR / "7").mkdir(parents=True)  # a step dir that never finished
    with pytest.raises(DataError, match="no usable checkpoint.*step 7: ValueError: incomplete"):
        restore_latest(tmp_path, None)


def test_legacy_msgpack_checkpoint_still_loads(tmp_path):
    """Run dirs of older versions: one checkpoint.msgpack of a state without ``skipped``."""
    from conftest import make_cfg
    from flax import serialization

    from metalearn.checkpoint import LEGACY_NAME, load_checkpoint
    from metalearn.step import init_state, setup

    exp = setup(make_cfg(model={"hidden": [8]}))
    state = init_state(exp, 0)._replace(step=np.int32(42))
    old = serialization.to_state_dict(state)
    del old["skipped"]
    (tmp_path / LEGACY_NAME).write_bytes(serialization.msgpack_serialize(old))
    loaded = load_checkpoint(tmp_path, init_state(exp, 1))
    assert int(loaded.step) == 42 and int(loaded.skipped) == 0
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(state.params), strict=True):
        assert np.array_equal(a, b)
