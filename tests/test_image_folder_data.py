"""dataset=image_folder: users' own image folders (flat and split layouts), split rule, decoding,
npz cache and one-line errors. Synthetic PNG/JPG files written with PIL; fast, no network."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metalearn.data import image_folder as imf
from metalearn.data.common import ClassImages
from metalearn.errors import ConfigError, DataError

RATIOS = [0.6, 0.2, 0.2]
# (width, height, PIL mode, extension) cycled over the files of the flat folder.
VARIANTS = [
    (10, 12, "RGB", "png"),
    (16, 16, "L", "png"),
    (20, 8, "RGBA", "png"),
    (9, 9, "RGB", "jpg"),
    (12, 12, "P", "gif"),
    (14, 11, "RGB", "JPEG"),
]


def write_image(path: Path, width: int, height: int, mode: str, seed: int) -> np.ndarray:
    """Write a random image; return its pixels as stored (before any compression)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        arr = rng.integers(0, 256, (height, width), dtype=np.uint8)
        img = Image.fromarray(arr, "L")
    elif mode == "RGBA":
        arr = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        img = Image.fromarray(arr, "RGBA")
    else:
        arr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        img = Image.fromarray(arr, "RGB")
        if mode == "P":
            img = img.convert("P")
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "gif": "GIF"}.get(path.suffix[1:].lower(), "PNG")
    img.save(path, format=fmt)
    return arr


def make_flat(root: Path, n_classes: int = 10) -> dict[str, int]:
    """``root/class_XX/...`` with 3-7 images per class (one nested), plus files to ignore."""
    counts = {}
    k = 0
    for c in range(n_classes):
        name = f"class_{c:02d}"
        n = 3 + c % 5
        for i in range(n):
            w, h, mode, ext = VARIANTS[k % len(VARIANTS)]
            sub = "nested/" if i == 0 and c % 3 == 0 else ""
            write_image(root / name / f"{sub}img_{i}.{ext}", w, h, mode, seed=k)
            k += 1
        counts[name] = n
        (root / name / "notes.txt").write_text("not an image")
        (root / name / ".hidden.png").write_bytes(b"not decoded: hidden")
    (root / "empty_class").mkdir()
    write_image(root / ".git" / "x" / "a.png", 8, 8, "RGB", seed=999)  # hidden folder: ignored
    (root / "README.md").write_text("top-level files are ignored")
    return counts


def load(root, data_dir, image_size=8, channels=3, ratios=RATIOS, seed=0):
    return imf.load_image_folder(str(root), str(data_dir), image_size, channels, ratios, seed)


def cache_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / imf.CACHE_DIR_NAME).glob("*.npz"))


def assert_one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


@pytest.fixture
def flat(tmp_path):
    root = tmp_path / "my_images"
    counts = make_flat(root)
    return root, counts, tmp_path / "data"


def test_flat_layout_splits_counts_and_names(flat, caplog):
    root, counts, data_dir = flat
    with caplog.at_level(logging.WARNING, logger=imf.__name__):
        data, names = imf.load_image_folder_with_names(str(root), str(data_dir), 8, 3, RATIOS, 0)
    assert "empty_class" in caplog.text
    assert set(data) == {"train", "validation", "test"}
    assert [len(names[s]) for s in ("train", "validation", "test")] == [6, 2, 2]
    all_names = names["train"] + names["validation"] + names["test"]
    assert sorted(all_names) == sorted(counts)  # disjoint, complete, empty class skipped
    for split, split_data in data.items():
        assert isinstance(split_data, ClassImages)
        assert split_data.images.dtype == np.uint8
        assert split_data.images.shape[1:] == (8, 8, 3)
        assert split_data.counts.dtype == np.int64
        assert list(split_data.counts) == [counts[n] for n in names[split]]
        assert int(split_data.counts.sum()) == len(split_data.images)
        assert names[split] == sorted(names[split])
    assert load(root, data_dir)["train"].counts.tolist() == data["train"].counts.tolist()
    assert imf.describe(data) == (
        f"train 6 classes / {data['train'].counts.sum()} images, "
        f"validation 2 classes / {data['validation'].counts.sum()} images, "
        f"test 2 classes / {data['test'].counts.sum()} images (8x8x3)"
    )


@pytest.mark.parametrize(
    "n, ratios, expected",
    [
        (10, [0.64, 0.16, 0.2], (6, 2, 2)),
        (10, [1 / 3, 1 / 3, 1 / 3], (4, 3, 3)),
        (3, [0.8, 0.1, 0.1], (1, 1, 1)),
        (100, [0.7, 0.1, 0.2], (70, 10, 20)),
        (7, [0.5, 0.25, 0.25], (3, 2, 2)),  # 3.5 / 1.75 / 1.75: larger remainders win
        (4, [0.9, 0.1, 0.0001], (2, 1, 1)),  # positive ratios take one class from the largest
    ],
)
def test_split_counts_rounding(n, ratios, expected):
    assert imf.split_counts(n, ratios) == expected
    assert sum(expected) == n


