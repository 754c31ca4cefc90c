"""The contested details (docs/algorithms.md, "Contested details") against hand-written references.

The central check composes the real maml_omniglot_5w1s preset (cbfinn/maml's settings),
shrinks only the network, and compares one inner step and one meta-gradient in float64
with an independent transcription of the reference's formula: per-example cross-entropy
divided by K and summed (utils.py ``xent`` under ``tf.gradients``), the spatial-mean head
(maml.py ``forward_conv``), offset-only BatchNorm with epsilon 1e-3 that is meta-learned
but not among the fast weights. The transcription uses ``lax.conv`` (the library uses
im2col), its own BatchNorm and its own log-softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_cfg, synthetic_image_arrays
from hydra import compose, initialize_config_dir
from jax import lax

from metalearn.algos import Problem, make_algorithm
from metalearn.algos.base import loss_scale
from metalearn.cli import config_dir
from metalearn.config import register_configs, validate
from metalearn.errors import ConfigError
from metalearn.models import make_model
from metalearn.optim import make_optimizer, make_schedule
from metalearn.tasks import Task, TaskSource, image_source

N_WAY, K_SHOT, K_QUERY, SIZE, FILTERS = 3, 2, 3, 8, 3


def _compose(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        return compose(config_name="config", overrides=overrides)


def _preset_problem(extra: list[str] = ()):
    """The maml_omniglot_5w1s preset's algo/model settings on a tiny Conv4 and task shape."""
    cfg = _compose(["experiment=maml_omniglot_5w1s", f"model.filters={FILTERS}", "model.blocks=2", *extra])
    source = TaskSource("classification", (SIZE, SIZE, 1), N_WAY, {}, None, (0.0, 1.0))
    model = make_model(cfg.model, source.input_shape, N_WAY)
    return cfg, model, make_algorithm(cfg.algo, Problem(model, source))


def _params64(model, seed=0):
    """float64 params with non-zero BatchNorm offsets and head bias (so their paths matter)."""
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.init(jax.random.key(seed)))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [p + 0.1 * jax.random.normal(k, p.shape, jnp.float64) for p, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, leaves)


def _tasks(n_tasks=2, seed=3):
    rng = np.random.default_rng(seed)

    def labels(k):
        return np.tile(np.arange(N_WAY), k)

    def images(k):
        return rng.random((n_tasks, N_WAY * k, SIZE, SIZE, 1))

    return Task(
        jnp.asarray(images(K_SHOT)),
        jnp.asarray(np.stack([labels(K_SHOT)] * n_tasks), jnp.int32),
        jnp.asarray(images(K_QUERY)),
        jnp.asarray(np.stack([labels(K_QUERY)] * n_tasks), jnp.int32),
    )


# --- the reference formula, written out -------------------------------------------------


