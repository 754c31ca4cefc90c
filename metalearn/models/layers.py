"""Layers of the models (metalearn.models): 3x3 and 1x1 convolutions (im2col or XLA),
batch-statistics BatchNorm with a hand-written VJP, FiLM, and the mixed-precision casts."""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from metalearn.rows import map_rows, sum_rows

Params = Any


def _same_padding(size: int, stride: int, kernel: int) -> tuple[int, int]:
    """XLA's SAME padding (low, high) for one spatial dimension."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _promote(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Both in their common dtype (lax.conv, unlike matmul, does not promote; e.g. a
    float32 input with the float64 parameters ``init`` makes under jax_enable_x64)."""
    dtype = jnp.result_type(x, kernel)
    return x.astype(dtype), kernel.astype(dtype)


def conv3x3_im2col(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """SAME 3x3 convolution as patches @ kernel.

    x: (..., H, W, C); kernel: (3, 3, C, F) -> (..., H', W', F) with H' = ceil(H / stride).
    Numerically equal to ``lax.conv_general_dilated(..., padding="SAME")``.
    """
    h, w = x.shape[-3], x.shape[-2]
    (ph_lo, ph_hi), (pw_lo, pw_hi) = _same_padding(h, stride, 3), _same_padding(w, stride, 3)
    pad = [(0, 0)] * (x.ndim - 3) + [(ph_lo, ph_hi), (pw_lo, pw_hi), (0, 0)]
    xp = jnp.pad(x, pad)
    ho, wo = -(-h // stride), -(-w // stride)
    # Patch features are ordered (kh, kw, C), matching kernel.reshape(9 * C, F).
    patches = jnp.concatenate(
        [
            xp[..., i : i + (ho - 1) * stride + 1 : stride, j : j + (wo - 1) * stride + 1 : stride, :]
            for i in range(3)
            for j in range(3)
        ],
        axis=-1,
    )
    return patches @ kernel.reshape(-1, kernel.shape[-1])


def conv3x3_xla(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Same contract as :func:`conv3x3_im2col`, through ``lax.conv_general_dilated``."""
    x, kernel = _promote(x, kernel)
    lead = x.shape[:-3]
    y = lax.conv_general_dilated(
        x.reshape((-1,) + x.shape[-3:]),
        kernel,
        window_strides=(stride, stride),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y.reshape(lead + y.shape[1:])


def _windows(x: jax.Array) -> jax.Array:
    """x: (..., H, W, C) as its 2x2 windows (stride 2, VALID: an odd last row or column is
    dropped): (..., H // 2, 2, W // 2, 2, C)."""
    h, w = x.shape[-3] // 2, x.shape[-2] // 2
    if x.shape[-3] != 2 * h or x.shape[-2] != 2 * w:
        x = x[..., : 2 * h, : 2 * w, :]
    return x.reshape(x.shape[:-3] + (h, 2, w, 2, x.shape[-1]))


_WINDOW_AXES = (-4, -2)


@jax.custom_jvp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, VALID: x (..., H, W, C) -> (..., H // 2, W // 2, C).

    The same values and derivatives as ``flax.linen.max_pool(x, (2, 2), (2, 2), "VALID")``
    (each window's derivative goes to its first maximum in row-major order, as XLA's
    select-and-scatter with ``>=``), written as a reduction over the window axes of a
    reshape, with the derivative a masked sum over the same axes and its transpose a
    masked broadcast: XLA fuses those into the neighbouring passes, whereas the
    reduce-window's derivatives (select-and-scatter, and an index-carrying reduce-window for
    their own derivative under second-order MAML) each make passes of their own over the
    full-resolution activations (about a quarter of the bytes of a mini-ImageNet Conv4
    meta-step, docs/performance.md).
    """
    return jnp.max(_windows(x), axis=_WINDOW_AXES)


def _first_maximum(windows: jax.Array, pooled: jax.Array) -> jax.Array:
    """Boolean mask like ``windows`` (..., h, 2, w, 2, C), true at the first maximum of each
    window in row-major order (ties go to the earliest, as select-and-scatter's >=)."""
    position = (2 * jnp.arange(2)[:, None, None] + jnp.arange(2)[None, None, :])[..., None]  # (2, 1, 2, 1)
    is_max = windows == jnp.expand_dims(pooled, _WINDOW_AXES)
    first = jnp.min(jnp.where(is_max, position, 4), axis=_WINDOW_AXES, keepdims=True)
    return position == first


@max_pool_2x2.defjvp
def _max_pool_2x2_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    windows = _windows(x)
    pooled = max_pool_2x2(x)  # not jnp.max: its derivative, under second order, splits ties
    mask = _first_maximum(windows, pooled)
    return pooled, jnp.sum(jnp.where(mask, _windows(t), 0), axis=_WINDOW_AXES)


def max_pool(x: jax.Array, impl: str = "reduce_window") -> jax.Array:
    """2x2 max-pool, stride 2, VALID, of x: (..., H, W, C): flax's reduce-window
    (``impl="reduce_window"``) or :func:`max_pool_2x2` (``"reshape"``), equal in values
    and derivatives of every order."""
    if impl == "reshape":
        return max_pool_2x2(x)
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def cast_to(x: jax.Array, dtype: Any) -> jax.Array:
    """x in the compute dtype; dtype None (float32 mode) leaves x untouched."""
    return x if dtype is None or x.dtype == dtype else x.astype(dtype)


def head_float_dtype(dtype: Any) -> Any:
    """Dtype of the final layer: float32 under mixed precision, else unchanged (None)."""
    return None if dtype is None else jnp.promote_types(dtype, jnp.float32)


class Conv3x3(nn.Module):
    """SAME 3x3 convolution (kernel (3, 3, C, F), optional bias (F,)); float32 params.

    dtype: compute dtype (None: that of x and the params). ``use_bias=False`` when a
    BatchNorm follows (its mean subtraction cancels a bias).
    """

    features: int
    stride: int = 1
    impl: str = "im2col"
    use_bias: bool = True
    dtype: Any = None
    # Examples per chunk (metalearn/rows.py; 0: the whole batch at once).
    row_chunk: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.glorot_uniform(), (3, 3, x.shape[-1], self.features))
        conv = conv3x3_im2col if self.impl == "im2col" else conv3x3_xla
        bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None

        def layer(rows: jax.Array) -> jax.Array:
            y = conv(cast_to(rows, self.dtype), cast_to(kernel, self.dtype), self.stride)
            return y if bias is None else y + cast_to(bias, self.dtype)

        return map_rows(layer, x, self.row_chunk)


class Conv1x1(nn.Module):
    """1x1 convolution without bias (ResNet shortcut), kernel (1, 1, C, F).

    ``impl="im2col"``: a plain matmul over the channel axis (a batched matmul under vmap);
    ``"xla"``: ``lax.conv_general_dilated``. Both are exactly a per-pixel linear map.
    """

    features: int
    impl: str = "im2col"
    dtype: Any = None
    # Examples per chunk (metalearn/rows.py; 0: the whole batch at once).
    row_chunk: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.glorot_uniform(), (1, 1, x.shape[-1], self.features))
        return map_rows(lambda rows: self._apply(rows, kernel), x, self.row_chunk)

    def _apply(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        x, kernel = cast_to(x, self.dtype), cast_to(kernel, self.dtype)
        if self.impl == "im2col":
            return x @ kernel.reshape(kernel.shape[-2:])
        x, kernel = _promote(x, kernel)
        lead = x.shape[:-3]
        y = lax.conv_general_dilated(
            x.reshape((-1,) + x.shape[-3:]),
            kernel,
            window_strides=(1, 1),
            padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y.reshape(lead + y.shape[1:])


def _normalize(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array]:
    """(x - mean) / sqrt(var + epsilon) over every axis but the last, and 1 / sqrt(...)."""
    axes = tuple(range(x.ndim - 1))
    centered = x - jnp.mean(x, axis=axes)
    rstd = lax.rsqrt(jnp.mean(jnp.square(centered), axis=axes) + epsilon)
    return centered * rstd, rstd


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_stat_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """Batch-statistics normalisation ``(x - mean) / sqrt(var + eps) * scale + bias``.

    The gradient is written out (the textbook BatchNorm backward: two reductions,
    ``dx = rstd * (g' - mean(g') - xhat * mean(g' * xhat))`` with ``g' = g * scale``)
    instead of derived by autodiff from the forward pass, which makes fewer passes over
    the activations; it is itself plain jax, so second-order MAML differentiates it again.
    """
    xhat, _ = _normalize(x, epsilon)
    return xhat * scale + bias


def _batch_stat_norm_fwd(x, scale, bias, epsilon):
    xhat, rstd = _normalize(x, epsilon)
    return xhat * scale + bias, (xhat, rstd, scale)


def _batch_stat_norm_bwd(epsilon, residuals, g):
    del epsilon
    xhat, rstd, scale = residuals
    axes = tuple(range(g.ndim - 1))
    gx = g * scale
    dx = rstd * (gx - jnp.mean(gx, axis=axes) - xhat * jnp.mean(gx * xhat, axis=axes))
    return dx, jnp.sum(g * xhat, axis=axes), jnp.sum(g, axis=axes)


batch_stat_norm.defvjp(_batch_stat_norm_fwd, _batch_stat_norm_bwd)


# Variable collections of BatchStatNorm (metalearn/batchnorm.py sets them): GIVEN_MOMENTS
# holds moments to normalise with instead of the batch's; RECORDED_MOMENTS, when mutable,
# receives the batch's own moments.
GIVEN_MOMENTS, RECORDED_MOMENTS = "bn_moments", "bn_recorded"


class BatchStatNorm(nn.Module):
    """BatchNorm that normalises with the current batch's statistics
    (:func:`batch_stat_norm`), or with given moments.

    x: (B, ..., F); mean and variance are taken over every axis but the last. A
    low-precision input (bf16) is normalised in float32 (statistics included) and the
    result is returned in the input's dtype.

    Given moments (collection ``GIVEN_MOMENTS``: ``mean``, ``var``, each (F,)) replace the
    batch's: ``(x - mean) / sqrt(var + eps) * scale + bias``, so each row is normalised on its
    own (the non-transductive BatchNorm modes). With ``RECORDED_MOMENTS`` mutable, the batch's
    ``mean``, biased ``var`` (what it is normalised with) and element ``count`` per feature
    (a float scalar) are recorded there. Neither collection present: the batch path alone.
    """

    epsilon: float = 1e-5
    # False: offset only (cbfinn/maml's tf.contrib.layers.batch_norm has scale=False).
    use_scale: bool = True
    # Examples per chunk of the masked path (metalearn/rows.py; 0: the whole batch at once).
    row_chunk: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, rows: jax.Array | None = None) -> jax.Array:
        if rows is not None:
            return self.masked(x, rows)
        x, scale, bias, low_precision = self._affine(x)
        if self.has_variable(GIVEN_MOMENTS, "mean"):
            mean = self.get_variable(GIVEN_MOMENTS, "mean").astype(x.dtype)
            var = self.get_variable(GIVEN_MOMENTS, "var").astype(x.dtype)
            y = (x - mean) * lax.rsqrt(var + self.epsilon) * scale + bias
        else:
            y = batch_stat_norm(x, scale, bias, self.epsilon)
        if self.is_mutable_collection(RECORDED_MOMENTS):
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axis=axes)
            self.put_variable(RECORDED_MOMENTS, "mean", mean)
            self.put_variable(RECORDED_MOMENTS, "var", jnp.mean(jnp.square(x - mean), axis=axes))
            self.put_variable(RECORDED_MOMENTS, "count", jnp.asarray(x.size // x.shape[-1], x.dtype))
        return y if low_precision is None else y.astype(low_precision)

    def _affine(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
        """(x, scale, bias in their common dtype, x's low-precision dtype or None): a
        low-precision input is normalised in float32 and cast back by the caller."""
        low_precision = x.dtype if jnp.finfo(x.dtype).bits < 32 else None
        if low_precision is not None:
            x = x.astype(jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        if self.use_scale:
            scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        else:  # a constant 1: not a parameter, so neither adapted nor meta-learned
            scale = jnp.ones((x.shape[-1],), bias.dtype)
        x, scale = _promote(x, scale)
        return x, scale, bias.astype(scale.dtype), low_precision

    def masked(self, x: jax.Array, rows: jax.Array) -> jax.Array:
        """The layer on a batch with padded rows (variable episodes, metalearn/episodes.py):
        rows (B,) bool marks the real ones, and the batch moments are those of the real rows
        only (mean, biased variance; count = real rows x positions), so padding changes no
        real row's output. Plain jax (autodiff), not the hand-written gradient."""
        x, scale, bias, low_precision = self._affine(x)
        axes = tuple(range(x.ndim - 1))
        weight = rows.astype(x.dtype)
        # At least one element: a batch of padding alone stays finite.
        count = jnp.maximum(jnp.sum(weight) * (x.size // (x.shape[0] * x.shape[-1])), 1)

        def real_rows_sum(f: Any) -> jax.Array:
            """The sum over the real rows and positions of f(x), per feature."""

            def chunk_sum(chunk: tuple[jax.Array, jax.Array]) -> jax.Array:
                v, w = chunk
                return jnp.sum(f(v) * w.reshape(w.shape + (1,) * (v.ndim - 1)), axis=axes)

            return sum_rows(chunk_sum, (x, weight), self.row_chunk)

        batch_mean = real_rows_sum(lambda v: v) / count
        batch_var = real_rows_sum(lambda v: jnp.square(v - batch_mean)) / count
        if self.has_variable(GIVEN_MOMENTS, "mean"):
            mean = self.get_variable(GIVEN_MOMENTS, "mean").astype(x.dtype)
            var = self.get_variable(GIVEN_MOMENTS, "var").astype(x.dtype)
        else:
            mean, var = batch_mean, batch_var
        rstd = lax.rsqrt(var + self.epsilon)
        y = map_rows(lambda v: (v - mean) * rstd * scale + bias, x, self.row_chunk)
        if self.is_mutable_collection(RECORDED_MOMENTS):
            self.put_variable(RECORDED_MOMENTS, "mean", batch_mean)
            self.put_variable(RECORDED_MOMENTS, "var", batch_var)
            self.put_variable(RECORDED_MOMENTS, "count", count.astype(x.dtype))
        return y if low_precision is None else y.astype(low_precision)


def padding_to_zeros(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x with its padded rows, all NaN, replaced by zeros; rows (B,) bool, the real ones):
    the first step of a model built with ``padded_rows`` (metalearn/episodes.py)."""
    rows = ~jnp.isnan(x.reshape(x.shape[0], -1)[:, 0])
    return jnp.where(rows.reshape(rows.shape + (1,) * (x.ndim - 1)), x, 0), rows


def context_or_zeros(context: jax.Array | None, size: int, dtype: Any) -> jax.Array:
    """The context vector (size,), or zeros (the state every task starts from) if None."""
    if context is None:
        return jnp.zeros((size,), dtype)
    if context.shape != (size,):
        raise ValueError(f"context must have shape ({size},), got {context.shape}")
    return context


class FiLM(nn.Module):
    """Feature-wise linear modulation by a context vector (CAVIA, Zintgraf et al. 2019).

    x: (B, ..., F), context: (C,) -> gamma * x + beta with (gamma, beta) = (1 + W_g c, W_b c)
    + biases, each (F,). The biases start at zero, so context zero is the identity map and
    an untrained context does not perturb the shared network; the kernel starts random so
    the context affects the output (a zero kernel would give the context zero gradient).
    """

    dtype: Any = None
    # Examples per chunk (metalearn/rows.py; 0: the whole batch at once).
    row_chunk: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        features = x.shape[-1]
        film = nn.Dense(2 * features, dtype=self.dtype, name="dense")(context)
        gamma, beta = 1.0 + film[:features], film[features:]
        return map_rows(lambda rows: gamma * rows + beta, x, self.row_chunk)


class RowDense(nn.Module):
    """A linear layer over chunks of rows (metalearn/rows.py): ``flax.linen.Dense``'s
    parameters (``kernel`` (in, features), ``bias`` (features,), float32, the same
    initialisers and names) and result, x (B, in) -> (B, features), computed ``row_chunk``
    rows at a time. :func:`dense` picks it only when ``row_chunk`` > 0."""

    features: int
    row_chunk: int
    dtype: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return map_rows(lambda rows: rows @ kernel + bias, x, self.row_chunk)


def dense(
    features: int, name: str, row_chunk: int = 0, dtype: Any = None, kernel_init: Any = None
) -> nn.Module:
    """``flax.linen.Dense``, or :class:`RowDense` (the same layer over row chunks) when
    ``row_chunk`` > 0."""
    init = {} if kernel_init is None else {"kernel_init": kernel_init}
    if row_chunk:
        return RowDense(features, row_chunk, dtype=dtype, name=name, **init)
    return nn.Dense(features, dtype=dtype, name=name, **init)
