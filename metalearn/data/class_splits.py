"""Which classes go to train / validation / test: ``dataset.split``, chosen by name.

Omniglot (:mod:`metalearn.data.omniglot`, both variants) splits *characters*, named
``"<alphabet>/<characterNN>"`` as in the archives; with ``dataset.rotations`` and
``rotation_sampling=classes`` each character brings its four rotations into its own split.

* ``random`` (also what ``dataset.split=null`` means): the sorted characters permuted with
  ``np.random.default_rng(dataset.split_seed)`` and cut 1100 / 100 / 423 (``small``: 160 / 20
  / 62; other archives in proportion), :func:`metalearn.data.omniglot.split_characters`.
  Test alphabets also occur in training. Runs made before ``dataset.split`` existed used it.
* ``alphabets``: whole alphabets held out, so no test or validation alphabet occurs in
  training (:func:`alphabet_split`). The sorted alphabet names are permuted with
  ``default_rng(dataset.split_seed)``; walking that order, alphabets go to test until it
  holds at least the ``random`` split's number of test characters, then to validation
  likewise, the rest to training (one alphabet at least is always left for validation and
  one for training). Split sizes therefore vary with the seed: on the ``small`` archives
  (8 alphabets) seed 0 holds out Greek and Korean for test (64 characters),
  Japanese_(katakana) for validation (47) and trains on the other five (131); on the full
  archives seed 0 gives 33 / 4 / 13 alphabets with 1032 / 129 / 462 characters.
* ``vinyals``: the class lists of Vinyals et al. (2016) as shipped by Snell et al. with
  Prototypical Networks (``splits/vinyals/``, see ``splits/vinyals/SOURCE.md``): 1028 /
  172 / 423 characters. Only the full (``standard``) archives hold its alphabets. Its test
  set is 13 alphabets of images_evaluation, one of which (Gurmukhi) is shared with training:
  its characters up to character41 train, the rest test.
* ``mamlpp``: the cut of MAML++'s code (AntreasAntoniou/HowToTrainYourMAMLPytorch,
  data.py, ``load_dataset`` with its Omniglot configs' ``val_seed: 0`` and
  ``train_val_test_split``): the sorted 1623 characters reordered by
  ``np.random.RandomState(RandomState(0).randint(1, 999999)).shuffle``, cut 1150 / 50 / 423
  (:func:`mamlpp_split`). The full archives only; reproduced exactly because that code
  sorts its class names before shuffling.
* a path to a split file (:func:`read_split_file`).

Not offered: iMAML's cut (aravindr93/imaml_dev, dataset.py ``OmniglotTask``): its 1623
characters are ordered by sorted alphabet but, inside an alphabet, by ``os.listdir``, whose
order depends on the file system it ran on; its seeded permutation (``random.seed(123)``)
cannot be mapped onto characters without that order. (Its measure_accuracy.py also reseeds
with 12345, so its test characters overlap its training ones.)

mini-ImageNet has one split, ``ravi`` (Ravi & Larochelle's class lists, the files it is built
from; ``dataset.split=null`` means the same). The other image datasets have their own fixed
splits or ``dataset.split_ratios`` and take only ``dataset.split=null``.

Split files (``dataset.split=PATH``): YAML (or JSON) mapping each of ``train``,
``validation`` and ``test`` to a list of names, each an alphabet (``Greek``: all its
characters) or a character (``Greek/character03``)::

    train: [Greek, Latin/character01, Latin/character02]
    validation: [Korean]
    test: [Tagalog/character05, Tagalog/character06]

Every split needs at least one name, no character may be named twice, and characters not
named are left out. A bad file or entry is a one-line error naming the file and the entry.
This module imports no TensorFlow, so :func:`check_split` can run in config validation.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from metalearn.errors import ConfigError, DataError

SPLIT_NAMES = ("train", "validation", "test")
# Named Omniglot splits, and those that need the full (standard) archives.
OMNIGLOT_SPLITS = ("random", "alphabets", "vinyals", "mamlpp")
FULL_ARCHIVE_SPLITS = ("vinyals", "mamlpp")
# The one named split of each other dataset that has one.
FIXED_SPLITS = {"mini_imagenet": "ravi"}
# MAML++'s code: config val_seed and train_val_test_split fractions for Omniglot.
MAMLPP_VAL_SEED = 0
MAMLPP_FRACTIONS = (0.70918052988, 0.03080714725, 0.2606284658)
_VINYALS_FILES = {"train": "train.txt", "validation": "val.txt", "test": "test.txt"}
_ROTATION_SUFFIXES = ("rot000", "rot090", "rot180", "rot270")


def is_split_file(value: str) -> bool:
    """Whether Omniglot's ``dataset.split=value`` names a file rather than a split (a file
    called like a split is named with a folder: ``./alphabets``)."""
    return value not in OMNIGLOT_SPLITS


def check_split(dataset: Any) -> None:
    """ConfigError (one line, naming ``dataset.split``) unless ``dataset.split`` is valid for
    ``dataset.name`` (and ``dataset.variant``); a split file must exist (its entries are
    checked against the archives when the data is built)."""
    value = getattr(dataset, "split", None)
    if value is None:
        return
    name = dataset.name
    if name == "omniglot":
        if value in FULL_ARCHIVE_SPLITS and dataset.variant != "standard":
            raise ConfigError(
                f"invalid dataset.split={value!r}: needs dataset.variant=standard "
                f"(the {dataset.variant} archives lack its alphabets)"
            )
        if is_split_file(value) and not Path(value).expanduser().is_file():
            raise ConfigError(
                f"invalid dataset.split={value!r}: must be one of {list(OMNIGLOT_SPLITS)} or an "
                "existing split file (metalearn/data/class_splits.py)"
            )
    elif name in FIXED_SPLITS:
        if value != FIXED_SPLITS[name]:
            raise ConfigError(
                f"invalid dataset.split={value!r}: dataset={name} has only the split "
                f"{FIXED_SPLITS[name]!r} (or null)"
            )
    else:
        raise ConfigError(
            f"invalid dataset.split={value!r}: dataset={name} takes no named split, only null "
            "(its classes are split by the dataset itself or by dataset.split_ratios)"
        )


def split_name(dataset: Any) -> str | None:
    """The split in effect, for records and logs: ``dataset.split``, or the dataset's own
    split when it is null (None for sinusoid; a description for ratio-split datasets)."""
    value = getattr(dataset, "split", None)
    if value is not None:
        if dataset.name == "omniglot" and is_split_file(value):
            path = Path(value).expanduser()
            digest = f"sha256 {file_digest(path)[:12]}" if path.is_file() else "file now missing"
            return f"file {value} ({digest})"
        return value
    name = dataset.name
    if name == "omniglot":
        return "random"
    if name in FIXED_SPLITS:
        return FIXED_SPLITS[name]
    if name in ("cifar_fs", "fc100"):
        return name
    if name in ("image_folder", "tfds"):
        ratios = "/".join(f"{r:g}" for r in dataset.split_ratios)
        # image_folder: a folder with train/val/test subfolders is split by them instead.
        return f"ratios {ratios}" if name == "tfds" else f"train/val/test folders, else ratios {ratios}"
    return None


def split_seed_used(dataset: Any) -> int | None:
    """``dataset.split_seed`` when the split in effect depends on it, else None."""
    name, value = dataset.name, getattr(dataset, "split", None)
    if name == "omniglot" and value in (None, "random", "alphabets") or name in ("image_folder", "tfds"):
        return int(dataset.split_seed)
    return None


def file_digest(path: str | os.PathLike) -> str:
    """Hex sha256 of a split file's bytes (part of the cache key: an edited file is a new build)."""
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()


