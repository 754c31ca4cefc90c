"""ANIL (metalearn/algos/anil.py) against independent computations: only the head adapts, and the
meta-gradient of both orders equals a hand-written float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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


def test_anil_both_orders_match_a_float64_reference_with_two_inner_steps(float64):
    steps, n_tasks, lr = 2, 2, 0.1
    grads_by_order = {}
    for first_order in (False, True):
        cfg = make_cfg(
            algo={"name": "anil", "inner_lr": lr, "inner_steps": steps, "first_order": first_order},
            model={"hidden": [8, 8]},
        )
        problem = sinusoid_problem(cfg)
        algo = make_algorithm(cfg.algo, problem)
        params = jax.tree.map(lambda x: x.astype(jnp.float64), algo.init(jax.random.PRNGKey(0)))
        tasks = sampled_tasks64(problem, n_tasks)

        def outer(p0, first_order=first_order, problem=problem, tasks=tasks):
            def update(p, g):  # only the head moves in the inner loop
                head = jax.tree.map(
                    lambda w, gw: w - lr * gw, p["head"], stop_gradient_if(g["head"], first_order)
                )
                return {**p, "head": head}

            return explicit_outer_loss(problem, tasks, n_tasks, steps, p0, update)

        grads_by_order[first_order] = meta_grad_matches(algo, params, tasks, outer)
    body = lambda g: {k: v for k, v in g.items() if k != "head"}
    assert max_leaf_diff(body(grads_by_order[True]), body(grads_by_order[False])) > 1e-6
    assert max_leaf_diff(grads_by_order[True]["head"], grads_by_order[False]["head"]) > 1e-6


def test_anil_adapts_only_the_head_and_differentiates_through_it(float64):
    cfg = make_cfg(algo={"name": "anil", "inner_lr": 0.1, "inner_steps": 2}, model={"hidden": [8, 8]})
    problem = sinusoid_problem(cfg)
    algo = make_algorithm(cfg.algo, problem)
    params = jax.tree.map(lambda x: x.astype(jnp.float64), algo.init(jax.random.PRNGKey(0)))
    tasks = jax.tree.map(lambda x: x.astype(jnp.float64), sampled_tasks(problem, 3))
    t = task_at(tasks, 0)

    head = algo.adapt(params, (), t.support_x, t.support_y, jax.random.PRNGKey(0), 2)
    assert jax.tree.structure(head) == jax.tree.structure(params["head"])
    assert min(leaf_norms(jax.tree.map(jnp.subtract, head, params["head"]))) > 1e-6  # the head moved
    # Prediction = the untouched body of the meta-parameters with the adapted head.
    close32(algo.predict(params, head, t.query_x), problem.model.apply({**params, "head": head}, t.query_x))

    def adapt_reference(p, t):
        """Full-network gradients, but only the head's part is applied: the body stays put."""
        for _ in range(2):
            g = jax.grad(problem.loss)(p, t.support_x, t.support_y)
            p = {**p, "head": jax.tree.map(lambda w, gw: w - 0.1 * gw, p["head"], g["head"])}
        return p

    # The body does have a support-loss gradient; ANIL just does not apply it.
    g = jax.grad(problem.loss)(params, t.support_x, t.support_y)
    assert min(leaf_norms({k: v for k, v in g.items() if k != "head"})) > 1e-8
    reference = adapt_reference(params, t)
    body = {k: v for k, v in params.items() if k != "head"}
    close32({k: v for k, v in reference.items() if k != "head"}, body)
    close32(reference["head"], head, rtol=1e-12)

    grads, _, _ = algo.meta_grad(params, (), tasks, jax.random.PRNGKey(0), 0)

    def outer(p):
        losses = []
        for i in range(3):
            t = task_at(tasks, i)
            losses.append(problem.loss(adapt_reference(p, t), t.query_x, t.query_y))
        return sum(losses) / 3

    assert min(leaf_norms(grads)) > 1e-8  # the outer loop trains the body too
    close32(grads, jax.grad(outer)(params), rtol=1e-9, atol=1e-12)
