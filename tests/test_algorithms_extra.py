"""CAML, Meta-SGD, Reptile and ANIL checked against independent computations.

References are explicit per-task Python loops (no lax.scan, no vmap) written from each
paper's update rule; the end-to-end runs are jobs of the shared sweep (conftest.tiny_sweep).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_cfg

from metalearn.algos import Problem, make_algorithm
from metalearn.algos.reptile import minibatch_indices
from metalearn.config import validate
from metalearn.errors import ConfigError
from metalearn.models import make_model, with_context
from metalearn.tasks import image_source, sinusoid_source


def _sinusoid_problem(cfg) -> Problem:
    source = sinusoid_source(cfg.dataset)
    return Problem(make_model(cfg.model, source.input_shape, source.output_dim), source)


def _tasks(problem: Problem, n: int, seed: int = 1):
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    return jax.vmap(problem.source.sample, in_axes=(None, 0))(problem.source.splits["train"], keys)


def _task(tasks, i):
    return jax.tree.map(lambda a: a[i], tasks)


def _leaf_norms(tree) -> list[float]:
    return [float(jnp.linalg.norm(x)) for x in jax.tree.leaves(tree)]


def _close(a, b, rtol=1e-5, atol=1e-6) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# --- models: context conditioning ---------------------------------------------------------


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
    _close(ctx.apply(q, x), plain.apply(p_same, x))
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
    _close(apply_ctx(params, x, jnp.zeros(6)), expected)
    assert float(jnp.max(jnp.abs(apply_ctx(params, x, jnp.ones(6)) - expected))) > 1e-4


# --- CAML ----------------------------------------------------------------------------------


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
        t = _task(tasks, i)
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
    problem = _sinusoid_problem(cfg)
    return cfg, problem, make_algorithm(cfg.algo, problem)


def test_caml_inner_loop_adapts_only_a_zero_initialised_context():
    cfg, problem, algo = _caml_setup()
    params = algo.init(jax.random.PRNGKey(0))
    # meta-parameters are exactly the shared network: no context among them.
    assert set(params) == {"dense_0", "head"} and params["dense_0"]["kernel"].shape == (1 + 3, 8)
    model = with_context(problem.model, (1,), 3)
    tasks = _tasks(problem, 3)
    key = jax.random.PRNGKey(0)
    for i in range(3):
        t = _task(tasks, i)
        np.testing.assert_array_equal(algo.adapt(params, (), t.support_x, t.support_y, key, 0), np.zeros(3))
        # Reference: explicit steps on the context only, from zero, with params held fixed.
        adapted = algo.adapt(params, (), t.support_x, t.support_y, key, 2)
        assert adapted.shape == (3,) and float(jnp.linalg.norm(adapted)) > 1e-4
        _close(adapted, _reference_context(problem, model, params, t, lr=0.5, steps=2))
        # The context changes predictions (it is what adapts the network to the task).
        change = algo.predict(params, adapted, t.query_x) - model.apply(params, t.query_x)
        assert float(jnp.max(jnp.abs(change))) > 1e-4


def test_caml_outer_gradient_reaches_shared_params_through_the_context(float64):
    by_order = {}
    for first_order in (False, True):
        cfg, problem, algo = _caml_setup(first_order=first_order)
        model = with_context(problem.model, (1,), 3)
        params = jax.tree.map(lambda x: x.astype(jnp.float64), algo.init(jax.random.PRNGKey(0)))
        tasks = jax.tree.map(lambda x: x.astype(jnp.float64), _tasks(problem, 3))
        grads, _, metrics = algo.meta_grad(params, (), tasks, jax.random.PRNGKey(2), 0)
        assert set(metrics) == {"loss", "mse"}
        assert min(_leaf_norms(grads)) > 1e-6  # every shared parameter gets an outer gradient

        reference = jax.grad(_reference_caml_outer_loss)(params, problem, model, tasks, first_order)
        _close(grads, reference, rtol=1e-9, atol=1e-12)
        by_order[first_order] = grads
    # first_order is honoured: dropping the second-order terms changes the gradient.
    assert max(_leaf_norms(jax.tree.map(jnp.subtract, by_order[True], by_order[False]))) > 1e-6


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
    tasks = _tasks(problem, 2)
    t = _task(tasks, 0)
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


# --- Meta-SGD ------------------------------------------------------------------------------


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
    _close(algo.adapt(meta, (), t.support_x, t.support_y, jax.random.PRNGKey(0), 1), expected, rtol=1e-12)

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
    _close(grads["lrs"], lr_grad, rtol=1e-9, atol=1e-14)


# --- Reptile -------------------------------------------------------------------------------


def _explicit_adam_beta1_zero(grad_fn, p, lr, steps, b2=0.999, eps=1e-8):
    """TF1 Adam with beta1 = 0 written out: m = g, v = b2 v + (1 - b2) g^2,
    w -= lr sqrt(1 - b2^t) g / (sqrt(v) + eps), from a fresh state (algo.inner_state=reset)."""
    v = jax.tree.map(jnp.zeros_like, p)
    for t in range(1, steps + 1):
        g = grad_fn(p)
        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        lr_t = lr * np.sqrt(1 - b2**t)
        p = jax.tree.map(lambda w, g, v, a=lr_t: w - a * g / (jnp.sqrt(v) + eps), p, g, v)
    return p


@pytest.mark.parametrize("inner_optimizer,train_on_query", [("sgd", True), ("sgd", False), ("adam", True)])
def test_reptile_step_is_outer_lr_times_mean_adapted_minus_initial(float64, inner_optimizer, train_on_query):
    lr, steps, eps_outer, n_tasks = 0.05, 3, 0.3, 4
    cfg = make_cfg(
        algo={
            "name": "reptile",
            "inner_lr": lr,
            "inner_steps": steps,
            "inner_optimizer": inner_optimizer,
            "train_on_query": train_on_query,
            "inner_batch_size": 0,
            "inner_state": "reset",
        },
        model={"hidden": [8]},
    )
    problem = _sinusoid_problem(cfg)
    algo = make_algorithm(cfg.algo, problem)
    params = jax.tree.map(lambda x: x.astype(jnp.float64), algo.init(jax.random.PRNGKey(0)))
    tasks = jax.tree.map(lambda x: x.astype(jnp.float64), _tasks(problem, n_tasks))

    adapted = []
    for i in range(n_tasks):
        t = _task(tasks, i)
        x, y = t.support_x, t.support_y
        if train_on_query:
            x, y = jnp.concatenate([x, t.query_x]), jnp.concatenate([y, t.query_y])

        def grad_fn(p, x=x, y=y):
            return jax.grad(problem.loss)(p, x, y)

        if inner_optimizer == "sgd":
            p = params
            for _ in range(steps):
                p = jax.tree.map(lambda w, g: w - lr * g, p, grad_fn(p))
        else:
            p = _explicit_adam_beta1_zero(grad_fn, params, lr, steps)
        adapted.append(p)
    mean_adapted = jax.tree.map(lambda *ws: sum(ws) / n_tasks, *adapted)
    expected = jax.tree.map(lambda w, m: w + eps_outer * (m - w), params, mean_adapted)

    grads, _, metrics = algo.meta_grad(params, (), tasks, jax.random.PRNGKey(3), 0)
    opt = optax.sgd(eps_outer)
    updates, _ = opt.update(grads, opt.init(params), params)
    _close(optax.apply_updates(params, updates), expected, rtol=1e-9, atol=1e-12)
    # Metrics are the adapted weights' query loss.
    query = [problem.loss(a, _task(tasks, i).query_x, _task(tasks, i).query_y) for i, a in enumerate(adapted)]
    np.testing.assert_allclose(float(metrics["loss"]), float(sum(query) / n_tasks), rtol=1e-9)
    assert float(metrics["loss"]) == float(metrics["mse"])


def test_reptile_minibatches_cover_each_epoch_without_replacement():
    idx = np.asarray(minibatch_indices(jax.random.PRNGKey(0), n=6, batch=4, steps=5))
    assert idx.shape == (5, 4)
    flat = idx.reshape(-1)
    for start in range(0, 18, 6):  # 20 draws = 3 full epochs of 6 + 2
        assert sorted(flat[start : start + 6]) == list(range(6))

    cfg = make_cfg(
        algo={
            "name": "reptile",
            "inner_lr": 0.05,
            "inner_steps": 4,
            "inner_optimizer": "sgd",
            "inner_batch_size": 5,
        },
        model={"hidden": [8]},
    )
    problem = _sinusoid_problem(cfg)
    algo = make_algorithm(cfg.algo, problem)
    params = algo.init(jax.random.PRNGKey(0))
    t = _task(_tasks(problem, 1), 0)
    a = algo.adapt(params, (), t.support_x, t.support_y, jax.random.PRNGKey(1), 4)
    b = algo.adapt(params, (), t.support_x, t.support_y, jax.random.PRNGKey(2), 4)
    assert max(_leaf_norms(jax.tree.map(jnp.subtract, a, b))) > 0  # batches depend on the key


# --- ANIL ----------------------------------------------------------------------------------


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
    _close(algo.predict(params, head, t.query_x), problem.model.apply({**params, "head": head}, t.query_x))

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
    _close({k: v for k, v in reference.items() if k != "head"}, body)
    _close(reference["head"], head, rtol=1e-12)

    grads, _, _ = algo.meta_grad(params, (), tasks, jax.random.PRNGKey(0), 0)

    def outer(p):
        losses = []
        for i in range(3):
            t = _task(tasks, i)
            losses.append(problem.loss(adapt_reference(p, t), t.query_x, t.query_y))
        return sum(losses) / 3

    assert min(_leaf_norms(grads)) > 1e-8  # the outer loop trains the body too
    _close(grads, jax.grad(outer)(params), rtol=1e-9, atol=1e-12)


# --- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "algo,needle",
    [
        ({"name": "caml", "context_size": 0}, "algo.context_size"),
        ({"name": "reptile", "inner_optimizer": "rmsprop"}, "algo.inner_optimizer"),
        ({"name": "reptile", "inner_batch_size": -1}, "algo.inner_batch_size"),
    ],
)
def test_new_algo_config_range_checks_name_the_key(algo, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(make_cfg(algo=algo))


def test_reptile_per_dataset_defaults_switch_the_outer_optimizer_to_sgd():
    from hydra import compose, initialize_config_dir

    from metalearn.cli import config_dir
    from metalearn.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        sine = compose(config_name="config", overrides=["algo=reptile"])
        omni = compose(config_name="config", overrides=["algo=reptile", "dataset=omniglot"])
        caml = compose(config_name="config", overrides=["algo=caml", "dataset=omniglot"])
    assert (sine.optim.name, sine.optim.lr, sine.algo.inner_optimizer) == ("sgd", 1.0, "sgd")
    assert (omni.optim.name, omni.optim.lr) == ("sgd", 1.0)
    assert (omni.algo.inner_optimizer, omni.algo.inner_lr) == ("adam", 0.001)
    assert (caml.algo.context_size, caml.algo.inner_lr, caml.model.name) == (100, 1.0, "conv4")


# --- end to end ----------------------------------------------------------------------------
# Each algorithm trains end to end through the CLI as one job of the session's shared sweep
# (conftest.tiny_sweep, SWEEP_ALGOS; checked in test_holes_eval.py, with `metalearn eval`).
