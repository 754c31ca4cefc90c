"""Checks of behaviour that no other test pinned down (issue #16): Meta-SGD and ANIL in both
derivative orders over two inner steps, where FiLM sits in Conv4 / ResNet-12, the sinusoid
sampler's ranges, the outer optimizer's schedules, and the 95% interval.

References are written out here (explicit loops, float64, schedule formulas by hand)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_cfg

from metalearn.algos import Problem, make_algorithm
from metalearn.metrics import summarize
from metalearn.models import FiLM, make_model
from metalearn.optim import make_optimizer
from metalearn.tasks import sample_sinusoid, sinusoid_source


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


# --- Meta-SGD and ANIL: both orders, two inner steps, against explicit loops --------------


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


# --- FiLM position -------------------------------------------------------------------------


def _film_input_shapes(model, params, x, context):
    """Shapes of the activations FiLM modulates (captured from the module's forward pass)."""
    _, state = jax.eval_shape(
        lambda p: model.module.apply(
            {"params": p},
            x,
            context,
            capture_intermediates=lambda mdl, _: isinstance(mdl, FiLM),
            mutable=["intermediates"],
        ),
        params,
    )
    return [leaf.shape for leaf in jax.tree.leaves(state["intermediates"])]


def test_caml_conv4_film_sits_after_block_3():
    """Stride-2 Conv4 on 28x28: the blocks output 14, 7, 4, 2 pixels a side, so the
    modulated activation's size tells the block."""
    cfg = make_cfg(model={"name": "conv4", "filters": 5, "blocks": 4})
    model = make_model(cfg.model, (28, 28, 1), 5, context_size=3)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    x = jnp.zeros((2, 28, 28, 1))
    assert _film_input_shapes(model, params, x, jnp.zeros(3)) == [(2, 4, 4, 5)]
    # Fewer blocks than three: FiLM on the last one.
    cfg = make_cfg(model={"name": "conv4", "filters": 5, "blocks": 2})
    model = make_model(cfg.model, (28, 28, 1), 5, context_size=3)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    assert _film_input_shapes(model, params, x, jnp.zeros(3)) == [(2, 7, 7, 5)]


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
    assert _film_input_shapes(model, params, x, jnp.zeros(cfg.algo.context_size)) == [(1, 10, 10, f)]


def test_resnet12_film_sits_on_the_third_stage_with_distinct_widths():
    channels = [3, 5, 7, 9]
    cfg = make_cfg(model={"name": "resnet12", "channels": channels})
    model = make_model(cfg.model, (16, 16, 3), 5, context_size=4)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    assert params["film"]["dense"]["kernel"].shape == (4, 2 * 7)
    # Stages halve the size: 16 -> 8 -> 4 -> 2; the third stage computes at 4x4.
    shapes = _film_input_shapes(model, params, jnp.zeros((2, 16, 16, 3)), jnp.zeros(4))
    assert shapes == [(2, 4, 4, 7)]


# --- sinusoid sampler ----------------------------------------------------------------------


def test_sinusoid_amplitude_phase_and_x_ranges():
    amp, phase, x_range = (0.5, 2.0), (0.3, 1.2), (-2.0, 3.0)
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    tasks = jax.vmap(lambda k: sample_sinusoid(k, 6, 6, amp, phase, x_range))(keys)
    x = np.concatenate([tasks.support_x, tasks.query_x], axis=1)[..., 0].astype(np.float64)
    y = np.concatenate([tasks.support_y, tasks.query_y], axis=1)[..., 0].astype(np.float64)
    assert x.min() >= x_range[0] and x.max() <= x_range[1]
    # x covers its range (uniform): both ends of it are reached within 5%.
    assert x.min() < x_range[0] + 0.25 and x.max() > x_range[1] - 0.25
    # Recover each task's amplitude and phase exactly: y = A sin(x - p) = a sin x + b cos x
    # with a = A cos p, b = -A sin p, a linear least-squares fit over its 12 points.
    design = np.stack([np.sin(x), np.cos(x)], axis=-1)  # (T, 12, 2)
    coef = np.stack([np.linalg.lstsq(d, t, rcond=None)[0] for d, t in zip(design, y, strict=True)])
    fitted = np.einsum("tnk,tk->tn", design, coef)
    np.testing.assert_allclose(fitted, y, atol=1e-4)  # the tasks are sinusoids of x
    a_hat = np.hypot(coef[:, 0], coef[:, 1])
    p_hat = np.arctan2(-coef[:, 1], coef[:, 0])
    tol = 1e-3
    assert a_hat.min() >= amp[0] - tol and a_hat.max() <= amp[1] + tol
    assert p_hat.min() >= phase[0] - tol and p_hat.max() <= phase[1] + tol
    # ... and fill them (uniform draws): 400 tasks come within 10% of each end.
    assert a_hat.min() < amp[0] + 0.15 and a_hat.max() > amp[1] - 0.15
    assert p_hat.min() < phase[0] + 0.09 and p_hat.max() > phase[1] - 0.09


def test_sinusoid_source_passes_the_config_ranges_to_the_sampler():
    cfg = make_cfg(dataset={"amp_min": 3.0, "amp_max": 3.5, "x_min": 1.0, "x_max": 1.5})
    source = sinusoid_source(cfg.dataset)
    keys = jax.random.split(jax.random.PRNGKey(0), 50)
    tasks = jax.vmap(source.sample, in_axes=(None, 0))(source.splits["train"], keys)
    x = np.asarray(tasks.support_x)
    assert x.min() >= 1.0 and x.max() <= 1.5
    # Over x in [1, 1.5] and phase in [0, pi], |y| <= A <= 3.5, and some task exceeds 2.
    y = np.abs(np.asarray(tasks.support_y))
    assert y.max() <= 3.5 + 1e-5 and y.max() > 2.0


# --- outer optimizer -----------------------------------------------------------------------


def _optim_cfg(**values):
    return make_cfg(optim=values).optim


def _written_out_lr(step: int, lr: float, warmup: int, total: int, schedule: str, final: float) -> float:
    """The learning rate of update number ``step`` (0-based), as documented in OptimConfig."""
    if warmup and step < warmup:
        return lr * step / warmup
    if schedule == "constant":
        return lr
    decay = max(total, warmup + 1) - warmup
    progress = min(step - warmup, decay) / decay
    end = lr * final
    if schedule == "linear":  # supervised-reptile's meta step: a straight line to the end value
        return lr + (end - lr) * progress
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * progress))


