"""BatchNorm statistics at evaluation (``model.bn_stats``), for every algorithm.

Conv4 and ResNet-12 normalise with the statistics of the batch they are given. Where that
batch is a task's query set, a query's prediction depends on the other queries classified
with it (transductive). ``model.bn_stats`` makes the choice explicit:

- ``batch`` (default): today's behaviour, unchanged; the algorithm's own functions are used.
- ``support``: each BatchNorm layer normalises with the moments (mean, biased variance) of
  that layer's input on the task's support set, under the parameters the algorithm adapted
  to it (meta-dataset's ProtoMAML). Adaptation itself is unchanged (the support set is its
  own batch).
- ``running``: every forward pass at evaluation (adaptation and prediction) normalises with
  running averages accumulated during training (ProtoNet's ``model.eval()``).
- ``support_query``: each query is classified in a batch of the support set and that one
  query, with that batch's statistics (supervised-reptile's non-transductive evaluation,
  ``reptile.py`` ``_test_predictions``: the support inputs plus one test input per run, the
  last row kept). Adaptation is unchanged.

Prediction in the three non-transductive modes classifies each query on its own (``lax.map``
over queries, each a batch of one): then a query's outputs are bitwise the same whatever
else is classified with it. (Classifying them as one batch is not: XLA:CPU computes a
one-row matmul by another kernel than a many-row one, so results differ in the last bits.)

Running averages (only for runs trained with ``bn_stats=running``; they live in the
algorithm's state, :class:`BatchNormState`, and so in the checkpoint): after each
meta-step's meta-gradient, the meta-parameters before the update are applied, through the
algorithm's own prediction function after 0 adaptation steps, to each task's support and
query examples as one batch (ProtoNet's code embeds the episode's support and query images
in one batch); each layer's batch mean and unbiased variance (PyTorch's running_var) enter
``r <- (1 - m) r + m * moment`` with m = ``model.bn_momentum``, task after task in the
meta-batch's order, from mean 0 and variance 1 (PyTorch's initial values). Training
itself is unchanged: every algorithm's inner loop and query loss keep batch statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from metalearn.algos import MetaLearner, Problem, make_algorithm
from metalearn.errors import ConfigError
from metalearn.models import Model, normalising_with, recording, without_row_chunks
from metalearn.rows import real_rows_first, with_real_rows_first
from metalearn.tasks import Task

PyTree = Any


class BatchNormState(NamedTuple):
    """The algorithm state of a run that keeps running averages: the algorithm's own state
    and the running moments (per BatchNorm layer ``{"mean", "var"}``, each (F,))."""

    algo: PyTree
    running: PyTree


def bn_stats_of(model_cfg: Any) -> str:
    """``model.bn_stats``; "batch" for a model without BatchNorm (the MLP has no such key)."""
    return str(getattr(model_cfg, "bn_stats", "batch"))


def moments_only(record: PyTree) -> PyTree:
    """A :func:`metalearn.models.recording` record without its ``count`` leaves."""
    if isinstance(record, dict) and "count" in record:
        return {"mean": record["mean"], "var": record["var"]}
    return {k: moments_only(v) for k, v in record.items()}


def update_running(running: PyTree, record: PyTree, momentum: float) -> PyTree:
    """One step ``r <- (1 - m) r + m * moment`` of the running moments with one batch's
    record (mean, biased var, count); the variance enters unbiased (var * n / (n - 1))."""
    if "count" in record:
        n = record["count"]
        unbiased = record["var"] * n / jnp.maximum(n - 1, 1)
        return {
            "mean": (1 - momentum) * running["mean"] + momentum * record["mean"],
            "var": (1 - momentum) * running["var"] + momentum * unbiased,
        }
    return {k: update_running(running[k], record[k], momentum) for k in running}


def initial_running(model: Model) -> PyTree:
    """Running moments before training: mean 0, variance 1 for every BatchNorm layer."""
    sink: list = []
    rec = recording(model, sink)

    def shapes() -> PyTree:
        rec.apply(model.init(jax.random.PRNGKey(0)), jnp.zeros((2, *model.input_shape), jnp.float32))
        return moments_only(sink[-1])

    return _fill(jax.eval_shape(shapes))


def _fill(struct: PyTree) -> PyTree:
    if "mean" in struct and not isinstance(struct["mean"], dict):
        return {
            "mean": jnp.zeros(struct["mean"].shape, jnp.float32),
            "var": jnp.ones(struct["var"].shape, jnp.float32),
        }
    return {k: _fill(v) for k, v in struct.items()}


def per_query(predict_one: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """``predict_one`` (x (1, *input) -> (1, out)) on each row of x (N, *input) on its own."""
    return lax.map(lambda row: predict_one(row[None])[0], x)


def with_bn_stats(
    algo_cfg: Any, problem: Problem, mode: str, keeps_running: bool, momentum: float
) -> MetaLearner:
    """The algorithm ``algo_cfg`` for ``problem`` with BatchNorm mode ``mode`` at evaluation.

    keeps_running: the algorithm state carries running averages (:class:`BatchNormState`),
    updated by every meta-step (runs trained with bn_stats=running). mode "batch" without
    running averages is the algorithm itself, unchanged.
    """
    model = problem.model
    padded = problem.source.padded

    def build(m: Model) -> MetaLearner:
        return make_algorithm(algo_cfg, Problem(m, problem.source))

    plain = build(model)
    if mode == "batch" and not keeps_running:
        return plain
    if mode == "running" and not keeps_running:
        raise ConfigError(
            "invalid model.bn_stats='running': this run was not trained with model.bn_stats=running, "
            "so it has no running averages (use batch or support)"
        )

    def own(algo_state: PyTree) -> PyTree:
        return algo_state.algo if keeps_running else algo_state

    def init_state(meta: PyTree) -> PyTree:
        inner = plain.init_state(meta)
        return BatchNormState(inner, initial_running(model)) if keeps_running else inner

    def task_record(meta: PyTree, inner: PyTree, task: Task, key: jax.Array) -> PyTree:
        """The moments of the meta-parameters' forward pass on the task's support and query
        examples as one batch."""
        adapted = plain.adapt(meta, inner, task.support_x, task.support_y, key, 0)
        sink: list = []
        batch = jnp.concatenate([task.support_x, task.query_x])
        if padded:  # real rows first, as row chunks need (metalearn/rows.py)
            batch = batch[real_rows_first(batch)]
        build(recording(model, sink)).predict(meta, adapted, batch)
        return sink[-1]

    def meta_grad(meta: PyTree, algo_state: PyTree, tasks: Task, key: jax.Array, step: jax.Array):
        grads, inner, metrics = plain.meta_grad(meta, own(algo_state), tasks, key, step)
        if not keeps_running:
            return grads, inner, metrics
        records = jax.vmap(task_record, in_axes=(None, None, 0, None))(
            lax.stop_gradient(meta), own(algo_state), tasks, key
        )
        running, _ = lax.scan(
            lambda r, rec: (update_running(r, rec, momentum), None), algo_state.running, records
        )
        return grads, BatchNormState(inner, running), metrics

    def adapt(meta: PyTree, algo_state: PyTree, sx: jax.Array, sy: jax.Array, key: jax.Array, steps: int):
        if mode == "batch":
            return plain.adapt(meta, own(algo_state), sx, sy, key, steps)
        if mode == "support_query":
            return plain.adapt(meta, own(algo_state), sx, sy, key, steps), sx
        if mode == "running":
            moments = algo_state.running
            return build(normalising_with(model, moments)).adapt(
                meta, own(algo_state), sx, sy, key, steps
            ), moments
        adapted = plain.adapt(meta, own(algo_state), sx, sy, key, steps)
        sink: list = []
        build(recording(model, sink)).predict(meta, adapted, sx)
        return adapted, moments_only(sink[-1])

    def predict(meta: PyTree, adapted: PyTree, x: jax.Array) -> jax.Array:
        if mode == "batch":
            return plain.predict(meta, adapted, x)
        if mode == "support_query":
            adapted, sx = adapted

            def with_support(q: jax.Array) -> jax.Array:
                batch = jnp.concatenate([sx, q])
                if padded:  # real rows first, as row chunks need (metalearn/rows.py)
                    return with_real_rows_first(lambda b: plain.predict(meta, adapted, b), batch)[-1:]
                return plain.predict(meta, adapted, batch)[-1:]

            return per_query(with_support, x)
        adapted, moments = adapted
        one_row = without_row_chunks(model) if padded else model
        fixed = build(normalising_with(one_row, moments))
        return per_query(lambda q: fixed.predict(meta, adapted, q), x)

    return MetaLearner(
        init=plain.init, init_state=init_state, meta_grad=meta_grad, adapt=adapt, predict=predict
    )
