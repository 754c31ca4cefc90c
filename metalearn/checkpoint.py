"""Checkpoints: the whole training state serialised with flax (msgpack), written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flax import serialization

from metalearn.errors import DataError

CHECKPOINT_NAME = "checkpoint.msgpack"


def save_checkpoint(run_dir: Path, state: Any) -> Path:
    """Write ``state`` (params, optimizer state, step, RNG key) to run_dir/checkpoint.msgpack.

    Written to a temporary file, fsynced, then renamed over the old one, so a crash mid-write
    leaves the previous checkpoint intact.
    """
    path = Path(run_dir) / CHECKPOINT_NAME
    tmp = path.with_suffix(".tmp")
    data = serialization.to_bytes(state)
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def load_checkpoint(run_dir: Path, template: Any) -> Any:
    """Restore a state shaped like ``template`` from run_dir/checkpoint.msgpack."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise DataError(f"no checkpoint at {path}: is run_dir a finished `metalearn train` run?")
    try:
        return serialization.from_bytes(template, path.read_bytes())
    except Exception as err:  # msgpack/shape errors: report, don't traceback
        raise DataError(f"corrupt or incompatible checkpoint {path}: {type(err).__name__}: {err}") from None