def _sgd_rates(opt, n: int) -> list[float]:
    """Learning rates an SGD optimizer applies: the update for a gradient of ones, negated."""
    params = {"w": jnp.zeros(3)}
    state = opt.init(params)
    rates = []
    for _ in range(n):
        updates, state = opt.update({"w": jnp.ones(3)}, state, params)
        rates.append(-float(updates["w"][0]))
    return rates


@pytest.mark.parametrize(
    "schedule,warmup,final",
    [("constant", 0, 0.0), ("constant", 4, 0.0), ("cosine", 0, 0.0), ("cosine", 3, 0.1), ("cosine", 0, 0.25)],
)
def test_make_optimizer_schedules_follow_the_written_out_formula(schedule, warmup, final):
    lr, total = 0.5, 10
    cfg = _optim_cfg(name="sgd", lr=lr, schedule=schedule, warmup_steps=warmup, final_lr_fraction=final)
    got = _sgd_rates(make_optimizer(cfg, total), total + 3)  # and past the end: stays at the end value
    want = [_written_out_lr(s, lr, warmup, total, schedule, final) for s in range(total + 3)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_make_optimizer_reptile_preset_decays_the_meta_step_to_zero():
    from hydra import compose, initialize_config_dir

    from metalearn.cli import config_dir
    from metalearn.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        cfg = compose(config_name="config", overrides=["experiment=reptile_omniglot_5w1s"])
    o = cfg.optim
    # supervised-reptile/train.py: eps = frac_done * meta_step_final + (1 - frac_done) * meta_step
    assert (o.name, o.schedule, o.lr, o.final_lr_fraction) == ("sgd", "linear", 1.0, 0.0)
    total = 8  # the preset's schedule shape over a short budget
    got = _sgd_rates(make_optimizer(o, total), total + 1)
    want = [_written_out_lr(s, o.lr, o.warmup_steps, total, "linear", 0.0) for s in range(total + 1)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert got[0] == pytest.approx(1.0) and got[total] == pytest.approx(0.0, abs=1e-7)


def test_make_optimizer_momentum_and_clip_norm():
    lr, m, clip = 0.1, 0.9, 1.0
    opt = make_optimizer(_optim_cfg(name="sgd", lr=lr, momentum=m, clip_norm=clip), 100)
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    state = opt.init(params)
    grads = [
        {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])},  # norm 5: clipped to norm 1
        {"a": jnp.array([0.2, 0.1]), "b": jnp.array([-0.2])},  # norm 0.3: not clipped
        {"a": jnp.array([-6.0, 8.0]), "b": jnp.array([0.0])},  # norm 10: clipped
    ]
    velocity = np.zeros(3)
    for g in grads:
        flat = np.concatenate([np.asarray(g["a"]), np.asarray(g["b"])]).astype(np.float64)
        norm = np.linalg.norm(flat)
        clipped = flat * min(1.0, clip / norm)
        velocity = clipped + m * velocity  # heavy-ball trace, as optax.sgd(momentum=...)
        updates, state = opt.update(g, state, params)
        got = np.concatenate([np.asarray(updates["a"]), np.asarray(updates["b"])])
        np.testing.assert_allclose(got, -lr * velocity, rtol=1e-5, atol=1e-7)


