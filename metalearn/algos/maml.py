"""MAML (Finn et al., 2017) and its first-order approximation.

For a task with support set S and query set Q, the inner loop takes k gradient steps

    theta'_0 = theta,   theta'_{i+1} = theta'_i - alpha * grad L_S(theta'_i),

and the outer objective is the mean over tasks of L_Q(theta'_k). Its gradient with
respect to theta flows through every inner step (second order: it contains Hessian-vector
products of L_S). First-order MAML stops the gradient through grad L_S, so
d theta'_k / d theta = I and the meta-gradient is grad L_Q evaluated at theta'_k.

Switches (conf/algo/maml.yaml; docs/algorithms.md "Contested details"): ``algo.inner_loss`` /
``algo.outer_loss`` ("mean", or cbfinn/maml's "sum_over_shots": per-example cross-entropy
divided by K and summed, see :func:`~metalearn.algos.base.loss_scale`) and ``algo.adapt_bn``
(false: BatchNorm parameters are kept fixed in the inner loop and meta-learned only).

State: meta_params = the model's parameter pytree; adapted = a pytree of the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax

from metalearn.algos.base import (
    DifferentiatedInnerLoopConfig,
    LossReductionsConfig,
    MetaLearner,
    Problem,
    adapt_mask,
    gradient_of_mean,
    inner_sgd,
    loss_reductions,
    stateless_learner,
)
from metalearn.config import schema
from metalearn.tasks import Task


@schema("algo", "maml", "fomaml")
@dataclass
class MAMLConfig(DifferentiatedInnerLoopConfig, LossReductionsConfig):
    """MAML's keys (fomaml: the same with first_order forced on). adapt_bn false: BatchNorm
    parameters stay fixed in the inner loop (meta-learned only, as in cbfinn/maml)."""

    adapt_bn: bool = True

    @classmethod
    def check(cls, a: Any, cfg: Any) -> None:
        DifferentiatedInnerLoopConfig.check(a, cfg)
        LossReductionsConfig.check(a, cfg)


def make_maml(cfg: Any, problem: Problem) -> MetaLearner:
    """cfg: a MAMLConfig (or a subclass's: ADML, Meta-SGD reuse it)."""
    first_order = bool(cfg.first_order) or cfg.name == "fomaml"
    model, source = problem.model, problem.source

    losses = loss_reductions(cfg, source)
    adapt_bn = bool(cfg.adapt_bn)

    def adapt(params: Any, support_x: jax.Array, support_y: jax.Array, key: jax.Array, steps: int) -> Any:
        del key
        return inner_sgd(
            lambda p: losses.support(problem.loss(p, support_x, support_y), support_x),
            params,
            cfg.inner_lr,
            steps,
            first_order=first_order,
            remat=cfg.remat,
            adapt=adapt_mask(params, adapt_bn),
        )

    def task_loss(params: Any, task: Task, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        adapted = adapt(params, task.support_x, task.support_y, key, cfg.inner_steps)
        pred = model.apply(adapted, task.query_x)
        loss = losses.query(source.loss(pred, task.query_y), task.query_x, task.support_x)
        return loss, source.metric(pred, task.query_y)

    def predict(params: Any, adapted: Any, x: jax.Array) -> jax.Array:
        del params
        return model.apply(adapted, x)

    return stateless_learner(
        init=model.init,
        meta_grad=gradient_of_mean(task_loss, source.metric_name),
        adapt=adapt,
        predict=predict,
    )
