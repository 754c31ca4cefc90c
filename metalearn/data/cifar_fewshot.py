"""CIFAR-FS and FC100: few-shot splits of CIFAR-100, as class-indexed uint8 arrays.

(Over 500 lines because both datasets share one archive reader and cache, and the module holds
their published class and superclass lists, about 100 lines of data.)

Both datasets use all 600 images of each CIFAR-100 fine class (its 500 training and 100 test
images), 32x32x3 uint8 RGB, and split the 100 *classes* (never single images) three ways:

* **CIFAR-FS** (Bertinetto et al., ICLR 2019, "Meta-learning with differentiable closed-form
  solvers"): 64 train / 16 validation / 20 test classes, the class lists of their release
  (:data:`CIFAR_FS_CLASSES`).
* **FC100** (Oreshkin et al., NeurIPS 2018, "TADAM"): split by superclass so that the splits
  share as little as possible: 12 / 4 / 4 superclasses = 60 / 20 / 20 classes
  (:data:`FC100_SUPERCLASSES`).

``load_cifar_fs`` / ``load_fc100`` return ``{"train", "validation", "test"}``, each of shape
``(num_classes, 600, 32, 32, 3)`` uint8. Class ``i`` of a split is the ``i``-th name of
:func:`class_names` (CIFAR-FS: the order of :data:`CIFAR_FS_CLASSES`; FC100: superclasses in
the order of :data:`FC100_SUPERCLASSES`, each one's five classes in the order of
:data:`CIFAR100_SUPERCLASSES`, i.e. alphabetical). Images of a class are in archive order:
its 500 training images as they occur in the CIFAR-100 train file, then its 100 test images
as they occur in the test file.

Source: the original CIFAR-100 archive (https://www.cs.toronto.edu/~kriz/cifar.html), either

* ``cifar-100-binary.tar.gz`` (168513733 bytes, sha256 ``58a81ae1...``: the values registered
  by tensorflow-datasets for its ``cifar100`` dataset, ``url_checksums/cifar100.txt``); this
  is the one downloaded when it is missing, or
* ``cifar-100-python.tar.gz`` (169001437 bytes, sha256 ``85cd44d0...``: the value Keras'
  ``cifar100.load_data`` and torchvision's prototype datasets check; md5
  ``eb9058c3a382ffc7106e4002c42a8d85`` as published on the CIFAR page).

It is turned into the TFDS dataset ``metalearn_cifar100`` (splits ``train`` and ``test`` as in
CIFAR-100; features ``image``, ``label`` (fine), ``coarse_label``, ``id``), written as
array_record and read back with ``as_data_source``, so TensorFlow is never needed. TFDS's own
``cifar100`` builder is not used: it extracts the archive and reads it through
``tf.io.gfile`` and encodes ndarray images with ``tf.image``, so without TensorFlow its
preparation fails (``ExtractError: No module named 'tensorflow'``).

What is checked, before anything is built: the archive in ``manual_dir`` (argument, default
``<data_dir>/downloads/manual``) has the sha256 above (a wrong one: DataError naming file,
expected and actual sha256). Missing archive: with ``download`` and a reachable
www.cs.toronto.edu (a TCP probe of a few seconds) the binary archive is downloaded into
``<data_dir>/downloads/`` and checked by TFDS and again here; otherwise a one-line DataError
at once naming the archives, the directory and ``dataset.manual_dir``. While building: the
label names in the archive's meta file are the CIFAR-100 ones and every image's coarse label
agrees with :data:`CIFAR100_SUPERCLASSES`; all 100 classes have the same number of images.

Files under ``data_dir`` (argument, else ``$METALEARN_DATA_DIR``, else ``~/tensorflow_datasets``):

* ``metalearn_cifar100/1.0.0/``: the TFDS build;
* ``metalearn_cifar_fewshot_cache/{cifar_fs,fc100}_v<N>.npz``: the prepared arrays. Later
  calls load only this file; a corrupt one is rebuilt (from the TFDS build, which needs no
  archive once it exists).
"""

from __future__ import annotations