def cache_tag(split: str | None, split_seed: int) -> str | None:
    """The split's part of the cache file name; None for ``random`` (the name caches made
    before ``dataset.split`` existed already have, which holds ``split_seed``)."""
    if split is None or split == "random":
        return None
    if split == "alphabets":
        return f"alphabets-seed{split_seed}"
    if is_split_file(split):
        return f"file-{file_digest(split)[:16]}"
    return split


# ----------------------------------------------------------------------------- named splits


def _by_alphabet(keys: Iterable[str]) -> dict[str, list[str]]:
    """Sorted character keys grouped by alphabet, alphabets sorted."""
    groups: dict[str, list[str]] = {}
    for key in sorted(set(keys)):
        groups.setdefault(key.split("/", 1)[0], []).append(key)
    return dict(sorted(groups.items()))


def alphabet_split(
    keys: Iterable[str], targets: tuple[int, int, int], split_seed: int
) -> dict[str, list[str]]:
    """Whole alphabets per split (see the module docstring); ``targets``: the (train,
    validation, test) character counts of the ``random`` split. Characters sorted per split."""
    groups = _by_alphabet(keys)
    names = list(groups)
    if len(names) < 3:
        raise DataError(
            f"dataset.split=alphabets needs at least 3 alphabets, the Omniglot archives hold {len(names)}"
        )
    order = [names[i] for i in np.random.default_rng(split_seed).permutation(len(names))]
    chosen: dict[str, list[str]] = {split: [] for split in SPLIT_NAMES}
    counts = dict.fromkeys(SPLIT_NAMES, 0)
    for position, alphabet in enumerate(order):
        left = len(order) - position  # alphabets not yet assigned, this one included
        if counts["test"] < targets[2] and left > 2 or not chosen["test"]:
            split = "test"
        elif counts["validation"] < targets[1] and left > 1 or not chosen["validation"]:
            split = "validation"
        else:
            split = "train"
        chosen[split].append(alphabet)
        counts[split] += len(groups[alphabet])
    return {split: sorted(k for a in chosen[split] for k in groups[a]) for split in SPLIT_NAMES}


