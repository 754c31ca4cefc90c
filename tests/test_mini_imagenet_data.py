"""mini-ImageNet data path (layouts, TFDS builder, load_mini_imagenet), network blocked.

Every source is synthesised in the exact file layout and format of the real release, scaled
down by monkeypatching the split (4/2/2 classes taken from the real split) and the number
of images per class (6 instead of 600).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metalearn.data import mini_imagenet as mi
from metalearn.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("no_network")

PER_CLASS = 6
SMALL_SPLIT = {
    "train": mi.TRAIN_WNIDS[:4],
    "validation": mi.VALIDATION_WNIDS[:2],
    "test": mi.TEST_WNIDS[:2],
}
FILE_SPLIT = {"train": "train", "validation": "val", "test": "test"}
ALL_NAMES = (
    "mini-imagenet-cache-train.pkl",
    "mini-imagenet-cache-val.pkl",
    "mini-imagenet-cache-test.pkl",
    "few-shot-train.npz",
    "few-shot-val.npz",
    "few-shot-test.npz",
    "train.csv",
    "val.csv",
    "test.csv",
    "images/",
)


@pytest.fixture(autouse=True)
def small_dataset(monkeypatch):
    monkeypatch.setattr(mi, "SPLIT_WNIDS", SMALL_SPLIT)
    monkeypatch.setattr(mi, "IMAGES_PER_CLASS", PER_CLASS)


def class_images(wnid: str, smooth: bool = False) -> np.ndarray:
    """(PER_CLASS, 84, 84, 3) uint8 determined by the wnid; smooth ones survive JPEG well."""
    rng = np.random.default_rng(int(wnid[1:]))
    if not smooth:
        return rng.integers(0, 256, size=(PER_CLASS, 84, 84, 3), dtype=np.uint8)
    ramp = np.linspace(0, 60, 84)
    base = ramp[:, None, None] + ramp[None, :, None] * np.array([0.5, 1.0, 0.2])
    colors = rng.integers(30, 160, size=(PER_CLASS, 1, 1, 1, 3))
    return np.clip(base[None] + colors[:, 0], 0, 255).astype(np.uint8)


def expected_arrays(smooth: bool = False) -> dict[str, np.ndarray]:
    return {s: np.stack([class_images(w, smooth) for w in sorted(ws)]) for s, ws in SMALL_SPLIT.items()}


def write_pickles(folder: Path, protocol: int = 4) -> None:
    """mini-imagenet-cache-<split>.pkl: image_data (N, 84, 84, 3) + class_dict {wnid: rows}."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, wnids in SMALL_SPLIT.items():
        order = list(reversed(wnids))  # class blocks not in sorted order, as in the real files
        image_data = np.concatenate([class_images(w) for w in order])
        class_dict = {w: list(range(i * PER_CLASS, (i + 1) * PER_CLASS)) for i, w in enumerate(order)}
        with open(folder / f"mini-imagenet-cache-{FILE_SPLIT[split]}.pkl", "wb") as f:
            pickle.dump({"image_data": image_data, "class_dict": class_dict}, f, protocol=protocol)


def write_npz(folder: Path, offset: int = 0) -> None:
    """TADAM few-shot-<split>.npz: shuffled features + targets = index in the sorted wnids."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for split, wnids in SMALL_SPLIT.items():
        features = np.concatenate([class_images(w) for w in sorted(wnids)])
        targets = np.repeat(np.arange(len(wnids)), PER_CLASS) + offset
        perm = rng.permutation(len(features))
        np.savez(folder / f"few-shot-{FILE_SPLIT[split]}.npz", features=features[perm], targets=targets[perm])


def npz_expected(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for split in SMALL_SPLIT:
        with np.load(folder / f"few-shot-{FILE_SPLIT[split]}.npz") as npz:
            feats, targets = npz["features"], npz["targets"]
        out[split] = np.stack([feats[targets == t] for t in np.unique(targets)])
    return out


def write_csv_images(folder: Path, size: tuple[int, int] = (84, 84)) -> None:
    """twitter-research/meta-learning-lstm CSVs + Ravi's flat images/ folder of jpgs."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for split, wnids in SMALL_SPLIT.items():
        lines = ["filename,label"]
        for w in wnids:
            for k, pixels in enumerate(class_images(w, smooth=True), start=1):
                name = f"{w}{k:08d}.jpg"
                Image.fromarray(pixels).resize(size, Image.BICUBIC).save(images / name, quality=95)
                lines.append(f"{name},{w}")
        (folder / f"{FILE_SPLIT[split]}.csv").write_text("\n".join(lines) + "\n")


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


