"""dataset=tfds: a TFDS image-classification dataset prepared locally by a builder defined here
(array_record, no network, no TensorFlow) as a few-shot source, in the library and the CLI.

Every image is one flat colour that says where it came from: red = 20 * label, green = 10 *
its index within its class and TFDS split, blue = 0 (train split) or 100 (test split). A flat
image stays exactly flat through resizing, so each loaded image can be traced back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import make_cfg, run_cli
from PIL import Image

from metalearn.data import tfds_source
from metalearn.data.pipeline import split_classes
from metalearn.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("no_network")

N_CLASSES = 10
PER_SPLIT = {"train": 4, "test": 2}  # images per class in each TFDS split
NAME = "metalearn_test_shapes"


def colour(label: int, index: int, split: str) -> tuple[int, int, int]:
    return 20 * label, 10 * index, 0 if split == "train" else 100


class MetalearnTestShapes(tfds.core.GeneratorBasedBuilder):
    """10 classes of flat-colour RGB images of assorted sizes, in splits train and test."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "picture": tfds.features.Image(shape=(None, None, 3)),
                    "kind": tfds.features.ClassLabel(names=[f"kind{c}" for c in range(N_CLASSES)]),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in PER_SPLIT}

    def _generate_examples(self, split: str):
        # Classes interleaved, so that grouping by label is needed.
        for index in range(PER_SPLIT[split]):
            for label in range(N_CLASSES):
                size = (6 + label, 5 + index)
                img = Image.new("RGB", size, colour(label, index, split))
                yield f"{split}_{label}_{index}", {"picture": img, "kind": label}


