"""dataset.split (metalearn/data/class_splits.py), the rotation rule (metalearn/data/rotation.py)
and the protocol stated with results (metalearn/protocol.py), with the network blocked."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import SHARED_OMNIGLOT, make_cfg, synthetic_image_arrays
from PIL import Image
from test_omniglot_data import synth_archives, synth_fingerprints, synth_standard_archives

from metalearn.config import owners, validate
from metalearn.data import class_splits as cs
from metalearn.data import omniglot as om
from metalearn.data import omniglot_tfds as omt
from metalearn.errors import ConfigError, DataError
from metalearn.metrics import summarize
from metalearn.protocol import describe_protocol, protocol_of
from metalearn.tasks import image_source
from metalearn.train import final_line

pytestmark = pytest.mark.usefixtures("no_network")

SMALL = ("images_background_small1.zip", "images_background_small2.zip")
FULL_SIZE = 14  # side of the synthetic full-layout build: small, so 1623 x 4 classes stay light


# ----------------------------------------------------------------------------- helpers


def fingerprint_classes(arrays: dict[str, np.ndarray], fingerprints: dict[bytes, str]) -> dict[str, list]:
    """{split: character key of each class} from each class's first image."""
    return {s: [fingerprints[a[c, 0, :, :, 0].tobytes()] for c in range(len(a))] for s, a in arrays.items()}


def block_png(index: int) -> bytes:
    """A 105x105 1-bit PNG whose 7x7 grid of 15-pixel blocks spells ``index + 1`` in binary
    (a border row of strokes keeps the corners background), so that every character stays
    distinct after resizing."""
    bits = np.array([(index + 1) >> b & 1 for b in range(49)], bool).reshape(7, 7)
    pixels = np.where(np.kron(bits, np.ones((15, 15), bool)), 0, 255).astype(np.uint8)
    pixels[0, :] = 255
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def full_layout_archives(folder: Path) -> tuple[dict[str, str], dict[bytes, str]]:
    """images_background.zip + images_evaluation.zip holding every character named by the
    Vinyals lists (1623, the real alphabets and character names; the test alphabets in the
    evaluation archive), 20 identical drawings each. Returns ({archive: sha256},
    {resized first drawing bytes: character key})."""
    chars = cs.vinyals_characters()
    test_alphabets = {k.split("/")[0] for k in chars["test"]}
    everything = sorted(k for keys in chars.values() for k in keys)
    folder.mkdir(parents=True, exist_ok=True)
    fingerprints, checksums = {}, {}
    zips = {
        root: zipfile.ZipFile(folder / f"{root}.zip", "w")
        for root in ("images_background", "images_evaluation")
    }
    for i, key in enumerate(everything):
        root = "images_evaluation" if key.split("/")[0] in test_alphabets else "images_background"
        png = block_png(i)
        for d in range(1, 21):
            zips[root].writestr(f"{root}/{key}/{i:04d}_{d:02d}.png", png)
        drawing = np.array(Image.open(io.BytesIO(png)).convert("L"))
        fingerprints[om._to_model_pixels(drawing[None], FULL_SIZE)[0].tobytes()] = key
    for root, zf in zips.items():
        zf.close()
        checksums[f"{root}.zip"] = omt.sha256_of(folder / f"{root}.zip")
    assert len(fingerprints) == len(everything) == 1623
    return checksums, fingerprints


@pytest.fixture(scope="module")
def full_layout(tmp_path_factory):
    """Synthetic full archives and one data dir (the TFDS build is shared by the tests)."""
    root = tmp_path_factory.mktemp("full_layout")
    checksums, fingerprints = full_layout_archives(root / "manual")
    return root / "manual", root / "data", checksums, fingerprints


@pytest.fixture(scope="module")
def synth_small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth_small")
    return folder, synth_archives(folder)


def load_small(synth, data_dir, **kwargs):
    manual, checksums = synth
    return om.load_omniglot(
        "small", str(manual), str(data_dir), image_size=105, rotations=False, checksums=checksums, **kwargs
    )


# ----------------------------------------------------------------------------- must-show


