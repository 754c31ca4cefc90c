"""Meta-SGD (metalearn/algos/metasgd.py) against independent computations: a hand-written float64
reference of both orders, per-parameter rates and their meta-gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from conftest import make_cfg

from metalearn.algos import Problem, make_algorithm
from metalearn.models import make_model
from metalearn.tasks import sinusoid_source


def _problem(cfg) -> Problem:
    source = sinusoid_source(cfg.dataset)
    return Problem(make_model(cfg.model, source.input_shape, source.output_dim), source)


def _tasks64(problem: Problem, n: int, seed: int = 1):
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    tasks = jax.vmap(problem.source.sample, in_axes=(None, 0))(problem.source.splits["train"], keys)
    return jax.tree.map(lambda a: a.astype(jnp.float64), tasks)


def _task(tasks, i):
    return jax.tree.map(lambda a: a[i], tasks)


def _close(a, b, rtol=1e-9, atol=1e-12) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _max_diff(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in pairs)


def _sg(tree, first_order: bool):
    return jax.lax.stop_gradient(tree) if first_order else tree


def _explicit_outer(problem, tasks, n_tasks: int, steps: int, params, update):
    """Mean over the first ``n_tasks`` of ``tasks`` of the query loss after ``steps`` inner
    steps ``p <- update(p, grad of the support loss at p)`` from ``params``, written out."""
    total = 0.0
    for i in range(n_tasks):
        t = _task(tasks, i)
        p = params
        for _ in range(steps):
            p = update(p, jax.grad(problem.loss)(p, t.support_x, t.support_y))
        total = total + problem.loss(p, t.query_x, t.query_y)
    return total / n_tasks


def _meta_grad_matches(algo, meta, tasks, outer):
    """Check ``algo.meta_grad``'s loss and gradients at ``meta`` against ``outer``'s
    (float64); return the gradients."""
    grads, _, metrics = jax.jit(algo.meta_grad)(meta, (), tasks, jax.random.PRNGKey(0), 0)
    loss, reference = jax.jit(jax.value_and_grad(outer))(meta)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-12)
    _close(grads, reference)
    return grads


def test_metasgd_both_orders_match_a_float64_reference_with_two_inner_steps(float64):
    steps, n_tasks = 2, 2
    grads_by_order = {}
    for first_order in (False, True):
        cfg = make_cfg(
            algo={"name": "metasgd", "inner_lr": 0.05, "inner_steps": steps, "first_order": first_order},
            model={"hidden": [8]},
        )
        problem = _problem(cfg)
        algo = make_algorithm(cfg.algo, problem)
        meta = jax.tree.map(lambda x: x.astype(jnp.float64), algo.init(jax.random.PRNGKey(0)))
        # Distinct rates per parameter, so an elementwise product is told from a scalar one.
        meta["lrs"] = jax.tree.map(
            lambda lr: lr * jax.random.uniform(jax.random.PRNGKey(lr.size), lr.shape, lr.dtype, 0.5, 1.5),
            meta["lrs"],
        )
        tasks = _tasks64(problem, n_tasks)

        def outer(m, first_order=first_order, problem=problem, tasks=tasks):
            def update(p, g):
                return jax.tree.map(lambda w, a, gw: w - a * gw, p, m["lrs"], _sg(g, first_order))

            return _explicit_outer(problem, tasks, n_tasks, steps, m["params"], update)

        grads_by_order[first_order] = _meta_grad_matches(algo, meta, tasks, outer)
    # With two steps the orders differ in both the parameters' and the rates' gradients.
    assert _max_diff(grads_by_order[True]["params"], grads_by_order[False]["params"]) > 1e-6
    assert _max_diff(grads_by_order[True]["lrs"], grads_by_order[False]["lrs"]) > 1e-6


def _sinusoid_problem(cfg) -> Problem:
    source = sinusoid_source(cfg.dataset)
    return Problem(make_model(cfg.model, source.input_shape, source.output_dim), source)


def _tasks(problem: Problem, n: int, seed: int = 1):
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    return jax.vmap(problem.source.sample, in_axes=(None, 0))(problem.source.splits["train"], keys)


def _leaf_norms(tree) -> list[float]:
    return [float(jnp.linalg.norm(x)) for x in jax.tree.leaves(tree)]


def _close_f32(a, b, rtol=1e-5, atol=1e-6) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_metasgd_inner_step_uses_per_parameter_rates_and_rates_get_meta_gradient(float64):
    cfg = make_cfg(algo={"name": "metasgd", "inner_lr": 0.03, "inner_steps": 1}, model={"hidden": [8]})
    problem = _sinusoid_problem(cfg)
    algo = make_algorithm(cfg.algo, problem)
    meta = jax.tree.map(lambda x: x.astype(jnp.float64), algo.init(jax.random.PRNGKey(0)))
    assert set(meta) == {"params", "lrs"}
    assert all(np.allclose(lr, 0.03) for lr in jax.tree.leaves(meta["lrs"]))
    # Distinct rates per parameter, so the check below sees elementwise products.
    meta["lrs"] = jax.tree.map(
        lambda lr: lr * jax.random.uniform(jax.random.PRNGKey(lr.size), lr.shape, lr.dtype, 0.5, 1.5),
        meta["lrs"],
    )
    tasks = jax.tree.map(lambda x: x.astype(jnp.float64), _tasks(problem, 3))

    def support_loss(p, t):
        return problem.loss(p, t.support_x, t.support_y)

    def query_loss(p, t):
        return problem.loss(p, t.query_x, t.query_y)

    t = _task(tasks, 0)
    g_s = jax.grad(support_loss)(meta["params"], t)
    expected = jax.tree.map(lambda p, a, g: p - a * g, meta["params"], meta["lrs"], g_s)
    _close_f32(algo.adapt(meta, (), t.support_x, t.support_y, jax.random.PRNGKey(0), 1), expected, rtol=1e-12)

    grads, _, _ = algo.meta_grad(meta, (), tasks, jax.random.PRNGKey(0), 0)
    assert min(_leaf_norms(grads["lrs"])) > 1e-8 and min(_leaf_norms(grads["params"])) > 1e-8
    # One step: d L_Q(theta - alpha * g_S) / d alpha = -g_S * grad L_Q(theta'), per task.
    lr_grad = None
    for i in range(3):
        t = _task(tasks, i)
        g_s = jax.grad(support_loss)(meta["params"], t)
        adapted = jax.tree.map(lambda p, a, g: p - a * g, meta["params"], meta["lrs"], g_s)
        term = jax.tree.map(lambda gs, gq: -gs * gq / 3, g_s, jax.grad(query_loss)(adapted, t))
        lr_grad = term if lr_grad is None else jax.tree.map(jnp.add, lr_grad, term)
    _close_f32(grads["lrs"], lr_grad, rtol=1e-9, atol=1e-14)
