"""End-to-end checks of the `metalearn` command line on tiny budgets. The training runs are
jobs of the session's shared sweep (conftest.tiny_sweep); contract checks that need no fresh
interpreter run the CLI in-process (conftest.run_cli_in_process), a few stay subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import (
    SHARED_OMNIGLOT,
    SWEEP_ALGOS,
    SWEEP_TINY,
    copy_run,
    metric_records,
    run_cli,
    run_cli_in_process,
    sweep_run,
)


@pytest.fixture
def sinusoid_run(tiny_sweep) -> Path:
    """MAML on sinusoid: 30 steps, logs every 10, validation and checkpoints every 15, 20
    test tasks (read only; copy_run it to change it)."""
    return sweep_run(tiny_sweep, "maml")


def test_train_writes_run_dir(sinusoid_run):
    results = json.loads((sinusoid_run / "results.json").read_text())
    test = results["test"]
    assert test["metric"] == "mse" and test["n_tasks"] == 20
    assert test["mean"] > 0 and test["ci95"] > 0
    records = metric_records(sinusoid_run)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [10, 20, 30]
    assert [r["step"] for r in records if r["split"] == "validation"] == [15, 30]
    assert sorted(int(p.name) for p in (sinusoid_run / "checkpoints").iterdir()) == [15, 30]
    assert (sinusoid_run / ".hydra" / "config.yaml").is_file()


def test_same_seed_same_numbers(sinusoid_run, tmp_path):
    """A single run in another process (this one) repeats the sweep job's numbers exactly."""
    code, out, err = run_cli_in_process(
        "train", "algo=maml", *SWEEP_TINY, f"hydra.run.dir={tmp_path / 'again'}"
    )
    assert code == 0, out + err
    assert metric_records(tmp_path / "again") == metric_records(sinusoid_run)
    first = json.loads((sinusoid_run / "results.json").read_text())["test"]
    second = json.loads((tmp_path / "again" / "results.json").read_text())["test"]
    assert first == second


def test_eval_reloads_run_and_reproduces_test_result(tiny_sweep, tmp_path):
    run = copy_run(tiny_sweep, "maml", tmp_path / "run")
    code, out, err = run_cli_in_process("eval", f"run_dir={run}")
    assert code == 0, out + err
    evals = sorted((run / "eval").glob("*/results.json"))
    assert evals, "eval wrote no results.json"
    reloaded = json.loads(evals[-1].read_text())
    trained = json.loads((run / "results.json").read_text())
    assert reloaded["test"] == trained["test"]  # same checkpoint, same test tasks

    code, out, err = run_cli_in_process(
        "eval", f"run_dir={run}", "algo.inner_steps_test=5", "eval.n_tasks=40"
    )
    assert code == 0, out + err
    assert "after 5 inner step(s)" in out
    newest = max((run / "eval").glob("*/results.json"), key=lambda p: p.stat().st_mtime_ns)
    more_steps = json.loads(newest.read_text())
    assert more_steps["inner_steps_test"] == 5 and more_steps["test"]["n_tasks"] == 40


@pytest.mark.parametrize(
    "override,needle",
    [
        ("trainer.stepz=3", "trainer.stepz"),
        ("trainer.steps=abc", "trainer.steps"),
        ("algo.inner_lr=-1", "algo.inner_lr"),
        ("algo=nonexistent", "algo.name='nonexistent'"),
        ("dataset.k_shot=0", "dataset.k_shot"),
        ("eval.n_tasks=1", "eval.n_tasks"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, override, needle):
    run_dir = tmp_path / "run"
    code, _, stderr = run_cli_in_process("train", override, f"hydra.run.dir={run_dir}")
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert needle in lines[0]
    assert not run_dir.exists()


def test_bad_input_in_a_fresh_process_is_one_line(tmp_path):
    """The same contract from a new interpreter: nothing else (import warnings, logs) on stderr."""
    run_dir = tmp_path / "run"
    proc = run_cli("train", "algo.inner_lr=-1", f"hydra.run.dir={run_dir}", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "algo.inner_lr" in lines[0], proc.stderr
    assert not run_dir.exists()


def _stdout(*args: str, cwd: Path) -> str:
    """A subprocess: Hydra's --help/--cfg configure logging, which in this process would shut
    down pytest's own log handlers."""
    return run_cli(*args, cwd=cwd).stdout


def test_help_and_cfg(tmp_path):
    help_text = _stdout("train", "--help", cwd=tmp_path)
    groups_section = help_text.split("== Configuration groups ==")[1].split("== Config ==")[0]
    groups = {
        line.split(":")[0]: {o.strip() for o in line.split(":", 1)[1].split(",")}
        for line in groups_section.splitlines()
        if ":" in line
    }
    assert {"maml", "fomaml"} <= groups["algo"]
    assert {"sinusoid", "omniglot"} <= groups["dataset"]
    assert {"mlp", "conv4"} <= groups["model"]
    assert {"adam", "sgd"} <= groups["optim"]
    cfg_text = _stdout("train", "dataset=omniglot", "--cfg", "job", cwd=tmp_path)
    assert "name: conv4" in cfg_text and "inner_lr: 0.4" in cfg_text  # the dataset picks its model
    cfg_text = _stdout("train", "algo=fomaml", "model.hidden=[20,20]", "--cfg", "job", cwd=tmp_path)
    assert "first_order: true" in cfg_text and "- 20" in cfg_text


def test_multirun_sweep(tiny_sweep):
    """`train -m algo=...`: one job dir per algorithm, each with its results."""
    results = sorted(tiny_sweep.glob("*/results.json"))
    assert len(results) == len(SWEEP_ALGOS)
    assert {json.loads(p.read_text())["algo"] for p in results} == set(SWEEP_ALGOS)
    assert (tiny_sweep / "multirun.yaml").is_file()


# Slow tier: the default run trains Omniglot presets from the shared archives in-process
# (test_experiments) and checks their parsing (test_omniglot_data, test_data_identity).
@pytest.mark.slow
@pytest.mark.skipif(not SHARED_OMNIGLOT.is_dir(), reason="shared Omniglot archives not present")
def test_omniglot_small_from_shared_archives(tmp_path):
    run_dir = tmp_path / "run"
    run_cli(
        "train",
        "dataset=omniglot",
        "dataset.variant=small",
        f"dataset.manual_dir={SHARED_OMNIGLOT}",
        f"dataset.data_dir={tmp_path / 'data'}",
        "model.filters=8",
        "trainer.steps=4",
        "trainer.log_every=2",
        "trainer.val_every=0",
        "trainer.meta_batch_size=4",
        "trainer.progress=false",
        "eval.n_tasks=10",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    test = json.loads((run_dir / "results.json").read_text())["test"]
    assert test["metric"] == "accuracy" and 0.0 <= test["mean"] <= 1.0 and test["n_tasks"] == 10


def test_omniglot_missing_archives_fail_fast(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run_dir = tmp_path / "run"
    code, _, stderr = run_cli_in_process(
        "train",
        "dataset=omniglot",
        "dataset.variant=small",
        f"dataset.manual_dir={empty}",
        f"dataset.data_dir={tmp_path / 'data'}",
        "dataset.download=false",
        f"hydra.run.dir={run_dir}",
    )
    assert code == 2
    assert "images_background_small1.zip" in stderr and "dataset.manual_dir" in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
