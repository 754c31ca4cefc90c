"""MAML's meta-gradient checked against independent computations.

The references below are written as plain per-task Python loops over explicit gradient
steps (no lax.scan, no vmap), and the second-order gradient is compared with central
finite differences in float64.
"""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import counting_traces, make_cfg, synthetic_image_arrays

from metalearn.algos import Problem, make_algorithm
from metalearn.config import section_config
from metalearn.models import make_model
from metalearn.step import init_state, make_meta_step, setup
from metalearn.tasks import image_source, sinusoid_source


def _problem(kind: str, cfg):
    if kind == "mlp":
        source = sinusoid_source(cfg.dataset)
    else:
        cfg.dataset = section_config("dataset", {"name": "omniglot", "n_way": 3, "k_shot": 2, "k_query": 2})
        cfg.model = section_config("model", {"name": "conv4", "filters": 3, "blocks": 2})
        source = image_source(cfg.dataset, synthetic_image_arrays(n_classes=5, per_class=6, size=6))
    model = make_model(cfg.model, source.input_shape, source.output_dim)
    return Problem(model, source)


def _tasks(problem: Problem, n: int, seed: int = 1):
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    return jax.vmap(problem.source.sample, in_axes=(None, 0))(problem.source.splits["train"], keys)


def _reference_outer_loss(problem, params, task, lr, steps, first_order):
    """Query loss after `steps` explicit SGD steps on the support set (Python loop)."""

    def support_loss(p):
        return problem.source.loss(problem.model.apply(p, task.support_x), task.support_y)

    for _ in range(steps):
        grads = jax.grad(support_loss)(params)
        if first_order:
            grads = jax.lax.stop_gradient(grads)
        params = jax.tree.map(lambda w, g: w - lr * g, params, grads)
    return problem.source.loss(problem.model.apply(params, task.query_x), task.query_y)


def _mean_reference_loss(problem, params, tasks, lr, steps, first_order):
    n = tasks.support_x.shape[0]
    losses = [
        _reference_outer_loss(
            problem, params, jax.tree.map(lambda a, i=i: a[i], tasks), lr, steps, first_order
        )
        for i in range(n)
    ]
    return sum(losses) / n


def _flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_second_order_meta_gradient_matches_finite_differences(float64, kind):
    cfg = make_cfg(algo={"inner_lr": 0.05, "inner_steps": 2}, model={"hidden": [6]})
    problem = _problem(kind, cfg)
    algo = make_algorithm(cfg.algo, problem)
    params = jax.tree.map(lambda x: x.astype(jnp.float64), algo.init(jax.random.PRNGKey(0)))
    tasks = jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, _tasks(problem, 3))

    grads, _, metrics = algo.meta_grad(params, (), tasks, jax.random.PRNGKey(2), 0)
    g = _flat(grads)
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def f(vec):
        return _mean_reference_loss(problem, unravel(vec), tasks, 0.05, 2, first_order=False)

    assert np.isclose(float(metrics["loss"]), float(f(flat)), rtol=1e-10)
    rng = np.random.default_rng(0)
    h = 1e-5
    for _ in range(4):
        v = jnp.asarray(rng.normal(size=flat.shape))
        v = v / jnp.linalg.norm(v)
        fd = (f(flat + h * v) - f(flat - h * v)) / (2 * h)
        assert np.isclose(float(g @ v), float(fd), rtol=1e-5, atol=1e-8), (float(g @ v), float(fd))


@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_first_order_gradient_is_query_gradient_at_adapted_params(float64, kind):
    cfg = make_cfg(algo={"name": "fomaml", "inner_lr": 0.05, "inner_steps": 3}, model={"hidden": [6]})
    problem = _problem(kind, cfg)
    algo = make_algorithm(cfg.algo, problem)
    params = jax.tree.map(lambda x: x.astype(jnp.float64), algo.init(jax.random.PRNGKey(0)))
    tasks = jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, _tasks(problem, 3))
    grads, _, _ = algo.meta_grad(params, (), tasks, jax.random.PRNGKey(2), 0)

    # With the inner gradients' dependence on params stopped, d(adapted)/d(params) = I, so the
    # meta-gradient is grad L_Q at the adapted parameters, averaged over tasks.
    per_task = []
    for i in range(3):
        task = jax.tree.map(lambda a, i=i: a[i], tasks)
        p = params
        for _ in range(3):
            gs = jax.grad(
                lambda q, t=task: problem.source.loss(problem.model.apply(q, t.support_x), t.support_y)
            )(p)
            p = jax.tree.map(lambda w, gw: w - 0.05 * gw, p, gs)
        per_task.append(
            _flat(
                jax.grad(lambda q, t=task: problem.source.loss(problem.model.apply(q, t.query_x), t.query_y))(
                    p
                )
            )
        )
    expected = sum(per_task) / 3
    np.testing.assert_allclose(np.asarray(_flat(grads)), np.asarray(expected), rtol=1e-9, atol=1e-12)

    # ... and it differs from the second-order gradient, so the switch does something.
    cfg.algo.name = "maml"
    second = make_algorithm(cfg.algo, problem).meta_grad(params, (), tasks, jax.random.PRNGKey(2), 0)[0]
    assert float(jnp.max(jnp.abs(_flat(second) - expected))) > 1e-6


def test_vmapped_meta_step_equals_mean_of_per_task_loop(float64):
    """One jitted meta-step with SGD(lr=1) moves params by minus the mean per-task gradient."""
    cfg = make_cfg(
        algo={"inner_lr": 0.02, "inner_steps": 2},
        model={"hidden": [8]},
        optim={"name": "sgd", "lr": 1.0},
        trainer={"meta_batch_size": 4},
    )
    exp = setup(cfg)
    state = init_state(exp, seed=0)
    params64 = jax.tree.map(lambda x: x.astype(jnp.float64), state.params)
    state = state._replace(params=params64, opt_state=exp.optimizer.init(params64))
    params0 = jax.tree.map(np.asarray, params64)
    problem = Problem(exp.model, exp.source)

    # The meta-step's documented key scheme: fold_in(key, step) -> (task key, algo key).
    key = jax.random.fold_in(state.key, 0)
    task_key, _ = jax.random.split(key)
    task_keys = jax.random.split(task_key, 4)
    grads = []
    for k in task_keys:
        task = exp.source.sample({}, k)
        grads.append(
            _flat(jax.grad(lambda p, t=task: _reference_outer_loss(problem, p, t, 0.02, 2, False))(params0))
        )
    expected = _flat(params0) - sum(grads) / 4

    new_state, metrics = make_meta_step(exp, 4)(state, exp.source.splits["train"])
    np.testing.assert_allclose(
        np.asarray(_flat(new_state.params)), np.asarray(expected), rtol=1e-9, atol=1e-12
    )
    assert int(new_state.step) == 1


def test_meta_step_does_not_retrace():
    cfg = make_cfg(model={"hidden": [8]}, trainer={"meta_batch_size": 3})
    exp = setup(cfg)
    exp, traces = counting_traces(exp)
    step = make_meta_step(exp, 3)
    state = init_state(exp, seed=0)
    for _ in range(5):
        state, _ = step(state, exp.source.splits["train"])
    jax.block_until_ready(state)
    assert len(traces) == 1
    assert step._cache_size() == 1