def test_make_optimizer_adam_with_warmup_and_clipping():
    lr, warmup, clip = 0.01, 2, 0.5
    opt = make_optimizer(_optim_cfg(name="adam", lr=lr, warmup_steps=warmup, clip_norm=clip), 10)
    params = {"w": jnp.zeros(2)}
    state = opt.init(params)
    m = v = np.zeros(2)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t, g in enumerate([np.array([3.0, -4.0]), np.array([0.1, 0.2]), np.array([-1.0, 1.0])], start=1):
        gc = g * min(1.0, clip / np.linalg.norm(g))
        m = b1 * m + (1 - b1) * gc
        v = b2 * v + (1 - b2) * gc * gc
        step_lr = _written_out_lr(t - 1, lr, warmup, 10, "constant", 0.0)
        want = -step_lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        updates, state = opt.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        np.testing.assert_allclose(np.asarray(updates["w"]), want, rtol=1e-4, atol=1e-9)


# --- 95% interval --------------------------------------------------------------------------


def test_ci95_is_1_96_std_over_sqrt_n_on_known_values():
    s = summarize(np.array([1.0, 2.0, 3.0, 4.0]), "mse")
    # population std of 1..4 = sqrt(1.25); n = 4
    assert s["mean"] == 2.5 and s["n_tasks"] == 4
    assert s["ci95"] == pytest.approx(1.96 * math.sqrt(1.25) / 2, rel=1e-12)
    s = summarize(np.array([0.0, 1.0] * 50), "accuracy")  # std 0.5, n 100
    assert s["ci95"] == pytest.approx(1.96 * 0.5 / 10, rel=1e-12)
    assert summarize(np.full(7, 0.3), "accuracy")["ci95"] == 0.0


@pytest.mark.parametrize("eps", [1e-8, 1e-3, 0.5])
def test_make_optimizer_adam_epsilon_enters_the_first_update(eps):
    # Adam's first bias-corrected update is -lr * g / (|g| + eps) (m_hat = g, v_hat = g^2).
    lr = 0.1
    g = jnp.asarray([2e-3, -0.4, 3.0])
    opt = make_optimizer(_optim_cfg(name="adam", lr=lr, eps=eps), 10)
    update, _ = opt.update(g, opt.init(jnp.zeros(3)), jnp.zeros(3))
    np.testing.assert_allclose(update, -lr * g / (jnp.abs(g) + eps), rtol=1e-5)
