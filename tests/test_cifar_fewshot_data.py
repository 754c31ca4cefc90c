"""CIFAR-FS / FC100 data path (TFDS metalearn_cifar100 + loaders), with the network blocked.

Built from tiny synthetic CIFAR-100 archives in the original formats (same member names, same
record layout / pickled keys, the real label names and superclasses) with 3 training and 1 test
image per class, so the class splits are the real ones. Every synthetic image carries its
identity in its first pixels: (fine, coarse, occurrence) at [0, 0] and the source split at [0, 1].
"""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets

from metalearn.data import cifar_fewshot as cf
from metalearn.data.common import load_npz
from metalearn.errors import DataError

pytestmark = pytest.mark.usefixtures("no_network")

PER_SPLIT = {"train": 3, "test": 1}
PER_CLASS = sum(PER_SPLIT.values())
BINARY, PYTHON = "cifar-100-binary.tar.gz", "cifar-100-python.tar.gz"
COARSE_OF = np.array([cf.CIFAR100_COARSE_LABELS.index(cf.SUPERCLASS_OF[n]) for n in cf.CIFAR100_FINE_LABELS])


def synth_split(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3), fine, coarse) in a shuffled file order, classes interleaved."""
    rng = np.random.default_rng(0 if split == "train" else 1)
    fine = rng.permutation(np.repeat(np.arange(100), PER_SPLIT[split]))
    images = rng.integers(0, 256, size=(len(fine), 32, 32, 3), dtype=np.uint8)
    seen = np.zeros(100, int)
    for i, c in enumerate(fine):
        images[i, 0, 0] = (c, COARSE_OF[c], seen[c])
        images[i, 0, 1] = (split == "test", 0, 0)
        seen[c] += 1
    return images, fine, COARSE_OF[fine]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_binary_archive(path: Path) -> str:
    """cifar-100-binary layout: train.bin / test.bin records + label-name text files."""
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "cifar-100-binary/coarse_label_names.txt", "\n".join(cf.CIFAR100_COARSE_LABELS).encode())
        _add(tar, "cifar-100-binary/fine_label_names.txt", "\n".join(cf.CIFAR100_FINE_LABELS).encode())
        for split in ("train", "test"):
            images, fine, coarse = synth_split(split)
            chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
            records = np.concatenate([coarse[:, None], fine[:, None], chw], axis=1).astype(np.uint8)
            _add(tar, f"cifar-100-binary/{split}.bin", records.tobytes())
    return cf.sha256_of(path)


def write_python_archive(path: Path, meta_extra: object = None) -> str:
    """cifar-100-python layout: pickled dicts train / test / meta with the real key names."""
    with tarfile.open(path, "w:gz") as tar:
        meta = {
            b"fine_label_names": [n.encode() for n in cf.CIFAR100_FINE_LABELS],
            b"coarse_label_names": [n.encode() for n in cf.CIFAR100_COARSE_LABELS],
        }
        if meta_extra is not None:
            meta[b"extra"] = meta_extra
        _add(tar, "cifar-100-python/meta", pickle.dumps(meta, protocol=2))
        for split in ("train", "test"):
            images, fine, coarse = synth_split(split)
            d = {
                b"filenames": [f"img_{split}_{i}.png".encode() for i in range(len(fine))],
                b"batch_label": f"{split} batch".encode(),
                b"fine_labels": [int(x) for x in fine],
                b"coarse_labels": [int(x) for x in coarse],
                b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
            }
            _add(tar, f"cifar-100-python/{split}", pickle.dumps(d, protocol=2))
    return cf.sha256_of(path)


def refuse(*args, **kwargs):
    raise OSError("network disabled in tests")


def identity(img: np.ndarray) -> tuple[int, int, int, int]:
    """(fine, coarse, occurrence within its source split, 1 if from the test file)."""
    return int(img[0, 0, 0]), int(img[0, 0, 1]), int(img[0, 0, 2]), int(img[0, 1, 0])


@pytest.fixture(scope="module")
def binary_manual(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("manual_binary")
    return folder, {BINARY: write_binary_archive(folder / BINARY)}


@pytest.fixture(scope="module")
def built(binary_manual, tmp_path_factory) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    """Both datasets loaded once from the binary archive (network blocked for the build)."""
    manual, checksums = binary_manual
    data_dir = tmp_path_factory.mktemp("tfds")
    with pytest.MonkeyPatch.context() as mp:  # module scope: `no_network` is per test
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        out = {
            "cifar_fs": cf.load_cifar_fs(str(manual), str(data_dir), checksums=checksums),
            "fc100": cf.load_fc100(str(manual), str(data_dir), checksums=checksums),
        }
    return data_dir, out


def test_split_constants_are_the_published_ones():
    assert len(cf.CIFAR100_FINE_LABELS) == len(set(cf.CIFAR100_FINE_LABELS)) == 100
    assert len(cf.CIFAR100_COARSE_LABELS) == 20
    assert all(len(v) == 5 for v in cf.CIFAR100_SUPERCLASSES.values())
    assert cf.CIFAR100_FINE_LABELS[:3] == ("apple", "aquarium_fish", "baby")
    assert cf.CIFAR100_FINE_LABELS[-1] == "worm" and cf.CIFAR100_COARSE_LABELS[-1] == "vehicles_2"

    fs = cf.CIFAR_FS_CLASSES
    assert {s: len(v) for s, v in fs.items()} == {"train": 64, "validation": 16, "test": 20}
    assert sorted(n for v in fs.values() for n in v) == sorted(cf.CIFAR100_FINE_LABELS)
    assert fs["validation"][:2] == ("beaver", "otter") and fs["test"][:3] == ("whale", "poppy", "rose")

    fc = cf.FC100_SUPERCLASSES
    assert {s: len(v) for s, v in fc.items()} == {"train": 12, "validation": 4, "test": 4}
    assert sorted(n for v in fc.values() for n in v) == sorted(cf.CIFAR100_COARSE_LABELS)
    coarse_ids = {s: sorted(cf.CIFAR100_COARSE_LABELS.index(n) for n in v) for s, v in fc.items()}
    assert coarse_ids == {
        "train": [1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19],
        "validation": [8, 11, 13, 16],
        "test": [0, 7, 12, 14],
    }
    names = cf.class_names("fc100")
    assert {s: len(v) for s, v in names.items()} == {"train": 60, "validation": 20, "test": 20}
    with pytest.raises(ValueError):
        cf.class_names("cifar10")


def test_registered_checksums_are_the_documented_ones():
    registered = Path(tensorflow_datasets.__file__).parent / "url_checksums" / "cifar100.txt"
    url, size, sha256, name = registered.read_text().split()[:4]
    binary = cf.ARCHIVES[BINARY]
    assert (url, int(size), sha256, name) == (binary.url, binary.size, binary.sha256, BINARY)
    assert binary.sha256 == "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec"
    python = cf.ARCHIVES[PYTHON]
    assert python.sha256 == "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"
    assert python.size == 169001437 and python.url == "https://www.cs.toronto.edu/~kriz/" + PYTHON
    assert list(cf.ARCHIVES)[0] == cf.DOWNLOAD_ARCHIVE == BINARY


@pytest.mark.parametrize("dataset", cf.DATASETS)
def test_splits_classes_order_and_disjoint(built, dataset):
    arrays = built[1][dataset]
    expected = cf.class_names(dataset)
    sizes = {"cifar_fs": (64, 16, 20), "fc100": (60, 20, 20)}[dataset]
    assert tuple(len(arrays[s]) for s in cf.SPLITS) == sizes
    seen = []
    for split in cf.SPLITS:
        arr = arrays[split]
        assert arr.dtype == np.uint8 and arr.shape[1:] == (PER_CLASS, 32, 32, 3)
        for c, name in enumerate(expected[split]):
            ids = [identity(img) for img in arr[c]]
            fine = cf.CIFAR100_FINE_LABELS.index(name)
            assert {i[0] for i in ids} == {fine}  # one class per row, the listed one
            assert {i[1] for i in ids} == {COARSE_OF[fine]}
            # Train images first (in file order), then test images.
            assert [(i[3], i[2]) for i in ids] == [(0, 0), (0, 1), (0, 2), (1, 0)]
            seen.append(fine)
            if dataset == "fc100":
                superclass = cf.CIFAR100_COARSE_LABELS[ids[0][1]]
                assert superclass in cf.FC100_SUPERCLASSES[split]
    assert sorted(seen) == list(range(100))  # disjoint and complete


def test_pixels_round_trip_exactly(built):
    images, fine, _ = synth_split("train")
    i = 17  # an arbitrary training image
    c = int(fine[i])
    occurrence = int(images[i, 0, 0, 2])
    name = cf.CIFAR100_FINE_LABELS[c]
    for dataset in cf.DATASETS:
        split = next(s for s, names in cf.class_names(dataset).items() if name in names)
        row = cf.class_names(dataset)[split].index(name)
        np.testing.assert_array_equal(built[1][dataset][split][row, occurrence], images[i])
    test_images, test_fine, _ = synth_split("test")
    j = int(np.flatnonzero(test_fine == c)[0])
    split = next(s for s, names in cf.CIFAR_FS_CLASSES.items() if name in names)
    row = cf.CIFAR_FS_CLASSES[split].index(name)
    np.testing.assert_array_equal(built[1]["cifar_fs"][split][row, PER_SPLIT["train"]], test_images[j])


def test_python_archive_gives_the_same_arrays(built, tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    checksums = {PYTHON: write_python_archive(manual / PYTHON)}
    arrays = cf.load_fc100(str(manual), str(tmp_path / "tfds"), download=False, checksums=checksums)
    for split in cf.SPLITS:
        np.testing.assert_array_equal(arrays[split], built[1]["fc100"][split])


def test_python_archive_with_foreign_pickle_globals_is_refused(tmp_path):
    path = tmp_path / PYTHON
    write_python_archive(path, meta_extra=shutil.copyfile)  # pickled as a global reference
    with pytest.raises(DataError, match=r"shutil\.copyfile is not allowed") as info:
        cf.read_archive(path, "python")
    assert "\n" not in str(info.value)


def test_cache_is_reused_and_rebuilt_when_corrupt(built, binary_manual, monkeypatch):
    data_dir, first = built
    path = cf.cache_path(data_dir, "cifar_fs")
    assert path.is_file() and path.parent.name == "metalearn_cifar_fewshot_cache"
    assert path.name.endswith(f"_v{cf.CACHE_FORMAT_VERSION}.npz")

    calls = []
    real_read = cf._read_tfds
    monkeypatch.setattr(cf, "_read_tfds", lambda *a: calls.append(1) or real_read(*a))
    again = cf.load_cifar_fs(None, str(data_dir), download=False)  # cache only: no archive needed
    assert calls == []
    for split in cf.SPLITS:
        np.testing.assert_array_equal(again[split], first["cifar_fs"][split])

    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated npz
    # The TFDS build is still there, so the rebuild needs no archive at all.
    rebuilt = cf.load_cifar_fs(None, str(data_dir), download=False)
    assert calls == [1]
    for split in cf.SPLITS:
        np.testing.assert_array_equal(rebuilt[split], first["cifar_fs"][split])
    assert load_npz(path, cf.SPLITS, "CIFAR-FS") is not None  # rewritten whole


def test_missing_archive_offline_fails_fast(tmp_path, no_network):
    manual = tmp_path / "manual"
    manual.mkdir()
    for download in (True, False):
        before = len(no_network)
        with pytest.raises(DataError) as info:
            cf.load_cifar_fs(str(manual), str(tmp_path / "tfds"), download=download)
        # Fails at the first refused connection (none without download): no retry loop.
        assert len(no_network) - before <= int(download)
        msg = str(info.value)
        assert "\n" not in msg
        assert BINARY in msg and PYTHON in msg and str(manual) in msg and "dataset.manual_dir" in msg
        if download:
            assert "cannot be downloaded" in msg and cf.DOWNLOAD_HOST in msg
    assert not (tmp_path / "tfds" / cf.CACHE_DIRNAME).exists()


def test_no_manual_dir_names_default_location(tmp_path):
    with pytest.raises(DataError) as info:
        cf.load_fc100(None, str(tmp_path))
    msg = str(info.value)
    assert "\n" not in msg and BINARY in msg
    assert str(tmp_path / "downloads" / "manual") in msg and "dataset.manual_dir" in msg


def test_corrupt_archive_names_file_and_checksums(tmp_path, no_network):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / BINARY).write_bytes(b"this is not the cifar-100 archive")
    with pytest.raises(DataError) as info:
        cf.load_fc100(str(manual), str(tmp_path / "tfds"))
    msg = str(info.value)
    assert "\n" not in msg
    assert str(manual / BINARY) in msg and "dataset.manual_dir" in msg
    assert cf.ARCHIVES[BINARY].sha256 in msg
    assert hashlib.sha256(b"this is not the cifar-100 archive").hexdigest() in msg
    assert not (tmp_path / "tfds" / "metalearn_cifar100").exists()


def test_archive_with_wrong_labels_is_refused(tmp_path):
    path = tmp_path / BINARY
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "cifar-100-binary/coarse_label_names.txt", b"a\nb")
        _add(tar, "cifar-100-binary/fine_label_names.txt", b"c\nd")
        _add(tar, "cifar-100-binary/train.bin", bytes(3074))
        _add(tar, "cifar-100-binary/test.bin", bytes(3074))
    with pytest.raises(DataError, match="unexpected label names"):
        cf.read_archive(path, "binary")
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable tar.gz"):
        cf.read_archive(path, "binary")
