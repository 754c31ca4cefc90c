"""ADML: adversarial meta-learning (Yin et al., 2018, "Adversarial Meta-Learning").

For a task with clean support S = (x_s, y_s) and clean query Q = (x_q, y_q), adversarial
copies are crafted with an L-inf attack A (FGSM or PGD, ``algo.attack``, radius
``algo.eps``) against the CURRENT meta-parameters theta:

    S^a = (A_theta(x_s), y_s),   Q^a = (A_theta(x_q), y_q).

Two inner adaptations start from the shared theta (k = ``algo.inner_steps`` SGD steps of
``algo.inner_lr``, as in MAML):

    theta_c = SGD_k(theta; L_S)       on the clean support,
    theta_a = SGD_k(theta; L_{S^a})   on the adversarial support,

and each is scored on the *other* kind of query ("crossed" losses):

    L_task(theta) = L_{Q^a}(theta_c) + L_Q(theta_a)          (a sum, as in the paper),
    outer objective = mean over the tasks of the batch of L_task.

The paper applies the two terms as two successive SGD updates with rates gamma_1 and
gamma_2; summing them is the same update to first order in the outer lr when
gamma_1 = gamma_2, and lets any optax optimizer drive it. The paper sums over tasks; the
mean only rescales the outer learning rate.

Meta-gradient: flows through both inner adaptations (second order, Hessian-vector
products of L_S and L_{S^a}, unless ``algo.first_order``) and through the query losses.
It does NOT flow through the attacks: S^a and Q^a are constants (``stop_gradient``), as
in the paper, where adversarial samples are generated data. With
``algo.regenerate_adversarial`` the adversarial query Q^a is crafted against theta_c
(the parameters it is evaluated with, a stronger attack at the cost of one more attack
per task) instead of theta; it is still a constant for the meta-gradient.

``algo.inner_loss``/``outer_loss``/``adapt_bn`` apply as in MAML (metalearn/algos/maml.py).

Reported metrics: ``loss`` (the outer objective above) and the task metric (``accuracy``
or ``mse``) of the clean adaptation theta_c on the clean query.

``adapt`` (used by evaluation) is the clean adaptation theta_c; attacks at test time are
the evaluator's business (``attack=...``), as for every other algorithm.

State: meta_params = the model's parameter pytree; adapted = a pytree of the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
from jax import lax

from metalearn.algos.base import MetaLearner, Problem, gradient_of_mean, loss_reductions, stateless_learner
from metalearn.algos.maml import MAMLConfig, make_maml
from metalearn.attacks import make_attack
from metalearn.config import finite, need, one_of, schema
from metalearn.tasks import Task


@schema("algo", "adml")
@dataclass
class ADMLConfig(MAMLConfig):
    """MAML's keys plus the L-inf attack that crafts the adversarial support and query sets in
    meta-training: eps (radius, input units), attack (fgsm or pgd), and for PGD attack_steps,
    attack_step_size (null: 2.5 * eps / attack_steps) and attack_random_start.
    regenerate_adversarial: craft the adversarial query against the clean-adapted parameters,
    not the meta-parameters."""

    eps: float = 0.1
    attack: str = "fgsm"
    attack_steps: int = 10
    attack_step_size: float | None = None
    attack_random_start: bool = True
    regenerate_adversarial: bool = False

    @classmethod
    def check(cls, a: Any, cfg: Any) -> None:
        MAMLConfig.check(a, cfg)
        need(finite(a.eps) and a.eps >= 0, "algo.eps", a.eps, "finite and >= 0")
        one_of(a.attack, "algo.attack", ("fgsm", "pgd"))
        need(a.attack_steps >= 1, "algo.attack_steps", a.attack_steps, ">= 1")
        size = a.attack_step_size
        need(size is None or size > 0, "algo.attack_step_size", size, "> 0 or null")


def make_adml(cfg: Any, problem: Problem) -> MetaLearner:
    """cfg: an ADMLConfig."""
    model, source = problem.model, problem.source
    attack = make_attack(
        cfg.attack,
        cfg.eps,
        cfg.attack_steps,
        cfg.attack_step_size,
        cfg.attack_random_start,
        source.input_range,
    )

    # The inner loop and prediction are MAML's; ADML differs only in its outer loss.
    maml = make_maml(cfg, problem)
    losses = loss_reductions(cfg, source)

    def adapt(params: Any, support_x: jax.Array, support_y: jax.Array, key: jax.Array, steps: int) -> Any:
        return maml.adapt(params, (), support_x, support_y, key, steps)

    def adversarial(params: Any, x: jax.Array, y: jax.Array, key: jax.Array) -> jax.Array:
        # The examples are constants for the meta-gradient; stopping the parameters here
        # (not only the output) keeps the outer grad from tracing through the attack.
        fixed = lax.stop_gradient(params)
        return attack(lambda z: problem.loss(fixed, z, y), x, key)

    def task_loss(params: Any, task: Task, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        key_s, key_q = jax.random.split(key)
        support_adv = adversarial(params, task.support_x, task.support_y, key_s)
        theta_c = adapt(params, task.support_x, task.support_y, key, cfg.inner_steps)
        theta_a = adapt(params, support_adv, task.support_y, key, cfg.inner_steps)
        query_params = theta_c if cfg.regenerate_adversarial else params
        query_adv = adversarial(query_params, task.query_x, task.query_y, key_q)
        loss = source.loss(model.apply(theta_c, query_adv), task.query_y) + source.loss(
            model.apply(theta_a, task.query_x), task.query_y
        )
        loss = losses.query(loss, task.query_x, task.support_x)
        metric = source.metric(model.apply(theta_c, task.query_x), task.query_y)
        return loss, metric

    return stateless_learner(
        init=model.init,
        meta_grad=gradient_of_mean(task_loss, source.metric_name),
        adapt=adapt,
        predict=maml.predict,
    )
