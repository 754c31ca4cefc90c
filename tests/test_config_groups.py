"""The per-choice config groups: each algorithm, dataset and model has exactly the keys it reads
(its schema), and a key of another choice is refused in one line naming the choices that have it,
exit 2, before anything is written (``metalearn train algo=maml algo.lam=5``)."""

from __future__ import annotations

import contextlib
import io

import pytest
from conftest import make_cfg
from omegaconf import OmegaConf

from metalearn import cli
from metalearn.config import SCHEMAS, from_stored, register_configs, schemas, validate
from metalearn.errors import ConfigError

register_configs()

ALGOS = sorted(schemas("algo"))
# A value of the right type for each key, so only the key's owner decides.
_VALUES = {bool: "true", int: "3", float: "0.5", str: "mean"}


def _value(cls: type, key: str) -> str:
    field = cls.__dataclass_fields__[key]
    for kind, text in _VALUES.items():
        if kind.__name__ in str(field.type):
            return text
    return "null"


def _precheck(*overrides: str) -> tuple[int, str]:
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.precheck("config", list(overrides), multirun=False)
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


def _dataset_for(algo: str) -> list[str]:
    return ["dataset=omniglot"] if algo in ("protonet", "protomaml", "pretrain") else []


def _foreign(algo: str) -> list[str]:
    own = set(schemas("algo")[algo].__dataclass_fields__)
    return sorted({k for cls in schemas("algo").values() for k in cls.__dataclass_fields__} - own)


# Every (algorithm, foreign key) pair in the slow tier; the default run checks each
# algorithm's first two (each check composes the config twice).
@pytest.mark.parametrize(
    ("algo", "every_key"),
    [
        pytest.param(a, every, marks=pytest.mark.slow if every else ())
        for a in ALGOS
        for every in (False, True)
    ],
)
def test_keys_of_other_algorithms_are_refused_in_one_line(algo, every_key, tmp_path):
    foreign = _foreign(algo)
    assert foreign, algo
    for key in foreign if every_key else foreign[:2]:
        owner_cls = next(c for c in schemas("algo").values() if key in c.__dataclass_fields__)
        code, err = _precheck(f"algo={algo}", *_dataset_for(algo), f"algo.{key}={_value(owner_cls, key)}")
        assert code == 2, (algo, key, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        owners = sorted(n for n, c in schemas("algo").items() if key in c.__dataclass_fields__)
        assert (
            f"invalid algo.{key}: algo={algo} has no key {key!r} (algos that have it: {', '.join(owners)})"
            in lines[0]
        )
    assert not list(tmp_path.iterdir())


def test_own_keys_are_accepted():
    """The refusal above is about ownership: the owner composes and validates with the key."""
    code, err = _precheck("algo=imaml", "algo.lam=5", "hydra.run.dir=/nonexistent/never")
    assert "algo.lam" not in err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["dataset.rotations=false"],
            "dataset=sinusoid has no key 'rotations' (datasets that have it: omniglot)",
        ),
        (
            ["dataset=omniglot", "model.hidden=[3]"],
            "model=conv4 has no key 'hidden' (models that have it: mlp)",
        ),
        (["model.filters=3"], "model=mlp has no key 'filters' (models that have it: conv4)"),
    ],
)
def test_keys_of_other_datasets_and_models_are_refused(overrides, message):
    code, err = _precheck(*overrides)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_every_schema_default_is_written_once():
    """Each key has one default, in its schema: the schemas of one group agree on the default
    of a key they share (a shared base class holds it)."""
    for group in SCHEMAS:
        defaults: dict[str, object] = {}
        for name, cls in schemas(group).items():
            node = OmegaConf.to_container(OmegaConf.structured(cls(name=name)))
            for key, value in node.items():
                if key == "name" or (
                    group == "dataset" and key in ("n_way", "k_shot", "k_query", "image_size")
                ):
                    continue  # the episode shape's defaults differ by kind (regression, images)
                assert defaults.setdefault(key, value) == value, (group, name, key)


def test_a_flat_config_of_an_earlier_release_loads_without_foreign_keys():
    flat = {
        "algo": {"name": "protonet", "inner_lr": 0.4, "lam": 2.0, "inner_steps_test": 3},
        "dataset": {
            "name": "sinusoid",
            "n_way": 1,
            "k_shot": 5,
            "k_query": 5,
            "rotations": True,
            "variant": "x",
        },
        "model": {"name": "mlp", "hidden": [8], "filters": 64},
        "seed": 4,
    }
    cfg = from_stored(flat)
    assert OmegaConf.to_container(cfg.algo) == {"name": "protonet", "joint_bn": False}
    assert "rotations" not in cfg.dataset and cfg.dataset.k_shot == 5
    assert OmegaConf.to_container(cfg.model) == {
        "name": "mlp",
        "compute_dtype": "float32",
        "init_from": None,
        "init_head": "random",
        "hidden": [8],
    }
    assert cfg.seed == 4


def test_group_checks_run_from_validate():
    with pytest.raises(Exception, match=r"invalid algo.lam=-1.0: must be > 0"):
        validate(make_cfg(algo={"name": "imaml", "lam": -1.0}))
    with pytest.raises(Exception, match=r"invalid model.conv_impl='x'"):
        validate(make_cfg(dataset={"name": "omniglot"}, model={"name": "conv4", "conv_impl": "x"}))
    with pytest.raises(Exception, match=r"invalid model.pool_impl='x'"):
        validate(make_cfg(dataset={"name": "omniglot"}, model={"name": "resnet12", "pool_impl": "x"}))


@pytest.mark.parametrize(
    "algo,needle",
    [
        ({"name": "caml", "context_size": 0}, "algo.context_size"),
        ({"name": "reptile", "inner_optimizer": "rmsprop"}, "algo.inner_optimizer"),
        ({"name": "reptile", "inner_batch_size": -1}, "algo.inner_batch_size"),
    ],
)
def test_new_algo_config_range_checks_name_the_key(algo, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(make_cfg(algo=algo))


# Every image dataset with every image model: the dataset's per-model keys (Conv4's filters and
# downsampling, conf/dataset_model/) must not reach a model that lacks them.
@pytest.mark.parametrize(
    "dataset", ["omniglot", "mini_imagenet", "cifar_fs", "fc100", "image_folder", "tfds", "multi"]
)
@pytest.mark.parametrize("model", ["conv4", "resnet12"])
def test_every_image_dataset_composes_with_every_image_model(dataset, model):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=cli.config_dir(), version_base=None):
        cfg = compose("config", overrides=[f"dataset={dataset}", f"model={model}", "algo=protonet"])
    assert cfg.model.name == model
    if model == "conv4" and dataset != "omniglot":
        assert cfg.model.downsample == "maxpool"
        assert cfg.model.filters == (64 if dataset in ("cifar_fs", "fc100") else 32)
