"""Omniglot as class-indexed uint8 arrays for few-shot episodes.

``load_omniglot`` returns ``{"train", "validation", "test"}``, each of shape
``(num_classes, 20, image_size, image_size, 1)`` uint8, strokes 255 on background 0 (the PNGs
are inverted), resized from 105x105 with PIL's LANCZOS filter.

Character split (the unit that is split is the character, never single drawings): chosen by
``split`` (``dataset.split``; :mod:`metalearn.data.class_splits`: ``random``, ``alphabets``,
``vinyals``, ``mamlpp`` or a split file). ``random`` (the default): the unique keys
``"<alphabet>/<characterNN>"`` are sorted, permuted with ``np.random.default_rng(split_seed)``
(default seed 0) and cut in that order into

* ``standard`` (1623 characters): 1100 train / 100 validation / 423 test, i.e. the MAML
  protocol's 1200 meta-training characters (validation included) and 423 for testing;
* ``small`` (242 characters after de-duplicating Greek and Latin): 160 / 20 / 62.

Archives with another number of characters (custom or synthetic ones) are split in the same
proportions, rounded to the nearest integer, each split getting at least one character.
With ``rotations`` every character becomes 4 classes (np.rot90 by 0/90/180/270 degrees, class
``4 * c + k``) in the same split as the character, so splits stay disjoint: with the real
archives ``small`` gives 640 / 80 / 248 classes and ``standard`` 4400 / 400 / 1692.

Files under ``data_dir`` (argument, else ``$METALEARN_DATA_DIR``, else ``~/tensorflow_datasets``):

* ``metalearn_omniglot/<variant>/1.0.0/``: the TFDS build (array_record, no TensorFlow);
* ``downloads/``: archives fetched by TFDS; ``downloads/manual/``: default ``manual_dir``;
* ``metalearn_omniglot_cache/omniglot_<variant>_<size>px_rot<0|1>_seed<seed>_v<N>.npz``
  (``random``; other splits ``..._rot<0|1>_split-<split>_v<N>.npz``, a split file by its
  sha256): the prepared arrays, so builds of different splits never mix. Later calls load
  only this file; a corrupt one is rebuilt from the TFDS build (which needs no archives once
  it exists).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from metalearn.config import need, one_of, schema
from metalearn.data import class_splits
from metalearn.data.common import (
    DATA_DIR_ENV,  # noqa: F401 (re-exported)
    SPLITS,  # noqa: F401 (re-exported)
    ArchiveDatasetConfig,
    default_data_dir,
)
from metalearn.data.omniglot_tfds import (
    DRAWINGS_PER_CHARACTER,
    IMAGE_SIDE,
    VARIANT_ARCHIVES,
    MetalearnOmniglot,
    check_variant,
    locate_archives,
    omniglot_manual_instructions,
)
from metalearn.data.pipeline import (
    DatasetSpec,
    Paths,
    check_image_size,
    class_array_problem,
    load,
    prepare_tfds,
    read_split,
    resize_images,
    stack_by_class,
    text,
)
from metalearn.data.rotation import ROTATION_SAMPLING
from metalearn.errors import DataError

__all__ = [
    "SPLIT_SIZES",
    "VARIANTS",
    "cache_path",
    "characters_for",
    "default_data_dir",
    "load_omniglot",
    "omniglot_manual_instructions",
    "split_characters",
    "split_sizes",
]

log = logging.getLogger(__name__)

VARIANTS = tuple(sorted(VARIANT_ARCHIVES))
# (train, validation, test) characters for the real archives; other counts scale.
SPLIT_SIZES: dict[str, tuple[int, int, int]] = {
    "standard": (1100, 100, 423),
    "small": (160, 20, 62),
}
# Bump whenever the content of the cached arrays changes (preprocessing, split rule).
CACHE_FORMAT_VERSION = 1
CACHE_DIRNAME = "metalearn_omniglot_cache"


def cache_path(
    data_dir: str | os.PathLike,
    variant: str,
    image_size: int,
    rotations: bool,
    split_seed: int,
    split: str | None = None,
) -> Path:
    """Path of the ``.npz`` holding the prepared arrays for these settings."""
    tag = class_splits.cache_tag(split, split_seed)
    which = f"seed{split_seed}" if tag is None else f"split-{tag}"
    name = f"omniglot_{variant}_{image_size}px_rot{int(rotations)}_{which}_v{CACHE_FORMAT_VERSION}.npz"
    return Path(data_dir).expanduser() / CACHE_DIRNAME / name


def split_sizes(variant: str, num_characters: int) -> tuple[int, int, int]:
    """(train, validation, test) character counts: the reference sizes, or scaled to them."""
    reference = SPLIT_SIZES[variant]
    total = sum(reference)
    if num_characters == total:
        return reference
    if num_characters < 3:
        raise DataError(
            f"Omniglot '{variant}' has {num_characters} characters; at least 3 are needed "
            "for train/validation/test"
        )
    n_val = max(1, round(num_characters * reference[1] / total))
    n_train = max(1, round(num_characters * reference[0] / total))
    n_train = min(n_train, num_characters - n_val - 1)  # leave at least one test character
    return n_train, n_val, num_characters - n_train - n_val


def split_characters(keys, variant: str, split_seed: int) -> dict[str, list[str]]:
    """Assign character keys to splits: sort, permute with ``default_rng(split_seed)``, cut."""
    ordered = sorted(set(keys))
    order = np.random.default_rng(split_seed).permutation(len(ordered))
    shuffled = [ordered[i] for i in order]
    n_train, n_val, _ = split_sizes(variant, len(shuffled))
    return {
        "train": shuffled[:n_train],
        "validation": shuffled[n_train : n_train + n_val],
        "test": shuffled[n_train + n_val :],
    }


def characters_for(split: str | None, keys, variant: str, split_seed: int) -> dict[str, list[str]]:
    """``{"train", "validation", "test"}`` -> character keys, by the rule ``split`` (None:
    ``random``; see :mod:`metalearn.data.class_splits`)."""
    if split is None or split == "random":
        return split_characters(keys, variant, split_seed)
    if split == "alphabets":
        return class_splits.alphabet_split(keys, split_sizes(variant, len(set(keys))), split_seed)
    if split == "vinyals":
        return class_splits.vinyals_split(keys)
    if split == "mamlpp":
        return class_splits.mamlpp_split(keys)
    return class_splits.read_split_file(split, keys)


def _to_model_pixels(images: np.ndarray, image_size: int) -> np.ndarray:
    """(N, 105, 105) uint8, strokes 0 -> (N, size, size) uint8, strokes 255 (inverted, resized)."""
    inverted = 255 - images  # strokes become the bright foreground the models expect
    return resize_images(inverted, image_size)


def _with_rotations(classes: np.ndarray) -> np.ndarray:
    """(C, 20, H, W, 1) -> (4C, 20, H, W, 1); class 4c+k is character c rotated by k*90 deg."""
    rotated = np.stack([np.rot90(classes, k, axes=(2, 3)) for k in range(4)], axis=1)
    return rotated.reshape(-1, *classes.shape[1:])


def _read_tfds(
    variant: str,
    manual_dir: str | os.PathLike,
    data_dir: Path,
    download: bool,
    checksums: Mapping[str, str] | None,
) -> tuple[list[str], np.ndarray]:
    """Build the TFDS dataset if needed (once, under a lock) and read it back.

    Returns sorted character keys and their drawings, (num_characters, 20, 105, 105) uint8
    as stored (strokes 0), drawings ordered by drawer.
    """
    common = dict(config=variant, data_dir=os.fspath(data_dir), file_format="array_record")
    builder = prepare_tfds(
        lambda **kw: MetalearnOmniglot(**common, **kw),
        f"metalearn_omniglot/{variant}",
        data_root=data_dir,
        # Archives are located and checksummed (or the network probed) before TFDS starts,
        # so that a missing or wrong file fails in seconds with a one-line message.
        locate=lambda: {
            "archives": locate_archives(variant, manual_dir, download=download, checksums=checksums)
        },
    )
    by_key: dict[str, list[tuple[int, np.ndarray]]] = {}
    for rec in read_split(builder, "train"):
        by_key.setdefault(text(rec["character"]), []).append((int(rec["drawer"]), rec["image"][:, :, 0]))
    keys = sorted(by_key)
    for key in keys:
        if len(by_key[key]) != DRAWINGS_PER_CHARACTER:
            raise DataError(
                f"Omniglot character {key} has {len(by_key[key])} drawings, expected "
                f"{DRAWINGS_PER_CHARACTER}; delete {builder.data_dir} to rebuild it"
            )
    return keys, stack_by_class(by_key, keys)


def _locate(cfg: Any, paths: Paths) -> None:
    check_variant(cfg.variant)
    check_image_size(cfg.image_size)
    class_splits.check_split(SimpleNamespace(name="omniglot", variant=cfg.variant, split=cfg.split))


def _check(cfg: Any, arrays: dict[str, np.ndarray]) -> str | None:
    size = int(cfg.image_size)
    problem = class_array_problem(arrays, (size, size, 1))
    if problem is None and any(a.shape[1] != DRAWINGS_PER_CHARACTER for a in arrays.values()):
        problem = f"does not hold {DRAWINGS_PER_CHARACTER} drawings per class"
    return problem


def _build(cfg: Any, paths: Paths, found: None) -> dict[str, np.ndarray]:
    size = int(cfg.image_size)
    keys, images = _read_tfds(cfg.variant, paths.manual, paths.data_root, cfg.download, cfg.checksums)
    index = {key: i for i, key in enumerate(keys)}
    flat = _to_model_pixels(images.reshape(-1, IMAGE_SIDE, IMAGE_SIDE), size)
    classes = flat.reshape(len(keys), DRAWINGS_PER_CHARACTER, size, size, 1)
    arrays = {}
    chosen = characters_for(cfg.split, keys, cfg.variant, cfg.split_seed)
    for split, split_keys in chosen.items():
        arr = classes[[index[k] for k in split_keys]]
        arrays[split] = _with_rotations(arr) if cfg.rotations else arr
    return arrays


SPEC = DatasetSpec(
    name="omniglot",
    what="Omniglot",
    cache_dir=CACHE_DIRNAME,
    cache_name=lambda cfg, found: (
        cache_path(".", cfg.variant, int(cfg.image_size), cfg.rotations, cfg.split_seed, cfg.split).name
    ),
    build=_build,
    locate=_locate,
    check=_check,
)


def load_omniglot(
    variant: str,
    manual_dir: str | None,
    data_dir: str | None,
    image_size: int = 28,
    rotations: bool = True,
    split_seed: int = 0,
    download: bool = True,
    *,
    split: str | None = None,
    checksums: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Omniglot split by character: ``{"train", "validation", "test"}`` arrays.

    Each is ``(num_classes, 20, image_size, image_size, 1)`` uint8, strokes 255, background
    0; see the module docstring for split sizes, rotations and where files go. ``split``:
    ``dataset.split`` (None: ``random``).

    ``manual_dir``: folder with the original zip files (default ``<data_dir>/downloads/manual``);
    files there are sha256-verified before use. ``download``: fetch missing archives from
    GitHub (after a quick reachability probe); if False or offline, a missing archive raises
    DataError at once. ``checksums``: ``{archive name: sha256}`` replacing the built-in
    values, only for tests or custom archives (use a separate ``data_dir`` for those: the
    TFDS build and the cache do not record which archives they came from).
    """
    settings = SimpleNamespace(
        variant=variant,
        manual_dir=manual_dir,
        data_dir=data_dir,
        image_size=image_size,
        rotations=rotations,
        split_seed=split_seed,
        split=split,
        download=download,
        checksums=checksums,
    )
    return load(SPEC, settings)


