"""ProtoNet's retraining on train+validation (jakesnell/prototypical-networks
scripts/train/few_shot/trainval.py): ``dataset.train_on_validation`` trains on the training and
validation classes together, and ``trainer.steps_from`` takes the budget of a run trained with
early stopping (its lowest validation loss step plus its patience)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import make_cfg, run_cli_in_process, synthetic_image_arrays

from metalearn.config import validate
from metalearn.data.common import ClassImages
from metalearn.errors import ConfigError
from metalearn.tasks import image_source, joined_classes

TINY = (
    "dataset=sinusoid",
    "model.hidden=[8]",
    "trainer.log_every=10",
    "trainer.val_every=10",
    "trainer.val_tasks=10",
    "trainer.checkpoint_every=0",
    "trainer.progress=false",
    "eval.n_tasks=12",
    "eval.batch_size=4",
)


def _train(run_dir, *overrides: str) -> tuple[int, str, str]:
    return run_cli_in_process("train", *TINY, *overrides, f"hydra.run.dir={run_dir}")


def test_retraining_budget_is_the_best_validation_loss_step_plus_the_patience(tmp_path):
    source = tmp_path / "early"
    code, out, err = _train(source, "trainer.steps=400", "optim.lr=0.05", "trainer.early_stop_patience=2")
    assert code == 0, out + err
    records = [json.loads(x) for x in (source / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if r["split"] == "validation"}
    lowest = min(losses.values())
    best = max(step for step, loss in losses.items() if loss == lowest)  # later step on ties
    expected = best + 2 * 10

    retrained = tmp_path / "retrained"
    code, out, err = _train(retrained, "trainer.val_every=0", f"trainer.steps_from={source}")
    assert code == 0, out + err
    assert f"trainer.steps={expected} from {source}" in out
    assert json.loads((retrained / "results.json").read_text())["steps"] == expected
    stored = yaml.safe_load((retrained / ".hydra" / "config.yaml").read_text())
    assert stored["trainer"]["steps"] == expected  # the run's record holds the budget it ran


def test_steps_from_a_run_without_early_stopping_is_one_line(tmp_path):
    source = tmp_path / "plain"
    assert _train(source, "trainer.steps=20")[0] == 0
    code, _, err = _train(tmp_path / "r", f"trainer.steps_from={source}")
    assert code == 2 and err.count("\n") == 1
    assert "trainer.steps_from" in err and "early_stop_patience" in err
    assert not (tmp_path / "r").exists()
    code, _, err = _train(tmp_path / "r", f"trainer.steps_from={tmp_path / 'nowhere'}")
    assert code == 2 and err.count("\n") == 1 and "trainer.steps_from" in err


def test_joined_classes_keep_every_class_and_image_in_order():
    a = np.arange(2 * 3 * 2 * 2 * 1, dtype=np.uint8).reshape(2, 3, 2, 2, 1)
    b = 100 + np.arange(1 * 3 * 2 * 2 * 1, dtype=np.uint8).reshape(1, 3, 2, 2, 1)
    same = joined_classes(a, b)
    assert same.shape == (3, 3, 2, 2, 1) and np.array_equal(same[:2], a) and np.array_equal(same[2], b[0])

    c = 200 + np.zeros((2, 4, 2, 2, 1), np.uint8)  # another number of images per class
    mixed = joined_classes(a, c)
    assert isinstance(mixed, ClassImages)
    assert mixed.counts.tolist() == [3, 3, 4, 4]
    assert np.array_equal(mixed.images[:6], a.reshape(6, 2, 2, 1))
    assert np.array_equal(mixed.images[6:], c.reshape(8, 2, 2, 1))

    ragged = ClassImages(np.ones((5, 2, 2, 1), np.uint8), np.array([2, 3]))
    both = joined_classes(ragged, a)
    assert both.counts.tolist() == [2, 3, 3, 3] and len(both.images) == 11


def _image_cfg(**dataset):
    return make_cfg(
        algo={"name": "protonet"},
        dataset={"name": "omniglot", "n_way": 3, "k_shot": 1, "k_query": 1, "placement": "device", **dataset},
        model={"name": "conv4", "filters": 3, "blocks": 2},
        trainer={"val_every": 0},
    )


def test_training_draws_from_the_training_and_validation_classes():
    arrays = synthetic_image_arrays(n_classes=5, per_class=4, size=8)
    cfg = _image_cfg(train_on_validation=True)
    validate(cfg)
    source = image_source(cfg.dataset, arrays)
    assert "validation" not in source.splits
    train = np.asarray(source.splits["train"]["images"])
    assert np.array_equal(train, np.concatenate([arrays["train"], arrays["validation"]]))
    plain = image_source(_image_cfg().dataset, arrays)
    assert np.asarray(plain.splits["train"]["images"]).shape[0] == 5


@pytest.mark.parametrize(
    ("section", "value", "key"),
    [
        ("trainer", {"val_every": 100}, "trainer.val_every"),
        ("eval", {"split": "validation"}, "eval.split"),
    ],
)
def test_validation_on_classes_that_are_trained_on_is_refused(section, value, key):
    cfg = _image_cfg(train_on_validation=True)
    for k, v in value.items():
        cfg[section][k] = v
    with pytest.raises(ConfigError, match=f"invalid {key}=.*train_on_validation"):
        validate(cfg)
