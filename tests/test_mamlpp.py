"""MAML++ (metalearn/algos/mamlpp.py) checked against MAML and hand-written references.

Tiny Conv4 (2 blocks of 3 filters, BatchNorm) on synthetic 6x6 images, float64. The
references are plain Python loops over explicit inner steps (no lax.scan, vmap or cond).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import counting_traces, make_cfg, run_cli, synthetic_image_arrays
from flax import traverse_util

from metalearn.algos import Problem, make_algorithm
from metalearn.algos.mamlpp import msl_weights
from metalearn.config import validate
from metalearn.errors import ConfigError
from metalearn.models import make_model
from metalearn.step import init_state, make_meta_step, setup
from metalearn.tasks import image_source

OFF = {"multi_step_loss": False, "lslr": False, "per_step_bn": False, "first_order_steps": 0}


def _cfg(**algo):
    cfg = make_cfg(
        algo={"name": "mamlpp", "inner_lr": 0.05, "inner_steps": 3, **algo},
        dataset={"name": "omniglot", "n_way": 3, "k_shot": 2, "k_query": 2},
        model={"name": "conv4", "filters": 3, "blocks": 2},
    )
    return cfg


def _problem(cfg) -> Problem:
    source = image_source(cfg.dataset, synthetic_image_arrays(n_classes=5, per_class=6, size=6))
    return Problem(make_model(cfg.model, source.input_shape, source.output_dim), source)


def _f64(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _tasks(problem: Problem, n: int = 3, seed: int = 1):
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    return _f64(jax.vmap(problem.source.sample, in_axes=(None, 0))(problem.source.splits["train"], keys))


def _flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def test_every_switch_off_is_maml(float64):
    cfg = _cfg(**OFF)
    problem = _problem(cfg)
    plus = make_algorithm(cfg.algo, problem)
    cfg_maml = _cfg(name="maml")
    maml = make_algorithm(cfg_maml.algo, problem)
    meta = _f64(plus.init(jax.random.PRNGKey(0)))
    assert set(meta) == {"params"}  # no rates, no per-step copies
    params = meta["params"]
    assert jax.tree.structure(params) == jax.tree.structure(maml.init(jax.random.PRNGKey(0)))
    tasks = _tasks(problem)
    expected, _, expected_metrics = maml.meta_grad(params, (), tasks, jax.random.PRNGKey(2), 0)
    for step in (0, 10_000):  # nothing depends on the meta-step with every switch off
        grads, _, metrics = plus.meta_grad(meta, (), tasks, jax.random.PRNGKey(2), jnp.int32(step))
        np.testing.assert_allclose(_flat(grads["params"]), _flat(expected), rtol=1e-12, atol=1e-15)
        assert float(metrics["loss"]) == pytest.approx(float(expected_metrics["loss"]), rel=1e-12)
        assert float(metrics["accuracy"]) == float(expected_metrics["accuracy"])
    task = jax.tree.map(lambda a: a[0], tasks)
    np.testing.assert_allclose(
        _flat(plus.adapt(meta, (), task.support_x, task.support_y, None, 4)),
        _flat(maml.adapt(params, (), task.support_x, task.support_y, None, 4)),
        rtol=1e-12,
    )


def _is_bn(path) -> bool:
    return path[0].startswith("norm_")


def _reference_objective(problem, meta, task, n_steps, weights):
    """sum_i weights[i] * L_Q after inner step i, with LSLR rates and BatchNorm copy i (a
    Python loop over explicit steps; BatchNorm leaves are not adapted)."""
    flat = traverse_util.flatten_dict(meta["params"])
    lrs = traverse_util.flatten_dict(meta["lrs"])
    fast = {k: v for k, v in flat.items() if not _is_bn(k)}
    bn = {k: v for k, v in flat.items() if _is_bn(k)}

    def at_step(f, i):
        return traverse_util.unflatten_dict({**f, **{k: v[i] for k, v in bn.items()}})

    def loss(f, i, x, y):
        return problem.source.loss(problem.model.apply(at_step(f, i), x), y)

    total = 0.0
    for i in range(n_steps):
        g = jax.grad(loss)(fast, i, task.support_x, task.support_y)
        fast = {k: fast[k] - lrs[k][i] * g[k] for k in fast}
        total = total + weights[i] * loss(fast, i, task.query_x, task.query_y)
    return total


def _hand_weights(s, n, m):
    """The reference code's importance vector at 'epoch' s (few_shot_learning_system.py)."""
    if s >= m:
        return np.eye(n)[-1]
    w = np.full(n, 1.0 / n)
    w[:-1] = np.maximum(w[:-1] - s / n / m, 0.03 / n)
    w[-1] = min(1.0 / n + s * (n - 1) / n / m, 1.0 - (n - 1) * 0.03 / n)
    return w


