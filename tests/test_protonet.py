"""Prototypical Networks and ProtoMAML against hand-written computations.

- ProtoNet's logits equal -||f(x) - c_k||^2 computed with explicit loops, where the
  embedding f is obtained independently of the head-skipping interceptor (the same network
  with an identity head) and the prototypes are per-class means taken by hand.
- ProtoMAML's initial head (W = 2c, b = -||c||^2) gives exactly ProtoNet's predictions
  before any inner step, and different ones after a step.
- Training episodes with ``dataset.n_way_train`` ways; the range checks and the one-line
  error for a regression dataset.
"""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, make_cfg, run_cli, synthetic_image_arrays

from metalearn.algos import Problem, make_algorithm
from metalearn.algos.protomaml import proto_head
from metalearn.algos.protonet import MASKED_LOGIT, embed, prototypes
from metalearn.config import validate
from metalearn.errors import ConfigError
from metalearn.models import make_model
from metalearn.tasks import image_source


def _cfg(algo: str, **dataset):
    inner = {} if algo == "protonet" else {"inner_lr": 0.1, "inner_steps": 1}
    cfg = make_cfg(
        algo={"name": algo, **inner},
        dataset={"name": "omniglot", "n_way": 3, "k_shot": 2, "k_query": 3, **dataset},
        model={"name": "conv4", "filters": 4, "blocks": 2},
    )
    return cfg


def _problem(cfg, arrays=None):
    arrays = arrays if arrays is not None else synthetic_image_arrays(n_classes=6, per_class=8, size=8)
    source = image_source(cfg.dataset, arrays)
    return Problem(make_model(cfg.model, source.input_shape, source.output_dim), source)


def _to64(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _jitted(algo):
    """adapt (steps static), predict and meta_grad compiled once each (eager dispatch of
    every small op is slow on a busy CPU)."""
    return (
        jax.jit(algo.adapt, static_argnums=5),
        jax.jit(algo.predict),
        jax.jit(algo.meta_grad),
    )


def _task(problem, seed=0, split="train"):
    return _to64(problem.source.sample(problem.source.splits[split], jax.random.PRNGKey(seed)))


def _features_with_identity_head(cfg, problem, params, x):
    """The embedding by another route: the same network whose head is the identity map."""
    dim = 2 * 2 * cfg.model.filters  # 8x8 input, two stride-2 blocks -> 2x2x filters
    twin = make_model(cfg.model, problem.source.input_shape, dim)
    full = dict(params, head={"kernel": jnp.eye(dim, dtype=jnp.float64), "bias": jnp.zeros(dim, jnp.float64)})
    return np.asarray(jax.jit(twin.apply)(full, x))


def test_protonet_logits_equal_hand_written_distances(float64):
    cfg = _cfg("protonet")
    problem = _problem(cfg)
    algo = make_algorithm(cfg.algo, problem)
    params = _to64(algo.init(jax.random.PRNGKey(0)))
    assert "head" not in params
    task = _task(problem)

    zs = _features_with_identity_head(cfg, problem, params, task.support_x)
    zq = _features_with_identity_head(cfg, problem, params, task.query_x)
    np.testing.assert_allclose(
        jax.jit(lambda p, x: embed(problem.model, p, x))(params, task.support_x), zs, rtol=1e-12
    )
    ys, n_way = np.asarray(task.support_y), cfg.dataset.n_way
    centers = [np.mean([zs[i] for i in range(len(ys)) if ys[i] == k], axis=0) for k in range(n_way)]
    expected = np.array(
        [
            [-sum((zq[i, d] - centers[k][d]) ** 2 for d in range(zq.shape[1])) for k in range(n_way)]
            for i in range(zq.shape[0])
        ]
    )

    adapt, predict, meta_grad = _jitted(algo)
    adapted = adapt(params, (), task.support_x, task.support_y, jax.random.PRNGKey(1), 0)
    logits = np.asarray(predict(params, adapted, task.query_x))
    # One column per support example (6 = 3 ways x 2 shots): the 3 classes, then masked ones.
    assert logits.shape == (zq.shape[0], len(ys))
    np.testing.assert_allclose(logits[:, :n_way], expected, rtol=1e-10)
    assert np.all(logits[:, n_way:] == MASKED_LOGIT)

    # The training loss is the query cross-entropy of those logits.
    tasks = jax.tree.map(lambda v: v[None], task)
    _, _, metrics = meta_grad(params, (), tasks, jax.random.PRNGKey(1), 0)
    log_p = expected - np.log(np.exp(expected).sum(axis=1, keepdims=True))
    yq = np.asarray(task.query_y)
    np.testing.assert_allclose(metrics["loss"], -np.mean(log_p[np.arange(len(yq)), yq]), rtol=1e-10)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(expected.argmax(axis=1) == yq))


