"""Reptile (Nichol et al., 2018, "On First-Order Meta-Learning Algorithms").

For each task tau of a meta-batch of T tasks, starting from phi, run k steps of an
ordinary optimizer (``algo.inner_optimizer``: SGD, or Adam with beta1 = 0 as in the paper)
on the task's training examples D_tau in mini-batches of ``algo.inner_batch_size``:

    W_tau = U^k_tau(phi),

then move phi towards the adapted weights, phi <- phi + eps * (mean_tau W_tau - phi).
No gradient flows through U: the meta-gradient is the pseudo-gradient

    g = phi - mean_tau W_tau,

so the outer optimizer (``optim``) does the move: with ``optim.name=sgd`` and
``optim.lr=eps``, phi - eps * g is exactly the update above (``optim.schedule=linear``
decays eps linearly to ``eps * optim.final_lr_fraction``, as supervised-reptile's
``--meta-step`` / ``--meta-step-final``).

Inner optimizer state (``algo.inner_state``):

- ``carry`` (default; what openai/supervised-reptile does): ONE inner-optimizer state
  persists through the whole run. The tasks of a meta-batch are trained one after the
  other (``lax.scan``), each starting from phi but from the optimizer state the previous
  task left; only the model's parameters are reset between tasks (the reference restores
  its ``_model_state``, the trainable variables, and keeps Adam's slots and beta powers).
  The state after the last task goes to the next meta-step. It is
  ``TrainState.algo_state``, checkpointed with the parameters, so a resumed run continues
  with the same state. Evaluation (validation and test) adapts every task from the
  carried state and discards what adaptation did to it: the state itself is not changed
  (the reference saves and restores its ``_full_state``, Adam's moments included, around
  each evaluation task). SGD has no state, so with SGD ``carry`` is ``reset``. The scan
  is sequential by nature: with several devices the meta-batch's tasks are gathered and
  run one after the other, not in parallel.
- ``reset``: a fresh optimizer state for every task, at training and at test; the tasks
  of a meta-batch are then independent and trained in parallel (``vmap``);
  ``algo_state`` is ``()``.

Adam here is TensorFlow 1's ``AdamOptimizer`` with beta1 = 0 (supervised_reptile/models.py):
v <- v + (1 - b2)(g^2 - v), w <- w - lr * sqrt(1 - b2^t) * g / (sqrt(v) + eps), with
b2 = 0.999, eps = 1e-8 and t counting every inner step taken with this state. With
beta1 = 0 the first moment is the current gradient, so the state is (b2^t, v). SGD has
no state.

Inner loss (``algo.inner_loss``): the batch's ``mean`` loss, or its ``sum``
(supervised-reptile minimises the vector of per-example cross-entropies, i.e. their sum).
Adam is nearly invariant to the scale of the loss, but with a carried state the scale of
the training batches' gradients (``inner_batch_size`` examples) sets the v that the test
batches (``inner_batch_size_test``) are divided by, so the choice matters.

Training examples (``algo.train_shots``): a meta-training task's k_shot + k_query
examples per class (per task for regression) are split: the first ``train_shots`` train the
inner loop (the reference's ``--train-shots``), the rest are held out, and the reported
``loss`` and metric are the adapted weights' on the held-out examples, which the
adaptation never saw. With ``train_shots`` null the older behaviour: ``train_on_query``
true trains on support + query and reports the query loss (seen in training, so not
an honest estimate), false trains on the support set and reports the query loss.
At test time (``adapt``) the same optimizer runs on the support set with mini-batches of
``inner_batch_size_test`` (null: ``inner_batch_size``).

Mini-batches are drawn without replacement, epoch after epoch (a fresh permutation of D_tau
per epoch, a batch may straddle two), as supervised-reptile's ``_mini_batches``;
a batch size of 0 or >= |D_tau| means full-batch steps.

State: meta_params = the model's parameter pytree; adapted = a pytree of the same shape;
algo_state = the inner optimizer's state (carry) or ``()`` (reset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from metalearn.algos.base import InnerLoopConfig, MetaLearner, Problem, variable_episodes
from metalearn.config import need, one_of, schema
from metalearn.rows import real_rows_first
from metalearn.tasks import Task


@schema("algo", "reptile")
@dataclass
class ReptileConfig(InnerLoopConfig):
    """The inner-loop keys and Reptile's. inner_optimizer: "sgd", or "adam" with beta1 = 0 (the
    paper). inner_batch_size: examples per inner step (0: the whole set; at test
    inner_batch_size_test, null: the same). train_shots: per class, the first train_shots of a
    training task's k_shot + k_query examples train the inner loop and the rest score the
    logged metric (null: train_on_query decides: true trains on support + query, false on the
    support set). inner_state: the inner optimizer's state, "carry" (one state through all
    tasks and into evaluation, as supervised-reptile) or "reset" (fresh per task; the default
    here so runs made before this key existed load as trained). inner_loss: "mean" or "sum"
    (supervised-reptile minimises the sum of per-example cross-entropies)."""

    inner_optimizer: str = "sgd"
    inner_batch_size: int = 0
    inner_batch_size_test: int | None = None
    train_on_query: bool = True
    train_shots: int | None = None
    inner_state: str = "reset"
    inner_loss: str = "mean"

    @classmethod
    def check(cls, a: Any, cfg: Any) -> None:
        InnerLoopConfig.check(a, cfg)
        one_of(a.inner_optimizer, "algo.inner_optimizer", ("sgd", "adam"))
        need(a.inner_batch_size >= 0, "algo.inner_batch_size", a.inner_batch_size, ">= 0 (0: the whole set)")
        test_batch = a.inner_batch_size_test
        need(test_batch is None or test_batch >= 0, "algo.inner_batch_size_test", test_batch, ">= 0 or null")
        one_of(a.inner_state, "algo.inner_state", ("carry", "reset"))
        one_of(a.inner_loss, "algo.inner_loss", ("mean", "sum"))
        if variable_episodes(cfg):
            # A padded episode (metalearn/episodes.py): mini-batches drawn from its padded rows
            # would hold a varying number of real examples, and train_shots needs K shots per
            # class; full-batch steps on the masked mean are the faithful reading.
            need(
                a.inner_batch_size == 0,
                "algo.inner_batch_size",
                a.inner_batch_size,
                "0 with dataset.episodes=variable",
            )
            need(
                test_batch in (None, 0),
                "algo.inner_batch_size_test",
                test_batch,
                "0 or null with dataset.episodes=variable",
            )
            need(
                a.train_shots is None,
                "algo.train_shots",
                a.train_shots,
                "null with dataset.episodes=variable",
            )
            need(
                a.inner_loss == "mean",
                "algo.inner_loss",
                a.inner_loss,
                "'mean' with dataset.episodes=variable",
            )
        if a.train_shots is not None:
            per_class = cfg.dataset.k_shot + cfg.dataset.k_query
            need(
                1 <= a.train_shots < per_class,
                "algo.train_shots",
                a.train_shots,
                f">= 1 and < dataset.k_shot + dataset.k_query = {per_class} (the rest are held out), or null",
            )


PyTree = Any


class AdamBeta1ZeroState(NamedTuple):
    """TF1 Adam's state with beta1 = 0: b2_power = beta2 ** (steps taken), nu = v."""

    b2_power: jax.Array
    nu: PyTree