@pytest.mark.skipif(not all((SHARED_OMNIGLOT / n).is_file() for n in SMALL), reason="no shared Omniglot")
def test_alphabets_split_holds_out_whole_alphabets_on_the_shared_archives(tmp_path):
    arrays = om.load_omniglot(
        "small", str(SHARED_OMNIGLOT), str(tmp_path), image_size=105, rotations=False, split="alphabets"
    )
    keys, images = om._read_tfds("small", SHARED_OMNIGLOT, tmp_path, False, None)
    fingerprints = {(255 - images[i, 0]).tobytes(): key for i, key in enumerate(keys)}
    found = fingerprint_classes(arrays, fingerprints)
    alphabets = {s: {k.split("/")[0] for k in chars} for s, chars in found.items()}
    assert not alphabets["test"] & alphabets["train"]
    assert not alphabets["validation"] & alphabets["train"]
    assert not alphabets["test"] & alphabets["validation"]
    assert sorted(k for chars in found.values() for k in chars) == keys  # all 242, each once
    assert alphabets == {  # the held-out set documented in class_splits for seed 0
        "train": {"Balinese", "Early_Aramaic", "Latin", "Sanskrit", "Tagalog"},
        "validation": {"Japanese_(katakana)"},
        "test": {"Greek", "Korean"},
    }
    # Every seed holds out whole alphabets, with at least one alphabet per split.
    for seed in range(20):
        split = cs.alphabet_split(keys, om.split_sizes("small", len(keys)), seed)
        by_split = {s: {k.split("/")[0] for k in chars} for s, chars in split.items()}
        assert all(by_split.values())
        assert not by_split["train"] & (by_split["validation"] | by_split["test"])
        assert not by_split["validation"] & by_split["test"]


@pytest.mark.slow  # builds 32,460 synthetic drawings in the full archives' layout (about 50 s)
def test_vinyals_yields_exactly_the_split_files_classes(full_layout):
    manual, data_dir, checksums, fingerprints = full_layout
    arrays = om.load_omniglot(
        "standard", str(manual), str(data_dir), image_size=FULL_SIZE, split="vinyals", checksums=checksums
    )
    files = cs.vinyals_classes()
    assert {s: len(a) for s, a in arrays.items()} == {"train": 4112, "validation": 688, "test": 1692}
    for split, arr in arrays.items():
        names = []
        for c in range(0, len(arr), 4):
            key = fingerprints[arr[c, 0, :, :, 0].tobytes()]
            for k in range(4):
                np.testing.assert_array_equal(arr[c + k], np.rot90(arr[c], k, axes=(1, 2)))
                names.append(f"{key}/rot{90 * k:03d}")
        assert names == files[split]  # the same classes, in the files' order
    # The shipped files are the source's: trainval is train then val, 1623 characters in all.
    trainval = (Path(om.__file__).parent / "splits" / "vinyals" / "trainval.txt").read_text().split()
    assert trainval == files["train"] + files["validation"]


# ----------------------------------------------------------------------------- named splits


@pytest.mark.slow  # another read of the 32,460 synthetic drawings (about 20 s)
def test_mamlpp_cut_on_the_full_layout(full_layout):
    manual, data_dir, checksums, fingerprints = full_layout
    arrays = om.load_omniglot(
        "standard",
        str(manual),
        str(data_dir),
        image_size=FULL_SIZE,
        rotations=False,
        split="mamlpp",
        checksums=checksums,
    )
    found = fingerprint_classes(arrays, fingerprints)
    assert {s: len(v) for s, v in found.items()} == {"train": 1150, "validation": 50, "test": 423}
    assert found == cs.mamlpp_split(fingerprints.values())
    # Pinned: the shuffle's seed (val_seed 0 -> 985773) and the first test characters.
    assert np.random.RandomState(0).randint(1, 999999) == 985773
    assert found["test"][:3] == ["Sylheti/character11", "Hebrew/character07", "Aurek-Besh/character18"]
    caches = sorted(p.name for p in (data_dir / "metalearn_omniglot_cache").glob("*.npz"))
    assert f"omniglot_standard_{FULL_SIZE}px_rot0_split-mamlpp_v1.npz" in caches


def test_named_splits_need_the_full_archives(tmp_path):
    checksums = synth_standard_archives(tmp_path / "manual")  # 10 characters, 2 alphabets
    for split in ("vinyals", "mamlpp"):
        with pytest.raises(DataError) as info:
            om.load_omniglot(
                "standard", str(tmp_path / "manual"), str(tmp_path), split=split, checksums=checksums
            )
        msg = str(info.value)
        assert "\n" not in msg and f"dataset.split={split}" in msg and "variant=standard" in msg
    with pytest.raises(ConfigError, match=r"dataset\.split='vinyals'.*variant=standard"):
        om.load_omniglot("small", None, str(tmp_path), split="vinyals")


