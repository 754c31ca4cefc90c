"""Typed config schemas, registered in Hydra's ConfigStore, and the checks that span groups.

The ``algo``, ``dataset`` and ``model`` groups have one schema per choice: a dataclass in the
module that implements the choice (``@schema("algo", "maml")`` in metalearn/algos/maml.py),
holding exactly the keys that choice reads, with its range checks in its ``check`` classmethod.
``conf/<group>/<name>.yaml`` starts from that schema (``defaults: [<name>_schema, _self_]``), so
a misspelt key, a value of the wrong type or a key of another choice (``algo=maml algo.lam=5``)
fails at composition time (struct mode; :func:`composition_error` turns that into one line).
The other groups (optim, trainer, eval, attack, preprocess, paper) have one schema each, below.
:func:`validate` runs every group's checks, then the few rules that span groups.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from metalearn.errors import ConfigError

# group -> choice name -> schema dataclass (filled by @schema as the modules are imported).
SCHEMAS: dict[str, dict[str, type]] = {"algo": {}, "dataset": {}, "model": {}, "logger": {}}
# The groups of which a config holds exactly one choice (cfg.<group>.name); ``logger`` takes
# any number at once (logger=[mlflow,wandb], each under logger.<name>; metalearn/trackers.py).
CHOICE_GROUPS = ("algo", "dataset", "model")
# The modules whose import registers every schema of the per-choice groups.
_SCHEMA_MODULES = (
    "metalearn.algos",
    "metalearn.models",
    "metalearn.tasks",
    "metalearn.trackers",
    "metalearn.multisource",
    *(
        f"metalearn.data.{m}"
        for m in ("omniglot", "mini_imagenet", "cifar_fewshot", "image_folder", "tfds_source")
    ),
)


def schema(group: str, *names: str) -> Callable[[type], type]:
    """Class decorator: the dataclass is the schema of ``conf/<group>/<name>.yaml`` for each name."""

    def register(cls: type) -> type:
        SCHEMAS.setdefault(group, {})
        for name in names:
            SCHEMAS[group][name] = cls
        return cls

    return register


def schemas(group: str) -> dict[str, type]:
    """Every schema of ``group`` ("algo", "dataset" or "model"), by choice name."""
    import importlib

    for module in _SCHEMA_MODULES:
        importlib.import_module(module)
    return SCHEMAS[group]


def need(ok: bool, key: str, value: Any, valid: str) -> None:
    """Raise ConfigError("invalid key=value: must be valid") unless ``ok``."""
    if not ok:
        raise ConfigError(f"invalid {key}={value!r}: must be {valid}")


def one_of(value: Any, key: str, allowed: tuple | list | dict) -> None:
    """``value`` must be one of ``allowed`` (names listed in the error)."""
    need(value in allowed, key, value, f"one of {list(allowed)}")


def finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)


@dataclass
class ChoiceConfig:
    """What every schema of a per-choice group has: the choice's name."""

    name: str = MISSING

    @classmethod
    def check(cls, section: Any, cfg: Any) -> None:
        """Range checks of this choice's keys (``section``: cfg.<group>; ``cfg``: the whole
        config, for rules that depend on another group). Subclasses extend it."""


def owners(group: str, key: str) -> list[str]:
    """The choices of ``group`` whose schema has ``key``."""
    return sorted(name for name, cls in schemas(group).items() if key in cls.__dataclass_fields__)


def composition_error(err: BaseException, chosen: Callable[[str, str], str | None] | None = None) -> str:
    """One line for a Hydra/OmegaConf composition error. A key that the chosen algorithm,
    dataset or model does not have names the choices that do have it; ``chosen(group, key)``
    gives the group's choice (the config composed without that key), where known."""

    def first(e: BaseException) -> str:
        text = str(e).strip()
        return text.splitlines()[0] if text else type(e).__name__

    cause = err.__cause__ or err.__context__
    text = " ".join(str(e) for e in (err, cause) if e is not None)
    missing = re.search(r"Could not find '(algo|dataset|model)/(\w+)'", text)
    if missing:
        group, name = missing.groups()
        return f"invalid {group}.name={name!r}: must be one of {sorted(schemas(group))}"
    found = re.search(r"Could not override '(algo|dataset|model)\.(\w+)", text)
    if found:
        group, key = found.groups()
        choice = chosen(group, key) if chosen else None
        have = owners(group, key)
        where = f"{group}s that have it: {', '.join(have)}" if have else f"no {group} has it"
        which = f"{group}={choice}" if choice else f"the chosen {group}"
        return f"invalid {group}.{key}: {which} has no key {key!r} ({where})"
    return first(err) + (f" ({first(cause)})" if cause is not None else "")


