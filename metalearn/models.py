"""Flax models: the sinusoid MLP, the MAML paper's Conv4 and ResNet-12.

All are plain ``flax.linen`` modules whose parameters are an ordinary pytree, so
meta-learning algorithms can differentiate through ``apply(params, x)`` freely. Each can
also be built context-conditioned (``make_model(..., context_size=C)``, CAVIA/CAML): then
``apply(params, x, context)`` takes a context vector (C,) that is not part of ``params``.

Conv4 and ResNet-12 use BatchNorm with the statistics of the current batch at train *and*
test time (no running averages). This is the transductive setting of the MAML paper's
code: at test time the query set of one task is normalised with its own statistics.

Convolutions default to ``conv_impl="im2col"``: the 3x3 patches are gathered with nine
strided slices and contracted with the kernel by one matmul. Under ``jax.vmap`` with
per-task (adapted) kernels this becomes a batched matmul, whereas ``lax.conv`` becomes
a grouped convolution that XLA:CPU runs tens of times slower.

Mixed precision (``model.compute_dtype``): with ``"bfloat16"`` every module casts its
float32 parameters and its input to bfloat16 where they are used, so convolutions,
matmuls and activations run in bf16, while

- :class:`BatchStatNorm` computes the batch mean/variance and the normalisation in
  float32 (its scale/bias stay float32) and returns bf16;
- the final ``head`` layer runs in float32 on the (up-cast) features, so the logits, and
  hence the loss, are float32 (ANIL's inner loop on the head is all float32);
- ``init`` returns float32 parameters; gradients flow back through the casts, so
  gradients and optimizer state are float32 as well.

``"float32"`` (the default) casts nothing: the modules compute in the dtype of their
inputs and parameters (float64 under ``jax_enable_x64`` with float64 params), exactly as
before the option existed. Mixed precision lives in the modules (attribute ``dtype``), so
it also holds for ``model.module.apply`` and for :func:`with_context`'s twin.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
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


def _cast(x: jax.Array, dtype: Any) -> jax.Array:
    """x in the compute dtype; dtype None (float32 mode) leaves x untouched."""
    return x if dtype is None or x.dtype == dtype else x.astype(dtype)


def _head_dtype(dtype: Any) -> Any:
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

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.glorot_uniform(), (3, 3, x.shape[-1], self.features))
        conv = conv3x3_im2col if self.impl == "im2col" else conv3x3_xla
        y = conv(_cast(x, self.dtype), _cast(kernel, self.dtype), self.stride)
        if self.use_bias:
            y = y + _cast(self.param("bias", nn.initializers.zeros, (self.features,)), self.dtype)
        return y


class Conv1x1(nn.Module):
    """1x1 convolution without bias (ResNet shortcut), kernel (1, 1, C, F).

    ``impl="im2col"``: a plain matmul over the channel axis (a batched matmul under vmap);
    ``"xla"``: ``lax.conv_general_dilated``. Both are exactly a per-pixel linear map.
    """

    features: int
    impl: str = "im2col"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.glorot_uniform(), (1, 1, x.shape[-1], self.features))
        x, kernel = _cast(x, self.dtype), _cast(kernel, self.dtype)
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


class BatchStatNorm(nn.Module):
    """BatchNorm that always normalises with the current batch's statistics
    (:func:`batch_stat_norm`).

    x: (B, ..., F); mean and variance are taken over every axis but the last. A
    low-precision input (bf16) is normalised in float32 (statistics included) and the
    result is returned in the input's dtype.
    """

    epsilon: float = 1e-5
    # False: offset only (cbfinn/maml's tf.contrib.layers.batch_norm has scale=False).
    use_scale: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        low_precision = x.dtype if jnp.finfo(x.dtype).bits < 32 else None
        if low_precision is not None:
            x = x.astype(jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        if self.use_scale:
            scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        else:  # a constant 1: not a parameter, so neither adapted nor meta-learned
            scale = jnp.ones((x.shape[-1],), bias.dtype)
        x, scale = _promote(x, scale)
        y = batch_stat_norm(x, scale, bias.astype(scale.dtype), self.epsilon)
        return y if low_precision is None else y.astype(low_precision)


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

    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        features = x.shape[-1]
        film = nn.Dense(2 * features, dtype=self.dtype, name="dense")(context)
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
    # Compute dtype (None: no casting; jnp.bfloat16: mixed precision, see module docstring).
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        x = _cast(x, self.dtype)
        if self.context_size:
            context = _cast(_context_or_zeros(context, self.context_size, x.dtype), self.dtype)
            x = jnp.concatenate([x, jnp.broadcast_to(context, x.shape[:-1] + context.shape)], axis=-1)
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"dense_{i}")(x))
        return nn.Dense(self.out, dtype=_head_dtype(self.dtype), name="head")(x)


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

    ``bn_scale``/``bn_epsilon``: see :class:`BatchStatNorm`; ``head_init``: the head kernel's
    initialiser ("lecun_normal", Flax's default; "glorot_uniform"; "normal", N(0, 1) as
    cbfinn/maml's Omniglot ``w5``).
    """

    out: int
    filters: int = 64
    blocks: int = 4
    downsample: str = "stride"
    conv_impl: str = "im2col"
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

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        stride = 2 if self.downsample == "stride" else 1
        x = _cast(x, self.dtype)
        if self.context_size:
            context = _cast(_context_or_zeros(context, self.context_size, x.dtype), self.dtype)
        for i in range(self.blocks):
            x = Conv3x3(self.filters, stride, self.conv_impl, dtype=self.dtype, name=f"conv_{i}")(x)
            x = BatchStatNorm(self.bn_epsilon, self.bn_scale, name=f"norm_{i}")(x)
            film = self.context_size and i == self.film_block
            if film and self.film_position == "pre_pool":
                x = FiLM(dtype=self.dtype, name="film")(x, context)
            if self.downsample == "maxpool":
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            if film and self.film_position == "post_pool":
                x = FiLM(dtype=self.dtype, name="film")(x, context)
            x = nn.relu(x)
        x = jnp.mean(x, axis=(-3, -2)) if self.head == "spatial_mean" else x.reshape(x.shape[:-3] + (-1,))
        head_dtype = _head_dtype(self.dtype)
        if head_dtype is not None:
            x = x.astype(head_dtype)
        return nn.Dense(self.out, dtype=head_dtype, kernel_init=HEAD_INITS[self.head_init], name="head")(x)


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

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        for j in range(3):
            conv = Conv3x3(self.features, 1, self.conv_impl, False, self.dtype, name=f"conv_{j}")
            h = BatchStatNorm(self.bn_epsilon, self.bn_scale, name=f"norm_{j}")(conv(h))
            if j < 2:
                h = nn.leaky_relu(h, self.negative_slope)
        shortcut = Conv1x1(self.features, self.conv_impl, dtype=self.dtype, name="shortcut_conv")(x)
        return h + BatchStatNorm(self.bn_epsilon, self.bn_scale, name="shortcut_norm")(shortcut)


