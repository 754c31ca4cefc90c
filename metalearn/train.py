"""Meta-training: one jitted meta-step, the training loop, evaluation on held-out tasks."""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metalearn.algos import MetaLearner, Problem, adaptation_phrase, make_algorithm
from metalearn.attacks import Attack, attack_from_config, default_step_size
from metalearn.checkpoint import CheckpointWriter, has_checkpoint, restore_latest
from metalearn.config import validate
from metalearn.distributed import NullLogger, is_main_process, maybe_initialize, shared_run_dir
from metalearn.errors import ConfigError, MetalearnError
from metalearn.metrics import JsonlLogger, format_summary, summarize, write_json
from metalearn.models import Model, make_model
from metalearn.optim import make_optimizer
from metalearn.preprocess import record_run
from metalearn.protocol import describe_protocol, protocol_of
from metalearn.tasks import TaskSource, build_task_source

PyTree = Any

# Streams derived from the seed; fixed so that `metalearn eval` sees the same test tasks.
_TRAIN_STREAM, _VALIDATION_STREAM, _TEST_STREAM, _INIT_STREAM = 0, 1, 2, 3


class TrainingError(MetalearnError):
    """Training cannot continue (e.g. a non-finite loss)."""


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


def setup(cfg: Any, source: TaskSource | None = None) -> Experiment:
    """Task source, model, algorithm and outer optimizer for a composed config."""
    source = source if source is not None else build_task_source(cfg.dataset)
    model = make_model(cfg.model, source.input_shape, source.output_dim)
    algo = make_algorithm(cfg.algo, Problem(model, source))
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
    params = exp.algo.init(stream_key(seed, _INIT_STREAM))
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=exp.optimizer.init(params),
        key=stream_key(seed, _TRAIN_STREAM),
        skipped=jnp.zeros((), jnp.int32),
        algo_state=exp.algo.initial_state(params),
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
    instead the step's batch of gathered episodes from :class:`HostPrefetcher` (uint8
    (meta_batch_size, n_way, k_shot + k_query, H, W, C), sharded over ``"tasks"``); the
    tasks, keys and so results are the same as with on-device sampling.

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
        grads, algo_state, metrics = exp.algo.step_grad(
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


class HostPrefetcher:
    """Gathers the episodes of upcoming meta-steps on the host while the accelerator runs.

    A background thread computes, for each state step ``s`` in ``[start, stop)``, the same
    task keys as the on-device sampler (:func:`step_task_keys`), gathers the episodes from
    host memory and transfers them with the meta-step's task sharding; up to ``depth``
    batches wait in a queue. Iterate to get them in order. Each process gathers only the
    tasks of its own devices (``jax.make_array_from_callback``).
    """

    def __init__(
        self,
        source: TaskSource,
        base_key: jax.Array,
        meta_batch_size: int,
        mesh: Mesh,
        start: int,
        stop: int,
        depth: int = 2,
    ):
        self._host = source.host
        self._base_key = jax.device_get(base_key)
        self._batch, self._start, self._stop = meta_batch_size, start, stop
        self._sharding = NamedSharding(mesh, P(TASK_AXIS))
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metalearn-prefetch", daemon=True)
        self._thread.start()

    def _batch_for(self, step: int) -> jax.Array:
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            keys = step_task_keys(self._base_key, step, self._batch)
        idx = self._host.indices("train", keys)
        shape = self._host.batch_shape("train", idx)

        def shard(index: tuple[slice, ...]) -> np.ndarray:
            return self._host.gather("train", jax.tree.map(lambda a: a[index[0]], idx))

        return jax.make_array_from_callback(shape, self._sharding, shard)

    def _run(self) -> None:
        try:
            for step in range(self._start, self._stop):
                if self._done.is_set():
                    return
                item = self._batch_for(step)
                while not self._done.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # surfaced to the training loop by __next__
            self._queue.put(err)

    def __iter__(self) -> HostPrefetcher:
        return self

    def __next__(self) -> jax.Array:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._done.set()


def make_evaluator(
    exp: Experiment,
    n_tasks: int,
    batch_size: int,
    inner_steps: int,
    attack: Attack | None = None,
    split: str = "test",
    k_query: int | None = None,
):
    """Compile ``(params, data, key, algo_state=()) -> per-task metric (n_tasks,)``.

    ``algo_state`` is the algorithm's carried state (TrainState.algo_state); every task
    adapts from it, and it is not changed.

    Task i is drawn from fold_in(key, i), so the tasks do not depend on ``batch_size``;
    ``batch_size`` tasks are adapted in parallel (vmap), chunks run under ``lax.map``.

    ``k_query`` (eval.k_query): score only the first ``k_query`` query examples per class
    of each sampled task (None: all of them).

    With ``attack`` the result is a pair ``(clean, robust)`` of (n_tasks,) arrays: after the
    same clean adaptation to the same tasks, the query inputs are attacked against the
    adapted model (loss ``source.loss(predict(params, adapted, x), y)``) and scored again.

    When the source samples on the host, the returned function gathers the tasks of
    ``split`` on the host chunk by chunk (same tasks, same results) and ignores ``data``.
    """
    batch_size = min(batch_size, n_tasks)
    n_chunks = math.ceil(n_tasks / batch_size)
    algo, source = exp.algo, exp.source

    ways = source.output_dim if source.kind == "classification" else 1

    def first_queries(q: jax.Array) -> jax.Array:
        """The first ``k_query`` of each class's queries (class-major)."""
        return q.reshape((ways, -1) + q.shape[1:])[:, :k_query].reshape((-1,) + q.shape[1:])

    def score(params: PyTree, algo_state: PyTree, task: Any, key: jax.Array) -> PyTree:
        if k_query is not None:
            task = task._replace(query_x=first_queries(task.query_x), query_y=first_queries(task.query_y))
        _, adapt_key = jax.random.split(key)
        adapted = algo.adapt_with(params, algo_state, task.support_x, task.support_y, adapt_key, inner_steps)
        clean = source.metric(algo.predict(params, adapted, task.query_x), task.query_y)
        if attack is None:
            return clean
        query_loss = lambda x: source.loss(algo.predict(params, adapted, x), task.query_y)
        # A key of its own (from the task's key) so the task and adaptation draws are unchanged.
        query_adv = attack(query_loss, task.query_x, jax.random.fold_in(key, 1))
        return clean, source.metric(algo.predict(params, adapted, query_adv), task.query_y)

    def task_keys(key: jax.Array) -> jax.Array:
        return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n_chunks * batch_size))

    if source.host is not None:
        host = source.host
        score_chunk = jax.jit(
            lambda params, algo_state, x, keys: jax.vmap(score, (None, None, 0, 0))(
                params, algo_state, host.to_tasks(x), keys
            )
        )

        def evaluate_on_host(params: PyTree, data: PyTree, key: jax.Array, algo_state: PyTree = ()) -> PyTree:
            del data
            with jax.default_device(jax.local_devices(backend="cpu")[0]):
                keys = task_keys(key)
                sample_keys = jax.vmap(lambda k: jax.random.split(k)[0])(keys)
            chunks = []
            for c in range(n_chunks):
                part = slice(c * batch_size, (c + 1) * batch_size)
                x = host.gather(split, host.indices(split, sample_keys[part]))
                chunks.append(score_chunk(params, algo_state, x, keys[part]))
            values = jax.tree.map(lambda *v: jnp.concatenate(v), *chunks)
            return jax.tree.map(lambda v: v[:n_tasks], values)

        return evaluate_on_host

    def task_metric(params: PyTree, algo_state: PyTree, data: PyTree, key: jax.Array) -> PyTree:
        task_key, _ = jax.random.split(key)
        return score(params, algo_state, source.sample(data, task_key), key)

    def evaluate(params: PyTree, data: PyTree, key: jax.Array, algo_state: PyTree = ()) -> PyTree:
        keys = task_keys(key)
        keys = keys.reshape(n_chunks, batch_size, *keys.shape[1:])
        values = lax.map(
            lambda ks: jax.vmap(task_metric, (None, None, None, 0))(params, algo_state, data, ks), keys
        )
        return jax.tree.map(lambda v: v.reshape(-1)[:n_tasks], values)

    return jax.jit(evaluate)


