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
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from numbers import Integral, Real
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from metalearn.data.common import SPLITS, ClassImages, load_npz, resolve_data_dir, save_npz_atomic
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
RESAMPLE = Image.Resampling.LANCZOS
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


def split_counts(num_classes: int, split_ratios: Sequence[float]) -> tuple[int, int, int]:
    """(train, validation, test) class counts for the flat layout; see the module docstring.

    Raises DataError naming ``dataset.split_ratios`` and the class count when a split would
    get no class.
    """
    ratios = [float(r) for r in split_ratios]
    exact = [num_classes * r for r in ratios]
    counts = [min(num_classes, math.floor(x + 1e-9)) for x in exact]
    while sum(counts) > num_classes:  # only possible through the 1e-6 tolerance on the sum
        counts[counts.index(max(counts))] -= 1
    left = num_classes - sum(counts)
    by_remainder = sorted(range(3), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:left]:
        counts[i] += 1
    for i in range(3):
        if counts[i] == 0 and ratios[i] > 0:
            donor = max(range(3), key=lambda j: (counts[j], -j))
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] = 1
    if min(counts) < 1:
        raise DataError(
            f"dataset.split_ratios {ratios} split {num_classes} classes into {counts[0]} train / "
            f"{counts[1]} validation / {counts[2]} test; every split needs at least 1 class "
            "(add classes or change the ratios)"
        )
    return counts[0], counts[1], counts[2]


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
    n_train, n_val, _ = split_counts(len(classes), split_ratios)
    order = np.random.default_rng(split_seed).permutation(len(classes))
    shuffled = [classes[i] for i in order]
    cuts = {
        "train": shuffled[:n_train],
        "validation": shuffled[n_train : n_train + n_val],
        "test": shuffled[n_train + n_val :],
    }
    return "flat", {split: sorted(cls, key=lambda c: c[0]) for split, cls in cuts.items()}


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


def _cache_keys() -> tuple[str, ...]:
    return tuple(f"{split}_{part}" for split in SPLITS for part in ("images", "counts", "classes"))


def _cache_ok(arrays: dict[str, np.ndarray], image_shape: tuple[int, int, int], path: Path) -> bool:
    """True if the cached arrays are consistent; else warn and return False (-> rebuild)."""
    for split in SPLITS:
        images, counts, names = (arrays[f"{split}_{p}"] for p in ("images", "counts", "classes"))
        ok = (
            images.dtype == np.uint8
            and images.ndim == 4
            and images.shape[1:] == image_shape
            and counts.ndim == 1
            and counts.dtype.kind in "iu"
            and len(counts) >= 1
            and int(counts.min()) >= 1
            and int(counts.sum()) == len(images)
            and names.dtype.kind == "U"
            and names.shape == counts.shape
        )
        if not ok:
            log.warning("image_folder cache %s has inconsistent %s arrays; rebuilding it", path, split)
            return False
    return True


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
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), RESAMPLE)
            arr = np.asarray(img, dtype=np.uint8)
    except Exception as err:  # PIL raises many types on broken files; all mean "cannot decode"
        raise DataError(
            f"dataset.path: cannot decode image {file} ({type(err).__name__}: {_one_line(err)})"
        ) from err
    return arr[:, :, None] if arr.ndim == 2 else arr


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
    if path is None or not str(path).strip():
        raise DataError("dataset.path is not set; give the image folder, e.g. dataset.path=/data/my_images")
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"dataset.path {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset.path {root} is not a directory")
    root = root.resolve()

    layout, splits = _scan(root, ratios, split_seed)
    cache = _cache_file(
        data_dir, root, _fingerprint(root, layout, splits, image_size, channels, ratios, split_seed)
    )
    arrays = load_npz(cache, _cache_keys(), "image_folder")
    if arrays is None or not _cache_ok(arrays, (image_size, image_size, channels), cache):
        started = time.perf_counter()
        arrays = _build(splits, image_size, channels)
        save_npz_atomic(cache, arrays)
        log.info(
            "image_folder %s (%s layout): decoded %d images in %.1f s; cache %s",
            root,
            layout,
            sum(len(arrays[f"{s}_images"]) for s in SPLITS),
            time.perf_counter() - started,
            cache,
        )
    data = {
        split: ClassImages(arrays[f"{split}_images"], arrays[f"{split}_counts"].astype(np.int64))
        for split in SPLITS
    }
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


def describe(arrays: Mapping[str, ClassImages | np.ndarray]) -> str:
    """One line for the training log, e.g.
    ``"train 40 classes / 2400 images, validation 10 classes / 600 images, test ... (84x84x3)"``.

    Accepts :class:`ClassImages` splits or class-indexed ``(C, per_class, H, W, ch)`` arrays.
    """
    parts, shape = [], None
    for split, value in arrays.items():
        if isinstance(value, ClassImages):
            n_classes, n_images = len(value.counts), int(np.sum(value.counts))
            shape = value.images.shape[1:]
        else:
            n_classes, n_images = value.shape[0], value.shape[0] * value.shape[1]
            shape = value.shape[2:]
        parts.append(f"{split} {n_classes} classes / {n_images} images")
    line = ", ".join(parts)
    return f"{line} ({'x'.join(str(d) for d in shape)})" if shape else line


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
