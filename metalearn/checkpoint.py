"""Checkpoints of the whole training state (orbax), with fallback past corrupt ones.

Layout: ``<run dir>/checkpoints/<step>/`` for the newest ``trainer.keep_checkpoints``
steps. Orbax writes each step into a temporary directory and renames it into place when
complete, so a crash or SIGKILL mid-write leaves only a ``*.orbax-checkpoint-tmp-*``
directory that is never mistaken for a checkpoint. Saving is synchronous (no background
thread): when ``save`` returns, the step is on disk, which is what pre-emption needs.

The state is :class:`metalearn.step.TrainState` (step, params, optimizer state, PRNG key,
skipped-step count). Task sampling is stateless (step ``s`` draws from
``fold_in(key, s)``), so step and key restore the sampler exactly.

Run dirs of older versions hold a single ``checkpoint.msgpack``; it is still read.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from metalearn.errors import ConfigError, DataError

CHECKPOINT_DIR = "checkpoints"
LEGACY_NAME = "checkpoint.msgpack"
# Written into a step dir after orbax has finished it: sha256 of every file. A step without
# it was never completed; a file that differs from it was damaged later. Checking it first
# also keeps tensorstore from failing deep inside a restore.
MANIFEST_NAME = "metalearn_manifest.json"

log = logging.getLogger(__name__)


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """Steps with a (possibly incomplete) checkpoint directory, newest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted((int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)


def has_checkpoint(run_dir: str | Path) -> bool:
    return bool(checkpoint_steps(run_dir)) or (Path(run_dir) / LEGACY_NAME).is_file()


def _manager(run_dir: Path, keep: int | None, create: bool):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=create)
    return ocp.CheckpointManager((Path(run_dir) / CHECKPOINT_DIR).resolve(), options=options)


class CheckpointWriter:
    """Saves a state per step into run_dir/checkpoints/, keeping the newest ``keep``.

    ``protected`` (eval.checkpoint=best or top_k): returns the steps that must stay besides
    the newest ``keep`` (the best by validation so far); every other step is deleted after
    each save. None: orbax's own newest-``keep`` retention, as always.
    """

    def __init__(self, run_dir: str | Path, keep: int, protected: Callable[[], Iterable[int]] | None = None):
        self._keep, self._protected = keep, protected
        self._manager = _manager(Path(run_dir), keep if protected is None else None, create=True)

    def save(self, state: Any) -> None:
        import orbax.checkpoint as ocp

        step = int(state.step)
        if step in self._manager.all_steps():
            return  # this exact step is already on disk (e.g. the final save after a periodic one)
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()
        if jax.process_index() != 0:
            return  # multi-process: every process saves through orbax; process 0 alone writes the manifest
        step_dir = Path(self._manager.directory) / str(step)
        tmp = step_dir / (MANIFEST_NAME + ".tmp")
        with tmp.open("w") as f:
            json.dump(_file_hashes(step_dir), f, indent=0, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(step_dir / MANIFEST_NAME)
        if self._protected is not None:
            self._prune()

    def _prune(self) -> None:
        """Delete every step that is neither among the newest ``keep`` nor protected."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        kept = set(steps[: self._keep]) | {int(s) for s in self._protected()}
        for step in steps:
            if step not in kept:
                self._manager.delete(step)

    def close(self) -> None:
        self._manager.close()


def _file_hashes(step_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(step_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(step_dir.rglob("*"))
        if p.is_file() and not p.name.startswith(MANIFEST_NAME)
    }


def _verify(step_dir: Path) -> None:
    """Raise ValueError unless step_dir is complete and unchanged since it was written."""
    manifest = step_dir / MANIFEST_NAME
    if not manifest.is_file():
        raise ValueError("incomplete (no manifest: the write did not finish)")
    try:
        expected = json.loads(manifest.read_text())
    except ValueError:
        raise ValueError(f"unreadable {MANIFEST_NAME}") from None
    actual = _file_hashes(step_dir)
    for name, digest in expected.items():
        if name not in actual:
            raise ValueError(f"missing file {name}")
        if actual[name] != digest:
            raise ValueError(f"file {name} differs from when it was written (truncated or damaged)")


def _check_like(restored: Any, template: Any, step: int) -> None:
    """Raise ValueError unless ``restored`` has the template's structure, shapes and dtypes."""
    if jax.tree.structure(restored) != jax.tree.structure(template):
        raise ValueError("state structure differs from this config's (another model or optimizer?)")
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(template), strict=True):
        if np.shape(got) != np.shape(want) or np.asarray(got).dtype != np.asarray(want).dtype:
            raise ValueError(
                f"array {np.shape(got)} {np.asarray(got).dtype} where {np.shape(want)} is expected"
            )
    if int(restored.step) != step:
        raise ValueError(f"holds step {int(restored.step)}")


