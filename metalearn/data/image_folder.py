"""Users' own image folders as a few-shot dataset (``dataset=image_folder dataset.path=DIR``).

``load_image_folder`` returns ``{"train", "validation", "test"}``, each a
:class:`~metalearn.data.common.ClassImages`: uint8 images ``(N, image_size, image_size,
channels)`` grouped by class, and per-class counts (classes may hold different numbers of
images).

Layouts (detected automatically):

* **split layout** ``DIR/{train,val|validation,test}/<class>/<images>``: used when any
  top-level subfolder of ``DIR`` is named ``train``, ``val``, ``validation`` or ``test``
  (case-insensitive). All three splits are then required (``val`` or ``validation``, not
  both), other top-level folders are ignored with a warning, and a class name found in two
  splits is an error. ``dataset.split_ratios`` and ``dataset.split_seed`` are not used.
* **flat layout** ``DIR/<class>/<images>``: otherwise. The class names (folder names, with
  at least one image) are sorted, permuted with ``np.random.default_rng(split_seed)`` and cut
  in that order into train / validation / test by ``split_ratios`` (three non-negative
  fractions summing to 1 within 1e-6). Rounding: each split first gets
  ``floor(num_classes * ratio)`` classes, the classes left over go one each to the splits with
  the largest fractional parts (ties: train, then validation, then test); a split with a
  positive ratio that got none then takes one class from the largest split. Every split must
  end with at least one class, else DataError naming ``dataset.split_ratios``.

Within a split, classes are listed in sorted name order.

Images: files with extensions png, jpg, jpeg, bmp, gif, webp, tif, tiff (any case), found
recursively inside each class folder; hidden files and folders (names starting with ``.``)
and other files are ignored; a class's images are ordered by their path relative to the
class folder. Each is decoded with PIL (first frame of animations, EXIF orientation applied),
converted to ``"L"`` (channels=1) or ``"RGB"`` (channels=3) -- an alpha channel is dropped,
not composited; 16-bit greyscale is scaled to 8 bits -- and resized to
``image_size x image_size`` with LANCZOS, *without* keeping the aspect ratio (no cropping,
no padding); an image already of that size is used as is. A class folder with no image is
skipped with a warning; an image that cannot be decoded raises DataError naming the file.

Cache: the arrays are built once into
``<data_dir>/metalearn_image_folder_cache/<folder name>_<sha256 fingerprint>.npz`` (``data_dir``:
argument, else ``$METALEARN_DATA_DIR``, else ``~/tensorflow_datasets``). The fingerprint covers
the absolute folder path, the layout, the sorted ``(relative path, size, mtime_ns)`` of every
image file used, ``image_size``, ``channels``, (flat layout) ``split_ratios`` and
``split_seed``, and :data:`CACHE_FORMAT_VERSION`; so adding, removing or editing an image, or
changing a setting, builds a new cache (old ones are left in place; delete the folder to
reclaim space). A corrupt or inconsistent cache is rebuilt. The file holds
``<split>_images``, ``<split>_counts`` and ``<split>_classes`` (class names, fixed-width
unicode) for each split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from metalearn.config import need, schema
from metalearn.data.common import SPLITS, ClassImages, SplitByRatiosConfig, resolve_data_dir
from metalearn.data.pipeline import (
    RESAMPLE,  # noqa: F401 (re-exported)
    DatasetSpec,
    Paths,
    describe,
    load_with_arrays,
    ragged_keys,
    ragged_problem,
    ragged_splits,
    split_classes,
    split_counts,
    to_pixels,
)
from metalearn.errors import ConfigError, DataError

__all__ = [
    "CACHE_DIR_NAME",
    "CACHE_FORMAT_VERSION",
    "IMAGE_EXTENSIONS",
    "describe",
    "load_image_folder",
    "load_image_folder_with_names",
    "load_test_folder",
    "read_image",
    "split_counts",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Folder names (lower case) that mark the split layout, per split.
SPLIT_DIR_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("val", "validation"),
    "test": ("test",),
}
CACHE_DIR_NAME = "metalearn_image_folder_cache"
# Bump whenever the content of the cached arrays changes (decoding, resizing, split rule).
CACHE_FORMAT_VERSION = 1
RATIO_TOLERANCE = 1e-6
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

# One class: (name, folder, image paths relative to that folder, sorted).
_Class = tuple[str, Path, list[str]]


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# ----------------------------------------------------------------------------- settings


def _check_settings(
    image_size, channels, split_ratios, split_seed
) -> tuple[int, int, tuple[float, float, float], int]:
    """Validated ``(image_size, channels, split_ratios, split_seed)``; ConfigError otherwise."""
    if isinstance(image_size, bool) or not isinstance(image_size, Integral) or image_size < 4:
        raise ConfigError(f"dataset.image_size must be an integer >= 4, got {image_size!r}")
    if isinstance(channels, bool) or not isinstance(channels, Integral) or channels not in (1, 3):
        raise ConfigError(f"dataset.channels must be 1 (greyscale) or 3 (RGB), got {channels!r}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, Integral) or split_seed < 0:
        raise ConfigError(f"dataset.split_seed must be a non-negative integer, got {split_seed!r}")
    try:
        ratios = list(split_ratios)
    except TypeError:
        ratios = None
    if (
        ratios is None
        or len(ratios) != 3
        or any(
            isinstance(r, bool) or not isinstance(r, Real) or not math.isfinite(r) or r < 0 for r in ratios
        )
        or abs(sum(float(r) for r in ratios) - 1.0) > RATIO_TOLERANCE
    ):
        shown = ratios if ratios is not None else split_ratios
        raise ConfigError(
            "dataset.split_ratios must be three non-negative fractions (train, validation, test) "
            f"summing to 1, got {shown!r}"
        )
    r = tuple(float(x) for x in ratios)
    return int(image_size), int(channels), (r[0], r[1], r[2]), int(split_seed)


# ----------------------------------------------------------------------------- scanning


def _subdirs(folder: Path) -> list[Path]:
    """Non-hidden subfolders of ``folder`` (symlinks followed), sorted by name."""
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError as err:
        raise DataError(f"dataset.path: cannot list {folder} ({_one_line(err)})") from err
    return sorted(
        (Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir()), key=lambda p: p.name
    )


def _image_files(class_dir: Path) -> list[str]:
    """Image files under ``class_dir`` (recursively, hidden ones skipped), as sorted posix
    paths relative to it."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(class_dir)
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append((rel_dir / name).as_posix())
    return sorted(found)


