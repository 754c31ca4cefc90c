"""The existing datasets give byte-identical class arrays across the data-layer redesign.

The digests below were computed with the data modules as they were BEFORE the redesign (commit
d71d1a5: omniglot.py, cifar_fewshot.py, mini_imagenet.py, image_folder.py each with their own
locate/build/cache steps), by running this file's ``_digest`` on the same inputs. Each digest
covers every split's name, dtype, shape and bytes (for image folders: images, counts and
class names), so any change to a split, class order, image order or pixel fails the test.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from conftest import SHARED_OMNIGLOT, scaled_mini_imagenet_split, write_mini_imagenet_pickles
from test_cifar_fewshot_data import BINARY, write_binary_archive
from test_image_folder_data import make_flat
from test_omniglot_data import synth_archives, synth_standard_archives

from metalearn.data import cifar_fewshot as cf
from metalearn.data import image_folder as imf
from metalearn.data import mini_imagenet as mi
from metalearn.data import omniglot as om
from metalearn.data.common import ClassImages

pytestmark = pytest.mark.usefixtures("no_network")

SMALL = ("images_background_small1.zip", "images_background_small2.zip")
# The shared archives: beside the checkout, or beside the folder of worktrees holding it.
OMNIGLOT_DIR = next(
    (
        d
        for d in (SHARED_OMNIGLOT, SHARED_OMNIGLOT.parents[3] / "shared/data/omniglot")
        if all((d / n).is_file() for n in SMALL)
    ),
    None,
)

EXPECTED = {
    "omniglot_synth_small": "93a27ee3625d5f77f565518dc154d25e8652c42ec0616fe6d8479f0bf55de2f8",
    "omniglot_synth_small_105_seed3": "41aa7fd810bb3c26fc4eef2b64bf1cbc0ea7a0922495af9839cb8e8ad9cbff23",
    "omniglot_synth_standard_14": "e3539365fc9c8340bc96df6abfe912cfafc632041daf9f957943fa3189b27fec",
    "omniglot_real_small": "f24a026c53a26bb10085ae9f2600a8e02a7223ee75099af005c9284406af2a16",
    "cifar_fs_synth": "98f2d8217a2a13284991a4a4087e8123467649475553f70ae31d220bf2df3ddb",
    "fc100_synth": "ac8de55b4e3c27c3d9fbbd3256285b0ab48573003fb32de5b9036b94cae73f76",
    "mini_imagenet_synth_84": "f7317b1f08565feae28f6d541a1796c9780e5f025d1c12c4ac1cd7b02d7d8be7",
    "mini_imagenet_synth_20": "f2a48de09b0c2b715385eb44985b35f4712256a8b185e194534ad0c769ee41da",
    "image_folder_flat_8_rgb": "6186970390c3ac712bf5d7e182b88d40842c1b92ada1bd96e72c272473290774",
    "image_folder_flat_6_grey_seed2": "e203d8ae5da5fada481b8f4e3b6650e3fb0532e608d04f34a5b2dddfa00bf902",
}


def _digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for split in ("train", "validation", "test"):
        value = arrays[split]
        parts = [value.images, value.counts] if isinstance(value, ClassImages) else [value]
        h.update(split.encode())
        for arr in parts:
            arr = np.ascontiguousarray(arr)
            h.update(f"{arr.dtype.str}{arr.shape}".encode())
            h.update(arr.tobytes())
    return h.hexdigest()


def _check(name: str, arrays: dict) -> None:
    assert _digest(arrays) == EXPECTED[name], f"{name}: the arrays changed"


def test_omniglot_synthetic_small(tmp_path):
    manual = tmp_path / "manual"
    checksums = synth_archives(manual)
    data_dir = str(tmp_path / "data")
    _check("omniglot_synth_small", om.load_omniglot("small", str(manual), data_dir, checksums=checksums))
    plain = om.load_omniglot(
        "small", str(manual), data_dir, image_size=105, rotations=False, split_seed=3, checksums=checksums
    )
    _check("omniglot_synth_small_105_seed3", plain)


def test_omniglot_synthetic_standard(tmp_path):
    manual = tmp_path / "manual"
    checksums = synth_standard_archives(manual)
    arrays = om.load_omniglot(
        "standard", str(manual), str(tmp_path / "d"), image_size=14, checksums=checksums
    )
    _check("omniglot_synth_standard_14", arrays)


@pytest.mark.skipif(OMNIGLOT_DIR is None, reason="no shared Omniglot")
def test_omniglot_real_small(tmp_path):
    arrays = om.load_omniglot("small", str(OMNIGLOT_DIR), str(tmp_path))
    _check("omniglot_real_small", arrays)


def test_cifar_fs_and_fc100_synthetic(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    checksums = {BINARY: write_binary_archive(manual / BINARY)}
    data_dir = str(tmp_path / "data")
    _check("cifar_fs_synth", cf.load_cifar_fs(str(manual), data_dir, checksums=checksums))
    _check("fc100_synth", cf.load_fc100(str(manual), data_dir, checksums=checksums))


def test_mini_imagenet_synthetic(monkeypatch, tmp_path):
    split = scaled_mini_imagenet_split()
    monkeypatch.setattr(mi, "SPLIT_WNIDS", split)
    monkeypatch.setattr(mi, "IMAGES_PER_CLASS", 20)
    manual = write_mini_imagenet_pickles(tmp_path / "manual", split, 20)
    data_dir = str(tmp_path / "data")
    _check("mini_imagenet_synth_84", mi.load_mini_imagenet(str(manual), data_dir))
    _check("mini_imagenet_synth_20", mi.load_mini_imagenet(str(manual), data_dir, image_size=20))


def test_image_folder_synthetic(tmp_path):
    root = tmp_path / "my_images"
    make_flat(root)
    data_dir = str(tmp_path / "data")
    data, names = imf.load_image_folder_with_names(str(root), data_dir, 8, 3, [0.6, 0.2, 0.2], 0)
    _check("image_folder_flat_8_rgb", data)
    assert names == {
        "train": ["class_02", "class_03", "class_04", "class_05", "class_06", "class_07"],
        "validation": ["class_00", "class_09"],
        "test": ["class_01", "class_08"],
    }
    grey = imf.load_image_folder(str(root), data_dir, 6, 1, [0.5, 0.25, 0.25], 2)
    _check("image_folder_flat_6_grey_seed2", grey)
