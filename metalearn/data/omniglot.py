"""Omniglot as class-indexed uint8 arrays for few-shot episodes.

``load_omniglot`` returns ``{"train", "validation", "test"}``, each of shape
``(num_classes, 20, image_size, image_size, 1)`` uint8, strokes 255 on background 0 (the PNGs
are inverted), resized from 105x105 with PIL's LANCZOS filter.

Character split (the unit that is split is the character, never single drawings): the
unique keys ``"<alphabet>/<characterNN>"`` are sorted, permuted with
``np.random.default_rng(split_seed)`` (default seed 0) and cut in that order into

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
* ``metalearn_omniglot_cache/omniglot_<variant>_<size>px_rot<0|1>_seed<seed>_v<N>.npz``:
  the prepared arrays. Later calls load only this file; a corrupt one is rebuilt from the
  TFDS build (which needs no archives once it exists).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from metalearn.data.common import (
    DATA_DIR_ENV,  # noqa: F401 (re-exported)
    SPLITS,
    check_class_arrays,
    default_data_dir,
    default_manual_dir,
    load_npz,
    save_npz_atomic,
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
from metalearn.errors import ConfigError, DataError

__all__ = [
    "SPLIT_SIZES",
    "VARIANTS",
    "cache_path",
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


def cache_path(
    data_dir: str | os.PathLike, variant: str, image_size: int, rotations: bool, split_seed: int
) -> Path:
    """Path of the ``.npz`` holding the prepared arrays for these settings."""
    name = (
        f"omniglot_{variant}_{image_size}px_rot{int(rotations)}_seed{split_seed}_v{CACHE_FORMAT_VERSION}.npz"
    )
    return Path(data_dir).expanduser() / "metalearn_omniglot_cache" / name


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


def _to_model_pixels(images: np.ndarray, image_size: int) -> np.ndarray:
    """(N, 105, 105) uint8, strokes 0 -> (N, size, size) uint8, strokes 255 (inverted, resized)."""
    inverted = 255 - images  # strokes become the bright foreground the models expect
    if image_size == IMAGE_SIDE:
        return inverted
    out = np.empty((len(images), image_size, image_size), np.uint8)
    for i, img in enumerate(inverted):
        out[i] = np.asarray(Image.fromarray(img).resize((image_size, image_size), Image.LANCZOS))
    return out


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
    """Build the TFDS dataset if needed and read it back.

    Returns sorted character keys and their drawings, (num_characters, 20, 105, 105) uint8
    as stored (strokes 0), drawings ordered by drawer.
    """
    common = dict(config=variant, data_dir=os.fspath(data_dir), file_format="array_record")
    builder = MetalearnOmniglot(**common)
    if not builder.is_prepared():
        # Archives are located and checksummed (or the network probed) before TFDS starts,
        # so that a missing or wrong file fails in seconds with a one-line message.
        archives = locate_archives(variant, manual_dir, download=download, checksums=checksums)
        builder = MetalearnOmniglot(archives=archives, **common)
        started = time.perf_counter()
        # try_download_gcs=False: otherwise TFDS asks Google Cloud Storage for a prebuilt copy.
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        log.info("built TFDS metalearn_omniglot/%s in %.1f s", variant, time.perf_counter() - started)

    source = builder.as_data_source(split="train")
    records = source.__getitems__(range(len(source)))  # random access, no TensorFlow
    by_key: dict[str, list[tuple[int, np.ndarray]]] = {}
    for rec in records:
        key = rec["character"]
        key = key.decode() if isinstance(key, bytes) else key  # data sources return bytes
        by_key.setdefault(key, []).append((int(rec["drawer"]), rec["image"][:, :, 0]))
    keys = sorted(by_key)
    for key in keys:
        if len(by_key[key]) != DRAWINGS_PER_CHARACTER:
            raise DataError(
                f"Omniglot character {key} has {len(by_key[key])} drawings, expected "
                f"{DRAWINGS_PER_CHARACTER}; delete {builder.data_dir} to rebuild it"
            )
    images = np.stack([np.stack([img for _, img in sorted(by_key[k], key=lambda d: d[0])]) for k in keys])
    return keys, images


def load_omniglot(
    variant: str,
    manual_dir: str | None,
    data_dir: str | None,
    image_size: int = 28,
    rotations: bool = True,
    split_seed: int = 0,
    download: bool = True,
    *,
    checksums: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Omniglot split by character: ``{"train", "validation", "test"}`` arrays.

    Each is ``(num_classes, 20, image_size, image_size, 1)`` uint8, strokes 255, background
    0; see the module docstring for split sizes, rotations and where files go.

    ``manual_dir``: folder with the original zip files (default ``<data_dir>/downloads/manual``);
    files there are sha256-verified before use. ``download``: fetch missing archives from
    GitHub (after a quick reachability probe); if False or offline, a missing archive raises
    DataError at once. ``checksums``: ``{archive name: sha256}`` replacing the built-in
    values, only for tests or custom archives (use a separate ``data_dir`` for those: the
    TFDS build and the cache do not record which archives they came from).
    """
    check_variant(variant)
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ConfigError(f"dataset.image_size must be a positive integer, got {image_size!r}")
    image_size = int(image_size)
    data_root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    manual = Path(manual_dir).expanduser() if manual_dir else default_manual_dir(data_root)

    path = cache_path(data_root, variant, image_size, rotations, split_seed)
    cached = load_npz(path, SPLITS, "Omniglot")
    shape = (DRAWINGS_PER_CHARACTER, image_size, image_size, 1)
    if (
        cached is not None
        and check_class_arrays(cached, shape[1:], "Omniglot", path)
        and all(a.shape[1] == DRAWINGS_PER_CHARACTER for a in cached.values())
    ):
        return cached

    keys, images = _read_tfds(variant, manual, data_root, download, checksums)
    index = {key: i for i, key in enumerate(keys)}
    flat = _to_model_pixels(images.reshape(-1, IMAGE_SIDE, IMAGE_SIDE), image_size)
    classes = flat.reshape(len(keys), DRAWINGS_PER_CHARACTER, image_size, image_size, 1)

    arrays = {}
    for split, split_keys in split_characters(keys, variant, split_seed).items():
        arr = classes[[index[k] for k in split_keys]]
        arrays[split] = _with_rotations(arr) if rotations else arr
    save_npz_atomic(path, arrays)
    log.info("Omniglot %s: %s classes; cache %s", variant, {s: len(a) for s, a in arrays.items()}, path)
    return arrays
