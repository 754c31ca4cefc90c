"""The config of `metalearn eval` and `metalearn predict`: a training run's stored config with
the command line's overrides on top, checked against what the run's model can take.

Only single keys may change (``algo.inner_steps_test=10``), plus two groups: ``attack=`` (an
adversarial evaluation, not part of the trained run) and, for `eval`, ``dataset=`` (cross-domain
evaluation: the test classes of another dataset). A cross-domain dataset keeps the run's
episode shape (``n_way``, ``k_shot``, ``k_query``) and input size unless given, and its data
directory unless given. Every mismatch between the request and the trained model (a head of
another size, an input size or channel count the model cannot take, a regression run asked to
classify) is one line naming the key, before anything is read or written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from metalearn.errors import ConfigError, DataError

# Groups whose choice is the trained run's and cannot change afterwards.
_FIXED_GROUPS = ("algo", "model", "optim", "experiment", "algo_dataset")


class RunConfig(NamedTuple):
    cfg: Any  # the run's config with the overrides applied; run_dir set
    train_dataset: Any  # the run's own dataset section (as trained)
    cross_domain: bool  # evaluating on data other than the run's own
    record: dict  # the run's preprocessing record (metalearn.preprocess)
    record_note: str | None  # set when the record was derived (the run has none)
    # The run's own model.bn_stats (eval and predict may override it; only a run trained with
    # "running" has running averages). None for a model without BatchNorm.
    trained_bn_stats: str | None = None


def _load_stored(run_dir: Path) -> Any:
    from omegaconf import OmegaConf

    from metalearn.config import from_stored
    from metalearn.rundir import load_run_config

    loaded = load_run_config(run_dir)
    try:
        return from_stored(OmegaConf.to_container(loaded))
    except Exception as err:  # OmegaConf validation errors are multi-line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(
            f"{run_dir / '.hydra' / 'config.yaml'} does not fit metalearn's config ({first}): restore it "
            "from a copy of the run, or train again"
        ) from None


def _input_text(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def resolve(run_dir: str | Path, overrides: list[str], composed: Any, command: str) -> RunConfig:
    """The config for ``command`` ("eval" or "predict") on ``run_dir``.

    ``overrides``: the command line's (``key=value``); ``composed``: the config Hydra composed
    from them (it supplies a newly chosen ``attack`` or ``dataset`` group with its defaults).
    ConfigError (one line, naming the key) for anything the run's model cannot take.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from metalearn.config import section_config, validate
    from metalearn.preprocess import invert_setting, load_record

    run_dir = Path(run_dir)
    stored = _load_stored(run_dir)
    train_dataset = OmegaConf.create(OmegaConf.to_container(stored.dataset))
    record, note = load_record(run_dir, stored)
    trained_bn_stats = getattr(stored.model, "bn_stats", None)
    parsed = OverridesParser.create().parse_overrides(
        [o for o in overrides if not o.startswith("hydra.") and not o.startswith("hydra/")]
    )
    explicit = {o.get_key_element() for o in parsed}
    group_dataset = "dataset" in explicit
    if group_dataset and command != "eval":
        raise ConfigError(
            f"cannot change config group 'dataset' in {command}: the support set gives the data"
        )
    for override in parsed:
        key = override.get_key_element()
        if key in ("run_dir", "support", "query"):
            continue
        if key == "attack":
            # Not part of the trained run: take the composed group (with attack.* applied).
            stored.attack = composed.attack
            continue
        if key == "dataset" or (group_dataset and key.startswith("dataset.")):
            continue  # the composed dataset section below holds the group and its keys
        if "." not in key:
            hint = (
                "; for another dataset use dataset=<name> (cross-domain evaluation)"
                if command == "eval"
                else ""
            )
            raise ConfigError(
                f"cannot change config group {key!r} in {command}: the run's own "
                f"{'settings are' if key in _FIXED_GROUPS else 'config is'} used; override single keys "
                f"(e.g. algo.inner_steps_test=10){hint}"
            )
        if command == "predict" and key.startswith("dataset."):
            raise ConfigError(
                f"cannot set {key} in predict: the support folder gives the classes and the run's "
                "recorded preprocessing gives the input"
            )
        OmegaConf.update(stored, key, override.value(), merge=True)
    stored.run_dir = str(run_dir)
    if command == "predict":
        stored.support, stored.query = composed.support, composed.query

    regression = record["kind"] == "regression"
    if group_dataset:
        new = section_config("dataset", OmegaConf.to_container(composed.dataset))
        for key in ("n_way", "k_shot", "k_query"):
            if f"dataset.{key}" not in explicit:
                new[key] = train_dataset[key]
        if "dataset.data_dir" not in explicit and new.get("data_dir", 0) is None:
            new.data_dir = train_dataset.get("data_dir")
        if not regression and new.name != "sinusoid":
            h, _, c = record["input_shape"]
            if "dataset.image_size" not in explicit and new.name not in ("cifar_fs", "fc100"):
                new.image_size = int(h)  # those two are 32x32 by definition; resized after loading
            if "dataset.channels" not in explicit and new.name == "image_folder":
                new.channels = int(c)
        stored.dataset = new
    cross = not regression and (group_dataset or stored.dataset.name != train_dataset.name)
    if not cross and stored.dataset.name == "image_folder":
        cross = str(stored.dataset.path) != str(train_dataset.path)

    d = stored.dataset
    if regression != (d.name == "sinusoid"):
        trained = (
            "a sinusoid regression model" if regression else f"an image classifier ({train_dataset.name})"
        )
        raise ConfigError(
            f"invalid dataset.name={d.name!r}: the run is {trained} and cannot be evaluated on it"
        )
    if not regression:
        head = int(record.get("outputs") or train_dataset.n_way)
        if int(d.n_way) != head:
            raise ConfigError(
                f"the run's head has {head} outputs but dataset.n_way={d.n_way}: a trained model "
                f"classifies exactly as many ways as it was trained for (use dataset.n_way={head})"
            )
        h, _, c = (int(v) for v in record["input_shape"])
        fixed_size = d.name in ("cifar_fs", "fc100") and cross  # resized to the run's size after loading
        if int(d.image_size) != h and not fixed_size:
            raise ConfigError(
                f"the run's model takes {_input_text(record['input_shape'])} inputs but "
                f"dataset.image_size={d.image_size}"
                + (
                    " (leave it unset: images of another dataset are resized to the run's size)"
                    if cross
                    else ""
                )
            )
        if d.name == "image_folder" and int(d.channels) != c:
            raise ConfigError(
                f"the run's model takes {_input_text(record['input_shape'])} inputs ({c} channel(s)) but "
                f"dataset.channels={d.channels}"
            )
    if cross and stored.eval.split != "test":
        raise ConfigError(
            f"invalid eval.split={stored.eval.split!r}: on another dataset only its test classes are "
            "evaluated (eval.split=test)"
        )
    invert_setting(stored.preprocess.invert)
    if getattr(stored.model, "bn_stats", None) == "running" and trained_bn_stats != "running":
        raise ConfigError(
            f"invalid model.bn_stats='running': the run was trained with model.bn_stats={trained_bn_stats}, "
            "so its checkpoint holds no running averages (use batch or support, or train with running)"
        )
    if command == "predict":
        # predict never reads the training data: check everything but where that data is.
        check = OmegaConf.create(OmegaConf.to_container(stored))
        if "manual_dir" in check.dataset:
            check.dataset.manual_dir = None
        if check.dataset.name == "image_folder":
            check.dataset.path = str(run_dir)
        validate(check)
    else:
        validate(stored)
    return RunConfig(stored, train_dataset, cross, record, note, trained_bn_stats)


def check_predict_paths(cfg: Any) -> None:
    """ConfigError unless ``support`` and ``query`` are given and exist."""
    if cfg.support is None or not str(cfg.support).strip():
        raise ConfigError("support is required: metalearn predict run_dir=R support=DIR query=PATH")
    if cfg.query is None or (isinstance(cfg.query, str) and not cfg.query.strip()):
        raise ConfigError("query is required: metalearn predict run_dir=R support=DIR query=PATH")
    if not Path(str(cfg.support)).expanduser().exists():
        raise ConfigError(f"invalid support={cfg.support!r}: no such file or directory")
    queries = list(cfg.query) if not isinstance(cfg.query, str) else [cfg.query]
    for q in queries:
        if not Path(str(q)).expanduser().exists():
            raise ConfigError(f"invalid query={str(q)!r}: no such file or directory")
