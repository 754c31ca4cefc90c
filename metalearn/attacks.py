"""L-inf adversarial attacks on model inputs: FGSM and PGD, as pure jittable functions.

An attack takes ``loss_fn(x) -> scalar`` (the loss of the model under attack on a batch
x, with the labels and parameters closed over) and returns x_adv of x's shape. Both
attacks return ``lax.stop_gradient(x_adv)``: adversarial examples are constants for any
outer gradient (as in ADML, where the meta-gradient does not differentiate through the
example generation). Callers that want to save the work of tracing the attack under an
outer ``jax.grad`` should also close ``loss_fn`` over ``lax.stop_gradient(params)``.

``input_range``: (lo, hi) to clip x_adv into (e.g. (0, 1) for images), or None when the
inputs are unbounded (sinusoid regression).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

LossFn = Callable[[jax.Array], jax.Array]
# attack(loss_fn, x, key) -> x_adv; built from options by make_attack.
Attack = Callable[[LossFn, jax.Array, jax.Array], jax.Array]

ATTACKS = ("fgsm", "pgd")


def _clip_range(x: jax.Array, input_range: tuple[float, float] | None) -> jax.Array:
    return x if input_range is None else jnp.clip(x, input_range[0], input_range[1])


def fgsm(
    loss_fn: LossFn, x: jax.Array, eps: float, input_range: tuple[float, float] | None = None
) -> jax.Array:
    """Fast gradient sign method (Goodfellow et al., 2015).

    x: (N, *input) -> x_adv = clip(x + eps * sign(grad_x loss_fn(x))), same shape and dtype.
    Every coordinate moves by exactly eps (or 0 where the gradient is exactly 0) unless
    clipping to ``input_range`` shortens the move.
    """
    x = lax.stop_gradient(x)
    g = jax.grad(loss_fn)(x)
    x_adv = _clip_range(x + eps * jnp.sign(g).astype(x.dtype), input_range)
    return lax.stop_gradient(x_adv)


def pgd(
    loss_fn: LossFn,
    x: jax.Array,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool = False,
    key: jax.Array | None = None,
    input_range: tuple[float, float] | None = None,
) -> jax.Array:
    """Projected gradient ascent on the loss in the L-inf ball (Madry et al., 2018).

    x: (N, *input) -> x_adv of the same shape with |x_adv - x| <= eps elementwise and
    x_adv inside ``input_range``. Starts at x, or with ``random_start`` at a uniform point
    of the eps-ball (``key`` required); then ``steps`` (a Python int) times
    z <- project(z + step_size * sign(grad loss_fn(z))), under ``lax.scan``.
    """
    x = lax.stop_gradient(x)
    lo, hi = x - eps, x + eps

    def project(z: jax.Array) -> jax.Array:
        # Ball first, range second: x is in range, so the result stays in both.
        return _clip_range(jnp.clip(z, lo, hi), input_range)

    if random_start:
        if key is None:
            raise ValueError("pgd with random_start=True needs a PRNG key")
        z = project(x + jax.random.uniform(key, x.shape, x.dtype, -eps, eps))
    else:
        z = x

    def step(z: jax.Array, _: None) -> tuple[jax.Array, None]:
        g = jax.grad(loss_fn)(z)
        return project(z + step_size * jnp.sign(g).astype(z.dtype)), None

    z, _ = lax.scan(step, z, None, length=steps)
    return lax.stop_gradient(z)


def default_step_size(eps: float, steps: int) -> float:
    """PGD step size 2.5 * eps / steps (Madry et al., 2018): enough to reach the ball's
    boundary from any start and move along it."""
    return 2.5 * eps / max(steps, 1)


def make_attack(
    name: str,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    input_range: tuple[float, float] | None = None,
) -> Attack:
    """The attack ``(loss_fn, x, key) -> x_adv`` named ``name`` ("fgsm" or "pgd").

    FGSM ignores steps, step_size, random_start and key. step_size None: 2.5 * eps / steps.
    """
    if name == "fgsm":
        return lambda loss_fn, x, key: fgsm(loss_fn, x, eps, input_range)
    if name == "pgd":
        size = default_step_size(eps, steps) if step_size is None else step_size
        return lambda loss_fn, x, key: pgd(loss_fn, x, eps, steps, size, random_start, key, input_range)
    raise ValueError(f"unknown attack {name!r}; expected one of {ATTACKS}")


def attack_from_config(cfg: Any, input_range: tuple[float, float] | None) -> Attack | None:
    """The attack of an AttackConfig (``cfg.name`` "none" -> None)."""
    if cfg is None or cfg.name == "none":
        return None
    return make_attack(cfg.name, cfg.eps, cfg.steps, cfg.step_size, cfg.random_start, input_range)
