"""Experiment trackers against their real back-ends (metalearn/trackers.py, runlog.py): an MLflow
SQLite store read back with MlflowClient, a W&B offline run's files read back; a logger whose
package is missing; the tracker group of a reproduce suite."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from conftest import run_cli
from omegaconf import OmegaConf

TINY = [
    "model.hidden=[8]",
    "trainer.meta_batch_size=2",
    "trainer.log_every=10",
    "trainer.val_every=20",
    "trainer.val_tasks=4",
    "trainer.checkpoint_every=20",
    "eval.n_tasks=4",
    "trainer.progress=false",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """W&B never tries the network, and says little."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _expected_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as tracker metric histories: ``<split>/<field>`` -> [(step, value)]."""
    history: dict[str, list[tuple[int, float]]] = {}
    for record in _records(run_dir):
        for key, value in record.items():
            if key not in ("step", "split"):
                history.setdefault(f"{record['split']}/{key}", []).append((record["step"], float(value)))
    return history


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _mlflow_run(tmp_path: Path):
    """A 40-step run with logger=mlflow: (run dir, MlflowClient of its store, MLflow run)."""
    pytest.importorskip("mlflow", reason='needs the mlflow extra: pip install "metalearn[mlflow]"')
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    run_cli("train", "logger=mlflow", "trainer.steps=40", *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    state = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    return run_dir, client, client.get_run(state["run_id"])


def _histories(client, run_id: str, keys) -> dict[str, list[tuple[int, float]]]:
    return {
        key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        for key in keys
    }


def test_mlflow_run_holds_config_metrics_result_and_files(tmp_path):
    run_dir, client, run = _mlflow_run(tmp_path)
    state = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert state["tracking_uri"] == f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"  # the default store
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "metalearn"  # not a sweep

    # Parameters: every leaf of the composed config (lists as JSON), and the protocol.
    composed = _flat(OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml")))
    params = run.data.params
    for key, value in composed.items():
        assert params[key] == (json.dumps(value) if isinstance(value, list) else str(value)), key
    results = json.loads((run_dir / "results.json").read_text())
    for key, value in results["protocol"].items():
        assert params[f"protocol.{key}"] == str(value), key
    assert params["model.hidden"] == "[8]" and params["trainer.steps"] == "40"

    assert _histories(client, run.info.run_id, _expected_history(run_dir)) == _expected_history(run_dir)
    assert run.data.metrics["test/mse"] == results["test"]["mean"]
    assert run.data.metrics["test/ci95"] == results["test"]["ci95"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "results.json", "learning_curve.png"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "results.json", str(tmp_path)))
    assert json.loads(local.read_text()) == results


@pytest.mark.slow
def test_a_resumed_run_continues_its_mlflow_run_and_predict_adds_its_predictions(tmp_path):
    run_dir, client, run = _mlflow_run(tmp_path)

    def histories():
        return _histories(client, run.info.run_id, _expected_history(run_dir))

    # Resume from the checkpoint at step 20 (the one at 40 removed): steps 30 and 40 are logged
    # again to metrics.jsonl, not to MLflow; 50 and 60 are new; still one run.
    shutil.rmtree(run_dir / "checkpoints" / "40")
    run_cli(
        "train", "logger=mlflow", "trainer.steps=60", "trainer.resume=true", *TINY,
        f"hydra.run.dir={run_dir}", cwd=tmp_path,
    )  # fmt: skip
    assert json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"] == run.info.run_id
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run.info.run_id]
    assert max(step for step, _ in _expected_history(run_dir)["train/loss"]) == 60
    # Wall-clock fields of the steps logged again differ from their first logging, which the
    # tracker keeps; the metrics themselves are identical (exact resume).
    timing = ("steps_per_s", "time_s")
    assert {k: v for k, v in histories().items() if not k.endswith(timing)} == {
        k: v for k, v in _expected_history(run_dir).items() if not k.endswith(timing)
    }
    assert {k: len(v) for k, v in histories().items()} == {
        k: len(v) for k, v in _expected_history(run_dir).items()
    }
    resumed = client.get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.params["trainer.steps"] == "40"
    assert resumed.data.tags["resumed_with.trainer.steps"] == "60"

    # predict adds its predictions.csv to the training run's tracker run.
    (tmp_path / "support.csv").write_text("x,y\n0.5,0.4\n1.0,0.8\n-1.0,-0.8\n")
    (tmp_path / "query.csv").write_text("x\n0.0\n2.0\n")
    out = tmp_path / "predicted"
    run_cli(
        "predict", f"run_dir={run_dir}", f"support={tmp_path / 'support.csv'}",
        f"query={tmp_path / 'query.csv'}", f"hydra.run.dir={out}", cwd=tmp_path,
    )  # fmt: skip
    logged = {a.path for a in client.list_artifacts(run.info.run_id, f"predict/{out.name}")}
    assert f"predict/{out.name}/predictions.csv" in logged


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B offline run file (``run-<id>.wandb``): a 7-byte header
    (":W&B", magic, version), then LevelDB's log format: 32 KiB blocks of chunks, each with a
    crc32c, a little-endian length and a type (1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _items(items) -> dict:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def test_wandb_offline_run_files_hold_config_metrics_result_and_files(tmp_path):
    pytest.importorskip("wandb", reason='needs the wandb extra: pip install "metalearn[wandb]"')
    run_dir = tmp_path / "run"
    proc = run_cli(
        "train", "logger=wandb", "trainer.steps=40", *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    state = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    [offline] = list((run_dir / "wandb").glob(f"offline-run-*-{state['run_id']}"))
    assert f"wandb sync {offline}" in proc.stdout  # the upload command is printed
    records = wandb_records(offline / f"run-{state['run_id']}.wandb")
    by_kind: dict[str, list] = {}
    for record in records:
        by_kind.setdefault(record.WhichOneof("record_type"), []).append(record)
    assert by_kind["run"][0].run.run_group == "metalearn"
    config = {}
    for record in by_kind["config"]:
        config.update(_items(record.config.update))
    composed = _flat(OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml")))
    assert config["algo.inner_lr"] == str(composed["algo.inner_lr"]) and config["model.hidden"] == "[8]"
    logged: dict[str, list] = {}
    for record in by_kind["history"]:
        row = _items(record.history.item)
        for key, value in row.items():
            if "/" in key and not key.startswith("test/"):
                logged.setdefault(key, []).append((row["_step"], value))
    assert logged == _expected_history(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    summary = {}
    for record in by_kind["summary"]:
        summary.update(_items(record.summary.update))
    assert summary["test/mse"] == results["test"]["mean"]
    files = offline / "files" / "metalearn"
    assert json.loads((files / "results.json").read_text()) == results
    assert (files / "config.yaml").read_text() == (run_dir / ".hydra" / "config.yaml").read_text()
    assert (files / "learning_curve.png").stat().st_size > 0


def test_a_logger_whose_package_is_missing_is_one_line_naming_the_extra(tmp_path):
    hide = "import sys\nsys.modules['mlflow'] = None  # as if the extra were not installed"
    proc = run_cli(
        "train", "logger=mlflow", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False, prelude=hide
    )
    assert proc.returncode == 2
    extra = 'pip install "metalearn[mlflow]"'
    assert proc.stderr.strip().splitlines() == [
        f"metalearn: error: logger=mlflow needs the mlflow package: {extra} (or drop logger=mlflow)"
    ]
    assert not (tmp_path / "run").exists()


def test_reproduce_jobs_share_one_tracker_group(tmp_path):
    proc = run_cli(
        "reproduce", "smoke", "--dry-run", "--out", str(tmp_path / "report"), "logger=mlflow", cwd=tmp_path
    )
    jobs = [line for line in proc.stdout.splitlines() if line.startswith("metalearn train")]
    assert jobs and all("logger.group=reproduce/smoke/report" in job for job in jobs)