def test_msl_weights_anneal_to_the_last_step(float64):
    np.testing.assert_allclose(msl_weights(3, 5, 10), [0.14, 0.14, 0.14, 0.14, 0.44], rtol=1e-12)
    for s in (0, 1, 7, 9, 10, 11, 500):
        w = np.asarray(msl_weights(jnp.int32(s), 5, 10))
        np.testing.assert_allclose(w, _hand_weights(s, 5, 10), rtol=1e-12)
        assert w.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(msl_weights(0, 4, 3), [0.25] * 4)  # uniform at the start
    np.testing.assert_allclose(msl_weights(3, 4, 3), [0, 0, 0, 1])  # last step only after


def test_multi_step_loss_is_the_weighted_sum_of_per_step_query_losses(float64):
    n_steps, msl, step = 3, 10, 2
    cfg = _cfg(inner_steps=n_steps, msl_steps=msl)
    problem = _problem(cfg)
    algo = make_algorithm(cfg.algo, problem)
    meta = _f64(algo.init(jax.random.PRNGKey(0)))
    # Distinct per-step copies and rates, so a wrong index would show.
    meta = jax.tree.map(
        lambda x: (
            x * (1 + 0.1 * jnp.arange(x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1)))
            if x.ndim and x.shape[0] == n_steps
            else x
        ),
        meta,
    )
    tasks = _tasks(problem)
    weights = _hand_weights(step, n_steps, msl)

    def reference(m):
        return (
            sum(
                _reference_objective(problem, m, jax.tree.map(lambda a, i=i: a[i], tasks), n_steps, weights)
                for i in range(3)
            )
            / 3
        )

    grads, _, metrics = algo.meta_grad(meta, (), tasks, jax.random.PRNGKey(2), jnp.int32(step))
    assert float(metrics["loss"]) == pytest.approx(float(reference(meta)), rel=1e-12)
    np.testing.assert_allclose(_flat(grads), _flat(jax.jit(jax.grad(reference))(meta)), rtol=1e-9, atol=1e-13)
    # During the MSL period the objective is not the last step's loss alone.
    last_only = np.eye(n_steps)[-1]
    other = (
        sum(
            _reference_objective(problem, meta, jax.tree.map(lambda a, i=i: a[i], tasks), n_steps, last_only)
            for i in range(3)
        )
        / 3
    )
    assert abs(float(other) - float(metrics["loss"])) > 1e-6


def test_lslr_rates_and_per_step_batchnorm_get_nonzero_meta_gradients(float64):
    n_steps = 3
    cfg = _cfg(inner_steps=n_steps)
    problem = _problem(cfg)
    algo = make_algorithm(cfg.algo, problem)
    meta = _f64(algo.init(jax.random.PRNGKey(0)))
    flat = traverse_util.flatten_dict(meta["params"])
    bn_keys = [k for k in flat if _is_bn(k)]
    assert bn_keys and all(flat[k].shape[0] == n_steps for k in bn_keys)
    lrs = traverse_util.flatten_dict(meta["lrs"])
    # One rate per inner-adapted array and step, starting at inner_lr; none for BatchNorm.
    assert set(lrs) == set(flat) - set(bn_keys)
    assert all(np.allclose(v, 0.05) and v.shape == (n_steps,) for v in lrs.values())

    grads, _, _ = algo.meta_grad(meta, (), _tasks(problem), jax.random.PRNGKey(2), jnp.int32(0))
    for k, g in traverse_util.flatten_dict(grads["lrs"]).items():
        assert np.all(np.abs(np.asarray(g)) > 0), (k, g)  # every layer, every step
    gp = traverse_util.flatten_dict(grads["params"])
    for k in bn_keys:
        per_step = np.abs(np.asarray(gp[k])).reshape(n_steps, -1).sum(axis=1)
        assert np.all(per_step > 0), (k, per_step)  # every step's copy


