"""mini-ImageNet (Vinyals et al., 2016) with the class split of Ravi & Larochelle (2017).

(Over 500 lines because it reads three unrelated file layouts, each with its own checks and
one-line errors, and holds the split's 100 class ids; splitting it would scatter one dataset.)

100 ImageNet classes, 600 images each, 84x84 RGB: 64 train / 16 validation / 20 test classes
(:data:`TRAIN_WNIDS`, :data:`VALIDATION_WNIDS`, :data:`TEST_WNIDS`). There is no official
download, so the files must be placed by hand in ``dataset.manual_dir`` (default
``<data_dir>/downloads/manual``). Any ONE of these layouts is read (checked in this order; the
first complete one wins):

``pickle``
    ``mini-imagenet-cache-train.pkl``, ``mini-imagenet-cache-val.pkl``,
    ``mini-imagenet-cache-test.pkl`` (renmengye/few-shot-ssl-public's ``mini-imagenet.tar.gz``,
    also used by tristandeleu/pytorch-meta): a dict with ``image_data`` uint8 (N, 84, 84, 3)
    and ``class_dict`` {wnid: [row indices]}. learn2learn's re-upload names the validation
    file ``mini-imagenet-cache-validation.pkl``; that name is accepted too. Only numpy arrays,
    dtypes and plain containers are unpickled (restricted unpickler), never arbitrary objects.
``npz``
    ``few-shot-train.npz``, ``few-shot-val.npz``, ``few-shot-test.npz`` as written by the
    ``create_dataset_miniImagenet.py`` script of TADAM (Oreshkin et al., 2018; ElementAI/TADAM)
    and loaded by its follow-ups (e.g. AM3): ``features`` uint8 (N, 84, 84, 3) in shuffled
    order and ``targets`` (N,) int, the index of the class in the sorted wnids of that split.
    The files hold no wnids: the k-th smallest target is taken to be the k-th smallest wnid
    of the split (offset targets, as in some re-exports, work the same way).
``csv_images``
    ``train.csv``, ``val.csv``, ``test.csv`` of twitter/meta-learning-lstm
    (``data/miniImagenet``; header ``filename,label``, e.g. ``n0153282900000005.jpg,n01532829``)
    plus an ``images/`` folder holding those jpg files: the layout of Ravi & Larochelle's
    ``images.zip`` (flat; ``images/<wnid>/<filename>`` is accepted as well). Images that are
    not 84x84 are resized to 84x84 with PIL LANCZOS and no crop, as cbfinn/maml's
    ``data/miniImagenet/proc_images.py`` does; all are converted to RGB.

Not supported: building from an ImageNet ``train/<wnid>/<wnid>_<n>.JPEG`` tree. The CSV
filenames carry a per-class running number, not the ImageNet image id, and no mapping has
been published (twitter-research/meta-learning-lstm issue #2, cbfinn/maml issue #4); the
public tools that rebuild mini-ImageNet from ImageNet (e.g. yaoyao-liu/mini-imagenet-tools,
A. Berenguel's script) guess one ("sort by the image number, take the n-th") and say so, so
their images are not the ones of the papers.

Integrity: no sha256 of any of these files is published (pytorch-meta records only an md5
of the whole tar.gz), so none is checked. Instead every source is verified structurally
before anything is built: the wnids of each split must equal the embedded split exactly,
every class must have exactly :data:`IMAGES_PER_CLASS` images, arrays must be uint8
(N, 84, 84, 3), and every image must decode. Problems raise a one-line DataError naming the
file.

The validated images go through the TFDS builder :class:`MetalearnMiniImagenet`
(``metalearn_mini_imagenet/<layout>/1.0.0`` under ``data_dir``, array_record, read back with
``as_data_source``, so TensorFlow is not needed). Its ``image`` feature is a raw uint8
``Tensor`` (84, 84, 3) rather than ``Image``: the pixels are already decoded and resized,
a raw tensor keeps pickle/npz pixels bit-exact and needs no codec (``Image`` would PNG-encode
numpy input through TensorFlow) at 21 KiB per example. Other features: ``label`` (wnid),
``split`` and ``index`` (position of the image within its class).

:func:`load_mini_imagenet` returns ``{"train", "validation", "test"}`` uint8 arrays
``(num_classes, 600, image_size, image_size, 3)``, classes ordered by sorted wnid, images in
file order (pickle: ascending row index; npz: file order; CSV: sorted filename), resized
from 84 with PIL LANCZOS when ``image_size != 84``. They are cached in
``<data_dir>/metalearn_mini_imagenet_cache/mini_imagenet_<layout>_<size>px_v<N>.npz``; later
calls load only that file, a corrupt one is rebuilt from the TFDS build (delete both to
re-read changed manual files). If the manual files are gone, an existing cache (same image
size) or TFDS build is still used. The network is never used.

Scaling (tests): every check reads the module constants :data:`SPLIT_WNIDS` and
:data:`IMAGES_PER_CLASS` at call time, so monkeypatching them gives a smaller dataset.
"""

