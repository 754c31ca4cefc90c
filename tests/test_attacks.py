"""FGSM / PGD invariants, and the evaluator's adversarial path (same tasks, worse metric)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_cfg

from metalearn.attacks import default_step_size, fgsm, make_attack, pgd
from metalearn.config import validate
from metalearn.errors import ConfigError
from metalearn.evaluation import evaluate_final, evaluate_params, make_evaluator
from metalearn.step import init_state, setup


def _linear_classifier(seed: int = 0, n: int = 16, d: int = 12, classes: int = 3):
    """A fixed softmax classifier on (n, d) inputs in [0, 1], a third of them at 0 or 1 so
    that clipping to the range matters; returns (loss_fn, x)."""
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(d, classes)), jnp.float32)
    x = rng.random((n, d))
    x[:, : d // 3] = rng.integers(0, 2, (n, d // 3))
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(rng.integers(0, classes, n))

    def loss_fn(z):
        logits = z @ w
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    return loss_fn, x


def _regression(seed: int = 0, n: int = 10):
    """A small tanh regressor on (n, 1) inputs with unbounded range; returns (loss_fn, x)."""
    rng = np.random.default_rng(seed)
    w1 = jnp.asarray(rng.normal(size=(1, 8)), jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(8, 1)), jnp.float32)
    x = jnp.asarray(rng.uniform(-5, 5, (n, 1)), jnp.float32)
    y = jnp.sin(x)
    return (lambda z: jnp.mean(jnp.square(jnp.tanh(z @ w1) @ w2 - y))), x


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_fgsm_moves_eps_unless_clipped_and_stays_in_range(eps):
    loss_fn, x = _linear_classifier()
    x_adv = jax.jit(lambda z: fgsm(loss_fn, z, eps, (0.0, 1.0)))(x)
    delta = np.asarray(x_adv - x)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert np.all((x_adv >= 0) & (x_adv <= 1))
    assert np.all(np.abs(delta) <= eps + 1e-6)
    # Where the move was not cut by the range, it is exactly eps in the gradient's sign.
    g = np.asarray(jax.grad(loss_fn)(x))
    free = (np.asarray(x) + eps * np.sign(g) >= 0) & (np.asarray(x) + eps * np.sign(g) <= 1) & (g != 0)
    assert free.mean() > 0.5  # the check below has something to check
    np.testing.assert_allclose(delta[free], eps * np.sign(g[free]), atol=1e-6)
    # Some pixels sat at the boundary and were pushed outward: those are clipped to a move of 0.
    assert np.any(~free & (np.abs(delta) < 1e-7))
    assert float(loss_fn(x_adv)) > float(loss_fn(x))


def test_fgsm_without_range_moves_every_coordinate_by_eps():
    loss_fn, x = _regression()
    x_adv = fgsm(loss_fn, x, 0.1, None)
    np.testing.assert_allclose(np.abs(np.asarray(x_adv - x)), 0.1, atol=1e-6)
    assert float(loss_fn(x_adv)) > float(loss_fn(x))


def test_attacks_are_constants_for_outer_gradients():
    loss_fn, x = _linear_classifier()
    for attack in (lambda z: fgsm(loss_fn, z, 0.1), lambda z: pgd(loss_fn, z, 0.1, 3, 0.05)):
        g = jax.grad(lambda z, a=attack: jnp.sum(a(z)))(x)
        assert float(jnp.max(jnp.abs(g))) == 0.0


@pytest.mark.parametrize("random_start", [False, True])
@pytest.mark.parametrize("input_range", [(0.0, 1.0), None])
def test_pgd_stays_in_eps_ball_and_range(random_start, input_range):
    loss_fn, x = _linear_classifier(seed=1)
    eps = 0.1
    run = jax.jit(lambda z, k: pgd(loss_fn, z, eps, 7, 0.04, random_start, k, input_range))
    x_adv = run(x, jax.random.PRNGKey(0))
    assert x_adv.shape == x.shape
    assert float(jnp.max(jnp.abs(x_adv - x))) <= eps + 1e-6
    if input_range is not None:
        assert float(jnp.min(x_adv)) >= 0.0 and float(jnp.max(x_adv)) <= 1.0
    assert float(loss_fn(x_adv)) > float(loss_fn(x))


def test_pgd_one_full_step_from_x_is_fgsm():
    loss_fn, x = _linear_classifier(seed=2)
    np.testing.assert_allclose(
        np.asarray(pgd(loss_fn, x, 0.2, 1, 0.2, input_range=(0.0, 1.0))),
        np.asarray(fgsm(loss_fn, x, 0.2, (0.0, 1.0))),
        atol=1e-7,
    )


def test_pgd_is_at_least_as_strong_as_fgsm_on_a_nonlinear_model():
    # Not a theorem, but on this fixed curved model many small steps beat one big one.
    loss_fn, x = _regression(seed=3, n=32)
    strong = pgd(loss_fn, x, 0.3, 20, default_step_size(0.3, 20))
    assert float(loss_fn(strong)) >= float(loss_fn(fgsm(loss_fn, x, 0.3))) - 1e-6


def test_make_attack_rejects_unknown_and_pgd_random_start_needs_key():
    with pytest.raises(ValueError, match="unknown attack"):
        make_attack("cw", 0.1)
    loss_fn, x = _linear_classifier()
    with pytest.raises(ValueError, match="key"):
        pgd(loss_fn, x, 0.1, 2, 0.05, random_start=True, key=None)


def _tiny_sinusoid_cfg(**attack):
    return make_cfg(
        model={"hidden": [8]}, eval={"n_tasks": 12, "batch_size": 5}, attack=attack or {"name": "none"}
    )


def test_evaluator_under_attack_draws_the_same_tasks_and_is_worse():
    cfg = _tiny_sinusoid_cfg(name="fgsm", eps=0.2)
    exp = setup(cfg)
    params = init_state(exp, 0).params
    clean_only = evaluate_params(exp, params, cfg, "test", 12, 1)
    final = evaluate_final(exp, params, cfg, "test", 12, 1)
    assert set(final) == {"test", "test_robust", "attack"}
    assert final["attack"] == {"name": "fgsm", "eps": 0.2}
    assert final["test"]["n_tasks"] == final["test_robust"]["n_tasks"] == 12
    np.testing.assert_allclose(final["test"]["mean"], clean_only["mean"], rtol=1e-6)
    assert final["test_robust"]["mean"] > final["test"]["mean"]  # mse: higher is worse

    # attack=none: exactly the clean entries, nothing else.
    cfg.attack.name = "none"
    assert evaluate_final(exp, params, cfg, "test", 12, 1) == {"test": clean_only}


def test_evaluator_with_zero_eps_attack_changes_nothing():
    cfg = _tiny_sinusoid_cfg()
    exp = setup(cfg)
    params = init_state(exp, 0).params
    fn = make_evaluator(exp, 6, 4, 1, make_attack("pgd", 0.0, steps=2, input_range=None))
    clean, robust = fn(params, exp.source.splits["test"], jax.random.PRNGKey(5))
    assert clean.shape == robust.shape == (6,)
    np.testing.assert_allclose(np.asarray(clean), np.asarray(robust), rtol=1e-6)


@pytest.mark.parametrize(
    "section, key, value",
    [("attack", "name", "cw"), ("attack", "eps", -0.1), ("attack", "steps", 0), ("attack", "step_size", 0.0)],
)
def test_attack_config_range_checks_name_the_key(section, key, value):
    cfg = make_cfg(**{section: {key: value}})
    with pytest.raises(ConfigError, match=rf"{section}\.{key}="):
        validate(cfg)