def test_embedded_split_is_ravi_larochelle():
    splits = (mi.TRAIN_WNIDS, mi.VALIDATION_WNIDS, mi.TEST_WNIDS)
    assert [len(s) for s in splits] == [64, 16, 20]
    everything = [w for s in splits for w in s]
    assert len(set(everything)) == 100  # disjoint
    assert all(re.fullmatch(r"n\d{8}", w) for w in everything)
    assert all(list(s) == sorted(s) for s in splits)
    assert {"n01930112", "n07613480"} <= set(mi.TEST_WNIDS) and "n01532829" in mi.TRAIN_WNIDS


def test_builder_metadata():
    assert mi.MetalearnMiniImagenet.name == "metalearn_mini_imagenet"
    text = mi.MetalearnMiniImagenet.MANUAL_DOWNLOAD_INSTRUCTIONS
    for name in ("mini-imagenet-cache-val.pkl", "few-shot-test.npz", "train.csv", "images/"):
        assert name in text


@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_layout_exact_pixels_and_disjoint_splits(tmp_path, protocol):
    manual = tmp_path / "manual"
    write_pickles(manual, protocol)
    arrays = mi.load_mini_imagenet(str(manual), str(tmp_path / "data"))
    expected = expected_arrays()
    assert set(arrays) == {"train", "validation", "test"}
    for split, arr in arrays.items():
        assert arr.dtype == np.uint8
        assert arr.shape == (len(SMALL_SPLIT[split]), PER_CLASS, 84, 84, 3)
        np.testing.assert_array_equal(arr, expected[split])
    firsts = [arr[c, 0].tobytes() for arr in arrays.values() for c in range(len(arr))]
    assert len(set(firsts)) == 8  # no class appears twice, across or within splits
    assert (tmp_path / "data" / "metalearn_mini_imagenet" / "pickle" / "1.0.0").is_dir()
    assert mi.cache_path(tmp_path / "data", "pickle", 84).is_file()


def test_npz_layout_exact_pixels(tmp_path):
    manual = tmp_path / "manual"
    write_npz(manual)
    arrays = mi.load_mini_imagenet(str(manual), str(tmp_path / "data"))
    expected = npz_expected(manual)  # classes by sorted wnid, images in file order
    for split, arr in arrays.items():
        np.testing.assert_array_equal(arr, expected[split])
        for c, wnid in enumerate(sorted(SMALL_SPLIT[split])):  # same images as the class's own
            got = sorted(img.tobytes() for img in arr[c])
            assert got == sorted(img.tobytes() for img in class_images(wnid))


def test_builder_alone_reads_manual_dir(tmp_path):
    """The TFDS builder also works on its own (e.g. from the tfds CLI), via manual_dir."""
    import tensorflow_datasets as tfds

    manual = tmp_path / "manual"
    write_npz(manual)
    builder = mi.MetalearnMiniImagenet(config="npz", data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False, manual_dir=str(manual))
    )
    source = builder.as_data_source(split="validation")
    assert len(source) == 2 * PER_CLASS
    rec = source[0]
    assert rec["image"].shape == (84, 84, 3) and rec["image"].dtype == np.uint8
    label = rec["label"].decode() if isinstance(rec["label"], bytes) else rec["label"]
    split = rec["split"].decode() if isinstance(rec["split"], bytes) else rec["split"]
    assert label in SMALL_SPLIT["validation"] and split == "validation"
    wrong = mi.MetalearnMiniImagenet(config="pickle", data_dir=str(tmp_path), file_format="array_record")
    with pytest.raises(DataError, match="config pickle needs mini-imagenet-cache-train.pkl"):
        wrong.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False, manual_dir=str(manual))
        )


def test_npz_offset_targets(tmp_path):
    manual = tmp_path / "manual"
    write_npz(manual, offset=64)
    arrays = mi.load_mini_imagenet(str(manual), str(tmp_path / "data"))
    np.testing.assert_array_equal(arrays["test"], npz_expected(manual)["test"])


