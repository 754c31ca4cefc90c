"""The outer optimizer (metalearn/optim.py): lr schedules against the written-out formulas,
momentum, clipping, Adam's epsilon, and optim.weight_decay (L2 on the kernels added to the
meta-gradient before the optimizer) against updates derived by hand, with its range check."""

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


def _optim_cfg(**values):
    return make_cfg(optim=values).optim


def _written_out_lr(step: int, lr: float, warmup: int, total: int, schedule: str, final: float) -> float:
    """The learning rate of update number ``step`` (0-based), as documented in OptimConfig."""
    if warmup and step < warmup:
        return lr * step / warmup
    if schedule == "constant":
        return lr
    decay = max(total, warmup + 1) - warmup
    progress = min(step - warmup, decay) / decay
    end = lr * final
    if schedule == "linear":  # supervised-reptile's meta step: a straight line to the end value
        return lr + (end - lr) * progress
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * progress))


def _sgd_rates(opt, n: int) -> list[float]:
    """Learning rates an SGD optimizer applies: the update for a gradient of ones, negated."""
    params = {"w": jnp.zeros(3)}
    state = opt.init(params)
    rates = []
    for _ in range(n):
        updates, state = opt.update({"w": jnp.ones(3)}, state, params)
        rates.append(-float(updates["w"][0]))
    return rates


@pytest.mark.parametrize(
    "schedule,warmup,final",
    [("constant", 0, 0.0), ("constant", 4, 0.0), ("cosine", 0, 0.0), ("cosine", 3, 0.1), ("cosine", 0, 0.25)],
)
def test_make_optimizer_schedules_follow_the_written_out_formula(schedule, warmup, final):
    lr, total = 0.5, 10
    cfg = _optim_cfg(name="sgd", lr=lr, schedule=schedule, warmup_steps=warmup, final_lr_fraction=final)
    got = _sgd_rates(make_optimizer(cfg, total), total + 3)  # and past the end: stays at the end value
    want = [_written_out_lr(s, lr, warmup, total, schedule, final) for s in range(total + 3)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_make_optimizer_reptile_preset_decays_the_meta_step_to_zero():
    from hydra import compose, initialize_config_dir

    from metalearn.cli import config_dir
    from metalearn.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        cfg = compose(config_name="config", overrides=["experiment=reptile_omniglot_5w1s"])
    o = cfg.optim
    # supervised-reptile/train.py: eps = frac_done * meta_step_final + (1 - frac_done) * meta_step
    assert (o.name, o.schedule, o.lr, o.final_lr_fraction) == ("sgd", "linear", 1.0, 0.0)
    total = 8  # the preset's schedule shape over a short budget
    got = _sgd_rates(make_optimizer(o, total), total + 1)
    want = [_written_out_lr(s, o.lr, o.warmup_steps, total, "linear", 0.0) for s in range(total + 1)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert got[0] == pytest.approx(1.0) and got[total] == pytest.approx(0.0, abs=1e-7)


def test_make_optimizer_momentum_and_clip_norm():
    lr, m, clip = 0.1, 0.9, 1.0
    opt = make_optimizer(_optim_cfg(name="sgd", lr=lr, momentum=m, clip_norm=clip), 100)
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    state = opt.init(params)
    grads = [
        {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])},  # norm 5: clipped to norm 1
        {"a": jnp.array([0.2, 0.1]), "b": jnp.array([-0.2])},  # norm 0.3: not clipped
        {"a": jnp.array([-6.0, 8.0]), "b": jnp.array([0.0])},  # norm 10: clipped
    ]
    velocity = np.zeros(3)
    for g in grads:
        flat = np.concatenate([np.asarray(g["a"]), np.asarray(g["b"])]).astype(np.float64)
        norm = np.linalg.norm(flat)
        clipped = flat * min(1.0, clip / norm)
        velocity = clipped + m * velocity  # heavy-ball trace, as optax.sgd(momentum=...)
        updates, state = opt.update(g, state, params)
        got = np.concatenate([np.asarray(updates["a"]), np.asarray(updates["b"])])
        np.testing.assert_allclose(got, -lr * velocity, rtol=1e-5, atol=1e-7)


def test_make_optimizer_adam_with_warmup_and_clipping():
    lr, warmup, clip = 0.01, 2, 0.5
    opt = make_optimizer(_optim_cfg(name="adam", lr=lr, warmup_steps=warmup, clip_norm=clip), 10)
    params = {"w": jnp.zeros(2)}
    state = opt.init(params)
    m = v = np.zeros(2)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t, g in enumerate([np.array([3.0, -4.0]), np.array([0.1, 0.2]), np.array([-1.0, 1.0])], start=1):
        gc = g * min(1.0, clip / np.linalg.norm(g))
        m = b1 * m + (1 - b1) * gc
        v = b2 * v + (1 - b2) * gc * gc
        step_lr = _written_out_lr(t - 1, lr, warmup, 10, "constant", 0.0)
        want = -step_lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        updates, state = opt.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        np.testing.assert_allclose(np.asarray(updates["w"]), want, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("eps", [1e-8, 1e-3, 0.5])
def test_make_optimizer_adam_epsilon_enters_the_first_update(eps):
    # Adam's first bias-corrected update is -lr * g / (|g| + eps) (m_hat = g, v_hat = g^2).
    lr = 0.1
    g = jnp.asarray([2e-3, -0.4, 3.0])
    opt = make_optimizer(_optim_cfg(name="adam", lr=lr, eps=eps), 10)
    update, _ = opt.update(g, opt.init(jnp.zeros(3)), jnp.zeros(3))
    np.testing.assert_allclose(update, -lr * g / (jnp.abs(g) + eps), rtol=1e-5)