def test_adapt_uses_the_learned_rates_and_the_last_steps_batchnorm(float64):
    cfg = _cfg(inner_steps=2)
    problem = _problem(cfg)
    algo = make_algorithm(cfg.algo, problem)
    meta = _f64(algo.init(jax.random.PRNGKey(0)))
    meta["lrs"] = jax.tree.map(lambda r: r * jnp.array([1.0, 3.0]), meta["lrs"])
    meta["params"] = jax.tree.map(
        lambda x: x + jnp.array([0.0, 0.5]).reshape((2,) + (1,) * (x.ndim - 1)) if x.shape[0] == 2 else x,
        meta["params"],
    )
    task = jax.tree.map(lambda a: a[0], _tasks(problem))
    # 3 steps: rates 0.05, 0.15, then the last one (0.15) again; BatchNorm copies 0, 1, 1.
    flat = traverse_util.flatten_dict(meta["params"])
    lrs = traverse_util.flatten_dict(meta["lrs"])
    fast = {k: v for k, v in flat.items() if not _is_bn(k)}
    for i in (0, 1, 1):
        p = traverse_util.unflatten_dict({**fast, **{k: v[i] for k, v in flat.items() if _is_bn(k)}})
        g = traverse_util.flatten_dict(
            jax.grad(lambda q: problem.source.loss(problem.model.apply(q, task.support_x), task.support_y))(p)
        )
        fast = {k: fast[k] - lrs[k][i] * g[k] for k in fast}
    want = traverse_util.unflatten_dict({**fast, **{k: v[1] for k, v in flat.items() if _is_bn(k)}})
    got = algo.adapt(meta, (), task.support_x, task.support_y, None, 3)
    np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        algo.predict(meta, got, task.query_x), problem.model.apply(want, task.query_x), rtol=1e-12
    )


def test_derivative_order_annealing_first_then_second_order_in_one_compilation(float64):
    switch = 2
    cfg = _cfg(**dict(OFF, first_order_steps=switch))
    problem = _problem(cfg)
    algo = make_algorithm(cfg.algo, problem)
    meta = _f64(algo.init(jax.random.PRNGKey(0)))
    tasks = _tasks(problem)
    key = jax.random.PRNGKey(2)
    fomaml = make_algorithm(_cfg(name="fomaml").algo, problem).meta_grad(meta["params"], (), tasks, key, 0)[0]
    maml = make_algorithm(_cfg(name="maml").algo, problem).meta_grad(meta["params"], (), tasks, key, 0)[0]
    assert float(jnp.max(jnp.abs(_flat(fomaml) - _flat(maml)))) > 1e-6

    traces = []

    def grad_at(m, step):
        traces.append(step)  # runs only while tracing
        return algo.meta_grad(m, (), tasks, key, step)[0]

    jitted = jax.jit(grad_at)
    for step in range(5):
        g = _flat(jitted(meta, jnp.int32(step))["params"])
        want = _flat(fomaml if step < switch else maml)
        np.testing.assert_allclose(g, want, rtol=1e-10, atol=1e-14)
    assert len(traces) == 1 and jitted._cache_size() == 1


def test_training_meta_step_crosses_the_order_switch_without_recompiling():
    cfg = _cfg(inner_steps=2, first_order_steps=2, msl_steps=3)
    cfg.model.blocks, cfg.trainer.meta_batch_size = 1, 2
    problem = _problem(cfg)
    exp = setup(cfg, problem.source)
    exp, traces = counting_traces(exp)
    step = make_meta_step(exp, 2)
    state = init_state(exp, seed=0)
    for _ in range(5):  # first order, then second order, MSL on, then off
        state, metrics = step(state, exp.source.splits["train"])
    jax.block_until_ready(state)
    assert np.isfinite(float(metrics["loss"]))
    assert len(traces) == 1 and step._cache_size() == 1


def test_validate_rejects_bad_mamlpp_settings():
    cfg = _cfg(msl_steps=0)
    with pytest.raises(ConfigError, match="algo.msl_steps"):
        validate(cfg)
    cfg = _cfg(first_order_steps=-1)
    with pytest.raises(ConfigError, match="algo.first_order_steps"):
        validate(cfg)


def test_cli_trains_mamlpp_on_sinusoid(tmp_path):
    run_dir = tmp_path / "run"
    run_cli(
        "train",
        "algo=mamlpp",
        "dataset=sinusoid",
        "algo.inner_steps=2",
        "trainer.steps=20",
        "trainer.progress=false",
        "eval.n_tasks=20",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    results = json.loads((run_dir / "results.json").read_text())
    assert results["algo"] == "mamlpp" and results["test"]["n_tasks"] == 20
    assert np.isfinite(results["test"]["mean"])
