"""Row chunks: the computations over the example rows of a padded episode in chunks of one
fixed size, so that padding changes no bit of any number (dataset.episodes=variable,
metalearn/episodes.py).

Why. A padded episode holds its real rows first and its padded rows after them; every
padded row is masked. Masking alone makes the padded and the unpadded episode equal
mathematically, but not bitwise: XLA:CPU computes one operation by different code for
different row counts. A sum over 40 rows is split into windows centred on the array
(jaxlib's tree-reduction rewrite) and a sum over 100 rows into other windows; a matmul's
blocking depends on its sizes; an elementwise ``log`` takes a vector path for most rows
and a scalar one for a short tail. Each gives other rounding.

How. Every operation that combines rows (a sum over rows, and every use of a value shared
by all rows: a layer's weights, a BatchNorm's moments, prototypes) and every inexact
elementwise function of rows (the loss's ``log``/``exp``) runs over chunks of
``ROW_CHUNK`` rows in a ``lax.scan``: each chunk has the same shape whatever the episode's
size, so its code and its numbers are the same; the chunks' sums accumulate one after the
other, and so do the gradients of the shared values (the scan's transpose carries them), so
the trailing chunks of padding add exact zeros. The real rows' chunks are the same in a
padded and an unpadded episode (padding within a chunk is zeros either way). There are at
least ``MIN_CHUNKS``: XLA inlines a loop of one iteration into its caller, where the body's
operations are fused with their neighbours, and a probe with one chunk lost the match.
What stays outside the chunks is exact whatever the code path: reshapes,
selections (max-pool, ReLU, argmax), masks, additions and products of two row arrays.

Fixed episodes, and padded ones with ``dataset.padding=masked``, do not use chunks
(``chunk=0``: each function is the plain computation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

PyTree = Any

# Examples per chunk: divides the paper's padded shapes (500 support rows, 50 ways x 10
# queries), so those carry no extra rows; large enough that a chunk of 84x84 images keeps
# the matmuls efficient.
ROW_CHUNK = 20
MIN_CHUNKS = 2


def _chunked(rows: PyTree, chunk: int) -> tuple[PyTree, int]:
    """Each leaf (B, ...) zero-padded to (m * chunk, ...) and reshaped (m, chunk, ...),
    m = max(MIN_CHUNKS, ceil(B / chunk)); and B."""
    n = jax.tree.leaves(rows)[0].shape[0]
    m = max(MIN_CHUNKS, -(-n // chunk))

    def split(a: jax.Array) -> jax.Array:
        if a.shape[0] != n:
            raise ValueError(f"every row array needs {n} rows, got {a.shape}")
        a = jnp.pad(a, [(0, m * chunk - n)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape((m, chunk) + a.shape[1:])

    return jax.tree.map(split, rows), n


def map_rows(fn: Callable[[PyTree], PyTree], rows: PyTree, chunk: int) -> PyTree:
    """fn applied to ``rows`` (a pytree of (B, ...) arrays) chunk by chunk: fn(rows) with
    each output leaf (B, ...). fn must treat its rows independently (values shared by all
    rows, such as weights, are closed over). chunk 0: fn(rows) directly."""
    if not chunk:
        return fn(rows)
    chunks, n = _chunked(rows, chunk)
    _, out = lax.scan(lambda carry, c: (carry, fn(c)), None, chunks)
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:])[:n], out)


def sum_rows(fn: Callable[[PyTree], PyTree], rows: PyTree, chunk: int) -> PyTree:
    """The sum over chunks of fn(chunk), fn a sum over its chunk's rows (a pytree of arrays
    without the row axis), accumulated chunk after chunk. chunk 0: fn(rows) directly.

    Padding rows (zeros from :func:`_chunked`) enter fn: fn must make them contribute 0
    (they do whenever fn masks its rows, or is linear in them)."""
    if not chunk:
        return fn(rows)
    chunks, _ = _chunked(rows, chunk)
    first = jax.tree.map(lambda a: a[0], chunks)
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first))
    total, _ = lax.scan(lambda acc, c: (jax.tree.map(jnp.add, acc, fn(c)), None), zero, chunks)
    return total


def real_rows_first(x: jax.Array) -> jax.Array:
    """The stable order (B,) of x's rows (B, ...) that puts its real rows (not all NaN, as a
    padded episode marks padding, metalearn/episodes.py) first: a batch joined from parts
    that each end in padding (support and query) gets the layout row chunks assume."""
    padding = jnp.isnan(x.reshape(x.shape[0], -1)[:, 0])
    return jnp.argsort(padding, stable=True)


def with_real_rows_first(fn: Callable[[jax.Array], PyTree], x: jax.Array) -> PyTree:
    """fn(x) computed on x's rows in :func:`real_rows_first` order, its outputs (each (B, ...))
    returned in x's order."""
    order = real_rows_first(x)
    out = fn(x[order])
    return jax.tree.map(lambda a: jnp.zeros_like(a).at[order].set(a), out)
