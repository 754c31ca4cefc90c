"""The compiled meta-step: the training state, the experiment (task source, model,
algorithm, outer optimizer), the device mesh the meta-batch is split over, and the jitted
step and block of steps that the training loop (metalearn/train.py) calls."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metalearn.adaptation import with_adaptation
from metalearn.algos import MetaLearner, Problem
from metalearn.algos.pretrain import classification_batches
from metalearn.backbone import check_head_rule, init_head_of, with_head_rule
from metalearn.batchnorm import bn_stats_of, with_bn_stats
from metalearn.errors import ConfigError
from metalearn.models import Model, make_model, with_padded_rows
from metalearn.optim import make_optimizer
from metalearn.tasks import TaskSource, build_task_source

PyTree = Any

# Streams derived from the seed (jax.random.fold_in of PRNGKey(seed)): the training tasks
# and the initial parameters. Validation and test tasks use streams 1 and 2
# (metalearn/evaluation.py); every stream number must stay distinct and fixed, so that a
# run's tasks and `metalearn eval`'s test tasks do not change.
TRAIN_STREAM, INIT_STREAM = 0, 3


class TrainState(NamedTuple):
    """Everything needed to continue training: step (int32 scalar), meta-parameters,
    optimizer state, the base PRNG key from which step ``s`` derives fold_in(key, s), the
    number of meta-steps whose update was skipped as non-finite (trainer.on_nan=skip), and
    the algorithm's carried state (``MetaLearner.init_state``; ``()`` for most algorithms)."""

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    key: jax.Array
    skipped: jax.Array
    algo_state: PyTree = ()


class Experiment(NamedTuple):
    source: TaskSource
    model: Model
    algo: MetaLearner
    optimizer: optax.GradientTransformation


def stream_key(seed: int, stream: int) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), stream)


def setup(cfg: Any, source: TaskSource | None = None, trained_bn_stats: str | None = None) -> Experiment:
    """Task source, model, algorithm and outer optimizer for a composed config.

    The algorithm evaluates with BatchNorm mode ``model.bn_stats`` (metalearn/batchnorm.py);
    its state keeps running averages when the run was trained with bn_stats=running
    (``trained_bn_stats``: the run's own mode where eval or predict overrides it; default
    ``model.bn_stats``)."""
    source = source if source is not None else build_task_source(cfg.dataset)
    if cfg.algo.name == "pretrain":  # mini-batches of (image, global class), not episodes
        source = classification_batches(source)
    model = make_model(cfg.model, source.input_shape, source.output_dim)
    if source.padded:  # variable episodes (metalearn/episodes.py)
        model = with_padded_rows(model, source.row_chunk)
    mode = bn_stats_of(cfg.model)
    trained = mode if trained_bn_stats is None else trained_bn_stats
    momentum = float(getattr(cfg.model, "bn_momentum", 0.1))
    algo = with_bn_stats(cfg.algo, Problem(model, source), mode, trained == "running", momentum)
    # model.init_head (metalearn/backbone.py): how the head starts (and, shared, stays tied).
    head_rule = init_head_of(cfg.model)
    if head_rule != "random":
        check_head_rule(cfg, jax.eval_shape(algo.init, jax.random.PRNGKey(0)))
        algo = with_head_rule(algo, head_rule)
    # eval.adaptation (metalearn/adaptation.py): how validation and test tasks are adapted.
    algo = with_adaptation(algo, model, cfg.eval, cfg.model)
    return Experiment(source, model, algo, make_optimizer(cfg.optim, cfg.trainer.steps))


# Data parallelism: the meta-batch of tasks is split over this mesh axis.
TASK_AXIS = "tasks"


def task_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices, of every process in a multi-process
    job) whose axis ``"tasks"`` carries the meta-batch. One device gives a mesh of one, so
    the same code path runs everywhere."""
    devices = jax.devices() if devices is None else list(devices)  # multi-process: all global devices
    return Mesh(np.array(devices), (TASK_AXIS,))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """A copy of ``tree`` held in full by every device of ``mesh`` (parameters, optimizer
    state, the dataset arrays the sampler gathers from)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def check_meta_batch(meta_batch_size: int, mesh: Mesh) -> None:
    """ConfigError unless the meta-batch splits evenly over the mesh's devices."""
    n = mesh.devices.size
    if meta_batch_size % n:
        raise ConfigError(
            f"invalid trainer.meta_batch_size={meta_batch_size}: must be divisible by the "
            f"number of devices ({n}), since each device adapts an equal share of the tasks"
        )


