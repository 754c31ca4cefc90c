"""Reptile (Nichol et al., 2018, "On First-Order Meta-Learning Algorithms").

For each task tau of a meta-batch of T tasks, starting from phi, run k steps of an
ordinary optimizer (``algo.inner_optimizer``: SGD, or Adam with beta1 = 0 as in the paper)
on the task's training data D_tau with mini-batches of ``algo.inner_batch_size``:

    W_tau = U^k_tau(phi),

then move phi towards the adapted weights, phi <- phi + eps * (mean_tau W_tau - phi).
No gradient flows through U: meta_grad returns the pseudo-gradient

    g = phi - mean_tau W_tau,

so the outer optimizer (``optim``) does the move: with ``optim.name=sgd`` and
``optim.lr=eps``, phi - eps * g is exactly the update above (the paper's; other optimizers
treat g like any gradient).

Training data: with ``algo.train_on_query`` (default), D_tau is the task's support and
query sets together, since Reptile has no support/query split at meta-training time (the
paper trains on ``train-shots`` examples per class, more than the test-time shots); the
reported ``loss``/metric is then the adapted weights' loss on the query set, a training
loss for monitoring. With ``train_on_query=false``, D_tau is the support set and the query
stays held out. At test time (``adapt``) the same optimizer runs on the support set.

Mini-batches are drawn without replacement, epoch after epoch (a fresh permutation of D_tau
per epoch); inner_batch_size 0 or >= |D_tau| means full-batch steps. The inner optimizer's
state starts fresh for every task.

State: meta_params = the model's parameter pytree; adapted = a pytree of the same shape.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from metalearn.algos.base import MetaLearner, Problem
from metalearn.tasks import Task


def inner_optimizer(name: str, lr: float) -> optax.GradientTransformation:
    """The task-level optimizer: "sgd", or "adam" with beta1 = 0 (the Reptile paper's)."""
    if name == "adam":
        return optax.adam(lr, b1=0.0, b2=0.999, eps=1e-8)
    if name == "sgd":
        return optax.sgd(lr)
    raise ValueError(f"unknown inner optimizer {name!r}")


def minibatch_indices(key: jax.Array, n: int, batch: int, steps: int) -> jax.Array:
    """(steps, batch) example indices: consecutive slices of concatenated permutations of
    range(n), i.e. sampling without replacement that starts a new epoch when one runs out."""
    epochs = math.ceil(steps * batch / n)
    perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, epochs))
    return perms.reshape(-1)[: steps * batch].reshape(steps, batch)


def make_reptile(cfg: Any, problem: Problem) -> MetaLearner:
    """cfg: AlgoConfig (inner_optimizer, inner_lr, inner_steps, inner_batch_size, train_on_query)."""
    model, source = problem.model, problem.source
    opt = inner_optimizer(cfg.inner_optimizer, cfg.inner_lr)

    def train(params: Any, x: jax.Array, y: jax.Array, key: jax.Array, steps: int) -> Any:
        """``steps`` optimizer steps on (x, y) from ``params``; x: (N, *input)."""
        if steps == 0:
            return params
        n = x.shape[0]
        batch = n if cfg.inner_batch_size == 0 else min(cfg.inner_batch_size, n)
        # Full-batch steps need no sampling; gathering would only copy the data.
        idx = None if batch == n else minibatch_indices(key, n, batch, steps)

        def step(carry: tuple[Any, Any], i: jax.Array) -> tuple[tuple[Any, Any], None]:
            p, opt_state = carry
            bx, by = (x, y) if idx is None else (x[idx[i]], y[idx[i]])
            g = jax.grad(problem.loss)(p, bx, by)
            updates, opt_state = opt.update(g, opt_state, p)
            return (optax.apply_updates(p, updates), opt_state), None

        (params, _), _ = lax.scan(step, (params, opt.init(params)), jnp.arange(steps))
        return params

    def adapt(params: Any, support_x: jax.Array, support_y: jax.Array, key: jax.Array, steps: int) -> Any:
        return train(params, support_x, support_y, key, steps)

    def task_update(params: Any, task: Task, key: jax.Array) -> tuple[Any, jax.Array, jax.Array]:
        x, y = task.support_x, task.support_y
        if cfg.train_on_query:
            x = jnp.concatenate([x, task.query_x])
            y = jnp.concatenate([y, task.query_y])
        adapted = train(params, x, y, key, cfg.inner_steps)
        pred = model.apply(adapted, task.query_x)
        return adapted, source.loss(pred, task.query_y), source.metric(pred, task.query_y)

    def meta_grad(params: Any, tasks: Task, key: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
        keys = jax.random.split(key, tasks.support_x.shape[0])
        adapted, losses, metric = jax.vmap(task_update, in_axes=(None, 0, 0))(params, tasks, keys)
        # Pseudo-gradient phi - mean_tau W_tau; an outer SGD step of size eps moves phi by
        # eps * (mean W - phi).
        grads = jax.tree.map(lambda p, w: p - jnp.mean(w, axis=0), params, adapted)
        loss = jnp.mean(losses)
        return grads, {"loss": loss, source.metric_name: jnp.mean(metric)}

    def predict(params: Any, adapted: Any, x: jax.Array) -> jax.Array:
        del params
        return model.apply(adapted, x)

    return MetaLearner(init=model.init, meta_grad=meta_grad, adapt=adapt, predict=predict)