def test_joint_batchnorm_normalises_support_and_query_as_one_batch(float64):
    """algo.joint_bn: the training loss of an episode embedded as one batch (the authors'
    few_shot.py), against the same network's features of the concatenated batch by another
    route; and it differs from embedding the two sets apart (so the switch is used)."""
    cfg = _cfg("protonet")
    cfg.algo.joint_bn = True
    problem = _problem(cfg)
    algo = make_algorithm(cfg.algo, problem)
    params = _to64(algo.init(jax.random.PRNGKey(0)))
    task = _task(problem)
    both = _features_with_identity_head(cfg, problem, params, jnp.concatenate([task.support_x, task.query_x]))
    ns, n_way = len(task.support_y), cfg.dataset.n_way
    zs, zq, ys, yq = both[:ns], both[ns:], np.asarray(task.support_y), np.asarray(task.query_y)
    centers = np.stack([zs[ys == k].mean(axis=0) for k in range(n_way)])
    logits = -((zq[:, None, :] - centers[None]) ** 2).sum(axis=-1)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -np.mean(log_p[np.arange(len(yq)), yq])

    tasks = jax.tree.map(lambda v: v[None], task)
    _, _, metrics = jax.jit(algo.meta_grad)(params, (), tasks, jax.random.PRNGKey(1), 0)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-10)
    cfg.algo.joint_bn = False
    apart = make_algorithm(cfg.algo, problem)
    _, _, separate = jax.jit(apart.meta_grad)(params, (), tasks, jax.random.PRNGKey(1), 0)
    assert abs(float(separate["loss"]) - expected) > 1e-6


def test_protomaml_initial_head_reproduces_protonet_exactly(float64):
    net_cfg, pm_cfg = _cfg("protonet"), _cfg("protomaml")
    problem = _problem(pm_cfg)
    protonet, protomaml = make_algorithm(net_cfg.algo, problem), make_algorithm(pm_cfg.algo, problem)
    params = _to64(protomaml.init(jax.random.PRNGKey(0)))
    (net_adapt, net_predict, _), (pm_adapt, pm_predict, _) = _jitted(protonet), _jitted(protomaml)
    embed_fn = jax.jit(lambda p, x: embed(problem.model, p, x))
    key = jax.random.PRNGKey(1)
    for seed in range(3):
        task = _task(problem, seed)
        net = net_predict(params, net_adapt(params, (), task.support_x, task.support_y, key, 0), task.query_x)
        head0 = pm_adapt(params, (), task.support_x, task.support_y, key, 0)
        pm = pm_predict(params, head0, task.query_x)
        np.testing.assert_array_equal(np.argmax(pm, -1), np.argmax(net, -1))
        np.testing.assert_allclose(jax.nn.softmax(pm), jax.nn.softmax(net), rtol=1e-10, atol=1e-14)
        # The logits differ exactly by ||f(x)||^2, the same for every class.
        zq = embed_fn(params, task.query_x)
        n = pm_cfg.dataset.n_way
        np.testing.assert_allclose(
            pm[:, :n] - net[:, :n],
            jnp.broadcast_to(jnp.sum(zq**2, -1)[:, None], (zq.shape[0], n)),
            rtol=1e-10,
        )
        # One inner step moves away from ProtoNet (the fine-tuning does something).
        head1 = pm_adapt(params, (), task.support_x, task.support_y, key, 1)
        assert not np.allclose(jax.nn.softmax(pm_predict(params, head1, task.query_x)), jax.nn.softmax(net))