def init_state(exp: Experiment, seed: int, mesh: Mesh | None = None) -> TrainState:
    """The state at step 0, replicated over ``mesh`` (default :func:`task_mesh`).

    That is the layout the meta-step for that mesh returns, so the first call neither copies
    nor reshards the state, and it is not traced a second time: jit caches committed and
    uncommitted (plain ``jnp``) inputs separately, even on one device.
    """
    params = exp.algo.init(stream_key(seed, INIT_STREAM))
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=exp.optimizer.init(params),
        key=stream_key(seed, TRAIN_STREAM),
        skipped=jnp.zeros((), jnp.int32),
        algo_state=exp.algo.init_state(params),
    )
    return replicate(state, task_mesh() if mesh is None else mesh)


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def sample_tasks(
    exp: Experiment, data: PyTree, task_key: jax.Array, meta_batch_size: int, mesh: Mesh
) -> PyTree:
    """``meta_batch_size`` tasks drawn from split(task_key), laid out along the mesh's
    ``"tasks"`` axis: each device samples and then adapts its own 1/n of the batch.

    Call inside jit. The per-task keys are constrained too, so the sampling itself is
    split over devices rather than done everywhere and then sliced. The draws do not depend
    on the device count (jax's threefry is partitionable), only the layout does.
    """
    by_task = NamedSharding(mesh, P(TASK_AXIS))
    keys = lax.with_sharding_constraint(jax.random.split(task_key, meta_batch_size), by_task)
    tasks = jax.vmap(exp.source.sample, in_axes=(None, 0))(data, keys)
    return lax.with_sharding_constraint(tasks, by_task)


