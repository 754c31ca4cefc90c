"""Shared fixtures: tiny configs, synthetic task sources, float64 switch."""

from __future__ import annotations

import socket
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
