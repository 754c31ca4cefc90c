"""eval.adaptation (metalearn/adaptation.py): one set of test-time adaptations for any trained
backbone. The cosine logits and the linear probe against independent computations in float64
(a hand-derived case and scipy), fine-tuning against a hand-computed step, nearest class mean
against ProtoNet's own rule, and eval/predict naming the adaptation they used."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_cfg, run_cli_in_process, synthetic_image_arrays
from scipy.optimize import minimize

from metalearn.adaptation import cosine_logits, fit_linear_probe, head_logits, with_adaptation
from metalearn.algos import Problem, make_algorithm
from metalearn.algos.protonet import embed
from metalearn.errors import ConfigError
from metalearn.models import make_model
from metalearn.tasks import image_source


def test_cosine_logits_hand_derived(float64):
    z = jnp.array([[3.0, 4.0], [0.0, -2.0]])
    weights = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    got = np.asarray(cosine_logits(z, weights, 10.0))
    r = 1 / math.sqrt(2)
    want = 10.0 * np.array([[0.6, 0.8, 0.6 * r + 0.8 * r], [0.0, -1.0, -r]])
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-14)


def test_linear_probe_hand_derived_symmetric_case(float64):
    """Two classes, features +e and -e (any scale: the probe normalises them). By symmetry
    the optimum is W = [w, -w] e^T with equal biases, and the objective is
    log(1 + exp(-2w)) + l2 w^2 / 2, whose stationarity gives w = 2 sigmoid(-2w) / l2
    (solved here by bisection)."""
    l2 = 1.0
    direction = np.array([3.0, 4.0]) / 5.0
    z = jnp.array([2.0 * direction, -7.0 * direction])
    y = jnp.array([0, 1])
    head = fit_linear_probe(z, y, l2, 100)

    lo, hi = 0.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid - 2 / (1 + math.exp(2 * mid)) / l2 < 0 else (lo, mid)
    w = (lo + hi) / 2
    np.testing.assert_allclose(np.asarray(head.kernel), np.outer(direction, [w, -w]), atol=1e-9)
    assert abs(float(head.bias[0] - head.bias[1])) < 1e-9


def test_linear_probe_matches_scipy_on_a_random_case(float64):
    """4 classes (one absent), 9 examples in 5 dimensions: the same objective written in
    numpy and minimised by scipy's L-BFGS-B."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(9, 5))
    y = np.array([0, 0, 1, 1, 1, 2, 2, 0, 2])
    l2 = 0.5
    head = fit_linear_probe(jnp.asarray(z), jnp.asarray(y), l2, 200)

    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    k = 3  # the labels present

    def objective(v):
        kernel, bias = v[: 5 * k].reshape(5, k), v[5 * k :]
        logits = zn @ kernel + bias
        logits = logits - logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return -np.mean(log_p[np.arange(9), y]) + l2 / (2 * 9) * np.sum(kernel**2)

    best = minimize(objective, np.zeros(5 * k + k), method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15})
    kernel = best.x[: 5 * k].reshape(5, k)
    np.testing.assert_allclose(np.asarray(head.kernel)[:, :k], kernel, atol=1e-6)
    # The bias is determined up to a shift shared by all classes.
    bias = np.asarray(head.bias)[:k]
    np.testing.assert_allclose(bias - bias.mean(), best.x[5 * k :] - best.x[5 * k :].mean(), atol=1e-6)
    # Labels without support examples are never predicted.
    logits = np.asarray(head_logits(jnp.asarray(zn), head))
    assert np.all(logits[:, k:] < -1e29)


def _setup(algo: str, adaptation: str, **eval_keys):
    cfg = make_cfg(
        algo={"name": algo} if algo == "protonet" else {"name": algo, "inner_lr": 0.1},
        dataset={"name": "omniglot", "n_way": 3, "k_shot": 2, "k_query": 3},
        model={"name": "conv4", "filters": 4, "blocks": 2},
        eval={"adaptation": adaptation, **eval_keys},
    )
    source = image_source(cfg.dataset, synthetic_image_arrays(n_classes=6, per_class=8, size=8))
    model = make_model(cfg.model, source.input_shape, source.output_dim)
    plain = make_algorithm(cfg.algo, Problem(model, source))
    to64 = lambda t: jax.tree.map(
        lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, t
    )
    task = to64(source.sample(source.splits["test"], jax.random.PRNGKey(0)))
    params = to64(plain.init(jax.random.PRNGKey(1)))
    return cfg, model, plain, with_adaptation(plain, model, cfg.eval, cfg.model), task, params


def test_ncm_euclidean_is_protonets_rule_on_its_backbone(float64):
    _, _, plain, ncm, task, params = _setup("protonet", "ncm_euclidean")
    key = jax.random.PRNGKey(2)
    own = plain.predict(params, plain.adapt(params, (), task.support_x, task.support_y, key, 0), task.query_x)
    got = ncm.predict(params, ncm.adapt(params, (), task.support_x, task.support_y, key, 0), task.query_x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(own))


