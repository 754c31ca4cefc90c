"""A run directory as a guarded resource: locks, atomic writes, unique output folders, checks.

The promise (docs/reliability.md, "Run directories"): a run dir is never damaged by metalearn.

- **Locks.** The run dir itself is locked with ``flock`` before anything is written (no lock
  file: taking the lock writes nothing): exclusive for training and resume, shared for eval
  and predict. The kernel releases a flock when its process dies, so a crashed or killed run
  never leaves a stale lock behind. A refused process names the holder (from ``/proc/locks``
  where the kernel offers it).
- **Atomic records.** The files that describe a run (``.hydra/*.yaml``, preprocessing.json,
  results.json) are written to a temporary file in the same folder and renamed into place,
  so a reader sees the old file or the new one, never half of one.
- **Unique folders.** :func:`unique_dir` creates a folder with ``mkdir`` (atomic: exactly one
  process succeeds) and adds a ``-2``, ``-3``... suffix on a collision, so two commands started
  in the same second get two folders.
- **Checks.** :func:`run_files` says whether a folder already holds a run; :func:`check_writable`
  tries to create a file instead of trusting ``os.access`` (which says yes to root, even on
  /proc, /sys and read-only mounts); :func:`load_run_config` turns a damaged or empty
  ``.hydra/config.yaml`` into one line naming the file and what to do.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from typing import Any

from metalearn.errors import ConfigError, DataError

# What a training run leaves in its dir; any of them means the dir already holds a run.
RUN_FILES = (
    "results.json",
    "metrics.jsonl",
    ".hydra",
    "checkpoints",
    "checkpoint.msgpack",
    "preprocessing.json",
    "error.txt",
    "eval",
    "predict",
)
# Kernel filesystems: writable-looking to root, but no place for a run.
_KERNEL_FS = (Path("/proc"), Path("/sys"))

_UMASK = os.umask(0)
os.umask(_UMASK)
# Open descriptors of the run dirs this process has locked (a flock lasts while one is open).
_HELD: list[int] = []
# Records to write once a command's checks have passed: run dir -> {relative path: text}.
_PENDING_RECORDS: dict[Path, dict[str, str]] = {}


class RunDirBusy(ConfigError):
    """Another process holds the run dir's lock."""


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # as open() would create it (mkstemp makes it 0600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def defer_record(run_dir: str | Path, files: dict[str, str]) -> None:
    """Remember files (``{".hydra/config.yaml": text, ...}``) to write into ``run_dir`` by
    :func:`commit_record`, once the command's checks (e.g. that a resumed checkpoint fits the
    config) have passed: a refused command leaves the old record as it was."""
    _PENDING_RECORDS[Path(run_dir).absolute()] = dict(files)


def commit_record(run_dir: str | Path) -> None:
    """Write the files :func:`defer_record` holds for ``run_dir``, each atomically (no-op if
    none are pending, e.g. when ``train()`` is called from Python)."""
    files = _PENDING_RECORDS.pop(Path(run_dir).absolute(), {})
    for relative, text in files.items():
        atomic_write_text(Path(run_dir) / relative, text)


def unique_dir(path: str | Path) -> Path:
    """Create ``path``, or ``path-2``, ``path-3``... if taken; return the folder created.

    ``mkdir`` is atomic, so of two processes asking for the same path only one gets it and the
    other moves on to the next suffix: the folder returned belongs to this caller alone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = path, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")


def check_writable(key: str, target: str | Path) -> None:
    """ConfigError (one line naming ``key``) unless ``target`` (a folder, existing or to be
    created) can be written: a file is actually created and removed in its nearest existing
    ancestor, since ``os.access`` answers yes to root everywhere."""
    text = str(target)
    if not text.strip():
        raise ConfigError(f"invalid {key}={text!r}: empty (give a folder)")
    path = Path(text).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"invalid {key}={text}: {existing} is not a directory")
    resolved = existing.resolve()
    for kernel in _KERNEL_FS:
        if resolved == kernel or kernel in resolved.parents:
            raise ConfigError(f"invalid {key}={text}: {kernel} is a kernel filesystem, not a place for files")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".metalearn-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"invalid {key}={text}: {existing} is not writable ({err.strerror})") from None


def run_files(run_dir: str | Path) -> list[str]:
    """The names in ``run_dir`` that belong to an earlier run (empty if none or no dir)."""
    run_dir = Path(run_dir)
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def _lock_holders(lock_path: Path) -> list[str]:
    """``"process <pid> (<command line>)"`` for each process /proc/locks names as holding a
    flock on ``lock_path`` (a run dir; empty where the kernel does not say)."""
    try:
        inode = lock_path.stat().st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    holders = []
    for line in lines:
        fields = line.split()
        if "FLOCK" not in fields or len(fields) < 6:
            continue
        pid, device_inode = fields[4], fields[5]
        if device_inode.rsplit(":", 1)[-1] != str(inode) or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            command = " ".join(a.decode(errors="replace") for a in argv if a)
        except OSError:
            command = ""
        name = f"process {pid}" + (f" ({_short(command)})" if command else "")
        if name not in holders:
            holders.append(name)
    return holders


def _short(command: str, limit: int = 120) -> str:
    return command if len(command) <= limit else command[: limit - 3] + "..."


def lock_run_dir(run_dir: str | Path, exclusive: bool, key: str) -> bool:
    """Take ``run_dir``'s lock for this process (exclusive: training or resume; shared: eval,
    predict); held until :func:`release_locks` or the process exits. ``run_dir`` must exist.

    The lock is a ``flock`` on the directory itself, so taking it writes nothing (a refused
    command leaves the dir exactly as it was) and works on a read-only dir too. RunDirBusy (one
    line naming the holder and ``key``) if another process holds it in a conflicting mode.
    Returns False without locking where the dir cannot be opened.
    """
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        if exclusive:
            raise
        return False
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holders = _lock_holders(Path(run_dir)) or ["another metalearn process"]
        raise RunDirBusy(
            f"{key}={run_dir} is in use by {', '.join(holders)}: wait for it to finish or choose another dir"
        ) from None
    _HELD.append(fd)
    return True


def release_locks() -> None:
    """Release every lock this process holds (the end of a command run in-process)."""
    while _HELD:
        os.close(_HELD.pop())
    _PENDING_RECORDS.clear()


def load_run_config(run_dir: str | Path, key: str = "run_dir") -> Any:
    """The DictConfig in ``<run_dir>/.hydra/config.yaml``; DataError (one line: the file, what
    is wrong, what to do) if it is missing, empty, not YAML or not a mapping."""
    from omegaconf import DictConfig, OmegaConf

    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"invalid {key}={str(run_dir)!r}: no {path} (not a `metalearn train` run dir)")
    remedy = "restore it from a copy of the run, or train again"
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path} ({err}): {remedy}") from None
    if not text.strip():
        raise DataError(f"{path} is empty (the run's config was lost): {remedy}")
    try:
        loaded = OmegaConf.create(text)
    except Exception as err:  # YAML/OmegaConf parse errors are multi-line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"{path} is not a valid config ({first}): {remedy}") from None
    if not isinstance(loaded, DictConfig):
        raise DataError(f"{path} is not a config mapping: {remedy}")
    return loaded
