"""What turns files into a model's input, recorded with each training run and applied to
new data by `metalearn predict` and by cross-domain `metalearn eval`.

`metalearn train` writes ``<run dir>/preprocessing.json`` before the first step. For image
datasets it holds:

* ``input_shape`` [H, W, C] and ``outputs`` (the head's size, the number of ways);
* ``size`` [H, W], ``channels`` (1: PIL mode ``L``, ITU-R 601-2 luma; 3: ``RGB``),
  ``resize`` (``lanczos``: PIL's LANCZOS filter, aspect ratio not kept) and ``value_range``
  [0, 1] (uint8 pixels divided by 255);
* ``polarity``: ``light_on_dark`` (bright foreground on a dark background, e.g. Omniglot, whose
  black-on-white PNGs are inverted when the dataset is built), ``dark_on_light``, or null
  (natural images: no polarity). For an image folder of greyscale images it is measured on the
  training images (at least 95% of them must agree), otherwise null.

Regression runs (sinusoid) record ``kind: regression`` and their input and output sizes.

Applying it to new images (:func:`fit_images`, :func:`read_image_files`): convert to the
run's channels, resize to its size with the recorded filter, then handle polarity according
to ``preprocess.invert``: ``auto`` inverts each image whose background (the mean of a border
ring of width max(1, round(min(H, W) / 14)) pixels) is bright (> 127.5) when the run's
polarity is ``light_on_dark``, dark when it is ``dark_on_light``, and none for runs without a
polarity; ``true`` inverts every image, ``false`` none.

Runs trained before the record existed have no file; :func:`load_record` then derives it from
the run's stored config (the datasets' facts above) and says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from metalearn.errors import ConfigError, DataError

RECORD_NAME = "preprocessing.json"
RECORD_VERSION = 1
# Share of an image folder's training images that must agree for a polarity to be recorded.
POLARITY_AGREEMENT = 0.95
POLARITIES = ("light_on_dark", "dark_on_light")

# How each image dataset's files become its arrays (metalearn/data/): fixed facts.
_FILES = {
    "omniglot": "Omniglot PNGs (105x105, black strokes on white), inverted, then resized",
    "mini_imagenet": "mini-ImageNet images (84x84 RGB), resized when dataset.image_size differs",
    "cifar_fs": "CIFAR-100 images (32x32 RGB), as they are",
    "fc100": "CIFAR-100 images (32x32 RGB), as they are",
    "image_folder": "image files decoded by PIL (EXIF orientation applied, alpha dropped)",
}
_POLARITY = {"omniglot": "light_on_dark"}


def _record_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RECORD_NAME


def border_brightness(images: np.ndarray) -> np.ndarray:
    """Mean of each image's border ring, (N,) in [0, 255]; images: uint8 (N, H, W, C)."""
    images = np.asarray(images)
    h, w = images.shape[1:3]
    r = max(1, round(min(h, w) / 14))
    ring = np.ones((h, w), bool)
    ring[r : h - r, r : w - r] = False
    return images[:, ring].reshape(len(images), -1).astype(np.float64).mean(axis=1)


