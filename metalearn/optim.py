"""The outer (meta) optimizer, built from an OptimConfig with optax."""

from __future__ import annotations

from typing import Any

import optax


def make_optimizer(cfg: Any, total_steps: int) -> optax.GradientTransformation:
    """Adam or SGD(+momentum), optional warmup / cosine schedule and global-norm clipping."""
    if cfg.schedule == "cosine":
        decay_steps = max(total_steps, cfg.warmup_steps + 1)
        lr: Any = optax.warmup_cosine_decay_schedule(
            init_value=0.0 if cfg.warmup_steps else cfg.lr,
            peak_value=cfg.lr,
            warmup_steps=cfg.warmup_steps,
            decay_steps=decay_steps,
            end_value=cfg.lr * cfg.final_lr_fraction,
        )
    elif cfg.warmup_steps:
        lr = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    else:
        lr = cfg.lr
    opt = optax.adam(lr) if cfg.name == "adam" else optax.sgd(lr, momentum=cfg.momentum or None)
    if cfg.clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt
