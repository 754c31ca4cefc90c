"""CAML / CAVIA (metalearn/algos/caml.py): the context-conditioned models, where FiLM sits, and
the context inner loop against hand-written references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    close32,
    film_input_shapes,
    leaf_norms,
    make_cfg,
    sampled_tasks,
    sinusoid_problem,
    task_at,
)

from metalearn.algos import Problem, make_algorithm
from metalearn.models import make_model, with_context
from metalearn.tasks import image_source


def test_caml_conv4_film_sits_after_block_3():
    """Stride-2 Conv4 on 28x28: the blocks output 14, 7, 4, 2 pixels a side, so the
    modulated activation's size tells the block."""
    cfg = make_cfg(model={"name": "conv4", "filters": 5, "blocks": 4})
    model = make_model(cfg.model, (28, 28, 1), 5, context_size=3)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    x = jnp.zeros((2, 28, 28, 1))
    assert film_input_shapes(model, params, x, jnp.zeros(3)) == [(2, 4, 4, 5)]
    # Fewer blocks than three: FiLM on the last one.
    cfg = make_cfg(model={"name": "conv4", "filters": 5, "blocks": 2})
    model = make_model(cfg.model, (28, 28, 1), 5, context_size=3)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    assert film_input_shapes(model, params, x, jnp.zeros(3)) == [(2, 7, 7, 5)]


def test_caml_miniimagenet_preset_film_after_block_3_of_its_conv4():
    from hydra import compose, initialize_config_dir

    from metalearn.cli import config_dir
    from metalearn.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        cfg = compose(config_name="config", overrides=["experiment=caml_miniimagenet_5w1s"])
    assert (cfg.model.name, cfg.model.blocks, cfg.model.downsample) == ("conv4", 4, "maxpool")
    model = make_model(cfg.model, (84, 84, 3), 5, context_size=cfg.algo.context_size)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    f = cfg.model.filters
    assert params["film"]["dense"]["kernel"].shape == (cfg.algo.context_size, 2 * f)
    # Max-pool after each block: 84 -> 42 -> 21 -> 10; block 3's conv runs at 21x21, and the
    # preset (CAVIA's cavia_model.py) applies FiLM after that block's max-pool, at 10x10.
    assert cfg.model.film_position == "post_pool"
    x = jnp.zeros((1, 84, 84, 3))
    assert film_input_shapes(model, params, x, jnp.zeros(cfg.algo.context_size)) == [(1, 10, 10, f)]


def test_plain_models_unchanged_and_context_models_add_only_context_inputs():
    cfg = make_cfg(model={"hidden": [8, 8]})
    plain = make_model(cfg.model, (1,), 1)
    p = plain.init(jax.random.PRNGKey(0))
    assert set(p) == {"dense_0", "dense_1", "head"} and p["dense_0"]["kernel"].shape == (1, 8)
    ctx = with_context(plain, (1,), 3)
    q = ctx.init(jax.random.PRNGKey(0))
    assert set(q) == set(p) and q["dense_0"]["kernel"].shape == (1 + 3, 8)
    x = jnp.linspace(-1, 1, 5)[:, None]
    # Context zero is concatenated zeros: the extra kernel rows do not matter.
    p_same = {**q, "dense_0": {"kernel": q["dense_0"]["kernel"][:1], "bias": q["dense_0"]["bias"]}}
    close32(ctx.apply(q, x), plain.apply(p_same, x))
    assert float(jnp.max(jnp.abs(ctx.apply(q, x, jnp.ones(3)) - ctx.apply(q, x)))) > 1e-4
    with pytest.raises(ValueError, match="context"):
        plain.apply(p, x, jnp.ones(3))


def test_conv4_film_is_identity_at_zero_context():
    cfg = make_cfg(model={"name": "conv4", "filters": 4, "blocks": 4})
    plain = make_model(cfg.model, (12, 12, 1), 5)
    ctx = make_model(cfg.model, (12, 12, 1), 5, context_size=6)
    params = jax.jit(ctx.init)(jax.random.PRNGKey(0))
    assert set(params) == set(jax.eval_shape(plain.init, jax.random.PRNGKey(0))) | {"film"}
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 12, 12, 1))
    shared = {k: v for k, v in params.items() if k != "film"}
    apply_ctx = jax.jit(ctx.apply)
    expected = jax.jit(plain.apply)(shared, x)
    close32(apply_ctx(params, x, jnp.zeros(6)), expected)
    assert float(jnp.max(jnp.abs(apply_ctx(params, x, jnp.ones(6)) - expected))) > 1e-4


def _reference_context(problem, model, params, task, lr, steps, first_order=False):
    """Explicit steps on the context only, from zero, with the shared params held fixed."""

    def support_loss(c):
        return problem.source.loss(model.apply(params, task.support_x, c), task.support_y)

    c = jnp.zeros(3, task.support_x.dtype)
    for _ in range(steps):
        g = jax.grad(support_loss)(c)
        c = c - lr * (jax.lax.stop_gradient(g) if first_order else g)
    return c


def _reference_caml_outer_loss(params, problem, model, tasks, first_order):
    losses = []
    for i in range(tasks.support_x.shape[0]):
        t = task_at(tasks, i)
        c = _reference_context(problem, model, params, t, 0.5, 2, first_order)
        losses.append(problem.source.loss(model.apply(params, t.query_x, c), t.query_y))
    return sum(losses) / len(losses)


def _caml_setup(first_order=False, steps=2):
    cfg = make_cfg(
        algo={
            "name": "caml",
            "context_size": 3,
            "inner_lr": 0.5,
            "inner_steps": steps,
            "first_order": first_order,
        },
        model={"hidden": [8]},
    )
    problem = sinusoid_problem(cfg)
    return cfg, problem, make_algorithm(cfg.algo, problem)


def test_caml_inner_loop_adapts_only_a_zero_initialised_context():
    cfg, problem, algo = _caml_setup()
    params = algo.init(jax.random.PRNGKey(0))
    # meta-parameters are exactly the shared network: no context among them.
    assert set(params) == {"dense_0", "head"} and params["dense_0"]["kernel"].shape == (1 + 3, 8)
    model = with_context(problem.model, (1,), 3)
    tasks = sampled_tasks(problem, 3)
    key = jax.random.PRNGKey(0)
    for i in range(3):
        t = task_at(tasks, i)
        np.testing.assert_array_equal(algo.adapt(params, (), t.support_x, t.support_y, key, 0), np.zeros(3))
        # Reference: explicit steps on the context only, from zero, with params held fixed.
        adapted = algo.adapt(params, (), t.support_x, t.support_y, key, 2)
        assert adapted.shape == (3,) and float(jnp.linalg.norm(adapted)) > 1e-4
        close32(adapted, _reference_context(problem, model, params, t, lr=0.5, steps=2))
        # The context changes predictions (it is what adapts the network to the task).
        change = algo.predict(params, adapted, t.query_x) - model.apply(params, t.query_x)
        assert float(jnp.max(jnp.abs(change))) > 1e-4


def test_caml_outer_gradient_reaches_shared_params_through_the_context(float64):
    by_order = {}
    for first_order in (False, True):
        cfg, problem, algo = _caml_setup(first_order=first_order)
        model = with_context(problem.model, (1,), 3)
        params = jax.tree.map(lambda x: x.astype(jnp.float64), algo.init(jax.random.PRNGKey(0)))
        tasks = jax.tree.map(lambda x: x.astype(jnp.float64), sampled_tasks(problem, 3))
        grads, _, metrics = algo.meta_grad(params, (), tasks, jax.random.PRNGKey(2), 0)
        assert set(metrics) == {"loss", "mse"}
        assert min(leaf_norms(grads)) > 1e-6  # every shared parameter gets an outer gradient

        reference = jax.grad(_reference_caml_outer_loss)(params, problem, model, tasks, first_order)
        close32(grads, reference, rtol=1e-9, atol=1e-12)
        by_order[first_order] = grads
    # first_order is honoured: dropping the second-order terms changes the gradient.
    assert max(leaf_norms(jax.tree.map(jnp.subtract, by_order[True], by_order[False]))) > 1e-6


def test_caml_on_conv4_builds_and_adapts():
    cfg = make_cfg(
        algo={"name": "caml", "context_size": 4, "inner_lr": 1.0, "inner_steps": 1},
        dataset={"name": "omniglot", "n_way": 5, "k_shot": 1, "k_query": 2},
        model={"name": "conv4", "filters": 8},
    )
    rng = np.random.default_rng(0)
    arrays = {
        s: rng.integers(0, 256, (10, 20, 28, 28, 1), dtype=np.uint8) for s in ("train", "validation", "test")
    }
    source = image_source(cfg.dataset, arrays)
    problem = Problem(make_model(cfg.model, source.input_shape, source.output_dim), source)
    algo = make_algorithm(cfg.algo, problem)
    params = jax.jit(algo.init)(jax.random.PRNGKey(0))
    assert "film" in params and params["film"]["dense"]["kernel"].shape == (4, 2 * 8)
    tasks = sampled_tasks(problem, 2)
    t = task_at(tasks, 0)
    adapt, predict = jax.jit(algo.adapt, static_argnums=5), jax.jit(algo.predict)  # compile once
    context = adapt(params, (), t.support_x, t.support_y, jax.random.PRNGKey(0), 1)
    assert context.shape == (4,) and float(jnp.linalg.norm(context)) > 0
    pred = predict(params, context, t.query_x)
    assert pred.shape == (10, 5)
    assert float(jnp.max(jnp.abs(pred - predict(params, jnp.zeros(4), t.query_x)))) > 0
    grads, _, metrics = jax.jit(algo.meta_grad)(params, (), tasks, jax.random.PRNGKey(1), 0)
    assert set(metrics) == {"loss", "accuracy"} and np.isfinite(float(metrics["loss"]))
    assert float(jnp.linalg.norm(grads["film"]["dense"]["kernel"])) > 0
    assert float(jnp.linalg.norm(grads["conv_0"]["kernel"])) > 0