class ResNet12(nn.Module):
    """ResNet-12 of MetaOptNet / TADAM. x: (B, H, W, C) -> logits (B, out).

    One residual stage per entry of ``channels`` (4 by default: 64-160-320-640, 3 convs
    each, hence "12"), parameter subtrees ``stage_0`` .. ``stage_3`` (see
    :class:`ResBlock`). After each stage's residual addition: LeakyReLU(0.1), then a 2x2
    max-pool (VALID, so 84 -> 42 -> 21 -> 10 -> 5 and 32 -> 16 -> 8 -> 4 -> 2; inputs
    need H, W >= 2 ** len(channels)). Then a global average pool and a linear ``head``
    (channels[-1] -> out). BatchNorm uses batch statistics (transductive, as Conv4); convs
    are bias-free; ``conv_impl`` selects im2col or lax.conv as in Conv4. No DropBlock and
    no dropout (the papers' regularisers are left out: adaptation stays deterministic).

    With ``context_size`` > 0, :class:`FiLM` (param subtree ``film``) modulates the output
    of stage ``film_stage`` (default 2, the third stage) after its residual addition and
    before its LeakyReLU, the analogue of Conv4's FiLM between BatchNorm and ReLU.
    """

    out: int
    channels: Sequence[int] = (64, 160, 320, 640)
    conv_impl: str = "im2col"
    negative_slope: float = 0.1
    context_size: int = 0
    film_stage: int = 2
    # Compute dtype (None: no casting; jnp.bfloat16: mixed precision, see module docstring).
    dtype: Any = None
    bn_scale: bool = True
    bn_epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        x = _cast(x, self.dtype)
        if self.context_size:
            context = _cast(_context_or_zeros(context, self.context_size, x.dtype), self.dtype)
        for i, features in enumerate(self.channels):
            block = ResBlock(
                features,
                self.conv_impl,
                self.negative_slope,
                self.dtype,
                self.bn_scale,
                self.bn_epsilon,
                name=f"stage_{i}",
            )
            x = block(x)
            if self.context_size and i == self.film_stage:
                x = FiLM(dtype=self.dtype, name="film")(x, context)
            x = nn.leaky_relu(x, self.negative_slope)
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        head_dtype = _head_dtype(self.dtype)
        if head_dtype is not None:
            x = x.astype(head_dtype)  # average pool and head in float32
        x = jnp.mean(x, axis=(-3, -2))
        return nn.Dense(self.out, dtype=head_dtype, name="head")(x)


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


_COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def make_model(cfg: Any, input_shape: tuple[int, ...], output_dim: int, context_size: int = 0) -> Model:
    """Build the model named by ``cfg.name`` (a ModelConfig): mlp, conv4 or resnet12.

    mlp uses ``hidden``; conv4 ``filters``, ``blocks``, ``downsample``, ``conv_impl``, ``head``,
    ``head_init``, ``film_position``; resnet12 ``channels`` and ``conv_impl``; both ``bn_scale``
    and ``bn_epsilon``. ``compute_dtype`` ("float32" or "bfloat16")
    applies to all (see the module docstring).

    context_size > 0 builds the context-conditioned variant (CAVIA): the MLP concatenates
    the context to its input; Conv4 applies FiLM after the third block (the last block if
    there are fewer), ResNet-12 after the third stage's residual addition (the last stage
    if there are fewer). With context_size = 0 the parameters are exactly the plain model's.
    """
    if context_size < 0:
        raise ValueError(f"context_size must be >= 0, got {context_size}")
    compute_dtype = getattr(cfg, "compute_dtype", "float32")
    if compute_dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"unknown compute_dtype {compute_dtype!r}: use one of {sorted(_COMPUTE_DTYPES)}")
    dtype = _COMPUTE_DTYPES[compute_dtype]
    if cfg.name == "mlp":
        module: nn.Module = MLP(
            hidden=tuple(cfg.hidden), out=output_dim, context_size=context_size, dtype=dtype
        )
    elif cfg.name == "conv4":
        module = Conv4(
            out=output_dim,
            filters=cfg.filters,
            blocks=cfg.blocks,
            downsample=cfg.downsample,
            conv_impl=cfg.conv_impl,
            context_size=context_size,
            film_block=min(2, cfg.blocks - 1),
            film_position=getattr(cfg, "film_position", "pre_pool"),
            head=getattr(cfg, "head", "flatten"),
            head_init=getattr(cfg, "head_init", "lecun_normal"),
            bn_scale=getattr(cfg, "bn_scale", True),
            bn_epsilon=getattr(cfg, "bn_epsilon", 1e-5),
            dtype=dtype,
        )
    elif cfg.name == "resnet12":
        channels = tuple(cfg.channels)
        if not channels or min(channels) < 1:
            raise ValueError(f"resnet12 needs channels >= 1 per stage, got {list(channels)}")
        module = ResNet12(
            out=output_dim,
            channels=channels,
            conv_impl=cfg.conv_impl,
            context_size=context_size,
            film_stage=min(2, len(channels) - 1),
            dtype=dtype,
            bn_scale=getattr(cfg, "bn_scale", True),
            bn_epsilon=getattr(cfg, "bn_epsilon", 1e-5),
        )
    else:  # validated earlier; kept for direct library use
        raise ValueError(f"unknown model {cfg.name!r}")
    return _wrap(module, input_shape, context_size)


def with_context(model: Model, input_shape: tuple[int, ...], context_size: int) -> Model:
    """``model``'s architecture, conditioned on a context vector of ``context_size``.

    For algorithms (CAML) that receive an already-built plain model and need its
    context-conditioned twin: same layers and options (compute dtype included), plus the
    context input / FiLM.
    """
    if context_size < 1:
        raise ValueError(f"context_size must be >= 1, got {context_size}")
    if not isinstance(model.module, MLP | Conv4 | ResNet12):
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


def is_norm_param(path: tuple[Any, ...]) -> bool:
    """Whether a parameter's key path (``jax.tree_util`` keys) lies in a BatchNorm subtree
    (``norm_*`` or ``shortcut_norm``, as in Conv4 and ResNet-12)."""
    for entry in path:
        name = str(getattr(entry, "key", getattr(entry, "name", entry)))
        if name.startswith("norm_") or name == "shortcut_norm":
            return True
    return False