class MetalearnTestNeedsTf(tfds.core.GeneratorBasedBuilder):
    """A builder whose preparation imports TensorFlow (as many catalog builders' do)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds.features.Image(shape=(4, 4, 3)),
            "label": tfds.features.ClassLabel(num_classes=2),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        import tensorflow  # noqa: F401  (not installed: this is the point)

        return {}

    def _generate_examples(self):
        yield from ()


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = MetalearnTestShapes(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return data_dir


def shapes_cfg(shapes_dir, **dataset):
    values = dict(
        name="tfds",
        tfds_name=NAME,
        tfds_splits=["train", "test"],
        image_key="picture",
        label_key="kind",
        image_size=8,
        channels=3,
        split_ratios=[0.6, 0.2, 0.2],
        split_seed=0,
        data_dir=str(shapes_dir),
        download=False,
    )
    values.update(dataset)
    return make_cfg(dataset=values).dataset


def test_classes_pooled_split_and_traceable(shapes_dir):
    data = tfds_source.load_config(shapes_cfg(shapes_dir, split_seed=3))
    expected_split = split_classes(N_CLASSES, [0.6, 0.2, 0.2], 3)
    assert {s: len(v.counts) for s, v in data.items()} == {"train": 6, "validation": 2, "test": 2}
    seen = []
    for split, value in data.items():
        assert value.images.dtype == np.uint8 and value.images.shape[1:] == (8, 8, 3)
        assert list(value.counts) == [6] * len(value.counts)  # 4 train + 2 test images pooled
        start = 0
        for label, count in zip(expected_split[split], value.counts, strict=True):
            images = value.images[start : start + count]
            start += count
            # Flat colours survive resizing exactly. Train images first; within a TFDS split,
            # in TFDS's stored (shuffled) record order.
            got = [tuple(int(v) for v in img[0, 0]) for img in images]
            assert sorted(got[:4]) == [colour(label, i, "train") for i in range(4)]
            assert sorted(got[4:]) == [colour(label, i, "test") for i in range(2)]
            assert (images == images[:, :1, :1]).all()
            seen.append(label)
    assert sorted(seen) == list(range(N_CLASSES))  # disjoint, nothing lost

    grey = tfds_source.load_config(
        shapes_cfg(shapes_dir, split_seed=3, channels=1, image_size=5, tfds_splits=["test"])
    )
    assert grey["train"].images.shape[1:] == (5, 5, 1) and list(grey["train"].counts) == [2] * 6
    # Same records in the same order: the first class's test images, now grey (ITU-R 601-2 luma).
    for rgb, g in zip(data["train"].images[4:6], grey["train"].images[:2], strict=True):
        r, gg, b = (int(v) for v in rgb[0, 0])
        assert abs(int(g[0, 0, 0]) - (r * 299 + gg * 587 + b * 114) / 1000) <= 0.5


def test_all_classes_as_test(shapes_dir):
    data = tfds_source.load_config(shapes_cfg(shapes_dir, split_ratios=[0.0, 0.0, 1.0]))
    assert list(data) == ["test"]
    assert len(data["test"].counts) == N_CLASSES and data["test"].counts.sum() == 6 * N_CLASSES


def test_errors_are_one_line(shapes_dir, tmp_path):
    cases = [
        (dict(tfds_name="metalearn_no_such_dataset"), "dataset.tfds_name='metalearn_no_such_dataset'"),
        (dict(image_key="image"), "dataset.image_key='image' is not a feature"),
        (dict(tfds_splits=["validation"]), "dataset.tfds_splits"),
        (dict(data_dir=str(tmp_path)), "not prepared in dataset.data_dir"),
        (dict(data_dir=str(tmp_path), tfds_name="metalearn_test_needs_tf", download=True, image_key="image",
              label_key="label"), 'pip install "metalearn[tensorflow]"'),
    ]  # fmt: skip
    for overrides, needle in cases:
        with pytest.raises(DataError) as info:
            tfds_source.load_config(shapes_cfg(shapes_dir, **overrides))
        assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_task_source_and_training_guard(shapes_dir):
    """All classes as test: a task source with only a test split, which training refuses."""
    from metalearn.config import validate
    from metalearn.tasks import build_task_source

    cfg = make_cfg(model={"name": "conv4"})
    cfg.dataset = shapes_cfg(shapes_dir, split_ratios=[0.0, 0.0, 1.0], n_way=5, k_shot=1, k_query=5)
    source = build_task_source(cfg.dataset)
    assert source.input_shape == (8, 8, 3) and source.output_dim == 5
    assert set(source.splits) == {"test"}
    with pytest.raises(ConfigError, match=r"dataset\.split_ratios=\[0\.0, 0\.0, 1\.0\].*metalearn eval"):
        validate(cfg)
    cfg.run_dir = "some/run"  # evaluating a trained run: allowed
    validate(cfg)


@pytest.mark.slow
def test_cli_train_eval_and_cross_domain_eval(shapes_dir, tmp_path):
    """Train and test on the TFDS dataset; then evaluate a run trained on an image folder on
    all of its classes. Three CLI runs (about 1 CPU-minute): pytest -m slow tests/test_tfds_source.py"""
    tiny = [
        "trainer.steps=2", "trainer.meta_batch_size=2", "trainer.val_every=0", "trainer.log_every=1",
        "eval.n_tasks=4", "eval.batch_size=4", "model.filters=4", "algo.inner_steps=1",
        "algo.inner_steps_test=1", "dataset.n_way=2", "dataset.k_query=1", "dataset.image_size=16",
        "dataset.channels=3", f"dataset.data_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    shapes = [
        "dataset=tfds", f"dataset.tfds_name={NAME}", "dataset.tfds_splits=[train,test]",
        "dataset.image_key=picture", "dataset.label_key=kind", "dataset.download=false",
    ]  # fmt: skip
    run = tmp_path / "tfds_run"
    # data_dir twice: the TFDS dataset is read from shapes_dir, the cache goes there too.
    proc = run_cli(
        "train", *tiny, *shapes, f"dataset.data_dir={shapes_dir}", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert "TFDS: train 6 classes / 36 images" in proc.stdout, proc.stdout
    assert json.loads((run / "results.json").read_text())["test"]["n_tasks"] == 4

    folder = tmp_path / "folder"
    for c in range(6):
        for i in range(3):
            (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (40 * c, 30 * i, 0)).save(folder / f"c{c}" / f"{i}.png")
    other = tmp_path / "folder_run"
    folder_args = ["dataset=image_folder", f"dataset.path={folder}", "dataset.split_ratios=[0.34,0.33,0.33]"]
    run_cli("train", *tiny, *folder_args, f"hydra.run.dir={other}", cwd=tmp_path)
    # The run's config, with the dataset keys of the TFDS dataset (all 10 classes as test).
    cross = [
        "dataset.name=tfds", f"dataset.tfds_name={NAME}", "dataset.tfds_splits=[train,test]",
        "dataset.image_key=picture", "dataset.label_key=kind", "dataset.split_ratios=[0,0,1]",
        f"dataset.data_dir={shapes_dir}", "dataset.download=false", "eval.n_tasks=6",
    ]  # fmt: skip
    proc = run_cli("eval", f"run_dir={other}", *cross, cwd=tmp_path)
    assert "TFDS: test 10 classes / 60 images" in proc.stdout, proc.stdout
    (result,) = (other / "eval").glob("*/results.json")
    results = json.loads(result.read_text())
    assert results["dataset"] == "tfds" and results["test"]["n_tasks"] == 6
    assert 0.0 <= results["test"]["mean"] <= 1.0
