"""model.init_from / model.init_head (metalearn/backbone.py): the backbone of another run is
loaded bit for bit into every algorithm's initial parameters, the head starts by the chosen
rule, the source is recorded, and a mismatched architecture is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import make_cfg, run_cli_in_process
from omegaconf import OmegaConf
from PIL import Image

from metalearn.backbone import source_backbone, tie_head_gradient
from metalearn.checkpoint import load_checkpoint
from metalearn.step import init_state, setup
from metalearn.train import open_run, train


def write_images(root: Path, n_classes: int = 8, per_class: int = 5, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        (root / f"c{c}").mkdir(parents=True)
        pattern = rng.random((size, size)) > 0.5
        for i in range(per_class):
            noisy = pattern ^ (rng.random((size, size)) > 0.9)
            Image.fromarray((noisy * 255).astype(np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def tiny_cfg(root: Path, algo: dict, model: dict | None = None, steps: int = 2):
    return make_cfg(
        dataset={
            "name": "image_folder",
            "path": str(root / "images"),
            "data_dir": str(root / "data"),
            "n_way": 2,
            "k_shot": 1,
            "k_query": 2,
            "image_size": 16,
            "channels": 1,
            "split_ratios": [0.5, 0.25, 0.25],
        },
        model={"name": "conv4", "filters": 4, "blocks": 2, **(model or {})},
        algo=algo,
        trainer={
            "steps": steps,
            "meta_batch_size": 2,
            "val_every": 0,
            "checkpoint_every": 0,
            "progress": False,
        },
        eval={"n_tasks": 4, "batch_size": 4},
    )


def save_config(cfg, run: Path) -> None:
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> tuple[Path, Path]:
    """A ProtoNet run (backbone only, trained 3 steps) to start from."""
    root = tmp_path_factory.mktemp("init_from")
    write_images(root / "images")
    cfg = tiny_cfg(root, {"name": "protonet"}, steps=3)
    run = root / "source"
    save_config(cfg, run)
    train(cfg, run)
    return root, run


def flat(tree) -> dict[str, np.ndarray]:
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def assert_backbone_bitwise(params, backbone: dict[str, np.ndarray], per_step: bool = False) -> None:
    got = {k: v for k, v in flat(params).items() if not k.startswith("head")}
    assert set(got) == set(backbone)
    for name, value in backbone.items():
        mine = got[name]
        if per_step and mine.ndim == value.ndim + 1:
            for row in mine:
                assert row.tobytes() == value.tobytes(), name
        else:
            assert mine.dtype == value.dtype and mine.tobytes() == value.tobytes(), name


def opened(cfg, run: Path):
    save_config(cfg, run)
    return open_run(cfg, run)


@pytest.mark.parametrize("algo", ["maml", "protomaml", "anil"])
def test_backbone_loaded_bitwise_and_head_random_by_default(source_run, algo):
    root, source = source_run
    backbone, step = source_backbone(source)
    assert step == 3
    fresh = tiny_cfg(root, {"name": algo})
    plain = init_state(setup(fresh), fresh.seed).params
    cfg = tiny_cfg(root, {"name": algo}, {"init_from": str(source)})
    params = opened(cfg, root / f"from_{algo}").state.params
    assert_backbone_bitwise(params, backbone)
    # A trained backbone differs from the random one it replaced.
    assert any(
        not np.array_equal(np.asarray(params[k]["kernel"]), np.asarray(plain[k]["kernel"]))
        for k in ("conv_0",)
    )
    if "head" in plain:  # the algorithm's own initial head, untouched
        for leaf in ("kernel", "bias"):
            assert np.asarray(params["head"][leaf]).tobytes() == np.asarray(plain["head"][leaf]).tobytes()
    assert json.loads((root / f"from_{algo}" / "init_from.json").read_text())["step"] == 3


def test_backbone_inside_meta_sgd_and_mamlpp_params(source_run):
    root, source = source_run
    backbone, _ = source_backbone(source)
    for algo in ("metasgd", "mamlpp"):
        cfg = tiny_cfg(root, {"name": algo, "inner_steps": 2}, {"init_from": str(source)})
        params = opened(cfg, root / f"from_{algo}").state.params
        assert_backbone_bitwise(params["params"], backbone, per_step=algo == "mamlpp")


def test_head_rules_zeros_and_shared(source_run):
    root, source = source_run
    fresh = tiny_cfg(root, {"name": "maml"})
    plain_head = init_state(setup(fresh), fresh.seed).params["head"]
    zeros = opened(
        tiny_cfg(root, {"name": "maml"}, {"init_from": str(source), "init_head": "zeros"}), root / "zeros"
    ).state.params["head"]
    assert not np.any(np.asarray(zeros["kernel"])) and not np.any(np.asarray(zeros["bias"]))
    shared = opened(
        tiny_cfg(root, {"name": "maml"}, {"init_from": str(source), "init_head": "shared"}), root / "shared"
    ).state.params["head"]
    kernel = np.asarray(shared["kernel"])
    assert kernel.shape[1] == 2
    for way in range(kernel.shape[1]):
        np.testing.assert_array_equal(kernel[:, way], np.asarray(plain_head["kernel"])[:, 0])
    np.testing.assert_array_equal(np.asarray(shared["bias"]), np.asarray(plain_head["bias"])[:1].repeat(2))


def test_shared_head_stays_tied_through_training(source_run):
    root, source = source_run
    cfg = tiny_cfg(root, {"name": "maml"}, {"init_from": str(source), "init_head": "shared"}, steps=3)
    run = root / "shared_trained"
    save_config(cfg, run)
    train(cfg, run)
    state = load_checkpoint(run, init_state(setup(cfg), cfg.seed))
    kernel = np.asarray(state.params["head"]["kernel"])
    assert int(state.step) == 3
    assert np.array_equal(kernel[:, 0], kernel[:, 1])
    assert json.loads((run / "results.json").read_text())["init_from"] == str(source)


def test_tie_head_gradient_is_the_sum_over_ways():
    grads = {
        "conv": {"kernel": np.ones(3)},
        "head": {"kernel": np.arange(6.0).reshape(2, 3), "bias": np.arange(3.0)},
    }
    tied = tie_head_gradient(grads)
    np.testing.assert_array_equal(np.asarray(tied["head"]["kernel"]), [[3.0, 3.0, 3.0], [12.0, 12.0, 12.0]])
    np.testing.assert_array_equal(np.asarray(tied["head"]["bias"]), [3.0, 3.0, 3.0])
    np.testing.assert_array_equal(np.asarray(tied["conv"]["kernel"]), np.ones(3))


def test_head_rule_on_a_headless_algorithm_is_refused(source_run):
    root, _ = source_run
    from metalearn.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.init_head='zeros': algo=protonet has no head"):
        setup(tiny_cfg(root, {"name": "protonet"}, {"init_head": "zeros"}))


def cli_dataset(root: Path) -> list[str]:
    """The command line of :func:`tiny_cfg`'s dataset, for algo=maml."""
    return [
        "algo=maml",
        "dataset=image_folder",
        f"dataset.path={root / 'images'}",
        f"dataset.data_dir={root / 'data'}",
        "dataset.n_way=2",
        "dataset.k_shot=1",
        "dataset.k_query=2",
        "dataset.image_size=16",
        "dataset.channels=1",
        "dataset.split_ratios=[0.5,0.25,0.25]",
    ]


def test_mismatched_architecture_is_one_line_and_exit_2(source_run, tmp_path):
    root, source = source_run
    code, out, err = run_cli_in_process(
        "train",
        *cli_dataset(root),
        "model.filters=6",
        "model.blocks=2",
        f"model.init_from={source}",
        "trainer.steps=1",
        "trainer.progress=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "model.init_from" in lines[0] and "(4,)" in lines[0] and "(6,)" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_source_is_one_line_and_exit_2(source_run, tmp_path):
    root, _ = source_run
    code, out, err = run_cli_in_process(
        "train",
        *cli_dataset(root),
        f"model.init_from={tmp_path / 'nowhere'}",
        "trainer.steps=1",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "model.init_from" in err, (out, err)