def _split_data(exp: Experiment, split: str) -> PyTree:
    """The sampler's data for ``split`` (None when episodes are gathered on the host)."""
    return exp.source.splits[split] if exp.source.host is None else None


def evaluate_params(
    exp: Experiment,
    params: PyTree,
    cfg: Any,
    split: str,
    n_tasks: int,
    inner_steps: int,
    algo_state: PyTree = (),
    evaluator: Any = None,
) -> dict[str, Any]:
    """Adapt to ``n_tasks`` tasks of ``split`` with ``inner_steps`` steps; summary dict.

    ``evaluator``: the result of ``make_evaluator`` for these arguments, to reuse its
    compilation (training validates with one evaluator); default: a new one."""
    stream = _VALIDATION_STREAM if split == "validation" else _TEST_STREAM
    k_query = getattr(cfg.eval, "k_query", None)
    fn = evaluator or make_evaluator(
        exp, n_tasks, cfg.eval.batch_size, inner_steps, split=split, k_query=k_query
    )
    values = np.asarray(fn(params, _split_data(exp, split), stream_key(cfg.seed, stream), algo_state))
    return summarize(values, exp.source.metric_name)


def evaluate_final(
    exp: Experiment,
    params: PyTree,
    cfg: Any,
    split: str,
    n_tasks: int,
    inner_steps: int,
    algo_state: PyTree = (),
) -> dict[str, Any]:
    """The final evaluation's results entries: ``test`` (clean summary) and, when
    ``cfg.attack`` names an attack, ``test_robust`` (same format, on attacked query sets of
    the same tasks) and ``attack`` (its settings)."""
    attack_cfg = getattr(cfg, "attack", None)
    attack = attack_from_config(attack_cfg, exp.source.input_range)
    if attack is None:
        return {"test": evaluate_params(exp, params, cfg, split, n_tasks, inner_steps, algo_state)}
    stream = _VALIDATION_STREAM if split == "validation" else _TEST_STREAM
    k_query = getattr(cfg.eval, "k_query", None)
    fn = make_evaluator(exp, n_tasks, cfg.eval.batch_size, inner_steps, attack, split=split, k_query=k_query)
    clean, robust = fn(params, _split_data(exp, split), stream_key(cfg.seed, stream), algo_state)
    settings = {"name": attack_cfg.name, "eps": attack_cfg.eps}
    if attack_cfg.name == "pgd":
        step_size = attack_cfg.step_size
        if step_size is None:  # record the step size actually used
            step_size = default_step_size(attack_cfg.eps, attack_cfg.steps)
        settings.update(steps=attack_cfg.steps, step_size=step_size, random_start=attack_cfg.random_start)
    return {
        "test": summarize(np.asarray(clean), exp.source.metric_name),
        "test_robust": summarize(np.asarray(robust), exp.source.metric_name),
        "attack": settings,
    }