import codecs
import dataclasses
import io
import logging
import os
import pickle
import tarfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from metalearn.config import need, schema
from metalearn.data.common import (
    SPLITS,
    ArchiveDatasetConfig,
    network_unavailable_reason,
    sha256_of,
    url_infos,
)
from metalearn.data.pipeline import (
    DatasetSpec,
    Paths,
    class_array_problem,
    load,
    prepare_tfds,
    read_split,
    text,
)
from metalearn.errors import DataError

__all__ = [
    "ARCHIVES",
    "CIFAR100_COARSE_LABELS",
    "CIFAR100_FINE_LABELS",
    "CIFAR100_SUPERCLASSES",
    "CIFAR_FS_CLASSES",
    "DATASETS",
    "FC100_SUPERCLASSES",
    "MetalearnCifar100",
    "cache_path",
    "class_names",
    "load_cifar_fs",
    "load_fc100",
    "locate_archive",
]

log = logging.getLogger(__name__)

IMAGE_SHAPE = (32, 32, 3)
NUM_FINE = 100
NUM_COARSE = 20
SOURCE_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
DOWNLOAD_HOST = "www.cs.toronto.edu"
BASE_URL = "https://www.cs.toronto.edu/~kriz/"
CACHE_DIRNAME = "metalearn_cifar_fewshot_cache"
# Bump whenever the content of the cached arrays changes (class order, image order, splits).
CACHE_FORMAT_VERSION = 1
DATASETS = ("cifar_fs", "fc100")
_WHAT = {"cifar_fs": "CIFAR-FS", "fc100": "FC100"}


@dataclasses.dataclass(frozen=True)
class Archive:
    """One original CIFAR-100 archive: file name, size in bytes, sha256, member prefix."""

    name: str
    size: int
    sha256: str
    fmt: str  # "binary" or "python"

    @property
    def url(self) -> str:
        return BASE_URL + self.name


# Preference order: the first one present in manual_dir is used; the first is downloaded.
ARCHIVES: dict[str, Archive] = {
    a.name: a
    for a in (
        # Size and sha256 registered by tensorflow-datasets 4.9 for its `cifar100` dataset
        # (tensorflow_datasets/url_checksums/cifar100.txt).
        Archive(
            "cifar-100-binary.tar.gz",
            168513733,
            "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
            "binary",
        ),
        # sha256 checked by Keras (keras/datasets/cifar100.py, `file_hash`) and by torchvision's
        # prototype datasets (Cifar100._SHA256); md5 eb9058c3a382ffc7106e4002c42a8d85 on the
        # CIFAR page; size as published alongside those values.
        Archive(
            "cifar-100-python.tar.gz",
            169001437,
            "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
            "python",
        ),
    )
}
DOWNLOAD_ARCHIVE = "cifar-100-binary.tar.gz"

# CIFAR-100's 20 superclasses (coarse labels 0..19 in this order) and their five classes each,
# as listed on https://www.cs.toronto.edu/~kriz/cifar.html (names as in the archive's meta).
CIFAR100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
# Label names in label order: both are alphabetical in the archives' meta files.
CIFAR100_COARSE_LABELS: tuple[str, ...] = tuple(CIFAR100_SUPERCLASSES)
CIFAR100_FINE_LABELS: tuple[str, ...] = tuple(sorted(n for v in CIFAR100_SUPERCLASSES.values() for n in v))
SUPERCLASS_OF: dict[str, str] = {n: s for s, names in CIFAR100_SUPERCLASSES.items() for n in names}