def _ref_forward(p, x):
    """cbfinn/maml forward_conv for Omniglot: stride-2 SAME conv + bias, batch_norm(center only,
    eps 1e-3, batch statistics), ReLU; mean over space; x @ w5 + b5."""
    h = x
    for i in range(2):
        conv = p[f"conv_{i}"]
        h = lax.conv_general_dilated(
            h, conv["kernel"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = h + conv["bias"]
        mean = h.mean(axis=(0, 1, 2))
        var = ((h - mean) ** 2).mean(axis=(0, 1, 2))
        h = (h - mean) / jnp.sqrt(var + 1e-3) + p[f"norm_{i}"]["bias"]
        h = jnp.maximum(h, 0.0)
    h = h.mean(axis=(1, 2))
    return h @ p["head"]["kernel"] + p["head"]["bias"]


def _ref_xent_sum_over_k(p, x, y):
    """sum over examples of softmax_cross_entropy / K (utils.py xent, summed)."""
    logits = _ref_forward(p, x)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - jnp.log(jnp.exp(shifted).sum(axis=1, keepdims=True))
    return -(log_probs[jnp.arange(y.shape[0]), y]).sum() / K_SHOT


def _ref_fast_weights(p, x, y, alpha):
    """One inner step on the fast weights only (convs and head); norm_* stay as they are."""
    g = jax.grad(_ref_xent_sum_over_k)(p, x, y)
    return {
        k: (v if k.startswith("norm_") else jax.tree.map(lambda a, b: a - alpha * b, v, g[k]))
        for k, v in p.items()
    }


def _ref_meta_loss(p, tasks, alpha):
    """maml.py total_losses2: reduce_sum of the query xent over tasks / meta_batch_size."""
    losses = [
        _ref_xent_sum_over_k(
            _ref_fast_weights(p, tasks.support_x[t], tasks.support_y[t], alpha),
            tasks.query_x[t],
            tasks.query_y[t],
        )
        for t in range(tasks.support_x.shape[0])
    ]
    return sum(losses) / len(losses)


def _close(a, b, tol=1e-10):
    return all(
        bool(jnp.allclose(x, y, rtol=tol, atol=tol))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_preset_inner_step_and_meta_gradient_equal_the_reference_formula(float64):
    cfg, model, algo = _preset_problem()
    params = _params64(model)
    # The preset's network: offset-only BatchNorm and a head on the FILTERS spatial means.
    assert set(params["norm_0"]) == {"bias"}
    assert params["head"]["kernel"].shape == (FILTERS, N_WAY)
    tasks = _tasks()
    alpha = cfg.algo.inner_lr
    assert alpha == 0.4

    adapted = algo.adapt(params, (), tasks.support_x[0], tasks.support_y[0], jax.random.key(0), 1)
    expected = _ref_fast_weights(params, tasks.support_x[0], tasks.support_y[0], alpha)
    assert _close(adapted, expected)
    assert _close(adapted["norm_1"], params["norm_1"])  # not adapted ...

    grads, _, metrics = algo.meta_grad(params, (), tasks, jax.random.key(0), 0)
    ref_loss, ref_grads = jax.value_and_grad(_ref_meta_loss)(params, tasks, alpha)
    assert float(metrics["loss"]) == pytest.approx(float(ref_loss), rel=1e-12)
    assert _close(grads, ref_grads)
    assert float(jnp.abs(grads["norm_1"]["bias"]).max()) > 1e-6  # ... but meta-learned


@pytest.mark.parametrize(
    "override",
    ["algo.inner_loss=mean", "algo.adapt_bn=true", "model.head=flatten", "model.bn_scale=true"],
)
def test_each_switch_moves_the_inner_step_away_from_the_reference(float64, override):
    """Each of the preset's settings matters: flipping one breaks equality (so the test above
    can fail)."""
    _, model, algo = _preset_problem([override])
    params = _params64(model)
    tasks = _tasks()
    adapted = algo.adapt(params, (), tasks.support_x[0], tasks.support_y[0], jax.random.key(0), 1)
    if override in ("model.head=flatten", "model.bn_scale=true"):
        # Different parameter shapes / trees from the reference's network.
        _, ref_model, _ = _preset_problem()
        assert jax.tree.structure(params) != jax.tree.structure(_params64(ref_model)) or (
            params["head"]["kernel"].shape != (FILTERS, N_WAY)
        )
        return
    expected = _ref_fast_weights(params, tasks.support_x[0], tasks.support_y[0], 0.4)
    assert not _close(adapted, expected, tol=1e-6)


def test_sum_over_shots_scales():
    # Inner: N x the mean (5-way: alpha 0.4 on the sum is 2.0 on the mean); outer: Nq * N / Ns.
    assert loss_scale("sum_over_shots", n_examples=5, n_support=5, n_way=5) == 5.0
    assert loss_scale("sum_over_shots", n_examples=20, n_support=20, n_way=20) == 20.0
    assert loss_scale("sum_over_shots", n_examples=75, n_support=5, n_way=5) == 75.0
    assert loss_scale("sum_over_shots", n_examples=75, n_support=25, n_way=5) == 15.0
    assert loss_scale("mean", n_examples=75, n_support=25, n_way=5) == 1.0


def test_film_post_pool_matches_hand_written(float64):
    """CAVIA's order conv -> BN -> max-pool -> FiLM -> ReLU (classification/models.py)."""
    cfg = make_cfg(
        model={
            "name": "conv4",
            "filters": 2,
            "blocks": 1,
            "downsample": "maxpool",
            "film_position": "post_pool",
        }
    )
    model = make_model(cfg.model, (SIZE, SIZE, 1), N_WAY, context_size=2)
    params = _params64(model)
    # A negative gamma on channel 0: only then does FiLM not commute with the max-pool.
    film_bias = params["film"]["dense"]["bias"].at[0].set(-3.0)
    params = {**params, "film": {"dense": {**params["film"]["dense"], "bias": film_bias}}}
    x = jnp.asarray(np.random.default_rng(0).random((4, SIZE, SIZE, 1)))
    context = jnp.asarray([0.7, -1.3])

    conv = params["conv_0"]
    h = lax.conv_general_dilated(
        x, conv["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = h + conv["bias"]
    mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
    h = (h - mean) / jnp.sqrt(var + 1e-5) * params["norm_0"]["scale"] + params["norm_0"]["bias"]
    h = h.reshape(4, SIZE // 2, 2, SIZE // 2, 2, 2).max(axis=(2, 4))
    film = context @ params["film"]["dense"]["kernel"] + params["film"]["dense"]["bias"]
    h = jnp.maximum((1.0 + film[:2]) * h + film[2:], 0.0)
    expected = h.reshape(4, -1) @ params["head"]["kernel"] + params["head"]["bias"]
    assert jnp.allclose(model.apply(params, x, context), expected, rtol=1e-12, atol=1e-12)
    pre = make_model(
        make_cfg(model={**cfg.model, "film_position": "pre_pool"}).model, (SIZE, SIZE, 1), N_WAY, 2
    )
    assert not jnp.allclose(pre.apply(params, x, context), expected, atol=1e-6)


def _rotated_source(**dataset):
    cfg = make_cfg(
        dataset={"name": "omniglot", "n_way": 4, "k_shot": 2, "k_query": 3, "placement": "device", **dataset}
    ).dataset
    arrays = synthetic_image_arrays(n_classes=6, per_class=20, size=8)
    return cfg, arrays, image_source(cfg, arrays)


def test_per_task_rotation_draws_distinct_characters_each_rotated_once():
    cfg, arrays, source = _rotated_source(rotation_sampling="per_task")
    train = arrays["train"]
    # Every (character, rotation) image, to identify where a sampled image came from.
    lookup = {}
    for c in range(train.shape[0]):
        for i in range(train.shape[1]):
            for k in range(4):
                lookup.setdefault(np.rot90(train[c, i], k, axes=(0, 1)).tobytes(), set()).add((c, k))
    sample = jax.jit(source.sample)
    seen_rotations = set()
    for seed in range(20):
        task = sample(source.splits["train"], jax.random.key(seed))
        x = np.concatenate([task.support_x, task.query_x])
        y = np.concatenate([task.support_y, task.query_y])
        per_class = {}
        for img, label in zip(x, y, strict=True):
            origin = lookup[np.round(img * 255).astype(np.uint8).tobytes()]
            per_class[int(label)] = per_class.get(int(label), origin) & origin
        # One character and one rotation per class (support and query alike) ...
        assert all(len(v) == 1 for v in per_class.values()), per_class
        chars = [next(iter(v))[0] for v in per_class.values()]
        # ... and N distinct characters per task.
        assert len(set(chars)) == cfg.n_way
        seen_rotations |= {next(iter(v))[1] for v in per_class.values()}
    assert seen_rotations == {0, 1, 2, 3}


def test_k_query_test_sizes_evaluation_tasks_only():
    cfg, _, source = _rotated_source(k_query_test=1)
    train = source.sample(source.splits["train"], jax.random.key(0))
    test = source.sample(source.splits["test"], jax.random.key(0))
    assert train.query_x.shape[0] == cfg.n_way * cfg.k_query
    assert test.query_x.shape[0] == cfg.n_way * 1
    assert test.support_x.shape[0] == train.support_x.shape[0] == cfg.n_way * cfg.k_shot


def test_clip_value_and_step_decay():
    cfg = make_cfg(
        optim={
            "name": "sgd",
            "lr": 1.0,
            "clip_value": 10.0,
            "schedule": "step",
            "decay_rate": 0.9,
            "decay_every": 5000,
        }
    )
    lr = make_schedule(cfg.optim, 60000)
    assert [float(lr(s)) for s in (0, 4999, 5000, 10000, 59999)] == pytest.approx(
        [1.0, 1.0, 0.9, 0.81, 0.9**11]
    )
    opt = make_optimizer(cfg.optim, 60000)
    grads = {"w": jnp.asarray([-25.0, 3.0, 12.0])}
    updates, _ = opt.update(grads, opt.init(grads))
    # SGD at lr 1: the update is minus the clamped gradient.
    assert np.allclose(updates["w"], [10.0, -3.0, -10.0])
    # clip_value acts per entry, before clip_norm.
    cfg.optim.clip_norm = 1.0
    opt = make_optimizer(cfg.optim, 60000)
    updates, _ = opt.update(grads, opt.init(grads))
    assert np.allclose(updates["w"], -np.asarray([-10.0, 3.0, 10.0]) / np.linalg.norm([10.0, 3.0, 10.0]))
    assert isinstance(opt, optax.GradientTransformation)


OMNI = {"dataset": {"name": "omniglot", "n_way": 5, "k_shot": 1, "k_query": 1}, "model": {"name": "conv4"}}


@pytest.mark.parametrize(
    ("section", "key", "value", "extra"),
    [
        ("algo", "inner_loss", "sum", {}),
        ("algo", "outer_loss", "sum_over_shots", {}),  # sinusoid: regression
        ("model", "head", "avg", OMNI),
        ("model", "head_init", "zeros", OMNI),
        ("model", "bn_epsilon", 0.0, OMNI),
        ("model", "film_position", "after", OMNI),
        ("dataset", "rotation_sampling", "random", OMNI),
        (
            "dataset",
            "rotation_sampling",
            "per_task",
            {**OMNI, "dataset": {**OMNI["dataset"], "rotations": False}},
        ),
        ("dataset", "k_query_test", 0, OMNI),
        ("dataset", "k_query_test", 20, OMNI),
        ("optim", "clip_value", -1.0, {}),
        ("optim", "schedule", "exponential", {}),
        ("optim", "decay_every", 0, {"optim": {"schedule": "step"}}),
        ("optim", "decay_rate", 1.5, {"optim": {"schedule": "step", "decay_every": 10}}),
    ],
)
def test_bad_switch_values_are_one_line_errors_naming_the_key(section, key, value, extra):
    sections = {s: dict(v) for s, v in extra.items()}
    sections.setdefault(section, {})[key] = value
    cfg = make_cfg(**sections)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("invalid ") and key in message.split("=")[0], message


def test_per_task_with_host_placement_is_refused():
    cfg = make_cfg(
        dataset={**OMNI["dataset"], "rotation_sampling": "per_task", "placement": "host"},
        model={"name": "conv4"},
    )
    with pytest.raises(ConfigError, match="dataset.placement"):
        validate(cfg)
