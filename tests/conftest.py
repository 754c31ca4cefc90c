"""Shared fixtures: tiny configs, synthetic task sources, float64 switch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from omegaconf import OmegaConf

from metalearn.config import Config

REPO = Path(__file__).resolve().parents[1]
SHARED_OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"


def make_cfg(**sections) -> OmegaConf:
    """A structured Config with per-section overrides, e.g. make_cfg(algo={"inner_lr": 0.1})."""
    cfg = OmegaConf.structured(Config)
    for section, values in sections.items():
        if isinstance(values, dict):
            for key, value in values.items():
                OmegaConf.update(cfg, f"{section}.{key}", value)
        else:
            OmegaConf.update(cfg, section, values)
    return cfg


def synthetic_image_arrays(n_classes=12, per_class=20, size=8, seed=0) -> dict[str, np.ndarray]:
    """Class-indexed uint8 arrays per split; every image of class c in split s holds the value
    that identifies (s, c), so a sampled image reveals exactly where it came from."""
    arrays = {}
    rng = np.random.default_rng(seed)
    for split in ("train", "validation", "test"):
        base = (rng.random((n_classes, per_class, size, size, 1)) > 0.5).astype(np.uint8) * 255
        arrays[split] = base
    return arrays


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run only when selected: ``pytest -m slow`` (or any ``-m``
    expression naming slow)."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with pytest -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def float64():
    """Run a test with float64 enabled (finite differences need it), then restore."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails at once, so a download attempt cannot hang a test.
    Use with ``pytestmark = pytest.mark.usefixtures("no_network")``."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)


def write_mini_imagenet_pickles(
    folder: Path, split_wnids: dict[str, tuple[str, ...]], per_class: int
) -> Path:
    """mini-imagenet-cache-{train,val,test}.pkl in the real format (image_data (N, 84, 84, 3)
    uint8 + class_dict {wnid: rows}) for a scaled-down split; returns ``folder``."""
    import pickle

    folder.mkdir(parents=True, exist_ok=True)
    names = {"train": "train", "validation": "val", "test": "test"}
    for split, wnids in split_wnids.items():
        rng = np.random.default_rng(len(split))
        image_data = rng.integers(0, 256, size=(len(wnids) * per_class, 84, 84, 3), dtype=np.uint8)
        class_dict = {w: list(range(i * per_class, (i + 1) * per_class)) for i, w in enumerate(wnids)}
        with open(folder / f"mini-imagenet-cache-{names[split]}.pkl", "wb") as f:
            pickle.dump({"image_data": image_data, "class_dict": class_dict}, f, protocol=4)
    return folder


def scaled_mini_imagenet_split(
    train: int = 6, validation: int = 5, test: int = 5
) -> dict[str, tuple[str, ...]]:
    """The first classes of each split of the real (Ravi & Larochelle) split."""
    from metalearn.data import mini_imagenet as mi

    return {
        "train": mi.TRAIN_WNIDS[:train],
        "validation": mi.VALIDATION_WNIDS[:validation],
        "test": mi.TEST_WNIDS[:test],
    }


@pytest.fixture
def scaled_mini_imagenet(monkeypatch, tmp_path_factory):
    """A manual_dir of synthetic mini-ImageNet pickles with 6/5/5 classes of 20 images, and the
    loader's split constants scaled to match (in this process). Returns (manual_dir, data_dir)."""
    from metalearn.data import mini_imagenet as mi

    split = scaled_mini_imagenet_split()
    monkeypatch.setattr(mi, "SPLIT_WNIDS", split)
    monkeypatch.setattr(mi, "IMAGES_PER_CLASS", 20)
    root = tmp_path_factory.mktemp("mini_imagenet")
    return write_mini_imagenet_pickles(root / "manual", split, 20), root / "data"


def run_cli(*args: str, cwd: Path, check: bool = True, prelude: str = "") -> subprocess.CompletedProcess:
    """``metalearn <args>`` in a subprocess on the CPU. ``check``: fail the test (with the
    output) on a non-zero exit. ``prelude``: Python run in that process first (e.g. to scale
    a loader's constants)."""
    if prelude:
        run_main = (
            f"import sys\nfrom metalearn.cli import main\nsys.argv = ['metalearn', *{list(args)!r}]\nmain()"
        )
        command = [sys.executable, "-c", f"{prelude}\n{run_main}"]
    else:
        command = [sys.executable, "-m", "metalearn.cli", *args]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc
