"""The Meta-Dataset presets (conf/experiment/*_metadataset_*.yaml, docs/episodes.md): their
episode rule and protocol are the paper's, their algorithm values the authors' from-scratch
configs', and a run without the sources' files stops at once, naming every missing source.
Values from github.com/google-research/meta-dataset at 87a478a (meta_dataset/learn/gin/)."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_OMNIGLOT, run_cli_in_process
from hydra import compose, initialize_config_dir

from metalearn.cli import config_dir
from metalearn.config import register_configs
from metalearn.episodes import MAX_QUERY, MAX_SUPPORT, MAX_WAYS, MIN_WAYS, bounds_of

pytestmark = pytest.mark.usefixtures("no_network")

ALL = ("protonet_metadataset_all", "protomaml_metadataset_all")
OMNIGLOT = ("protonet_metadataset_omniglot", "protomaml_metadataset_omniglot")
# setups/all_datasets.gin:1, in its order.
TRAIN_SOURCES = ["ilsvrc_2012", "aircraft", "cu_birds", "omniglot", "quickdraw", "vgg_flower", "dtd", "fungi"]
NEED_FOLDERS = [s for s in TRAIN_SOURCES if s != "omniglot"]


def _compose(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("name", ALL + OMNIGLOT)
def test_protocol_is_the_papers(name):
    cfg = _compose([f"experiment={name}"])
    d = cfg.dataset
    assert d.name == "multi" and d.episodes == "variable"
    # setups/data_config_common.gin:6-9, the constants metalearn/episodes.py samples with.
    assert bounds_of(d) == {"min_ways": 5, "max_ways": 50, "max_support": 500, "max_query": 10}
    assert bounds_of(d) == {
        "min_ways": MIN_WAYS,
        "max_ways": MAX_WAYS,
        "max_support": MAX_SUPPORT,
        "max_query": MAX_QUERY,
    }
    # best/*_all_from_scratch.gin DataConfig.image_height = 126, RGB.
    assert (d.image_size, d.channels) == (126, 3)
    # setups/trainer_config.gin:1-5; one episode per update; the best validation checkpoint.
    t = cfg.trainer
    trainer = (t.steps, t.meta_batch_size, t.val_every, t.val_tasks, t.checkpoint_every)
    assert trainer == (75000, 1, 500, 600, 500)
    assert (cfg.eval.n_tasks, cfg.eval.checkpoint) == (600, "best")
    # trainer.py:493-500: Adam, staircase exponential decay; queries normalised with the
    # support set's moments (trainer_config.gin:7).
    assert (cfg.optim.name, cfg.optim.schedule) == ("adam", "step")
    assert (cfg.model.name, cfg.model.bn_stats, cfg.model.bn_epsilon) == ("resnet12", "support", 1e-5)
    for source in d.sources:
        assert source.get("weight", 1) == 1  # sources drawn uniformly (data/pipeline.py:405-406)


@pytest.mark.parametrize("name", ALL)
def test_all_presets_list_the_papers_training_sources(name):
    sources = _compose([f"experiment={name}"]).dataset.sources
    assert [s.label for s in sources] == TRAIN_SOURCES
    for s in sources:
        if s.label == "omniglot":
            assert (s.name, s.variant, s.rotations) == ("omniglot", "standard", False)
        else:
            assert (s.name, s.path) == ("image_folder", None)


def test_algorithm_values_are_the_from_scratch_configs():
    # best/prototypical_all_from_scratch.gin:13-17.
    cfg = _compose(["experiment=protonet_metadataset_all"])
    o = cfg.optim
    assert cfg.algo.name == "protonet"
    assert (o.lr, o.decay_every, o.decay_rate, o.weight_decay) == (
        0.0006229660387662655,
        2500,
        0.8333411536286996,
        0.00018036259587809225,
    )
    # best/maml_init_with_proto_all_from_scratch.gin:10-13, :19-23.
    cfg = _compose(["experiment=protomaml_metadataset_all"])
    a, o = cfg.algo, cfg.optim
    assert (a.name, a.first_order, a.inner_lr, a.inner_steps, a.inner_steps_test) == (
        "protomaml",
        True,
        0.01139772733084185,
        1,
        6,
    )
    assert (o.lr, o.decay_every, o.decay_rate, o.weight_decay) == (
        0.0007252750256444753,
        10000,
        0.6731268939317062,
        0.00005323094246436839,
    )
    # The Omniglot variants differ from their all-sources preset in the sources only.
    for name in OMNIGLOT:
        small = _compose([f"experiment={name}"])
        full = _compose([f"experiment={name.replace('_omniglot', '_all')}"])
        assert [dict(s) for s in small.dataset.sources] == [
            {
                "name": "omniglot",
                "label": "omniglot",
                "variant": "small",
                "split": "alphabets",
                "rotations": False,
                "manual_dir": None,
            }
        ]
        for group in ("algo", "optim", "model", "trainer", "eval"):
            assert small[group] == full[group], (name, group)


def test_full_preset_without_files_names_every_missing_source(tmp_path):
    run_dir = tmp_path / "run"
    run = f"hydra.run.dir={run_dir}"
    code, _, err = run_cli_in_process("train", "experiment=protonet_metadataset_all", run)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "7 source(s) without their files" in lines[0]
    for index, label in enumerate(TRAIN_SOURCES):
        named = f"{label} (dataset.sources.{index}.path=None)" in lines[0]
        assert named == (label in NEED_FOLDERS), label
    assert not run_dir.exists()
    # A source given its folder is no longer named; the others still are, in the same line.
    code, _, err = run_cli_in_process(
        "train", "experiment=protomaml_metadataset_all", f"dataset.sources.0.path={tmp_path}", run
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "6 source(s)" in lines[0] and "ilsvrc_2012" not in lines[0] and "fungi" in lines[0]
    # With every path given, one that is not a folder is the source's own one-line error.
    paths = [f"dataset.sources.{i}.path={tmp_path}" for i, s in enumerate(TRAIN_SOURCES) if s in NEED_FOLDERS]
    paths[0] = f"dataset.sources.0.path={tmp_path / 'nowhere'}"
    code, _, err = run_cli_in_process("train", "experiment=protonet_metadataset_all", *paths, run)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert f"invalid dataset.sources[0].path='{tmp_path / 'nowhere'}'" in lines[0]
    assert not run_dir.exists()


@pytest.mark.slow
def test_omniglot_variant_trains_and_reports_per_source(tmp_path):
    """protomaml_metadataset_omniglot on the real "background small" archives, 3 steps with a
    tiny ResNet-12 and tiny episode bounds: results.json holds the source's own results."""
    if not SHARED_OMNIGLOT.is_dir():
        pytest.skip("shared Omniglot archives not present")
    run_dir = tmp_path / "run"
    code, out, err = run_cli_in_process(
        "train",
        "experiment=protomaml_metadataset_omniglot",
        f"dataset.sources.0.manual_dir={SHARED_OMNIGLOT}",
        f"dataset.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={run_dir}",
        "model.channels=[4,6]",
        "dataset.image_size=28",
        "dataset.max_ways=5",
        "dataset.max_support=10",
        "dataset.max_query=2",
        "trainer.steps=3",
        "trainer.val_every=3",
        "trainer.checkpoint_every=3",
        "trainer.val_tasks=2",
        "trainer.progress=false",
        "eval.n_tasks=2",
    )
    assert code == 0, err
    results = json.loads((run_dir / "results.json").read_text())
    test = results["test"]
    assert list(test["sources"]) == ["omniglot"]
    assert test["sources"]["omniglot"]["n_tasks"] == 2 and test["n_tasks"] == 2
    assert test["mean"] == test["sources"]["omniglot"]["mean"]
    assert results["paper"]["source"].startswith("Triantafillou et al. 2020")
