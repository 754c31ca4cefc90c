"""The outer (meta) optimizer, built from an OptimConfig with optax."""

from __future__ import annotations

from typing import Any

import optax


def make_optimizer(cfg: Any, total_steps: int) -> optax.GradientTransformation:
    """Adam or SGD(+momentum), optional warmup / cosine or linear decay and global-norm clipping."""
    if cfg.schedule == "cosine":
        decay_steps = max(total_steps, cfg.warmup_steps + 1)
        lr: Any = optax.warmup_cosine_decay_schedule(
            init_value=0.0 if cfg.warmup_steps else cfg.lr,
            peak_value=cfg.lr,
            warmup_steps=cfg.warmup_steps,
            decay_steps=decay_steps,
            end_value=cfg.lr * cfg.final_lr_fraction,
        )
    elif cfg.schedule == "linear":
        # lr * (1 - s / total_steps) + lr * final_lr_fraction * s / total_steps at update s
        # (supervised-reptile's meta step size, supervised_reptile/train.py), after warmup.
        w = cfg.warmup_steps
        lr = optax.linear_schedule(cfg.lr, cfg.lr * cfg.final_lr_fraction, max(total_steps - w, 1))
        if w:
            lr = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, w), lr], [w])
    elif cfg.warmup_steps:
        lr = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    else:
        lr = cfg.lr
    opt = optax.adam(lr) if cfg.name == "adam" else optax.sgd(lr, momentum=cfg.momentum or None)
    if cfg.clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt
