"""Evaluation on held-out tasks: the compiled evaluator (clean, or under an attack), the
summaries of validation and of the final test, and results.json's entries. Used by the
training loop (metalearn/train.py), `metalearn eval` (metalearn/evaluate.py) and tests."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metalearn.adaptation import adaptation_of
from metalearn.algos import adaptation_phrase, test_steps
from metalearn.attacks import Attack, attack_from_config, default_step_size
from metalearn.metrics import format_summary, summarize
from metalearn.protocol import describe_protocol, protocol_of
from metalearn.selection import Selection
from metalearn.step import Experiment, TrainState, stream_key

PyTree = Any

# Streams derived from the seed for the validation and test tasks (training and
# initialisation use 0 and 3, metalearn/step.py); fixed, so that `metalearn eval` sees the
# same test tasks as the end of training.
VALIDATION_STREAM, TEST_STREAM = 1, 2


def make_evaluator(
    exp: Experiment,
    n_tasks: int,
    batch_size: int,
    inner_steps: int,
    attack: Attack | None = None,
    split: str = "test",
    k_query: int | None = None,
    ensemble: bool = False,
    with_loss: bool = False,
):
    """Compile ``(params, data, key, algo_state=()) -> per-task metric (n_tasks,)``.

    ``algo_state`` is the algorithm's carried state (TrainState.algo_state); every task
    adapts from it, and it is not changed.

    Task i is drawn from fold_in(key, i), so the tasks do not depend on ``batch_size``;
    ``batch_size`` tasks are adapted in parallel (vmap), chunks run under ``lax.map``.

    ``k_query`` (eval.k_query): score only the first ``k_query`` query examples per class
    of each sampled task (None: all of them).

    With ``ensemble`` (eval.checkpoint=top_k), ``params`` and ``algo_state`` hold K members
    stacked on a leading axis: each member adapts to the task from its own parameters and
    state (same task, same key), and the metric is taken of the mean of their K outputs
    (logits for classification, as MAML++'s code averages them; predictions for regression).

    With ``with_loss`` (validation for early stopping or loss ranking) the result is a pair
    ``(metric, loss)`` of (n_tasks,) arrays: the query loss of each task beside its metric.

    With ``attack`` the result is a pair ``(clean, robust)`` of (n_tasks,) arrays: after the
    same clean adaptation to the same tasks, the query inputs are attacked against the
    adapted model (loss ``source.loss(predict(params, adapted, x), y)``) and scored again.

    When the source samples on the host, the returned function gathers the tasks of
    ``split`` on the host chunk by chunk (same tasks, same results) and ignores ``data``.

    A multi-source task source (``source.parts``, dataset=multi) is evaluated per source: the
    result is ``{label: result of that source}``, each source's from the evaluator of that
    source alone (same key, so the same tasks), ``data`` the tuple of the sources' data.
    """
    if exp.source.parts:
        per_source = {
            label: make_evaluator(
                exp._replace(source=part),
                n_tasks,
                batch_size,
                inner_steps,
                attack,
                split,
                k_query,
                ensemble,
                with_loss,
            )
            for label, part in exp.source.parts
        }

        def evaluate_sources(params: PyTree, data: PyTree, key: jax.Array, algo_state: PyTree = ()) -> dict:
            return {
                label: fn(params, data[i], key, algo_state)
                for i, (label, fn) in enumerate(per_source.items())
            }

        return evaluate_sources
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
        if ensemble:
            member_outputs = lax.map(
                lambda member: algo.predict(
                    member[0],
                    algo.adapt(member[0], member[1], task.support_x, task.support_y, adapt_key, inner_steps),
                    task.query_x,
                ),
                (params, algo_state),
            )
            return source.metric(jnp.mean(member_outputs, axis=0), task.query_y)
        adapted = algo.adapt(params, algo_state, task.support_x, task.support_y, adapt_key, inner_steps)
        query_out = algo.predict(params, adapted, task.query_x)
        clean = source.metric(query_out, task.query_y)
        if with_loss:
            return clean, source.loss(query_out, task.query_y)
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
    stream = VALIDATION_STREAM if split == "validation" else TEST_STREAM
    k_query = getattr(cfg.eval, "k_query", None)
    fn = evaluator or make_evaluator(
        exp, n_tasks, cfg.eval.batch_size, inner_steps, split=split, k_query=k_query
    )
    values = fn(params, _split_data(exp, split), stream_key(cfg.seed, stream), algo_state)
    return summarize_values(values, exp.source.metric_name)


def summarize_values(values: Any, metric: str) -> dict[str, Any]:
    """The summary of an evaluator's result: per-task values (n_tasks,), a pair (metric,
    loss) of an evaluator made with_loss, or, for a multi-source source, ``{label: either}``
    (summarised per source and combined: metalearn.multisource.combine_summaries)."""
    if isinstance(values, dict):
        from metalearn.multisource import combine_summaries

        return combine_summaries({label: summarize_values(v, metric) for label, v in values.items()})
    if isinstance(values, tuple):  # (metric, loss): an evaluator made with_loss
        values, losses = values
        return {**summarize(np.asarray(values), metric), "loss": float(np.mean(losses))}
    return summarize(np.asarray(values), metric)


def evaluate_final(
    exp: Experiment,
    params: PyTree,
    cfg: Any,
    split: str,
    n_tasks: int,
    inner_steps: int,
    algo_state: PyTree = (),
    ensemble: bool = False,
) -> dict[str, Any]:
    """The final evaluation's results entries: ``test`` (clean summary) and, when
    ``cfg.attack`` names an attack, ``test_robust`` (same format, on attacked query sets of
    the same tasks) and ``attack`` (its settings). ``ensemble``: ``params`` and ``algo_state``
    hold stacked members whose outputs are averaged (:func:`make_evaluator`; no attack)."""
    attack_cfg = getattr(cfg, "attack", None)
    attack = attack_from_config(attack_cfg, exp.source.input_range)
    if ensemble:
        fn = make_evaluator(
            exp,
            n_tasks,
            cfg.eval.batch_size,
            inner_steps,
            split=split,
            k_query=getattr(cfg.eval, "k_query", None),
            ensemble=True,
        )
        return {"test": evaluate_params(exp, params, cfg, split, n_tasks, inner_steps, algo_state, fn)}
    if attack is None:
        return {"test": evaluate_params(exp, params, cfg, split, n_tasks, inner_steps, algo_state)}
    stream = VALIDATION_STREAM if split == "validation" else TEST_STREAM
    k_query = getattr(cfg.eval, "k_query", None)
    fn = make_evaluator(exp, n_tasks, cfg.eval.batch_size, inner_steps, attack, split=split, k_query=k_query)
    pairs = fn(params, _split_data(exp, split), stream_key(cfg.seed, stream), algo_state)
    if isinstance(pairs, dict):  # per source: {label: (clean, robust)}
        clean, robust = ({label: pair[i] for label, pair in pairs.items()} for i in (0, 1))
    else:
        clean, robust = pairs
    settings = {"name": attack_cfg.name, "eps": attack_cfg.eps}
    if attack_cfg.name == "pgd":
        step_size = attack_cfg.step_size
        if step_size is None:  # record the step size actually used
            step_size = default_step_size(attack_cfg.eps, attack_cfg.steps)
        settings.update(steps=attack_cfg.steps, step_size=step_size, random_start=attack_cfg.random_start)
    return {
        "test": summarize_values(clean, exp.source.metric_name),
        "test_robust": summarize_values(robust, exp.source.metric_name),
        "attack": settings,
    }


def format_final(entries: dict[str, Any], split: str) -> str:
    """One line: the clean summary and, side by side, the robust one if present."""
    line = f"{split} {_with_sources(entries['test'])}"
    if "test_robust" in entries:
        a = entries["attack"]
        line += f" | under {a['name']} eps={a['eps']:g}: {_with_sources(entries['test_robust'])}"
    return line


def _with_sources(summary: dict[str, Any]) -> str:
    """``format_summary``, and for a multi-source summary each source's in brackets:
    ``accuracy 80.00% +- 1.00% (1200 tasks) = mean over 2 sources [omniglot accuracy ...]``."""
    text = format_summary(summary)
    if "sources" not in summary:
        return text
    parts = "; ".join(f"{label} {format_summary(s)}" for label, s in summary["sources"].items())
    return f"{text} = mean over {len(summary['sources'])} sources [{parts}]"


def final_results(
    exp: Experiment,
    state: TrainState | None,
    cfg: Any,
    steps: int,
    entries: dict,
    selection: Selection | None = None,
) -> dict[str, Any]:
    """results.json for ``state``: :func:`evaluate_final` on ``cfg.eval.split`` after
    ``cfg.algo.inner_steps_test`` inner steps, what was evaluated, ``steps``, then the caller's
    ``entries`` (timings, run folder) and the preset's published number.

    ``selection``: the checkpoints eval.checkpoint=best/top_k chose
    (:func:`metalearn.selection.select_checkpoints`), tested instead of ``state`` and
    recorded as ``checkpoints`` (their steps and validation metric); None: ``state``."""
    tested = state if selection is None else selection
    params, algo_state = tested.params, tested.algo_state
    final = evaluate_final(
        exp,
        params,
        cfg,
        cfg.eval.split,
        cfg.eval.n_tasks,
        test_steps(cfg.algo),
        algo_state,
        ensemble=selection is not None and selection.ensemble,
    )
    chosen = {} if selection is None else {"checkpoints": selection.record()}
    return {
        **final,
        "split": cfg.eval.split,
        "inner_steps_test": test_steps(cfg.algo),
        "algo": cfg.algo.name,
        "dataset": cfg.dataset.name,
        "seed": cfg.seed,
        "steps": steps,
        "protocol": protocol_of(cfg),
        # model.init_from: the run whose backbone this one started from (metalearn/backbone.py).
        **({"init_from": str(cfg.model.init_from)} if cfg.model.get("init_from") else {}),
        **chosen,
        **entries,
        # The preset's published number, if any (conf/experiment/), for reports.
        "paper": dict(cfg.paper) if "paper" in cfg else None,
    }


def final_line(results: dict[str, Any], cfg: Any, path: Path) -> str:
    """One line: the final evaluation in ``results`` and where it was written."""
    steps = adaptation_phrase(cfg.algo.name, test_steps(cfg.algo))
    if adaptation_of(cfg.eval) != "algorithm":  # the protocol phrase names the rule used instead
        steps = ""
    protocol = f"; protocol: {describe_protocol(results['protocol'])}" if "protocol" in results else ""
    return f"{format_final(results, cfg.eval.split)}{steps}{protocol}; results in {path}"
