"""The one pipeline every image dataset goes through.

A dataset is a small module that declares a :class:`DatasetSpec`: which settings it checks and
where its files are (:attr:`DatasetSpec.locate`), the name of its class-array cache
(:attr:`~DatasetSpec.cache_name`), how to build the class arrays from its files
(:attr:`~DatasetSpec.build`, usually through :func:`prepare_tfds` and :func:`read_split`),
what makes a cached copy unusable (:attr:`~DatasetSpec.check`) and how the cached arrays become
the per-split input of the episode sampler (:attr:`~DatasetSpec.to_splits`). Everything else
is done here, once:

1. resolve ``data_dir`` (argument, else ``$METALEARN_DATA_DIR``, else ``~/tensorflow_datasets``)
   and ``manual_dir`` (default ``<data_dir>/downloads/manual``);
2. locate the files (the spec's checks: checksums, structure);
3. load ``<data_dir>/<cache_dir>/<cache_name>.npz`` if it is there and passes the check;
4. otherwise, holding an inter-process lock on that cache file, look again (another process
   may have just written it), else build and write it atomically;
5. log one description line (classes and images per split, image shape, cache file).

Placement on device or host is :func:`metalearn.tasks.image_source`'s job, for every dataset.

Concurrency: a TFDS build (:func:`prepare_tfds`) and each cache write hold an exclusive
``fcntl.flock`` on a lock file of their own (:func:`lock_file`), so N jobs started
together on an empty data dir all succeed: one builds, the others wait (printing a line that
says for what and for whom) and then reuse its result. A lock held by a process that dies is
released by the kernel; the next holder sees the dead process's pid in the lock file, says so,
and removes the half-written TFDS ``incomplete.*`` folders that process left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from metalearn.data.common import (
    SPLITS,
    ClassImages,
    default_manual_dir,
    load_npz,
    resolve_data_dir,
    save_npz_atomic,
    tfds_in_memory_shuffle,
)
from metalearn.errors import ConfigError, DataError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- locking


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


LOCK_DIRNAME = ".metalearn_locks"


def lock_file(target: str | os.PathLike, data_root: str | os.PathLike) -> Path:
    """The lock file for building ``target``: ``<data_root>/.metalearn_locks/<target's path
    relative to data_root, '/' written as '__'>.lock`` (one hidden folder, so a build that
    fails leaves no dataset folder behind)."""
    target, root = Path(target).absolute(), Path(data_root).absolute()
    try:
        name = "__".join(target.relative_to(root).parts)
    except ValueError:
        name = hashlib.sha256(str(target).encode()).hexdigest()[:16] + "_" + target.name
    return root / LOCK_DIRNAME / f"{name}.lock"


@contextlib.contextmanager
def file_lock(target: str | os.PathLike, what: str, data_root: str | os.PathLike) -> Iterator[bool]:
    """Hold an exclusive inter-process lock (``fcntl.flock`` on :func:`lock_file`) for
    building ``target`` (a folder or file under ``data_root``).

    If another process holds it, print ``metalearn: waiting for another process (pid N)
    building <what> ...`` and block until it is released (the kernel releases the lock of a
    process that dies). Yields True when the previous holder died without finishing (its
    pid is still in the lock file), so that the caller can clean up after it.
    """
    target = Path(target)
    lock_path = lock_file(target, data_root)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            print(
                f"metalearn: waiting for another process (pid {holder}) building {what} ({target})",
                flush=True,
            )
            started = time.perf_counter()
            fcntl.flock(f, fcntl.LOCK_EX)
            log.info("%s: lock released after %.1f s", what, time.perf_counter() - started)
        f.seek(0)
        previous = f.read().strip()
        interrupted = previous.isdigit() and int(previous) != os.getpid() and not _pid_alive(int(previous))
        if interrupted:
            print(
                f"metalearn: a build of {what} by pid {previous} was interrupted; taking over its lock",
                flush=True,
            )
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield interrupted
        finally:
            f.seek(0)
            f.truncate()  # a finished build leaves an empty lock file
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- TFDS


def remove_incomplete_builds(folder: Path) -> None:
    """Remove TFDS ``incomplete.*`` folders in ``folder``: called only while holding the build
    lock, when they can only be left over from a process killed mid-build."""
    if not folder.is_dir():
        return
    for leftover in sorted(folder.glob("incomplete.*")):
        print(f"metalearn: removing {leftover}, left by an interrupted TFDS build", flush=True)
        shutil.rmtree(leftover, ignore_errors=True)


def _is_prepared(builder) -> bool:
    return (Path(builder.data_dir) / "dataset_info.json").is_file() and builder.is_prepared()


def prepare_tfds(
    make_builder: Callable[..., Any],
    what: str,
    *,
    locate: Callable[[], Mapping[str, Any]] | None = None,
    manual_dir: str | os.PathLike | None = None,
    in_memory_shuffle: bool = False,
    prepared: Callable[[], bool] | None = None,
    data_root: str | os.PathLike,
):
    """A prepared TFDS builder: ``make_builder()`` if its dataset is already built, else built
    once under :func:`file_lock`.

    ``locate()`` (called only when a build is needed) returns extra keyword arguments for
    ``make_builder`` (e.g. verified archive paths), so missing or corrupt files fail in
    seconds, before TFDS starts. ``prepared()``: a cheap check that avoids constructing a
    builder for a folder that does not exist (TFDS warns about that).
    """
    import tensorflow_datasets as tfds

    if prepared is not None and prepared():
        return make_builder()
    builder = make_builder()
    if _is_prepared(builder):
        return builder
    version_dir = Path(builder.data_dir)
    with file_lock(version_dir, f"TFDS {what}", data_root):
        builder = make_builder()
        if _is_prepared(builder):  # built by another process while this one waited
            return builder
        remove_incomplete_builds(version_dir.parent)
        builder = make_builder(**(locate() if locate is not None else {}))
        started = time.perf_counter()
        config = tfds.download.DownloadConfig(
            # try_download_gcs=False: otherwise TFDS asks Google Cloud Storage for a prebuilt copy.
            try_download_gcs=False,
            manual_dir=os.fspath(manual_dir) if manual_dir is not None else None,
        )
        with tfds_in_memory_shuffle() if in_memory_shuffle else contextlib.nullcontext():
            builder.download_and_prepare(download_config=config)
        log.info("built TFDS %s in %.1f s (%s)", what, time.perf_counter() - started, builder.data_dir)
    return builder


def read_split(builder, split: str) -> list[dict[str, Any]]:
    """Every record of ``split``, decoded to numpy, through an array_record data source
    (random access, no TensorFlow)."""
    source = builder.as_data_source(split=split)
    return list(source.__getitems__(range(len(source))))


def text(value: Any) -> str:
    """A Text feature as str (data sources return bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------- datasets


class Paths(NamedTuple):
    """Where a dataset's files go: ``data_root`` (builds, caches) and ``manual`` (files placed
    by hand)."""

    data_root: Path
    manual: Path


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset module declares; :func:`load` does the rest (see the module docstring).

    Callables take the settings ``cfg`` (a DatasetConfig or any object with the same
    attributes), the :class:`Paths`, and what ``locate`` returned (``found``).
    """

    name: str  # dataset.name
    what: str  # the dataset's name in messages
    cache_dir: str  # folder under data_dir holding the npz caches
    cache_name: Callable[[Any, Any], str]  # (cfg, found) -> npz file name
    build: Callable[[Any, Paths, Any], dict[str, np.ndarray]]  # (cfg, paths, found) -> arrays
    # (cfg, paths) -> anything build and cache_name need; raises ConfigError / DataError early.
    locate: Callable[[Any, Paths], Any] = lambda cfg, paths: None
    # (cfg, cached arrays) -> why they cannot be used ("" / None: they can).
    check: Callable[[Any, dict[str, np.ndarray]], str | None] = lambda cfg, arrays: None
    # The npz keys (default: one class-indexed array per split).
    keys: Callable[[Any], tuple[str, ...]] = lambda cfg: SPLITS
    # Cached arrays -> {split: class-indexed array or ClassImages} for the sampler.
    to_splits: Callable[[dict[str, np.ndarray]], dict[str, Any]] = field(default=lambda arrays: arrays)


def paths_of(cfg: Any) -> Paths:
    data_root = resolve_data_dir(getattr(cfg, "data_dir", None))
    manual_dir = getattr(cfg, "manual_dir", None)
    manual = Path(manual_dir).expanduser() if manual_dir else default_manual_dir(data_root)
    return Paths(data_root, manual)


def class_array_problem(arrays: Mapping[str, np.ndarray], image_shape: tuple[int, ...]) -> str | None:
    """Why ``arrays`` are not uint8 ``(classes, per_class, *image_shape)`` arrays, or None."""
    for split, arr in arrays.items():
        if arr.dtype != np.uint8 or arr.ndim != 5 or arr.shape[2:] != tuple(image_shape):
            return f"has a bad {split} array {arr.dtype} {arr.shape}"
    return None


def load_arrays(spec: DatasetSpec, cfg: Any) -> tuple[dict[str, np.ndarray], Path]:
    """The cached arrays of ``spec`` for settings ``cfg`` (built and cached if needed), and
    the cache file."""
    paths = paths_of(cfg)
    found = spec.locate(cfg, paths)
    path = paths.data_root / spec.cache_dir / spec.cache_name(cfg, found)
    keys = spec.keys(cfg)

    def usable() -> dict[str, np.ndarray] | None:
        arrays = load_npz(path, keys, spec.what)
        if arrays is None:
            return None
        problem = spec.check(cfg, arrays)
        if problem:
            log.warning("%s cache %s %s; rebuilding it", spec.what, path, problem)
            return None
        return arrays

    arrays = usable()
    if arrays is not None:
        return arrays, path
    with file_lock(path, f"the {spec.what} cache", paths.data_root) as interrupted:
        if interrupted:  # the temporary file of save_npz_atomic that the dead process left
            for leftover in path.parent.glob(f".{path.name}.*.tmp"):
                leftover.unlink(missing_ok=True)
        arrays = usable()  # written by another process while this one waited
        if arrays is None:
            started = time.perf_counter()
            arrays = spec.build(cfg, paths, found)
            save_npz_atomic(path, arrays)
            log.info("%s: built %s in %.1f s", spec.what, path, time.perf_counter() - started)
    return arrays, path


def load(spec: DatasetSpec, cfg: Any) -> dict[str, Any]:
    """``{split: class-indexed uint8 array or ClassImages}`` of ``spec`` for settings ``cfg``,
    with the description line logged."""
    return load_with_arrays(spec, cfg)[0]


def load_with_arrays(spec: DatasetSpec, cfg: Any, what: str | None = None) -> tuple[dict[str, Any], dict]:
    """Like :func:`load`, plus the cached arrays themselves, for what ``to_splits`` leaves out
    (e.g. class names). ``what``: the dataset's name in the description line (default
    ``spec.what``)."""
    arrays, path = load_arrays(spec, cfg)
    splits = spec.to_splits(arrays)
    log.info("%s: %s; cache %s", what or spec.what, describe(splits), path)
    return splits, arrays


# ----------------------------------------------------------------------------- shared steps

RESAMPLE = Image.Resampling.LANCZOS


def check_image_size(image_size: Any) -> int:
    """``dataset.image_size`` as an int; ConfigError unless it is a positive integer."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ConfigError(f"dataset.image_size must be a positive integer, got {image_size!r}")
    return int(image_size)