def measure_polarity(images: np.ndarray, limit: int = 4096) -> str | None:
    """The polarity shared by at least 95% of (up to ``limit`` evenly spaced) images, else None."""
    images = np.asarray(images)
    if len(images) == 0:
        return None
    step = max(1, len(images) // limit)
    light_background = border_brightness(images[::step]) > 127.5
    share = float(np.mean(light_background))
    if share >= POLARITY_AGREEMENT:
        return "dark_on_light"
    if share <= 1 - POLARITY_AGREEMENT:
        return "light_on_dark"
    return None


def make_record(dataset: Any, input_shape, output_dim: int, train_images: np.ndarray | None = None) -> dict:
    """The record for a run on ``dataset`` (a DatasetConfig) whose model takes ``input_shape``
    and has ``output_dim`` outputs. ``train_images`` (uint8 (N, H, W, C)), when given for an
    image folder of greyscale images, is used to measure its polarity."""
    base = {
        "version": RECORD_VERSION,
        "dataset": str(dataset.name),
        "input_shape": [int(d) for d in input_shape],
    }
    if dataset.name == "sinusoid":
        return {
            **base,
            "kind": "regression",
            "outputs": int(output_dim),
            "files": "CSV: support rows x,y; query rows x (and y, to compute the MSE)",
        }
    h, w, c = (int(d) for d in input_shape)
    polarity, how = _POLARITY.get(dataset.name), "fixed by the dataset"
    if dataset.name == "multi":
        how = "not one: the sources of dataset=multi differ"
    if dataset.name == "image_folder":
        polarity, how = None, "not measured (colour images)"
        if c == 1 and train_images is not None:
            polarity = measure_polarity(train_images)
            how = f"measured on the training images (>= {POLARITY_AGREEMENT:.0%} agree)"
            if polarity is None:
                how = f"training images disagree (< {POLARITY_AGREEMENT:.0%} agree)"
        elif c == 1:
            how = "not measured"
    record = {
        **base,
        "kind": "image",
        "outputs": int(output_dim),
        "size": [h, w],
        "channels": c,
        "mode": "L" if c == 1 else "RGB",
        "resize": "lanczos",
        "aspect": "stretched (not kept)",
        "value_range": [0.0, 1.0],
        "scale": "uint8 / 255",
        "polarity": polarity,
        "polarity_source": how if dataset.name != "omniglot" else "Omniglot: strokes 1.0 on background 0.0",
        "files": _FILES.get(str(dataset.name), ""),
    }
    if dataset.name == "image_folder" and dataset.path is not None:
        record["path"] = str(Path(str(dataset.path)).expanduser().resolve())
    return record


def _train_images(source: Any) -> np.ndarray | None:
    """The training split's uint8 images of a TaskSource, wherever they are held."""
    if source.host is not None:
        images = source.host.arrays.get("train", {}).get("images")
    else:
        images = source.splits.get("train", {}).get("images") if isinstance(source.splits, dict) else None
    if images is None:
        return None
    images = np.asarray(images)
    return images.reshape((-1, *images.shape[-3:]))


def write_record(run_dir: str | Path, cfg: Any, source: Any) -> dict:
    """Write ``<run_dir>/preprocessing.json`` for a training run; returns the record."""
    train_images = None
    if cfg.dataset.name == "image_folder" and source.input_shape[-1] == 1:
        train_images = _train_images(source)
    record = make_record(cfg.dataset, source.input_shape, source.output_dim, train_images)
    record["recorded"] = "at training"
    path = _record_path(run_dir)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return record


def record_run(run_dir: str | Path, cfg: Any, source: Any) -> str:
    """:func:`write_record`, and the start-of-run line that says what was recorded."""
    record = write_record(run_dir, cfg, source)
    return f"metalearn: preprocessing {describe(record)}; recorded in {_record_path(run_dir)}"


def derived_input_shape(dataset: Any, model: Any = None) -> tuple[int, ...]:
    """The model input shape a stored config implies (for runs without a record)."""
    if dataset.name == "sinusoid":
        return (1,)
    channels = 1 if dataset.name == "omniglot" else 3
    if dataset.name == "image_folder":
        channels = int(dataset.channels)
    size = 32 if dataset.name in ("cifar_fs", "fc100") else int(dataset.image_size)
    return (size, size, channels)


def load_record(run_dir: str | Path, cfg: Any) -> tuple[dict, str | None]:
    """The run's record and, when it had none (trained before it was recorded), a note saying
    that it was derived from the stored config ``cfg`` (the run's own, before overrides)."""
    path = _record_path(run_dir)
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or "kind" not in record or "input_shape" not in record:
                raise ValueError("not a preprocessing record")
        except ValueError as err:
            raise DataError(
                f"cannot read {path} ({err}); delete it to derive it from the run's config"
            ) from None
        return record, None
    outputs = 1 if cfg.dataset.name == "sinusoid" else int(cfg.dataset.n_way)
    record = make_record(cfg.dataset, derived_input_shape(cfg.dataset), outputs)
    record["recorded"] = "derived from the run's config (the run has no preprocessing.json)"
    note = f"{run_dir} has no {RECORD_NAME} (trained before it was recorded); derived from its config"
    return record, note


def describe(record: dict) -> str:
    """One line: what the run's inputs are, e.g. ``28x28x1 greyscale, LANCZOS resize, ...``."""
    if record["kind"] == "regression":
        return f"regression on {record['dataset']}: x of size {record['input_shape'][0]} -> y"
    h, w = record["size"]
    colour = "greyscale" if record["channels"] == 1 else "RGB"
    polarity = {
        "light_on_dark": "light foreground on dark background",
        "dark_on_light": "dark foreground on light background",
        None: "no polarity",
    }[record.get("polarity")]
    return (
        f"{h}x{w}x{record['channels']} {colour}, {record['resize'].upper()} resize, values "
        f"{record['value_range'][0]:g}..{record['value_range'][1]:g}, {polarity} ({record['dataset']})"
    )


def invert_setting(value: Any) -> str:
    """``preprocess.invert`` as "auto", "true" or "false"; ConfigError otherwise."""
    text = str(value).strip().lower()
    if text not in ("auto", "true", "false"):
        raise ConfigError(f"invalid preprocess.invert={value!r}: must be auto, true or false")
    return text


def inversion_mask(images: np.ndarray, record: dict, invert: Any) -> np.ndarray:
    """(N,) bool: which of ``images`` (uint8 (N, H, W, C) at the run's size) to invert."""
    setting = invert_setting(invert)
    n = len(images)
    if setting != "auto":
        return np.full(n, setting == "true")
    polarity = record.get("polarity")
    if polarity not in POLARITIES or n == 0:
        return np.zeros(n, bool)
    light_background = border_brightness(images) > 127.5
    return light_background if polarity == "light_on_dark" else ~light_background


def _convert_one(img: np.ndarray, size: tuple[int, int], channels: int) -> np.ndarray:
    from PIL import Image

    pil = Image.fromarray(img[:, :, 0] if img.shape[-1] == 1 else img)
    pil = pil.convert("L" if channels == 1 else "RGB")
    if pil.size != (size[1], size[0]):
        pil = pil.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    out = np.asarray(pil, dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out


def fit_images(images: np.ndarray, record: dict, invert: Any) -> tuple[np.ndarray, dict]:
    """``images`` (uint8 (..., H, W, C), any leading axes) in the run's input form: converted to
    its channels, resized to its size (recorded filter), inverted per :func:`inversion_mask`.

    Returns the images (same leading axes) and what was done:
    ``{"images", "resized_from", "channels_from", "inverted", "invert"}``.
    """
    images = np.asarray(images)
    lead, shape = images.shape[:-3], images.shape[-3:]
    flat = images.reshape((-1, *shape))
    size, channels = tuple(record["size"]), int(record["channels"])
    done = {
        "images": int(len(flat)),
        "resized_from": list(shape[:2]) if tuple(shape[:2]) != size else None,
        "channels_from": int(shape[2]) if shape[2] != channels else None,
    }
    if done["resized_from"] or done["channels_from"]:
        flat = np.stack([_convert_one(img, size, channels) for img in flat]) if len(flat) else flat
    mask = inversion_mask(flat, record, invert)
    if mask.any():
        flat = flat.copy()
        flat[mask] = 255 - flat[mask]
    done.update(inverted=int(mask.sum()), invert=invert_setting(invert))
    return flat.reshape((*lead, *flat.shape[1:])), done


def read_image_files(files: list[Path], record: dict, invert: Any, what: str) -> tuple[np.ndarray, dict]:
    """Decode image files into the run's input form: uint8 (N, H, W, C) and what was done
    (see :func:`fit_images`). A file that cannot be decoded is a DataError naming ``what``."""
    from metalearn.data.image_folder import read_image

    size, channels = record["size"], int(record["channels"])
    decoded = []
    for file in files:
        try:
            decoded.append(read_image(file, int(size[0]), channels))  # sizes are square
        except DataError as err:
            cause = err.__cause__
            detail = f"{type(cause).__name__}: {' '.join(str(cause).split())}" if cause else str(err)
            raise DataError(f"{what}: {file} is not a readable image ({detail})") from None
    stacked = np.stack(decoded) if decoded else np.zeros((0, *size, channels), np.uint8)
    return fit_images(stacked, record, invert)


def describe_applied(done: dict, record: dict) -> str:
    """One line: what :func:`fit_images` did, e.g. ``95 images: inverted 95 (light background)``."""
    parts = []
    if done.get("resized_from"):
        h, w = done["resized_from"]
        parts.append(f"resized from {h}x{w}")
    if done.get("channels_from"):
        parts.append(f"converted from {done['channels_from']} channel(s)")
    reason = {
        "auto": {
            "light_on_dark": "invert=auto: those with a light background; the run's data is light on dark",
            "dark_on_light": "invert=auto: those with a dark background; the run's data is dark on light",
        }.get(record.get("polarity"), "invert=auto: the run's data has no polarity"),
        "true": "invert=true",
        "false": "invert=false",
    }[done["invert"]]
    parts.append(f"inverted {done['inverted']} ({reason})")
    return f"{done['images']} images: " + ", ".join(parts)
