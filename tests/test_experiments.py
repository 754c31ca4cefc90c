"""Every experiment preset (conf/experiment/*.yaml) composes, records a paper number's
fields, and trains a couple of steps (the default run trains one preset per algorithm, the
slow tier the rest). New presets are picked up by the glob, no edit needed.

Runs in-process (Hydra compose + train()) with shrunken models and budgets, so each preset
costs about a compile, not a training run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, SHARED_OMNIGLOT
from hydra import compose, initialize_config_dir

from metalearn.cli import config_dir
from metalearn.config import register_configs, validate
from metalearn.train import train

# Preset names spell datasets without underscores: <algo>_<dataset>_<setting>.
DATASET_NAMES = {"miniimagenet": "mini_imagenet", "metadataset": "multi"}
PRESETS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def _pair(name: str) -> tuple[str, str]:
    """(algorithm, dataset) of a preset named <algo>_<dataset>_<setting>."""
    algo, dataset = name.split("_")[:2]
    return algo, DATASET_NAMES.get(dataset, dataset)


def _training_params() -> list:
    """Every preset trains; the default run trains the first preset of each algorithm and
    leaves the others (other datasets and settings of the same algorithm) to the slow tier
    (`pytest -m slow`, run in CI). Every preset composes and validates in the default run
    (test_preset_composes_and_validates), and every dataset trains there in other tests."""
    seen: set[str] = set()
    params = []
    for name in PRESETS:
        # The Meta-Dataset presets (dataset=multi) train in the slow tier: they sort before
        # their algorithm's other presets, which stay the ones the default run trains.
        first = _pair(name)[0] not in seen and _pair(name)[1] != "multi"
        seen.add(_pair(name)[0])
        params.append(pytest.param(name, marks=() if first else pytest.mark.slow))
    return params


# Shrink everything that costs time but keep each preset's algorithm, inner loop and task
# shape (n_way, k_shot, inner steps), which is what a broken preset would get wrong.
TINY = [
    "trainer.steps=2",
    "trainer.meta_batch_size=2",
    "trainer.log_every=1",
    "trainer.val_every=0",
    "trainer.checkpoint_every=0",
    "trainer.progress=false",
    # No validation, so the final parameters (the MAML++ presets test a validation ensemble).
    "eval.checkpoint=last",
    "eval.n_tasks=2",
    "eval.batch_size=2",
]
# The conv presets' network shrunk too (the sinusoid presets' MLP has no such keys).
TINY_CONV = ["model.filters=4", "model.blocks=1"]
# The ResNet-12 presets' network (named *_resnet12): two thin stages.
TINY_RESNET = ["model.channels=[4,6]"]


def _tiny_model(name: str, dataset: str) -> list[str]:
    if dataset == "sinusoid":
        return []
    # The Meta-Dataset presets (dataset=multi) use ResNet-12 too.
    return TINY_RESNET if name.endswith("_resnet12") or dataset == "multi" else TINY_CONV


def _compose(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="module")
def omniglot_cache(tmp_path_factory) -> Path:
    """One TFDS cache for all Omniglot presets of this module (built once)."""
    return tmp_path_factory.mktemp("omniglot_data")


def test_presets_exist():
    required = {
        "maml_sinusoid_k5",
        "maml_sinusoid_k10",
        *(f"{a}_omniglot_{s}" for a in ("maml", "fomaml") for s in ("5w1s", "5w5s", "20w1s", "20w5s")),
        "maml_miniimagenet_5w1s",
        "maml_miniimagenet_5w5s",
        "caml_sinusoid_k10",
        "caml_miniimagenet_5w1s",
    }
    assert required <= set(PRESETS)


def test_bases_are_not_presets_and_each_is_used():
    """conf/experiment/base/ holds the settings presets share; the glob above is top-level
    only, so no base is taken for a preset, and a base no preset (or base) includes is dead."""
    experiment = REPO / "conf" / "experiment"
    bases = {p.stem for p in (experiment / "base").glob("*.yaml")}
    assert bases and not bases & set(PRESETS)
    texts = [p.read_text() for p in experiment.rglob("*.yaml")]
    for base in bases:
        assert any(f"- base/{base}\n" in t or f"  - {base}\n" in t for t in texts), f"base {base} unused"
        # Each base cites its source in its header comment.
        header = (experiment / "base" / f"{base}.yaml").read_text().split("\n\n")[0]
        assert "github.com/" in header or "base/" in header, f"base {base}: no source named"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_validates(name, tmp_path):
    cfg = _compose([f"experiment={name}"])
    if _pair(name)[1] == "multi":
        # The Meta-Dataset presets' image-folder sources have no path until the user gives
        # their files (refused, all named in one line: tests/test_metadataset_presets.py);
        # any existing folder lets the rest of the config validate.
        for source in cfg.dataset.sources:
            if source.name == "image_folder":
                source.path = str(tmp_path)
    validate(cfg)
    assert cfg.paper.source, f"{name}: paper.source is empty"
    assert cfg.paper.metric in ("accuracy", "mse")
    # The preset's own algorithm and dataset are selected (names are <algo>_<dataset>_...).
    assert (cfg.algo.name, cfg.dataset.name) == _pair(name)


@pytest.mark.parametrize("name", _training_params())
def test_preset_trains(name, tmp_path, omniglot_cache, request):
    dataset = _pair(name)[1]
    overrides = [f"experiment={name}", *TINY, *_tiny_model(name, dataset)]
    if dataset == "omniglot":
        if not SHARED_OMNIGLOT.is_dir():
            pytest.skip("shared Omniglot archives not present")
        # Only the "small" archives exist on the development machines; the presets' named
        # splits (vinyals, mamlpp) need the full ones, so the small runs use the random split.
        overrides += [
            "dataset.variant=small",
            "dataset.split=null",
            f"dataset.manual_dir={SHARED_OMNIGLOT}",
            f"dataset.data_dir={omniglot_cache}",
        ]
    if dataset == "multi":
        if not SHARED_OMNIGLOT.is_dir():
            pytest.skip("shared Omniglot archives not present")
        # The Meta-Dataset presets' sources, but Omniglot small (the one present here), with
        # small images and episode bounds.
        overrides += [
            f"dataset.sources=[{{name:omniglot,variant:small,manual_dir:'{SHARED_OMNIGLOT}'}}]",
            f"dataset.data_dir={omniglot_cache}",
            "dataset.image_size=28",
            "dataset.max_ways=5",
            "dataset.max_support=10",
            "dataset.max_query=2",
        ]
    if dataset == "mini_imagenet":
        # Synthetic pickles in the real format, scaled to 6/5/5 classes of 20 images.
        manual, data = request.getfixturevalue("scaled_mini_imagenet")
        overrides += [f"dataset.manual_dir={manual}", f"dataset.data_dir={data}", "dataset.k_query=3"]
        overrides += ["dataset.n_way_train=null"]  # the scaled split has 6 training classes
    cfg = _compose(overrides)
    results = train(cfg, tmp_path / "run")
    assert results["test"]["metric"] == cfg.paper.metric
    assert results["paper"]["source"] == cfg.paper.source
    assert json.loads((tmp_path / "run" / "results.json").read_text())["paper"]["value"] == cfg.paper.value


def test_preset_order_dataset_then_preset_then_command_line():
    # The omniglot dataset default is 5-way 1-shot with 2500 steps; the preset sets 20-way
    # and 60k steps; the command line wins over both.
    cfg = _compose(["experiment=maml_omniglot_20w1s"])
    assert (cfg.dataset.n_way, cfg.trainer.steps, cfg.algo.inner_lr, cfg.model.name) == (
        20,
        60000,
        0.1,
        "conv4",
    )
    cfg = _compose(["experiment=maml_omniglot_20w1s", "trainer.steps=7", "algo.inner_lr=0.2"])
    assert (cfg.dataset.n_way, cfg.trainer.steps, cfg.algo.inner_lr) == (20, 7, 0.2)
    # A preset selecting algo=reptile still gets conf/algo_dataset/reptile_omniglot.yaml
    # (the interpolated group follows the preset's override).
    cfg = _compose(["experiment=reptile_omniglot_5w1s"])
    assert (cfg.optim.name, cfg.algo.inner_optimizer, cfg.trainer.steps) == ("sgd", "adam", 100000)


def test_presets_do_not_inherit_the_cpu_budgets_of_algo_dataset():
    # conf/algo_dataset/<algo>_omniglot.yaml holds CPU defaults (more training ways, cosine
    # lr, clipping, iMAML's 10 inner steps and 5 queries per class) that a paper preset must
    # not pick up silently.
    cfg = _compose(["experiment=protomaml_omniglot_5w1s"])
    assert (cfg.dataset.n_way_train, cfg.optim.schedule, cfg.algo.inner_lr) == (None, "constant", 0.4)
    for name, steps in (("imaml_omniglot_5w1s", 16), ("imaml_omniglot_20w1s", 25)):
        cfg = _compose([f"experiment={name}"])
        pinned = (
            cfg.dataset.k_query,
            cfg.algo.inner_steps,
            cfg.optim.schedule,
            cfg.optim.clip_norm,
            cfg.trainer.steps,
        )
        assert pinned == (1, steps, "constant", None, 20000)
    # while the defaults themselves apply without a preset
    cfg = _compose(["algo=imaml", "dataset=omniglot"])
    assert (cfg.dataset.k_query, cfg.algo.inner_steps, cfg.optim.schedule, cfg.trainer.steps) == (
        5,
        10,
        "cosine",
        4000,
    )


def test_no_preset_means_empty_paper():
    cfg = _compose([])
    assert cfg.paper.source == "" and cfg.paper.value is None