from __future__ import annotations

import csv
import logging
import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from metalearn.config import schema
from metalearn.data import class_splits
from metalearn.data.common import SPLITS, ArchiveDatasetConfig, load_npz
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
from metalearn.errors import DataError

__all__ = [
    "IMAGES_PER_CLASS",
    "IMAGE_SIDE",
    "LAYOUTS",
    "SPLIT_WNIDS",
    "MetalearnMiniImagenet",
    "cache_path",
    "load_mini_imagenet",
    "locate_files",
    "read_layout",
]

log = logging.getLogger(__name__)

WHAT = "mini-ImageNet"
IMAGE_SIDE = 84
IMAGES_PER_CLASS = 600
# Bump whenever the content of the cached arrays changes (preprocessing, ordering).
CACHE_FORMAT_VERSION = 1
CACHE_DIRNAME = "metalearn_mini_imagenet_cache"
RESIZE_FILTER = Image.LANCZOS

# The Ravi & Larochelle (2017) split: the label column of train.csv / val.csv / test.csv in
# https://github.com/twitter-research/meta-learning-lstm/tree/master/data/miniImagenet
# (the same lists appear, e.g., as the "sachinravi" test split of public configs and as the
# class lists of CloserLookFewShot-style loaders). Sorted.
TRAIN_WNIDS: tuple[str, ...] = (
    "n01532829", "n01558993", "n01704323", "n01749939", "n01770081", "n01843383", "n01910747",
    "n02074367", "n02089867", "n02091831", "n02101006", "n02105505", "n02108089", "n02108551",
    "n02108915", "n02111277", "n02113712", "n02120079", "n02165456", "n02457408", "n02606052",
    "n02687172", "n02747177", "n02795169", "n02823428", "n02966193", "n03017168", "n03047690",
    "n03062245", "n03207743", "n03220513", "n03337140", "n03347037", "n03400231", "n03476684",
    "n03527444", "n03676483", "n03838899", "n03854065", "n03888605", "n03908618", "n03924679",
    "n03998194", "n04067472", "n04243546", "n04251144", "n04258138", "n04275548", "n04296562",
    "n04389033", "n04435653", "n04443257", "n04509417", "n04515003", "n04596742", "n04604644",
    "n04612504", "n06794110", "n07584110", "n07697537", "n07747607", "n09246464", "n13054560",
    "n13133613",
)  # fmt: skip
VALIDATION_WNIDS: tuple[str, ...] = (
    "n01855672", "n02091244", "n02114548", "n02138441", "n02174001", "n02950826", "n02971356",
    "n02981792", "n03075370", "n03417042", "n03535780", "n03584254", "n03770439", "n03773504",
    "n03980874", "n09256479",
)  # fmt: skip
TEST_WNIDS: tuple[str, ...] = (
    "n01930112", "n01981276", "n02099601", "n02110063", "n02110341", "n02116738", "n02129165",
    "n02219486", "n02443484", "n02871525", "n03127925", "n03146219", "n03272010", "n03544143",
    "n03775546", "n04146614", "n04149813", "n04418357", "n04522168", "n07613480",
)  # fmt: skip
SPLIT_WNIDS: dict[str, tuple[str, ...]] = {
    "train": TRAIN_WNIDS,
    "validation": VALIDATION_WNIDS,
    "test": TEST_WNIDS,
}