class CheckpointMismatch(ConfigError):
    """An intact checkpoint whose arrays have other shapes than this config's model: the config
    differs from the run's (e.g. ``dataset.n_way``). Never treated as damage; nothing is set aside."""


@contextlib.contextmanager
def _quiet_restore():
    """Keep orbax/tensorstore noise off the terminal while reading a checkpoint: absl and asyncio
    log records below ERROR, and the "exception ignored" reports of its failed read coroutines
    (collected before leaving, so they do not surface later)."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio", "orbax")]
    levels = [lg.level for lg in loggers]
    previous_hook = sys.unraisablehook
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = previous_hook
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _stored_param_shapes(step_dir: Path) -> dict[str, tuple[int, ...]] | None:
    """``{"head/kernel": shape}`` of the parameters in an orbax step, from its metadata (no array
    is read); None when the metadata cannot be read (then the restore itself decides)."""
    import orbax.checkpoint as ocp

    try:
        with _quiet_restore():
            meta = ocp.StandardCheckpointer().metadata((step_dir / "default").resolve())
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
        params = tree["params"] if isinstance(tree, dict) else None
    except Exception:  # unreadable metadata: not our call to make here
        return None
    if params is None:
        return None
    shapes: dict[str, tuple[int, ...]] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, str(k)))
        elif isinstance(node, list | tuple):
            for i, v in enumerate(node):
                walk(v, (*path, str(i)))
        elif hasattr(node, "shape"):
            shapes["/".join(path)] = tuple(int(d) for d in node.shape)

    walk(params, ())
    return shapes


def check_params_fit(step_dir: Path, template: Any) -> None:
    """CheckpointMismatch naming the first parameter whose stored shape differs from the
    template's (or that one side lacks); nothing if they fit or the metadata is unreadable."""
    stored = _stored_param_shapes(step_dir)
    if stored is None or not hasattr(template, "params"):
        return
    wanted = {
        "/".join(_key_name(k) for k in path): tuple(np.shape(leaf))
        for path, leaf in jax.tree_util.tree_flatten_with_path(template.params)[0]
    }
    hint = (
        "a setting that shapes the model (dataset.n_way, dataset.image_size, dataset.channels, "
        "model.*) differs from the run's; the checkpoint is intact and was left as it is"
    )
    for name, shape in wanted.items():
        if name not in stored:
            raise CheckpointMismatch(
                f"checkpoint {step_dir} has no parameter {name} of this config's model: {hint}"
            )
        if stored[name] != shape:
            raise CheckpointMismatch(
                f"checkpoint {step_dir} holds parameter {name} of shape {stored[name]} where this "
                f"config's model has {shape}: {hint}"
            )
    extra = sorted(set(stored) - set(wanted))
    if extra:
        raise CheckpointMismatch(
            f"checkpoint {step_dir} holds parameter {extra[0]} that this config's model lacks: {hint}"
        )


def _load_legacy(path: Path, template: Any) -> Any:
    from flax import serialization

    try:
        raw = serialization.msgpack_restore(path.read_bytes())
        # Older states had no skipped-step count.
        if isinstance(raw, dict) and "skipped" in template._fields and "skipped" not in raw:
            raw["skipped"] = np.zeros((), np.int32)
        return serialization.from_state_dict(template, raw)
    except Exception as err:  # msgpack/shape errors: report, don't traceback
        raise DataError(f"corrupt or incompatible checkpoint {path}: {type(err).__name__}: {err}") from None