@pytest.mark.parametrize("n, ratios", [(2, [0.6, 0.2, 0.2]), (10, [0.5, 0.5, 0.0])])
def test_split_counts_too_few_classes(n, ratios):
    with pytest.raises(DataError) as err:
        imf.split_counts(n, ratios)
    assert_one_line(err, "dataset.split_ratios", f"{n} classes")


def test_too_few_classes_for_ratios(tmp_path):
    root = tmp_path / "two"
    make_flat(root, n_classes=2)
    with pytest.raises(DataError) as err:
        load(root, tmp_path / "data")
    assert_one_line(err, "dataset.split_ratios", "2 classes")


def test_determinism_and_seed(flat, tmp_path):
    root, _, data_dir = flat
    first = imf.load_image_folder_with_names(str(root), str(data_dir), 8, 3, RATIOS, 0)[1]
    again = imf.load_image_folder_with_names(str(root), str(tmp_path / "other"), 8, 3, RATIOS, 0)[1]
    assert first == again  # same seed, separate fresh build
    other = imf.load_image_folder_with_names(str(root), str(data_dir), 8, 3, RATIOS, 1)[1]
    assert other != first
    assert sorted(sum(other.values(), [])) == sorted(sum(first.values(), []))
    assert len(cache_files(data_dir)) == 2  # the seed is part of the cache key


def test_pixel_round_trip_and_channels(tmp_path):
    root = tmp_path / "exact"
    rgb = {}
    grey = {}
    for c in range(3):
        rgb[c] = write_image(root / f"c{c}" / "a.png", 12, 12, "RGB", seed=c)
        grey[c] = write_image(root / f"c{c}" / "b.png", 12, 12, "L", seed=10 + c)
    data_dir = tmp_path / "data"
    ratios = [1 / 3, 1 / 3, 1 / 3]
    data3, names3 = imf.load_image_folder_with_names(str(root), str(data_dir), 12, 3, ratios, 0)
    data1, names1 = imf.load_image_folder_with_names(str(root), str(data_dir), 12, 1, ratios, 0)
    assert names3 == names1
    for split in data3:
        (name,) = names3[split]
        c = int(name[1:])
        assert data3[split].counts.tolist() == [2]
        assert data3[split].images.shape == (2, 12, 12, 3)
        assert data1[split].images.shape == (2, 12, 12, 1)
        np.testing.assert_array_equal(data3[split].images[0], rgb[c])  # a.png sorts first
        np.testing.assert_array_equal(data3[split].images[1], np.repeat(grey[c][:, :, None], 3, axis=2))
        np.testing.assert_array_equal(data1[split].images[1, :, :, 0], grey[c])
        expected_l = np.asarray(Image.fromarray(rgb[c], "RGB").convert("L"))
        np.testing.assert_array_equal(data1[split].images[0, :, :, 0], expected_l)
    # Resizing (aspect ratio not kept) gives the requested square size.
    small = load(root, data_dir, image_size=5, channels=1, ratios=ratios)
    assert small["train"].images.shape == (2, 5, 5, 1)


def test_cache_reused_then_rebuilt_after_change(flat, monkeypatch):
    root, counts, data_dir = flat
    first = load(root, data_dir)
    (cache,) = cache_files(data_dir)
    assert cache.name.startswith("my_images_")

    def no_decode(*args, **kwargs):
        raise AssertionError("decoder called although the cache is valid")

    monkeypatch.setattr(imf, "_decode_image", no_decode)
    second = load(root, data_dir)
    for split in first:
        np.testing.assert_array_equal(first[split].images, second[split].images)
        np.testing.assert_array_equal(first[split].counts, second[split].counts)

    write_image(root / "class_00" / "zz_new.png", 8, 8, "RGB", seed=123)
    with pytest.raises(AssertionError, match="decoder called"):
        load(root, data_dir)  # the folder changed: the cache must be rebuilt
    monkeypatch.undo()
    _, names = imf.load_image_folder_with_names(str(root), str(data_dir), 8, 3, RATIOS, 0)
    third = load(root, data_dir)
    split = next(s for s in names if "class_00" in names[s])
    assert third[split].counts[names[split].index("class_00")] == counts["class_00"] + 1
    assert len(cache_files(data_dir)) == 2

    load(root, data_dir, image_size=6)  # another setting, another cache
    assert len(cache_files(data_dir)) == 3


def test_corrupt_cache_is_rebuilt(flat, caplog):
    root, _, data_dir = flat
    first = load(root, data_dir)
    (cache,) = cache_files(data_dir)
    cache.write_bytes(b"this is not an npz file")
    with caplog.at_level(logging.WARNING):
        second = load(root, data_dir)
    assert "rebuilding" in caplog.text
    for split in first:
        np.testing.assert_array_equal(first[split].images, second[split].images)
    with np.load(cache, allow_pickle=False) as npz:
        assert npz["train_classes"].dtype.kind == "U"
        assert set(npz.files) == {f"{s}_{p}" for s in first for p in ("images", "counts", "classes")}

    # A readable but inconsistent cache (counts do not add up) is rebuilt as well.
    arrays = dict(np.load(cache, allow_pickle=False))
    arrays["test_counts"] = arrays["test_counts"] + 1
    np.savez(cache, **arrays)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        third = load(root, data_dir)
    assert "inconsistent" in caplog.text
    np.testing.assert_array_equal(third["test"].counts, first["test"].counts)