def format_final(entries: dict[str, Any], split: str) -> str:
    """One line: the clean summary and, side by side, the robust one if present."""
    line = f"{split} {format_summary(entries['test'])}"
    if "test_robust" in entries:
        a = entries["attack"]
        line += f" | under {a['name']} eps={a['eps']:g}: {format_summary(entries['test_robust'])}"
    return line


def final_results(exp: Experiment, state: TrainState, cfg: Any, steps: int, entries: dict) -> dict[str, Any]:
    """results.json for ``state``: :func:`evaluate_final` on ``cfg.eval.split`` after
    ``cfg.algo.inner_steps_test`` inner steps, what was evaluated, ``steps``, then the caller's
    ``entries`` (timings, run folder) and the preset's published number."""
    final = evaluate_final(
        exp,
        state.params,
        cfg,
        cfg.eval.split,
        cfg.eval.n_tasks,
        cfg.algo.inner_steps_test,
        state.algo_state,
    )
    return {
        **final,
        "split": cfg.eval.split,
        "inner_steps_test": cfg.algo.inner_steps_test,
        "algo": cfg.algo.name,
        "dataset": cfg.dataset.name,
        "seed": cfg.seed,
        "steps": steps,
        "protocol": protocol_of(cfg),
        **entries,
        # The preset's published number, if any (conf/experiment/), for reports.
        "paper": dict(cfg.paper) if "paper" in cfg else None,
    }


