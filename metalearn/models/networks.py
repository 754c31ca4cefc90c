"""The networks (metalearn.models): the sinusoid MLP, the MAML paper's Conv4 and ResNet-12."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from metalearn.models.layers import (
    BatchStatNorm,
    Conv1x1,
    Conv3x3,
    FiLM,
    cast_to,
    context_or_zeros,
    dense,
    head_float_dtype,
    max_pool,
    padding_to_zeros,
)
from metalearn.rows import map_rows

Params = Any


class MLP(nn.Module):
    """x: (B, in) -> (B, out). Hidden layers with ReLU; the last layer is named ``head``.

    With ``context_size`` > 0, a context vector (context_size,) is concatenated to every
    input row (CAVIA's regression network), so ``dense_0``'s kernel is (in + context_size, h).
    """

    hidden: Sequence[int]
    out: int
    context_size: int = 0
    # Compute dtype (None: no casting; jnp.bfloat16: mixed precision, see module docstring).
    dtype: Any = None
    # Inputs may hold padded rows (all NaN; variable episodes, metalearn/episodes.py), then
    # computed in chunks of ``row_chunk`` rows (metalearn/rows.py).
    padded_rows: bool = False
    row_chunk: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        chunk = self.row_chunk if self.padded_rows else 0
        if self.padded_rows:
            x, _ = padding_to_zeros(x)
        x = cast_to(x, self.dtype)
        if self.context_size:
            context = cast_to(context_or_zeros(context, self.context_size, x.dtype), self.dtype)
            x = map_rows(
                lambda rows: jnp.concatenate(
                    [rows, jnp.broadcast_to(context, rows.shape[:-1] + context.shape)], axis=-1
                ),
                x,
                chunk,
            )
        for i, width in enumerate(self.hidden):
            x = nn.relu(dense(width, f"dense_{i}", chunk, self.dtype)(x))
        return dense(self.out, "head", chunk, head_float_dtype(self.dtype))(x)


# Initialisers of the final linear layer (model.head_init).
HEAD_INITS = {
    "lecun_normal": nn.initializers.lecun_normal(),
    "glorot_uniform": nn.initializers.glorot_uniform(),
    "normal": nn.initializers.normal(stddev=1.0),
}


class Conv4(nn.Module):
    """MAML's 4-block CNN. x: (B, H, W, C) -> logits (B, out).

    Each block: 3x3 conv (``filters``) -> BatchNorm (batch statistics) -> ReLU, then either
    stride 2 in the conv (``downsample="stride"``, Omniglot 28x28) or a 2x2 max-pool
    (``downsample="maxpool"``, larger images). The last feature map feeds a linear ``head``,
    flattened (``head="flatten"``) or averaged over space (``head="spatial_mean"``, cbfinn/maml's
    Omniglot network: 64 features). With ``context_size`` > 0, :class:`FiLM` (param subtree
    ``film``) modulates block ``film_block`` before its ReLU: between BatchNorm and the
    max-pool (``film_position="pre_pool"``) or after the max-pool (``"post_pool"``, CAVIA's
    classification/models.py: conv, BN, max-pool, FiLM, ReLU). Max-pool and ReLU commute,
    so post_pool moves only FiLM relative to the pooling.

    ``pool_impl``: see :func:`~metalearn.models.layers.max_pool`;
    ``bn_scale``/``bn_epsilon``: see :class:`BatchStatNorm`; ``head_init``: the head kernel's
    initialiser ("lecun_normal", Flax's default; "glorot_uniform"; "normal", N(0, 1) as
    cbfinn/maml's Omniglot ``w5``).
    """

    out: int
    filters: int = 64
    blocks: int = 4
    downsample: str = "stride"
    conv_impl: str = "im2col"
    pool_impl: str = "reduce_window"
    # CAVIA: a context vector (context_size,) modulates block ``film_block`` through FiLM.
    context_size: int = 0
    film_block: int = 2
    film_position: str = "pre_pool"
    head: str = "flatten"
    head_init: str = "lecun_normal"
    bn_scale: bool = True
    bn_epsilon: float = 1e-5
    # Compute dtype (None: no casting; jnp.bfloat16: mixed precision, see module docstring).
    dtype: Any = None
    # Inputs may hold padded rows (all NaN): zeroed, BatchNorm's moments over the real rows
    # only, and every layer computed in chunks of ``row_chunk`` rows (variable episodes,
    # metalearn/episodes.py and metalearn/rows.py).
    padded_rows: bool = False
    row_chunk: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        stride = 2 if self.downsample == "stride" else 1
        rows = None
        chunk = self.row_chunk if self.padded_rows else 0
        if self.padded_rows:
            x, rows = padding_to_zeros(x)
        x = cast_to(x, self.dtype)
        if self.context_size:
            context = cast_to(context_or_zeros(context, self.context_size, x.dtype), self.dtype)
        for i in range(self.blocks):
            x = Conv3x3(
                self.filters, stride, self.conv_impl, dtype=self.dtype, row_chunk=chunk, name=f"conv_{i}"
            )(x)
            x = BatchStatNorm(self.bn_epsilon, self.bn_scale, chunk, name=f"norm_{i}")(x, rows)
            film = self.context_size and i == self.film_block
            if film and self.film_position == "pre_pool":
                x = FiLM(dtype=self.dtype, row_chunk=chunk, name="film")(x, context)
            if self.downsample == "maxpool":
                x = max_pool(x, self.pool_impl)
            if film and self.film_position == "post_pool":
                x = FiLM(dtype=self.dtype, row_chunk=chunk, name="film")(x, context)
            x = nn.relu(x)
        if self.head == "spatial_mean":
            x = map_rows(lambda r: jnp.mean(r, axis=(-3, -2)), x, chunk)
        else:
            x = x.reshape(x.shape[:-3] + (-1,))
        head_dtype = head_float_dtype(self.dtype)
        if head_dtype is not None:
            x = x.astype(head_dtype)
        return dense(self.out, "head", chunk, head_dtype, HEAD_INITS[self.head_init])(x)


class ResBlock(nn.Module):
    """One ResNet-12 stage without its final activation and pooling.

    x: (B, H, W, C) -> (B, H, W, features) = BN(conv(LReLU(BN(conv(LReLU(BN(conv(x)))))))
    + BN(conv1x1(x)): three bias-free 3x3 convs, each followed by a batch-statistics
    BatchNorm, LeakyReLU after the first two only; the shortcut is a 1x1 conv + BatchNorm.
    Params: conv_{0,1,2}, norm_{0,1,2}, shortcut_conv, shortcut_norm.
    """

    features: int
    conv_impl: str = "im2col"
    negative_slope: float = 0.1
    dtype: Any = None
    bn_scale: bool = True
    bn_epsilon: float = 1e-5
    # Examples per chunk (metalearn/rows.py; 0: the whole batch at once).
    row_chunk: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, rows: jax.Array | None = None) -> jax.Array:
        h = x
        chunk = self.row_chunk
        for j in range(3):
            conv = Conv3x3(self.features, 1, self.conv_impl, False, self.dtype, chunk, name=f"conv_{j}")
            h = BatchStatNorm(self.bn_epsilon, self.bn_scale, chunk, name=f"norm_{j}")(conv(h), rows)
            if j < 2:
                h = nn.leaky_relu(h, self.negative_slope)
        shortcut = Conv1x1(self.features, self.conv_impl, self.dtype, chunk, name="shortcut_conv")(x)
        return h + BatchStatNorm(self.bn_epsilon, self.bn_scale, chunk, name="shortcut_norm")(shortcut, rows)


class ResNet12(nn.Module):
    """ResNet-12 of MetaOptNet / TADAM. x: (B, H, W, C) -> logits (B, out).

    One residual stage per entry of ``channels`` (4 by default: 64-160-320-640, 3 convs
    each, hence "12"), parameter subtrees ``stage_0`` .. ``stage_3`` (see
    :class:`ResBlock`). After each stage's residual addition: LeakyReLU(0.1), then a 2x2
    max-pool (VALID, so 84 -> 42 -> 21 -> 10 -> 5 and 32 -> 16 -> 8 -> 4 -> 2; inputs
    need H, W >= 2 ** len(channels)). Then a global average pool and a linear ``head``
    (channels[-1] -> out). BatchNorm uses batch statistics (transductive, as Conv4); convs
    are bias-free; ``conv_impl`` selects im2col or lax.conv and ``pool_impl`` the max-pool's
    form, as in Conv4. No DropBlock and
    no dropout (the papers' regularisers are left out: adaptation stays deterministic).

    With ``context_size`` > 0, :class:`FiLM` (param subtree ``film``) modulates the output
    of stage ``film_stage`` (default 2, the third stage) after its residual addition and
    before its LeakyReLU, the analogue of Conv4's FiLM between BatchNorm and ReLU.
    """

    out: int
    channels: Sequence[int] = (64, 160, 320, 640)
    conv_impl: str = "im2col"
    pool_impl: str = "reduce_window"
    negative_slope: float = 0.1
    context_size: int = 0
    film_stage: int = 2
    # Compute dtype (None: no casting; jnp.bfloat16: mixed precision, see module docstring).
    dtype: Any = None
    bn_scale: bool = True
    bn_epsilon: float = 1e-5
    # As Conv4's.
    padded_rows: bool = False
    row_chunk: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        rows = None
        chunk = self.row_chunk if self.padded_rows else 0
        if self.padded_rows:
            x, rows = padding_to_zeros(x)
        x = cast_to(x, self.dtype)
        if self.context_size:
            context = cast_to(context_or_zeros(context, self.context_size, x.dtype), self.dtype)
        for i, features in enumerate(self.channels):
            block = ResBlock(
                features,
                self.conv_impl,
                self.negative_slope,
                self.dtype,
                self.bn_scale,
                self.bn_epsilon,
                chunk,
                name=f"stage_{i}",
            )
            x = block(x, rows)
            if self.context_size and i == self.film_stage:
                x = FiLM(dtype=self.dtype, row_chunk=chunk, name="film")(x, context)
            x = nn.leaky_relu(x, self.negative_slope)
            x = max_pool(x, self.pool_impl)
        head_dtype = head_float_dtype(self.dtype)
        if head_dtype is not None:
            x = x.astype(head_dtype)  # average pool and head in float32
        x = map_rows(lambda r: jnp.mean(r, axis=(-3, -2)), x, chunk)
        return dense(self.out, "head", chunk, head_dtype)(x)