def test_protomaml_first_order_meta_gradient_reaches_the_embedding_through_the_prototypes(float64):
    cfg = _cfg("protomaml")
    problem = _problem(cfg)
    algo = make_algorithm(cfg.algo, problem)
    params = _to64(algo.init(jax.random.PRNGKey(0)))
    tasks = jax.tree.map(lambda v: v[None], _task(problem))
    grads, _, _ = jax.jit(algo.meta_grad)(params, (), tasks, jax.random.PRNGKey(1), 0)
    # Against central differences of the first-order objective along a random direction:
    # inner gradients are constants, the head's initial value is not.
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    direction = jax.random.normal(jax.random.PRNGKey(3), flat.shape, jnp.float64)
    assert float(jnp.abs(jax.flatten_util.ravel_pytree(grads)[0]).max()) > 0

    def objective(v):
        p = unravel(v)
        task = jax.tree.map(lambda a: a[0], tasks)
        head = proto_head(*prototypes(embed(problem.model, p, task.support_x), task.support_y))
        loss_s = lambda a: problem.source.loss(
            embed(problem.model, a[0], task.support_x) @ a[1]["kernel"] + a[1]["bias"], task.support_y
        )
        g = jax.lax.stop_gradient(jax.grad(loss_s)((p, head)))
        a = jax.tree.map(lambda w, gw: w - 0.1 * gw, (p, head), g)
        logits = embed(problem.model, a[0], task.query_x) @ a[1]["kernel"] + a[1]["bias"]
        return problem.source.loss(logits, task.query_y)

    eps = 1e-6
    objective = jax.jit(objective)
    fd = (objective(flat + eps * direction) - objective(flat - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(grads)[0] @ direction, fd, rtol=1e-5)


def test_training_episodes_take_n_way_train_classes():
    cfg = _cfg("protonet", n_way_train=5)
    validate(cfg)
    source = image_source(cfg.dataset, synthetic_image_arrays(n_classes=6, per_class=8, size=8))
    sample = jax.jit(source.sample)
    train = sample(source.splits["train"], jax.random.PRNGKey(0))
    test = sample(source.splits["test"], jax.random.PRNGKey(0))
    assert sorted(set(np.asarray(train.support_y).tolist())) == list(range(5))
    assert train.query_x.shape[0] == 5 * 3
    assert sorted(set(np.asarray(test.support_y).tolist())) == list(range(3))
    assert source.output_dim == 3
    # Host-gathered training episodes are the same episodes.
    host = image_source(
        cfg.dataset, synthetic_image_arrays(n_classes=6, per_class=8, size=8), placement="host"
    )
    keys = jax.random.PRNGKey(0)[None]
    batch = host.host.gather("train", host.host.indices("train", keys))
    np.testing.assert_array_equal(host.host.to_tasks(batch).support_x[0], train.support_x)
    # A split too small for n_way_train names the key.
    with pytest.raises(ConfigError, match="dataset.n_way_train=7"):
        image_source(_cfg("protonet", n_way_train=7).dataset, synthetic_image_arrays(6, 8, 8))


def test_n_way_train_only_for_metric_algorithms():
    validate(_cfg("protomaml", n_way_train=20))
    with pytest.raises(ConfigError, match="dataset.n_way_train"):
        validate(_cfg("maml", n_way_train=20))


def test_regression_dataset_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="invalid algo.name='protomaml'.*dataset=sinusoid"):
        validate(make_cfg(algo={"name": "protomaml"}))
    proc = run_cli(
        "train", "algo=protonet", "dataset=sinusoid", f"hydra.run.dir={tmp_path / 'r'}", cwd=REPO, check=False
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "algo.name" in lines[0] and "sinusoid" in lines[0], proc.stderr
    assert not (tmp_path / "r").exists()


def test_reproduce_suites_skip_mini_imagenet_without_its_files(tmp_path):
    from metalearn.reproduce import load_suites, plan

    suites = load_suites()
    jobs, notes = plan(suites["protonet"], (0,), tmp_path, "/data/omni", None, [])
    assert [e for e, _, _ in jobs] == ["protonet_omniglot_5w1s", "protonet_omniglot_20w1s"]
    assert len(notes) == 2 and all("--mini-imagenet-dir" in n for n in notes)
    jobs, notes = plan(suites["imaml"], (0,), tmp_path, None, None, [], "/data/mini")
    assert [e for e, _, _ in jobs] == ["imaml_miniimagenet_5w1s"] and "dataset.manual_dir=/data/mini" in jobs[
        0
    ][2]


def test_result_lines_name_no_inner_steps_for_protonet(tmp_path):
    from metalearn.algos import adaptation_phrase
    from metalearn.evaluation import final_line

    results = {"test": {"metric": "accuracy", "mean": 0.9, "ci95": 0.01, "n_tasks": 10}}
    line = final_line(results, make_cfg(algo={"name": "protonet"}), tmp_path)
    assert "inner step" not in line and "90.00%" in line
    line = final_line(results, make_cfg(algo={"name": "protomaml", "inner_steps_test": 3}), tmp_path)
    assert "after 3 inner step(s)" in line
    assert adaptation_phrase("protonet", 3) == "" and "inner" in adaptation_phrase("maml", 1)
