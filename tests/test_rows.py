"""Row chunks (metalearn/rows.py): the chunked computations equal the plain ones, and
trailing zero rows change no bit of a sum or of a gradient of shared weights."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.rows import map_rows, real_rows_first, sum_rows, with_real_rows_first


def _pad(a: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([a, np.zeros((rows,) + a.shape[1:], a.dtype)])


SIZES = [(1, 9), (3, 1), (19, 21), (40, 60), (45, 155), (123, 377)]


@pytest.mark.parametrize(("n", "extra"), SIZES)
def test_sums_over_rows_ignore_trailing_zero_rows_bitwise(float64, n, extra):
    x = np.random.default_rng(n).normal(size=(n, 3))

    def total(a):
        return jax.jit(lambda v: sum_rows(lambda c: jnp.sum(c, axis=0), v, 20))(a)

    plain, padded = np.asarray(total(x)), np.asarray(total(_pad(x, extra)))
    np.testing.assert_array_equal(plain, padded)
    exact = [math.fsum(x[:, j]) for j in range(3)]  # correctly rounded sums
    np.testing.assert_allclose(plain, exact, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(("n", "extra"), SIZES)
def test_gradients_of_shared_weights_ignore_trailing_zero_rows_bitwise(float64, n, extra):
    """The weights' gradient is a sum over rows made by the scan's transpose."""
    rng = np.random.default_rng(n)
    x, w = rng.normal(size=(n, 5)), rng.normal(size=(5, 4))

    def loss(w, x):
        out = map_rows(lambda c: jnp.tanh(c @ w), x, 20)
        return sum_rows(lambda c: jnp.sum(jnp.square(c)), out, 20)

    grad = jax.jit(jax.grad(loss))
    g_plain, g_padded = np.asarray(grad(w, x)), np.asarray(grad(w, _pad(x, extra)))
    np.testing.assert_array_equal(g_plain, g_padded)
    t = np.tanh(x @ w)  # d/dw sum(tanh(xw)^2) = x^T (2 t (1 - t^2)), by hand
    np.testing.assert_allclose(g_plain, x.T @ (2 * t * (1 - t**2)), rtol=1e-12, atol=1e-12)


def test_map_rows_is_the_function_row_by_row_and_chunk_zero_is_plain(float64):
    x = np.random.default_rng(0).normal(size=(47, 2, 3))
    fn = lambda c: jnp.exp(c).sum(axis=-1)  # noqa: E731
    chunked = map_rows(fn, x, 20)
    assert chunked.shape == (47, 2)
    np.testing.assert_allclose(np.asarray(chunked), np.exp(x).sum(-1), rtol=1e-14)
    np.testing.assert_array_equal(np.asarray(map_rows(fn, x, 0)), np.asarray(fn(x)))
    with pytest.raises(ValueError, match="rows"):
        map_rows(lambda c: c[0], (x, x[:3]), 20)


def test_real_rows_first_keeps_each_parts_order_and_restores_it():
    x = np.arange(6 * 2, dtype=np.float64).reshape(6, 2)
    x[[1, 2, 5]] = np.nan  # padding in the middle and at the end
    order = np.asarray(real_rows_first(jnp.asarray(x)))
    assert order.tolist() == [0, 3, 4, 1, 2, 5]
    seen = []
    out = with_real_rows_first(lambda b: (seen.append(b), b * 2)[1], jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(seen[0])[:3], x[[0, 3, 4]])
    np.testing.assert_array_equal(np.asarray(out), x * 2)
