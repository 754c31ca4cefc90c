"""CAML: context adaptation, as CAVIA (Zintgraf et al., 2019, "Fast Context Adaptation via
Meta-Learning").

The network f(x; theta, phi) takes, besides the shared parameters theta, a small context
vector phi (C,). For the MLP phi is concatenated to the input; for Conv4 it drives a FiLM
layer after the third block (see metalearn/models.py). For a task with support S and query
Q, the inner loop adapts only the context, always starting from zero:

    phi_0 = 0,   phi_{i+1} = phi_i - alpha * grad_phi L_S(theta, phi_i),

and the outer objective is the mean over tasks of L_Q(theta, phi_k), minimised over theta
only: the context is per-task state, never a meta-parameter. Its gradient w.r.t. theta
has a direct term and one through phi_k(theta) (second order: Hessian-vector products of
L_S); ``algo.first_order`` stops the gradient through grad_phi L_S, leaving the direct term.

alpha is ``algo.inner_lr`` (large: CAVIA uses 1.0, since phi starts at zero and is tiny),
C is ``algo.context_size``.

``algo.inner_loss``/``outer_loss`` apply as in MAML (metalearn/algos/maml.py).

State: meta_params = the context-conditioned model's parameter pytree (theta);
adapted = the task's context vector phi_k, shape (C,).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

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
from metalearn.config import need, schema
from metalearn.models import with_context
from metalearn.tasks import Task


@schema("algo", "caml")
@dataclass
class CAMLConfig(DifferentiatedInnerLoopConfig, LossReductionsConfig):
    """The inner-loop keys for the context (inner_lr is the context's lr) and context_size,
    the length of the per-task context vector."""

    context_size: int = 5

    @classmethod
    def check(cls, a: Any, cfg: Any) -> None:
        DifferentiatedInnerLoopConfig.check(a, cfg)
        LossReductionsConfig.check(a, cfg)
        need(a.context_size >= 1, "algo.context_size", a.context_size, ">= 1")


def make_caml(cfg: Any, problem: Problem) -> MetaLearner:
    """cfg: a CAMLConfig."""
    source = problem.source
    # The trainer builds the plain model; CAML needs its context-conditioned twin.
    model = with_context(problem.model, source.input_shape, cfg.context_size)
    losses = loss_reductions(cfg, source)

    def adapt(params: Any, support_x: jax.Array, support_y: jax.Array, key: jax.Array, steps: int) -> Any:
        del key
        context = jnp.zeros((cfg.context_size,), support_x.dtype)  # every task starts at zero
        return inner_sgd(
            lambda c: losses.support(source.loss(model.apply(params, support_x, c), support_y), support_x),
            context,
            cfg.inner_lr,
            steps,
            first_order=cfg.first_order,
            remat=cfg.remat,
        )

    def task_loss(params: Any, task: Task, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        context = adapt(params, task.support_x, task.support_y, key, cfg.inner_steps)
        pred = model.apply(params, task.query_x, context)
        loss = losses.query(source.loss(pred, task.query_y), task.query_x, task.support_x)
        return loss, source.metric(pred, task.query_y)

    def predict(params: Any, context: jax.Array, x: jax.Array) -> jax.Array:
        return model.apply(params, x, context)

    return stateless_learner(
        init=model.init,
        meta_grad=gradient_of_mean(task_loss, source.metric_name),
        adapt=adapt,
        predict=predict,
    )
