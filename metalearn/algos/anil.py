"""ANIL, Almost No Inner Loop (Raghu et al., 2020): MAML that adapts only the head.

Split the parameters into the body theta_b (every subtree but ``head``) and the final
linear layer theta_h (the subtree named ``head`` in both the MLP and Conv4). For a task
with support S and query Q, the inner loop updates only the head:

    h_0 = theta_h,   h_{i+1} = h_i - alpha * grad_h L_S(theta_b, h_i),

and the outer objective, the mean over tasks of L_Q(theta_b, h_k), is minimised over all
of theta = (theta_b, theta_h), differentiating through the head updates (second order:
they depend on theta_b through the features and on theta_h); ``algo.first_order`` stops
the gradient through grad_h L_S. The inner gradients are w.r.t. the head only, so their
backward pass stops at the features (the forward pass still runs the whole network).

``algo.inner_loss``/``outer_loss`` apply as in MAML (metalearn/algos/maml.py).

State: meta_params = the model's parameter pytree; adapted = the adapted ``head`` subtree.
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
    gradient_of_mean,
    inner_sgd,
    loss_reductions,
    stateless_learner,
)
from metalearn.config import schema
from metalearn.tasks import Task


@schema("algo", "anil")
@dataclass
class ANILConfig(DifferentiatedInnerLoopConfig, LossReductionsConfig):
    """MAML's inner-loop keys for the head alone (no adapt_bn: only the head is adapted)."""

    @classmethod
    def check(cls, a: Any, cfg: Any) -> None:
        DifferentiatedInnerLoopConfig.check(a, cfg)
        LossReductionsConfig.check(a, cfg)


HEAD = "head"


def _head(params: Any) -> Any:
    if HEAD not in params:
        raise ValueError(f"ANIL needs a top-level {HEAD!r} parameter subtree; got {sorted(params)}")
    return params[HEAD]


def _with_head(params: Any, head: Any) -> Any:
    return {**params, HEAD: head}


def make_anil(cfg: Any, problem: Problem) -> MetaLearner:
    """cfg: an ANILConfig."""
    model, source = problem.model, problem.source
    losses = loss_reductions(cfg, source)

    def adapt(params: Any, support_x: jax.Array, support_y: jax.Array, key: jax.Array, steps: int) -> Any:
        del key
        return inner_sgd(
            lambda h: losses.support(problem.loss(_with_head(params, h), support_x, support_y), support_x),
            _head(params),
            cfg.inner_lr,
            steps,
            first_order=cfg.first_order,
            remat=cfg.remat,
        )

    def predict(params: Any, head: Any, x: jax.Array) -> jax.Array:
        return model.apply(_with_head(params, head), x)

    def task_loss(params: Any, task: Task, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        head = adapt(params, task.support_x, task.support_y, key, cfg.inner_steps)
        pred = predict(params, head, task.query_x)
        loss = losses.query(source.loss(pred, task.query_y), task.query_x, task.support_x)
        return loss, source.metric(pred, task.query_y)

    return stateless_learner(
        init=model.init,
        meta_grad=gradient_of_mean(task_loss, source.metric_name),
        adapt=adapt,
        predict=predict,
    )