def _classes_in(folder: Path) -> list[_Class]:
    """The class subfolders of ``folder`` that hold images; empty ones skipped with a warning."""
    classes = []
    for class_dir in _subdirs(folder):
        files = _image_files(class_dir)
        if files:
            classes.append((class_dir.name, class_dir, files))
        else:
            log.warning("image_folder: skipping class folder %s (no image files)", class_dir)
    return classes


def _split_layout_dirs(root: Path) -> dict[str, Path] | None:
    """``{split: folder}`` for the split layout, None for the flat layout."""
    top = _subdirs(root)
    named = {d.name.lower(): d for d in top}
    if not any(name in named for names in SPLIT_DIR_NAMES.values() for name in names):
        return None
    dirs: dict[str, Path] = {}
    for split, names in SPLIT_DIR_NAMES.items():
        matches = [d for d in top if d.name.lower() in names]
        if not matches:
            wanted = " or ".join(f"{n}/" for n in names)
            raise DataError(
                f"dataset.path {root} has split folders but no {wanted}; a split layout needs "
                "train/, val/ (or validation/) and test/, each holding one folder per class"
            )
        if len(matches) > 1:
            shown = ", ".join(f"{d.name}/" for d in matches)
            raise DataError(f"dataset.path {root} has several {split} folders ({shown}); keep one")
        dirs[split] = matches[0]
    for d in top:
        if d not in dirs.values():
            log.warning("image_folder: ignoring %s (not train/val/validation/test)", d)
    return dirs


def _scan(
    root: Path, split_ratios: tuple[float, float, float], split_seed: int
) -> tuple[str, dict[str, list[_Class]]]:
    """The layout (``"flat"`` or ``"split"``) and the classes of every split."""
    split_dirs = _split_layout_dirs(root)
    if split_dirs is not None:
        splits = {split: _classes_in(folder) for split, folder in split_dirs.items()}
        seen: dict[str, str] = {}
        for split in SPLITS:
            if not splits[split]:
                raise DataError(
                    f"dataset.path {root}: {split_dirs[split].name}/ holds no class subfolders "
                    f"with image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            for name, _, _ in splits[split]:
                if name in seen:
                    raise DataError(
                        f"dataset.path {root}: class '{name}' is in both {split_dirs[seen[name]].name}/ "
                        f"and {split_dirs[split].name}/; splits must hold different classes"
                    )
                seen[name] = split
        return "split", splits

    classes = _classes_in(root)
    if not classes:
        hint = ""
        if _image_files_at_top(root):
            hint = " (images directly in the folder are ignored: put them in one subfolder per class)"
        raise DataError(
            f"dataset.path {root} has no class subfolders with image files "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}){hint}"
        )
    # Classes are in name order, so sorted indices keep each split in name order.
    cuts = split_classes(len(classes), split_ratios, split_seed)
    return "flat", {split: [classes[i] for i in idx] for split, idx in cuts.items()}