def test_csv_images_layout_approximate_pixels(tmp_path):
    manual = tmp_path / "manual"
    write_csv_images(manual)
    arrays = mi.load_mini_imagenet(str(manual), str(tmp_path / "data"))
    expected = expected_arrays(smooth=True)
    for split, arr in arrays.items():
        assert arr.shape == expected[split].shape
        diff = np.abs(arr.astype(int) - expected[split].astype(int))
        assert diff.mean() < 2.0 and diff.max() < 40  # JPEG at quality 95


def test_csv_images_other_size_are_resized_to_84(tmp_path):
    manual = tmp_path / "manual"
    write_csv_images(manual, size=(120, 100))
    arrays = mi.load_mini_imagenet(str(manual), str(tmp_path / "data"))
    expected = expected_arrays(smooth=True)
    assert arrays["train"].shape == (4, PER_CLASS, 84, 84, 3)
    assert np.abs(arrays["train"].astype(int) - expected["train"].astype(int)).mean() < 4.0


def test_cache_reused_without_builder_or_files(tmp_path, monkeypatch):
    manual = tmp_path / "manual"
    write_pickles(manual)
    data = str(tmp_path / "data")
    first = mi.load_mini_imagenet(str(manual), data)

    def forbidden(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(mi, "MetalearnMiniImagenet", forbidden)
    monkeypatch.setattr(mi, "read_layout", forbidden)
    second = mi.load_mini_imagenet(str(manual), data)
    for split in first:
        np.testing.assert_array_equal(first[split], second[split])
    for f in manual.iterdir():  # the manual files are gone: the cache still serves
        f.unlink()
    third = mi.load_mini_imagenet(str(manual), data)
    np.testing.assert_array_equal(first["test"], third["test"])


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    manual = tmp_path / "manual"
    write_pickles(manual)
    first = mi.load_mini_imagenet(str(manual), str(tmp_path))
    path = mi.cache_path(tmp_path, "pickle", 84)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])

    def forbidden(*args, **kwargs):
        raise AssertionError("the TFDS build should have been used")

    monkeypatch.setattr(mi, "read_layout", forbidden)  # TFDS build exists: no re-read
    rebuilt = mi.load_mini_imagenet(str(manual), str(tmp_path))
    for split in first:
        np.testing.assert_array_equal(first[split], rebuilt[split])
    assert path.stat().st_size == len(data)


def test_image_size_resize_and_separate_cache(tmp_path):
    manual = tmp_path / "manual"
    write_pickles(manual)
    arrays = mi.load_mini_imagenet(str(manual), str(tmp_path), image_size=32)
    assert arrays["validation"].shape == (2, PER_CLASS, 32, 32, 3)
    source = class_images(sorted(SMALL_SPLIT["validation"])[1])[3]
    want = np.asarray(Image.fromarray(source).resize((32, 32), Image.LANCZOS))
    np.testing.assert_array_equal(arrays["validation"][1, 3], want)
    assert mi.cache_path(tmp_path, "pickle", 32).is_file()
    assert not mi.cache_path(tmp_path, "pickle", 84).exists()


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "84"])
def test_bad_image_size_is_config_error(tmp_path, bad):
    with pytest.raises(ConfigError, match=r"dataset\.image_size"):
        mi.load_mini_imagenet(str(tmp_path), str(tmp_path), image_size=bad)