def test_random_is_todays_split_and_cache(synth_small, tmp_path):
    default = load_small(synth_small, tmp_path)
    named = load_small(synth_small, tmp_path, split="random")
    found = fingerprint_classes(default, synth_fingerprints())
    assert found == om.split_characters(synth_fingerprints().values(), "small", 0)
    for split in om.SPLITS:
        np.testing.assert_array_equal(default[split], named[split])
    # One cache, under the name caches had before dataset.split existed.
    caches = sorted(p.name for p in (tmp_path / "metalearn_omniglot_cache").glob("*.npz"))
    assert caches == ["omniglot_small_105px_rot0_seed0_v1.npz"]
    assert om.cache_path(".", "small", 28, True, 0, "random").name == "omniglot_small_28px_rot1_seed0_v1.npz"


def test_each_split_is_its_own_build(synth_small, tmp_path):
    random = load_small(synth_small, tmp_path)
    alphabets = load_small(synth_small, tmp_path, split="alphabets")
    found = fingerprint_classes(alphabets, synth_fingerprints())
    by_split = {s: {k.split("/")[0] for k in v} for s, v in found.items()}
    assert by_split == {"train": {"Beta"}, "validation": {"Alpha"}, "test": {"Greek"}}
    assert not np.array_equal(random["test"], alphabets["test"][: len(random["test"])])
    caches = sorted(p.name for p in (tmp_path / "metalearn_omniglot_cache").glob("*.npz"))
    assert caches == [
        "omniglot_small_105px_rot0_seed0_v1.npz",
        "omniglot_small_105px_rot0_split-alphabets-seed0_v1.npz",
    ]


# ----------------------------------------------------------------------------- split files


def test_split_file_round_trip(synth_small, tmp_path):
    path = tmp_path / "my_split.yaml"
    path.write_text(
        "train: [Alpha, Greek/character01]\n"
        "validation: [Greek/character03]\n"
        "test: [Beta/character05, Beta/character02]\n"
    )
    arrays = load_small(synth_small, tmp_path / "data", split=str(path))
    assert fingerprint_classes(arrays, synth_fingerprints()) == {
        "train": [f"Alpha/character0{i}" for i in range(1, 5)] + ["Greek/character01"],
        "validation": ["Greek/character03"],
        "test": ["Beta/character05", "Beta/character02"],
    }
    # JSON is YAML too; an edited file is a new build, never the old cache.
    path.write_text('{"train": ["Alpha"], "validation": ["Greek"], "test": ["Beta"]}')
    again = load_small(synth_small, tmp_path / "data", split=str(path))
    assert {s: len(a) for s, a in again.items()} == {"train": 4, "validation": 3, "test": 5}
    assert len(list((tmp_path / "data" / "metalearn_omniglot_cache").glob("*split-file-*.npz"))) == 2


@pytest.mark.parametrize(
    "text, named",
    [
        ("train: [Alpha]\nvalidation: [Greek]\ntest: [Gamma/character01]\n", "'Gamma/character01'"),
        ("train: [Alpha]\nvalidation: [Greek]\ntest: [Alpha/character02]\n", "already in train"),
        ("train: [Alpha]\nvalidation: [Greek]\n", "found ['train', 'validation']"),
        ("train: [Alpha]\nvalidation: []\ntest: [Beta]\n", "validation must be a non-empty list"),
        ("train: [Alpha\n", "unreadable"),
        ("- Alpha\n", "found list"),
    ],
)
def test_split_file_errors_name_the_file_and_entry(synth_small, tmp_path, text, named):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        load_small(synth_small, tmp_path / "data", split=str(path))
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and named in msg
    assert not list((tmp_path / "data" / "metalearn_omniglot_cache").glob("*.npz"))


# ----------------------------------------------------------------------------- config


def omniglot_cfg(**dataset):
    return make_cfg(
        algo={"name": "maml"},
        model={"name": "conv4"},
        dataset={"name": "omniglot", "variant": "small", "n_way": 5, "k_shot": 1, "k_query": 1, **dataset},
    )


