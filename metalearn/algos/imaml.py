"""iMAML, implicit MAML (Rajeswaran et al., 2019, "Meta-Learning with Implicit Gradients").

For a task with support S and query Q, the inner problem is regularised towards the
meta-parameters theta by a proximal term,

    phi*(theta) = argmin_phi  L_S(phi) + (lam / 2) ||phi - theta||^2,

solved approximately by k = ``algo.inner_steps`` gradient steps from phi_0 = theta,

    phi_{i+1} = phi_i - alpha * (grad L_S(phi_i) + lam (phi_i - theta)).

At a stationary point, implicit differentiation gives d phi* / d theta = (I + H / lam)^-1
with H the Hessian of L_S at phi*, so the task's meta-gradient is

    g_theta = (I + H / lam)^-1 grad L_Q(phi*),

computed by ``algo.cg_steps`` steps of conjugate gradient on the system
((1 + damping) I + H / lam) x = grad L_Q(phi*), using only Hessian-vector products of
L_S (forward-over-reverse); ``algo.cg_damping`` adds to the diagonal, as the authors'
code does. The inner loop runs under ``stop_gradient``: nothing is differentiated through
it, so the memory of the meta-step does not grow with the number of inner steps (only the
solution phi* is kept). The outer objective's gradient is the mean of g_theta over tasks;
the reported loss is the mean query loss L_Q(phi*).

The paper's GD variant solves the inner problem this way (its Hessian-free variant uses a
Newton-CG inner solver with line search instead, which is not implemented here).

``algo.proximal`` chooses where the proximal term acts: "every_step" (the paper's
objective, above) or "pullback", the authors' released code (aravindr93/imaml_dev,
examples/omniglot_implicit_maml.py): k unregularised gradient steps on L_S, then one
gradient step on the proximal term alone,

    phi <- phi - alpha * lam * (phi - theta),

i.e. phi = theta + (1 - alpha lam)(phi_k - theta). That phi is not the regularised
problem's stationary point; the code uses the implicit meta-gradient there all the same.
The authors' CG system is ((1 + cg_damping) I + H / (lam + lam_damping)) x = g with
lam_damping = 10 (learner_model.py, ``matrix_evaluator``): ``algo.cg_lam_offset`` is
that 10 (0: the paper's H / lam). Adaptation at evaluation uses ``algo.lam_test`` when set
(the authors' measure_accuracy.py passes lam 0: plain gradient steps), else ``algo.lam``.

State: meta_params = the model's parameter pytree; adapted = phi (a pytree of the same
shape), used by evaluation and ``predict`` (adaptation at test time solves the same problem with
``algo.inner_steps_test`` steps and ``algo.lam_test``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from metalearn.algos.base import InnerLoopConfig, MetaLearner, Problem, stateless_learner
from metalearn.config import finite, need, one_of, schema
from metalearn.tasks import Task

PROXIMAL = ("every_step", "pullback")


@schema("algo", "imaml")
@dataclass
class IMAMLConfig(InnerLoopConfig):
    """The inner-loop keys and iMAML's: lam, the strength of the proximal term
    (lam/2)||phi - theta||^2; cg_steps, conjugate-gradient steps for (I + H/lam)^-1 g;
    cg_damping, added to the system's diagonal; proximal, where the proximal term acts
    ("every_step", the paper; "pullback", the authors' code); cg_lam_offset, added to lam in
    the CG system (the authors' code: 10); lam_test, lam at evaluation (null: lam)."""

    lam: float = 2.0
    cg_steps: int = 5
    cg_damping: float = 0.0
    proximal: str = "every_step"
    cg_lam_offset: float = 0.0
    lam_test: float | None = None

    @classmethod
    def check(cls, a: Any, cfg: Any) -> None:
        InnerLoopConfig.check(a, cfg)
        need(finite(a.lam) and a.lam > 0, "algo.lam", a.lam, "> 0")
        need(a.cg_steps >= 1, "algo.cg_steps", a.cg_steps, ">= 1")
        need(finite(a.cg_damping) and a.cg_damping >= 0, "algo.cg_damping", a.cg_damping, ">= 0")
        one_of(a.proximal, "algo.proximal", PROXIMAL)
        off = a.cg_lam_offset
        need(finite(off) and off >= 0, "algo.cg_lam_offset", off, ">= 0")
        need(
            a.lam_test is None or (finite(a.lam_test) and a.lam_test >= 0),
            "algo.lam_test",
            a.lam_test,
            ">= 0 or null",
        )


def conjugate_gradient(matvec: Any, b: jax.Array, steps: int) -> jax.Array:
    """``steps`` iterations of conjugate gradient for A x = b from x = 0 (A symmetric
    positive definite, given as ``matvec``); b is a flat vector. A fixed number of
    iterations (no tolerance test), so it is a fixed-size loop under jit and vmap; an exact
    solution reached early (zero residual) is kept."""

    def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
        ok = den != 0
        return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)

    def step(carry: tuple[jax.Array, ...], _: None) -> tuple[tuple[jax.Array, ...], None]:
        x, r, p, rr = carry
        ap = matvec(p)
        alpha = safe_div(rr, p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        p = r + safe_div(rr_new, rr) * p
        return (x, r, p, rr_new), None

    x0 = jnp.zeros_like(b)
    (x, _, _, _), _ = lax.scan(step, (x0, b, b, b @ b), None, length=steps)
    return x


def make_imaml(cfg: Any, problem: Problem) -> MetaLearner:
    """cfg: an IMAMLConfig."""
    model, source = problem.model, problem.source
    lam, damping = float(cfg.lam), float(cfg.cg_damping)
    lam_test = lam if cfg.lam_test is None else float(cfg.lam_test)
    proximal = cfg.proximal
    cg_scale = lam + float(cfg.cg_lam_offset)
    if proximal not in PROXIMAL:
        raise ValueError(f"unknown algo.proximal {proximal!r}; expected one of {PROXIMAL}")

    def solve_inner(params: Any, support_x: jax.Array, support_y: jax.Array, steps: int, lam: float) -> Any:
        """phi after ``steps`` inner steps from theta = params (``algo.proximal`` decides
        whether the term lam (phi - theta) is in every step or one pull-back step)."""
        theta = lax.stop_gradient(params)
        grad_support = jax.grad(lambda p: problem.loss(p, support_x, support_y))
        in_step = lam if proximal == "every_step" else 0.0

        def step(phi: Any, _: None) -> tuple[Any, None]:
            g = grad_support(phi)
            phi = jax.tree.map(lambda w, gw, t: w - cfg.inner_lr * (gw + in_step * (w - t)), phi, g, theta)
            return phi, None

        phi, _ = lax.scan(step, theta, None, length=steps) if steps else (theta, None)
        if proximal == "pullback" and steps:
            phi = jax.tree.map(lambda w, t: w - cfg.inner_lr * lam * (w - t), phi, theta)
        return phi

    def adapt(params: Any, support_x: jax.Array, support_y: jax.Array, key: jax.Array, steps: int) -> Any:
        """Adaptation at evaluation: ``steps`` inner steps with lam_test."""
        del key
        return solve_inner(params, support_x, support_y, steps, lam_test)

    def task_grad(params: Any, task: Task, key: jax.Array) -> tuple[Any, jax.Array, jax.Array]:
        del key
        phi = lax.stop_gradient(solve_inner(params, task.support_x, task.support_y, cfg.inner_steps, lam))

        def query_loss(p: Any) -> tuple[jax.Array, jax.Array]:
            pred = model.apply(p, task.query_x)
            return source.loss(pred, task.query_y), source.metric(pred, task.query_y)

        (loss, metric), g_query = jax.value_and_grad(query_loss, has_aux=True)(phi)
        flat_phi, unravel = ravel_pytree(phi)
        flat_g, _ = ravel_pytree(g_query)

        def support_loss_flat(v: jax.Array) -> jax.Array:
            return problem.loss(unravel(v), task.support_x, task.support_y)

        grad_flat = jax.grad(support_loss_flat)

        def matvec(v: jax.Array) -> jax.Array:
            hvp = jax.jvp(grad_flat, (flat_phi,), (v,))[1]
            return (1.0 + damping) * v + hvp / cg_scale

        return unravel(conjugate_gradient(matvec, flat_g, cfg.cg_steps)), loss, metric

    def meta_grad(params: Any, tasks: Task, key: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
        keys = jax.random.split(key, tasks.support_x.shape[0])
        grads, losses, metrics = jax.vmap(task_grad, in_axes=(None, 0, 0))(params, tasks, keys)
        mean = lambda t: jax.tree.map(lambda v: jnp.mean(v, axis=0), t)
        loss = jnp.mean(losses)
        return mean(grads), {"loss": loss, source.metric_name: jnp.mean(metrics)}

    def predict(params: Any, adapted: Any, x: jax.Array) -> jax.Array:
        del params
        return model.apply(adapted, x)

    return stateless_learner(init=model.init, meta_grad=meta_grad, adapt=adapt, predict=predict)