SCHEDULES = ("constant", "cosine", "linear", "step")


@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 0.001
    momentum: float = 0.0
    # Adam's epsilon (optax's default 1e-8; the iMAML authors' code uses 1e-3).
    eps: float = 1e-8
    # Clip the meta-gradient to this global norm; null disables clipping.
    clip_norm: float | None = None
    # Clamp every meta-gradient entry to [-clip_value, clip_value] (cbfinn/maml mini-ImageNet
    # and CAVIA: 10); null disables it. Applied before clip_norm.
    clip_value: float | None = None
    # L2 weight decay lambda: lambda * param is added to the meta-gradient of every kernel (array
    # of 2+ dimensions; biases and BatchNorm scale/offset are not decayed) after clipping and
    # before the optimizer, i.e. a (lambda / 2) ||w||^2 penalty on the meta-loss. 0.0: off.
    weight_decay: float = 0.0
    # "constant", "cosine" or "linear" (decays to lr * final_lr_fraction over trainer.steps),
    # or "step" (lr * decay_rate ** floor(step / decay_every); CAVIA: 0.9 every 5000 steps).
    schedule: str = "constant"
    warmup_steps: int = 0
    final_lr_fraction: float = 0.0
    decay_rate: float = 1.0
    decay_every: int = 0

    @classmethod
    def check(cls, o: Any, cfg: Any) -> None:
        one_of(o.name, "optim.name", ("adam", "sgd"))
        need(finite(o.lr) and o.lr > 0, "optim.lr", o.lr, "> 0")
        need(finite(o.eps) and o.eps > 0, "optim.eps", o.eps, "> 0")
        need(o.clip_norm is None or o.clip_norm > 0, "optim.clip_norm", o.clip_norm, "> 0 or null")
        need(o.clip_value is None or o.clip_value > 0, "optim.clip_value", o.clip_value, "> 0 or null")
        need(finite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
        need(o.schedule in SCHEDULES, "optim.schedule", o.schedule, "constant, cosine, linear or step")
        if o.schedule == "step":
            need(o.decay_every >= 1, "optim.decay_every", o.decay_every, ">= 1 with optim.schedule=step")
            need(
                0 < o.decay_rate <= 1, "optim.decay_rate", o.decay_rate, "in (0, 1] with optim.schedule=step"
            )
        need(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, ">= 0")
        need(0 <= o.final_lr_fraction <= 1, "optim.final_lr_fraction", o.final_lr_fraction, "in [0, 1]")


@dataclass
class TrainerConfig:
    steps: int = 20000
    meta_batch_size: int = 25
    log_every: int = 100
    val_every: int = 2000
    val_tasks: int = 200
    checkpoint_every: int = 5000
    progress: bool = True
    # Checkpoints kept in <run dir>/checkpoints/ (the newest N; older ones are deleted).
    keep_checkpoints: int = 3
    # Continue from the newest complete checkpoint of hydra.run.dir (see docs/reliability.md).
    resume: bool = False
    # A non-finite loss or gradient: "stop" (exit 2, last checkpoint kept) or "skip" (the
    # update is not applied; the step still advances and is counted in skipped_steps).
    on_nan: str = "stop"
    # Meta-steps per compiled call (one host dispatch runs a block of steps; results are
    # bitwise those of one step per call). 0: automatic (blocks of about 0.1 s, cut at log,
    # validation and checkpoint steps); N: at most N per call; 1: one step per call.
    steps_per_call: int = 0
    # Also write TensorBoard event files (run dir /tensorboard/); needs the `tensorboard`
    # extra (tensorboardX): pip install "metalearn[tensorboard]".
    tensorboard: bool = False
    # Stop when the validation loss has not improved (strictly) for more than this many
    # validations in a row (ProtoNet's early stopping, jakesnell/prototypical-networks
    # scripts/train/few_shot/train.py:99-114, patience 200 epochs); 0: never. The validation
    # records then carry the mean query loss ("loss").
    early_stop_patience: int = 0
    # A run trained with early_stop_patience: trainer.steps becomes that run's best validation
    # loss step + early_stop_patience validations of it (ProtoNet's retraining budget,
    # jakesnell/prototypical-networks scripts/train/few_shot/trainval.py: best epoch + patience),
    # for retraining with dataset.train_on_validation=true (metalearn/selection.py).
    steps_from: str | None = None
    # Multi-host: "auto" calls jax.distributed.initialize() when the environment describes
    # a multi-process job (SLURM with more than one task, or JAX_COORDINATOR_ADDRESS);
    # "on" always calls it, "off" never.
    distributed: str = "auto"

    @classmethod
    def check(cls, t: Any, cfg: Any) -> None:
        need(t.steps >= 0, "trainer.steps", t.steps, ">= 0")
        need(t.meta_batch_size >= 1, "trainer.meta_batch_size", t.meta_batch_size, ">= 1")
        need(t.log_every >= 1, "trainer.log_every", t.log_every, ">= 1")
        need(t.val_every >= 0, "trainer.val_every", t.val_every, ">= 0 (0 disables validation)")
        need(t.val_tasks >= 1, "trainer.val_tasks", t.val_tasks, ">= 1")
        need(t.checkpoint_every >= 0, "trainer.checkpoint_every", t.checkpoint_every, ">= 0")
        if t.tensorboard:  # checked here so a missing extra fails before any run dir is written
            import importlib.util

            need(
                importlib.util.find_spec("tensorboardX") is not None,
                "trainer.tensorboard",
                True,
                'false, or install the extra: pip install "metalearn[tensorboard]" (tensorboardX)',
            )
        need(t.keep_checkpoints >= 1, "trainer.keep_checkpoints", t.keep_checkpoints, ">= 1")
        one_of(t.on_nan, "trainer.on_nan", ("stop", "skip"))
        need(t.steps_per_call >= 0, "trainer.steps_per_call", t.steps_per_call, ">= 0 (0: automatic)")
        one_of(t.distributed, "trainer.distributed", ("auto", "on", "off"))
        patience = getattr(t, "early_stop_patience", 0)
        need(patience >= 0, "trainer.early_stop_patience", patience, ">= 0 (0: no early stopping)")
        need(
            not patience or t.val_every > 0,
            "trainer.early_stop_patience",
            patience,
            "0 with trainer.val_every=0 (early stopping watches the validation loss)",
        )


@dataclass
class EvalConfig:
    n_tasks: int = 600
    # Tasks adapted in parallel per jitted chunk (memory vs. speed).
    batch_size: int = 100
    # Query examples per class scored at evaluation (validation and test): the first
    # k_query of the dataset.k_query sampled (null: all). For training tasks with more
    # queries than the test protocol uses (Reptile's held-out examples).
    k_query: int | None = None
    split: str = "test"
    # Which parameters are tested (metalearn/selection.py): "last" (the final ones), "best"
    # (the checkpoint with the best validation metric) or "top_k" (the top_k checkpoints by
    # validation, each adapting to every task, their outputs averaged: MAML++'s test).
    # best and top_k checkpoint every validation step and keep those checkpoints.
    checkpoint: str = "last"
    top_k: int = 5
    # What best and top_k rank by: "metric" (validation accuracy or mse, as MAML++) or "loss"
    # (the validation query loss, as ProtoNet's best_model.pt; needs validation records with
    # a loss: trained with this setting or with trainer.early_stop_patience).
    rank_by: str = "metric"
    # How each test task is adapted (metalearn/adaptation.py): "algorithm" (its own rule),
    # "ncm_euclidean", "ncm_cosine", "linear_probe" (RFS), "finetune_head" or "finetune_all"
    # (Baseline); their steps, fine-tuning rate and the probe's penalty (1 / C of sklearn).
    adaptation: str = "algorithm"
    adaptation_steps: int = 100
    adaptation_lr: float = 0.01
    probe_l2: float = 1.0

    @classmethod
    def check(cls, e: Any, cfg: Any) -> None:
        need(e.n_tasks >= 2, "eval.n_tasks", e.n_tasks, ">= 2 (a confidence interval needs two tasks)")
        need(e.batch_size >= 1, "eval.batch_size", e.batch_size, ">= 1")
        k, k_query = e.k_query, cfg.dataset.k_query
        need(
            k is None or 1 <= k <= k_query,
            "eval.k_query",
            k,
            f">= 1 and <= dataset.k_query = {k_query}, or null",
        )
        one_of(e.split, "eval.split", ("train", "validation", "test"))
        one_of(getattr(e, "checkpoint", "last"), "eval.checkpoint", ("last", "best", "top_k"))
        need(getattr(e, "top_k", 5) >= 1, "eval.top_k", getattr(e, "top_k", 5), ">= 1")
        one_of(getattr(e, "rank_by", "metric"), "eval.rank_by", ("metric", "loss"))
        from metalearn.adaptation import check_adaptation

        check_adaptation(e, cfg)
        attack = getattr(cfg, "attack", None)
        if getattr(e, "checkpoint", "last") == "top_k" and attack is not None and attack.name != "none":
            raise ConfigError(
                f"invalid attack={attack.name} with eval.checkpoint=top_k: an attack on the averaged "
                "outputs of an ensemble is not implemented (use eval.checkpoint=best or last)"
            )


@dataclass
class AttackConfig:
    """Adversarial evaluation (conf/attack/): after clean adaptation, the query inputs are
    attacked against the adapted model. name: none, fgsm or pgd; L-inf radius eps;
    PGD: steps, step_size (null: 2.5 * eps / steps), random_start."""

    name: str = "none"
    eps: float = 0.1
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True

    @classmethod
    def check(cls, k: Any, cfg: Any) -> None:
        one_of(k.name, "attack.name", ("none", "fgsm", "pgd"))
        need(finite(k.eps) and k.eps >= 0, "attack.eps", k.eps, "finite and >= 0")
        need(k.steps >= 1, "attack.steps", k.steps, ">= 1")
        need(k.step_size is None or k.step_size > 0, "attack.step_size", k.step_size, "> 0 or null")


@dataclass
class PreprocessConfig:
    """How `metalearn predict` and cross-domain `metalearn eval` treat new images, on top of
    the run's recorded preprocessing (<run dir>/preprocessing.json; metalearn/preprocess.py).
    invert: "auto" (invert an image whose polarity differs from the training data's, e.g. black
    strokes on white for an Omniglot run; nothing for runs without a polarity), "true" (invert
    every image) or "false" (never)."""

    invert: str = "auto"

    @classmethod
    def check(cls, p: Any, cfg: Any) -> None:
        one_of(str(p.invert).lower(), "preprocess.invert", ("auto", "true", "false"))


@dataclass
class PaperConfig:
    """A published number an experiment preset (conf/experiment/) reproduces. Informational:
    copied into results.json and shown next to ours by `metalearn reproduce` / `report`.
    Empty (source "") for ad-hoc runs."""

    source: str = ""
    # "accuracy" or "mse", as in results.json; value/ci95 in the same units (accuracy as a
    # fraction, e.g. 0.987 for 98.7%).
    metric: str = ""
    value: float | None = None
    ci95: float | None = None
    note: str = ""


@dataclass
class LoggerConfig:
    """Where a run is tracked besides metrics.jsonl: ``logger=mlflow``, ``logger=wandb`` or
    both (``logger=[mlflow,wandb]``) fill ``mlflow`` / ``wandb`` with their schemas
    (metalearn/trackers.py); null: not used. ``logger=tensorboard`` sets trainer.tensorboard.
    group: the MLflow experiment and W&B group (null: the sweep dir of a multirun, else
    "metalearn")."""

    group: str | None = None
    mlflow: Any = None
    wandb: Any = None

    @classmethod
    def check(cls, section: Any, cfg: Any) -> None:
        for name, tracker in schemas("logger").items():
            if section.get(name) is not None:
                tracker.check(section[name], cfg)


@dataclass
class Config:
    # One schema per choice (SCHEMAS), set by the group's YAML (conf/algo/<name>.yaml, ...).
    algo: Any = MISSING
    dataset: Any = MISSING
    model: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    # Experiment trackers besides metrics.jsonl (conf/logger/, metalearn/trackers.py).
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # Set by experiment presets: the paper's reported result for this setting.
    paper: PaperConfig = field(default_factory=PaperConfig)
    seed: int = 0
    # For `metalearn eval`: the training run to load. Unused by `metalearn train`.
    run_dir: str | None = None
    # For `metalearn eval` and `predict`: how new images are preprocessed (see PreprocessConfig).
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    # For `metalearn predict`: the labelled examples (a folder with one subfolder per class, or
    # a CSV of x,y for regression) and what to classify (a folder, class subfolders, a file or
    # a list of files; a CSV of x for regression).
    support: str | None = None
    query: Any = None


# Groups with one schema each (the per-choice groups are in SCHEMAS).
SECTIONS = {
    "optim": OptimConfig,
    "trainer": TrainerConfig,
    "eval": EvalConfig,
    "attack": AttackConfig,
    "preprocess": PreprocessConfig,
    "logger": LoggerConfig,
}


def register_configs() -> None:
    """The root schema, and each choice's schema as ``<group>/<name>_schema``."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group in SCHEMAS:
        for name, cls in schemas(group).items():
            cs.store(group=group, name=f"{name}_schema", node=cls(name=name))


def section_config(group: str, values: dict[str, Any]) -> Any:
    """A struct DictConfig of ``group``'s schema for ``values["name"]`` with ``values`` on top
    (for configs built in code: tests, stored runs)."""
    from omegaconf import OmegaConf

    cls = schemas(group)[values["name"]]
    node = OmegaConf.merge(OmegaConf.structured(cls(name=values["name"])), values)
    OmegaConf.set_struct(node, True)
    return node


# Keys renamed since the flat config (runs made before load under the new name):
# "group.old_key" -> "group.new_key". None so far: the per-choice schemas kept every name.
RENAMED_KEYS: dict[str, str] = {}


def from_stored(stored: dict[str, Any]) -> Any:
    """A struct Config from a run's stored config (``.hydra/config.yaml`` as a dict), also one
    written by a release with the flat algo/dataset/model sections: renamed keys are mapped
    (:data:`RENAMED_KEYS`) and a key the run's algorithm, dataset or model does not have is
    dropped (those releases kept every key in every run, and the choice never read the
    others)."""
    from omegaconf import OmegaConf

    stored = {k: (dict(v) if isinstance(v, dict) else v) for k, v in stored.items()}
    for old, new in RENAMED_KEYS.items():
        (group, old_key), (_, new_key) = old.split(".", 1), new.split(".", 1)
        if old_key in stored.get(group, {}):
            stored[group][new_key] = stored[group].pop(old_key)
    sections = {}
    for group in CHOICE_GROUPS:
        values = stored.pop(group)
        fields = schemas(group)[values["name"]].__dataclass_fields__
        sections[group] = section_config(group, {k: v for k, v in values.items() if k in fields})
    cfg = OmegaConf.merge(OmegaConf.structured(Config), stored)
    for group, section in sections.items():
        cfg[group] = section
    OmegaConf.set_struct(cfg, True)
    return cfg


def validate(cfg: Any) -> None:
    """Range-check a composed config; raise ConfigError naming the first bad key.

    Each group checks its own keys (the schemas' ``check``), then the rules between groups.
    """
    from omegaconf import OmegaConf

    for group in CHOICE_GROUPS:
        name = cfg[group].name
        one_of(name, f"{group}.name", sorted(schemas(group)))
        kind = OmegaConf.get_type(cfg[group])
        if kind not in (dict, schemas(group)[name]):  # a typed section of another choice
            need(False, f"{group}.name", name, f"the choice's own: use {group}={name} (it picks the schema)")
        schemas(group)[name].check(cfg[group], cfg)
    for group, cls in SECTIONS.items():
        if group in cfg:  # preprocess and attack are absent from hand-built configs of older code
            cls.check(cfg[group], cfg)
    _check_across_groups(cfg)


def _check_across_groups(cfg: Any) -> None:
    """Rules that tie an algorithm, a dataset and a model together."""
    from metalearn.algos import METRIC_ALGOS

    a, d, m = cfg.algo, cfg.dataset, cfg.model
    regression = d.name == "sinusoid"
    if a.name in METRIC_ALGOS:
        need(
            not regression,
            "algo.name",
            a.name,
            f"an algorithm that can regress for dataset=sinusoid ({a.name} classifies by distances to "
            "class prototypes: use an image dataset)",
        )
    n_way_train = d.get("n_way_train")
    if n_way_train is not None:
        need(
            a.name in METRIC_ALGOS,
            "dataset.n_way_train",
            n_way_train,
            f"null for algo={a.name} (its output layer has dataset.n_way units); only "
            f"{' and '.join(METRIC_ALGOS)} train on more ways than they test",
        )
    for key in ("inner_loss", "outer_loss"):
        if a.get(key) == "sum_over_shots":
            need(
                not regression,
                f"algo.{key}",
                a[key],
                "mean for regression (sum_over_shots divides a cross-entropy by the shots per class)",
            )
    if d.get("train_on_validation"):
        for key, value, wanted in (
            ("trainer.val_every", cfg.trainer.val_every, 0),
            ("trainer.early_stop_patience", cfg.trainer.get("early_stop_patience", 0), 0),
            ("eval.checkpoint", cfg.eval.get("checkpoint", "last"), "last"),
            ("eval.split", cfg.eval.split, "test" if cfg.eval.split == "validation" else cfg.eval.split),
        ):
            need(
                value == wanted,
                key,
                value,
                f"{wanted} with dataset.train_on_validation=true (validation classes are training classes)",
            )
    if regression:
        need(m.name == "mlp", "model", m.name, "mlp for dataset=sinusoid (images need conv4 or resnet12)")
    else:
        need(m.name != "mlp", "model", m.name, "conv4 or resnet12 for image datasets")
        if m.name == "resnet12":
            stages = len(m.channels)
            need(
                d.image_size >= 2**stages,
                "dataset.image_size",
                d.image_size,
                f">= {2**stages} for resnet12 (each of its {stages} stages halves the size)",
            )
