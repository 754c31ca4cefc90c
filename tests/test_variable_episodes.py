"""Variable-way, variable-shot episodes (dataset.episodes=variable, metalearn/episodes.py):
the sampler keeps Meta-Dataset's bounds for any source, and padding changes no bit of any
number of any algorithm (loss, meta-gradient, accuracy, predictions, running moments) in any
BatchNorm mode, in float64 (row chunks, metalearn/rows.py)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHARED_OMNIGLOT, make_cfg, run_cli, run_cli_in_process, synthetic_image_arrays
from hypothesis import given, settings
from hypothesis import strategies as st

from metalearn.algos import ALGORITHMS
from metalearn.batchnorm import BatchNormState
from metalearn.episodes import (
    MAX_SUPPORT_CONTRIBUTION_PER_CLASS,
    episode_composition,
    variable_episode_indices,
)
from metalearn.errors import ConfigError
from metalearn.models.layers import RECORDED_MOMENTS, BatchStatNorm
from metalearn.step import setup
from metalearn.tasks import Task, image_source

# ----------------------------------------------------------------------------- the sampler


def _layout(counts: list[int]) -> tuple[jax.Array, jax.Array]:
    counts_arr = np.asarray(counts, np.int32)
    return jnp.asarray(np.concatenate([[0], np.cumsum(counts_arr)[:-1]]).astype(np.int32)), jnp.asarray(
        counts_arr
    )


def _check_episode(counts, bounds, support_index, support_y, query_index, query_y):
    """Every rule of the protocol on one sampled episode (numpy)."""
    counts = np.asarray(counts)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sy, qy = np.asarray(support_y), np.asarray(query_y)
    si, qi = np.asarray(support_index), np.asarray(query_index)
    assert sy.shape == (bounds["max_support"],) and qy.shape == (bounds["max_ways"] * bounds["max_query"],)
    for y in (sy, qy):  # real rows first, then padding (-1)
        real = y >= 0
        assert not np.any(real[np.argmin(real) :]) or real.all()
    ways = qy.max() + 1
    assert bounds["min_ways"] <= ways <= min(bounds["max_ways"], len(counts))
    assert set(sy[sy >= 0]) == set(range(ways)) == set(qy[qy >= 0])
    class_of = np.searchsorted(offsets, np.concatenate([si[sy >= 0], qi[qy >= 0]]), side="right") - 1
    labels = np.concatenate([sy[sy >= 0], qy[qy >= 0]])
    chosen = {}
    for label, c in zip(labels, class_of, strict=True):
        assert chosen.setdefault(label, c) == c  # one class per label
    assert len(set(chosen.values())) == ways  # distinct classes
    n = np.array([counts[chosen[j]] for j in range(ways)])
    queries = min(bounds["max_query"], int((n // 2).min()))
    shots = np.bincount(sy[sy >= 0], minlength=ways)
    assert np.all(np.bincount(qy[qy >= 0], minlength=ways) == queries)
    assert np.all(shots >= 1) and np.all(shots <= n - queries)
    assert shots.sum() <= bounds["max_support"]
    # sampling.py's upper bound on the support size: every class's contribution capped.
    assert shots.sum() <= np.minimum(MAX_SUPPORT_CONTRIBUTION_PER_CLASS, n - queries).sum()
    images = np.concatenate([si[sy >= 0], qi[qy >= 0]])
    assert len(set(images.tolist())) == len(images)  # without replacement, support apart from query


# Each distinct number of classes compiles the sampler anew: few examples in the default tier.
@settings(max_examples=12, deadline=None)
@given(
    counts=st.lists(st.integers(2, 300), min_size=3, max_size=70),
    min_ways=st.integers(2, 6),
    extra_ways=st.integers(0, 50),
    max_query=st.integers(1, 12),
    support_factor=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_sampled_episodes_keep_the_protocols_bounds(
    counts, min_ways, extra_ways, max_query, support_factor, seed
):
    min_ways = min(min_ways, len(counts))
    max_ways = min_ways + extra_ways
    bounds = {
        "min_ways": min_ways,
        "max_ways": max_ways,
        "max_support": max_ways * support_factor,
        "max_query": max_query,
    }
    offsets, counts_arr = _layout(counts)
    episode = variable_episode_indices(jax.random.PRNGKey(seed), offsets, counts_arr, max(counts), bounds)
    _check_episode(counts, bounds, *episode)


def test_composition_follows_the_papers_rules_on_average():
    """Ways uniform on [5, min(50, C)]; the support set at most 500; each class's shots roughly
    proportional to its size (the imbalance weights average out)."""
    counts = jnp.asarray([20] * 30 + [600] * 30, jnp.int32)
    bounds = {"min_ways": 5, "max_ways": 50, "max_support": 500, "max_query": 10}
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    classes, way_mask, ways, queries, shots = jax.jit(
        jax.vmap(lambda k: episode_composition(k, counts, bounds))
    )(keys)
    ways = np.asarray(ways)
    assert ways.min() == 5 and ways.max() == 50
    assert abs(ways.mean() - 27.5) < 1.0  # uniform on 5..50
    assert np.all(np.asarray(shots).sum(axis=1) <= 500)
    assert np.all(np.asarray(queries) == 10)  # min(10, floor(20 / 2))
    small = np.asarray(counts)[np.asarray(classes)] == 20
    real = np.asarray(way_mask)
    assert np.asarray(shots)[real & small].max() <= 10  # n - Q


# ----------------------------------------------------------------------------- padding

BOUNDS = {"min_ways": 2, "max_ways": 4, "max_support": 12, "max_query": 3}
SIZE = 8


def _experiment(
    algo: str, bn_stats: str = "batch", model: dict | None = None, padding: str = "exact", **algo_keys
):
    extra = {"inner_batch_size": 0} if algo == "reptile" else {}
    model = model or {"name": "conv4", "filters": 2, "blocks": 1}
    dataset = {"name": "omniglot", "placement": "device", "episodes": "variable", "padding": padding}
    cfg = make_cfg(
        algo={"name": algo, **extra, **algo_keys},
        dataset={**dataset, **BOUNDS},
        model={**model, "bn_stats": bn_stats},
    )
    arrays = synthetic_image_arrays(n_classes=6, per_class=9, size=SIZE)
    source = image_source(cfg.dataset, arrays)
    return cfg, setup(cfg, source)


def _padded_and_unpadded(exp, seed: int = 3) -> tuple[Task, Task]:
    """One sampled episode (with padding) and the same episode without its padded rows, in
    float64."""
    sample = jax.jit(exp.source.sample)
    while True:  # the first episode from ``seed`` on with padding in both sets
        task = sample(exp.source.splits["train"], jax.random.PRNGKey(seed))
        if np.any(np.asarray(task.support_y) < 0) and np.any(np.asarray(task.query_y) < 0):
            break
        seed += 1
    task = Task(
        task.support_x.astype(jnp.float64), task.support_y, task.query_x.astype(jnp.float64), task.query_y
    )
    s, q = np.asarray(task.support_y) >= 0, np.asarray(task.query_y) >= 0
    return task, Task(task.support_x[s], task.support_y[s], task.query_x[q], task.query_y[q])


def _float64_params(exp):
    meta = jax.tree.map(lambda a: a.astype(jnp.float64), exp.algo.init(jax.random.PRNGKey(0)))
    return meta, jax.tree.map(lambda a: a.astype(jnp.float64), exp.algo.init_state(meta))


def _batch(task: Task) -> Task:
    return jax.tree.map(lambda a: a[None], task)


def _assert_same(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _meta_grads(exp, meta, state, padded: Task, unpadded: Task):
    """((grads, state, metrics) of the padded episode, the same of the unpadded one)."""
    key, step = jax.random.PRNGKey(5), jnp.int32(0)
    return (
        exp.algo.meta_grad(meta, state, _batch(padded), key, step),
        exp.algo.meta_grad(meta, state, _batch(unpadded), key, step),
    )


def _assert_same_evaluation(exp, meta, state, algo: str, padded: Task, unpadded: Task) -> None:
    """Adaptation on the support set, predictions and accuracy on the queries: bitwise equal."""
    key = jax.random.PRNGKey(5)
    steps = 0 if algo == "protonet" else 1
    n_query = unpadded.query_y.shape[0]

    def evaluate(task):
        adapted = exp.algo.adapt(meta, state, task.support_x, task.support_y, key, steps)
        pred = exp.algo.predict(meta, adapted, task.query_x)
        # ProtoNet and ProtoMAML score one column per way: the episode's ways come first.
        return pred[:n_query, : BOUNDS["max_ways"]], exp.source.metric(pred, task.query_y)

    (pred_p, accuracy_p), (pred_u, accuracy_u) = evaluate(padded), evaluate(unpadded)
    _assert_same(pred_p, pred_u)
    _assert_same(accuracy_p, accuracy_u)


# One algorithm of each kind in the default tier (a differentiated inner loop, a metric one);
# every algorithm in the slow tier (each compiles a second-order meta-gradient in float64).
_DEFAULT_RUN = {"maml", "protonet"}


@pytest.mark.parametrize(
    "algo",
    [
        pytest.param(a, marks=() if a in _DEFAULT_RUN else pytest.mark.slow)
        for a in sorted(ALGORITHMS)
        if a != "pretrain"  # refuses variable episodes (class batches, not episodes)
    ],
)
def test_padding_changes_no_loss_meta_gradient_or_accuracy(float64, algo):
    cfg, exp = _experiment(algo)
    padded, unpadded = _padded_and_unpadded(exp)
    meta, state = _float64_params(exp)
    (grads_p, _, metrics_p), (grads_u, _, metrics_u) = _meta_grads(exp, meta, state, padded, unpadded)
    assert np.isfinite(float(metrics_p["loss"]))
    _assert_same(metrics_p, metrics_u)
    _assert_same(grads_p, grads_u)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads_p))
    _assert_same_evaluation(exp, meta, state, algo, padded, unpadded)


@pytest.mark.parametrize(
    ("algo", "model", "algo_keys"),
    [
        # Support and query embedded as one batch: padded rows in the middle of it.
        ("protonet", None, {"joint_bn": True}),
        # ResNet-12: 1x1 shortcut convs, four BatchNorms per stage, a spatial mean.
        pytest.param("maml", {"name": "resnet12", "channels": [2, 3]}, {}, marks=pytest.mark.slow),
        ("protonet", {"name": "resnet12", "channels": [2, 3]}, {}),
    ],
)
def test_padding_changes_nothing_in_joint_batches_and_resnet12(float64, algo, model, algo_keys):
    cfg, exp = _experiment(algo, model=model, **algo_keys)
    padded, unpadded = _padded_and_unpadded(exp)
    meta, state = _float64_params(exp)
    (grads_p, _, metrics_p), (grads_u, _, metrics_u) = _meta_grads(exp, meta, state, padded, unpadded)
    _assert_same(metrics_p, metrics_u)
    _assert_same(grads_p, grads_u)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads_p))


@pytest.mark.parametrize("algo", ["maml", "protonet"])
def test_masked_padding_matches_to_float64_rounding(float64, algo):
    """dataset.padding=masked (no row chunks): the same numbers to rounding, not bitwise; a
    padded row that leaked in would differ by ~1e-2."""
    cfg, exp = _experiment(algo, padding="masked")
    assert exp.source.row_chunk == 0
    padded, unpadded = _padded_and_unpadded(exp)
    meta, state = _float64_params(exp)
    (grads_p, _, metrics_p), (grads_u, _, metrics_u) = _meta_grads(exp, meta, state, padded, unpadded)
    _assert_same(metrics_p["accuracy"], metrics_u["accuracy"])
    for x, y in zip(
        jax.tree.leaves((metrics_p, grads_p)), jax.tree.leaves((metrics_u, grads_u)), strict=True
    ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("mode", ["support", "running", "support_query"])
@pytest.mark.parametrize("algo", ["protonet", pytest.param("maml", marks=pytest.mark.slow)])
def test_padding_changes_nothing_in_every_batchnorm_mode(float64, algo, mode):
    cfg, exp = _experiment(algo, mode)
    padded, unpadded = _padded_and_unpadded(exp)
    meta, state = _float64_params(exp)
    if isinstance(state, BatchNormState):  # the running averages after one meta-step
        (_, state_p, _), (_, state_u, _) = _meta_grads(exp, meta, state, padded, unpadded)
        _assert_same(state_p.running, state_u.running)
        state = state_p
    _assert_same_evaluation(exp, meta, state, algo, padded, unpadded)


def test_masked_batchnorm_is_the_real_rows_moments(float64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3, 3, 4))
    rows = np.array([True, True, False, True, False, True, False])
    layer = BatchStatNorm(epsilon=1e-3)
    params = layer.init(jax.random.PRNGKey(0), jnp.asarray(x))
    params = {"params": {"bias": jnp.asarray(rng.normal(size=4)), "scale": jnp.asarray(rng.normal(size=4))}}
    y, recorded = layer.apply(params, jnp.asarray(x), jnp.asarray(rows), mutable=[RECORDED_MOMENTS])
    real = x[rows]
    mean, var = real.mean(axis=(0, 1, 2)), real.var(axis=(0, 1, 2))
    expected = (x - mean) / np.sqrt(var + 1e-3) * params["params"]["scale"] + params["params"]["bias"]
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-12, atol=1e-12)
    moments = recorded[RECORDED_MOMENTS]
    np.testing.assert_allclose(np.asarray(moments["mean"]), mean, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(moments["var"]), var, rtol=1e-12)
    assert float(moments["count"]) == rows.sum() * 9
    # Unmasked (every row real): the plain batch statistics.
    y_all = layer.apply(params, jnp.asarray(x), jnp.ones(7, bool))
    np.testing.assert_allclose(np.asarray(y_all), np.asarray(layer.apply(params, jnp.asarray(x))), rtol=1e-12)


# ----------------------------------------------------------------------------- config


def test_fixed_episodes_are_the_default_and_variable_ones_fill_the_max_ways_head():
    cfg = make_cfg(dataset={"name": "omniglot"})
    assert cfg.dataset.episodes == "fixed"
    _, exp = _experiment("maml")
    assert exp.source.output_dim == BOUNDS["max_ways"] and exp.source.padded
    task = jax.jit(exp.source.sample)(exp.source.splits["test"], jax.random.PRNGKey(0))
    assert task.support_x.shape == (BOUNDS["max_support"], SIZE, SIZE, 1)
    assert task.query_x.shape == (BOUNDS["max_ways"] * BOUNDS["max_query"], SIZE, SIZE, 1)


def test_classes_of_different_sizes_as_image_folders_give_them():
    """A split of ClassImages (image folders): classes of 1 image are dropped, the others
    sampled within the protocol's bounds."""
    from metalearn.data.common import ClassImages

    counts = [1, 2, 3, 5, 8, 13, 21]
    rng = np.random.default_rng(0)
    split = ClassImages(
        rng.integers(0, 256, (sum(counts), SIZE, SIZE, 1), dtype=np.uint8), np.asarray(counts)
    )
    cfg = make_cfg(dataset={"name": "image_folder", "placement": "device", "episodes": "variable", **BOUNDS})
    source = image_source(cfg.dataset, {"train": split, "validation": split, "test": split})
    assert "classes with fewer than 2 images dropped: train 1" in source.placement_note
    data = source.splits["test"]
    for seed in range(5):
        task = jax.jit(source.sample)(data, jax.random.PRNGKey(seed))
        real = np.asarray(task.support_y) >= 0
        assert np.isnan(np.asarray(task.support_x)[~real]).all()
        assert np.isfinite(np.asarray(task.support_x)[real]).all()
        episode = variable_episode_indices(
            jax.random.PRNGKey(seed), data["offsets"], data["counts"], data["slots"].shape[0], BOUNDS
        )
        _check_episode(counts[1:], BOUNDS, *episode)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("dataset.episodes=random", "dataset.episodes"),
        ("dataset.max_ways=3", "dataset.max_ways"),
        ("dataset.max_support=20", "dataset.max_support"),
        ("dataset.max_query=0", "dataset.max_query"),
        ("dataset.padding=fast", "dataset.padding"),
    ],
)
def test_bad_bounds_are_one_line_errors(override, key, tmp_path):
    code, _, err = run_cli_in_process(
        "train", "dataset=omniglot", "dataset.episodes=variable", override, f"hydra.run.dir={tmp_path}"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and key in err


def test_settings_without_meaning_for_variable_shots_are_refused(tmp_path):
    code, _, err = run_cli_in_process(
        "train",
        "dataset=omniglot",
        "dataset.episodes=variable",
        "algo.inner_loss=sum_over_shots",
        f"hydra.run.dir={tmp_path}",
    )
    assert code == 2 and "algo.inner_loss" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="dataset.placement"):
        cfg = make_cfg(dataset={"name": "omniglot", "placement": "host", "episodes": "variable", **BOUNDS})
        image_source(cfg.dataset, synthetic_image_arrays(n_classes=6, per_class=9, size=SIZE))


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_OMNIGLOT.is_dir(), reason="shared Omniglot archives not present")
def test_omniglot_variable_episodes_train_and_test_through_the_cli(tmp_path):
    run_dir = tmp_path / "run"
    run_cli(
        "train",
        "dataset=omniglot",
        "dataset.variant=small",
        f"dataset.manual_dir={SHARED_OMNIGLOT}",
        f"dataset.data_dir={tmp_path / 'data'}",
        "dataset.episodes=variable",
        "dataset.max_ways=8",
        "dataset.max_support=40",
        "dataset.max_query=4",
        "model.filters=4",
        "trainer.steps=4",
        "trainer.log_every=2",
        "trainer.val_every=2",
        "trainer.val_tasks=4",
        "trainer.meta_batch_size=2",
        "trainer.progress=false",
        "eval.n_tasks=6",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    test = json.loads((run_dir / "results.json").read_text())["test"]
    assert test["metric"] == "accuracy" and 0.0 <= test["mean"] <= 1.0 and test["n_tasks"] == 6
