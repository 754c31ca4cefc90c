"""iMAML's implicit meta-gradient against independent computations (float64).

- On a tiny MLP, the conjugate-gradient meta-gradient equals the solution of
  (I + H/lam) x = grad L_Q obtained with the full Hessian and ``jnp.linalg.solve``.
- For a linear model with MSE (a quadratic inner loss), the adapted parameters equal the
  closed-form proximal solution and the meta-gradient equals the derivative of the query
  loss through that closed form.
- The authors' variant (``algo.proximal=pullback``, ``cg_lam_offset``, ``lam_test``)
  against a hand-written Python loop and a direct solve of its linear system.
- The compiled meta-gradient's memory does not grow with the number of inner steps, while
  MAML's does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, make_cfg, run_cli
from jax.flatten_util import ravel_pytree

from metalearn.algos import Problem, make_algorithm
from metalearn.algos.imaml import conjugate_gradient
from metalearn.models import Model, make_model
from metalearn.tasks import sinusoid_source


def _to64(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _tasks(source, n, seed=1):
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    return _to64(jax.vmap(source.sample, in_axes=(None, 0))(source.splits["train"], keys))


def test_conjugate_gradient_solves_spd_system_and_stops_safely(float64):
    rng = np.random.default_rng(0)
    m = rng.normal(size=(6, 6))
    a = jnp.asarray(m @ m.T + 0.5 * np.eye(6))
    b = jnp.asarray(rng.normal(size=6))
    # n iterations solve an n x n SPD system exactly (up to rounding); more are harmless.
    for steps in (6, 12):
        np.testing.assert_allclose(
            conjugate_gradient(lambda v: a @ v, b, steps), np.linalg.solve(a, b), rtol=1e-8
        )
    # One iteration is only the steepest-descent step: far from the solution.
    assert not np.allclose(conjugate_gradient(lambda v: a @ v, b, 1), np.linalg.solve(a, b), rtol=1e-3)


def _tiny_mlp_imaml(**algo):
    """(cfg, problem, algorithm) for iMAML with ``algo`` settings on a 1-5-1 MLP and
    sinusoid tasks of 6 support and 7 query points."""
    cfg = make_cfg(algo={"name": "imaml", **algo}, model={"hidden": [5]}, dataset={"k_shot": 6, "k_query": 7})
    source = sinusoid_source(cfg.dataset)
    problem = Problem(make_model(cfg.model, source.input_shape, source.output_dim), source)
    return cfg, problem, make_algorithm(cfg.algo, problem)


def test_meta_gradient_equals_direct_solve_with_the_full_hessian(float64):
    lam, inner_steps = 50.0, 3
    cfg, problem, algo = _tiny_mlp_imaml(inner_lr=0.01, inner_steps=inner_steps, lam=lam, cg_steps=40)
    source = problem.source
    params = _to64(algo.init(jax.random.PRNGKey(0)))
    tasks = _tasks(source, 2)
    key = jax.random.PRNGKey(5)
    grads, _, metrics = jax.jit(algo.meta_grad)(params, (), tasks, key, 0)

    keys = jax.random.split(key, 2)
    expected, losses, plain = [], [], []
    for i in range(2):
        task = jax.tree.map(lambda a, i=i: a[i], tasks)
        phi = algo.adapt(params, (), task.support_x, task.support_y, keys[i], inner_steps)
        flat_phi, unravel = ravel_pytree(phi)
        support = lambda v, t=task, u=unravel: problem.loss(u(v), t.support_x, t.support_y)
        query = lambda v, t=task, u=unravel: problem.loss(u(v), t.query_x, t.query_y)
        hessian = jax.hessian(support)(flat_phi)
        system = jnp.eye(flat_phi.size) + hessian / lam
        assert np.linalg.eigvalsh(np.asarray(system)).min() > 0.05  # CG's assumption holds here
        plain.append(jax.grad(query)(flat_phi))
        expected.append(jnp.linalg.solve(system, plain[-1]))
        losses.append(query(flat_phi))
    np.testing.assert_allclose(ravel_pytree(grads)[0], np.mean(expected, axis=0), rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-12)

    # The inverse matters: the plain query gradient at phi (first-order iMAML) is different.
    assert not np.allclose(ravel_pytree(grads)[0], np.mean(plain, axis=0), rtol=1e-3)
    cfg.algo.cg_steps = 1
    one_step, _, _ = make_algorithm(cfg.algo, problem).meta_grad(params, (), tasks, key, 0)
    assert not np.allclose(ravel_pytree(one_step)[0], np.mean(expected, axis=0), rtol=1e-3)


def _linear_problem(cfg) -> Problem:
    """f(x) = a x + b with MSE on sinusoid tasks: L_S is quadratic in (a, b)."""
    source = sinusoid_source(cfg.dataset)

    def init(key):
        return {"a": jnp.asarray([0.7]), "b": jnp.asarray([-0.3])}

    def apply(params, x, context=None):
        return x * params["a"] + params["b"]

    return Problem(Model(init, apply, None), source)


def test_quadratic_inner_loss_matches_the_closed_form(float64):
    lam = 1.5
    cfg = make_cfg(
        algo={"name": "imaml", "inner_lr": 0.04, "inner_steps": 3000, "lam": lam, "cg_steps": 2},
        dataset={"k_shot": 5, "k_query": 8},
    )
    problem = _linear_problem(cfg)
    algo = make_algorithm(cfg.algo, problem)
    theta = _to64(algo.init(jax.random.PRNGKey(0)))
    task = jax.tree.map(lambda a: a[0], _tasks(problem.source, 1, seed=3))

    def quadratic(x, y):
        """L(phi) = 1/2 phi^T A phi - c^T phi + const for the MSE of the features [x, 1]."""
        feats = np.concatenate([np.asarray(x), np.ones_like(np.asarray(x))], axis=1)
        n = feats.shape[0]
        return 2.0 / n * feats.T @ feats, 2.0 / n * feats.T @ np.asarray(y)[:, 0]

    a_s, c_s = quadratic(task.support_x, task.support_y)
    a_q, c_q = quadratic(task.query_x, task.query_y)
    th = np.array([0.7, -0.3])

    # phi* = argmin L_S(phi) + lam/2 ||phi - theta||^2  =>  (A_S + lam I) phi* = c_S + lam theta
    phi_star = np.linalg.solve(a_s + lam * np.eye(2), c_s + lam * th)
    phi = algo.adapt(theta, (), task.support_x, task.support_y, jax.random.PRNGKey(0), 3000)
    np.testing.assert_allclose([phi["a"][0], phi["b"][0]], phi_star, rtol=1e-10)

    # d L_Q(phi*(theta)) / d theta = lam (A_S + lam I)^-1 (A_Q phi* - c_Q)
    closed = lam * np.linalg.solve(a_s + lam * np.eye(2), a_q @ phi_star - c_q)
    tasks = jax.tree.map(lambda v: v[None], task)
    grads, _, _ = algo.meta_grad(theta, (), tasks, jax.random.PRNGKey(0), 0)
    np.testing.assert_allclose([grads["a"][0], grads["b"][0]], closed, rtol=1e-9)

    # And by autodiff through the closed-form solution (a third, independent route).
    def outer(t):
        p = jnp.linalg.solve(jnp.asarray(a_s) + lam * jnp.eye(2), jnp.asarray(c_s) + lam * t)
        return 0.5 * p @ jnp.asarray(a_q) @ p - jnp.asarray(c_q) @ p

    np.testing.assert_allclose(jax.grad(outer)(jnp.asarray(th)), closed, rtol=1e-10)


def _compiled_temp_bytes(algo_name: str, inner_steps: int) -> int:
    cfg = make_cfg(
        algo={"name": algo_name, "inner_lr": 0.01, "inner_steps": inner_steps},
        model={"hidden": [32, 32]},
        dataset={"k_shot": 32, "k_query": 32},
    )
    source = sinusoid_source(cfg.dataset)
    problem = Problem(make_model(cfg.model, source.input_shape, source.output_dim), source)
    algo = make_algorithm(cfg.algo, problem)
    params = algo.init(jax.random.PRNGKey(0))
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    tasks = jax.vmap(source.sample, in_axes=(None, 0))({}, keys)
    compiled = jax.jit(algo.meta_grad).lower(params, (), tasks, jax.random.PRNGKey(2), 0).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_meta_gradient_memory_does_not_grow_with_inner_steps():
    imaml = [_compiled_temp_bytes("imaml", k) for k in (1, 20)]
    maml = [_compiled_temp_bytes("maml", k) for k in (1, 20)]
    assert imaml[1] <= 1.2 * imaml[0], imaml
    assert maml[1] > 3 * maml[0], maml  # backprop through the inner loop stores every step


def test_imaml_trains_on_sinusoid_from_the_cli(tmp_path):
    run = tmp_path / "run"
    run_cli(
        "train",
        "algo=imaml",
        "trainer.steps=3",
        "trainer.val_every=0",
        "eval.n_tasks=4",
        "trainer.progress=false",
        f"hydra.run.dir={run}",
        cwd=REPO,
    )
    assert (run / "results.json").is_file()


def test_pullback_variant_matches_a_hand_written_loop_and_its_linear_system(float64):
    """aravindr93/imaml_dev: k plain SGD steps, one step on (lam/2)||phi - theta||^2 alone,
    CG on ((1 + damping) I + H/(lam + 10)) x = g; evaluation adapts with lam_test."""
    lam, lr, steps, damping, offset = 2.0, 0.05, 4, 1.0, 10.0
    cfg, problem, algo = _tiny_mlp_imaml(
        inner_lr=lr,
        inner_steps=steps,
        lam=lam,
        cg_steps=60,
        cg_damping=damping,
        proximal="pullback",
        cg_lam_offset=offset,
        lam_test=0.0,
    )
    source = problem.source
    theta = _to64(algo.init(jax.random.PRNGKey(0)))
    tasks = _tasks(source, 2)
    flat_theta, unravel = ravel_pytree(theta)

    expected = []
    for i in range(2):
        task = jax.tree.map(lambda a, i=i: a[i], tasks)
        support = lambda v, t=task: problem.loss(unravel(v), t.support_x, t.support_y)
        query = lambda v, t=task: problem.loss(unravel(v), t.query_x, t.query_y)
        phi = flat_theta
        for _ in range(steps):  # unregularised steps, one Python iteration each
            phi = phi - lr * jax.grad(support)(phi)
        plain = phi
        phi = phi - lr * jax.grad(lambda v: 0.5 * lam * jnp.sum((v - flat_theta) ** 2))(phi)
        np.testing.assert_allclose(phi, flat_theta + (1 - lr * lam) * (plain - flat_theta), rtol=1e-12)
        system = (1 + damping) * jnp.eye(phi.size) + jax.hessian(support)(phi) / (lam + offset)
        expected.append(jnp.linalg.solve(system, jax.grad(query)(phi)))
        if i == 0:
            phi0, plain0, task0 = phi, plain, task
    grads, _, _ = jax.jit(algo.meta_grad)(theta, (), tasks, jax.random.PRNGKey(5), 0)
    np.testing.assert_allclose(ravel_pytree(grads)[0], np.mean(expected, axis=0), rtol=1e-7, atol=1e-10)

    # Evaluation adapts with lam_test = 0: the pull-back is a no-op, plain steps remain.
    adapted = algo.adapt(theta, (), task0.support_x, task0.support_y, jax.random.PRNGKey(0), steps)
    np.testing.assert_allclose(ravel_pytree(adapted)[0], plain0, rtol=1e-12)
    assert not np.allclose(plain0, phi0, rtol=1e-6)
    # With lam_test unset, evaluation pulls back with lam, like training.
    cfg.algo.lam_test = None
    same = make_algorithm(cfg.algo, problem).adapt(theta, (), task0.support_x, task0.support_y, None, steps)
    np.testing.assert_allclose(ravel_pytree(same)[0], phi0, rtol=1e-12)
    # The paper's variant (proximal term in every step) is a different phi.
    cfg.algo.proximal = "every_step"
    paper = make_algorithm(cfg.algo, problem).adapt(theta, (), task0.support_x, task0.support_y, None, steps)
    assert not np.allclose(ravel_pytree(paper)[0], phi0, rtol=1e-6)


@pytest.mark.parametrize(
    "key, value",
    [
        ("algo.proximal", "sometimes"),
        ("algo.cg_lam_offset", -1.0),
        ("algo.lam_test", -0.5),
        ("optim.eps", 0.0),
    ],
)
def test_imaml_variant_settings_are_checked(key, value):
    from metalearn.config import validate
    from metalearn.errors import ConfigError

    cfg = make_cfg(algo={"name": "imaml"})
    cfg[key.split(".")[0]][key.split(".")[1]] = value
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


@pytest.mark.parametrize("name", ["lam", "cg_steps", "cg_damping"])
def test_imaml_settings_are_range_checked(name):
    from metalearn.config import validate
    from metalearn.errors import ConfigError

    cfg = make_cfg(algo={"name": "imaml", name: -1})
    with pytest.raises(ConfigError, match=f"algo.{name}"):
        validate(cfg)
