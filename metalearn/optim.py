"""The outer (meta) optimizer, built from an OptimConfig with optax."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def make_schedule(cfg: Any, total_steps: int) -> Any:
    """The outer learning rate: a float (constant) or an optax schedule of the step count.

    "cosine": (optional linear warmup, then) cosine decay to lr * final_lr_fraction over
    ``total_steps``. "linear": (warmup, then) a straight line from lr to lr *
    final_lr_fraction over ``total_steps`` (supervised-reptile's meta step size,
    supervised_reptile/train.py). "step": lr * decay_rate ** floor(step / decay_every), a
    staircase as CAVIA's ``torch.optim.lr_scheduler.StepLR(optimiser, 5000, 0.9)``
    (classification/main.py), after an optional linear warmup. "constant": lr (after the
    optional warmup).
    """
    schedule = getattr(cfg, "schedule", "constant")
    if schedule == "cosine":
        decay_steps = max(total_steps, cfg.warmup_steps + 1)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if cfg.warmup_steps else cfg.lr,
            peak_value=cfg.lr,
            warmup_steps=cfg.warmup_steps,
            decay_steps=decay_steps,
            end_value=cfg.lr * cfg.final_lr_fraction,
        )
    if schedule == "linear":
        # lr * (1 - s / total_steps) + lr * final_lr_fraction * s / total_steps at update s.
        w = cfg.warmup_steps
        line = optax.linear_schedule(cfg.lr, cfg.lr * cfg.final_lr_fraction, max(total_steps - w, 1))
        if not w:
            return line
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, w), line], [w])
    if schedule == "step":
        decay = optax.exponential_decay(
            cfg.lr, transition_steps=cfg.decay_every, decay_rate=cfg.decay_rate, staircase=True
        )
        if not cfg.warmup_steps:
            return decay
        warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
        return optax.join_schedules([warmup, decay], [cfg.warmup_steps])
    if cfg.warmup_steps:
        return optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return cfg.lr


def make_optimizer(cfg: Any, total_steps: int) -> optax.GradientTransformation:
    """Adam or SGD(+momentum) with the learning rate of :func:`make_schedule`.

    Before the optimizer, in this order: ``clip_value`` clamps every meta-gradient entry to
    [-clip_value, clip_value] (cbfinn/maml's ``tf.clip_by_value(grad, -10, 10)`` for
    mini-ImageNet in maml.py; CAVIA's ``param.grad.data.clamp_(-10, 10)`` in
    classification/main.py), then ``clip_norm`` rescales the whole meta-gradient to at most
    that global norm. Either null: off. Then ``weight_decay`` adds ``weight_decay * param`` to
    the gradient of every kernel (leaf of 2+ dimensions), so that the optimizer sees the
    gradient of loss + (weight_decay / 2) ||kernels||^2: L2 regularisation coupled with the
    optimizer, as meta-dataset's ``tf.keras.regularizers.L2`` on its conv and dense kernels
    added to the loss (models/functional_backbones.py weight_variable, trainer.py), not
    decoupled (AdamW-style) decay. 0.0: off.
    """
    lr = make_schedule(cfg, total_steps)
    opt = (
        optax.adam(lr, eps=getattr(cfg, "eps", 1e-8))
        if cfg.name == "adam"
        else optax.sgd(lr, momentum=cfg.momentum or None)
    )
    before = []
    if getattr(cfg, "clip_value", None) is not None:
        before.append(optax.clip(cfg.clip_value))
    if cfg.clip_norm is not None:
        before.append(optax.clip_by_global_norm(cfg.clip_norm))
    if getattr(cfg, "weight_decay", 0.0):
        before.append(optax.add_decayed_weights(cfg.weight_decay, mask=_kernels))
    return optax.chain(*before, opt) if before else opt


def _kernels(params: Any) -> Any:
    """True for every leaf of 2+ dimensions (conv and dense kernels), False for biases,
    BatchNorm scale/offset and scalars."""
    return jax.tree_util.tree_map(lambda leaf: jnp.ndim(leaf) >= 2, params)
