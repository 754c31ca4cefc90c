"""ProtoMAML (Triantafillou et al., 2020, "Meta-Dataset"): MAML whose linear output layer
is initialised, per task, from Prototypical Networks' prototypes.

With the embedding f_theta (the model without ``head``, see metalearn/algos/protonet.py)
and the prototypes c_k of the support set, the squared distance expands as

    -||f(x) - c_k||^2 = 2 c_k . f(x) - ||c_k||^2 - ||f(x)||^2,

and the last term is the same for every class, so a linear layer with W_k = 2 c_k and
b_k = -||c_k||^2 gives exactly ProtoNet's softmax. ProtoMAML starts each task from that
layer and then fine-tunes embedding and layer together with MAML's inner loop,

    (theta'_0, W_0, b_0) = (theta, 2C, -||C||^2),
    (theta'_{i+1}, W_{i+1}, b_{i+1}) = (...)_i - alpha * grad L_S(theta'_i, W_i, b_i),

and the outer objective is the mean over tasks of L_Q(theta'_k, W_k, b_k). By default
(``algo.first_order=true``, as in the paper) the inner gradients are constants; the
meta-gradient still flows into theta through the prototypes of the initial layer.
Meta-Dataset's learner keeps BatchNorm's scale and offset fixed in the inner loop
(``adapt_batch_norm=False``); here they are adapted with the other embedding parameters,
as in this project's MAML.

Labels with no support example (see protonet.py) get W_k = 0 and b_k = ``MASKED_LOGIT``:
their probability, and so their gradient, is exactly 0 throughout the inner loop.

State: meta_params = the model's parameters without ``head``; adapted = (embedding
parameters, head {"kernel": (D, Ns), "bias": (Ns,)}).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from metalearn.algos.base import (
    DifferentiatedInnerLoopConfig,
    MetaLearner,
    Problem,
    gradient_of_mean,
    inner_sgd,
    stateless_learner,
)
from metalearn.algos.protonet import MASKED_LOGIT, embed, embedding_params, prototypes
from metalearn.config import schema
from metalearn.rows import map_rows
from metalearn.tasks import Task


@schema("algo", "protomaml")
@dataclass
class ProtoMAMLConfig(DifferentiatedInnerLoopConfig):
    """MAML's inner-loop keys (the head starts from the support prototypes)."""


def proto_head(centers: jax.Array, present: jax.Array) -> dict[str, jax.Array]:
    """The linear layer equivalent to ProtoNet's distances: kernel (D, Ns) = 2 C^T, bias
    (Ns,) = -||c_k||^2; absent labels: kernel 0, bias MASKED_LOGIT."""
    kernel = jnp.where(present[None, :], 2.0 * centers.T, 0.0)
    bias = jnp.where(present, -jnp.sum(jnp.square(centers), axis=-1), MASKED_LOGIT)
    return {"kernel": kernel, "bias": bias}


def make_protomaml(cfg: Any, problem: Problem) -> MetaLearner:
    """cfg: a ProtoMAMLConfig."""
    model, source = problem.model, problem.source
    # A padded episode (metalearn/episodes.py): max_ways prototypes, in chunks of rows.
    ways, chunk = (source.output_dim, source.row_chunk) if source.padded else (None, 0)

    def logits(adapted: tuple[Any, dict[str, jax.Array]], x: jax.Array) -> jax.Array:
        params, head = adapted
        return map_rows(lambda z: z @ head["kernel"] + head["bias"], embed(model, params, x), chunk)

    def adapt(params: Any, support_x: jax.Array, support_y: jax.Array, key: jax.Array, steps: int) -> Any:
        del key
        head = proto_head(*prototypes(embed(model, params, support_x), support_y, ways, chunk))
        return inner_sgd(
            lambda a: source.loss(logits(a, support_x), support_y),
            (params, head),
            cfg.inner_lr,
            steps,
            first_order=cfg.first_order,
            remat=cfg.remat,
        )

    def predict(params: Any, adapted: Any, x: jax.Array) -> jax.Array:
        del params
        return logits(adapted, x)

    def task_loss(params: Any, task: Task, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        adapted = adapt(params, task.support_x, task.support_y, key, cfg.inner_steps)
        pred = logits(adapted, task.query_x)
        return source.loss(pred, task.query_y), source.metric(pred, task.query_y)

    return stateless_learner(
        init=lambda key: embedding_params(model, key),
        meta_grad=gradient_of_mean(task_loss, source.metric_name),
        adapt=adapt,
        predict=predict,
    )