def test_split_values_each_dataset_takes(tmp_path):
    validate(omniglot_cfg(split="alphabets"))
    validate(omniglot_cfg(variant="standard", split="vinyals"))
    validate(
        make_cfg(model={"name": "conv4"}, dataset={"name": "mini_imagenet", "n_way": 5, "split": "ravi"})
    )
    (tmp_path / "s.yaml").write_text("train: [A]\nvalidation: [B]\ntest: [C]\n")
    validate(omniglot_cfg(split=str(tmp_path / "s.yaml")))
    bad = [
        (omniglot_cfg(split="vinyals"), "variant=standard"),
        (omniglot_cfg(split="nonesuch"), "existing split file"),
        (omniglot_cfg(split="ravi"), "existing split file"),
        (make_cfg(model={"name": "conv4"}, dataset={"name": "mini_imagenet", "split": "random"}), "'ravi'"),
    ]
    for cfg, named in bad:
        with pytest.raises(ConfigError) as info:
            validate(cfg)
        msg = str(info.value)
        assert "\n" not in msg and "dataset.split=" in msg and named in msg, msg
    # Datasets with no named split have no such key: composition refuses it, naming the
    # datasets that have one (tests/test_config_groups.py for the command-line form).
    for name in ("cifar_fs", "sinusoid"):
        with pytest.raises(Exception, match="Key 'split' not in"):
            make_cfg(dataset={"name": name, "split": "random"})
    assert owners("dataset", "split") == ["mini_imagenet", "omniglot"]


def test_protocol_stated_with_results():
    cfg = omniglot_cfg(rotation_sampling="per_task_train_only", split="alphabets", k_query=3, k_query_test=2)
    protocol = protocol_of(cfg)
    assert protocol == {
        "split": "alphabets",
        "split_seed": 0,
        "rotation": "per_task_train_only",
        "n_tasks": 600,
        "queries_per_class": 2,
        "bn_stats": "batch",
        "checkpoint": "last",
        "top_k": None,
        "ranked_by": None,
        "adaptation": "algorithm",
    }
    assert describe_protocol(protocol) == (
        "split alphabets (seed 0), rotation per_task_train_only, 600 tasks x 2 queries per class, "
        "BatchNorm batch statistics (transductive), last checkpoint"
    )
    line = final_line(
        {"test": summarize(np.array([0.5, 0.7]), "accuracy"), "protocol": protocol}, cfg, "r.json"
    )
    assert line.endswith(f"; protocol: {describe_protocol(protocol)}; results in r.json"), line
    mini = make_cfg(dataset={"name": "mini_imagenet", "k_query": 15}, eval={"k_query": 5})
    assert protocol_of(mini) == {
        "split": "ravi",
        "split_seed": None,
        "rotation": "none",
        "n_tasks": 600,
        "queries_per_class": 5,
        "bn_stats": None,  # make_cfg's default model, the MLP, has no BatchNorm
        "checkpoint": "last",
        "top_k": None,
        "ranked_by": None,
        "adaptation": "algorithm",
    }
    assert protocol_of(omniglot_cfg(rotations=False))["rotation"] == "none"
    assert protocol_of(omniglot_cfg())["split"] == "random"


# ----------------------------------------------------------------------------- rotation rule


def test_training_only_rotation(tmp_path):
    cfg = omniglot_cfg(
        rotation_sampling="per_task_train_only", n_way=4, k_shot=2, k_query=3, placement="device"
    )
    validate(cfg)
    arrays = synthetic_image_arrays(n_classes=6, per_class=20, size=8)
    source = image_source(cfg.dataset, arrays)
    sample = jax.jit(source.sample)
    for split in ("train", "validation", "test"):
        unrotated = {img.tobytes() for img in arrays[split].reshape(-1, 8, 8, 1)}
        rotations = set()
        for seed in range(20):
            task = sample(source.splits[split], jax.random.key(seed))
            x = np.concatenate([task.support_x, task.query_x])
            images = np.round(np.asarray(x) * 255).astype(np.uint8)
            for img in images:
                k = next(k for k in range(4) if np.rot90(img, -k).tobytes() in unrotated)
                rotations.add(k)
        if split == "train":
            assert rotations == {0, 1, 2, 3}
        else:
            assert rotations == {0}, split