def test_missing_files_lists_every_option(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    with pytest.raises(DataError) as info:
        mi.load_mini_imagenet(str(manual), str(tmp_path / "data"))
    msg = assert_one_line(info)
    assert str(manual) in msg and "dataset.manual_dir" in msg
    for name in ALL_NAMES:
        assert name in msg
    assert not (tmp_path / "data" / "metalearn_mini_imagenet_cache").exists()


def test_partial_layout_names_the_missing_files(tmp_path):
    manual = tmp_path / "manual"
    write_pickles(manual)
    (manual / "mini-imagenet-cache-val.pkl").unlink()
    (manual / "mini-imagenet-cache-test.pkl").unlink()
    with pytest.raises(DataError) as info:
        mi.load_mini_imagenet(str(manual), str(tmp_path / "data"))
    msg = assert_one_line(info)
    assert "pickle layout: found mini-imagenet-cache-train.pkl but missing " in msg
    assert "missing mini-imagenet-cache-val.pkl, mini-imagenet-cache-test.pkl" in msg


def test_default_manual_dir_under_data_dir(tmp_path):
    with pytest.raises(DataError) as info:
        mi.load_mini_imagenet(None, str(tmp_path))
    assert str(tmp_path / "downloads" / "manual") in assert_one_line(info)
    write_npz(tmp_path / "downloads" / "manual")
    arrays = mi.load_mini_imagenet(None, str(tmp_path))
    assert arrays["train"].shape == (4, PER_CLASS, 84, 84, 3)


def test_learn2learn_validation_pickle_name(tmp_path):
    manual = tmp_path / "manual"
    write_pickles(manual)
    (manual / "mini-imagenet-cache-val.pkl").rename(manual / "mini-imagenet-cache-validation.pkl")
    arrays = mi.load_mini_imagenet(str(manual), str(tmp_path / "data"))
    np.testing.assert_array_equal(arrays["validation"], expected_arrays()["validation"])


def test_truncated_pickle_names_file(tmp_path):
    manual = tmp_path / "manual"
    write_pickles(manual)
    bad = manual / "mini-imagenet-cache-val.pkl"
    bad.write_bytes(bad.read_bytes()[:5000])
    with pytest.raises(DataError) as info:
        mi.load_mini_imagenet(str(manual), str(tmp_path / "data"))
    assert str(bad) in assert_one_line(info)
    assert not (tmp_path / "data" / "metalearn_mini_imagenet").exists()  # nothing was built


def test_pickle_with_foreign_objects_is_refused(tmp_path):
    manual = tmp_path / "manual"
    write_pickles(manual)
    bad = manual / "mini-imagenet-cache-test.pkl"
    with open(bad, "wb") as f:
        pickle.dump({"image_data": Path("x"), "class_dict": {}}, f)
    with pytest.raises(DataError, match="refusing to load") as info:
        mi.load_mini_imagenet(str(manual), str(tmp_path / "data"))
    assert str(bad) in assert_one_line(info)


def test_wrong_classes_in_pickle(tmp_path):
    manual = tmp_path / "manual"
    write_pickles(manual)
    path = manual / "mini-imagenet-cache-train.pkl"
    with open(path, "rb") as f:
        data = pickle.load(f)
    data["class_dict"]["n99999999"] = data["class_dict"].pop(SMALL_SPLIT["train"][0])
    with open(path, "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(DataError) as info:
        mi.load_mini_imagenet(str(manual), str(tmp_path / "data"))
    msg = assert_one_line(info)
    assert str(path) in msg and "n99999999" in msg and SMALL_SPLIT["train"][0] in msg


def test_wrong_images_per_class_in_npz(tmp_path, monkeypatch):
    manual = tmp_path / "manual"
    write_npz(manual)
    monkeypatch.setattr(mi, "IMAGES_PER_CLASS", PER_CLASS + 1)
    with pytest.raises(
        DataError, match=rf"has {PER_CLASS} images of class n\d{{8}}, expected {PER_CLASS + 1}"
    ):
        mi.load_mini_imagenet(str(manual), str(tmp_path / "data"))


def test_npz_with_wrong_keys(tmp_path):
    manual = tmp_path / "manual"
    write_npz(manual)
    bad = manual / "few-shot-train.npz"
    np.savez(bad, images=np.zeros((1, 84, 84, 3), np.uint8), labels=np.zeros(1))
    with pytest.raises(DataError, match="expected features and targets") as info:
        mi.load_mini_imagenet(str(manual), str(tmp_path / "data"))
    assert str(bad) in assert_one_line(info)


def test_csv_naming_a_missing_image(tmp_path):
    manual = tmp_path / "manual"
    write_csv_images(manual)
    gone = f"{SMALL_SPLIT['test'][1]}00000003.jpg"
    (manual / "images" / gone).unlink()
    with pytest.raises(DataError) as info:
        mi.load_mini_imagenet(str(manual), str(tmp_path / "data"))
    msg = assert_one_line(info)
    assert gone in msg and str(manual / "test.csv") in msg and str(manual / "images") in msg


def test_undecodable_image_names_file(tmp_path):
    manual = tmp_path / "manual"
    write_csv_images(manual)
    bad = manual / "images" / f"{SMALL_SPLIT['validation'][0]}00000002.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated jpeg
    with pytest.raises(DataError) as info:
        mi.load_mini_imagenet(str(manual), str(tmp_path / "data"))
    assert str(bad) in assert_one_line(info)
