"""`metalearn report` over a real sweep, the reproduce planner, TensorBoard logging, and
the optional Hydra plugin configs (checked as YAML only: the plugins are optional extras)."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SWEEP_ALGOS, run_cli, run_cli_in_process

from metalearn.report import _pooled, aggregate, config_label, find_runs, sort_rows, write_report
from metalearn.reproduce import SuiteError, load_suite, load_suites, plan


def test_sweep_then_report_one_row_per_configuration(tiny_sweep, tmp_path):
    """`metalearn report` over the session's real sweep (one seed per algorithm; seeds are
    pooled in test_grouping_sorting_and_pooled_ci), plus a failed job of the same sweep."""
    sweep = Path(shutil.copytree(tiny_sweep, tmp_path / "sweep"))
    # A failed job of the same sweep: marked, not aggregated.
    broken = sweep / "9_broken"
    (broken / ".hydra").mkdir(parents=True)
    (broken / ".hydra" / "config.yaml").write_text("seed: 0\nrun_dir: null\n")
    maml_job = next(p for p in sweep.glob("*/.hydra/overrides.yaml") if "algo=maml" in p.read_text())
    overrides = [*yaml.safe_load(maml_job.read_text()), "seed=7"]
    (broken / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (broken / "error.txt").write_text("invalid something\n")

    code, out, err = run_cli_in_process("report", str(sweep), "--out", str(tmp_path / "rep"))
    assert code == 0 and "report written to" in out, out + err
    with (tmp_path / "rep" / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    by_algo = {re.search(r"algo=(\w+)", r["configuration"]).group(1): r for r in rows}
    assert len(rows) == len(SWEEP_ALGOS) and set(by_algo) == set(SWEEP_ALGOS)
    for algo, row in by_algo.items():
        assert row["seeds"] == "0" and row["metric"] == "mse", row
        assert "seed=" not in row["configuration"]
        (mean,) = [
            json.loads(p.read_text())["test"]["mean"]
            for p in sweep.glob("*/results.json")
            if json.loads(p.read_text())["algo"] == algo
        ]
        assert math.isclose(float(row["mean"]), mean, rel_tol=1e-9)
        assert float(row["ci95"]) > 0
        assert row["failed"] == ("1" if algo == "maml" else "0")
    # Sorted by MSE, ascending.
    means = [float(r["mean"]) for r in rows]
    assert means == sorted(means)
    md = (tmp_path / "rep" / "results.md").read_text()
    assert "## Failed runs" in md and "invalid something" in md
    pngs = sorted((tmp_path / "rep" / "curves").glob("*.png"))
    assert len(pngs) == len(SWEEP_ALGOS) and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def _fake_run(root: Path, name: str, overrides: list[str], mean: float | None, ci: float = 0.1, n: int = 100):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    seed = next((o.split("=")[1] for o in overrides if o.startswith("seed=")), "0")
    (run / ".hydra" / "config.yaml").write_text(f"seed: {seed}\nrun_dir: null\n")
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if mean is not None:
        test = {"metric": "accuracy", "mean": mean, "ci95": ci, "n_tasks": n}
        (run / "results.json").write_text(json.dumps({"test": test}))
    return run


def test_grouping_sorting_and_pooled_ci(tmp_path):
    _fake_run(tmp_path, "a0", ["algo.inner_lr=0.1", "seed=0", "dataset.manual_dir=/x"], 0.90)
    _fake_run(tmp_path, "a1", ["seed=1", "algo.inner_lr=0.1"], 0.94)
    _fake_run(tmp_path, "b0", ["algo.inner_lr=0.4", "seed=0"], 0.97)
    _fake_run(tmp_path, "c0", ["algo.inner_lr=9", "seed=0"], None)  # crashed: no results.json
    rows = sort_rows(aggregate(find_runs(tmp_path)))
    assert [r.label for r in rows] == ["algo.inner_lr=0.4", "algo.inner_lr=0.1", "algo.inner_lr=9"]
    assert rows[-1].mean is None and rows[-1].failed
    two = rows[1]
    assert math.isclose(two.mean, 0.92) and math.isclose(two.seed_std, math.sqrt(2) * 0.02)
    # Pooled CI: equal within-seed variance plus the seed means' spread around 0.92.
    sd = 0.1 * math.sqrt(100) / 1.96
    expected = 1.96 * math.sqrt((200 * sd**2 + 100 * 0.02**2 * 2) / 200 / 200)
    assert math.isclose(two.ci95, expected)
    assert _pooled([0.5], [0.1], [100]) == (0.5, pytest.approx(0.1))
    assert config_label(["seed=3", "hydra.run.dir=x", "experiment=e", "a=1"]) == "experiment=e a=1"


def test_report_marks_eval_dirs_and_writes_files(tmp_path):
    run = _fake_run(tmp_path, "r", ["seed=0"], 0.5)
    ev = run / "eval" / "t"
    (ev / ".hydra").mkdir(parents=True)
    (ev / ".hydra" / "config.yaml").write_text(f"seed: 0\nrun_dir: {run}\n")
    rows = write_report(tmp_path, tmp_path / "out")
    assert len(rows) == 1 and rows[0].label == "defaults"
    assert (tmp_path / "out" / "results.md").is_file() and (tmp_path / "out" / "results.csv").is_file()


def test_reproduce_plan_skips_omniglot_without_archives(tmp_path):
    suite = load_suites()["smoke"]
    jobs, notes = plan(suite, (0, 1), tmp_path, None, None, ["trainer.steps=3"])
    assert {e for e, _, _ in jobs} == {"maml_sinusoid_k5"} and len(jobs) == 2
    assert notes and "maml_omniglot_5w1s" in notes[0] and "--manual-dir" in notes[0]
    argv = jobs[0][2]
    assert argv[0] == "experiment=maml_sinusoid_k5" and "seed=0" in argv
    # Extra overrides come after the suite's, so they win.
    assert argv.index("trainer.steps=3") > argv.index("trainer.steps=2000")
    jobs, notes = plan(suite, (0,), tmp_path, "/data/omni", None, [])
    assert len(jobs) == 2 and not notes
    assert "dataset.manual_dir=/data/omni" in jobs[1][2]
    presets = {p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")}
    for name, s in load_suites().items():
        # An entry runs its own name as preset unless the suite's presets map says otherwise.
        assert {s.presets.get(e, e) for e in s.experiments} - {None} <= presets, name


def test_reproduce_suites_are_the_yaml_files_of_conf_suite(tmp_path):
    suites = load_suites()
    assert set(suites) == {p.stem for p in (REPO / "conf" / "suite").glob("*.yaml")}
    # Listed in the files' order: smoke first, as before the suites moved out of Python.
    assert list(suites)[:3] == ["smoke", "maml_sinusoid", "maml_omniglot"]
    smoke = suites["smoke"]
    assert smoke.seeds == (0, 1) and smoke.overrides == ("trainer.checkpoint_every=0", "eval.n_tasks=100")
    assert smoke.per_experiment["maml_omniglot_5w1s"][0] == "dataset.variant=small"
    assert suites["maml_omniglot"].seeds == (0, 1, 2)  # the default
    # A new file is a new suite; a wrong key is named with its file.
    (tmp_path / "mine.yaml").write_text("experiments: [maml_sinusoid_k5]\nseeds: [4]\n")
    assert load_suites(tmp_path)["mine"].seeds == (4,)
    (tmp_path / "bad.yaml").write_text("experiments: [maml_sinusoid_k5]\nseed: [4]\n")
    with pytest.raises(SuiteError, match="bad.yaml: unknown key 'seed'"):
        load_suite(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text("experiments: [a]\nper_experiment: {b: [x=1]}\n")
    with pytest.raises(SuiteError, match="per_experiment.b"):
        load_suite(tmp_path / "bad.yaml")


def test_reproduce_unknown_suite_is_one_line_exit_2():
    code, _, err = run_cli_in_process("reproduce", "nosuch")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "unknown suite 'nosuch'" in lines[0] and "smoke" in lines[0], err
    code, help_text, _ = run_cli_in_process("reproduce", "--help")
    assert code == 0
    assert "{fomaml_omniglot,imaml," in help_text and "suites: smoke (maml_sinusoid_k5" in help_text


def test_reproduce_runs_a_suite_end_to_end(tmp_path):
    out = tmp_path / "rep"
    proc = run_cli(
        "reproduce", "smoke", "--seeds", "0", "--out", str(out), "--manual-dir", "",
        "trainer.steps=4", "trainer.val_every=2", "eval.n_tasks=10", cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipped maml_omniglot_5w1s" in proc.stdout
    results = json.loads((out / "runs" / "maml_sinusoid_k5" / "seed0" / "results.json").read_text())
    assert results["paper"]["value"] == 0.67 and results["steps"] == 4
    md = (out / "results.md").read_text()
    assert "experiment=maml_sinusoid_k5" in md and "0.670" in md
    assert (out / "results.csv").is_file() and list((out / "curves").glob("*.png"))


def _event_scalars(folder: Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the TFRecord event files of ``folder``
    (records: 8-byte length, 4-byte crc, the Event proto, 4-byte crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return scalars


def test_tensorboard_event_files(tmp_path):
    """tensorboardX is in the test extra, so this runs in CI (no skip)."""
    from metalearn.metrics import JsonlLogger

    logger = JsonlLogger(tmp_path / "metrics.jsonl", tensorboard=True)
    logger.log({"step": 1, "split": "train", "loss": 0.5, "mse": 0.4})
    logger.log({"step": 4, "split": "validation", "mse": 0.25, "n_tasks": 10, "note": "text"})
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"] == 0.5
    scalars = {(tag, step): value for tag, step, value in _event_scalars(tmp_path / "tensorboard")}
    assert scalars == pytest.approx(
        {("train/loss", 1): 0.5, ("train/mse", 1): 0.4, ("validation/mse", 4): 0.25,
         ("validation/n_tasks", 4): 10.0}
    )  # fmt: skip


def test_tensorboard_off_by_default_and_missing_extra_is_one_line(tmp_path, monkeypatch):
    from metalearn.config import TrainerConfig, validate
    from metalearn.errors import ConfigError

    assert TrainerConfig().tensorboard is False
    import importlib.util

    from conftest import make_cfg

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "tensorboardX" else real(n, *a)
    )
    with pytest.raises(ConfigError, match="trainer.tensorboard"):
        validate(make_cfg(trainer={"tensorboard": True}))


@pytest.mark.parametrize("path", ["hydra/sweeper/optuna_inner_lr.yaml", "hydra/launcher/slurm.yaml"])
def test_plugin_configs_parse(path):
    data = yaml.safe_load((REPO / "conf" / path).read_text())
    assert isinstance(data, dict) and data["defaults"]
