"""ADML's outer loss and meta-gradient against an independent per-task reference, plus its
config checks and an end-to-end `metalearn train algo=adml` -> `metalearn eval attack=fgsm`."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from conftest import make_cfg, run_cli, synthetic_image_arrays

from metalearn.algos import Problem, make_algorithm
from metalearn.config import section_config, validate
from metalearn.errors import ConfigError
from metalearn.models import make_model
from metalearn.step import init_state, make_meta_step, setup
from metalearn.tasks import image_source, sinusoid_source


def _problem(kind: str, cfg) -> Problem:
    if kind == "mlp":
        source = sinusoid_source(cfg.dataset)
    else:
        cfg.dataset = section_config("dataset", {"name": "omniglot", "n_way": 3, "k_shot": 2, "k_query": 2})
        # One block keeps the second-order compile cheap; BatchNorm and clipping are still in.
        cfg.model = section_config("model", {"name": "conv4", "filters": 3, "blocks": 1})
        source = image_source(cfg.dataset, synthetic_image_arrays(n_classes=5, per_class=6, size=6))
    return Problem(make_model(cfg.model, source.input_shape, source.output_dim), source)


def _f64_tasks(problem: Problem, n: int, seed: int = 1):
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    tasks = jax.vmap(problem.source.sample, in_axes=(None, 0))(problem.source.splits["train"], keys)
    return jax.tree.map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tasks
    )


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


# ---- independent reference: plain Python per task, explicit gradient steps -------------


def _reference(problem, params, tasks, lr, steps, eps, first_order, regenerate, crossed=True):
    """(mean over tasks of the ADML task loss, its gradient w.r.t. params)."""
    lo_hi = problem.source.input_range

    def loss(p, x, y):
        return problem.source.loss(problem.model.apply(p, x), y)

    def fgsm_by_hand(p, x, y):
        g = jax.grad(lambda z: loss(p, z, y))(x)
        x_adv = x + eps * jnp.sign(g)
        return x_adv if lo_hi is None else jnp.clip(x_adv, lo_hi[0], lo_hi[1])

    def sgd(p, x, y):
        for _ in range(steps):
            g = jax.grad(loss)(p, x, y)
            if first_order:
                g = jax.lax.stop_gradient(g)
            p = jax.tree.map(lambda w, gw: w - lr * gw, p, g)
        return p

    n = tasks.support_x.shape[0]
    per_task = [jax.tree.map(lambda a, i=i: a[i], tasks) for i in range(n)]
    # Adversarial sets are computed here, from concrete parameters, outside the function that
    # is differentiated: they are data, so no gradient can flow through them.
    adversarial = []
    for t in per_task:
        anchor = sgd(params, t.support_x, t.support_y) if regenerate else params
        adversarial.append(
            (
                np.asarray(fgsm_by_hand(params, t.support_x, t.support_y)),
                np.asarray(fgsm_by_hand(anchor, t.query_x, t.query_y)),
            )
        )

    def outer(p):
        total = 0.0
        for t, (support_adv, query_adv) in zip(per_task, adversarial, strict=True):
            theta_c = sgd(p, t.support_x, t.support_y)
            theta_a = sgd(p, support_adv, t.support_y)
            if crossed:
                total = total + loss(theta_c, query_adv, t.query_y) + loss(theta_a, t.query_x, t.query_y)
            else:  # the uncrossed pairing, to show the test can tell them apart
                total = total + loss(theta_c, t.query_x, t.query_y) + loss(theta_a, query_adv, t.query_y)
        return total / n

    return jax.value_and_grad(outer)(params)


@pytest.mark.parametrize(
    "kind, first_order, regenerate",
    [("mlp", False, False), ("mlp", True, False), ("mlp", False, True), ("conv4", False, False)],
)
def test_meta_grad_matches_crossed_reference(float64, kind, first_order, regenerate):
    eps = 0.3 if kind == "mlp" else 0.1
    cfg = make_cfg(
        algo={
            "name": "adml",
            "inner_lr": 0.05,
            "inner_steps": 2,
            "first_order": first_order,
            "eps": eps,
            "attack": "fgsm",
            "regenerate_adversarial": regenerate,
        },
        model={"hidden": [6]},
    )
    problem = _problem(kind, cfg)
    algo = make_algorithm(cfg.algo, problem)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), algo.init(jax.random.PRNGKey(0)))
    tasks = _f64_tasks(problem, 3)

    grads, _, metrics = jax.jit(algo.meta_grad)(params, (), tasks, jax.random.PRNGKey(2), 0)
    ref_loss, ref_grads = _reference(problem, params, tasks, 0.05, 2, eps, first_order, regenerate)

    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-10)
    np.testing.assert_allclose(_flat(grads), _flat(ref_grads), rtol=1e-8, atol=1e-11)
    if kind == "mlp" and not first_order and not regenerate:
        other, _ = _reference(problem, params, tasks, 0.05, 2, eps, False, False, crossed=False)
        assert abs(float(other) - float(ref_loss)) > 1e-6


def test_metric_is_clean_adaptation_on_clean_query(float64):
    cfg = make_cfg(algo={"name": "adml", "inner_lr": 0.05, "inner_steps": 2}, model={"hidden": [6]})
    problem = _problem("mlp", cfg)
    algo = make_algorithm(cfg.algo, problem)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), algo.init(jax.random.PRNGKey(0)))
    tasks = _f64_tasks(problem, 3)
    _, _, metrics = algo.meta_grad(params, (), tasks, jax.random.PRNGKey(0), 0)
    expected = []
    for i in range(3):
        t = jax.tree.map(lambda a, i=i: a[i], tasks)
        adapted = algo.adapt(params, (), t.support_x, t.support_y, jax.random.PRNGKey(0), 2)
        expected.append(float(problem.source.metric(algo.predict(params, adapted, t.query_x), t.query_y)))
    np.testing.assert_allclose(float(metrics["mse"]), np.mean(expected), rtol=1e-10)


def test_zero_eps_is_twice_maml(float64):
    """With eps = 0 both adversarial sets are the clean ones: loss and grads are 2 x MAML's."""
    cfg = make_cfg(
        algo={"name": "adml", "inner_lr": 0.05, "inner_steps": 2, "eps": 0.0}, model={"hidden": [6]}
    )
    problem = _problem("mlp", cfg)
    adml = make_algorithm(cfg.algo, problem)
    cfg.algo.name = "maml"
    maml = make_algorithm(cfg.algo, problem)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), adml.init(jax.random.PRNGKey(0)))
    tasks = _f64_tasks(problem, 4)
    g_adml, _, m_adml = adml.meta_grad(params, (), tasks, jax.random.PRNGKey(1), 0)
    g_maml, _, m_maml = maml.meta_grad(params, (), tasks, jax.random.PRNGKey(1), 0)
    np.testing.assert_allclose(float(m_adml["loss"]), 2 * float(m_maml["loss"]), rtol=1e-12)
    np.testing.assert_allclose(float(m_adml["mse"]), float(m_maml["mse"]), rtol=1e-12)
    np.testing.assert_allclose(_flat(g_adml), 2 * _flat(g_maml), rtol=1e-10, atol=1e-13)


def test_jitted_meta_step_with_pgd_random_start():
    # PGD's clipping to an image range is covered in test_attacks; sinusoid compiles fast.
    cfg = make_cfg(
        algo={"name": "adml", "attack": "pgd", "attack_steps": 3, "eps": 0.2},
        model={"hidden": [8]},
        trainer={"steps": 2, "meta_batch_size": 3},
    )
    validate(cfg)
    exp = setup(cfg)
    state = init_state(exp, seed=0)
    before = _flat(state.params)
    step = make_meta_step(exp, 3)
    for _ in range(2):
        state, metrics = step(state, exp.source.splits["train"])
    values = {k: float(v) for k, v in metrics.items()}
    assert set(values) == {"loss", "mse", "grad_norm"}
    assert all(np.isfinite(v) for v in values.values())
    assert not np.allclose(before, _flat(state.params))


@pytest.mark.parametrize(
    "key, value",
    [("eps", -0.1), ("attack", "cw"), ("attack_steps", 0), ("attack_step_size", 0.0)],
)
def test_algo_attack_keys_are_range_checked(key, value):
    cfg = make_cfg(algo={"name": "adml", key: value})
    with pytest.raises(ConfigError, match=rf"algo\.{key}="):
        validate(cfg)


# ---- end to end through the CLI ---------------------------------------------------------


# Slow tier (CLI train + eval); the attacked evaluator is checked in-process in test_attacks.
@pytest.mark.slow
def test_cli_eval_with_fgsm_reports_clean_and_robust(tmp_path):
    run = tmp_path / "run"
    train = run_cli(
        "train",
        "algo=adml",
        "trainer.steps=50",
        "trainer.meta_batch_size=5",
        "model.hidden=[16,16]",
        "trainer.val_every=0",
        "trainer.checkpoint_every=0",
        "trainer.progress=false",
        "eval.n_tasks=40",
        "eval.batch_size=40",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        check=False,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    trained = json.loads((run / "results.json").read_text())
    assert "test_robust" not in trained  # attack=none by default

    # A run written before the attack group existed: the stored config has no `attack`.
    stored_path = run / ".hydra" / "config.yaml"
    stored = yaml.safe_load(stored_path.read_text())
    del stored["attack"]
    stored_path.write_text(yaml.safe_dump(stored))

    out = tmp_path / "eval"
    ev = run_cli(
        "eval",
        f"run_dir={run}",
        "attack=fgsm",
        "attack.eps=0.1",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
        check=False,
    )
    assert ev.returncode == 0, ev.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["attack"] == {"name": "fgsm", "eps": 0.1}
    for entry in ("test", "test_robust"):
        assert set(results[entry]) == {"metric", "mean", "ci95", "n_tasks"}
        assert results[entry]["metric"] == "mse" and results[entry]["n_tasks"] == 40
    # Same checkpoint, same tasks: the clean number is the training run's own.
    np.testing.assert_allclose(results["test"]["mean"], trained["test"]["mean"], rtol=1e-5)
    assert results["test_robust"]["mean"] >= results["test"]["mean"]  # mse: robust is worse
    assert "under fgsm eps=0.1" in ev.stdout

    # Other config groups still cannot change in eval.
    bad = run_cli(
        "eval", f"run_dir={run}", "algo=maml", f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path, check=False
    )
    assert bad.returncode == 2 and "cannot change config group 'algo'" in bad.stderr