def final_line(results: dict[str, Any], cfg: Any, path: Path) -> str:
    """One line: the final evaluation in ``results`` and where it was written."""
    steps = adaptation_phrase(cfg.algo.name, cfg.algo.inner_steps_test)
    protocol = f"; protocol: {describe_protocol(results['protocol'])}" if "protocol" in results else ""
    return f"{format_final(results, cfg.eval.split)}{steps}{protocol}; results in {path}"


def _check_finite(values: dict[str, float], step: int, run_dir: Path) -> None:
    if not all(math.isfinite(v) for v in values.values()):
        bad = ", ".join(f"{k}={v}" for k, v in values.items() if not math.isfinite(v))
        raise TrainingError(
            f"non-finite values at step {step} ({bad}); stopped without overwriting the last "
            f"checkpoint in {run_dir} (try a lower algo.inner_lr or optim.lr, optim.clip_norm, "
            "or trainer.on_nan=skip)"
        )


def _floats(history: dict[str, jax.Array], row: int) -> dict[str, float]:
    """Row ``row`` (a step of the block) of a block's stacked metrics, as Python floats."""
    return {k: float(v[row]) for k, v in jax.device_get(history).items()}


# Automatic block length (trainer.steps_per_call=0): blocks of about this many seconds, so a
# first SIGTERM/SIGINT is acted on within about that time, and at most this many steps.
_BLOCK_SECONDS = 0.1
_AUTO_MAX_STEPS = 1000


