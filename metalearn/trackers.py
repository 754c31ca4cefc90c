"""Experiment trackers: where a run's parameters, metrics, results and files go besides the run dir.

Every record a run writes goes through one :class:`RunLog`: metrics.jsonl (always; with
trainer.tensorboard also TensorBoard event files, :class:`metalearn.metrics.JsonlLogger`) and
the trackers chosen in the ``logger`` config group (conf/logger/):

- ``logger=mlflow``: an MLflow run (any tracking URI; default a SQLite database
  ``outputs/mlflow.db`` with artifacts under ``outputs/mlartifacts/``, so ``mlflow ui
  --backend-store-uri sqlite:///outputs/mlflow.db`` shows every run without a server);
- ``logger=wandb``: a Weights & Biases run, offline by default (files in ``<run dir>/wandb/``,
  uploaded later with the ``wandb sync`` command printed at the end);
- several at once: ``logger=[mlflow,wandb]``.

Each tracker run gets the flattened composed config and the evaluation protocol
(:mod:`metalearn.protocol`) as parameters, every metrics.jsonl record as metrics
``<split>/<field>`` at its step, the final test result (``test/<metric>``, ``test/ci95``...),
and the files config.yaml, results.json, learning_curve.png (and predictions.csv of every
``metalearn predict`` of the run, :func:`log_prediction`). A sweep is one MLflow experiment /
W&B group (``logger.group``; default the sweep dir), and so is a ``metalearn reproduce`` suite.

The tracker runs' ids are kept in ``<run dir>/trackers.json``, so a resumed run continues the
same tracker runs; records re-logged after a resume (steps between the checkpoint and the stop)
are not sent twice. The packages are extras, imported only when a tracker is chosen; a chosen
tracker whose package is missing is refused when the config is checked (one line, exit 2).
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metalearn.config import ChoiceConfig, need, one_of, schema
from metalearn.errors import ConfigError

STATE_FILE = "trackers.json"
DEFAULT_GROUP = "metalearn"
# Files of a run dir logged as artifacts at its end (those that exist).
RUN_ARTIFACTS = (".hydra/config.yaml", "results.json", "learning_curve.png")


def _need_extra(module: str, extra: str, key: str) -> None:
    """ConfigError naming the extra to install unless ``module`` can be imported."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f'{key} needs the {module} package: pip install "metalearn[{extra}]" (or drop {key})'
        )


@schema("logger", "mlflow")
@dataclass
class MlflowConfig(ChoiceConfig):
    """tracking_uri: any MLflow tracking URI (a server, a database); null: a SQLite database
    outputs/mlflow.db, its artifacts in outputs/mlartifacts/. artifact_location: where a new
    experiment keeps its files (null: the store's default, or outputs/mlartifacts/ with the
    default store)."""

    tracking_uri: str | None = None
    artifact_location: str | None = None

    @classmethod
    def check(cls, section: Any, cfg: Any) -> None:
        _need_extra("mlflow", "mlflow", "logger=mlflow")
        uri = section.tracking_uri
        need(uri is None or bool(str(uri).strip()), "logger.mlflow.tracking_uri", uri, "a URI or null")


@schema("logger", "wandb")
@dataclass
class WandbConfig(ChoiceConfig):
    """project/entity: the W&B project and team (entity null: the account's default).
    mode: "offline" (files in <run dir>/wandb/, never the network), "online" or "disabled".
    dir: where the W&B files go (null: the run dir)."""

    project: str = "metalearn"
    entity: str | None = None
    mode: str = "offline"
    dir: str | None = None

    @classmethod
    def check(cls, section: Any, cfg: Any) -> None:
        _need_extra("wandb", "wandb", "logger=wandb")
        one_of(section.mode, "logger.wandb.mode", ("offline", "online", "disabled"))


def chosen(cfg: Any) -> list[str]:
    """The trackers ``cfg.logger`` enables (besides metrics.jsonl), in a fixed order."""
    section = cfg.get("logger") if hasattr(cfg, "get") else None
    if section is None:
        return []
    return [name for name in ("mlflow", "wandb") if section.get(name) is not None]


def tracker_group(cfg: Any) -> str:
    """The MLflow experiment / W&B group of a run: logger.group, else the sweep dir of a
    Hydra multirun, else "metalearn"."""
    group = cfg.logger.get("group") if cfg.get("logger") is not None else None
    if group:
        return str(group)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hc = HydraConfig.get()
        if hc.mode is not None and hc.mode.name == "MULTIRUN":
            return str(hc.sweep.dir)
    return DEFAULT_GROUP


def param_text(value: Any) -> str:
    """A config value as a tracker parameter: lists and mappings as JSON, the rest as str."""
    if isinstance(value, list | tuple | dict):
        return json.dumps(value)
    return str(value)


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"algo.inner_lr": "0.01", ...}``: the leaves of a (resolved) config as text."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = param_text(value)
    return out


def run_params(cfg: Any) -> dict[str, str]:
    """The parameters of a run: its flattened composed config and ``protocol.<field>``."""
    from omegaconf import OmegaConf

    from metalearn.protocol import protocol_of

    params = flat_params(OmegaConf.to_container(cfg, resolve=True))
    params.update(flat_params(protocol_of(cfg), "protocol."))
    return params


