"""Meta-SGD (Li et al., 2017): MAML with a meta-learned learning rate per parameter.

For a task with support S and query Q, the inner loop is

    theta'_0 = theta,   theta'_{i+1} = theta'_i - alpha (*) grad L_S(theta'_i),

where alpha has the shape of theta and (*) is the elementwise product. The outer objective,
the mean over tasks of L_Q(theta'_k), is minimised over both theta and alpha; the
gradient w.r.t. alpha is -sum_i grad L_S(theta'_i) (*) (the query gradient carried back to
step i), so the rates are learned even with ``algo.first_order`` (which, as in MAML, only
stops the gradient through grad L_S).

alpha starts at ``algo.inner_lr`` everywhere (the paper draws it uniformly from
[0.005, 0.1]); a constant start makes step 0 of Meta-SGD exactly MAML at the dataset's
inner lr, so the two are comparable from the same initialisation.

``algo.inner_loss``/``outer_loss``/``adapt_bn`` apply as in MAML (metalearn/algos/maml.py).

State: meta_params = {"params": model parameter pytree, "lrs": pytree of the same shapes};
adapted = a model parameter pytree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from metalearn.algos.base import (
    MetaLearner,
    Problem,
    adapt_mask,
    gradient_of_mean,
    inner_sgd,
    loss_reductions,
    stateless_learner,
)
from metalearn.algos.maml import MAMLConfig
from metalearn.config import schema
from metalearn.tasks import Task


@schema("algo", "metasgd")
@dataclass
class MetaSGDConfig(MAMLConfig):
    """MAML's keys; inner_lr is the initial value of every per-parameter rate."""


def make_metasgd(cfg: Any, problem: Problem) -> MetaLearner:
    """cfg: a MetaSGDConfig."""
    model, source = problem.model, problem.source
    losses = loss_reductions(cfg, source)
    adapt_bn = bool(cfg.adapt_bn)

    def init(key: jax.Array) -> Any:
        params = model.init(key)
        lrs = jax.tree.map(lambda p: jnp.full_like(p, cfg.inner_lr), params)
        return {"params": params, "lrs": lrs}

    def adapt(meta: Any, support_x: jax.Array, support_y: jax.Array, key: jax.Array, steps: int) -> Any:
        del key
        return inner_sgd(
            lambda p: losses.support(problem.loss(p, support_x, support_y), support_x),
            meta["params"],
            meta["lrs"],
            steps,
            first_order=cfg.first_order,
            remat=cfg.remat,
            adapt=adapt_mask(meta["params"], adapt_bn),
        )

    def task_loss(meta: Any, task: Task, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        adapted = adapt(meta, task.support_x, task.support_y, key, cfg.inner_steps)
        pred = model.apply(adapted, task.query_x)
        loss = losses.query(source.loss(pred, task.query_y), task.query_x, task.support_x)
        return loss, source.metric(pred, task.query_y)

    def predict(meta: Any, adapted: Any, x: jax.Array) -> jax.Array:
        del meta
        return model.apply(adapted, x)

    return stateless_learner(
        init=init,
        meta_grad=gradient_of_mean(task_loss, source.metric_name),
        adapt=adapt,
        predict=predict,
    )