# The files' own name for each split.
FILE_SPLIT = {"train": "train", "validation": "val", "test": "test"}
# Layout name -> {split: accepted file names, preferred first}.
LAYOUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "pickle": {
        "train": ("mini-imagenet-cache-train.pkl",),
        "validation": ("mini-imagenet-cache-val.pkl", "mini-imagenet-cache-validation.pkl"),
        "test": ("mini-imagenet-cache-test.pkl",),
    },
    "npz": {s: (f"few-shot-{FILE_SPLIT[s]}.npz",) for s in SPLITS},
    "csv_images": {s: (f"{FILE_SPLIT[s]}.csv",) for s in SPLITS},
}
IMAGES_FOLDER = "images"

MANUAL_INSTRUCTIONS = (
    "put ONE of these sets in dataset.manual_dir: "
    "(a) mini-imagenet-cache-train.pkl, mini-imagenet-cache-val.pkl, mini-imagenet-cache-test.pkl "
    "(renmengye/few-shot-ssl-public mini-imagenet.tar.gz); "
    "(b) few-shot-train.npz, few-shot-val.npz, few-shot-test.npz (TADAM create_dataset_miniImagenet.py); "
    "(c) train.csv, val.csv, test.csv (twitter-research/meta-learning-lstm data/miniImagenet) "
    "plus images/ with their jpg files (Ravi & Larochelle images.zip)"
)


# --------------------------------------------------------------------------- locating files


class Located(NamedTuple):
    """A complete layout found in the manual directory, or why none was."""

    layout: str | None
    files: dict[str, Path]  # split -> file (empty if layout is None)
    problem: str  # one-line description of what is missing ("" if layout is set)


def locate_files(manual_dir: str | os.PathLike, layouts: tuple[str, ...] = tuple(LAYOUTS)) -> Located:
    """The first complete one of ``layouts`` in ``manual_dir`` (existence checks only)."""
    manual = Path(manual_dir).expanduser()
    partial: list[str] = []
    for layout in layouts:
        names = LAYOUTS[layout]
        files: dict[str, Path] = {}
        missing: list[str] = []
        for split in SPLITS:
            found = next((manual / n for n in names[split] if (manual / n).is_file()), None)
            if found is None:
                missing.append(names[split][0])
            else:
                files[split] = found
        if layout == "csv_images" and files and not (manual / IMAGES_FOLDER).is_dir():
            missing.append(IMAGES_FOLDER + "/")
        if not missing:
            return Located(layout, files, "")
        if files:
            present = ", ".join(p.name for p in files.values())
            partial.append(f"{layout} layout: found {present} but missing {', '.join(missing)}")
    if partial:
        problem = f"incomplete {WHAT} files in {manual} ({'; '.join(partial)}); "
    else:
        problem = f"no {WHAT} files found in {manual}; "
    return Located(None, {}, problem + MANUAL_INSTRUCTIONS)


# --------------------------------------------------------------------------- reading sources


# Only these globals may be resolved while unpickling: numpy arrays, dtypes, scalars, ordered
# dicts and the byte-string helpers of protocols 2 and 5. numpy 1.x pickles name
# ``numpy.core``; numpy 2 moved it to ``numpy._core``.
_PICKLE_GLOBALS = {
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
}


