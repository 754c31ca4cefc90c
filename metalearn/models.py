"""Flax models: the sinusoid MLP and the MAML paper's Conv4.

Both are plain ``flax.linen`` modules whose parameters are an ordinary pytree, so
meta-learning algorithms can differentiate through ``apply(params, x)`` freely.

Conv4 uses BatchNorm with the statistics of the current batch at train *and* test time
(no running averages). This is the transductive setting of the MAML paper's code: at
test time the query set of one task is normalised with its own statistics.

Convolutions default to ``conv_impl="im2col"``: the 3x3 patches are gathered with nine
strided slices and contracted with the kernel by one matmul. Under ``jax.vmap`` with
per-task (adapted) kernels this becomes a batched matmul, whereas ``lax.conv`` becomes
a grouped convolution that XLA:CPU runs tens of times slower.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Params = Any


def _same_padding(size: int, stride: int, kernel: int) -> tuple[int, int]:
    """XLA's SAME padding (low, high) for one spatial dimension."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


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
    lead = x.shape[:-3]
    y = lax.conv_general_dilated(
        x.reshape((-1,) + x.shape[-3:]),
        kernel,
        window_strides=(stride, stride),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y.reshape(lead + y.shape[1:])


class Conv3x3(nn.Module):
    features: int
    stride: int = 1
    impl: str = "im2col"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.glorot_uniform(), (3, 3, x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        conv = conv3x3_im2col if self.impl == "im2col" else conv3x3_xla
        return conv(x, kernel, self.stride) + bias


class BatchStatNorm(nn.Module):
    """BatchNorm that always normalises with the current batch's statistics.

    x: (B, ..., F); mean and variance are taken over every axis but the last.
    """

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(x, axis=axes)
        var = jnp.mean(jnp.square(x - mean), axis=axes)
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return (x - mean) * lax.rsqrt(var + self.epsilon) * scale + bias


class MLP(nn.Module):
    """x: (B, in) -> (B, out). Hidden layers with ReLU; the last layer is named ``head``."""

    hidden: Sequence[int]
    out: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"dense_{i}")(x))
        return nn.Dense(self.out, name="head")(x)


class Conv4(nn.Module):
    """MAML's 4-block CNN. x: (B, H, W, C) -> logits (B, out).

    Each block: 3x3 conv (``filters``) -> BatchNorm (batch statistics) -> ReLU, then either
    stride 2 in the conv (``downsample="stride"``, Omniglot 28x28) or a 2x2 max-pool
    (``downsample="maxpool"``, larger images). The flattened features feed a linear ``head``.
    """

    out: int
    filters: int = 64
    blocks: int = 4
    downsample: str = "stride"
    conv_impl: str = "im2col"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        stride = 2 if self.downsample == "stride" else 1
        for i in range(self.blocks):
            x = Conv3x3(self.filters, stride, self.conv_impl, name=f"conv_{i}")(x)
            x = nn.relu(BatchStatNorm(name=f"norm_{i}")(x))
            if self.downsample == "maxpool":
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        x = x.reshape(x.shape[:-3] + (-1,))
        return nn.Dense(self.out, name="head")(x)


class Model(NamedTuple):
    """A model as two pure functions.

    init(key) -> params; apply(params, x) -> predictions, x: (B, *input_shape) -> (B, out).
    """

    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array], jax.Array]
    module: nn.Module


def make_model(cfg: Any, input_shape: tuple[int, ...], output_dim: int) -> Model:
    """Build the model named by ``cfg.name`` (a ModelConfig)."""
    if cfg.name == "mlp":
        module: nn.Module = MLP(hidden=tuple(cfg.hidden), out=output_dim)
    elif cfg.name == "conv4":
        module = Conv4(
            out=output_dim,
            filters=cfg.filters,
            blocks=cfg.blocks,
            downsample=cfg.downsample,
            conv_impl=cfg.conv_impl,
        )
    else:  # validated earlier; kept for direct library use
        raise ValueError(f"unknown model {cfg.name!r}")

    dummy = jnp.zeros((2, *input_shape), jnp.float32)

    def init(key: jax.Array) -> Params:
        return module.init(key, dummy)["params"]

    def apply(params: Params, x: jax.Array) -> jax.Array:
        return module.apply({"params": params}, x)

    return Model(init, apply, module)