def load_config(cfg: Any) -> dict[str, np.ndarray]:
    """The arrays for a DatasetConfig with ``name=omniglot``."""
    # rotation_sampling=per_task or per_task_train_only: unrotated characters; tasks rotate
    # them when sampled (metalearn/tasks.py).
    rotations = cfg.rotations and getattr(cfg, "rotation_sampling", "classes") == "classes"
    return load_omniglot(
        cfg.variant,
        cfg.manual_dir,
        cfg.data_dir,
        cfg.image_size,
        rotations,
        cfg.split_seed,
        cfg.download,
        split=getattr(cfg, "split", None),  # absent from configs of older runs
    )


# Drawings per character, and characters of the smallest (validation) split per variant.
DRAWINGS = 20
VALIDATION_CHARACTERS = {"standard": 100, "small": 20}


@schema("dataset", "omniglot")
@dataclass
class OmniglotConfig(ArchiveDatasetConfig):
    """Omniglot: variant "standard" (images_background + images_evaluation, 1623 characters)
    or "small" (the two background-small archives, 242); split_seed permutes the characters
    before the split; split: which characters go to train / validation / test
    (metalearn/data/class_splits.py: null or random, alphabets, vinyals, mamlpp, or a split
    file's path); rotations: the 90-degree rotations of each character as extra data, under
    rotation_sampling (metalearn/data/rotation.py): separate classes of the same split
    ("classes"), one random rotation per class per task ("per_task", cbfinn/maml's
    data_generator.py), or that for training tasks only ("per_task_train_only", MAML++'s
    code)."""

    variant: str = "standard"
    rotations: bool = True
    rotation_sampling: str = "classes"
    split_seed: int = 0
    split: str | None = None

    @classmethod
    def check(cls, d: Any, cfg: Any) -> None:
        one_of(d.variant, "dataset.variant", sorted(VALIDATION_CHARACTERS))
        one_of(d.rotation_sampling, "dataset.rotation_sampling", ROTATION_SAMPLING)
        class_splits.check_split(d)
        if d.rotation_sampling != "classes":
            need(
                d.rotations,
                "dataset.rotation_sampling",
                d.rotation_sampling,
                "classes unless dataset.rotations=true",
            )
            need(
                d.placement != "host",
                "dataset.placement",
                d.placement,
                f"auto or device with dataset.rotation_sampling={d.rotation_sampling} (rotations are "
                "drawn on device)",
            )
        super().check(d, cfg)

    @classmethod
    def episode_limits(cls, d: Any) -> tuple[int, int, str]:
        rotated_classes = d.rotations and d.rotation_sampling == "classes"
        classes = VALIDATION_CHARACTERS[d.variant] * (4 if rotated_classes else 1)
        return DRAWINGS, classes, f"Omniglot {d.variant}, rotations={d.rotations}"
