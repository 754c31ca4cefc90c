"""ANIL (metalearn/algos/anil.py) against independent computations: only the head adapts, and the
meta-gradient of both orders equals a hand-written float64 reference."""

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


def test_anil_both_orders_match_a_float64_reference_with_two_inner_steps(float64):
    steps, n_tasks, lr = 2, 2, 0.1
    grads_by_order = {}
    for first_order in (False, True):
        cfg = make_cfg(
            algo={"name": "anil", "inner_lr": lr, "inner_steps": steps, "first_order": first_order},
            model={"hidden": [8, 8]},
        )
        problem = _problem(cfg)
        algo = make_algorithm(cfg.algo, problem)
        params = jax.tree.map(lambda x: x.astype(jnp.float64), algo.init(jax.random.PRNGKey(0)))
        tasks = _tasks64(problem, n_tasks)

        def outer(p0, first_order=first_order, problem=problem, tasks=tasks):
            def update(p, g):  # only the head moves in the inner loop
                head = jax.tree.map(lambda w, gw: w - lr * gw, p["head"], _sg(g["head"], first_order))
                return {**p, "head": head}

            return _explicit_outer(problem, tasks, n_tasks, steps, p0, update)

        grads_by_order[first_order] = _meta_grad_matches(algo, params, tasks, outer)
    body = lambda g: {k: v for k, v in g.items() if k != "head"}
    assert _max_diff(body(grads_by_order[True]), body(grads_by_order[False])) > 1e-6
    assert _max_diff(grads_by_order[True]["head"], grads_by_order[False]["head"]) > 1e-6


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


def test_anil_adapts_only_the_head_and_differentiates_through_it(float64):
    cfg = make_cfg(algo={"name": "anil", "inner_lr": 0.1, "inner_steps": 2}, model={"hidden": [8, 8]})
    problem = _sinusoid_problem(cfg)
    algo = make_algorithm(cfg.algo, problem)
    params = jax.tree.map(lambda x: x.astype(jnp.float64), algo.init(jax.random.PRNGKey(0)))
    tasks = jax.tree.map(lambda x: x.astype(jnp.float64), _tasks(problem, 3))
    t = _task(tasks, 0)

    head = algo.adapt(params, (), t.support_x, t.support_y, jax.random.PRNGKey(0), 2)
    assert jax.tree.structure(head) == jax.tree.structure(params["head"])
    assert min(_leaf_norms(jax.tree.map(jnp.subtract, head, params["head"]))) > 1e-6  # the head moved
    # Prediction = the untouched body of the meta-parameters with the adapted head.
    _close_f32(
        algo.predict(params, head, t.query_x), problem.model.apply({**params, "head": head}, t.query_x)
    )

    def adapt_reference(p, t):
        """Full-network gradients, but only the head's part is applied: the body stays put."""
        for _ in range(2):
            g = jax.grad(problem.loss)(p, t.support_x, t.support_y)
            p = {**p, "head": jax.tree.map(lambda w, gw: w - 0.1 * gw, p["head"], g["head"])}
        return p

    # The body does have a support-loss gradient; ANIL just does not apply it.
    g = jax.grad(problem.loss)(params, t.support_x, t.support_y)
    assert min(_leaf_norms({k: v for k, v in g.items() if k != "head"})) > 1e-8
    reference = adapt_reference(params, t)
    body = {k: v for k, v in params.items() if k != "head"}
    _close_f32({k: v for k, v in reference.items() if k != "head"}, body)
    _close_f32(reference["head"], head, rtol=1e-12)

    grads, _, _ = algo.meta_grad(params, (), tasks, jax.random.PRNGKey(0), 0)

    def outer(p):
        losses = []
        for i in range(3):
            t = _task(tasks, i)
            losses.append(problem.loss(adapt_reference(p, t), t.query_x, t.query_y))
        return sum(losses) / 3

    assert min(_leaf_norms(grads)) > 1e-8  # the outer loop trains the body too
    _close_f32(grads, jax.grad(outer)(params), rtol=1e-9, atol=1e-12)