def resize_images(images: np.ndarray, image_size: int) -> np.ndarray:
    """Square uint8 images (N, S, S) or (N, S, S, C) -> (N, image_size, image_size[, C]), each
    resized with PIL LANCZOS; returned as they are when S is already ``image_size``."""
    if images.shape[1] == image_size:
        return images
    out = np.empty((len(images), image_size, image_size, *images.shape[3:]), np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(img).resize((image_size, image_size), RESAMPLE))
    return out


def stack_by_class(groups: Mapping[str, list[tuple[int, np.ndarray]]], classes: Sequence[str]) -> np.ndarray:
    """``{class: [(order, image), ...]}`` -> (len(classes), images per class, *image) with the
    classes in the order of ``classes`` and each class's images sorted by ``order`` (records
    come back from TFDS shuffled)."""
    return np.stack(
        [np.stack([img for _, img in sorted(groups[c], key=lambda pair: pair[0])]) for c in classes]
    )


def to_pixels(img: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """A PIL image as ``(image_size, image_size, channels)`` uint8: converted to ``"L"``
    (channels=1) or ``"RGB"`` and resized with LANCZOS without keeping the aspect ratio (an
    image already of that size is used as is)."""
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), RESAMPLE)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def split_counts(num_classes: int, split_ratios: Sequence[float]) -> tuple[int, int, int]:
    """(train, validation, test) class counts for ``split_ratios``; see :func:`split_classes`.

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


def split_classes(num_classes: int, split_ratios, split_seed: int) -> dict[str, list[int]]:
    """Class indices 0..num_classes-1 per split: permuted with
    ``np.random.default_rng(split_seed)`` and cut in that order by :func:`split_counts`
    (each split's share first rounded down, the classes left over to the largest fractional
    parts, ties train, validation, test; a split with a positive ratio left empty takes one
    class from the largest); each split's indices sorted."""
    n_train, n_val, _ = split_counts(num_classes, split_ratios)
    order = [int(i) for i in np.random.default_rng(split_seed).permutation(num_classes)]
    cuts = {
        "train": order[:n_train],
        "validation": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
    return {split: sorted(idx) for split, idx in cuts.items()}


# Classes of different sizes are cached as ``<split>_images`` (N, H, W, C) uint8 grouped by
# class, ``<split>_counts`` (classes,) and ``<split>_classes`` (class names, unicode).
def ragged_keys(splits) -> tuple[str, ...]:
    return tuple(f"{split}_{part}" for split in splits for part in ("images", "counts", "classes"))


def ragged_problem(arrays: Mapping[str, np.ndarray], splits, image_shape: tuple[int, ...]) -> str | None:
    """Why the cached ragged arrays of ``splits`` are inconsistent (-> rebuild), or None."""
    for split in splits:
        images, counts, names = (arrays[f"{split}_{p}"] for p in ("images", "counts", "classes"))
        ok = (
            images.dtype == np.uint8
            and images.ndim == 4
            and images.shape[1:] == tuple(image_shape)
            and counts.ndim == 1
            and counts.dtype.kind in "iu"
            and len(counts) >= 1
            and int(counts.min()) >= 1
            and int(counts.sum()) == len(images)
            and names.dtype.kind == "U"
            and names.shape == counts.shape
        )
        if not ok:
            return f"has inconsistent {split} arrays"
    return None


def ragged_splits(arrays: Mapping[str, np.ndarray]) -> dict[str, ClassImages]:
    """``{split: ClassImages}`` for every split present in cached ragged arrays."""
    return {
        split: ClassImages(arrays[f"{split}_images"], arrays[f"{split}_counts"].astype(np.int64))
        for split in SPLITS
        if f"{split}_images" in arrays
    }


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