def restore_latest(run_dir: str | Path, template: Any, quarantine: bool = False) -> Any | None:
    """The newest checkpoint of run_dir that restores cleanly into ``template``'s shape.

    A step that fails (truncated files, a half-written directory) is reported as a one-line
    warning and the next older one is tried. An intact step whose parameters have other shapes
    than the template's raises :class:`CheckpointMismatch` (a ConfigError) at once: the config
    differs from the run's, the checkpoint is fine, and nothing is set aside. With ``quarantine`` (resume), a
    failed step directory is renamed to ``corrupt-<step>`` so that training can write that
    step again; nothing is deleted. Returns None if run_dir has no checkpoint at all;
    raises DataError if checkpoints exist but none is usable.
    """

    run_dir = Path(run_dir)
    steps = checkpoint_steps(run_dir)
    if not steps:
        legacy = run_dir / LEGACY_NAME
        return _load_legacy(legacy, template) if legacy.is_file() else None
    manager = _manager(run_dir, None, create=False)
    failures = []
    try:
        for step in steps:
            step_dir = run_dir / CHECKPOINT_DIR / str(step)
            try:
                return _restore_verified(manager, step_dir, step, template)
            except CheckpointMismatch:
                raise
            except Exception as err:  # any read/parse failure means: not usable
                reason = _first_line(err)
                failures.append(f"step {step}: {reason}")
                log.warning(
                    "checkpoint %s is unusable (%s); trying an older one",
                    run_dir / CHECKPOINT_DIR / str(step),
                    reason,
                )
                if quarantine and jax.process_index() == 0:  # multi-process: one process renames
                    src = run_dir / CHECKPOINT_DIR / str(step)
                    dest, n = src.with_name(f"corrupt-{step}"), 1
                    while dest.exists():
                        dest, n = src.with_name(f"corrupt-{step}-{n}"), n + 1
                    shutil.move(src, dest)
    finally:
        manager.close()
    raise DataError(f"no usable checkpoint in {run_dir / CHECKPOINT_DIR}: {'; '.join(failures)}")


def _restore_verified(manager: Any, step_dir: Path, step: int, template: Any) -> Any:
    """Step ``step`` restored into ``template``'s shape after its manifest is verified. An
    intact step of another shape is a config mismatch, not damage: raised as such, before any
    restore (whose failure would be noisy and look like damage)."""
    import orbax.checkpoint as ocp

    _verify(step_dir)
    check_params_fit(step_dir, template)
    with _quiet_restore():
        restored = manager.restore(step, args=ocp.args.StandardRestore(template))
    _check_like(restored, template, step)
    return restored


def restore_step(run_dir: str | Path, template: Any, step: int) -> Any:
    """The checkpoint of ``step`` in run_dir, restored into ``template``'s shape; DataError
    (one line) if it is absent, incomplete or damaged (nothing is set aside)."""

    step_dir = Path(run_dir) / CHECKPOINT_DIR / str(step)
    if not step_dir.is_dir():
        raise DataError(f"no checkpoint of step {step} in {step_dir.parent}")
    manager = _manager(Path(run_dir), None, create=False)
    try:
        return _restore_verified(manager, step_dir, step, template)
    except CheckpointMismatch:
        raise
    except Exception as err:  # any read/parse failure means: not usable
        raise DataError(f"checkpoint {step_dir} is unusable ({_first_line(err)})") from None
    finally:
        manager.close()


def load_checkpoint(run_dir: str | Path, template: Any) -> Any:
    """The newest usable checkpoint of a run dir (see :func:`restore_latest`); DataError if none."""
    state = restore_latest(run_dir, template)
    if state is None:
        raise DataError(
            f"no checkpoint in {Path(run_dir) / CHECKPOINT_DIR}: is run_dir a `metalearn train` run dir?"
        )
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else ""
    line = line if len(line) <= 200 else line[:200] + "..."  # tensorstore errors run to pages
    return f"{type(err).__name__}: {line}" if line else type(err).__name__