def make_meta_step(
    exp: Experiment, meta_batch_size: int, skip_nonfinite: bool = False, mesh: Mesh | None = None
):
    """Compile ``(state, data) -> (state, metrics)``: sample a batch of tasks on device,
    take the algorithm's meta-gradient, apply the outer optimizer. ``state`` is donated.
    (The training loop runs the same step in blocks, :func:`make_meta_block`.)

    When the source samples on the host (``exp.source.host``), the second argument is
    instead the step's batch of gathered episodes from
    :class:`metalearn.prefetch.HostPrefetcher` (uint8 (meta_batch_size, n_way,
    k_shot + k_query, H, W, C), sharded over ``"tasks"``); the tasks, keys and so results
    are the same as with on-device sampling.

    Data parallel over ``mesh`` (default :func:`task_mesh`, all local devices): the tasks
    are sharded along its ``"tasks"`` axis, while ``state``, ``data`` and the outputs are
    replicated (XLA inserts the all-reduce of the mean meta-gradient). Pass a state from
    ``init_state(exp, seed, mesh)`` and ``replicate(data, mesh)`` to avoid a copy per call.
    ConfigError if ``meta_batch_size`` is not divisible by the number of devices.

    With ``skip_nonfinite`` a step whose loss, gradient norm or new parameters are not all
    finite keeps the old parameters and optimizer state (the step still advances, so the
    next step draws new tasks) and adds one to ``state.skipped``.
    """
    mesh = task_mesh() if mesh is None else mesh
    check_meta_batch(meta_batch_size, mesh)
    replicated, data_sharding = _step_shardings(exp, mesh)
    meta_step = _meta_step_fn(exp, meta_batch_size, skip_nonfinite, mesh)
    # Fixed shardings (one sharding is a prefix for a whole pytree): the output state has
    # exactly the input's layout, so donation reuses its buffers and the next call hits the
    # same compiled executable.
    return jax.jit(
        meta_step,
        in_shardings=(replicated, data_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def _step_shardings(exp: Experiment, mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
    """(replicated, the data argument's sharding) of a meta-step on ``mesh``."""
    replicated = NamedSharding(mesh, P())
    return replicated, replicated if exp.source.host is None else NamedSharding(mesh, P(TASK_AXIS))


def _meta_step_fn(exp: Experiment, meta_batch_size: int, skip_nonfinite: bool, mesh: Mesh):
    """The traceable body of one meta-step (see :func:`make_meta_step`)."""
    host = exp.source.host

    def meta_step(state: TrainState, data: PyTree) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(state.key, state.step)
        task_key, algo_key = jax.random.split(key)
        if host is None:
            tasks = sample_tasks(exp, data, task_key, meta_batch_size, mesh)
        else:
            tasks = lax.with_sharding_constraint(host.to_tasks(data), NamedSharding(mesh, P(TASK_AXIS)))
        grads, algo_state, metrics = exp.algo.meta_grad(
            state.params, state.algo_state, tasks, algo_key, state.step
        )
        updates, opt_state = exp.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        skipped = state.skipped
        if skip_nonfinite:
            # Decided inside jit, so a bad update never leaves the device; params are
            # checked too, because a finite gradient times a huge lr can still overflow.
            ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & _all_finite(params)
            keep = lambda new, old: jnp.where(ok, new, old)
            params = jax.tree.map(keep, params, state.params)
            opt_state = jax.tree.map(keep, opt_state, state.opt_state)
            algo_state = jax.tree.map(keep, algo_state, state.algo_state)
            skipped = skipped + (~ok).astype(skipped.dtype)
        return TrainState(state.step + 1, params, opt_state, state.key, skipped, algo_state), metrics

    return meta_step


def make_meta_block(
    exp: Experiment,
    meta_batch_size: int,
    skip_nonfinite: bool = False,
    mesh: Mesh | None = None,
    max_steps: int = 1,
):
    """Compile ``(state, data, n) -> (state, metrics)``: ``n`` consecutive meta-steps of
    :func:`make_meta_step` (1 <= n <= ``max_steps``) in one call, so the host dispatches
    once per block instead of once per step. ``n`` is traced (a ``fori_loop`` with a
    dynamic trip count), so every block length runs the same compiled executable, and the
    steps are bitwise those of n one-step calls: each samples from fold_in(key, step) and
    applies the ``skip_nonfinite`` rule on its own.

    ``metrics`` holds each metric stacked over ``max_steps`` rows; row i is step i of the
    block, rows >= n are NaN (0 for integer metrics). ``state`` is donated.

    Episodes gathered on the host (``exp.source.host``): ``data`` is one step's batch, so
    ``max_steps`` must be 1.
    """
    mesh = task_mesh() if mesh is None else mesh
    check_meta_batch(meta_batch_size, mesh)
    if max_steps < 1 or (exp.source.host is not None and max_steps != 1):
        raise ValueError(f"max_steps={max_steps}: must be >= 1, and 1 with host-gathered episodes")
    replicated, data_sharding = _step_shardings(exp, mesh)
    meta_step = _meta_step_fn(exp, meta_batch_size, skip_nonfinite, mesh)

    def empty(s: jax.ShapeDtypeStruct) -> jax.Array:
        fill = jnp.nan if jnp.issubdtype(s.dtype, jnp.inexact) else 0
        return jnp.full((max_steps, *s.shape), fill, s.dtype)

    def block(state: TrainState, data: PyTree, n: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        history = jax.tree.map(empty, jax.eval_shape(meta_step, state, data)[1])

        def body(i: jax.Array, carry: tuple[TrainState, PyTree]) -> tuple[TrainState, PyTree]:
            state, history = carry
            state, metrics = meta_step(state, data)
            history = jax.tree.map(lambda h, m: lax.dynamic_update_index_in_dim(h, m, i, 0), history, metrics)
            return state, history

        return lax.fori_loop(0, n, body, (state, history))

    return jax.jit(
        block,
        in_shardings=(replicated, data_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def step_task_keys(base_key: jax.Array, step: int, meta_batch_size: int) -> jax.Array:
    """The per-task keys (meta_batch_size, 2) that the meta-step from state step ``step``
    (steps completed so far) draws its tasks from, computed outside it."""
    task_key, _ = jax.random.split(jax.random.fold_in(base_key, step))
    return jax.random.split(task_key, meta_batch_size)
