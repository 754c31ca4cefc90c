"""The interface every meta-learning algorithm implements, and shared pieces.

An algorithm is a handful of pure functions over pytrees (in the spirit of optax's
``GradientTransformation``). The trainer only ever calls these; it never looks inside.

Shapes: a ``Task`` holds support x: (Ns, *input), y: (Ns, ...) and query x: (Nq, *input);
a *batch* of tasks is the same with a leading task axis (T, N, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from metalearn.models import Model
from metalearn.tasks import Task, TaskSource

PyTree = Any
Metrics = dict[str, jax.Array]


class Problem(NamedTuple):
    """What an algorithm needs to know about the model and the task distribution."""

    model: Model
    source: TaskSource

    def loss(self, params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
        return self.source.loss(self.model.apply(params, x), y)


def _no_state(meta_params: PyTree) -> PyTree:
    del meta_params
    return ()


class MetaLearner(NamedTuple):
    """A meta-learning algorithm as pure functions.

    init(key) -> meta_params: everything the outer optimizer trains.
    meta_grad(meta_params, tasks, key) -> (grads like meta_params, metrics): the outer
        (pseudo-)gradient for a batch of tasks (leading axis T); metrics are scalars and
        include ``loss`` and the task metric (``accuracy`` or ``mse``) on the query sets.
    adapt(meta_params, support_x, support_y, key, steps) -> adapted: the task-specific state
        after ``steps`` inner steps (``steps`` is a Python int).
    predict(meta_params, adapted, x) -> predictions for x: (N, *input).

    Optional, for algorithms whose meta-step needs more than the meta-parameters:
    init_state(meta_params) -> algo_state: state carried from meta-step to meta-step and
        into evaluation, but not trained by the outer optimizer (Reptile's inner Adam
        moments). It is checkpointed with the parameters. Default: ``()``.
    meta_grad_stateful(meta_params, algo_state, tasks, key, step) -> (grads, algo_state,
        metrics): used instead of ``meta_grad`` when given; ``step`` is the number of
        meta-steps completed (int32 scalar, traced), for objectives that change during
        training (MAML++'s loss weights and derivative order).
    adapt_stateful(meta_params, algo_state, support_x, support_y, key, steps) -> adapted:
        used instead of ``adapt`` when given.

    The trainer, evaluator and ``predict`` call only :meth:`initial_state`,
    :meth:`step_grad` and :meth:`adapt_with`, which fall back to the stateless functions.
    """

    init: Callable[[jax.Array], PyTree]
    meta_grad: Callable[[PyTree, Task, jax.Array], tuple[PyTree, Metrics]]
    adapt: Callable[[PyTree, jax.Array, jax.Array, jax.Array, int], PyTree]
    predict: Callable[[PyTree, PyTree, jax.Array], jax.Array]
    init_state: Callable[[PyTree], PyTree] = _no_state
    meta_grad_stateful: Callable[..., tuple[PyTree, PyTree, Metrics]] | None = None
    adapt_stateful: Callable[..., PyTree] | None = None

    def initial_state(self, meta_params: PyTree) -> PyTree:
        return self.init_state(meta_params)

    def step_grad(
        self, meta_params: PyTree, algo_state: PyTree, tasks: Task, key: jax.Array, step: jax.Array
    ) -> tuple[PyTree, PyTree, Metrics]:
        """(grads, new algo_state, metrics) of the meta-step from ``step`` completed steps."""
        if self.meta_grad_stateful is not None:
            return self.meta_grad_stateful(meta_params, algo_state, tasks, key, step)
        grads, metrics = self.meta_grad(meta_params, tasks, key)
        return grads, algo_state, metrics

    def adapt_with(
        self,
        meta_params: PyTree,
        algo_state: PyTree,
        support_x: jax.Array,
        support_y: jax.Array,
        key: jax.Array,
        steps: int,
    ) -> PyTree:
        """Adapt to one task, from the carried ``algo_state`` where the algorithm has one."""
        if self.adapt_stateful is not None:
            return self.adapt_stateful(meta_params, algo_state, support_x, support_y, key, steps)
        return self.adapt(meta_params, support_x, support_y, key, steps)


def inner_sgd(
    loss_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    lr: float | PyTree,
    steps: int,
    *,
    first_order: bool = False,
    remat: bool = False,
) -> PyTree:
    """``steps`` plain gradient steps ``p <- p - lr * grad(loss_fn)(p)`` under ``lax.scan``.

    lr: a scalar, or a pytree shaped like ``params`` (per-parameter rates, Meta-SGD).
    first_order: stop the gradient through each inner gradient, dropping the second-order
        terms of the meta-gradient (the updates still depend on params through ``p``).
    remat: recompute each inner step in the backward pass instead of storing it.
    """
    if steps == 0:
        return params
    lr_tree = lr if isinstance(lr, dict) else jax.tree.map(lambda _: lr, params)

    def step(p: PyTree, _: None) -> tuple[PyTree, None]:
        g = jax.grad(loss_fn)(p)
        if first_order:
            g = lax.stop_gradient(g)
        return jax.tree.map(lambda w, gw, a: w - a * gw, p, g, lr_tree), None

    if remat:
        step = jax.checkpoint(step)
    params, _ = lax.scan(step, params, None, length=steps)
    return params


def mean_over_tasks(
    task_loss: Callable[[PyTree, Task, jax.Array], tuple[jax.Array, jax.Array]],
    meta_params: PyTree,
    tasks: Task,
    key: jax.Array,
    metric_name: str,
) -> tuple[jax.Array, Metrics]:
    """Mean of ``task_loss`` over a batch of tasks, vmapped; returns (loss, metrics)."""
    keys = jax.random.split(key, tasks.support_x.shape[0])
    losses, task_metrics = jax.vmap(task_loss, in_axes=(None, 0, 0))(meta_params, tasks, keys)
    loss = jnp.mean(losses)
    return loss, {"loss": loss, metric_name: jnp.mean(task_metrics)}


def gradient_of_mean(
    task_loss: Callable[[PyTree, Task, jax.Array], tuple[jax.Array, jax.Array]], metric_name: str
) -> Callable[[PyTree, Task, jax.Array], tuple[PyTree, Metrics]]:
    """meta_grad for algorithms whose outer objective is the mean per-task loss."""

    def meta_grad(meta_params: PyTree, tasks: Task, key: jax.Array) -> tuple[PyTree, Metrics]:
        (_, metrics), grads = jax.value_and_grad(
            lambda p: mean_over_tasks(task_loss, p, tasks, key, metric_name), has_aux=True
        )(meta_params)
        return grads, metrics

    return meta_grad