def test_ncm_cosine_on_a_maml_backbone_ranks_by_cosine(float64):
    _, model, _, ncm, task, params = _setup("maml", "ncm_cosine")
    got = np.asarray(
        ncm.predict(params, ncm.adapt(params, (), task.support_x, task.support_y, None, 0), task.query_x)
    )
    backbone = {k: v for k, v in params.items() if k != "head"}
    zs, zq = (np.asarray(embed(model, backbone, x)) for x in (task.support_x, task.query_x))
    sy = np.asarray(task.support_y)
    centers = np.stack([zs[sy == c].mean(axis=0) for c in range(3)])
    cos = (zq / np.linalg.norm(zq, axis=1, keepdims=True)) @ (
        centers / np.linalg.norm(centers, axis=1, keepdims=True)
    ).T
    np.testing.assert_allclose(got[:, :3], 10.0 * cos, rtol=1e-10)


def test_finetune_head_one_step_by_hand(float64):
    """From a zero head every present class has probability 1/n, so one step of rate lr is
    W = -lr Z^T (P - Y) / N, b = -lr mean(P - Y)."""
    _, model, _, tuned, task, params = _setup("maml", "finetune_head", adaptation_steps=1, adaptation_lr=0.5)
    adapted = tuned.adapt(params, (), task.support_x, task.support_y, None, 0)
    backbone = {k: v for k, v in params.items() if k != "head"}
    z = np.asarray(embed(model, backbone, task.support_x))
    y = np.eye(3)[np.asarray(task.support_y)]
    residual = np.full_like(y, 1 / 3) - y
    np.testing.assert_allclose(
        np.asarray(adapted.head.kernel)[:, :3], -0.5 * z.T @ residual / len(z), rtol=1e-10
    )
    np.testing.assert_allclose(np.asarray(adapted.head.bias)[:3], -0.5 * residual.mean(axis=0), atol=1e-14)


def test_finetune_all_moves_the_backbone_and_fits_the_support(float64):
    _, _, _, tuned, task, params = _setup("maml", "finetune_all", adaptation_steps=20, adaptation_lr=0.5)
    adapted = tuned.adapt(params, (), task.support_x, task.support_y, None, 0)
    assert not np.array_equal(
        np.asarray(adapted.backbone["conv_0"]["kernel"]), np.asarray(params["conv_0"]["kernel"])
    )
    support = np.asarray(tuned.predict(params, adapted, task.support_x))
    assert np.mean(support.argmax(-1) == np.asarray(task.support_y)) == 1.0


def test_backbone_rules_refuse_other_batchnorm_modes_and_regression():
    from metalearn.config import validate

    cfg = make_cfg(model={"name": "conv4", "bn_stats": "support"}, eval={"adaptation": "linear_probe"})
    with pytest.raises(ConfigError, match="model.bn_stats='support' with eval.adaptation=linear_probe"):
        with_adaptation(None, None, cfg.eval, cfg.model)
    with pytest.raises(ConfigError, match="eval.adaptation='ncm_cosine': must be algorithm for regression"):
        validate(make_cfg(eval={"adaptation": "ncm_cosine"}))


@pytest.fixture(scope="module")
def maml_run(tmp_path_factory):
    from test_init_from import save_config, tiny_cfg, write_images

    from metalearn.train import train

    root = tmp_path_factory.mktemp("tta")
    write_images(root / "images")
    cfg = tiny_cfg(root, {"name": "maml"}, steps=2)
    run = root / "run"
    save_config(cfg, run)
    train(cfg, run)
    return root, run


@pytest.mark.parametrize("adaptation", ["linear_probe", "finetune_head"])
def test_eval_names_the_adaptation(maml_run, adaptation):
    _, run = maml_run
    code, out, err = run_cli_in_process(
        "eval", f"run_dir={run}", f"eval.adaptation={adaptation}", "eval.adaptation_steps=5", "eval.n_tasks=4"
    )
    assert code == 0, err
    line = out.strip().splitlines()[-1]
    results = json.loads(Path(line.rsplit("results in ", 1)[1].strip()).read_text())
    assert results["protocol"]["adaptation"] == adaptation
    phrase = {"linear_probe": "linear probe (logistic regression)", "finetune_head": "fine-tuned head"}[
        adaptation
    ]
    assert f"adapted by {phrase}" in line and "inner step" not in line
    assert 0.0 <= results["test"]["mean"] <= 1.0


def test_predict_names_the_adaptation(maml_run, tmp_path):
    from test_predict import write_class

    from metalearn.predict import run_predict
    from metalearn.run_config import resolve

    _, run = maml_run
    for name, seed in (("a", 70), ("b", 71)):
        write_class(tmp_path / "support" / name, seed, 1)
        write_class(tmp_path / "query" / name, seed, 2, first=1)
    support, query = tmp_path / "support", tmp_path / "query"
    overrides = [f"run_dir={run}", f"support={support}", f"query={query}", "eval.adaptation=ncm_cosine"]
    composed = make_cfg(support=str(support), query=str(query))
    said = []
    summary = run_predict(
        resolve(run, overrides, composed, "predict"), tmp_path / "out", say=lambda *a, **k: said.append(a[0])
    )
    assert summary["adaptation"] == "ncm_cosine"
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["adaptation"] == "ncm_cosine"
    assert "adapted by nearest class mean (cosine)" in said[-1]