@pytest.mark.parametrize("val_name", ["val", "validation", "Val"])
def test_split_layout(tmp_path, val_name):
    root = tmp_path / "presplit"
    layout = {"train": ["a", "b", "c"], val_name: ["d"], "test": ["e", "f"]}
    for split_dir, classes in layout.items():
        for j, cls in enumerate(classes):
            for i in range(2 + j):
                write_image(root / split_dir / cls / f"{i}.png", 10, 10, "RGB", seed=i + 10 * j)
    (root / "test" / "empty").mkdir()
    data, names = imf.load_image_folder_with_names(str(root), str(tmp_path / "d"), 8, 1, RATIOS, 5)
    assert names == {"train": ["a", "b", "c"], "validation": ["d"], "test": ["e", "f"]}
    assert data["train"].counts.tolist() == [2, 3, 4]
    assert data["validation"].counts.tolist() == [2]
    assert data["test"].counts.tolist() == [2, 3]
    assert data["test"].images.shape == (5, 8, 8, 1)


def make_split(root: Path, dirs: dict[str, list[str]]) -> None:
    for split_dir, classes in dirs.items():
        for cls in classes:
            write_image(root / split_dir / cls / "0.png", 6, 6, "L", seed=0)


def test_split_layout_errors(tmp_path):
    missing = tmp_path / "missing"
    make_split(missing, {"train": ["a"], "test": ["b"]})
    with pytest.raises(DataError) as err:
        load(missing, tmp_path / "d")
    assert_one_line(err, "dataset.path", "val/ or validation/")

    dup = tmp_path / "dup"
    make_split(dup, {"train": ["a", "shared"], "val": ["b"], "test": ["shared"]})
    with pytest.raises(DataError) as err:
        load(dup, tmp_path / "d")
    assert_one_line(err, "dataset.path", "'shared'")

    both = tmp_path / "both"
    make_split(both, {"train": ["a"], "val": ["b"], "validation": ["c"], "test": ["d"]})
    with pytest.raises(DataError) as err:
        load(both, tmp_path / "d")
    assert_one_line(err, "dataset.path", "val/", "validation/")

    empty_split = tmp_path / "empty_split"
    make_split(empty_split, {"train": ["a"], "val": ["b"]})
    (empty_split / "test" / "nothing").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        load(empty_split, tmp_path / "d")
    assert_one_line(err, "dataset.path", "test/")


def test_path_errors(tmp_path):
    with pytest.raises(DataError) as err:
        load(tmp_path / "nope", tmp_path / "d")
    assert_one_line(err, "dataset.path", "does not exist")

    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    with pytest.raises(DataError) as err:
        load(a_file, tmp_path / "d")
    assert_one_line(err, "dataset.path", "not a directory")

    with pytest.raises(DataError) as err:
        imf.load_image_folder(None, None, 8, 3, RATIOS, 0)
    assert_one_line(err, "dataset.path")

    no_classes = tmp_path / "no_classes"
    (no_classes / "empty").mkdir(parents=True)
    write_image(no_classes / "loose.png", 6, 6, "RGB", seed=0)
    (no_classes / "docs").mkdir()
    (no_classes / "docs" / "a.txt").write_text("text")
    with pytest.raises(DataError) as err:
        load(no_classes, tmp_path / "d")
    assert_one_line(err, "dataset.path", "no class subfolders", "one subfolder per class")


def test_undecodable_image_names_the_file(flat):
    root, _, data_dir = flat
    bad = root / "class_03" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(DataError) as err:
        load(root, data_dir)
    assert_one_line(err, "dataset.path", str(bad))
    assert cache_files(data_dir) == []


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"channels": 2}, "dataset.channels"),
        ({"channels": 4}, "dataset.channels"),
        ({"image_size": 3}, "dataset.image_size"),
        ({"image_size": 8.5}, "dataset.image_size"),
        ({"ratios": [0.5, 0.2, 0.2]}, "dataset.split_ratios"),
        ({"ratios": [0.8, 0.3, -0.1]}, "dataset.split_ratios"),
        ({"ratios": [0.5, 0.5]}, "dataset.split_ratios"),
        ({"seed": -1}, "dataset.split_seed"),
    ],
)
def test_config_errors(flat, kwargs, key):
    root, _, data_dir = flat
    with pytest.raises(ConfigError) as err:
        load(root, data_dir, **kwargs)
    assert_one_line(err, key)


def test_describe_class_indexed_arrays():
    arrays = {s: np.zeros((4, 5, 6, 6, 1), np.uint8) for s in ("train", "validation", "test")}
    assert imf.describe(arrays) == (
        "train 4 classes / 20 images, validation 4 classes / 20 images, test 4 classes / 20 images (6x6x1)"
    )
