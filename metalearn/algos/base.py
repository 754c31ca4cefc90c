"""The interface every meta-learning algorithm implements, and shared pieces.

An algorithm is a handful of pure functions over pytrees (in the spirit of optax's
``GradientTransformation``). The trainer only ever calls these; it never looks inside.

Shapes: a ``Task`` holds support x: (Ns, *input), y: (Ns, ...) and query x: (Nq, *input);
a *batch* of tasks is the same with a leading task axis (T, N, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from metalearn.config import ChoiceConfig, finite, need, one_of
from metalearn.models import Model, is_norm_param
from metalearn.tasks import Task, TaskSource

PyTree = Any
Metrics = dict[str, jax.Array]


@dataclass
class InnerLoopConfig(ChoiceConfig):
    """Keys of every algorithm that adapts by inner steps: their learning rate (algo.inner_lr,
    the context's lr for CAML, the initial per-parameter rate for Meta-SGD) and how many steps
    adapt a task in meta-training and at evaluation (validation, test, predict)."""

    inner_lr: float = 0.01
    inner_steps: int = 1
    inner_steps_test: int = 1

    @classmethod
    def check(cls, a: Any, cfg: Any) -> None:
        need(finite(a.inner_lr) and a.inner_lr > 0, "algo.inner_lr", a.inner_lr, "> 0")
        need(a.inner_steps >= 1, "algo.inner_steps", a.inner_steps, ">= 1")
        need(a.inner_steps_test >= 0, "algo.inner_steps_test", a.inner_steps_test, ">= 0")


@dataclass
class DifferentiatedInnerLoopConfig(InnerLoopConfig):
    """An inner loop the meta-gradient backpropagates through: ``first_order`` stops the
    gradient through each inner gradient; ``remat`` recomputes each inner step in the backward
    pass (saves memory, costs compute)."""

    first_order: bool = False
    remat: bool = False


LOSS_REDUCTIONS = ("mean", "sum_over_shots")


@dataclass
class LossReductionsConfig:
    """Loss reductions (docs, "Contested details"): "mean" over the examples, or cbfinn/maml's
    "sum_over_shots" (each example's cross-entropy / K, summed: N x the mean on the support
    set). inner_loss: the adaptation loss (training and test); outer_loss: the query loss of
    the meta-objective. Classification only."""

    inner_loss: str = "mean"
    outer_loss: str = "mean"

    @classmethod
    def check(cls, a: Any, cfg: Any) -> None:
        one_of(a.inner_loss, "algo.inner_loss", LOSS_REDUCTIONS)
        one_of(a.outer_loss, "algo.outer_loss", LOSS_REDUCTIONS)
        if variable_episodes(cfg):  # K shots per class: undefined in a variable-shot episode
            need(
                a.inner_loss == "mean",
                "algo.inner_loss",
                a.inner_loss,
                "'mean' with dataset.episodes=variable",
            )
            need(
                a.outer_loss == "mean",
                "algo.outer_loss",
                a.outer_loss,
                "'mean' with dataset.episodes=variable",
            )


def variable_episodes(cfg: Any) -> bool:
    """Whether the composed config samples variable (padded) episodes (metalearn/episodes.py)."""
    return getattr(cfg.dataset, "episodes", "fixed") == "variable"


class Problem(NamedTuple):
    """What an algorithm needs to know about the model and the task distribution."""

    model: Model
    source: TaskSource

    def loss(self, params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
        return self.source.loss(self.model.apply(params, x), y)


def no_state(meta_params: PyTree) -> PyTree:
    """``init_state`` of an algorithm that carries nothing between meta-steps: ``()``."""
    del meta_params
    return ()


class MetaLearner(NamedTuple):
    """A meta-learning algorithm as pure functions: the contract a new algorithm implements.

    As optax passes an optimizer's state, the trainer passes the algorithm's state
    explicitly, to every algorithm, whether it has one or not:

    init(key) -> meta_params: everything the outer optimizer trains.
    init_state(meta_params) -> algo_state: state carried from meta-step to meta-step and
        into evaluation, but not trained by the outer optimizer (Reptile's inner Adam
        moments); checkpointed with the parameters. ``()`` for an algorithm without one
        (:func:`no_state`).
    meta_grad(meta_params, algo_state, tasks, key, step) -> (grads like meta_params,
        algo_state, metrics): the outer (pseudo-)gradient for a batch of tasks (leading
        axis T) and the state for the next meta-step; metrics are scalars and include
        ``loss`` and the task metric (``accuracy`` or ``mse``) on the query sets. ``step``
        is the number of meta-steps completed (int32 scalar, traced), for objectives that
        change during training (MAML++'s loss weights and derivative order).
    adapt(meta_params, algo_state, support_x, support_y, key, steps) -> adapted: the
        task-specific state after ``steps`` inner steps on one task's support set
        (``steps`` is a Python int); ``algo_state`` is read, never changed.
    predict(meta_params, adapted, x) -> predictions for x: (N, *input).

    An algorithm without carried state writes meta_grad(meta_params, tasks, key) ->
    (grads, metrics) and adapt(meta_params, support_x, support_y, key, steps) and lifts
    them with :func:`stateless_learner`.
    """

    init: Callable[[jax.Array], PyTree]
    init_state: Callable[[PyTree], PyTree]
    meta_grad: Callable[[PyTree, PyTree, Task, jax.Array, jax.Array], tuple[PyTree, PyTree, Metrics]]
    adapt: Callable[[PyTree, PyTree, jax.Array, jax.Array, jax.Array, int], PyTree]
    predict: Callable[[PyTree, PyTree, jax.Array], jax.Array]


def stateless_learner(
    init: Callable[[jax.Array], PyTree],
    meta_grad: Callable[[PyTree, Task, jax.Array], tuple[PyTree, Metrics]],
    adapt: Callable[[PyTree, jax.Array, jax.Array, jax.Array, int], PyTree],
    predict: Callable[[PyTree, PyTree, jax.Array], jax.Array],
) -> MetaLearner:
    """The :class:`MetaLearner` of an algorithm that carries no state between meta-steps
    and whose objective does not depend on the meta-step: its ``algo_state`` is ``()``,
    passed through ``meta_grad`` unchanged and ignored by ``adapt``; ``step`` is unused."""

    def meta_grad_with_state(
        meta_params: PyTree, algo_state: PyTree, tasks: Task, key: jax.Array, step: jax.Array
    ) -> tuple[PyTree, PyTree, Metrics]:
        del step
        grads, metrics = meta_grad(meta_params, tasks, key)
        return grads, algo_state, metrics

    def adapt_with_state(
        meta_params: PyTree,
        algo_state: PyTree,
        support_x: jax.Array,
        support_y: jax.Array,
        key: jax.Array,
        steps: int,
    ) -> PyTree:
        del algo_state
        return adapt(meta_params, support_x, support_y, key, steps)

    return MetaLearner(
        init=init,
        init_state=no_state,
        meta_grad=meta_grad_with_state,
        adapt=adapt_with_state,
        predict=predict,
    )


def inner_sgd(
    loss_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    lr: float | PyTree,
    steps: int,
    *,
    first_order: bool = False,
    remat: bool = False,
    adapt: PyTree | None = None,
) -> PyTree:
    """``steps`` plain gradient steps ``p <- p - lr * grad(loss_fn)(p)`` under ``lax.scan``.

    lr: a scalar, or a pytree shaped like ``params`` (per-parameter rates, Meta-SGD).
    first_order: stop the gradient through each inner gradient, dropping the second-order
        terms of the meta-gradient (the updates still depend on params through ``p``).
    remat: recompute each inner step in the backward pass instead of storing it.
    adapt: None (every leaf is updated) or a pytree of Python bools shaped like ``params``;
        leaves marked False keep their value through the inner loop (still differentiable
        meta-parameters that the inner loss depends on), e.g. BatchNorm under
        ``algo.adapt_bn=false`` (:func:`adapt_mask`).
    """
    if steps == 0:
        return params
    lr_tree = lr if isinstance(lr, dict) else jax.tree.map(lambda _: lr, params)
    mask = jax.tree.map(lambda _: True, params) if adapt is None else adapt

    def step(p: PyTree, _: None) -> tuple[PyTree, None]:
        g = jax.grad(loss_fn)(p)
        if first_order:
            g = lax.stop_gradient(g)
        return jax.tree.map(lambda w, gw, a, m: w - a * gw if m else w, p, g, lr_tree, mask), None

    if remat:
        step = jax.checkpoint(step)
    params, _ = lax.scan(step, params, None, length=steps)
    return params


def adapt_mask(params: PyTree, adapt_bn: bool) -> PyTree | None:
    """The ``adapt`` argument of :func:`inner_sgd` for ``algo.adapt_bn``: None (adapt every
    parameter) when true; else False on BatchNorm parameters (``norm_*`` / ``shortcut_norm``
    subtrees), which are then meta-learned only, as in cbfinn/maml (its batch_norm variables
    are not among the fast weights, maml.py) and CAVIA."""
    if adapt_bn:
        return None
    return jax.tree_util.tree_map_with_path(lambda path, _: not is_norm_param(path), params)


def loss_scale(reduction: str, n_examples: int, n_support: int, n_way: int) -> float:
    """Factor turning the mean loss over ``n_examples`` into ``reduction``.

    "mean": 1. "sum_over_shots": cbfinn/maml's classification loss (utils.py ``xent``):
    each example's cross-entropy divided by K (``update_batch_size``, the shots per class,
    K = n_support / n_way), summed over the examples (``tf.gradients`` of the per-example
    vector in the inner loop; ``reduce_sum`` in the outer loss), i.e. n_examples / K times
    the mean. For the support set that is N (n_way) times the mean, so alpha = 0.4 there is
    alpha = 2.0 on a mean loss for 5-way.
    """
    if reduction == "mean":
        return 1.0
    if reduction == "sum_over_shots":
        return n_examples * n_way / n_support
    raise ValueError(f"unknown loss reduction {reduction!r}; expected one of {LOSS_REDUCTIONS}")


def reductions(cfg: Any) -> tuple[str, str]:
    """(inner, outer) loss reductions of an AlgoConfig (``algo.inner_loss``/``outer_loss``)."""
    return cfg.inner_loss, cfg.outer_loss


def scaled(loss: jax.Array, reduction: str, x: jax.Array, support_x: jax.Array, n_way: int) -> jax.Array:
    """``loss`` (a mean over the rows of ``x``) under ``reduction``; K from ``support_x``."""
    if reduction == "mean":
        return loss
    return loss * loss_scale(reduction, x.shape[0], support_x.shape[0], n_way)


class Reductions(NamedTuple):
    """An AlgoConfig's ``algo.inner_loss``/``outer_loss`` bound to the task's way count.

    Each method takes ``loss``, a mean over the rows of its examples, and returns it under
    the reduction; K (shots) is read from support_x: (Ns, *input).
    """

    inner: str
    outer: str
    n_way: int

    def support(self, loss: jax.Array, support_x: jax.Array) -> jax.Array:
        """The inner-loop loss on support_x: (Ns, *input)."""
        return scaled(loss, self.inner, support_x, support_x, self.n_way)

    def query(self, loss: jax.Array, query_x: jax.Array, support_x: jax.Array) -> jax.Array:
        """The outer loss on query_x: (Nq, *input) of the task whose support is support_x."""
        return scaled(loss, self.outer, query_x, support_x, self.n_way)


def loss_reductions(cfg: Any, source: TaskSource) -> Reductions:
    """The loss reductions of AlgoConfig ``cfg`` for tasks from ``source``."""
    inner, outer = reductions(cfg)
    return Reductions(inner, outer, source.output_dim)


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
