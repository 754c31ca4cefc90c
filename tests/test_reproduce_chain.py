"""A chained suite (conf/suite/pretrained_omniglot.yaml: pre-training, then ProtoNet from its
backbone via ``model.init_from=${stage:...}``) resumes exactly after SIGKILL in its second
stage: the same ``metalearn reproduce`` command again skips the finished first stage, resumes
the second, and its metrics.jsonl and results.json equal an uninterrupted chain's, timing
fields aside (metalearn/reproduce.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SHARED_OMNIGLOT, metric_records, run_cli

from metalearn.checkpoint import has_checkpoint
from metalearn.reproduce import SuiteError, load_suite, load_suites, plan

# serial: its slow checks time kills and signals; CI runs them in one process.
pytestmark = [
    pytest.mark.skipif(not SHARED_OMNIGLOT.is_dir(), reason="shared Omniglot archives not present"),
    pytest.mark.serial,
]

# Tiny settings on top of the suite's (the command line's overrides win): 14x14 images, a
# 4-filter Conv4, a long enough second stage to be killed in, checkpoints every 10 steps.
TINY = [
    "dataset.image_size=14",
    "model.filters=4",
    "trainer.val_every=0",
    "trainer.checkpoint_every=10",
    "trainer.log_every=5",
    "eval.checkpoint=last",
    "eval.n_tasks=10",
    "eval.batch_size=5",
]
FIRST, SECOND = "pretrain_omniglot", "protonet_omniglot_pretrained"
TIMING = {"train_time_s", "compile_time_s", "eval_time_s", "time_s"}


def _command(out: Path, data: Path, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "metalearn.cli", "reproduce", "pretrained_omniglot", "--out", str(out),
        "--manual-dir", str(SHARED_OMNIGLOT), "--data-dir", str(data), *TINY,
        f"trainer.steps={steps}",
    ]  # fmt: skip


def _results(run_dir: Path) -> dict:
    """results.json without timings, and with the chain's own first stage for ``init_from``
    (the source run's path, which differs between the two chains' report folders)."""
    results = json.loads((run_dir / "results.json").read_text())
    if "init_from" in results:
        assert results["init_from"] == str(run_dir.parents[1] / FIRST / "seed0"), results["init_from"]
        results["init_from"] = "<first stage>"

    def strip(d: dict) -> dict:
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in TIMING}

    return strip(results)


def test_stage_reference_is_the_earlier_runs_dir(tmp_path):
    suite = load_suites()["pretrained_omniglot"]
    jobs, _ = plan(suite, (3,), tmp_path, "/omni", None, [])
    (first, _, first_argv), (second, _, second_argv) = jobs
    assert (first, second) == (FIRST, SECOND)
    assert not any(a.startswith("experiment=") for a in first_argv)  # presets: null
    assert f"hydra.run.dir={tmp_path}/runs/{FIRST}/seed3" in first_argv
    assert f"model.init_from={tmp_path}/runs/{FIRST}/seed3" in second_argv
    # A reference to a later (or unknown) experiment is refused, naming the file and override.
    (tmp_path / "bad.yaml").write_text(
        "experiments: [a, b]\nper_experiment: {a: ['model.init_from=${stage:b}']}\n"
    )
    with pytest.raises(SuiteError, match=r"bad.yaml: 'model.init_from=\$\{stage:b\}' \(for a\)"):
        load_suite(tmp_path / "bad.yaml")


@pytest.mark.slow
def test_chain_killed_in_its_second_stage_resumes_exactly(tmp_path):
    data = tmp_path / "data"
    steps = 300
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run_cli(*_command(ref, data, steps)[3:], cwd=tmp_path)

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # A session of its own, so that SIGKILL reaches the suite's training subprocess too (as
    # when the machine or the job scheduler kills everything).
    proc = subprocess.Popen(
        _command(killed, data, steps), cwd=tmp_path, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    second = killed / "runs" / SECOND / "seed0"
    deadline = time.monotonic() + 900  # generous: the machine may be busy
    while not has_checkpoint(second) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the suite ended before it could be killed"
    assert has_checkpoint(second) and not (second / "results.json").exists(), "not killed mid-stage"
    first_results = (killed / "runs" / FIRST / "seed0" / "results.json").read_bytes()

    rerun = run_cli(*_command(killed, data, steps)[3:], cwd=tmp_path)
    assert f"{FIRST} seed 0: done already" in rerun.stdout, rerun.stdout
    assert "resuming" in (killed / "logs" / f"{SECOND}_seed0.log").read_text()
    # The first stage was not run again; the second continued to the uninterrupted result.
    assert (killed / "runs" / FIRST / "seed0" / "results.json").read_bytes() == first_results
    for stage in (FIRST, SECOND):
        assert metric_records(killed / "runs" / stage / "seed0") == metric_records(
            ref / "runs" / stage / "seed0"
        )
        assert _results(killed / "runs" / stage / "seed0") == _results(ref / "runs" / stage / "seed0")
    init_from = json.loads((second / "init_from.json").read_text())
    assert Path(init_from["run_dir"]) == killed / "runs" / FIRST / "seed0", init_from


def test_each_job_reports_its_own_peak_memory(tmp_path):
    """reproduce records a job's own peak resident memory: a child that holds 300 MiB reports
    at least that, and a small child neither inherits it nor counts this (large) process."""
    from metalearn.reproduce import run_measured

    # Each child lives long enough to be sampled (run_measured reads VmHWM every 0.1 s).
    big = [
        sys.executable,
        "-c",
        "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5)",
    ]
    small = [sys.executable, "-c", "import time; time.sleep(0.5)"]
    code, seconds, peak_big = run_measured(big, tmp_path / "big.log")
    assert code == 0 and seconds > 0
    code, _, peak_small = run_measured(small, tmp_path / "small.log")
    assert code == 0
    assert peak_big >= 300, peak_big
    assert peak_small < 100, peak_small
    code, _, _ = run_measured([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "fail.log")
    assert code == 3