def record_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as tracker metrics ``<split>/<field>`` (numbers only)."""
    split = record.get("split", "train")
    return {
        f"{split}/{key}": float(value)
        for key, value in record.items()
        if key not in ("step", "split") and isinstance(value, int | float) and not isinstance(value, bool)
    }


def result_metrics(results: dict[str, Any]) -> dict[str, float]:
    """results.json as tracker metrics: ``test/<metric>``, ``test/ci95``, ``test/n_tasks``
    (and ``test_robust/...`` under an attack), ``train_time_s``..., ``steps``."""
    out: dict[str, float] = {}
    for entry in ("test", "test_robust"):
        summary = results.get(entry)
        if isinstance(summary, dict):
            out[f"{entry}/{summary['metric']}"] = float(summary["mean"])
            out[f"{entry}/ci95"] = float(summary["ci95"])
            out[f"{entry}/n_tasks"] = float(summary["n_tasks"])
    for key in ("steps", "train_time_s", "compile_time_s", "eval_time_s"):
        value = results.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def _retrying(call, *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``, retried while SQLite reports a lock held by a parallel job."""
    for attempt in range(20):
        try:
            return call(*args, **kwargs)
        except Exception as err:  # the store wraps sqlite3.OperationalError in its own types
            if "locked" not in str(err) or attempt == 19:
                raise
            time.sleep(0.2 * (attempt + 1))
    return None


def default_store() -> tuple[str, str]:
    """(tracking URI, artifact folder) of the default MLflow store under ./outputs/."""
    outputs = Path("outputs").absolute()
    return f"sqlite:///{outputs / 'mlflow.db'}", (outputs / "mlartifacts").as_uri()


def prepare_stores(cfg: Any) -> None:
    """Create the default MLflow database (its tables) before a sweep's jobs start, so that
    jobs running in parallel do not all create it at once."""
    if "mlflow" in chosen(cfg) and cfg.logger.mlflow.tracking_uri is None:
        from mlflow.tracking import MlflowClient

        uri, _ = default_store()
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        _retrying(MlflowClient(tracking_uri=uri).search_experiments)


class MlflowTracker:
    """One MLflow run, through MlflowClient (no global active run, so runs never mix)."""

    name = "mlflow"

    def __init__(self, section: Any, group: str, run_dir: Path, state: dict[str, Any]):
        from mlflow.tracking import MlflowClient

        uri, artifacts = section.tracking_uri, section.artifact_location
        if uri is None:
            uri, default_artifacts = default_store()
            artifacts = artifacts or default_artifacts
            Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        uri = state.get("tracking_uri", uri)
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = state.get("run_id")
        self.resumed = self.run_id is not None
        if self.resumed:
            _retrying(self.client.update_run, self.run_id, status="RUNNING")
        else:
            experiment = ensure_experiment(self.client, group, artifacts)
            tags = {"metalearn.run_dir": str(run_dir.absolute()), "metalearn.group": group}
            run = _retrying(self.client.create_run, experiment, run_name=run_dir.name, tags=tags)
            self.run_id = run.info.run_id
        self.state = {"tracking_uri": uri, "run_id": self.run_id}

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        if self.resumed:  # a param cannot change once logged: only new keys; changes as tags
            logged = _retrying(self.client.get_run, self.run_id).data.params
            for key, value in params.items():
                if key in logged and logged[key] != value:
                    _retrying(self.client.set_tag, self.run_id, f"resumed_with.{key}", value)
            params = {k: v for k, v in params.items() if k not in logged}
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            _retrying(self.client.log_batch, self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        _retrying(self.client.log_batch, self.run_id, metrics=batch)

    def log_files(self, files: list[tuple[Path, str]]) -> None:
        for path, folder in files:
            _retrying(self.client.log_artifact, self.run_id, str(path), folder or None)

    def end(self, status: str) -> None:
        _retrying(self.client.set_terminated, self.run_id, status)


def ensure_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    """The id of MLflow experiment ``name``, created if new (a parallel job may create it
    at the same moment: then the other's is used)."""
    found = _retrying(client.get_experiment_by_name, name)
    if found is not None:
        return found.experiment_id
    try:
        # The experiment kind makes MLflow's UI open on its runs table (model training), not
        # on the GenAI traces view.
        tags = {"mlflow.experimentKind": "custom_model_development"}
        return _retrying(client.create_experiment, name, artifact_location=artifact_location, tags=tags)
    except Exception:
        found = _retrying(client.get_experiment_by_name, name)
        if found is None:
            raise
        return found.experiment_id


class WandbTracker:
    """One W&B run (offline by default: files under ``<dir>/wandb/offline-run-*``)."""

    name = "wandb"

    def __init__(self, section: Any, group: str, run_dir: Path, state: dict[str, Any]):
        import wandb

        self.mode = section.mode
        root = Path(section.dir) if section.dir is not None else run_dir
        root.mkdir(parents=True, exist_ok=True)
        self.resumed = "run_id" in state
        run_id = state.get("run_id") or _new_wandb_id()
        self.run = wandb.init(
            project=section.project,
            entity=section.entity,
            group=group,
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(root),
            settings=wandb.Settings(mode=self.mode, console="off", silent=True, x_disable_stats=True),
        )
        self.state = {"run_id": run_id, "dir": str(root.absolute())}

    def log_params(self, params: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_summary(self, metrics: dict[str, float]) -> None:
        self.run.summary.update(metrics)

    def log_files(self, files: list[tuple[Path, str]]) -> None:
        import shutil

        # Copied under files/metalearn/ (W&B keeps its own config.yaml in files/; run.save of a
        # file outside the run's folder makes a link that goes stale when the source moves).
        for path, folder in files:
            target = Path(self.run.dir) / "metalearn" / (folder or "") / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            self.run.save(str(target), base_path=self.run.dir, policy="now")

    def end(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)

    def sync_hint(self) -> str | None:
        if self.mode != "offline":
            return None
        return f"W&B run saved offline; upload it with: wandb sync {Path(self.run.dir).parent}"


def _new_wandb_id() -> str:
    """A W&B run id (8 characters of [a-z0-9], as W&B makes them)."""
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


TRACKERS = {"mlflow": MlflowTracker, "wandb": WandbTracker}
