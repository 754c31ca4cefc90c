"""TFDS builder ``metalearn_omniglot`` for the Omniglot archives of brendenlake/omniglot.

Named ``metalearn_omniglot`` so that it does not clash with TFDS's built-in ``omniglot``.
Two configs:

* ``standard``: ``images_background.zip`` + ``images_evaluation.zip`` (1623 characters).
* ``small``: ``images_background_small1.zip`` + ``images_background_small2.zip``. Greek and
  Latin are in both archives with byte-identical images; they are kept once (first archive
  wins), which leaves 242 unique characters.

The dataset has a single ``train`` split that holds every unique character; the
meta-learning split into train/validation/test characters is done by
:func:`metalearn.data.omniglot.load_omniglot`, so it can depend on a seed without a rebuild.

One example per PNG: ``image`` (105, 105, 1) uint8 with strokes black (0) on white (255),
exactly as in the archives; ``alphabet`` (e.g. ``"Greek"``); ``character`` (e.g.
``"Greek/character01"``, the de-duplication key); ``drawer`` (1..20, from ``NNNN_DD.png``).

Archives come from a manual directory (offline; sha256 verified here before anything is
built, see :func:`locate_archives`) or are downloaded by ``_split_generators`` from GitHub
(checked against :data:`ARCHIVES` by TFDS and again here). Works without TensorFlow: the
builder must be used with ``file_format="array_record"`` and read with ``as_data_source``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from metalearn.data.common import (
    NETWORK_PROBE_TIMEOUT_S,  # noqa: F401 (re-exported)
    default_manual_dir,  # noqa: F401 (re-exported)
    network_unavailable_reason,
    sha256_of,
    url_infos,
)
from metalearn.errors import ConfigError, DataError

IMAGE_SIDE = 105
DRAWINGS_PER_CHARACTER = 20
BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
SOURCE_PAGE = "https://github.com/brendenlake/omniglot/tree/master/python"


@dataclasses.dataclass(frozen=True)
class Archive:
    """One original archive: download URL, size in bytes and sha256."""

    name: str
    size: int
    sha256: str

    @property
    def url(self) -> str:
        return BASE_URL + self.name


# Sizes and sha256 as registered by tensorflow-datasets for its own `omniglot` dataset
# (url_checksums/omniglot.txt); the two small ones were re-checked against the real files.
ARCHIVES: dict[str, Archive] = {
    a.name: a
    for a in (
        Archive(
            "images_background.zip",
            9464212,
            "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640",
        ),
        Archive(
            "images_evaluation.zip",
            6462886,
            "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee",
        ),
        Archive(
            "images_background_small1.zip",
            1319022,
            "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
        ),
        Archive(
            "images_background_small2.zip",
            1580917,
            "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
        ),
    )
}

# Archive names per variant, in the order used for de-duplication (first one wins).
VARIANT_ARCHIVES: dict[str, tuple[str, ...]] = {
    "standard": ("images_background.zip", "images_evaluation.zip"),
    "small": ("images_background_small1.zip", "images_background_small2.zip"),
}

# `images_xxx/<alphabet>/characterNN/NNNN_DD.png`; anything else in a zip is ignored.
_MEMBER_RE = re.compile(r"^[^/]+/(?P<alphabet>[^/]+)/(?P<character>[^/]+)/\d+_(?P<drawer>\d+)\.png$")


def check_variant(variant: str) -> tuple[str, ...]:
    """Archive names of ``variant``; ConfigError naming ``dataset.variant`` if unknown."""
    if variant not in VARIANT_ARCHIVES:
        valid = ", ".join(repr(v) for v in sorted(VARIANT_ARCHIVES))
        raise ConfigError(f"dataset.variant must be one of {valid}, got {variant!r}")
    return VARIANT_ARCHIVES[variant]


def omniglot_manual_instructions(variant: str, manual_dir: str | os.PathLike | None = None) -> str:
    """One line telling the user which archives to put where (config key ``dataset.manual_dir``)."""
    names = ", ".join(check_variant(variant))
    where = f"directory {manual_dir}" if manual_dir is not None else "a directory"
    return (
        f"download {names} from {SOURCE_PAGE} and put them in {where}, "
        f"then set dataset.manual_dir to that directory"
    )


def verify_archive(path: str | os.PathLike, expected_sha256: str) -> None:
    """Raise DataError (one line: file, expected and actual sha256) if ``path`` does not match."""
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise DataError(
            f"Omniglot archive {path} is corrupt or not the original file: "
            f"expected sha256 {expected_sha256}, got {actual}; delete it and download it again"
        )


def locate_archives(
    variant: str,
    manual_dir: str | os.PathLike | None,
    *,
    download: bool,
    checksums: Mapping[str, str] | None = None,
) -> dict[str, Path | None]:
    """Find and verify the archives of ``variant`` in ``manual_dir``.

    Returns ``{archive name: verified path, or None if it must be downloaded}``. Every file
    found is sha256-checked against :data:`ARCHIVES` (or ``checksums``, an override meant
    for tests and custom archives) before anything is built. Raises DataError at once if an
    archive is missing and ``download`` is False or the network is unreachable.
    """
    names = check_variant(variant)
    expected = {name: ARCHIVES[name].sha256 for name in names}
    if checksums is not None:
        expected.update({k: v for k, v in checksums.items() if k in expected})
    found: dict[str, Path | None] = {}
    for name in names:
        path = Path(manual_dir).expanduser() / name if manual_dir is not None else None
        if path is not None and path.is_file():
            verify_archive(path, expected[name])
            found[name] = path
        else:
            found[name] = None
    missing = [name for name, path in found.items() if path is None]
    if missing:
        where = f"not found in {manual_dir}" if manual_dir is not None else "not found (no manual_dir)"
        if not download:
            raise DataError(
                f"Omniglot archive(s) {', '.join(missing)} {where} and downloading is off: "
                + omniglot_manual_instructions(variant, manual_dir)
            )
        reason = network_unavailable_reason()
        if reason is not None:
            raise DataError(
                f"Omniglot archive(s) {', '.join(missing)} {where} and cannot be downloaded "
                f"({reason}): " + omniglot_manual_instructions(variant, manual_dir)
            )
    return found


def decode_png(data: bytes, member: str) -> np.ndarray:
    """Decode one 1-bit Omniglot PNG to (105, 105) uint8 with values in {0, 255}.

    Decoded explicitly with PIL: TFDS's own numpy decoding of a mode "1" PNG yields 0/1,
    and ``convert("L")`` maps the bit to 0/255 (strokes black = 0, background = 255).
    """
    with Image.open(io.BytesIO(data)) as img:
        arr = np.array(img.convert("L"))
    if arr.shape != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(f"Omniglot image {member} has shape {arr.shape}, expected (105, 105)")
    if not np.isin(arr, (0, 255)).all():
        raise DataError(f"Omniglot image {member} is not black-and-white (values other than 0/255)")
    return arr


def iter_archive_examples(paths: list[Path], seen: set[str] | None = None) -> Iterator[tuple[str, dict]]:
    """Yield ``(key, example)`` for every drawing in ``paths``, in order, de-duplicated.

    A character (``"<alphabet>/<characterNN>"``) already yielded from an earlier archive is
    skipped entirely: in the small archives Greek and Latin occur twice with identical images.
    """
    seen = set() if seen is None else seen
    for path in paths:
        try:
            zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile as err:
            raise DataError(f"Omniglot archive {path} is not a valid zip file ({err})") from err
        with zf:
            members: dict[str, list[tuple[int, str]]] = {}
            for member in zf.namelist():
                match = _MEMBER_RE.match(member)
                if match is None or "__MACOSX" in member:
                    continue
                key = f"{match['alphabet']}/{match['character']}"
                members.setdefault(key, []).append((int(match["drawer"]), member))
            new_keys = sorted(k for k in members if k not in seen)
            for key in new_keys:
                alphabet = key.split("/", 1)[0]
                for drawer, member in sorted(members[key]):
                    pixels = decode_png(zf.read(member), f"{path.name}:{member}")
                    # A PIL image (not an ndarray) makes TFDS encode the PNG with PIL;
                    # ndarray encoding goes through tf.image.encode_png.
                    image = Image.fromarray(pixels)  # uint8 2-D -> mode "L"
                    yield (
                        f"{key}/{drawer:02d}",
                        {
                            "image": image,
                            "alphabet": alphabet,
                            "character": key,
                            "drawer": drawer,
                        },
                    )
            seen.update(new_keys)


class MetalearnOmniglot(tfds.core.GeneratorBasedBuilder):
    """Omniglot (brendenlake/omniglot python/ archives) as one ``train`` split; see module doc."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: standard and small configs, array_record."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name="standard", description="images_background + images_evaluation (1623 characters)."
        ),
        tfds.core.BuilderConfig(
            name="small",
            description="images_background_small1 + small2, de-duplicated (242 characters).",
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "small"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the archives of the chosen config from " + SOURCE_PAGE + " and put them in "
        "the manual directory: standard: images_background.zip, images_evaluation.zip; "
        "small: images_background_small1.zip, images_background_small2.zip."
    )

    def __init__(self, *, archives: Mapping[str, Path | None] | None = None, **kwargs):
        """``archives``: result of :func:`locate_archives` (verified local files, None =
        download). Without it every archive is downloaded. Other kwargs go to TFDS."""
        self._archives = dict(archives) if archives is not None else None
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls) -> dict[str, tfds.download.checksums.UrlInfo]:
        return url_infos(ARCHIVES.values())

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: `dataset_info_from_configs` wants metadata files in a
        # TFDS-style package directory.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Omniglot handwritten characters (Lake et al., 2015), 20 drawers each.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIDE, IMAGE_SIDE, 1)),
                    "alphabet": tfds.features.Text(),
                    "character": tfds.features.Text(),
                    "drawer": np.int32,
                }
            ),
            homepage="https://github.com/brendenlake/omniglot",
            citation=(
                "@article{lake2015human, title={Human-level concept learning through "
                "probabilistic program induction}, author={Lake, Brenden M and Salakhutdinov, "
                "Ruslan and Tenenbaum, Joshua B}, journal={Science}, volume={350}, "
                "number={6266}, pages={1332--1338}, year={2015}}"
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        names = VARIANT_ARCHIVES[self.builder_config.name]
        archives = self._archives if self._archives is not None else dict.fromkeys(names)
        to_download = [name for name in names if archives.get(name) is None]
        if to_download:
            reason = network_unavailable_reason()
            if reason is not None:
                raise DataError(
                    f"cannot download Omniglot {', '.join(to_download)} ({reason}): "
                    + omniglot_manual_instructions(self.builder_config.name)
                )
            try:
                downloaded = dl_manager.download({n: ARCHIVES[n].url for n in to_download})
            except Exception as err:  # TFDS raises assorted types; keep the message one line
                first_line = (str(err).splitlines() or [""])[0]
                raise DataError(
                    f"downloading Omniglot {', '.join(to_download)} failed "
                    f"({type(err).__name__}: {first_line}): "
                    + omniglot_manual_instructions(self.builder_config.name)
                ) from err
            for name in to_download:
                verify_archive(downloaded[name], ARCHIVES[name].sha256)
                archives[name] = Path(downloaded[name])
        return {"train": self._generate_examples([Path(archives[n]) for n in names])}

    def _generate_examples(self, paths: list[Path]):
        yield from iter_archive_examples(paths)
