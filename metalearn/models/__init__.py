"""Flax models: the sinusoid MLP, the MAML paper's Conv4 and ResNet-12.

All are plain ``flax.linen`` modules whose parameters are an ordinary pytree, so
meta-learning algorithms can differentiate through ``apply(params, x)`` freely. Each can
also be built context-conditioned (``make_model(..., context_size=C)``, CAVIA/CAML): then
``apply(params, x, context)`` takes a context vector (C,) that is not part of ``params``.

Conv4 and ResNet-12 use BatchNorm with the statistics of the current batch at train time.
At evaluation ``model.bn_stats`` chooses (metalearn/batchnorm.py, docs/algorithms.md):
"batch" (the default: the query set of one task is normalised with its own statistics, the
transductive setting of the MAML paper's code), "support" (the support set's moments),
"running" (running averages from training) or "support_query" (each query in one batch with
the support set, supervised-reptile's non-transductive evaluation). A Model built by :func:`normalising_with`
normalises with given moments; one built by :func:`recording` records its batch moments.

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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from metalearn.config import ChoiceConfig, finite, need, one_of, schema
from metalearn.models.layers import (
    GIVEN_MOMENTS,
    RECORDED_MOMENTS,
    FiLM,
    batch_stat_norm,
    conv3x3_im2col,
    conv3x3_xla,
)
from metalearn.models.networks import HEAD_INITS, MLP, Conv4, ResNet12

Params = Any
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
CONV_IMPLS = ("im2col", "xla")
# How the 2x2 max-pools are written (model.pool_impl; same values and derivatives).
POOL_IMPLS = ("reduce_window", "reshape")
# BatchNorm statistics at evaluation (model.bn_stats; metalearn/batchnorm.py).
BN_STATS = ("batch", "support", "running", "support_query")


@dataclass
class NetworkConfig(ChoiceConfig):
    """Keys of every model: compute_dtype "bfloat16" computes activations and matmuls in bf16
    while the parameters, their gradients and the optimizer state stay float32."""

    compute_dtype: str = "float32"
    # Start from another run's backbone, bit for bit (a run dir; null: random), and how the
    # head starts: random (the algorithm's own), zeros or shared (UNICORN-MAML). See
    # metalearn/backbone.py.
    init_from: str | None = None
    init_head: str = "random"

    @classmethod
    def check(cls, m: Any, cfg: Any) -> None:
        one_of(m.compute_dtype, "model.compute_dtype", COMPUTE_DTYPES)
        one_of(m.init_head, "model.init_head", ("random", "zeros", "shared"))


@schema("model", "mlp")
@dataclass
class MLPConfig(NetworkConfig):
    """hidden: the widths of the hidden layers."""

    hidden: list[int] = field(default_factory=lambda: [40, 40])

    @classmethod
    def check(cls, m: Any, cfg: Any) -> None:
        super().check(m, cfg)
        need(all(h >= 1 for h in m.hidden), "model.hidden", list(m.hidden), "a list of sizes >= 1")


@dataclass
class ConvNetworkConfig(NetworkConfig):
    """Keys of the convolutional models: conv_impl "im2col" (patches + batched matmul, fast
    under vmap on CPU) or "xla" (lax.conv); BatchNorm with a learned scale besides the offset
    (bn_scale false: offset only, as cbfinn/maml's tf.contrib.layers.batch_norm) and the
    epsilon added to the variance (TF's default 1e-3). bn_stats: the BatchNorm statistics at
    evaluation, "batch" (transductive), "support", "running" or "support_query"
    (metalearn/batchnorm.py);
    bn_momentum: the weight of each new batch in the running averages (PyTorch's 0.1), used
    only with bn_stats=running. pool_impl: how the 2x2 max-pools (Conv4 with
    downsample=maxpool, ResNet-12) are written, with the same values and derivatives:
    "reduce_window" (flax's max_pool) or "reshape" (a reduction over a reshape, whose
    derivatives XLA fuses into the neighbouring passes: fewer bytes per meta-step with
    conv_impl=xla, more with im2col on XLA:CPU, docs/performance.md)."""

    conv_impl: str = "im2col"
    pool_impl: str = "reduce_window"
    bn_scale: bool = True
    bn_epsilon: float = 1e-5
    bn_stats: str = "batch"
    bn_momentum: float = 0.1

    @classmethod
    def check(cls, m: Any, cfg: Any) -> None:
        super().check(m, cfg)
        one_of(m.conv_impl, "model.conv_impl", CONV_IMPLS)
        one_of(m.pool_impl, "model.pool_impl", POOL_IMPLS)
        need(finite(m.bn_epsilon) and m.bn_epsilon > 0, "model.bn_epsilon", m.bn_epsilon, "> 0")
        one_of(m.bn_stats, "model.bn_stats", BN_STATS)
        need(
            finite(m.bn_momentum) and 0 < m.bn_momentum <= 1, "model.bn_momentum", m.bn_momentum, "in (0, 1]"
        )


@schema("model", "conv4")
@dataclass
class Conv4Config(ConvNetworkConfig):
    """filters per conv, blocks; downsample "stride" (stride-2 3x3 convs: Omniglot, MAML paper)
    or "maxpool" (stride-1 conv + 2x2 max-pool); head: the last feature map "flatten"ed or
    averaged over space ("spatial_mean", cbfinn/maml's Omniglot network); head_init:
    lecun_normal (Flax default), glorot_uniform or normal (N(0, 1), cbfinn/maml's Omniglot
    w5); film_position (CAML): FiLM before the max-pool ("pre_pool") or after it
    ("post_pool", CAVIA's classification/models.py)."""

    filters: int = 64
    blocks: int = 4
    downsample: str = "stride"
    head: str = "flatten"
    head_init: str = "lecun_normal"
    film_position: str = "pre_pool"

    @classmethod
    def check(cls, m: Any, cfg: Any) -> None:
        super().check(m, cfg)
        need(m.filters >= 1, "model.filters", m.filters, ">= 1")
        need(m.blocks >= 1, "model.blocks", m.blocks, ">= 1")
        one_of(m.downsample, "model.downsample", ("stride", "maxpool"))
        one_of(m.head, "model.head", ("flatten", "spatial_mean"))
        one_of(m.head_init, "model.head_init", HEAD_INITS)
        one_of(m.film_position, "model.film_position", ("pre_pool", "post_pool"))


@schema("model", "resnet12")
@dataclass
class ResNet12Config(ConvNetworkConfig):
    """channels of its residual stages (each halves the resolution); the head always averages
    the last feature map over space."""

    channels: list[int] = field(default_factory=lambda: [64, 160, 320, 640])

    @classmethod
    def check(cls, m: Any, cfg: Any) -> None:
        super().check(m, cfg)
        need(
            len(m.channels) >= 1 and all(c >= 1 for c in m.channels),
            "model.channels",
            list(m.channels),
            "sizes >= 1",
        )


class Model(NamedTuple):
    """A model as two pure functions.

    init(key) -> params; apply(params, x, context=None) -> predictions,
    x: (B, *input_shape) -> (B, out). ``context`` (context_size,) is only accepted by a
    context-conditioned model (context_size > 0), where None means the zero context.

    moments: None (BatchNorm with batch statistics), or per-layer ``{"mean", "var"}`` that
    every BatchNorm normalises with instead (:func:`normalising_with`); sink: None, or a list
    to which each ``apply`` appends the batch moments of every BatchNorm layer
    (:func:`recording`); input_shape: x's shape without the batch axis.
    """

    init: Callable[[jax.Array], Params]
    apply: Callable[..., jax.Array]
    module: nn.Module
    context_size: int = 0
    moments: Any = None
    sink: list | None = None
    input_shape: tuple[int, ...] = ()


def make_model(cfg: Any, input_shape: tuple[int, ...], output_dim: int, context_size: int = 0) -> Model:
    """Build the model named by ``cfg.name`` (its schema above): mlp, conv4 or resnet12.

    mlp uses ``hidden``; conv4 ``filters``, ``blocks``, ``downsample``, ``conv_impl``, ``head``,
    ``head_init``, ``film_position``; resnet12 ``channels`` and ``conv_impl``; both
    ``pool_impl``, ``bn_scale`` and ``bn_epsilon``. ``compute_dtype`` ("float32" or "bfloat16")
    applies to all (see the module docstring).

    context_size > 0 builds the context-conditioned variant (CAVIA): the MLP concatenates
    the context to its input; Conv4 applies FiLM after the third block (the last block if
    there are fewer), ResNet-12 after the third stage's residual addition (the last stage
    if there are fewer). With context_size = 0 the parameters are exactly the plain model's.
    """
    if context_size < 0:
        raise ValueError(f"context_size must be >= 0, got {context_size}")
    compute_dtype = cfg.compute_dtype
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"unknown compute_dtype {compute_dtype!r}: use one of {sorted(COMPUTE_DTYPES)}")
    dtype = COMPUTE_DTYPES[compute_dtype]
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
            pool_impl=cfg.pool_impl,
            context_size=context_size,
            film_block=min(2, cfg.blocks - 1),
            film_position=cfg.film_position,
            head=cfg.head,
            head_init=cfg.head_init,
            bn_scale=cfg.bn_scale,
            bn_epsilon=cfg.bn_epsilon,
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
            pool_impl=cfg.pool_impl,
            context_size=context_size,
            film_stage=min(2, len(channels) - 1),
            dtype=dtype,
            bn_scale=cfg.bn_scale,
            bn_epsilon=cfg.bn_epsilon,
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
    twin = model.module.clone(context_size=context_size)
    return _wrap(twin, input_shape, context_size, model.moments, model.sink)


def with_outputs(model: Model, out: int) -> Model:
    """``model``'s architecture with ``out`` outputs (its ``head`` layer resized; the
    supervised pre-training's C training classes, metalearn/algos/pretrain.py)."""
    return _wrap(
        model.module.clone(out=out), model.input_shape, model.context_size, model.moments, model.sink
    )


def with_padded_rows(model: Model, row_chunk: int) -> Model:
    """``model`` for inputs with padded rows (variable episodes, metalearn/episodes.py): a
    row that is all NaN is replaced by zeros and left out of every BatchNorm's batch moments,
    so it changes no real row's output; computed in chunks of ``row_chunk`` rows
    (metalearn/rows.py; 0: at once). Same parameters as ``model``."""
    module = model.module.clone(padded_rows=True, row_chunk=row_chunk)
    return _wrap(module, model.input_shape, model.context_size, model.moments, model.sink)


def without_row_chunks(model: Model) -> Model:
    """``model`` (with padded rows) computing its whole batch at once: for batches of one
    row (a query classified on its own, metalearn/batchnorm.py), one shape in any episode,
    where chunks (metalearn/rows.py) would only add 2 x ROW_CHUNK - 1 rows of zeros."""
    return _wrap(
        model.module.clone(row_chunk=0), model.input_shape, model.context_size, model.moments, model.sink
    )


def normalising_with(model: Model, moments: Any) -> Model:
    """``model`` whose BatchNorm layers normalise with ``moments`` (per layer ``{"mean",
    "var"}``, each (F,), shaped like a :func:`recording`'s record) instead of the batch's."""
    return _wrap(model.module, model.input_shape, model.context_size, moments, model.sink)


def recording(model: Model, sink: list) -> Model:
    """``model`` whose ``apply`` also appends to ``sink`` the moments of every BatchNorm layer's
    input (per layer ``{"mean", "var", "count"}``; var biased, count the elements per feature),
    as plain arrays of the caller's trace: read them in the function that called ``apply``."""
    return _wrap(model.module, model.input_shape, model.context_size, model.moments, sink)


def _wrap(
    module: nn.Module,
    input_shape: tuple[int, ...],
    context_size: int,
    moments: Any = None,
    sink: list | None = None,
) -> Model:
    dummy = jnp.zeros((2, *input_shape), jnp.float32)

    def init(key: jax.Array) -> Params:
        return module.init(key, dummy)["params"]

    def apply(params: Params, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        if context is not None and not context_size:
            raise ValueError("this model takes no context (built with context_size=0)")
        variables = {"params": params} if moments is None else {"params": params, GIVEN_MOMENTS: moments}
        if sink is None:
            return module.apply(variables, x, context)
        out, recorded = module.apply(variables, x, context, mutable=[RECORDED_MOMENTS])
        sink.append(recorded[RECORDED_MOMENTS])
        return out

    return Model(init, apply, module, context_size, moments, sink, tuple(input_shape))


def is_norm_param(path: tuple[Any, ...]) -> bool:
    """Whether a parameter's key path (``jax.tree_util`` keys) lies in a BatchNorm subtree
    (``norm_*`` or ``shortcut_norm``, as in Conv4 and ResNet-12)."""
    for entry in path:
        name = str(getattr(entry, "key", getattr(entry, "name", entry)))
        if name.startswith("norm_") or name == "shortcut_norm":
            return True
    return False


__all__ = [
    "FiLM",
    "Model",
    "batch_stat_norm",
    "conv3x3_im2col",
    "conv3x3_xla",
    "is_norm_param",
    "make_model",
    "normalising_with",
    "recording",
    "with_padded_rows",
    "without_row_chunks",
    "with_context",
    "with_outputs",
]
