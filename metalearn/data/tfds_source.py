"""``dataset=tfds``: any TFDS image-classification dataset as a few-shot source.

``dataset.tfds_name`` (``name``, ``name/config`` or ``name:version``) is read from
``dataset.data_dir`` through an array_record data source (no TensorFlow), whether TFDS knows
the builder (its catalog, or one imported in this process) or only finds it prepared there.
If it is not prepared and ``dataset.download`` is true, TFDS prepares it first (as
array_record). The ``dataset.image_key`` images of the TFDS splits ``dataset.tfds_splits``
are pooled by ``dataset.label_key`` (one class per label, in label order, images in split and
record order), converted to ``dataset.channels`` and resized to ``dataset.image_size`` as
image folders are. Classes are split by ``dataset.split_ratios`` and ``dataset.split_seed``
(:func:`~metalearn.data.pipeline.split_classes`); ``split_ratios=[0, 0, 1]`` makes every
class a test class, to evaluate runs trained on other data. Classes may differ in size.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from metalearn.config import need, schema
from metalearn.data.common import SPLITS, SplitByRatiosConfig
from metalearn.data.pipeline import (
    DatasetSpec,
    load,
    prepare_tfds,
    ragged_keys,
    ragged_problem,
    ragged_splits,
    read_split,
    split_classes,
    to_pixels,
)
from metalearn.errors import DataError

TF_EXTRA = 'pip install "metalearn[tensorflow]"'


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def _splits(cfg: Any) -> tuple[str, ...]:
    return SPLITS if cfg.split_ratios[0] > 0 else ("test",)  # [0, 0, 1]: evaluation only


def _builder(cfg: Any, paths: Any):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(cfg.tfds_name, data_dir=str(paths.data_root), file_format="array_record")
    except Exception as err:  # DatasetNotFoundError's message lists the whole catalog
        raise DataError(
            f"dataset.tfds_name={cfg.tfds_name!r}: {_one_line(err)} in {paths.data_root}"
        ) from err


def _locate(cfg: Any, paths: Any):
    builder = _builder(cfg, paths)
    features = builder.info.features
    for key in ("image_key", "label_key"):
        if getattr(cfg, key) not in features:
            raise DataError(
                f"dataset.{key}={getattr(cfg, key)!r} is not a feature of {cfg.tfds_name}: {list(features)}"
            )
    if not builder.is_prepared() and not cfg.download:
        raise DataError(
            f"{cfg.tfds_name} is not prepared in dataset.data_dir={paths.data_root} (download off)"
        )
    return builder


def _build(cfg: Any, paths: Any, builder) -> dict:
    try:
        builder = prepare_tfds(lambda: _builder(cfg, paths), cfg.tfds_name, data_root=paths.data_root)
    except DataError:
        raise
    except Exception as err:
        if "tensorflow" in _one_line(err).lower():
            raise DataError(
                f"preparing {cfg.tfds_name} needs TensorFlow ({_one_line(err)}): {TF_EXTRA}"
            ) from err
        raise DataError(f"preparing {cfg.tfds_name} in {paths.data_root} failed ({_one_line(err)})") from err
    if "array_record" not in str(builder.info.file_format).lower():
        raise DataError(
            f"{builder.data_dir} is {builder.info.file_format}, not array_record: prepare it again"
        )
    by_label: dict[int, list] = {}
    for split in cfg.tfds_splits:
        if split not in builder.info.splits:
            raise DataError(f"dataset.tfds_splits: {cfg.tfds_name} has splits {list(builder.info.splits)}")
        for rec in read_split(builder, split):
            pixels = rec[cfg.image_key]
            img = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
            by_label.setdefault(int(rec[cfg.label_key]), []).append(
                to_pixels(img, cfg.image_size, cfg.channels)
            )
    labels = sorted(by_label)
    names = getattr(builder.info.features[cfg.label_key], "names", None)
    cuts = split_classes(len(labels), cfg.split_ratios, cfg.split_seed) if len(_splits(cfg)) == 3 else None
    arrays = {}
    for split, idx in (cuts or {"test": range(len(labels))}).items():
        classes = [labels[i] for i in idx]
        arrays[f"{split}_images"] = np.stack([img for c in classes for img in by_label[c]])
        arrays[f"{split}_counts"] = np.array([len(by_label[c]) for c in classes], np.int64)
        arrays[f"{split}_classes"] = np.array([names[c] if names else str(c) for c in classes], np.str_)
    return arrays


def _cache_name(cfg: Any, builder) -> str:
    settings = [
        getattr(cfg, k)
        for k in ("tfds_name", "image_key", "label_key", "image_size", "channels", "split_seed")
    ]
    settings += [str(builder.info.version), list(cfg.tfds_splits), list(cfg.split_ratios), 1]
    digest = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
    return f"{re.sub(r'[^A-Za-z0-9_-]+', '_', cfg.tfds_name)}_{digest}.npz"


SPEC = DatasetSpec(
    name="tfds",
    what="TFDS",
    cache_dir="metalearn_tfds_cache",
    cache_name=_cache_name,
    build=_build,
    locate=_locate,
    check=lambda cfg, a: ragged_problem(a, _splits(cfg), (cfg.image_size, cfg.image_size, cfg.channels)),
    keys=lambda cfg: ragged_keys(_splits(cfg)),
    to_splits=ragged_splits,
)


def load_config(cfg: Any) -> dict:
    """The splits for a DatasetConfig with ``name=tfds``."""
    return load(SPEC, cfg)


@schema("dataset", "tfds")
@dataclass
class TFDSConfig(SplitByRatiosConfig):
    """A TFDS image-classification dataset: tfds_name ("name", "name/config", "name:version")
    prepared in data_dir (or prepared there by TFDS when download is on), its tfds_splits pooled
    into one set of classes (then split by split_ratios / split_seed; [0, 0, 1]: every class a
    test class, for evaluating runs trained on other data), and the image_key and label_key
    features."""

    tfds_name: str | None = None
    tfds_splits: list[str] = field(default_factory=lambda: ["train"])
    image_key: str = "image"
    label_key: str = "label"
    download: bool = True

    @classmethod
    def check(cls, d: Any, cfg: Any) -> None:
        super().check(d, cfg)
        need(bool(d.tfds_name), "dataset.tfds_name", d.tfds_name, "a TFDS dataset name")
        need(len(d.tfds_splits) >= 1, "dataset.tfds_splits", list(d.tfds_splits), "TFDS split names")
        ratios = list(d.split_ratios)
        if cfg.get("run_dir") is None:  # training, not `metalearn eval`
            need(
                ratios[0] > 0 and ratios[1] > 0,
                "dataset.split_ratios",
                ratios,
                "> 0 for train and validation to train ([0, 0, 1] is for metalearn eval)",
            )