def adam_beta1_zero(lr: float, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """TensorFlow 1's AdamOptimizer(beta1=0) as an optax transformation (see module doc)."""

    def init(params: PyTree) -> AdamBeta1ZeroState:
        leaves = jax.tree.leaves(params)
        dtype = leaves[0].dtype if leaves else jnp.float32
        return AdamBeta1ZeroState(jnp.ones((), dtype), jax.tree.map(jnp.zeros_like, params))

    def update(grads: PyTree, state: AdamBeta1ZeroState, params: PyTree = None) -> tuple[PyTree, Any]:
        del params
        power = state.b2_power * b2
        nu = jax.tree.map(lambda v, g: v + (g * g - v) * (1 - b2), state.nu, grads)
        step = lr * jnp.sqrt(1 - power)
        updates = jax.tree.map(lambda g, v: -step * g / (jnp.sqrt(v) + eps), grads, nu)
        return updates, AdamBeta1ZeroState(power, nu)

    return optax.GradientTransformation(init, update)


def inner_optimizer(name: str, lr: float) -> optax.GradientTransformation:
    """The task-level optimizer: "sgd", or "adam" with beta1 = 0 (the Reptile paper's)."""
    if name == "adam":
        return adam_beta1_zero(lr)
    if name == "sgd":
        return optax.sgd(lr)
    raise ValueError(f"unknown inner optimizer {name!r}")


def minibatch_indices(key: jax.Array, n: int, batch: int, steps: int) -> jax.Array:
    """(steps, batch) example indices: consecutive slices of concatenated permutations of
    range(n), i.e. sampling without replacement that starts a new epoch when one runs out."""
    epochs = math.ceil(steps * batch / n)
    perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, epochs))
    return perms.reshape(-1)[: steps * batch].reshape(steps, batch)


def split_examples(task: Task, ways: int, train_shots: int) -> tuple[jax.Array, ...]:
    """(train_x, train_y, held_x, held_y): per class, the first ``train_shots`` of its
    support + query examples, and the rest. Examples are class-major (``ways`` classes;
    1 for regression); the outputs are class-major too."""

    def per_class(a: jax.Array) -> jax.Array:
        return a.reshape((ways, -1) + a.shape[1:])

    def flat(a: jax.Array) -> jax.Array:
        return a.reshape((-1,) + a.shape[2:])

    x = jnp.concatenate([per_class(task.support_x), per_class(task.query_x)], axis=1)
    y = jnp.concatenate([per_class(task.support_y), per_class(task.query_y)], axis=1)
    return (
        flat(x[:, :train_shots]),
        flat(y[:, :train_shots]),
        flat(x[:, train_shots:]),
        flat(y[:, train_shots:]),
    )