def _image_files_at_top(root: Path) -> bool:
    try:
        with os.scandir(root) as entries:
            return any(
                not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
                for e in entries
            )
    except OSError:
        return False


# ----------------------------------------------------------------------------- cache


def _fingerprint(
    root: Path,
    layout: str,
    splits: dict[str, list[_Class]],
    image_size: int,
    channels: int,
    split_ratios: tuple[float, float, float],
    split_seed: int,
) -> str:
    """sha256 over everything the cached arrays depend on (see the module docstring)."""
    files = []
    for classes in splits.values():
        for _, class_dir, rels in classes:
            for rel in rels:
                full = class_dir / rel
                try:
                    st = full.stat()
                except OSError as err:
                    raise DataError(f"dataset.path: cannot read {full} ({_one_line(err)})") from err
                files.append((full.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    key = {
        "version": CACHE_FORMAT_VERSION,
        "path": str(root),
        "layout": layout,
        "files": sorted(files),
        "image_size": image_size,
        "channels": channels,
        "split_ratios": list(split_ratios) if layout == "flat" else None,
        "split_seed": split_seed if layout == "flat" else None,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _cache_file(data_dir: str | os.PathLike | None, root: Path, fingerprint: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", root.name).strip("_")[:40] or "folder"
    return resolve_data_dir(data_dir) / CACHE_DIR_NAME / f"{stem}_{fingerprint}.npz"


# ----------------------------------------------------------------------------- decoding


def _decode_image(file: Path, image_size: int, channels: int) -> np.ndarray:
    """One image file -> (image_size, image_size, channels) uint8; DataError if undecodable."""
    try:
        with Image.open(file) as opened:
            img = ImageOps.exif_transpose(opened)  # first frame of animated files
            if img.mode in _SIXTEEN_BIT_MODES:
                wide = np.asarray(img, dtype=np.float64)
                img = Image.fromarray((np.clip(wide, 0, 65535) / 257.0).round().astype(np.uint8), "L")
            elif img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            arr = to_pixels(img, image_size, channels)
    except Exception as err:  # PIL raises many types on broken files; all mean "cannot decode"
        raise DataError(
            f"dataset.path: cannot decode image {file} ({type(err).__name__}: {_one_line(err)})"
        ) from err
    return arr


def _build(splits: dict[str, list[_Class]], image_size: int, channels: int) -> dict[str, np.ndarray]:
    """Decode every image into the cached arrays (threads: PIL releases the GIL while decoding)."""
    arrays: dict[str, np.ndarray] = {}
    workers = max(1, min(8, os.cpu_count() or 1))
    decode = lambda f: _decode_image(f, image_size, channels)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for split in SPLITS:
            classes = splits[split]
            files = [class_dir / rel for _, class_dir, rels in classes for rel in rels]
            images = np.empty((len(files), image_size, image_size, channels), np.uint8)
            try:
                for i, img in enumerate(pool.map(decode, files)):
                    images[i] = img
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            arrays[f"{split}_images"] = images
            arrays[f"{split}_counts"] = np.array([len(rels) for _, _, rels in classes], np.int64)
            arrays[f"{split}_classes"] = np.array([name for name, _, _ in classes], dtype=np.str_)
    return arrays


# ----------------------------------------------------------------------------- public API


def _locate(cfg: Any, paths: Paths) -> tuple[Path, str, dict[str, list[_Class]], str]:
    """(folder, layout, classes per split, fingerprint), after checking the settings."""
    if cfg.path is None or not str(cfg.path).strip():
        raise DataError("dataset.path is not set; give the image folder, e.g. dataset.path=/data/my_images")
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise DataError(f"dataset.path {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset.path {root} is not a directory")
    root = root.resolve()
    layout, splits = _scan(root, cfg.split_ratios, cfg.split_seed)
    fingerprint = _fingerprint(
        root, layout, splits, cfg.image_size, cfg.channels, cfg.split_ratios, cfg.split_seed
    )
    return root, layout, splits, fingerprint


def _cache_name(cfg: Any, found: tuple) -> str:
    root, _, _, fingerprint = found
    return _cache_file(".", root, fingerprint).name


SPEC = DatasetSpec(
    name="image_folder",
    what="image_folder",
    cache_dir=CACHE_DIR_NAME,
    cache_name=_cache_name,
    build=lambda cfg, paths, found: _build(found[2], cfg.image_size, cfg.channels),
    locate=_locate,
    check=lambda cfg, arrays: ragged_problem(arrays, SPLITS, (cfg.image_size, cfg.image_size, cfg.channels)),
    keys=lambda cfg: ragged_keys(SPLITS),
    to_splits=ragged_splits,
)


def load_image_folder_with_names(
    path: str | os.PathLike,
    data_dir: str | None,
    image_size: int,
    channels: int,
    split_ratios: Sequence[float],
    split_seed: int,
) -> tuple[dict[str, ClassImages], dict[str, list[str]]]:
    """Like :func:`load_image_folder`, plus ``{split: class names}`` in class-index order."""
    image_size, channels, ratios, split_seed = _check_settings(image_size, channels, split_ratios, split_seed)
    settings = SimpleNamespace(
        path=path,
        data_dir=data_dir,
        image_size=image_size,
        channels=channels,
        split_ratios=ratios,
        split_seed=split_seed,
    )
    data, arrays = load_with_arrays(SPEC, settings, what=f"image_folder {path}")
    names = {split: [str(n) for n in arrays[f"{split}_classes"]] for split in SPLITS}
    return data, names


def load_image_folder(
    path: str,
    data_dir: str | None,
    image_size: int,
    channels: int,
    split_ratios: Sequence[float],
    split_seed: int,
) -> dict[str, ClassImages]:
    """{"train","validation","test"} -> ClassImages(images uint8 (N, image_size, image_size, channels),
    counts (C,)).

    See the module docstring for the two layouts, the split rule, decoding and the cache.
    Errors: ConfigError for bad ``image_size`` / ``channels`` / ``split_ratios`` /
    ``split_seed``; DataError (naming ``dataset.path``) for a missing folder, no classes,
    an incomplete split layout, a class in two splits, or an undecodable image.
    """
    return load_image_folder_with_names(path, data_dir, image_size, channels, split_ratios, split_seed)[0]


def load_config(cfg: Any) -> dict[str, ClassImages]:
    """The splits for a DatasetConfig with ``name=image_folder``."""
    return load_image_folder(
        cfg.path, cfg.data_dir, cfg.image_size, cfg.channels, list(cfg.split_ratios), cfg.split_seed
    )


# ----------------------------------------------------------------------------- evaluation-only folders


def read_image(file: str | os.PathLike, image_size: int, channels: int) -> np.ndarray:
    """One image file as this module decodes it: uint8 (image_size, image_size, channels).

    DataError (with the decoder's exception as ``__cause__``) if it cannot be decoded.
    """
    return _decode_image(Path(file), int(image_size), int(channels))


def load_test_folder(
    path: str | os.PathLike, image_size: int, channels: int
) -> tuple[ClassImages, list[str], str]:
    """A whole image folder as one evaluation split: ``(ClassImages, class names, where)``.

    Flat layout (``DIR/<class>/<images>``): every class folder. Split layout
    (``DIR/train|val|test/...``): its test folder only. No train or validation classes are
    needed, and nothing is cached (the images are decoded on each call). ``where`` says which
    folder was read.
    """
    if path is None or not str(path).strip():
        raise DataError("dataset.path is not set; give the image folder, e.g. dataset.path=/data/my_images")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset.path {root} is not a directory")
    root = root.resolve()
    split_dirs = _split_layout_dirs(root)
    folder = root if split_dirs is None else split_dirs["test"]
    classes = _classes_in(folder)
    if not classes:
        raise DataError(
            f"dataset.path {folder} has no class subfolders with image files "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    files = [class_dir / rel for _, class_dir, rels in classes for rel in rels]
    images = np.empty((len(files), image_size, image_size, channels), np.uint8)
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for i, img in enumerate(pool.map(lambda f: _decode_image(f, image_size, channels), files)):
            images[i] = img
    counts = np.array([len(rels) for _, _, rels in classes], np.int64)
    where = (
        f"all {len(classes)} classes of {folder}"
        if split_dirs is None
        else f"{len(classes)} classes of {folder}"
    )
    return ClassImages(images, counts), [name for name, _, _ in classes], where


@schema("dataset", "image_folder")
@dataclass
class ImageFolderConfig(SplitByRatiosConfig):
    """A folder of images: path (one subfolder per class, or train/validation/test subfolders
    each holding class subfolders)."""

    path: str | None = None

    @classmethod
    def check(cls, d: Any, cfg: Any) -> None:
        super().check(d, cfg)
        need(d.path is not None, "dataset.path", d.path, "the image folder (one subfolder per class)")
        need(Path(str(d.path)).expanduser().is_dir(), "dataset.path", d.path, "an existing directory")
