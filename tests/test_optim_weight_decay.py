"""optim.weight_decay: L2 regularisation of the kernels added to the meta-gradient before the
outer optimizer (metalearn/optim.py), checked against one update derived by hand, and its
range check."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_cfg

from metalearn.config import validate
from metalearn.errors import ConfigError
from metalearn.optim import make_optimizer

# A dense layer: a (2, 2) kernel, decayed, and a (2,) bias, not decayed.
PARAMS = {"dense": {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "bias": jnp.array([1.0, -1.0])}}
GRADS = {"dense": {"kernel": jnp.array([[0.1, 0.2], [-0.3, 0.0]]), "bias": jnp.array([0.5, -0.5])}}
DECAY = 0.1


def _one_update(**optim) -> dict:
    opt = make_optimizer(make_cfg(optim={"weight_decay": DECAY, **optim}).optim, 10)
    updates, _ = opt.update(GRADS, opt.init(PARAMS), PARAMS)
    return {k: np.asarray(v) for k, v in updates["dense"].items()}


def _decayed_gradient() -> dict:
    """g + decay * w on the kernel, g on the bias: the gradient of
    loss + (decay / 2) * ||kernel||^2."""
    w, g = PARAMS["dense"], GRADS["dense"]
    return {
        "kernel": np.asarray(g["kernel"]) + DECAY * np.asarray(w["kernel"]),
        "bias": np.asarray(g["bias"]),
    }


def test_sgd_step_with_weight_decay_is_the_hand_derived_one():
    lr = 0.5
    got = _one_update(name="sgd", lr=lr)
    want = _decayed_gradient()
    # kernel: -0.5 * ([[0.1, 0.2], [-0.3, 0.0]] + 0.1 * [[1, -2], [0.5, 3]]) = [[-0.1, 0], [0.125, -0.15]]
    np.testing.assert_allclose(got["kernel"], [[-0.1, 0.0], [0.125, -0.15]], atol=1e-7)
    np.testing.assert_allclose(got["kernel"], -lr * want["kernel"], rtol=1e-6)
    np.testing.assert_allclose(got["bias"], -lr * want["bias"], rtol=1e-6)


def test_adam_first_step_sees_the_decayed_gradient():
    # Adam's first step: m = (1 - b1) g', v = (1 - b2) g'^2, bias-corrected to g' and g'^2, so
    # the update is -lr * g' / (|g'| + eps). eps = 1 keeps the magnitude of g' visible.
    lr, eps = 0.01, 1.0
    got = _one_update(name="adam", lr=lr, eps=eps)
    for name, g in _decayed_gradient().items():
        np.testing.assert_allclose(got[name], -lr * g / (np.abs(g) + eps), rtol=1e-5, atol=1e-8)


def test_zero_weight_decay_changes_nothing():
    got = _one_update(name="sgd", lr=1.0, weight_decay=0.0)
    np.testing.assert_allclose(got["kernel"], -np.asarray(GRADS["dense"]["kernel"]), rtol=1e-6)


@pytest.mark.parametrize("bad", [-1e-4, math.inf])
def test_weight_decay_range_check_names_the_key(bad):
    with pytest.raises(ConfigError, match=r"optim\.weight_decay=.*>= 0"):
        validate(make_cfg(optim={"weight_decay": bad}))