# What a truncated, garbled or foreign pickle can raise.
_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    ImportError,
    IndexError,
    KeyError,
    MemoryError,
    OSError,
)


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        canonical = module.replace("numpy._core", "numpy.core")
        if (canonical, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if canonical.startswith("numpy.core") and hasattr(np, "_core"):
            module = canonical.replace("numpy.core", "numpy._core")
        return super().find_class(module, name)


def _bad(path: Path, why: str) -> DataError:
    return DataError(f"{WHAT} file {path} {why}; put an intact copy in dataset.manual_dir")


def _check_wnids(found, split: str, path: Path) -> list[str]:
    """Sorted wnids of ``split``; DataError unless ``found`` is exactly that set."""
    expected = set(SPLIT_WNIDS[split])
    found = {str(w) for w in found}
    if found != expected:
        extra, lacking = sorted(found - expected), sorted(expected - found)
        raise _bad(
            path,
            f"has {len(found)} classes, expected the {len(expected)} {split} classes of the "
            f"Ravi & Larochelle split (unexpected: {', '.join(extra[:3]) or 'none'}; "
            f"missing: {', '.join(lacking[:3]) or 'none'})",
        )
    return sorted(expected)


def _check_count(n: int, wnid: str, path: Path) -> None:
    if n != IMAGES_PER_CLASS:
        raise _bad(path, f"has {n} images of class {wnid}, expected {IMAGES_PER_CLASS}")


def _check_image_array(images, path: Path, key: str) -> np.ndarray:
    shape = (IMAGE_SIDE, IMAGE_SIDE, 3)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape[1:] != shape:
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise _bad(path, f"holds {key} of {got}, expected uint8 (N, {IMAGE_SIDE}, {IMAGE_SIDE}, 3)")
    return images


def read_pickle(path: Path, split: str) -> dict[str, np.ndarray]:
    """{wnid: (600, 84, 84, 3) uint8} from one ``mini-imagenet-cache-*.pkl``."""
    try:
        with open(path, "rb") as f:
            # latin1: Python 2 pickles store numpy buffers as byte strings.
            data = _ArrayUnpickler(f, encoding="latin1").load()
    except _PICKLE_ERRORS as err:
        raise _bad(path, f"is not a readable pickle ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
        raise _bad(path, "is not a mini-ImageNet cache pickle (need a dict with image_data and class_dict)")
    images = _check_image_array(data["image_data"], path, "image_data")
    class_dict = data["class_dict"]
    if not isinstance(class_dict, dict):
        raise _bad(path, f"has a class_dict of type {type(class_dict).__name__}, expected dict")
    out = {}
    for wnid in _check_wnids(class_dict, split, path):
        try:
            rows = np.sort(np.asarray(class_dict[wnid], dtype=np.int64).reshape(-1))
        except (TypeError, ValueError) as err:
            raise _bad(path, f"has non-integer row indices for class {wnid}") from err
        _check_count(len(rows), wnid, path)
        if rows[0] < 0 or rows[-1] >= len(images):
            raise _bad(path, f"has row indices of class {wnid} outside image_data (N={len(images)})")
        out[wnid] = images[rows]
    return out


def read_npz(path: Path, split: str) -> dict[str, np.ndarray]:
    """{wnid: (600, 84, 84, 3) uint8} from one TADAM ``few-shot-*.npz``."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "features" not in npz.files or "targets" not in npz.files:
                raise _bad(path, f"has keys {sorted(npz.files)}, expected features and targets")
            features, targets = npz["features"], npz["targets"]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise _bad(path, f"is not a readable npz file ({type(err).__name__}: {err})") from err
    features = _check_image_array(features, path, "features")
    if targets.ndim != 1 or len(targets) != len(features) or not np.issubdtype(targets.dtype, np.integer):
        raise _bad(path, f"has targets {targets.dtype} {targets.shape}, expected ({len(features)},) integers")
    values = np.unique(targets)
    wnids = sorted(SPLIT_WNIDS[split])
    if len(values) != len(wnids):
        raise _bad(path, f"has {len(values)} classes, expected the {len(wnids)} {split} classes")
    out = {}
    for value, wnid in zip(values, wnids, strict=True):  # k-th smallest target = k-th wnid
        rows = np.flatnonzero(targets == value)
        _check_count(len(rows), wnid, path)
        out[wnid] = features[rows]
    return out


def decode_image(path: Path) -> np.ndarray:
    """One jpg as (84, 84, 3) uint8 RGB, resized with LANCZOS if it is another size."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (IMAGE_SIDE, IMAGE_SIDE):
                img = img.resize((IMAGE_SIDE, IMAGE_SIDE), RESIZE_FILTER)
            return np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise _bad(path, f"is not a decodable image ({type(err).__name__}: {err})") from err


def read_csv(path: Path, split: str) -> dict[str, np.ndarray]:
    """{wnid: (600, 84, 84, 3) uint8} from one split CSV and the ``images/`` folder beside it."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise _bad(path, f"is not a readable CSV file ({type(err).__name__}: {err})") from err
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise _bad(path, "does not start with the header filename,label")
    by_class: dict[str, list[str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise _bad(path, f"line {line} is not filename,label")
        by_class.setdefault(row[1].strip(), []).append(row[0].strip())
    wnids = _check_wnids(by_class, split, path)
    folder = path.parent / IMAGES_FOLDER
    files: dict[str, list[Path]] = {}
    missing: list[str] = []
    for wnid in wnids:
        names = sorted(by_class[wnid])
        if len(set(names)) != len(names):
            raise _bad(path, f"lists an image of class {wnid} twice")
        _check_count(len(names), wnid, path)
        files[wnid] = []
        for name in names:
            flat, nested = folder / name, folder / wnid / name
            image = flat if flat.is_file() else nested if nested.is_file() else None
            if image is None:
                missing.append(name)
            else:
                files[wnid].append(image)
    if missing:
        raise _bad(
            path,
            f"names {len(missing)} image(s) missing from {folder} (e.g. {', '.join(missing[:3])}); "
            "put the jpg files listed in the CSV there",
        )
    return {wnid: np.stack([decode_image(p) for p in paths]) for wnid, paths in files.items()}


READERS = {"pickle": read_pickle, "npz": read_npz, "csv_images": read_csv}


def read_layout(layout: str, files: Mapping[str, Path]) -> dict[str, dict[str, np.ndarray]]:
    """{split: {wnid: (600, 84, 84, 3) uint8}} for all splits, fully validated."""
    return {split: READERS[layout](Path(files[split]), split) for split in SPLITS}


# --------------------------------------------------------------------------- TFDS builder


class MetalearnMiniImagenet(tfds.core.GeneratorBasedBuilder):
    """mini-ImageNet (Ravi & Larochelle split) from manually placed files; see module doc."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: pickle, npz and csv_images layouts, array_record."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="pickle", description="mini-imagenet-cache-{train,val,test}.pkl"),
        tfds.core.BuilderConfig(name="npz", description="TADAM few-shot-{train,val,test}.npz"),
        tfds.core.BuilderConfig(name="csv_images", description="{train,val,test}.csv + images/*.jpg"),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "pickle"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "mini-ImageNet has no official download. Put the files of the chosen config directly in "
        "the manual directory: pickle: mini-imagenet-cache-train.pkl, mini-imagenet-cache-val.pkl, "
        "mini-imagenet-cache-test.pkl; npz: few-shot-train.npz, few-shot-val.npz, "
        "few-shot-test.npz; csv_images: train.csv, val.csv, test.csv and a folder images/ "
        "holding the jpg files they name."
    )

    def __init__(self, *, classes: Mapping[str, Mapping[str, np.ndarray]] | None = None, **kwargs):
        """``classes``: result of :func:`read_layout` for this config (already validated);
        without it the files are read from the download manager's manual directory."""
        self._classes = classes
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "mini-ImageNet: 100 ImageNet classes x 600 images, 84x84 RGB, split 64/16/20 "
                "classes as in Ravi & Larochelle (2017)."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8),
                    "label": tfds.features.Text(),
                    "split": tfds.features.Text(),
                    "index": np.int32,
                }
            ),
            homepage="https://github.com/twitter-research/meta-learning-lstm",
            citation=(
                "@inproceedings{ravi2017optimization, title={Optimization as a Model for Few-Shot "
                "Learning}, author={Ravi, Sachin and Larochelle, Hugo}, booktitle={ICLR}, year={2017}}"
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        classes = self._classes
        if classes is None:
            layout = self.builder_config.name
            located = locate_files(dl_manager.manual_dir, (layout,))
            if located.layout != layout:
                names = ", ".join(n[0] for n in LAYOUTS[layout].values())
                raise DataError(
                    f"{WHAT} config {layout} needs {names} in {dl_manager.manual_dir}: {located.problem}"
                )
            classes = read_layout(layout, located.files)
        return {split: self._generate_examples(split, classes[split]) for split in SPLITS}

    def _generate_examples(self, split: str, classes: Mapping[str, np.ndarray]) -> Iterator[tuple[str, dict]]:
        for wnid in sorted(classes):
            for i, image in enumerate(classes[wnid]):
                yield f"{wnid}_{i:04d}", {"image": image, "label": wnid, "split": split, "index": i}


# --------------------------------------------------------------------------- loader


def cache_path(data_dir: str | os.PathLike, layout: str, image_size: int) -> Path:
    """Path of the ``.npz`` holding the prepared arrays for this layout and image size."""
    name = f"mini_imagenet_{layout}_{image_size}px_v{CACHE_FORMAT_VERSION}.npz"
    return Path(data_dir).expanduser() / CACHE_DIRNAME / name


def _check(cfg: Any, arrays: dict[str, np.ndarray]) -> str | None:
    size = int(cfg.image_size)
    problem = class_array_problem(arrays, (size, size, 3))
    if problem is not None:
        return problem
    for split, arr in arrays.items():
        if arr.shape[:2] != (len(SPLIT_WNIDS[split]), IMAGES_PER_CLASS):
            return f"has {split} classes x images {arr.shape[:2]}"
    return None


def _builder(layout: str, data_root: Path, **kwargs) -> MetalearnMiniImagenet:
    return MetalearnMiniImagenet(
        config=layout, data_dir=os.fspath(data_root), file_format="array_record", **kwargs
    )


def _is_built(layout: str, data_root: Path) -> bool:
    """Whether a TFDS build of ``layout`` exists (path check first: constructing a builder for a
    missing folder makes TFDS log warnings)."""
    folder = data_root / MetalearnMiniImagenet.name / layout / str(MetalearnMiniImagenet.VERSION)
    return (folder / "dataset_info.json").is_file() and _builder(layout, data_root).is_prepared()


def _read_tfds(layout: str, data_root: Path, manual: Path, files: Mapping[str, Path] | None) -> dict:
    """Build the TFDS dataset if needed (from ``files``, once, under a lock) and read it back
    as 84x84 arrays."""

    def locate() -> dict:
        if files is None:
            raise DataError(f"{WHAT} TFDS build of {layout} vanished from {data_root}; {MANUAL_INSTRUCTIONS}")
        return {"classes": read_layout(layout, files)}  # validated before TFDS starts

    builder = prepare_tfds(
        lambda **kw: _builder(layout, data_root, **kw),
        f"metalearn_mini_imagenet/{layout}",
        locate=locate,
        manual_dir=manual,
        in_memory_shuffle=True,  # the train split exceeds TFDS's 1 GB buffer
        prepared=lambda: _is_built(layout, data_root),
        data_root=data_root,
    )
    arrays = {}
    for split in SPLITS:
        by_class: dict[str, list[tuple[int, np.ndarray]]] = {}
        for rec in read_split(builder, split):
            by_class.setdefault(text(rec["label"]), []).append((int(rec["index"]), rec["image"]))
        expected = sorted(SPLIT_WNIDS[split])
        counts = {w: len(v) for w, v in by_class.items()}
        if sorted(by_class) != expected or any(n != IMAGES_PER_CLASS for n in counts.values()):
            raise DataError(
                f"{WHAT} TFDS build {builder.data_dir} has a {split} split of {len(by_class)} classes "
                f"(expected {len(expected)} x {IMAGES_PER_CLASS} images); delete that folder to rebuild it"
            )
        arrays[split] = stack_by_class(by_class, expected)
    return arrays


def _resize(classes: np.ndarray, image_size: int) -> np.ndarray:
    """(C, K, 84, 84, 3) -> (C, K, size, size, 3) uint8 with PIL LANCZOS (no-op at 84)."""
    if image_size == IMAGE_SIDE:
        return classes
    flat = resize_images(classes.reshape(-1, IMAGE_SIDE, IMAGE_SIDE, 3), image_size)
    return flat.reshape(*classes.shape[:2], image_size, image_size, 3)


def _locate(cfg: Any, paths: Paths) -> tuple[str, Mapping[str, Path] | None]:
    """(layout, its files) in manual_dir; without usable files there, the layout of an earlier
    cache (same image size), else of an earlier TFDS build (files None); else DataError."""
    size = check_image_size(cfg.image_size)
    located = locate_files(paths.manual)
    if located.layout is not None:
        return located.layout, located.files
    for layout in LAYOUTS:
        path = cache_path(paths.data_root, layout, size)
        cached = load_npz(path, SPLITS, WHAT)
        if cached is not None and not _check(cfg, cached):
            log.info("%s: no files in %s, using the existing cache %s", WHAT, paths.manual, path)
            return layout, None
    for layout in LAYOUTS:
        if _is_built(layout, paths.data_root):
            return layout, None
    raise DataError(located.problem)


def _build(cfg: Any, paths: Paths, found: tuple[str, Mapping[str, Path] | None]) -> dict[str, np.ndarray]:
    layout, files = found
    arrays = _read_tfds(layout, paths.data_root, paths.manual, files)
    return {split: _resize(arr, int(cfg.image_size)) for split, arr in arrays.items()}


SPEC = DatasetSpec(
    name="mini_imagenet",
    what=WHAT,
    cache_dir=CACHE_DIRNAME,
    cache_name=lambda cfg, found: cache_path(".", found[0], int(cfg.image_size)).name,
    build=_build,
    locate=_locate,
    check=_check,
)


def load_mini_imagenet(
    manual_dir: str | None, data_dir: str | None, image_size: int = 84
) -> dict[str, np.ndarray]:
    """{"train","validation","test"} -> uint8 (num_classes, 600, image_size, image_size, 3).

    ``manual_dir``: folder with one of the layouts of the module docstring (default
    ``<data_dir>/downloads/manual``). Classes are ordered by sorted wnid (64/16/20). Raises
    DataError (one line) at once if the files are missing, incomplete or malformed, unless
    an earlier build of the same image size can be reused; never downloads anything.
    """
    return load(SPEC, SimpleNamespace(manual_dir=manual_dir, data_dir=data_dir, image_size=image_size))


def load_config(cfg: Any) -> dict[str, np.ndarray]:
    """The arrays for a DatasetConfig with ``name=mini_imagenet``."""
    return load_mini_imagenet(cfg.manual_dir, cfg.data_dir, image_size=cfg.image_size)


@schema("dataset", "mini_imagenet")
@dataclass
class MiniImageNetConfig(ArchiveDatasetConfig):
    """mini-ImageNet; split: its one split, Ravi & Larochelle's 64 / 16 / 20 classes of 600
    images ("ravi", or null)."""

    split: str | None = None

    @classmethod
    def check(cls, d: Any, cfg: Any) -> None:
        super().check(d, cfg)
        class_splits.check_split(d)

    @classmethod
    def episode_limits(cls, d: Any) -> tuple[int, int, str]:
        return IMAGES_PER_CLASS, len(SPLIT_WNIDS["validation"]), "mini_imagenet"