def _next_boundary(step: int, t: Any) -> int:
    """The first step after ``step`` at which the host must see the state: a log,
    validation or checkpoint step, or the last step."""
    periods = (t.log_every, t.val_every, t.checkpoint_every)
    return min([t.steps] + [(step // p + 1) * p for p in periods if p])


class _BlockLengths:
    """How many meta-steps each compiled call runs (:func:`make_meta_block`).

    A block never crosses a log, validation or checkpoint step or the last step, so
    logging, validation, checkpoints and the on_nan check see exactly the states they saw
    with one step per call. The first block is one step (its time is the compile time).
    Blocks are at most ``max_steps`` long: trainer.steps_per_call, or with 0 (automatic)
    the log period capped at ``_AUTO_MAX_STEPS``; host-gathered episodes take one step per
    call. Automatic in a single process, blocks are also timed (each is waited for) and
    sized to about ``_BLOCK_SECONDS``, which bounds the delay before a signal is acted
    on; in a multi-process job signals are acted on at log steps only, so blocks run from
    boundary to boundary and every process makes the same cuts.
    """

    def __init__(self, t: Any, host: bool, multi_process: bool):
        cap = t.steps_per_call or _AUTO_MAX_STEPS
        self.max_steps = 1 if host else max(1, min(cap, t.log_every, t.steps))
        self.timed = t.steps_per_call == 0 and not multi_process and self.max_steps > 1
        self._t, self._cap, self._first = t, self.max_steps, True

    def length(self, step: int) -> int:
        n = 1 if self._first else min(self._cap, _next_boundary(step, self._t) - step)
        self._first = False
        return n

    def observe(self, steps: int, seconds: float) -> None:
        """A timed block of ``steps`` steps took ``seconds`` from dispatch to result."""
        per_step = seconds / steps
        fit = int(_BLOCK_SECONDS / per_step) if per_step > 0 else self.max_steps
        self._cap = max(1, min(self.max_steps, fit))


class Preempted(MetalearnError):
    """Training stopped on SIGTERM/SIGINT after checkpointing; exit code 128 + signal number
    (143 for SIGTERM, 130 for SIGINT), the shell's convention for "ended by a signal"."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class _StopSignals:
    """While active, a first SIGTERM/SIGINT only sets ``signum``: the loop finishes the
    current block of steps (:class:`_BlockLengths`), checkpoints it and stops. A second
    one exits at once. The previous handlers are restored on exit. Does nothing outside
    the main thread, where Python cannot install handlers."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            print(
                f"metalearn: second {signal.Signals(signum).name}: exiting now", file=sys.stderr, flush=True
            )
            os._exit(128 + signum)
        self.signum = signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _any_process_signalled(stop: _StopSignals) -> bool:
    """Whether any process of a multi-process job has received SIGTERM/SIGINT (a small
    all-gather; collective, so every process must call it at the same step). A process
    that was not signalled itself adopts the first signal seen, for its exit code."""
    from jax.experimental import multihost_utils

    mine = np.array([stop.signum or 0], np.int32)
    signals = np.asarray(multihost_utils.process_allgather(mine)).ravel()
    received = [int(s) for s in signals if s]
    if received and stop.signum is None:
        stop.signum = received[0]
    return bool(received)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records of steps <= ``step`` (resume logs the later ones again).

    Rewritten atomically; a line cut short by a kill is dropped.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write("".join(kept))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def train(cfg: Any, run_dir: str | Path, resume_command: str | None = None) -> dict[str, Any]:
    """Meta-train as configured; write metrics.jsonl, checkpoints and results.json to run_dir.

    With ``trainer.resume`` training continues from the newest usable checkpoint in run_dir
    (metrics of later steps are dropped and logged again). SIGTERM/SIGINT checkpoint the
    current step and raise :class:`Preempted`, whose message ends with ``resume_command``.
    Returns the results dict (also saved as results.json).
    """
    from tqdm.auto import tqdm

    validate(cfg)
    t = cfg.trainer
    # Multi-process hook (metalearn.distributed): join the job before any device use; all
    # processes share process 0's run dir, and only process 0 writes files and prints.
    process_note = maybe_initialize(t.distributed)
    main = is_main_process()
    say = print if main else (lambda *args, **kwargs: None)
    run_dir = shared_run_dir(run_dir)
    mesh = task_mesh()
    check_meta_batch(t.meta_batch_size, mesh)  # before anything is written
    run_dir = Path(run_dir)
    if not t.resume and has_checkpoint(run_dir):
        raise ConfigError(
            f"{run_dir} already holds checkpoints: add trainer.resume=true to continue that run, "
            "or choose another hydra.run.dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    exp = setup(cfg)
    metric = exp.source.metric_name
    state = init_state(exp, cfg.seed, mesh)
    metrics_path = run_dir / "metrics.jsonl"
    if t.resume:
        restored = restore_latest(run_dir, state, quarantine=True)
        state = restored if restored is not None else state
        if int(state.step) > t.steps:
            raise ConfigError(
                f"invalid trainer.steps={t.steps}: the checkpoint in {run_dir} is at step {int(state.step)}"
            )
        if main:  # multi-process hook
            _truncate_metrics(metrics_path, int(state.step))
        say(
            f"metalearn: resuming {run_dir} from step {int(state.step)}"
            if restored is not None
            else f"metalearn: no checkpoint in {run_dir}; starting at step 0",
            flush=True,
        )
    # Restored arrays follow the template's sharding; put them in place anyway, at no cost.
    state = replicate(state, mesh)
    start_step = int(state.step)
    skip = t.on_nan == "skip"
    multi_process = jax.process_count() > 1
    blocks = _BlockLengths(t, host=exp.source.host is not None, multi_process=multi_process)
    meta_block = make_meta_block(exp, t.meta_batch_size, skip, mesh, blocks.max_steps)
    # Built once, so validation compiles once.
    validator = (
        make_evaluator(
            exp,
            t.val_tasks,
            cfg.eval.batch_size,
            cfg.algo.inner_steps_test,
            split="validation",
            k_query=getattr(cfg.eval, "k_query", None),
        )
        if t.val_every
        else None
    )
    if exp.source.host is None:
        # On every device once, instead of a host-to-device copy per step.
        train_data = replicate(exp.source.splits["train"], mesh)
        batches = None
    else:
        batches = HostPrefetcher(
            exp.source, state.key, t.meta_batch_size, mesh, start_step, t.steps, cfg.dataset.prefetch
        )
    # metrics.jsonl, mirrored to TensorBoard event files in the run dir if trainer.tensorboard.
    logger = JsonlLogger(metrics_path, tensorboard=t.tensorboard) if main else NullLogger()
    resume_command = resume_command or f"metalearn train ... trainer.resume=true hydra.run.dir={run_dir}"

    say(
        f"metalearn: {cfg.algo.name} on {cfg.dataset.name} ({exp.source.kind}, input "
        f"{exp.source.input_shape}, {exp.source.output_dim} outputs), {t.steps} steps x "
        f"{t.meta_batch_size} tasks, devices: {jax.devices()}; run dir {run_dir}",
        flush=True,
    )
    say(f"metalearn: protocol: {describe_protocol(protocol_of(cfg))}", flush=True)
    if jax.process_count() > 1:
        say(f"metalearn: {process_note}", flush=True)
    if exp.source.placement_note:
        say(f"metalearn: episodes {exp.source.placement_note}", flush=True)
    if main:  # what predict and cross-domain eval will do to new data (metalearn/preprocess.py)
        say(record_run(run_dir, cfg, exp.source), flush=True)
    writer = CheckpointWriter(run_dir, t.keep_checkpoints)
    bar = tqdm(
        total=t.steps, initial=start_step, disable=not (t.progress and main), unit="step", dynamic_ncols=True
    )
    start = last_time = time.perf_counter()
    last_step, compile_s = start_step, None
    step = start_step
    try:
        with _StopSignals() as stop:
            while step < t.steps:
                # A block of n meta-steps in one call; the host acts only at its last step.
                n = blocks.length(step)
                began = time.perf_counter()
                state, history = meta_block(state, train_data if batches is None else next(batches), n)
                step += n
                if compile_s is None:
                    jax.block_until_ready(history)
                    compile_s = time.perf_counter() - start
                    last_time, last_step = time.perf_counter(), step
                elif blocks.timed:
                    jax.block_until_ready(history)
                    blocks.observe(n, time.perf_counter() - began)
                log_due = step % t.log_every == 0 or step == t.steps
                stopping = stop.signum is not None
                if multi_process:
                    # Every process must stop at the same step (the checkpoint save is
                    # collective), so a signal is acted on at the next log step, once the
                    # processes have agreed that one of them received it.
                    stopping = log_due and _any_process_signalled(stop)
                checkpoint_due = stopping or (bool(t.checkpoint_every) and step % t.checkpoint_every == 0)
                if log_due or checkpoint_due:
                    # The only host sync between logs. Every checkpoint follows this check
                    # of its own step, so a non-finite state never reaches disk.
                    values = _floats(history, n - 1)
                    if skip:
                        values["skipped_steps"] = int(state.skipped)
                    else:
                        _check_finite(values, step, run_dir)
                if log_due:
                    now = time.perf_counter()
                    rate = (step - last_step) / (now - last_time) if step > last_step else float("nan")
                    last_time, last_step = now, step
                    logger.log(
                        {"step": step, "split": "train", **values, "steps_per_s": rate, "time_s": now - start}
                    )
                    bar.set_postfix(
                        {
                            "loss": f"{values['loss']:.4f}",
                            metric: f"{values[metric]:.4f}",
                            "steps/s": f"{rate:.1f}",
                        },
                        refresh=False,
                    )
                if t.val_every and step % t.val_every == 0:
                    val = evaluate_params(
                        exp,
                        state.params,
                        cfg,
                        "validation",
                        t.val_tasks,
                        cfg.algo.inner_steps_test,
                        state.algo_state,
                        evaluator=validator,
                    )
                    logger.log(
                        {
                            "step": step,
                            "split": "validation",
                            metric: val["mean"],
                            "ci95": val["ci95"],
                            "n_tasks": val["n_tasks"],
                            "time_s": time.perf_counter() - start,
                        }
                    )
                    if main:
                        bar.write(f"step {step}: validation {format_summary(val)}")
                if checkpoint_due:
                    writer.save(state)
                if stopping:
                    bar.close()
                    name = signal.Signals(stop.signum).name
                    raise Preempted(
                        f"{name} at step {step}: checkpoint saved in {run_dir / 'checkpoints'}; "
                        f"resume with: {resume_command}",
                        stop.signum,
                    )
                bar.update(n)
        bar.close()
        jax.block_until_ready(state)
        train_time = time.perf_counter() - start
        writer.save(state)
    finally:
        writer.close()
        if batches is not None:
            batches.close()

    results = final_results(
        exp, state, cfg, t.steps, {"train_time_s": train_time, "compile_time_s": compile_s}
    )
    if main:  # multi-process hook
        write_json(run_dir / "results.json", results)
    say(final_line(results, cfg, run_dir / "results.json"), flush=True)
    return results
