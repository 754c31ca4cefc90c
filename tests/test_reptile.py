"""Reptile as openai/supervised-reptile runs it: the inner Adam state carried through the
tasks of a run and into evaluation, held-out training metrics, test episodes with fewer
queries than training ones, the linear meta-step decay, and exact resume with the carried
state. References are explicit Python loops written from the reference's update rules."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    close32,
    leaf_norms,
    make_cfg,
    metric_records,
    sampled_tasks,
    sinusoid_problem,
    synthetic_image_arrays,
    task_at,
)

from metalearn.algos import Problem, make_algorithm
from metalearn.algos.reptile import minibatch_indices, split_examples
from metalearn.checkpoint import CHECKPOINT_DIR, checkpoint_steps
from metalearn.config import validate
from metalearn.errors import ConfigError
from metalearn.evaluation import make_evaluator
from metalearn.models import make_model
from metalearn.optim import make_optimizer
from metalearn.step import Experiment
from metalearn.tasks import Task, image_source, sinusoid_source
from metalearn.train import train


def _to64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _tf_adam_beta1_zero_step(p, g, v, t, lr, b2=0.999, eps=1e-8):
    """One step of TF1 AdamOptimizer(beta1=0), written out in numpy (t: steps so far + 1)."""
    v = {k: {n: v[k][n] + (g[k][n] ** 2 - v[k][n]) * (1 - b2) for n in v[k]} for k in v}
    lr_t = lr * np.sqrt(1 - b2**t)
    p = {k: {n: p[k][n] - lr_t * g[k][n] / (np.sqrt(v[k][n]) + eps) for n in p[k]} for k in p}
    return p, v


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def test_carried_inner_adam_matches_a_sequential_hand_loop_over_two_meta_steps_and_eval(float64):
    lr, steps, batch, train_shots, n_tasks, total = 0.01, 4, 3, 8, 3, 4
    cfg = make_cfg(
        algo={
            "name": "reptile",
            "inner_lr": lr,
            "inner_steps": steps,
            "inner_optimizer": "adam",
            "inner_batch_size": batch,
            "inner_batch_size_test": 2,
            "inner_state": "carry",
            "inner_loss": "sum",
            "train_shots": train_shots,
        },
        dataset={"k_shot": 5, "k_query": 6},
        model={"hidden": [8]},
        optim={"name": "sgd", "lr": 0.5, "schedule": "linear", "final_lr_fraction": 0.0},
    )
    validate(cfg)
    source = sinusoid_source(cfg.dataset)
    problem = Problem(make_model(cfg.model, source.input_shape, source.output_dim), source)
    algo = make_algorithm(cfg.algo, problem)
    optimizer = make_optimizer(cfg.optim, total)
    params = _to64(algo.init(jax.random.PRNGKey(0)))
    state = _to64(algo.init_state(params))
    opt_state = optimizer.init(params)

    grad_fn = jax.jit(jax.grad(lambda q, x, y: jnp.sum(jnp.square(problem.model.apply(q, x) - y))))
    apply = jax.jit(problem.model.apply)
    meta_grad = jax.jit(algo.meta_grad)

    def sum_loss_grad(p, x, y):
        return _np(grad_fn(p, x, y))

    # The hand loop: numpy parameters and Adam state, tasks one after the other.
    hand_p = _np(params)
    hand_v = jax.tree.map(np.zeros_like, hand_p)
    hand_t = 0
    for meta_step in range(2):
        tasks = _to64(
            jax.vmap(source.sample, in_axes=(None, 0))(
                {}, jax.random.split(jax.random.PRNGKey(10 + meta_step), n_tasks)
            )
        )
        key = jax.random.PRNGKey(20 + meta_step)
        adapted, held_losses = [], []
        for i, task_key in enumerate(jax.random.split(key, n_tasks)):
            t = jax.tree.map(lambda a, i=i: np.asarray(a[i]), tasks)
            x = np.concatenate([t.support_x, t.query_x])  # regression: one "class"
            y = np.concatenate([t.support_y, t.query_y])
            tx, ty, hx, hy = x[:train_shots], y[:train_shots], x[train_shots:], y[train_shots:]
            idx = np.asarray(minibatch_indices(task_key, train_shots, batch, steps))
            p = hand_p
            for s in range(steps):
                hand_t += 1
                g = sum_loss_grad(p, tx[idx[s]], ty[idx[s]])
                p, hand_v = _tf_adam_beta1_zero_step(p, g, hand_v, hand_t, lr)
            adapted.append(p)
            held_losses.append(float(np.mean((np.asarray(apply(p, hx)) - hy) ** 2)))
        eps_outer = 0.5 * (1 - meta_step / total)  # train.py: linear from meta-step to 0
        mean_w = jax.tree.map(lambda *ws: sum(ws) / n_tasks, *adapted)
        hand_p = jax.tree.map(lambda w, m, e=eps_outer: w + e * (m - w), hand_p, mean_w)

        grads, state, metrics = meta_grad(params, state, tasks, key, jnp.asarray(meta_step))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(float(metrics["loss"]), np.mean(held_losses), rtol=1e-9)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(hand_p), strict=True):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-9, atol=1e-12)
        for a, b in zip(jax.tree.leaves(state.nu), jax.tree.leaves(hand_v), strict=True):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(float(state.b2_power), 0.999**hand_t, rtol=1e-12)
    assert hand_t == 2 * n_tasks * steps

    # Evaluation: adapt from the carried state (batches of inner_batch_size_test = 2 of the
    # 5 support points), leaving it unchanged.
    t = jax.tree.map(lambda a: np.asarray(a[0]), tasks)
    eval_key, eval_steps = jax.random.PRNGKey(5), 6
    adapt = jax.jit(algo.adapt, static_argnums=5)
    adapted = adapt(params, state, t.support_x, t.support_y, eval_key, eval_steps)
    idx = np.asarray(minibatch_indices(eval_key, 5, 2, eval_steps))
    p, v = hand_p, hand_v
    for s in range(eval_steps):
        g = sum_loss_grad(p, t.support_x[idx[s]], t.support_y[idx[s]])
        p, v = _tf_adam_beta1_zero_step(p, g, v, hand_t + s + 1, lr)
    for a, b in zip(jax.tree.leaves(adapted), jax.tree.leaves(p), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-9, atol=1e-12)
    # The carried state matters: a fresh state adapts differently.
    fresh = adapt(params, algo.init_state(params), t.support_x, t.support_y, eval_key, eval_steps)
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(adapted), strict=True)
    )
    assert diff > 1e-4


def test_reset_switch_starts_every_task_from_a_fresh_state(float64):
    # Full-batch steps (inner_batch_size 0), so no minibatch key is involved.
    base = {"name": "reptile", "inner_lr": 0.01, "inner_steps": 3, "inner_optimizer": "adam"}
    cfgs = {s: make_cfg(algo={**base, "inner_state": s}, model={"hidden": [8]}) for s in ("carry", "reset")}
    source = sinusoid_source(cfgs["carry"].dataset)
    problem = Problem(make_model(cfgs["carry"].model, source.input_shape, source.output_dim), source)
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    tasks = _to64(jax.vmap(source.sample, in_axes=(None, 0))({}, keys))
    carry, reset = (make_algorithm(cfgs[s].algo, problem) for s in ("carry", "reset"))
    params = _to64(carry.init(jax.random.PRNGKey(0)))
    key = jax.random.PRNGKey(2)
    assert reset.init_state(params) == ()
    g_reset, s_reset, _ = jax.jit(reset.meta_grad)(params, (), tasks, key, 0)
    assert s_reset == ()
    carry_grad = jax.jit(carry.meta_grad)
    g_carry, s_carry, _ = carry_grad(params, carry.init_state(params), tasks, key, 0)

    def alone(i):  # task i by itself, from a fresh state
        task = jax.tree.map(lambda a: a[i : i + 1], tasks)
        return carry_grad(params, carry.init_state(params), task, key, 0)[0]

    mean_alone = jax.tree.map(lambda *g: sum(g) / 3, *(alone(i) for i in range(3)))
    for a, b in zip(jax.tree.leaves(g_reset), jax.tree.leaves(mean_alone), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-14)
    # Carrying the state changes the second and third tasks' adaptation ...
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(g_carry), jax.tree.leaves(g_reset), strict=True)
    )
    assert diff > 1e-6
    # ... and the carried state counted every inner step of the three tasks.
    np.testing.assert_allclose(float(s_carry.b2_power), 0.999 ** (3 * 3), rtol=1e-12)


def test_split_examples_takes_the_first_train_shots_of_each_class():
    ways, k_shot, k_query = 3, 2, 4
    # Example (c, j) of class c, j-th overall (support first) is encoded as 10 c + j.
    code = lambda c, js: np.array([[10 * ci + j for j in js] for ci in c], np.float32)
    task = Task(
        support_x=code(range(ways), range(k_shot)).reshape(-1, 1),
        support_y=np.repeat(np.arange(ways), k_shot),
        query_x=code(range(ways), range(k_shot, k_shot + k_query)).reshape(-1, 1),
        query_y=np.repeat(np.arange(ways), k_query),
    )
    tx, ty, hx, hy = split_examples(jax.tree.map(jnp.asarray, task), ways, 5)
    assert np.asarray(tx).ravel().tolist() == [10 * c + j for c in range(ways) for j in range(5)]
    assert np.asarray(ty).tolist() == [c for c in range(ways) for _ in range(5)]
    assert np.asarray(hx).ravel().tolist() == [10 * c + 5 for c in range(ways)]
    assert np.asarray(hy).tolist() == list(range(ways))


def test_training_metric_is_scored_on_held_out_examples_only():
    """With train_shots the logged loss is that of the held-out examples: changing only a
    held-out example changes the loss but not the meta-gradient."""
    cfg = make_cfg(
        algo={
            "name": "reptile",
            "inner_lr": 0.01,
            "inner_steps": 2,
            "inner_optimizer": "adam",
            "train_shots": 12,
        },
        model={"hidden": [8]},
    )
    source = sinusoid_source(cfg.dataset)  # 10 support + 10 query points: 12 train, 8 held out
    problem = Problem(make_model(cfg.model, source.input_shape, source.output_dim), source)
    algo = make_algorithm(cfg.algo, problem)
    meta_grad = jax.jit(algo.meta_grad)
    params = algo.init(jax.random.PRNGKey(0))
    tasks = jax.vmap(source.sample, in_axes=(None, 0))({}, jax.random.split(jax.random.PRNGKey(1), 2))
    g1, _, m1 = meta_grad(params, algo.init_state(params), tasks, jax.random.PRNGKey(2), 0)
    tasks2 = tasks._replace(query_y=tasks.query_y.at[:, -1].add(3.0))  # the last query: held out
    g2, _, m2 = meta_grad(params, algo.init_state(params), tasks2, jax.random.PRNGKey(2), 0)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(m1["loss"]) != float(m2["loss"])
    tasks3 = tasks._replace(query_y=tasks.query_y.at[:, 1].add(3.0))  # a training example
    g3, _, _ = meta_grad(params, algo.init_state(params), tasks3, jax.random.PRNGKey(2), 0)
    assert not np.array_equal(np.asarray(g1["head"]["bias"]), np.asarray(g3["head"]["bias"]))


def test_eval_k_query_scores_the_same_images_as_a_source_with_that_k_query():
    arrays = synthetic_image_arrays(size=8)
    model_cfg = make_cfg(model={"name": "conv4", "filters": 2, "blocks": 1}).model
    algo_cfg = make_cfg(algo={"name": "maml"}).algo  # no adaptation (0 steps below): just scoring
    values = []
    for k_query, eval_k in ((5, 1), (1, None)):
        dcfg = make_cfg(dataset={"name": "omniglot", "n_way": 3, "k_shot": 1, "k_query": k_query}).dataset
        source = image_source(dcfg, arrays, "device")
        problem = Problem(make_model(model_cfg, source.input_shape, source.output_dim), source)
        algo = make_algorithm(algo_cfg, problem)
        exp = Experiment(source, problem.model, algo, optax.sgd(0.1))
        fn = make_evaluator(exp, 8, 4, 0, split="test", k_query=eval_k)
        params = algo.init(jax.random.PRNGKey(0))
        values.append(np.asarray(fn(params, source.splits["test"], jax.random.PRNGKey(4))))
    np.testing.assert_array_equal(values[0], values[1])
    assert len(set(values[0].tolist())) > 1  # per-task accuracies of 3 queries vary


def test_linear_schedule_is_the_reference_meta_step_decay():
    cfg = make_cfg(optim={"name": "sgd", "lr": 1.0, "schedule": "linear", "final_lr_fraction": 0.0})
    opt = make_optimizer(cfg.optim, 10)
    params = {"w": jnp.zeros(())}
    state = opt.init(params)
    for i in range(10):
        updates, state = opt.update({"w": jnp.ones(())}, state, params)
        # supervised_reptile/train.py: frac_done * meta_step_final + (1 - frac_done) * meta_step
        np.testing.assert_allclose(float(-updates["w"]), 1.0 - i / 10, rtol=1e-6)


@pytest.mark.parametrize(
    "section,values,needle",
    [
        ("algo", {"name": "reptile", "inner_state": "keep"}, "algo.inner_state"),
        ("algo", {"name": "reptile", "inner_loss": "max"}, "algo.inner_loss"),
        ("algo", {"name": "reptile", "train_shots": 20}, "algo.train_shots"),
        ("algo", {"name": "reptile", "inner_batch_size_test": -1}, "algo.inner_batch_size_test"),
        ("eval", {"k_query": 11}, "eval.k_query"),
        ("optim", {"schedule": "step"}, "optim.schedule"),
    ],
)
def test_reptile_config_range_checks_name_the_key(section, values, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(make_cfg(**{section: values}))


def test_preset_is_the_reference_command():
    from hydra import compose, initialize_config_dir

    from metalearn.cli import config_dir
    from metalearn.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        preset = compose(config_name="config", overrides=["experiment=reptile_omniglot_5w1s"])
        plain = compose(config_name="config", overrides=["algo=reptile", "dataset=omniglot"])
    a, o, d, t = preset.algo, preset.optim, preset.dataset, preset.trainer
    # --shots 1 --inner-batch 10 --inner-iters 5 --meta-step 1 --meta-step-final 0
    # --meta-batch 5 --meta-iters 100000 --eval-batch 5 --eval-iters 50 --learning-rate 0.001
    # --train-shots 10 --transductive
    assert (d.variant, d.n_way, d.k_shot, a.train_shots, preset.eval.k_query) == ("standard", 5, 1, 10, 1)
    assert (a.inner_batch_size, a.inner_steps, a.inner_batch_size_test, a.inner_steps_test) == (10, 5, 5, 50)
    assert (a.inner_optimizer, a.inner_lr, a.inner_state, a.inner_loss) == ("adam", 0.001, "carry", "sum")
    assert (o.name, o.lr, o.momentum, o.schedule, o.final_lr_fraction) == ("sgd", 1.0, 0.0, "linear", 0.0)
    assert (t.meta_batch_size, t.steps) == (5, 100000)
    assert d.k_shot + d.k_query > a.train_shots  # a held-out example per class
    validate(preset)
    for section in ("algo", "optim"):  # algo=reptile dataset=omniglot gets the same setting
        assert plain[section] == preset[section]
    assert plain.dataset.k_query == d.k_query and plain.eval.k_query == 1


# --- kill and resume with the carried state -------------------------------------------------


def _final_state(run_dir: Path) -> dict:
    import orbax.checkpoint as ocp

    step = checkpoint_steps(run_dir)[0]
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore((run_dir / CHECKPOINT_DIR / str(step) / "default").resolve())


def test_kill_and_resume_is_bitwise_exact_with_the_carried_inner_state(tmp_path):
    """A run resumed from what a kill after step 20 leaves behind (newest checkpoint 20,
    metric lines of later steps) ends bit for bit where the uninterrupted run ends, carried
    Adam state included. (tests/test_resume.py kills real processes; this reuses its
    comparison in-process, with the kill's leftovers made deterministically.)"""
    cfg = make_cfg(
        algo={
            "name": "reptile",
            "inner_optimizer": "adam",
            "inner_lr": 0.01,
            "inner_steps": 3,
            "inner_batch_size": 5,
            "inner_state": "carry",
            "train_shots": 15,
        },
        model={"hidden": [8]},
        optim={"name": "sgd", "lr": 1.0, "schedule": "linear"},
        trainer={
            "steps": 60,
            "meta_batch_size": 4,
            "log_every": 10,
            "checkpoint_every": 20,
            "val_every": 30,
            "val_tasks": 5,
            "progress": False,
        },
        eval={"n_tasks": 5},
        seed=3,
    )
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    first = train(cfg, ref)
    shutil.copytree(ref, killed)
    for step in (40, 60):
        shutil.rmtree(killed / CHECKPOINT_DIR / str(step))
    assert checkpoint_steps(killed) == [20]
    cfg.trainer.resume = True
    resumed = train(cfg, killed)

    assert metric_records(killed) == metric_records(ref)
    assert resumed["test"] == first["test"]
    a, b = _final_state(killed), _final_state(ref)
    nu = jax.tree.leaves(b["algo_state"])
    assert len(nu) > 1 and max(float(np.max(np.abs(x))) for x in nu) > 0  # a real, non-zero Adam state
    for part in ("params", "algo_state"):
        for x, y in zip(jax.tree.leaves(a[part]), jax.tree.leaves(b[part]), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Resuming from a fresh inner state instead would not match: the state is what differs.
    fresh = jax.tree.map(np.zeros_like, b["algo_state"]["nu"])
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(fresh), nu, strict=True))


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
    problem = sinusoid_problem(cfg)
    algo = make_algorithm(cfg.algo, problem)
    params = jax.tree.map(lambda x: x.astype(jnp.float64), algo.init(jax.random.PRNGKey(0)))
    tasks = jax.tree.map(lambda x: x.astype(jnp.float64), sampled_tasks(problem, n_tasks))

    adapted = []
    for i in range(n_tasks):
        t = task_at(tasks, i)
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
    close32(optax.apply_updates(params, updates), expected, rtol=1e-9, atol=1e-12)
    # Metrics are the adapted weights' query loss.
    query = [
        problem.loss(a, task_at(tasks, i).query_x, task_at(tasks, i).query_y) for i, a in enumerate(adapted)
    ]
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
    problem = sinusoid_problem(cfg)
    algo = make_algorithm(cfg.algo, problem)
    params = algo.init(jax.random.PRNGKey(0))
    t = task_at(sampled_tasks(problem, 1), 0)
    a = algo.adapt(params, (), t.support_x, t.support_y, jax.random.PRNGKey(1), 4)
    b = algo.adapt(params, (), t.support_x, t.support_y, jax.random.PRNGKey(2), 4)
    assert max(leaf_norms(jax.tree.map(jnp.subtract, a, b))) > 0  # batches depend on the key


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
