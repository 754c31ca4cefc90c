"""MAML++ (Antoniou, Edwards and Storkey, 2019, "How to train your MAML").

MAML with five changes, each a switch of ``algo`` so that it can be ablated; with every
switch off the meta-gradient is exactly MAML's (tests/test_mamlpp.py checks this):

- ``algo.multi_step_loss`` (MSL): the outer objective of a task is a weighted sum of the
  query losses after every inner step, sum_i w_i(s) L_Q(theta'_{i+1}), instead of the last
  one only. The weights depend on the number s of completed meta-steps: they start
  uniform (1/N for N = ``algo.inner_steps``) and move linearly towards the last step over
  ``algo.msl_steps`` meta-steps, every earlier weight falling by s / (N * msl_steps) to a
  floor of 0.03 / N and the last one rising by the same total; from s = msl_steps on, only
  the last step's loss counts (weight 1). This is the reference code's
  ``get_per_step_loss_importance_vector`` (few_shot_learning_system.py) with its epoch
  counter replaced by the meta-step counter (the code's weights move once per epoch of 500
  iterations; these move every meta-step along the same line).
- ``algo.lslr`` (learned per-layer per-step learning rates): one inner learning rate per
  parameter array and per inner step, meta-learned with the weights, all starting at
  ``algo.inner_lr`` (``LSLRGradientDescentLearningRule``, inner_loop_optimizers.py).
- ``algo.per_step_bn`` (per-step BatchNorm scale and offset): every BatchNorm layer keeps
  one (scale, bias) pair per inner step, meta-learned; step i (its support forward, and the
  query forward after its update) uses copy i. As in the reference code
  (``enable_inner_loop_optimizable_bn_params: false``) the BatchNorm parameters are then not
  changed by the inner loop. Without the switch they are adapted like every other weight,
  as in MAML. The paper's per-step *running statistics* have no counterpart: here, as in
  the reference code (which calls ``F.batch_norm(..., training=True)`` in every phase, so
  its running averages are collected but never used), BatchNorm always normalises with the
  statistics of the current batch.
- ``algo.first_order_steps`` (derivative-order annealing): the meta-gradient is first
  order (the gradient through the inner gradients is stopped) for the first
  ``first_order_steps`` meta-steps and second order afterwards (0: no annealing; then
  ``algo.first_order`` decides throughout). The choice is a ``lax.cond`` on the traced
  meta-step counter inside the one compiled meta-step, so crossing the switch compiles
  nothing new.
- cosine annealing of the outer learning rate is the outer optimizer's
  ``optim.schedule=cosine`` (``optim.final_lr_fraction`` = the code's
  min_learning_rate / meta_learning_rate); the presets set it.

Evaluation (``adapt``) runs ``steps`` inner steps with the learned rates and BatchNorm
copies; beyond the ``algo.inner_steps`` trained steps the last step's rate and copy are
reused (the reference code evaluates with as many steps as it trains).

State: meta_params = {"params": the model's parameter pytree, in which, with per_step_bn,
every BatchNorm ``scale``/``bias`` has a leading axis of size inner_steps; "lrs" (with lslr
only): a pytree over the inner-adapted parameters, each leaf the (inner_steps,) rates of
that array}. adapted = an ordinary model parameter pytree (BatchNorm copy of the last step
taken substituted), so ``predict`` is ``model.apply``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax import lax

from metalearn.algos.base import (
    DifferentiatedInnerLoopConfig,
    MetaLearner,
    Problem,
    mean_over_tasks,
    no_state,
)
from metalearn.config import need, schema
from metalearn.tasks import Task


@schema("algo", "mamlpp")
@dataclass
class MAMLppConfig(DifferentiatedInnerLoopConfig):
    """MAML's inner-loop keys and MAML++'s switches (with all off and a constant outer lr it is
    MAML). multi_step_loss: query loss after every inner step, weights annealed to the last
    step over msl_steps meta-steps; lslr: learned per-layer per-step inner lrs (start:
    inner_lr); per_step_bn: one BatchNorm scale/offset per inner step; first_order_steps:
    first-order meta-gradient for that many meta-steps, then second order (0: first_order
    throughout)."""

    multi_step_loss: bool = True
    msl_steps: int = 5000
    lslr: bool = True
    per_step_bn: bool = True
    first_order_steps: int = 0

    @classmethod
    def check(cls, a: Any, cfg: Any) -> None:
        DifferentiatedInnerLoopConfig.check(a, cfg)
        need(a.msl_steps >= 1, "algo.msl_steps", a.msl_steps, ">= 1 (meta-steps of loss-weight annealing)")
        fo = a.first_order_steps
        need(fo >= 0, "algo.first_order_steps", fo, ">= 0 (0: no derivative-order annealing)")


# The reference code's floor on the weight of a non-final step's loss, times N
# (``min_value_for_non_final_losses = 0.03 / number_of_training_steps_per_iter``).
MSL_MIN_WEIGHT = 0.03


def is_batchnorm_path(path: tuple[str, ...]) -> bool:
    """Whether a parameter (its key path in the model's tree) belongs to a BatchNorm layer:
    models.py names them ``norm_<i>`` (Conv4, ResNet-12 stages) and ``shortcut_norm``."""
    return any(k == "norm" or k.startswith("norm_") or k.endswith("_norm") for k in path[:-1])


def msl_weights(step: jax.Array, n_steps: int, msl_steps: int) -> jax.Array:
    """Per-inner-step weights (n_steps,) of the query losses after ``step`` completed
    meta-steps (traced or not); they sum to 1."""
    last_only = jnp.zeros((n_steps,), jnp.result_type(float)).at[-1].set(1.0)
    if n_steps == 1:
        return last_only
    s = jnp.asarray(step).astype(jnp.result_type(float))
    decay = 1.0 / n_steps / msl_steps
    floor = MSL_MIN_WEIGHT / n_steps
    early = jnp.maximum(1.0 / n_steps - s * decay, floor)
    last = jnp.minimum(1.0 / n_steps + s * (n_steps - 1) * decay, 1.0 - (n_steps - 1) * floor)
    annealed = jnp.concatenate([jnp.full((n_steps - 1,), early), last[None]])
    return jnp.where(s < msl_steps, annealed, last_only)


def make_mamlpp(cfg: Any, problem: Problem) -> MetaLearner:
    """cfg: a MAMLppConfig."""
    model, source = problem.model, problem.source
    n_steps = int(cfg.inner_steps)
    use_msl, use_lslr, use_bn = bool(cfg.multi_step_loss), bool(cfg.lslr), bool(cfg.per_step_bn)
    fo_steps = int(cfg.first_order_steps)

    def per_step(path: tuple[str, ...]) -> bool:
        return use_bn and is_batchnorm_path(path)

    def split(params: Any) -> tuple[dict, dict]:
        """(inner-adapted leaves, per-step BatchNorm leaves), flat {path: array}."""
        flat = traverse_util.flatten_dict(params)
        fast = {k: v for k, v in flat.items() if not per_step(k)}
        return fast, {k: v for k, v in flat.items() if per_step(k)}

    def model_params(fast: dict, bn: dict, i: jax.Array | int) -> Any:
        """The model's parameter tree at inner step i: BatchNorm copy i substituted."""
        return traverse_util.unflatten_dict({**fast, **{k: v[i] for k, v in bn.items()}})

    def init(key: jax.Array) -> Any:
        params = model.init(key)
        fast, bn = split(params)
        if bn:
            bn = {k: jnp.repeat(v[None], n_steps, axis=0) for k, v in bn.items()}
            params = traverse_util.unflatten_dict({**fast, **bn})
        meta = {"params": params}
        if use_lslr:
            meta["lrs"] = traverse_util.unflatten_dict(
                {k: jnp.full((n_steps,), cfg.inner_lr, v.dtype) for k, v in fast.items()}
            )
        return meta

    def inner_loop(
        meta: Any,
        support_x: jax.Array,
        support_y: jax.Array,
        steps: int,
        first_order: bool,
        query: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    ) -> tuple[dict, dict, jax.Array, jax.Array]:
        """``steps`` inner steps on the support set from meta["params"].

        Returns (adapted inner-adapted leaves, BatchNorm leaves, index of the last step's
        rate/BatchNorm copy, weighted query loss of the steps before the last). ``query`` =
        (x, y, weights (n_steps,)): score the query after every step but the last with its
        weight (multi-step loss); the caller scores the last step.
        """
        fast, bn = split(meta["params"])
        lrs = traverse_util.flatten_dict(meta["lrs"]) if use_lslr else None

        def step(f: dict, i: jax.Array) -> tuple[dict, jax.Array]:
            g = jax.grad(lambda q: problem.loss(model_params(q, bn, i), support_x, support_y))(f)
            if first_order:
                g = lax.stop_gradient(g)
            new = {k: f[k] - (lrs[k][i] if use_lslr else cfg.inner_lr) * g[k] for k in f}
            if query is None:
                return new, jnp.zeros(())
            qx, qy, w = query[0], query[1], query[2][i]
            # A step whose weight is 0 (the last one here, every non-final one once the MSL
            # period is over) skips its query pass. The weights do not depend on the task,
            # so under vmap this stays a branch rather than becoming a select.
            scored = lax.cond(
                w > 0,
                lambda: w * problem.loss(model_params(new, bn, i), qx, qy),
                lambda: jnp.zeros((), w.dtype),
            )
            return new, scored

        if cfg.remat:
            step = jax.checkpoint(step)
        if not steps:
            return fast, bn, 0, jnp.zeros(())
        index = jnp.minimum(jnp.arange(steps), n_steps - 1)
        fast, losses = lax.scan(step, fast, index)
        return fast, bn, index[-1], jnp.sum(losses)

    def grad_at(meta: Any, tasks: Task, key: jax.Array, step: jax.Array, first_order: bool) -> Any:
        weights = msl_weights(step, n_steps, cfg.msl_steps) if use_msl else None

        def task_loss(m: Any, task: Task, k: jax.Array) -> tuple[jax.Array, jax.Array]:
            del k
            query = None if weights is None else (task.query_x, task.query_y, weights.at[-1].set(0.0))
            fast, bn, last, earlier = inner_loop(
                m, task.support_x, task.support_y, n_steps, first_order, query
            )
            pred = model.apply(model_params(fast, bn, last), task.query_x)
            final = source.loss(pred, task.query_y)
            loss = final if weights is None else earlier + weights[-1] * final
            return loss, source.metric(pred, task.query_y)

        (_, metrics), grads = jax.value_and_grad(
            lambda m: mean_over_tasks(task_loss, m, tasks, key, source.metric_name), has_aux=True
        )(meta)
        return grads, metrics

    def meta_grad(
        meta: Any, algo_state: Any, tasks: Task, key: jax.Array, step: jax.Array
    ) -> tuple[Any, Any, dict]:
        if fo_steps > 0:
            grads, metrics = lax.cond(
                step < fo_steps,
                lambda: grad_at(meta, tasks, key, step, True),
                lambda: grad_at(meta, tasks, key, step, bool(cfg.first_order)),
            )
        else:
            grads, metrics = grad_at(meta, tasks, key, step, bool(cfg.first_order))
        return grads, algo_state, metrics

    def adapt(
        meta: Any, algo_state: Any, support_x: jax.Array, support_y: jax.Array, key: jax.Array, steps: int
    ) -> Any:
        del algo_state, key
        fast, bn, last, _ = inner_loop(meta, support_x, support_y, steps, bool(cfg.first_order))
        return model_params(fast, bn, last)

    def predict(meta: Any, adapted: Any, x: jax.Array) -> jax.Array:
        del meta
        return model.apply(adapted, x)

    return MetaLearner(init=init, init_state=no_state, meta_grad=meta_grad, adapt=adapt, predict=predict)
