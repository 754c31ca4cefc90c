"""Helpers shared by the dataset builders: data directories, checksums, the network probe,
atomic npz caches, and the array forms that :mod:`metalearn.tasks` samples episodes from.

Every image dataset is handed to the episode sampler as ``{"train", "validation", "test"}``,
each either

* a class-indexed uint8 array ``(num_classes, per_class, H, W, C)`` when every class has the
  same number of images (Omniglot, mini-ImageNet, CIFAR-FS, FC100), or
* :class:`ClassImages` (images grouped by class plus per-class counts) when they differ
  (users' image folders).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import urllib.parse
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from metalearn.config import ChoiceConfig, need, one_of

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
DATA_DIR_ENV = "METALEARN_DATA_DIR"
NETWORK_PROBE_TIMEOUT_S = 3.0


class ClassImages(NamedTuple):
    """One split whose classes hold different numbers of images.

    images: (N, H, W, C) uint8, grouped by class (class 0's images first, then class 1's...);
    counts: (num_classes,) int64, images per class, each >= 1, summing to N.
    """

    images: np.ndarray
    counts: np.ndarray


def default_data_dir() -> Path:
    """``$METALEARN_DATA_DIR`` if set, else ``~/tensorflow_datasets`` (TFDS's own default)."""
    return Path(os.environ.get(DATA_DIR_ENV) or "~/tensorflow_datasets").expanduser()


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir`` expanded, or :func:`default_data_dir` when it is None or empty."""
    return Path(data_dir).expanduser() if data_dir else default_data_dir()


def default_manual_dir(data_dir: str | os.PathLike) -> Path:
    """TFDS's default manual directory under ``data_dir``: ``<data_dir>/downloads/manual``."""
    return Path(data_dir).expanduser() / "downloads" / "manual"


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _probe_target(default_host: str) -> tuple[str, int]:
    """Host and port that a download would connect to first (the proxy, if one is set)."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        if parsed.hostname:
            return parsed.hostname, parsed.port or 8080
    return default_host, 443


def network_unavailable_reason(
    timeout: float = NETWORK_PROBE_TIMEOUT_S, host: str = "github.com"
) -> str | None:
    """``None`` if a TCP connection to ``host``:443 (or the HTTPS proxy) opens within ``timeout``.

    Otherwise a short reason. TFDS retries failing downloads with back-off for minutes, so
    this probe is what lets an offline run fail in seconds. Name resolution is not covered
    by the socket timeout, hence the thread with its own deadline.
    """
    host, port = _probe_target(host)
    result: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(None)
        except OSError as err:
            result.append(f"{host}:{port} unreachable ({type(err).__name__}: {err})")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if not result:
        return f"{host}:{port} unreachable (no answer within {timeout:.0f} s)"
    return result[0]


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` uncompressed (loading is then just a read) via temp file + rename, so
    an interrupted run never leaves a truncated cache behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_npz(path: Path, keys: tuple[str, ...], what: str) -> dict[str, np.ndarray] | None:
    """The arrays ``keys`` of the npz at ``path``; None (with a warning) if it is absent,
    unreadable or lacks a key, so that the caller rebuilds it."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in keys}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        log.warning("%s cache %s is unreadable (%s); rebuilding it", what, path, err)
        return None


@contextlib.contextmanager
def tfds_in_memory_shuffle(limit_bytes: int = 16 << 30):
    """Let TFDS keep up to ``limit_bytes`` of a split's serialized examples in memory while
    it writes a build.

    Past its buffer (1 GB in tensorflow-datasets 4.9) TFDS spills examples to temporary
    bucket files through ``tf.io.gfile``, which needs TensorFlow; mini-ImageNet's train
    split is larger than that. Our builds are written from data already in memory, so
    holding the serialized copy there too costs about as much again and needs no
    TensorFlow. The module constant is restored afterwards.
    """
    from tensorflow_datasets.core import shuffle

    previous = getattr(shuffle, "MAX_MEM_BUFFER_SIZE", None)
    if previous is None:  # a TFDS without this buffer: nothing to adjust
        yield
        return
    shuffle.MAX_MEM_BUFFER_SIZE = max(previous, limit_bytes)
    try:
        yield
    finally:
        shuffle.MAX_MEM_BUFFER_SIZE = previous


def url_infos(archives) -> dict:
    """``{url: tfds UrlInfo(size, sha256, filename)}`` for archives with ``url``, ``size``,
    ``sha256`` and ``name``: a builder's ``url_infos``, registered in code rather than in a
    checksums file beside the module, so TFDS validates every download against them."""
    import tensorflow_datasets as tfds

    return {
        a.url: tfds.download.checksums.UrlInfo(size=a.size, checksum=a.sha256, filename=a.name)
        for a in archives
    }


@dataclass
class EpisodeConfig(ChoiceConfig):
    """Keys of every task distribution: ways (n_way; 1 for regression), shots and query
    examples per class of an episode."""

    n_way: int = 1
    k_shot: int = 10
    k_query: int = 10

    @classmethod
    def check(cls, d: Any, cfg: Any) -> None:
        need(d.k_shot >= 1, "dataset.k_shot", d.k_shot, ">= 1")
        need(d.k_query >= 1, "dataset.k_query", d.k_query, ">= 1")


PLACEMENTS = ("auto", "device", "host")


EPISODES = ("fixed", "variable")
# How a padded episode is computed (docs/episodes.md): "exact" in row chunks, padding changes
# no bit (metalearn/rows.py); "masked" with masks alone, equal to float64 rounding, faster.
PADDINGS = ("exact", "masked")


def check_variable_bounds(d: Any) -> None:
    """dataset.episodes and the bounds of variable episodes (read only when variable)."""
    one_of(d.episodes, "dataset.episodes", EPISODES)
    need(d.min_ways >= 2, "dataset.min_ways", d.min_ways, ">= 2")
    need(d.max_ways >= d.min_ways, "dataset.max_ways", d.max_ways, f">= dataset.min_ways ({d.min_ways})")
    need(
        d.max_support >= d.max_ways,
        "dataset.max_support",
        d.max_support,
        f">= dataset.max_ways ({d.max_ways}): every way has at least one shot",
    )
    need(d.max_query >= 1, "dataset.max_query", d.max_query, ">= 1")
    one_of(d.padding, "dataset.padding", PADDINGS)


@dataclass
class ImageDatasetConfig(EpisodeConfig):
    """Keys of every image dataset. n_way_train: ways of the meta-training episodes when they
    differ from the evaluation ones (ProtoNets train 60-way for 5-way tests; only algorithms
    without a fixed-size output layer); k_query_test: query examples per class of validation
    and test episodes (null: k_query); image_size: images are resized to this side; data_dir:
    where prepared data is kept (null: $METALEARN_DATA_DIR, else ~/tensorflow_datasets);
    placement: where episodes are sampled, "device" (the split in accelerator memory, sampled
    inside the jitted step), "host" (a background thread gathers and prefetches each batch,
    prefetch batches ahead) or "auto" (device when the data fits); train_on_validation: the
    training episodes draw from the training and the validation classes together (ProtoNet's
    retraining on train+validation, jakesnell/prototypical-networks
    scripts/train/few_shot/trainval.py; there is no validation then). episodes: "fixed"
    (n_way-way k_shot-shot episodes) or "variable" (Meta-Dataset's variable-way,
    variable-shot episodes, padded to min_ways..max_ways ways, at most max_support support
    examples and max_query queries per class; docs/episodes.md, metalearn/episodes.py);
    padding: how a padded episode is computed, "exact" (row chunks: bitwise the numbers of
    the unpadded episode) or "masked" (masks alone: the same to float64 rounding, faster)."""

    n_way: int = 5
    k_shot: int = 1
    k_query: int = 1
    n_way_train: int | None = None
    k_query_test: int | None = None
    image_size: int = 28
    data_dir: str | None = None
    placement: str = "auto"
    prefetch: int = 2
    train_on_validation: bool = False
    episodes: str = "fixed"
    min_ways: int = 5
    max_ways: int = 50
    max_support: int = 500
    max_query: int = 10
    padding: str = "exact"

    @classmethod
    def check(cls, d: Any, cfg: Any) -> None:
        EpisodeConfig.check(d, cfg)
        need(d.n_way >= 2, "dataset.n_way", d.n_way, ">= 2 for classification")
        if d.n_way_train is not None:
            need(d.n_way_train >= 2, "dataset.n_way_train", d.n_way_train, ">= 2 or null")
        need(d.image_size >= 4, "dataset.image_size", d.image_size, ">= 4")
        one_of(d.placement, "dataset.placement", PLACEMENTS)
        need(d.prefetch >= 1, "dataset.prefetch", d.prefetch, ">= 1")
        need(
            d.k_query_test is None or d.k_query_test >= 1,
            "dataset.k_query_test",
            d.k_query_test,
            ">= 1 or null",
        )
        limits = cls.episode_limits(d)
        if limits is not None:
            check_episode_shape(d, *limits)
        check_variable_bounds(d)
        if d.episodes == "variable":
            evaluation = getattr(cfg, "eval", None)
            k_query = getattr(evaluation, "k_query", None)
            need(k_query is None, "eval.k_query", k_query, "null with dataset.episodes=variable")
            # The backbone rules (metalearn/adaptation.py) read unmasked support sets.
            rule = getattr(evaluation, "adaptation", "algorithm")
            need(rule == "algorithm", "eval.adaptation", rule, "'algorithm' with dataset.episodes=variable")

    @classmethod
    def episode_limits(cls, d: Any) -> tuple[int, int, str] | None:
        """(images per class, classes of the smallest split, a name for messages) when known
        before the data is read; None for datasets known only once read."""
        return None


def check_episode_shape(d: Any, per_class: int, classes: int, where: str) -> None:
    """Episode shapes the dataset cannot hold fail before any data is read (tasks.image_source
    checks the loaded arrays again, e.g. for custom archives)."""
    need(
        d.k_shot + d.k_query <= per_class,
        "dataset.k_shot + dataset.k_query",
        d.k_shot + d.k_query,
        f"<= {per_class} (images per class of {where})",
    )
    if d.k_query_test is not None:
        need(
            d.k_shot + d.k_query_test <= per_class,
            "dataset.k_shot + dataset.k_query_test",
            d.k_shot + d.k_query_test,
            f"<= {per_class} (images per class of {where})",
        )
    need(
        d.n_way <= classes,
        "dataset.n_way",
        d.n_way,
        f"<= {classes} (classes of the smallest split of {where})",
    )


def check_manual_dir(d: Any) -> None:
    need(
        d.manual_dir is None or Path(d.manual_dir).expanduser().is_dir(),
        "dataset.manual_dir",
        d.manual_dir,
        "an existing directory holding the dataset files",
    )


@dataclass
class ArchiveDatasetConfig(ImageDatasetConfig):
    """An image dataset built from published archives: manual_dir, a folder holding them (no
    download), and download (fetch them when neither manual_dir nor a prepared copy exists)."""

    manual_dir: str | None = None
    download: bool = True

    @classmethod
    def check(cls, d: Any, cfg: Any) -> None:
        super().check(d, cfg)
        check_manual_dir(d)


@dataclass
class SplitByRatiosConfig(ImageDatasetConfig):
    """An image dataset whose classes are split by fractions (image folders, TFDS datasets):
    channels (1 grey, 3 RGB), split_ratios (train/validation/test fractions of the classes,
    when the data is not split already) and split_seed (the class permutation)."""

    channels: int = 3
    split_ratios: list[float] = field(default_factory=lambda: [0.64, 0.16, 0.2])
    split_seed: int = 0

    @classmethod
    def check(cls, d: Any, cfg: Any) -> None:
        super().check(d, cfg)
        need(d.channels in (1, 3), "dataset.channels", d.channels, "1 (grey) or 3 (RGB)")
        ratios = list(d.split_ratios)
        need(
            len(ratios) == 3 and all(r >= 0 for r in ratios) and abs(sum(ratios) - 1) < 1e-6,
            "dataset.split_ratios",
            ratios,
            "three fractions >= 0 (train, validation, test) summing to 1",
        )