def vinyals_classes() -> dict[str, list[str]]:
    """The shipped class lists: ``{split: ["Angelic/character01/rot000", ...]}`` in file order."""
    folder = resources.files("metalearn.data") / "splits" / "vinyals"
    return {split: (folder / name).read_text().split() for split, name in _VINYALS_FILES.items()}


def vinyals_characters() -> dict[str, list[str]]:
    """The Vinyals split by character, in file order (each line group ``rot000`` ..
    ``rot270`` of one character becomes that character)."""
    out = {}
    for split, lines in vinyals_classes().items():
        chars = [line.rsplit("/", 1)[0] for line in lines[::4]]
        expected = [f"{c}/{r}" for c in chars for r in _ROTATION_SUFFIXES]
        if expected != lines:  # the files' layout is what the classes' order relies on
            raise DataError(f"splits/vinyals/{_VINYALS_FILES[split]} is not in groups of 4 rotations")
        out[split] = chars
    return out


def _require_known(chosen: dict[str, list[str]], keys: set[str], what: str) -> None:
    missing = [k for split in SPLIT_NAMES for k in chosen[split] if k not in keys]
    if missing:
        raise DataError(
            f"dataset.split={what}: {len(missing)} of its characters (first {missing[0]}) are not in "
            "these Omniglot archives; it needs the full archives (dataset.variant=standard)"
        )


def vinyals_split(keys: Iterable[str]) -> dict[str, list[str]]:
    """The Vinyals split's characters (file order), checked against the archives' ``keys``."""
    chosen = vinyals_characters()
    _require_known(chosen, set(keys), "vinyals")
    return chosen


def mamlpp_split(keys: Iterable[str]) -> dict[str, list[str]]:
    """MAML++'s code's cut of the 1623 characters (see the module docstring), in its order."""
    ordered = sorted(set(keys))
    everything = sorted(k for chars in vinyals_characters().values() for k in chars)
    if ordered != everything:  # the cut is defined on exactly the full set of characters
        _require_known({"train": everything, "validation": [], "test": []}, set(ordered), "mamlpp")
        raise DataError("dataset.split=mamlpp needs exactly the 1623 characters of the full archives")
    seed = np.random.RandomState(seed=MAMLPP_VAL_SEED).randint(1, 999999)
    index = np.arange(len(ordered), dtype=np.int32)
    np.random.RandomState(seed=seed).shuffle(index)
    n = len(ordered)
    n_train = int(MAMLPP_FRACTIONS[0] * n)
    n_train_val = int(np.sum(MAMLPP_FRACTIONS[:2]) * n)
    shuffled = [ordered[i] for i in index]
    return {
        "train": shuffled[:n_train],
        "validation": shuffled[n_train:n_train_val],
        "test": shuffled[n_train_val:],
    }


# ----------------------------------------------------------------------------- split files


def read_split_file(path: str | os.PathLike, keys: Iterable[str]) -> dict[str, list[str]]:
    """A user's split file (format in the module docstring) resolved against the archives'
    character ``keys``: ``{split: characters}`` in the file's order (an alphabet's characters
    sorted). DataError naming the file and the first bad entry."""
    import yaml

    path = Path(path).expanduser()
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        first = (str(err).splitlines() or [""])[0]
        raise DataError(f"split file {path}: unreadable ({type(err).__name__}: {first})") from err
    if not isinstance(tree, dict) or set(tree) != set(SPLIT_NAMES):
        found = sorted(map(str, tree)) if isinstance(tree, dict) else type(tree).__name__
        raise DataError(
            f"split file {path}: must map exactly train, validation, test to lists, found {found}"
        )
    groups = _by_alphabet(keys)
    known = {k for chars in groups.values() for k in chars}
    out: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for split in SPLIT_NAMES:
        entries = tree[split]
        if not isinstance(entries, list) or not entries:
            raise DataError(f"split file {path}: {split} must be a non-empty list of names")
        out[split] = []
        for entry in entries:
            if not isinstance(entry, str) or entry not in groups and entry not in known:
                raise DataError(
                    f"split file {path}: {split} entry {entry!r} is neither an alphabet nor an "
                    "'<alphabet>/<characterNN>' of these Omniglot archives"
                )
            for key in groups.get(entry, [entry]):
                if key in owner:
                    raise DataError(
                        f"split file {path}: {split} entry {entry!r} names {key}, already in {owner[key]}"
                    )
                owner[key] = split
                out[split].append(key)
    return out