def make_reptile(cfg: Any, problem: Problem) -> MetaLearner:
    """cfg: a ReptileConfig."""
    model, source = problem.model, problem.source
    opt = inner_optimizer(cfg.inner_optimizer, cfg.inner_lr)
    # SGD has no state to carry; its tasks stay independent (and vmapped) either way.
    carry = cfg.inner_state == "carry" and cfg.inner_optimizer != "sgd"
    loss_sum = cfg.inner_loss == "sum"
    train_shots = cfg.train_shots
    test_batch = cfg.inner_batch_size_test
    test_batch = cfg.inner_batch_size if test_batch is None else test_batch
    ways = source.output_dim if source.kind == "classification" else 1

    def batch_loss(p: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
        loss = problem.loss(p, x, y)
        return loss * x.shape[0] if loss_sum else loss

    def train(
        params: PyTree, opt_state: Any, x: jax.Array, y: jax.Array, key: jax.Array, steps: int, batch: int
    ) -> tuple[PyTree, Any]:
        """``steps`` optimizer steps on (x, y) from ``params`` and ``opt_state``."""
        if steps == 0:
            return params, opt_state
        x, y = jnp.asarray(x), jnp.asarray(y)
        n = x.shape[0]
        batch = n if batch == 0 else min(batch, n)
        # Full-batch steps need no sampling; gathering would only copy the data.
        idx = None if batch == n else minibatch_indices(key, n, batch, steps)

        def step(carry: tuple[PyTree, Any], i: jax.Array) -> tuple[tuple[PyTree, Any], None]:
            p, s = carry
            bx, by = (x, y) if idx is None else (x[idx[i]], y[idx[i]])
            updates, s = opt.update(jax.grad(batch_loss)(p, bx, by), s, p)
            return (optax.apply_updates(p, updates), s), None

        (params, opt_state), _ = lax.scan(step, (params, opt_state), jnp.arange(steps))
        return params, opt_state

    def init_state(params: PyTree) -> Any:
        return opt.init(params) if carry else ()

    def adapt(
        params: PyTree, algo_state: Any, x: jax.Array, y: jax.Array, key: jax.Array, steps: int
    ) -> PyTree:
        start = algo_state if carry else opt.init(params)
        adapted, _ = train(params, start, x, y, key, steps, test_batch)
        return adapted

    def examples(task: Task) -> tuple[jax.Array, ...]:
        if train_shots is not None:
            return split_examples(task, ways, train_shots)
        x, y = task.support_x, task.support_y
        if cfg.train_on_query:
            x = jnp.concatenate([x, task.query_x])
            y = jnp.concatenate([y, task.query_y])
            if source.padded:  # real rows first, as row chunks need (metalearn/rows.py)
                order = real_rows_first(x)
                x, y = x[order], y[order]
        return x, y, task.query_x, task.query_y

    def task_update(params: PyTree, opt_state: Any, task: Task, key: jax.Array) -> tuple[Any, ...]:
        x, y, held_x, held_y = examples(task)
        adapted, opt_state = train(params, opt_state, x, y, key, cfg.inner_steps, cfg.inner_batch_size)
        pred = model.apply(adapted, held_x)
        return adapted, opt_state, source.loss(pred, held_y), source.metric(pred, held_y)

    def meta_grad(
        params: PyTree, algo_state: Any, tasks: Task, key: jax.Array, step: jax.Array
    ) -> tuple[PyTree, Any, dict[str, jax.Array]]:
        del step  # the meta step size's decay is the outer optimizer's schedule
        keys = jax.random.split(key, tasks.support_x.shape[0])
        if carry:

            def one(state: Any, task_key: tuple[Task, jax.Array]) -> tuple[Any, tuple[Any, ...]]:
                adapted, state, loss, metric = task_update(params, state, *task_key)
                return state, (adapted, loss, metric)

            algo_state, (adapted, losses, metric) = lax.scan(one, algo_state, (tasks, keys))
        else:
            adapted, _, losses, metric = jax.vmap(task_update, in_axes=(None, None, 0, 0))(
                params, opt.init(params), tasks, keys
            )
        # Pseudo-gradient phi - mean_tau W_tau; an outer SGD step of size eps moves phi by
        # eps * (mean W - phi).
        grads = jax.tree.map(lambda p, w: p - jnp.mean(w, axis=0), params, adapted)
        loss = jnp.mean(losses)
        return grads, algo_state, {"loss": loss, source.metric_name: jnp.mean(metric)}

    def predict(params: PyTree, adapted: PyTree, x: jax.Array) -> jax.Array:
        del params
        return model.apply(adapted, x)

    return MetaLearner(
        init=model.init, init_state=init_state, meta_grad=meta_grad, adapt=adapt, predict=predict
    )
