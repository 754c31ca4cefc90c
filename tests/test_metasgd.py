"""Meta-SGD (metalearn/algos/metasgd.py) against independent computations: a hand-written float64
reference of both orders, per-parameter rates and their meta-gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from conftest import (
    close32,
    explicit_outer_loss,
    leaf_norms,
    make_cfg,
    max_leaf_diff,
    meta_grad_matches,
    sampled_tasks,
    sampled_tasks64,
    sinusoid_problem,
    stop_gradient_if,
    task_at,
)

from metalearn.algos import make_algorithm


def test_metasgd_both_orders_match_a_float64_reference_with_two_inner_steps(float64):
    steps, n_tasks = 2, 2
    grads_by_order = {}
    for first_order in (False, True):
        cfg = make_cfg(
            algo={"name": "metasgd", "inner_lr": 0.05, "inner_steps": steps, "first_order": first_order},
            model={"hidden": [8]},
        )
        problem = sinusoid_problem(cfg)
        algo = make_algorithm(cfg.algo, problem)
        meta = jax.tree.map(lambda x: x.astype(jnp.float64), algo.init(jax.random.PRNGKey(0)))
        # Distinct rates per parameter, so an elementwise product is told from a scalar one.
        meta["lrs"] = jax.tree.map(
            lambda lr: lr * jax.random.uniform(jax.random.PRNGKey(lr.size), lr.shape, lr.dtype, 0.5, 1.5),
            meta["lrs"],
        )
        tasks = sampled_tasks64(problem, n_tasks)

        def outer(m, first_order=first_order, problem=problem, tasks=tasks):
            def update(p, g):
                return jax.tree.map(
                    lambda w, a, gw: w - a * gw, p, m["lrs"], stop_gradient_if(g, first_order)
                )

            return explicit_outer_loss(problem, tasks, n_tasks, steps, m["params"], update)

        grads_by_order[first_order] = meta_grad_matches(algo, meta, tasks, outer)
    # With two steps the orders differ in both the parameters' and the rates' gradients.
    assert max_leaf_diff(grads_by_order[True]["params"], grads_by_order[False]["params"]) > 1e-6
    assert max_leaf_diff(grads_by_order[True]["lrs"], grads_by_order[False]["lrs"]) > 1e-6


def test_metasgd_inner_step_uses_per_parameter_rates_and_rates_get_meta_gradient(float64):
    cfg = make_cfg(algo={"name": "metasgd", "inner_lr": 0.03, "inner_steps": 1}, model={"hidden": [8]})
    problem = sinusoid_problem(cfg)
    algo = make_algorithm(cfg.algo, problem)
    meta = jax.tree.map(lambda x: x.astype(jnp.float64), algo.init(jax.random.PRNGKey(0)))
    assert set(meta) == {"params", "lrs"}
    assert all(np.allclose(lr, 0.03) for lr in jax.tree.leaves(meta["lrs"]))
    # Distinct rates per parameter, so the check below sees elementwise products.
    meta["lrs"] = jax.tree.map(
        lambda lr: lr * jax.random.uniform(jax.random.PRNGKey(lr.size), lr.shape, lr.dtype, 0.5, 1.5),
        meta["lrs"],
    )
    tasks = jax.tree.map(lambda x: x.astype(jnp.float64), sampled_tasks(problem, 3))

    def support_loss(p, t):
        return problem.loss(p, t.support_x, t.support_y)

    def query_loss(p, t):
        return problem.loss(p, t.query_x, t.query_y)

    t = task_at(tasks, 0)
    g_s = jax.grad(support_loss)(meta["params"], t)
    expected = jax.tree.map(lambda p, a, g: p - a * g, meta["params"], meta["lrs"], g_s)
    close32(algo.adapt(meta, (), t.support_x, t.support_y, jax.random.PRNGKey(0), 1), expected, rtol=1e-12)

    grads, _, _ = algo.meta_grad(meta, (), tasks, jax.random.PRNGKey(0), 0)
    assert min(leaf_norms(grads["lrs"])) > 1e-8 and min(leaf_norms(grads["params"])) > 1e-8
    # One step: d L_Q(theta - alpha * g_S) / d alpha = -g_S * grad L_Q(theta'), per task.
    lr_grad = None
    for i in range(3):
        t = task_at(tasks, i)
        g_s = jax.grad(support_loss)(meta["params"], t)
        adapted = jax.tree.map(lambda p, a, g: p - a * g, meta["params"], meta["lrs"], g_s)
        term = jax.tree.map(lambda gs, gq: -gs * gq / 3, g_s, jax.grad(query_loss)(adapted, t))
        lr_grad = term if lr_grad is None else jax.tree.map(jnp.add, lr_grad, term)
    close32(grads["lrs"], lr_grad, rtol=1e-9, atol=1e-14)
