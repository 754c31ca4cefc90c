"""Flax models: the sinusoid MLP and the MAML paper's Conv4.

Both are plain ``flax.linen`` modules whose parameters are an ordinary pytree, so
meta-learning algorithms can differentiate through ``apply(params, x)`` freely. Either can
also be built context-conditioned (``make_model(..., context_size=C)``, CAVIA/CAML): then
``apply(params, x, context)`` takes a context vector (C,) that is not part of ``params``.

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
        kernel = self.param("kernel", nn.initializers.glorot_uniform(), (3, 3, x.shape[-1], self.features))
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


def _context_or_zeros(context: jax.Array | None, size: int, dtype: Any) -> jax.Array:
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

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        features = x.shape[-1]
        film = nn.Dense(2 * features, name="dense")(context)
        gamma, beta = 1.0 + film[:features], film[features:]
        return gamma * x + beta


class MLP(nn.Module):
    """x: (B, in) -> (B, out). Hidden layers with ReLU; the last layer is named ``head``.

    With ``context_size`` > 0, a context vector (context_size,) is concatenated to every
    input row (CAVIA's regression network), so ``dense_0``'s kernel is (in + context_size, h).
    """

    hidden: Sequence[int]
    out: int
    context_size: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        if self.context_size:
            context = _context_or_zeros(context, self.context_size, x.dtype)
            x = jnp.concatenate([x, jnp.broadcast_to(context, x.shape[:-1] + context.shape)], axis=-1)
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"dense_{i}")(x))
        return nn.Dense(self.out, name="head")(x)


class Conv4(nn.Module):
    """MAML's 4-block CNN. x: (B, H, W, C) -> logits (B, out).

    Each block: 3x3 conv (``filters``) -> BatchNorm (batch statistics) -> ReLU, then either
    stride 2 in the conv (``downsample="stride"``, Omniglot 28x28) or a 2x2 max-pool
    (``downsample="maxpool"``, larger images). The flattened features feed a linear ``head``.
    With ``context_size`` > 0, :class:`FiLM` (param subtree ``film``) modulates block
    ``film_block`` between its BatchNorm and ReLU, as in CAVIA's conditioned ConvNet.
    """

    out: int
    filters: int = 64
    blocks: int = 4
    downsample: str = "stride"
    conv_impl: str = "im2col"
    # CAVIA: a context vector (context_size,) modulates block ``film_block`` through FiLM.
    context_size: int = 0
    film_block: int = 2

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        stride = 2 if self.downsample == "stride" else 1
        if self.context_size:
            context = _context_or_zeros(context, self.context_size, x.dtype)
        for i in range(self.blocks):
            x = Conv3x3(self.filters, stride, self.conv_impl, name=f"conv_{i}")(x)
            x = BatchStatNorm(name=f"norm_{i}")(x)
            if self.context_size and i == self.film_block:
                x = FiLM(name="film")(x, context)
            x = nn.relu(x)
            if self.downsample == "maxpool":
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        x = x.reshape(x.shape[:-3] + (-1,))
        return nn.Dense(self.out, name="head")(x)


class Model(NamedTuple):
    """A model as two pure functions.

    init(key) -> params; apply(params, x, context=None) -> predictions,
    x: (B, *input_shape) -> (B, out). ``context`` (context_size,) is only accepted by a
    context-conditioned model (context_size > 0), where None means the zero context.
    """

    init: Callable[[jax.Array], Params]
    apply: Callable[..., jax.Array]
    module: nn.Module
    context_size: int = 0


def make_model(cfg: Any, input_shape: tuple[int, ...], output_dim: int, context_size: int = 0) -> Model:
    """Build the model named by ``cfg.name`` (a ModelConfig).

    context_size > 0 builds the context-conditioned variant (CAVIA): the MLP concatenates
    the context to its input; Conv4 applies FiLM after the third block (the last block if
    there are fewer). With context_size = 0 the parameters are exactly the plain model's.
    """
    if context_size < 0:
        raise ValueError(f"context_size must be >= 0, got {context_size}")
    if cfg.name == "mlp":
        module: nn.Module = MLP(hidden=tuple(cfg.hidden), out=output_dim, context_size=context_size)
    elif cfg.name == "conv4":
        module = Conv4(
            out=output_dim,
            filters=cfg.filters,
            blocks=cfg.blocks,
            downsample=cfg.downsample,
            conv_impl=cfg.conv_impl,
            context_size=context_size,
            film_block=min(2, cfg.blocks - 1),
        )
    else:  # validated earlier; kept for direct library use
        raise ValueError(f"unknown model {cfg.name!r}")
    return _wrap(module, input_shape, context_size)


def with_context(model: Model, input_shape: tuple[int, ...], context_size: int) -> Model:
    """``model``'s architecture, conditioned on a context vector of ``context_size``.

    For algorithms (CAML) that receive an already-built plain model and need its
    context-conditioned twin: same layers and options, plus the context input / FiLM.
    """
    if context_size < 1:
        raise ValueError(f"context_size must be >= 1, got {context_size}")
    if not isinstance(model.module, MLP | Conv4):
        raise ValueError(f"{type(model.module).__name__} cannot take a context")
    return _wrap(model.module.clone(context_size=context_size), input_shape, context_size)


def _wrap(module: nn.Module, input_shape: tuple[int, ...], context_size: int) -> Model:
    dummy = jnp.zeros((2, *input_shape), jnp.float32)

    def init(key: jax.Array) -> Params:
        return module.init(key, dummy)["params"]

    def apply(params: Params, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        if context is not None and not context_size:
            raise ValueError("this model takes no context (built with context_size=0)")
        return module.apply({"params": params}, x, context)

    return Model(init, apply, module, context_size)
