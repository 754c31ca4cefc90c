"""Omniglot data path (TFDS builder + load_omniglot), with the network blocked throughout."""

from __future__ import annotations

import hashlib
import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from metalearn.data import omniglot as om
from metalearn.data import omniglot_tfds as omt
from metalearn.errors import ConfigError, DataError

REAL_DIR = Path(__file__).parents[1].parent / "shared/data/omniglot"
SMALL = ("images_background_small1.zip", "images_background_small2.zip")

# Synthetic "small" archives: Greek is in both with identical images (like the real ones).
SYNTH_LAYOUT = {
    "images_background_small1": {"Alpha": 4, "Greek": 3},
    "images_background_small2": {"Greek": 3, "Beta": 5},
}
SYNTH_UNIQUE = 4 + 3 + 5


pytestmark = pytest.mark.usefixtures("no_network")


def drawing_png(key: str, drawer: int) -> bytes:
    """A 105x105 1-bit PNG (black strokes on white), determined by (character key, drawer)."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"{key}/{drawer}".encode()).digest()[:8]))
    img = Image.new("1", (105, 105), 1)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0, x1, y1 = rng.integers(5, 100, size=4)
        draw.line((int(x0), int(y0), int(x1), int(y1)), fill=0, width=3)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def synth_archives(folder: Path) -> dict[str, str]:
    """Write the synthetic small archives in the original layout; return {name: sha256}."""
    folder.mkdir(parents=True, exist_ok=True)
    checksums = {}
    char_id = 1
    for root, alphabets in SYNTH_LAYOUT.items():
        path = folder / f"{root}.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(f"{root}/", b"")
            for alphabet, n_chars in alphabets.items():
                for c in range(1, n_chars + 1):
                    key = f"{alphabet}/character{c:02d}"
                    for d in range(1, 21):
                        zf.writestr(f"{root}/{key}/{char_id:04d}_{d:02d}.png", drawing_png(key, d))
                    char_id += 1
        checksums[path.name] = omt.sha256_of(path)
    return checksums


def synth_standard_archives(folder: Path) -> dict[str, str]:
    """Write synthetic archives of the ``standard`` variant (10 characters of 20 drawings:
    6 in images_background, 4 in images_evaluation); return {name: sha256}."""
    folder.mkdir(parents=True, exist_ok=True)
    layout = {"images_background": {"Alpha": 6}, "images_evaluation": {"Beta": 4}}
    checksums = {}
    for root, alphabets in layout.items():
        with zipfile.ZipFile(folder / f"{root}.zip", "w") as zf:
            for alphabet, n_chars in alphabets.items():
                for c in range(1, n_chars + 1):
                    key = f"{alphabet}/character{c:02d}"
                    for d in range(1, 21):
                        zf.writestr(f"{root}/{key}/0001_{d:02d}.png", drawing_png(key, d))
        checksums[f"{root}.zip"] = omt.sha256_of(folder / f"{root}.zip")
    return checksums


def synth_fingerprints() -> dict[bytes, str]:
    """Inverted (strokes 255) first drawing of each unique synthetic character -> its key."""
    out = {}
    for alphabets in SYNTH_LAYOUT.values():
        for alphabet, n_chars in alphabets.items():
            for c in range(1, n_chars + 1):
                key = f"{alphabet}/character{c:02d}"
                pixels = np.array(Image.open(io.BytesIO(drawing_png(key, 1))).convert("L"))
                out[(255 - pixels).tobytes()] = key
    return out


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("synth_manual")
    return folder, synth_archives(folder)


def test_split_sizes_reference_and_scaled():
    assert om.split_sizes("standard", 1623) == (1100, 100, 423)
    assert om.split_sizes("small", 242) == (160, 20, 62)
    assert om.split_sizes("small", SYNTH_UNIQUE) == (8, 1, 3)
    assert sum(om.split_sizes("standard", 50)) == 50
    with pytest.raises(DataError):
        om.split_sizes("small", 2)


def test_invalid_variant_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset\.variant.*'small'.*'standard'"):
        om.load_omniglot("huge", None, str(tmp_path))


def test_synthetic_build_shapes_dedup_and_disjoint_splits(synth_dir, tmp_path):
    manual, checksums = synth_dir
    data_dir = str(tmp_path / "tfds")

    plain = om.load_omniglot(
        "small", str(manual), data_dir, image_size=105, rotations=False, checksums=checksums
    )
    sizes = {s: len(a) for s, a in plain.items()}
    assert sizes == {"train": 8, "validation": 1, "test": 3}  # 12 unique: Greek de-duplicated

    # Full resolution without rotations: each class is exactly one inverted source character.
    fingerprints = synth_fingerprints()
    assert len(fingerprints) == SYNTH_UNIQUE
    found = {s: [fingerprints[a[c, 0, :, :, 0].tobytes()] for c in range(len(a))] for s, a in plain.items()}
    assert found == om.split_characters(fingerprints.values(), "small", 0)
    all_keys = [k for keys in found.values() for k in keys]
    assert len(set(all_keys)) == len(all_keys) == SYNTH_UNIQUE  # disjoint, nothing missing
    for arr in plain.values():
        assert set(np.unique(arr)) <= {0, 255}
        assert (arr[:, :, 0, 0, 0] == 0).all()  # background (corner) is 0 after inversion

    rot = om.load_omniglot("small", str(manual), data_dir, checksums=checksums)
    for split, arr in rot.items():
        assert arr.dtype == np.uint8
        assert arr.shape == (4 * sizes[split], 20, 28, 28, 1)
        assert arr.max() == 255 and arr.mean() < 128  # thin bright strokes on a dark background
        base = arr[0::4]
        for k in range(1, 4):
            np.testing.assert_array_equal(arr[k::4], np.rot90(base, k, axes=(2, 3)))
    # Same characters in the same order as without rotations (resized, so compare coarse).
    train_small = om.load_omniglot("small", str(manual), data_dir, rotations=False, checksums=checksums)[
        "train"
    ]
    np.testing.assert_array_equal(rot["train"][0::4], train_small)


def test_other_seed_other_split(synth_dir, tmp_path):
    manual, checksums = synth_dir
    a = om.load_omniglot("small", str(manual), str(tmp_path), rotations=False, checksums=checksums)
    b = om.load_omniglot(
        "small", str(manual), str(tmp_path), rotations=False, split_seed=1, checksums=checksums
    )
    assert not np.array_equal(a["train"], b["train"])
    assert len(list((tmp_path / "metalearn_omniglot_cache").glob("*.npz"))) == 2


def test_missing_archive_offline_fails_fast(synth_dir, tmp_path, no_network):
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.copy(synth_dir[0] / SMALL[0], manual / SMALL[0])
    for download in (True, False):
        before = len(no_network)
        with pytest.raises(DataError) as info:
            om.load_omniglot(
                "small", str(manual), str(tmp_path / "tfds"), download=download, checksums=synth_dir[1]
            )
        # Fails at the first refused connection (none without download): no retry loop.
        assert len(no_network) - before <= int(download)
        msg = str(info.value)
        assert "\n" not in msg
        assert SMALL[1] in msg and str(manual) in msg and "dataset.manual_dir" in msg
    assert not (tmp_path / "tfds" / "metalearn_omniglot_cache").exists()


def test_no_manual_dir_names_default_location(tmp_path):
    with pytest.raises(DataError) as info:
        om.load_omniglot("standard", None, str(tmp_path))
    msg = str(info.value)
    assert "images_background.zip" in msg and "images_evaluation.zip" in msg
    assert str(tmp_path / "downloads" / "manual") in msg and "dataset.manual_dir" in msg


def test_corrupt_archive_names_file_and_checksums(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    for name in SMALL:
        (manual / name).write_bytes(b"this is not the omniglot archive")
    with pytest.raises(DataError) as info:
        om.load_omniglot("small", str(manual), str(tmp_path / "tfds"))
    msg = str(info.value)
    assert "\n" not in msg
    assert SMALL[0] in msg
    assert omt.ARCHIVES[SMALL[0]].sha256 in msg
    assert hashlib.sha256(b"this is not the omniglot archive").hexdigest() in msg


def test_corrupt_cache_is_rebuilt(synth_dir, tmp_path):
    manual, checksums = synth_dir
    first = om.load_omniglot("small", str(manual), str(tmp_path), checksums=checksums)
    path = om.cache_path(tmp_path, "small", 28, True, 0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated npz
    # The TFDS build is still there, so the rebuild needs no archives at all.
    again = om.load_omniglot("small", str(tmp_path / "gone"), str(tmp_path), download=False)
    for split in om.SPLITS:
        np.testing.assert_array_equal(first[split], again[split])
    assert path.stat().st_size == len(data)


@pytest.mark.skipif(not all((REAL_DIR / n).is_file() for n in SMALL), reason="no shared Omniglot")
def test_real_small_archives(tmp_path, monkeypatch):
    for name in SMALL:  # the shipped checksums are the real ones
        assert omt.sha256_of(REAL_DIR / name) == omt.ARCHIVES[name].sha256
    arrays = om.load_omniglot("small", str(REAL_DIR), str(tmp_path))
    assert {s: a.shape for s, a in arrays.items()} == {
        "train": (160 * 4, 20, 28, 28, 1),
        "validation": (20 * 4, 20, 28, 28, 1),
        "test": (62 * 4, 20, 28, 28, 1),
    }
    # 242 distinct characters: no unrotated class appears twice across splits.
    firsts = {a[c, 0].tobytes() for a in arrays.values() for c in range(0, len(a), 4)}
    assert len(firsts) == 242

    # Second call: served from the .npz cache, without touching TFDS.
    def no_tfds(*args, **kwargs):
        raise AssertionError("TFDS was read although the cache exists")

    monkeypatch.setattr(om, "_read_tfds", no_tfds)
    caches = sorted((tmp_path / "metalearn_omniglot_cache").glob("*.npz"))
    cached = om.load_omniglot("small", str(REAL_DIR), str(tmp_path))  # a cache hit: no rebuild
    assert sorted((tmp_path / "metalearn_omniglot_cache").glob("*.npz")) == caches and len(caches) == 1
    for split in om.SPLITS:
        np.testing.assert_array_equal(arrays[split], cached[split])


def test_synthetic_standard_variant(tmp_path):
    manual = tmp_path / "manual"
    checksums = synth_standard_archives(manual)
    arrays = om.load_omniglot("standard", str(manual), str(tmp_path), image_size=14, checksums=checksums)
    n_train, n_val, n_test = om.split_sizes("standard", 10)
    assert {s: a.shape[0] for s, a in arrays.items()} == {
        "train": 4 * n_train,
        "validation": 4 * n_val,
        "test": 4 * n_test,
    }
    assert arrays["train"].shape[1:] == (20, 14, 14, 1)


def _prepare(builder):
    import tensorflow_datasets as tfds

    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def test_builder_download_path_offline_fails_fast(tmp_path, no_network):
    builder = omt.MetalearnOmniglot(config="small", data_dir=str(tmp_path), file_format="array_record")
    with pytest.raises(DataError, match=r"cannot download Omniglot .*dataset\.manual_dir"):
        _prepare(builder)
    assert len(no_network) <= 1  # the first refused connection ends it: no retry loop


def test_builder_download_path_verifies_downloads(synth_dir, tmp_path, monkeypatch):
    """The online path with the HTTP part faked: downloaded files are checksummed too."""
    import tensorflow_datasets as tfds

    monkeypatch.setattr(omt, "network_unavailable_reason", lambda *a, **k: None)
    serve_from = {"dir": synth_dir[0]}  # synthetic files where the real ones are expected
    monkeypatch.setattr(
        tfds.download.DownloadManager,
        "download",
        lambda self, urls: {name: serve_from["dir"] / name for name in urls},
    )
    builder = omt.MetalearnOmniglot(config="small", data_dir=str(tmp_path), file_format="array_record")
    with pytest.raises(DataError, match=f"{SMALL[0]}.*expected sha256 {omt.ARCHIVES[SMALL[0]].sha256}"):
        _prepare(builder)
    if all((REAL_DIR / n).is_file() for n in SMALL):
        serve_from["dir"] = REAL_DIR
        builder = omt.MetalearnOmniglot(config="small", data_dir=str(tmp_path), file_format="array_record")
        _prepare(builder)
        assert len(builder.as_data_source(split="train")) == 242 * 20
