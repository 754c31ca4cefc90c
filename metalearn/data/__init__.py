"""Image datasets for few-shot episodes.

Each dataset is one module of this package that declares a
:class:`metalearn.data.pipeline.DatasetSpec` and a ``load_config(cfg)`` returning
``{split: class-indexed uint8 array or ClassImages}`` for a DatasetConfig; the shared
pipeline (:mod:`metalearn.data.pipeline`) locates, checks, builds, caches and describes.
:data:`IMAGE_DATASETS` maps ``dataset.name`` to that module (imported only when used).
"""

from __future__ import annotations

import importlib
from typing import Any

IMAGE_DATASETS: dict[str, str] = {
    "omniglot": "metalearn.data.omniglot",
    "mini_imagenet": "metalearn.data.mini_imagenet",
    "cifar_fs": "metalearn.data.cifar_fewshot",
    "fc100": "metalearn.data.cifar_fewshot",
    "image_folder": "metalearn.data.image_folder",
    "tfds": "metalearn.data.tfds_source",
}


def load_dataset(cfg: Any) -> dict[str, Any]:
    """The per-split images of the image dataset ``cfg.name`` (a DatasetConfig)."""
    return importlib.import_module(IMAGE_DATASETS[cfg.name]).load_config(cfg)