# CIFAR-FS class split of Bertinetto et al. (2019). The release (bertinetto/r2d2, README "Data
# setup": cifarfs/splits/bertinetto/{train,val,test}.txt) is reproduced class for class by
# torchmeta's assets torchmeta/datasets/assets/cifar100/cifar-fs/{train,val,test}.json
# (github.com/tristandeleu/pytorch-meta), whose order (by superclass, then name) is kept here.
# fmt: off
CIFAR_FS_CLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "dolphin", "seal", "aquarium_fish", "ray", "trout", "orchid", "sunflower", "tulip",
        "bottle", "bowl", "can", "cup", "plate", "apple", "mushroom", "orange", "pear", "clock",
        "keyboard", "chair", "couch", "bee", "caterpillar", "cockroach", "bear", "lion", "tiger",
        "wolf", "bridge", "castle", "house", "road", "skyscraper", "cloud", "forest", "mountain",
        "elephant", "kangaroo", "porcupine", "possum", "raccoon", "skunk", "lobster", "spider",
        "boy", "girl", "dinosaur", "lizard", "snake", "turtle", "hamster", "mouse", "rabbit",
        "shrew", "squirrel", "oak_tree", "palm_tree", "pine_tree", "willow_tree", "bus", "train",
        "lawn_mower", "streetcar", "tank",
    ),
    "validation": (
        "beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly",
        "sea", "camel", "cattle", "crab", "crocodile", "maple_tree", "motorcycle", "tractor",
    ),
    "test": (
        "whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe",
        "leopard", "plain", "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman",
        "bicycle", "pickup_truck", "rocket",
    ),
}

# FC100 superclass split of Oreshkin et al. (2018): coarse labels train {1, 2, 3, 4, 5, 6, 9,
# 10, 15, 17, 18, 19}, validation {8, 11, 13, 16}, test {0, 7, 12, 14}, as used by the TADAM
# release (github.com/ElementAI/TADAM) and by torchmeta's assets
# torchmeta/datasets/assets/cifar100/fc100/{train,val,test}.json (tristandeleu/pytorch-meta).
FC100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "fish", "flowers", "food_containers", "fruit_and_vegetables",
        "household_electrical_devices", "household_furniture", "large_man-made_outdoor_things",
        "large_natural_outdoor_scenes", "reptiles", "trees", "vehicles_1", "vehicles_2",
    ),
    "validation": (
        "large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals",
    ),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}
# fmt: on


def class_names(dataset: str) -> dict[str, tuple[str, ...]]:
    """Fine class names per split, in the class order of the loaded arrays.

    ``dataset``: ``"cifar_fs"`` or ``"fc100"``.
    """
    if dataset == "cifar_fs":
        return dict(CIFAR_FS_CLASSES)
    if dataset == "fc100":
        return {
            split: tuple(n for sc in supers for n in CIFAR100_SUPERCLASSES[sc])
            for split, supers in FC100_SUPERCLASSES.items()
        }
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")


def cache_path(data_dir: str | os.PathLike, dataset: str) -> Path:
    """Path of the ``.npz`` holding the prepared arrays of ``dataset`` (cifar_fs or fc100)."""
    return Path(data_dir).expanduser() / CACHE_DIRNAME / f"{dataset}_v{CACHE_FORMAT_VERSION}.npz"


# ---------------------------------------------------------------------------------------------
# Archives: locate, verify, parse.


def cifar_manual_instructions(manual_dir: str | os.PathLike | None = None) -> str:
    """One line telling the user which archive to put where (config key ``dataset.manual_dir``)."""
    where = f"directory {manual_dir}" if manual_dir is not None else "a directory"
    return (
        f"download {DOWNLOAD_ARCHIVE} (or cifar-100-python.tar.gz) from {SOURCE_PAGE} and put it "
        f"in {where}, then set dataset.manual_dir to that directory"
    )


def verify_archive(path: str | os.PathLike, expected_sha256: str) -> None:
    """Raise DataError (one line: file, expected and actual sha256) if ``path`` does not match."""
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise DataError(
            f"CIFAR-100 archive {path} is corrupt or not the original file: "
            f"expected sha256 {expected_sha256}, got {actual}; delete it and download it again "
            f"from {SOURCE_PAGE} (dataset.manual_dir)"
        )


def locate_archive(
    manual_dir: str | os.PathLike | None,
    *,
    download: bool,
    checksums: Mapping[str, str] | None = None,
) -> Path | None:
    """The verified CIFAR-100 archive in ``manual_dir``, or None if it must be downloaded.

    The first of :data:`ARCHIVES` present is sha256-checked (against :data:`ARCHIVES`, or
    ``checksums`` ``{archive name: sha256}``, an override meant for tests and custom
    archives). Raises DataError at once if none is present and ``download`` is False or
    www.cs.toronto.edu is unreachable.
    """
    expected = {name: a.sha256 for name, a in ARCHIVES.items()}
    if checksums is not None:
        expected.update({k: v for k, v in checksums.items() if k in expected})
    if manual_dir is not None:
        for name in ARCHIVES:
            path = Path(manual_dir).expanduser() / name
            if path.is_file():
                verify_archive(path, expected[name])
                return path
    names = " or ".join(ARCHIVES)
    where = f"not found in {manual_dir}" if manual_dir is not None else "not found (no manual_dir)"
    if not download:
        raise DataError(
            f"CIFAR-100 archive {names} {where} and downloading is off: "
            + cifar_manual_instructions(manual_dir)
        )
    reason = network_unavailable_reason(host=DOWNLOAD_HOST)
    if reason is not None:
        raise DataError(
            f"CIFAR-100 archive {names} {where} and cannot be downloaded ({reason}): "
            + cifar_manual_instructions(manual_dir)
        )
    return None


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles the python-format CIFAR files (dicts, lists, bytes, numpy arrays) and
    refuses every other global, so a doctored file cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):  # bytes pickled by Python 3 at protocol 2
            return codecs.encode
        if (module, name) in {("numpy", "ndarray"), ("numpy", "dtype")}:
            return getattr(np, name)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _np_reconstruct()
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            return _np_scalar()
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-100 file")


def _np_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _np_scalar():
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return scalar


def _read_member(tar: tarfile.TarFile, member: str, archive: Path) -> bytes:
    try:
        f = tar.extractfile(member)
    except KeyError:
        f = None
    if f is None:
        raise DataError(f"CIFAR-100 archive {archive} has no file {member}; it is not the original archive")
    with f:
        return f.read()


def _unpickle(data: bytes, member: str, archive: Path) -> dict:
    try:
        obj = _ArraysOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:
        raise DataError(
            f"CIFAR-100 archive {archive}: cannot read {member} ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR-100 archive {archive}: {member} is not a pickled dict")
    return obj


def _names(raw) -> tuple[str, ...]:
    return tuple((n.decode() if isinstance(n, bytes) else str(n)).strip() for n in raw)


_Parsed = tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], tuple[str, ...], tuple[str, ...]]


def _parse_binary(tar: tarfile.TarFile, path: Path) -> _Parsed:
    """Records of 1 coarse byte, 1 fine byte, 3072 bytes of CHW pixels; names in .txt files."""
    prefix = "cifar-100-binary/"
    fine_names = _names(_read_member(tar, prefix + "fine_label_names.txt", path).decode().split())
    coarse_names = _names(_read_member(tar, prefix + "coarse_label_names.txt", path).decode().split())
    out = {}
    for split in ("train", "test"):
        member = f"{prefix}{split}.bin"
        raw = np.frombuffer(_read_member(tar, member, path), np.uint8)
        if raw.size == 0 or raw.size % 3074:
            raise DataError(f"CIFAR-100 archive {path}: {member} has a bad size {raw.size}")
        rec = raw.reshape(-1, 3074)
        images = np.ascontiguousarray(rec[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        out[split] = (images, rec[:, 1].astype(np.int64), rec[:, 0].astype(np.int64))
    return out, fine_names, coarse_names


def _parse_python(tar: tarfile.TarFile, path: Path) -> _Parsed:
    """Pickled dicts ``train`` / ``test`` (b"data" rows of CHW pixels, b"fine_labels",
    b"coarse_labels") and ``meta`` (b"fine_label_names", b"coarse_label_names")."""
    prefix = "cifar-100-python/"
    meta = _unpickle(_read_member(tar, prefix + "meta", path), prefix + "meta", path)
    fine_names = _names(meta.get(b"fine_label_names", ()))
    coarse_names = _names(meta.get(b"coarse_label_names", ()))
    out = {}
    for split in ("train", "test"):
        member = prefix + split
        d = _unpickle(_read_member(tar, member, path), member, path)
        try:
            data = np.asarray(d[b"data"], dtype=np.uint8)
            fine = np.asarray(d[b"fine_labels"], dtype=np.int64)
            coarse = np.asarray(d[b"coarse_labels"], dtype=np.int64)
        except KeyError as err:
            raise DataError(f"CIFAR-100 archive {path}: {member} lacks the key {err}") from err
        if data.ndim != 2 or data.shape[1] != 3072 or not len(data) == len(fine) == len(coarse) > 0:
            raise DataError(f"CIFAR-100 archive {path}: {member} has inconsistent arrays")
        images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        out[split] = (images, fine, coarse)
    return out, fine_names, coarse_names


def read_archive(path: str | os.PathLike, fmt: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Parse a CIFAR-100 archive without extracting it.

    Returns ``{"train"|"test": (images (N, 32, 32, 3) uint8, fine (N,) int64, coarse (N,)
    int64)}`` in file order. ``fmt``: ``"binary"`` (records of coarse byte, fine byte, 3072
    bytes of CHW pixels) or ``"python"`` (pickled dicts with ``b"data"``, ``b"fine_labels"``,
    ``b"coarse_labels"``). Checks the label names of the meta file(s) and that every coarse
    label matches :data:`CIFAR100_SUPERCLASSES`; DataError (one line) otherwise.
    """
    path = Path(path)
    if fmt not in ("binary", "python"):
        raise ValueError(f"unknown CIFAR-100 archive format {fmt!r}")
    try:
        with tarfile.open(path, "r:*") as tar:
            parse = _parse_binary if fmt == "binary" else _parse_python
            out, fine_names, coarse_names = parse(tar, path)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"CIFAR-100 archive {path} is not a readable tar.gz file ({err})") from err
    if fine_names != CIFAR100_FINE_LABELS or coarse_names != CIFAR100_COARSE_LABELS:
        raise DataError(
            f"CIFAR-100 archive {path} has unexpected label names; it is not the CIFAR-100 archive"
        )
    expected_coarse = np.array([CIFAR100_COARSE_LABELS.index(SUPERCLASS_OF[n]) for n in CIFAR100_FINE_LABELS])
    for split, (_, fine, coarse) in out.items():
        if fine.min() < 0 or fine.max() >= NUM_FINE or coarse.min() < 0 or coarse.max() >= NUM_COARSE:
            raise DataError(f"CIFAR-100 archive {path}: {split} has labels out of range")
        if not np.array_equal(expected_coarse[fine], coarse):
            raise DataError(
                f"CIFAR-100 archive {path}: {split} has coarse labels that disagree with the fine ones"
            )
    return out


# ---------------------------------------------------------------------------------------------
# TFDS builder.


class MetalearnCifar100(tfds.core.GeneratorBasedBuilder):
    """CIFAR-100 (``train`` 50000 / ``test`` 10000 images) from the original archive; see the
    module docstring. Named so that it does not clash with TFDS's own ``cifar100``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: binary or python archive, array_record."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download {DOWNLOAD_ARCHIVE} (or cifar-100-python.tar.gz) from {SOURCE_PAGE} and put it "
        "in the manual directory."
    )

    def __init__(self, *, archive: str | os.PathLike | None = None, **kwargs):
        """``archive``: result of :func:`locate_archive` (a verified local file; None =
        download the binary archive). Other kwargs go to TFDS."""
        self._archive = Path(archive) if archive is not None else None
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls) -> dict[str, tfds.download.checksums.UrlInfo]:
        return url_infos(ARCHIVES.values())

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="CIFAR-100: 100 classes (20 superclasses) of 32x32 colour images, 600 per class.",
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image": tfds.features.Image(shape=IMAGE_SHAPE),
                    "label": tfds.features.ClassLabel(names=list(CIFAR100_FINE_LABELS)),
                    "coarse_label": tfds.features.ClassLabel(names=list(CIFAR100_COARSE_LABELS)),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=SOURCE_PAGE,
            citation=(
                "@techreport{Krizhevsky09learningmultiple, author={Alex Krizhevsky}, "
                "title={Learning multiple layers of features from tiny images}, year={2009}}"
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        archive = self._archive
        if archive is None:
            reason = network_unavailable_reason(host=DOWNLOAD_HOST)
            if reason is not None:
                raise DataError(
                    f"cannot download {DOWNLOAD_ARCHIVE} ({reason}): " + cifar_manual_instructions()
                )
            try:
                downloaded = dl_manager.download(ARCHIVES[DOWNLOAD_ARCHIVE].url)
            except Exception as err:  # TFDS raises assorted types; keep the message one line
                first_line = (str(err).splitlines() or [""])[0]
                raise DataError(
                    f"downloading {DOWNLOAD_ARCHIVE} failed ({type(err).__name__}: {first_line}): "
                    + cifar_manual_instructions()
                ) from err
            verify_archive(downloaded, ARCHIVES[DOWNLOAD_ARCHIVE].sha256)
            archive = Path(downloaded)
        # A TFDS download has its own file name; it is always the binary archive.
        fmt = ARCHIVES[archive.name].fmt if archive.name in ARCHIVES else "binary"
        # Parsed (and checked) here, before TFDS writes anything.
        parsed = read_archive(archive, fmt)
        return {split: self._generate_examples(split, *arrays) for split, arrays in parsed.items()}

    def _generate_examples(self, split: str, images: np.ndarray, fine: np.ndarray, coarse: np.ndarray):
        for i in range(len(images)):
            key = f"{split}_{i:05d}"  # the index restores file order after TFDS's shuffling
            # A PIL image (not an ndarray) makes TFDS encode the PNG with PIL, not tf.image.
            yield (
                key,
                {
                    "id": key,
                    "image": Image.fromarray(images[i]),
                    "label": int(fine[i]),
                    "coarse_label": int(coarse[i]),
                },
            )


# ---------------------------------------------------------------------------------------------
# Loaders.


def _read_tfds(
    manual_dir: Path, data_dir: Path, download: bool, checksums: Mapping[str, str] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Build ``metalearn_cifar100`` if needed (once, under a lock) and read it back: images
    (N, 32, 32, 3) uint8, fine and coarse labels, train images then test images, each in
    archive order."""
    builder = prepare_tfds(
        lambda **kw: MetalearnCifar100(data_dir=os.fspath(data_dir), file_format="array_record", **kw),
        "metalearn_cifar100",
        data_root=data_dir,
        # The archive is located and checksummed (or the network probed) before TFDS starts,
        # so that a missing or wrong file fails in seconds with a one-line message.
        locate=lambda: {"archive": locate_archive(manual_dir, download=download, checksums=checksums)},
    )
    images, fine, coarse = [], [], []
    for split in ("train", "test"):
        records = read_split(builder, split)
        order = [int(text(rec["id"]).rsplit("_", 1)[1]) for rec in records]
        for j in np.argsort(order, kind="stable"):
            rec = records[j]
            images.append(rec["image"])
            fine.append(int(rec["label"]))
            coarse.append(int(rec["coarse_label"]))
    return np.stack(images).astype(np.uint8, copy=False), np.array(fine), np.array(coarse)


def _build(cfg: Any, paths: Paths, found: None) -> dict[str, np.ndarray]:
    what = _WHAT[cfg.name]
    images, fine, _ = _read_tfds(paths.manual, paths.data_root, cfg.download, cfg.checksums)
    counts = np.bincount(fine, minlength=NUM_FINE)
    if counts.min() != counts.max() or counts.min() == 0:
        raise DataError(
            f"{what}: CIFAR-100 classes have unequal image counts ({counts.min()}..{counts.max()}); "
            f"delete {paths.data_root / 'metalearn_cifar100'} to rebuild it"
        )
    order = np.argsort(fine, kind="stable")  # by class, file order (train then test) within
    by_class = images[order].reshape(NUM_FINE, counts[0], *IMAGE_SHAPE)
    index = {name: i for i, name in enumerate(CIFAR100_FINE_LABELS)}
    return {
        split: np.ascontiguousarray(by_class[[index[n] for n in names]])
        for split, names in class_names(cfg.name).items()
    }


def _check(cfg: Any, arrays: dict[str, np.ndarray]) -> str | None:
    sizes = {split: len(names) for split, names in class_names(cfg.name).items()}
    problem = class_array_problem(arrays, IMAGE_SHAPE)
    if problem is None and (
        {s: len(arrays[s]) for s in SPLITS} != sizes or len({a.shape[1] for a in arrays.values()}) != 1
    ):
        problem = "has the wrong number of classes"
    return problem


SPECS = {
    dataset: DatasetSpec(
        name=dataset,
        what=_WHAT[dataset],
        cache_dir=CACHE_DIRNAME,
        cache_name=lambda cfg, found: cache_path(".", cfg.name).name,
        build=_build,
        check=_check,
    )
    for dataset in DATASETS
}


def _load(
    dataset: str,
    manual_dir: str | None,
    data_dir: str | None,
    download: bool,
    checksums: Mapping[str, str] | None,
) -> dict[str, np.ndarray]:
    settings = SimpleNamespace(
        name=dataset, manual_dir=manual_dir, data_dir=data_dir, download=download, checksums=checksums
    )
    return load(SPECS[dataset], settings)


def load_cifar_fs(
    manual_dir: str | None,
    data_dir: str | None,
    download: bool = True,
    *,
    checksums: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """CIFAR-FS: ``{"train", "validation", "test"}`` -> uint8 ``(64|16|20, 600, 32, 32, 3)``.

    Classes in the order of :data:`CIFAR_FS_CLASSES`; images per class in CIFAR-100 order
    (train file, then test file). ``manual_dir``: folder holding ``cifar-100-binary.tar.gz``
    or ``cifar-100-python.tar.gz`` (default ``<data_dir>/downloads/manual``), sha256-verified
    before use. ``download``: fetch the binary archive if none is there (after a quick
    reachability probe); if False or offline, DataError at once. ``checksums``: ``{archive
    name: sha256}`` replacing the built-in values, only for tests or custom archives (use a
    separate ``data_dir`` for those: the TFDS build and the cache do not record their source).
    """
    return _load("cifar_fs", manual_dir, data_dir, download, checksums)


def load_fc100(
    manual_dir: str | None,
    data_dir: str | None,
    download: bool = True,
    *,
    checksums: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """FC100: ``{"train", "validation", "test"}`` -> uint8 ``(60|20|20, 600, 32, 32, 3)``.

    Classes by superclass in the order of :data:`FC100_SUPERCLASSES`, each superclass's five
    classes in the order of :data:`CIFAR100_SUPERCLASSES` (see :func:`class_names`); images
    per class in CIFAR-100 order. Arguments as for :func:`load_cifar_fs`.
    """
    return _load("fc100", manual_dir, data_dir, download, checksums)


def load_config(cfg: Any) -> dict[str, np.ndarray]:
    """The arrays for a DatasetConfig with ``name`` cifar_fs or fc100."""
    return _load(cfg.name, cfg.manual_dir, cfg.data_dir, cfg.download, None)


@schema("dataset", "cifar_fs", "fc100")
@dataclass
class CIFARFewShotConfig(ArchiveDatasetConfig):
    """CIFAR-FS and FC100 (CIFAR-100, 600 images of 32x32 per class; image_size must be 32)."""

    image_size: int = 32

    @classmethod
    def check(cls, d: Any, cfg: Any) -> None:
        need(d.image_size == 32, "dataset.image_size", d.image_size, f"32 for {d.name} (CIFAR images)")
        super().check(d, cfg)

    @classmethod
    def episode_limits(cls, d: Any) -> tuple[int, int, str]:
        return 600, {"cifar_fs": 16, "fc100": 20}[d.name], d.name
