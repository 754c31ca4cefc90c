"""Prototypical Networks (Snell et al., 2017).

An embedding f_theta (the model without its final ``head`` layer: Conv4's or ResNet-12's
flattened features) maps each image to a vector. For a task with support S, class k's
prototype is the mean embedding of its support examples,

    c_k = (1 / |S_k|) sum_{(x, y) in S, y = k} f_theta(x),

and a query x is classified by a softmax over negative squared Euclidean distances,

    logits_k(x) = -||f_theta(x) - c_k||^2.

There is no inner loop: adapting to a task is computing its prototypes (``steps`` is
ignored). The outer objective is the mean over tasks of the query cross-entropy; its
gradient flows through the query embeddings and the prototypes.

Support and query sets are embedded as two batches, so BatchNorm's batch statistics are
those of the support set for the prototypes and of the query set for the queries; with
``algo.joint_bn`` the training loss embeds them as one batch (the authors' code,
jakesnell/prototypical-networks protonets/models/few_shot.py:39-42), so both are normalised
with the episode's statistics. At evaluation ``model.bn_stats`` decides
(metalearn/batchnorm.py).

Training episodes may have more ways than test episodes (``dataset.n_way_train``, as in
the paper): the number of classes is not fixed by any parameter.

Labels are integers 0..n-1. The number of classes n is a trace-time constant that the
shapes do not give (n * k_shot = Ns), so logits have one column per support example, Ns:
column k is class k, and the columns of labels with no support example (k >= n when
k_shot > 1) hold ``MASKED_LOGIT``, a large negative number (their softmax probability is
exactly 0, so loss, gradient and argmax are those of the n real classes).

State: meta_params = the model's parameter pytree without ``head``; adapted = the
prototypes (Ns, D) and a mask (Ns,) of the classes present.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from metalearn.algos.base import MetaLearner, Problem, gradient_of_mean, stateless_learner
from metalearn.config import ChoiceConfig, schema
from metalearn.models import Model
from metalearn.rows import map_rows, sum_rows, with_real_rows_first
from metalearn.tasks import Task


@schema("algo", "protonet")
@dataclass
class ProtoNetConfig(ChoiceConfig):
    """No inner loop (dataset.n_way_train sets the training episodes' ways). joint_bn: the
    training loss embeds support and query as one batch (one set of BatchNorm statistics per
    episode, as the authors' code) instead of two."""

    joint_bn: bool = False


HEAD = "head"
# Logit of a label with no support example: exp(MASKED_LOGIT - any real logit) is 0.
MASKED_LOGIT = -1e30


def _skip_head(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
    """Flax method interceptor: the module named ``head`` returns its input unchanged."""
    if context.module.name == HEAD and context.method_name == "__call__":
        return args[0]
    return next_fun(*args, **kwargs)


def embedding_params(model: Model, key: jax.Array) -> Any:
    """The model's initial parameters without the ``head`` subtree."""
    params = model.init(key)
    if HEAD not in params:
        raise ValueError(f"the model needs a top-level {HEAD!r} layer to drop; got {sorted(params)}")
    return {k: v for k, v in params.items() if k != HEAD}


def embed(model: Model, params: Any, x: jax.Array) -> jax.Array:
    """The features the model's ``head`` would receive: x (B, *input) -> (B, D), in at least
    float32 (under mixed precision the features are up-cast, as the head's input is)."""
    with nn.intercept_methods(_skip_head):
        z = model.apply(params, x)
    return z.astype(jnp.promote_types(z.dtype, jnp.float32))


class Prototypes(NamedTuple):
    """centers: (Ns, D), row k the mean embedding of label k's support examples (0 if none);
    present: (Ns,) bool, whether label k has a support example."""

    centers: jax.Array
    present: jax.Array


def prototypes(z: jax.Array, y: jax.Array, ways: int | None = None, chunk: int = 0) -> Prototypes:
    """Class means of support embeddings z (Ns, D) with integer labels y (Ns,) in [0, ways)
    (-1: a padded row, in no class); ``ways`` None: Ns. ``chunk`` > 0: summed over chunks
    of rows (a padded episode, metalearn/rows.py)."""
    onehot = jax.nn.one_hot(y, z.shape[0] if ways is None else ways, dtype=z.dtype)  # example x label
    counts = onehot.sum(axis=0)
    sums = sum_rows(lambda rows: rows[0].T @ rows[1], (onehot, z), chunk)
    centers = sums / jnp.maximum(counts, 1.0)[:, None]
    return Prototypes(centers, counts > 0)


def distance_logits(z: jax.Array, protos: Prototypes, chunk: int = 0) -> jax.Array:
    """-||z_i - c_k||^2 for queries z (Nq, D): (Nq, ways), absent labels masked."""

    def logits(rows: jax.Array) -> jax.Array:
        d2 = jnp.sum(jnp.square(rows[:, None, :] - protos.centers[None, :, :]), axis=-1)
        return jnp.where(protos.present[None, :], -d2, MASKED_LOGIT)

    return map_rows(logits, z, chunk)


def make_protonet(cfg: Any, problem: Problem) -> MetaLearner:
    """cfg: a ProtoNetConfig."""
    joint_bn = bool(getattr(cfg, "joint_bn", False))
    model, source = problem.model, problem.source
    # A padded episode (metalearn/episodes.py): max_ways prototypes, in chunks of rows.
    ways, chunk = (source.output_dim, source.row_chunk) if source.padded else (None, 0)

    def adapt(params: Any, support_x: jax.Array, support_y: jax.Array, key: jax.Array, steps: int) -> Any:
        del key, steps
        return prototypes(embed(model, params, support_x), support_y, ways, chunk)

    def predict(params: Any, protos: Prototypes, x: jax.Array) -> jax.Array:
        return distance_logits(embed(model, params, x), protos, chunk)

    def episode_logits(params: Any, task: Task, key: jax.Array) -> jax.Array:
        if not joint_bn:
            return predict(params, adapt(params, task.support_x, task.support_y, key, 0), task.query_x)
        batch = jnp.concatenate([task.support_x, task.query_x])
        if chunk:  # real rows first, as row chunks need (metalearn/rows.py)
            z = with_real_rows_first(lambda b: embed(model, params, b), batch)
        else:
            z = embed(model, params, batch)
        n_support = task.support_x.shape[0]
        return distance_logits(z[n_support:], prototypes(z[:n_support], task.support_y, ways, chunk), chunk)

    def task_loss(params: Any, task: Task, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = episode_logits(params, task, key)
        return source.loss(logits, task.query_y), source.metric(logits, task.query_y)

    return stateless_learner(
        init=lambda key: embedding_params(model, key),
        meta_grad=gradient_of_mean(task_loss, source.metric_name),
        adapt=adapt,
        predict=predict,
    )
