"""models.batch_stat_norm's hand-written gradient equals autodiff of the plain formula, to
first and second order (second-order MAML differentiates the gradient again), float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.models import batch_stat_norm


def _plain(x, scale, bias, eps=1e-5):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def test_first_and_second_derivatives_match_autodiff(float64):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = 3.0 * jax.random.normal(k[0], (4, 3, 3, 5), jnp.float64) + 1.0
    scale = jax.random.normal(k[1], (5,), jnp.float64)
    bias = jax.random.normal(k[2], (5,), jnp.float64)
    w = jax.random.normal(k[3], x.shape, jnp.float64)

    def loss(norm):
        return lambda x, s, b: jnp.sum(jnp.tanh(norm(x, s, b)) * w)

    ours = lambda x, s, b: batch_stat_norm(x, s, b, 1e-5)  # noqa: E731
    np.testing.assert_allclose(ours(x, scale, bias), _plain(x, scale, bias), rtol=1e-12, atol=1e-12)
    for a, b in zip(
        jax.grad(loss(ours), (0, 1, 2))(x, scale, bias),
        jax.grad(loss(_plain), (0, 1, 2))(x, scale, bias),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)

    # Second order, as in MAML: a loss of the gradient, differentiated w.r.t. all inputs.
    def outer(norm):
        def f(x, s, b):
            gx, gs = jax.grad(loss(norm), (0, 1))(x, s, b)
            return jnp.sum(gx**2) + jnp.sum(jnp.sin(gs))

        return f

    for a, b in zip(
        jax.grad(outer(ours), (0, 1, 2))(x, scale, bias),
        jax.grad(outer(_plain), (0, 1, 2))(x, scale, bias),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)
