"""Test-time adaptation of any trained backbone (``eval.adaptation``), for every algorithm.

By default (``algorithm``) a task is adapted by the algorithm's own rule (MAML's inner
steps, ProtoNet's prototypes, ...). The other choices use only the trained *backbone*, the
model without its ``head`` (and without CAML's ``film``; metalearn/backbone.py), as a
feature extractor z = f(x) of dimension D, so a meta-trained run can be probed exactly as a
pre-trained one (``algo=pretrain``):

- ``ncm_euclidean``: nearest class mean, logits -||z - c_k||^2 with c_k the mean support
  feature of class k (ProtoNet's rule on any backbone);
- ``ncm_cosine``: nearest class mean by cosine similarity, logits s cos(z, c_k), s =
  :data:`COSINE_SCALE` (the argmax, and so the accuracy, does not depend on s);
- ``linear_probe``: multinomial logistic regression on the frozen, L2-normalised support
  features (RFS, Tian et al. 2020, fits scikit-learn's LogisticRegression on normalised
  features): minimise mean_i CE(W z_i + b, y_i) + (eval.probe_l2 / (2 Ns)) ||W||^2, which
  is scikit-learn's objective with C = 1 / probe_l2 divided by Ns (C = 1 in RFS; the bias
  is not penalised), by ``eval.adaptation_steps`` iterations of L-BFGS from W = 0, b = 0;
- ``finetune_head``: a new linear head (zeros) trained on the frozen support features by
  ``eval.adaptation_steps`` full-batch gradient steps of rate ``eval.adaptation_lr``
  (Chen et al. 2019's Baseline trains a new head for 100 epochs over the support set in
  mini-batches of 4, SGD lr 0.01, momentum 0.9, dampening 0.9, weight decay 1e-3:
  CloserLookFewShot methods/baselinefinetune.py:33-50; here full-batch plain steps,
  deterministic);
- ``finetune_all``: the same head and the backbone fine-tuned together on the support set.

Labels are 0..n-1 and n is not a trace-time constant (see protonet.py): every rule scores
Ns columns, and columns of labels with no support example hold ``MASKED_LOGIT``.
BatchNorm: features are computed with the statistics of the batch they come in (the support
set, the query set), i.e. ``model.bn_stats=batch``; other modes are refused with another
adaptation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metalearn.algos import MetaLearner
from metalearn.algos.base import inner_sgd
from metalearn.algos.protonet import MASKED_LOGIT, Prototypes, distance_logits, embed, prototypes
from metalearn.backbone import NOT_BACKBONE, model_tree
from metalearn.errors import ConfigError
from metalearn.models import Model

PyTree = Any
ADAPTATIONS = ("algorithm", "ncm_euclidean", "ncm_cosine", "linear_probe", "finetune_head", "finetune_all")
# How results lines name each adaptation.
ADAPTATION_PHRASES = {
    "algorithm": "the algorithm's own adaptation",
    "ncm_euclidean": "nearest class mean (Euclidean)",
    "ncm_cosine": "nearest class mean (cosine)",
    "linear_probe": "linear probe (logistic regression)",
    "finetune_head": "fine-tuned head",
    "finetune_all": "fine-tuned network",
}
# The scale of cosine logits (only the loss depends on it, not the accuracy).
COSINE_SCALE = 10.0
EPS = 1e-12


def adaptation_of(eval_cfg: Any) -> str:
    """``eval.adaptation`` ("algorithm" for configs of older versions, which lack it)."""
    return str(getattr(eval_cfg, "adaptation", "algorithm"))


def check_adaptation(e: Any, cfg: Any) -> None:
    """Range checks of eval.adaptation and its keys (EvalConfig.check calls it)."""
    from metalearn.config import finite, need, one_of

    adaptation = getattr(e, "adaptation", "algorithm")
    one_of(adaptation, "eval.adaptation", ADAPTATIONS)
    need(
        adaptation == "algorithm" or cfg.dataset.name != "sinusoid",
        "eval.adaptation",
        adaptation,
        "algorithm for regression (the backbone rules classify)",
    )
    steps = getattr(e, "adaptation_steps", 1)
    need(steps >= 1, "eval.adaptation_steps", steps, ">= 1")
    lr = getattr(e, "adaptation_lr", 0.01)
    need(finite(lr) and lr > 0, "eval.adaptation_lr", lr, "> 0")
    l2 = getattr(e, "probe_l2", 1.0)
    need(finite(l2) and l2 >= 0, "eval.probe_l2", l2, ">= 0")


def backbone_params(model: Model, meta: PyTree) -> dict:
    """The model's parameters without head and film, from an algorithm's meta-parameters;
    a leaf with one more leading axis than the model's (MAML++'s per-step BatchNorm) gives
    its first row (the copy of the first inner step)."""
    tree = {k: v for k, v in model_tree(meta).items() if k not in NOT_BACKBONE}
    reference = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    return jax.tree.map(
        lambda leaf, ref: leaf[0] if leaf.ndim == len(ref.shape) + 1 else leaf,
        tree,
        {k: reference[k] for k in tree},
    )


def l2_normalise(z: jax.Array) -> jax.Array:
    """Rows of z (N, D) scaled to unit norm (a zero row stays zero)."""
    return z / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(z), axis=-1, keepdims=True), EPS))


def cosine_logits(z: jax.Array, weights: jax.Array, scale: float) -> jax.Array:
    """scale * cos(z_i, w_k) for z (N, D) and weights (K, D): (N, K)."""
    return scale * l2_normalise(z) @ l2_normalise(weights).T


class Head(NamedTuple):
    """A linear head over Ns label columns: kernel (D, Ns), bias (Ns,), present (Ns,) bool."""

    kernel: jax.Array
    bias: jax.Array
    present: jax.Array


def head_logits(z: jax.Array, head: Head) -> jax.Array:
    return jnp.where(head.present[None, :], z @ head.kernel + head.bias, MASKED_LOGIT)


def _present(y: jax.Array, n: int) -> jax.Array:
    return jax.nn.one_hot(y, n).sum(axis=0) > 0


def zero_head(d: int, y: jax.Array, dtype: Any) -> Head:
    n = y.shape[0]
    return Head(jnp.zeros((d, n), dtype), jnp.zeros((n,), dtype), _present(y, n))


def probe_objective(
    head: tuple[jax.Array, jax.Array], z: jax.Array, y: jax.Array, present: jax.Array, l2: float
):
    """mean CE of (z W + b) + l2 / (2 N) ||W||^2; z (N, D) normalised features, y (N,)."""
    kernel, bias = head
    logits = head_logits(z, Head(kernel, bias, present))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.mean(ce) + l2 / (2 * z.shape[0]) * jnp.sum(jnp.square(kernel))


def fit_linear_probe(z: jax.Array, y: jax.Array, l2: float, iterations: int) -> Head:
    """Logistic regression on features z (N, D) (normalised here) with labels y (N,) in [0, N):
    ``iterations`` L-BFGS steps (with zoom line search) from zeros."""
    z = l2_normalise(z)
    start = zero_head(z.shape[1], y, z.dtype)
    present = start.present
    objective = lambda h: probe_objective(h, z, y, present, l2)
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry, _):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
        return (optax.apply_updates(params, updates), state), None

    params = (start.kernel, start.bias)
    (params, _), _ = jax.lax.scan(step, (params, solver.init(params)), None, length=iterations)
    return Head(params[0], params[1], present)


class Adapted(NamedTuple):
    """A task adapted by a backbone rule: backbone (None: the meta-parameters' own),
    head (a :class:`Head`, or :class:`Prototypes` for nearest class mean)."""

    backbone: Any
    head: Any


def with_adaptation(algo: MetaLearner, model: Model, eval_cfg: Any, model_cfg: Any) -> MetaLearner:
    """``algo`` whose adapt/predict follow ``eval.adaptation`` (training's meta_grad unchanged).
    ConfigError for a BatchNorm mode other than batch with a backbone rule."""
    rule = adaptation_of(eval_cfg)
    if rule == "algorithm":
        return algo
    bn = getattr(model_cfg, "bn_stats", "batch")
    if bn != "batch":
        raise ConfigError(
            f"invalid model.bn_stats={bn!r} with eval.adaptation={rule}: the backbone rules compute "
            "features with batch statistics (use model.bn_stats=batch)"
        )
    steps, lr, l2 = int(eval_cfg.adaptation_steps), float(eval_cfg.adaptation_lr), float(eval_cfg.probe_l2)

    def features(backbone: Any, x: jax.Array) -> jax.Array:
        return embed(model, backbone, x)

    def adapt(meta, algo_state, sx, sy, key, inner_steps):
        del algo_state, key, inner_steps  # the backbone rules have their own step counts
        backbone = backbone_params(model, meta)
        z = features(backbone, sx)
        if rule in ("ncm_euclidean", "ncm_cosine"):
            return Adapted(None, prototypes(z, sy))
        if rule == "linear_probe":
            return Adapted(None, fit_linear_probe(z, sy, l2, steps))
        head = zero_head(z.shape[1], sy, z.dtype)
        ce = lambda logits: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, sy))
        if rule == "finetune_head":
            trained = inner_sgd(
                lambda h: ce(head_logits(z, head._replace(kernel=h[0], bias=h[1]))),
                (head.kernel, head.bias),
                lr,
                steps,
            )
            return Adapted(None, head._replace(kernel=trained[0], bias=trained[1]))
        # finetune_all
        loss = lambda p: ce(head_logits(features(p[0], sx), head._replace(kernel=p[1], bias=p[2])))
        b, kernel, bias = inner_sgd(loss, (backbone, head.kernel, head.bias), lr, steps)
        return Adapted(b, head._replace(kernel=kernel, bias=bias))

    def predict(meta, adapted: Adapted, x):
        backbone = backbone_params(model, meta) if adapted.backbone is None else adapted.backbone
        z = features(backbone, x)
        if rule == "ncm_euclidean":
            return distance_logits(z, adapted.head)
        if rule == "ncm_cosine":
            protos: Prototypes = adapted.head
            return jnp.where(
                protos.present[None, :], cosine_logits(z, protos.centers, COSINE_SCALE), MASKED_LOGIT
            )
        if rule == "linear_probe":
            z = l2_normalise(z)
        return head_logits(z, adapted.head)

    return algo._replace(adapt=adapt, predict=predict)
