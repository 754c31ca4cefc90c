"""BatchNorm at evaluation (model.bn_stats, metalearn/batchnorm.py): in the non-transductive
modes a query's logits do not depend on the other queries, for every algorithm; the
transductive mode does depend on them; running averages are what the docs say they are."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_cfg, synthetic_image_arrays

from metalearn.algos import ALGORITHMS, Problem
from metalearn.batchnorm import BatchNormState, with_bn_stats
from metalearn.errors import ConfigError
from metalearn.models import make_model
from metalearn.step import init_state, make_meta_step, setup, step_task_keys
from metalearn.tasks import image_source

N_WAY, K_SHOT, K_QUERY, SIZE = 3, 2, 3, 8


def _experiment(algo: str, bn_stats: str, blocks: int = 2, **model):
    cfg = make_cfg(
        algo={"name": algo},
        dataset={
            "name": "omniglot",
            "n_way": N_WAY,
            "k_shot": K_SHOT,
            "k_query": K_QUERY,
            "placement": "device",
        },
        model={"name": "conv4", "filters": 3, "blocks": blocks, "bn_stats": bn_stats, **model},
    )
    source = image_source(cfg.dataset, synthetic_image_arrays(n_classes=6, per_class=10, size=SIZE))
    return cfg, setup(cfg, source)


def _task(exp):
    return jax.jit(exp.source.sample)(exp.source.splits["test"], jax.random.PRNGKey(1))


def _state(exp, cfg):
    state = init_state(exp, cfg.seed)
    if isinstance(state.algo_state, BatchNormState):
        # Moments unlike any batch's, so that using them shows.
        rng = np.random.default_rng(0)
        running = jax.tree.map(
            lambda v: jnp.asarray(rng.uniform(0.5, 2.0, v.shape), v.dtype), state.algo_state.running
        )
        state = state._replace(algo_state=state.algo_state._replace(running=running))
    return state


@pytest.mark.parametrize("mode", ["support", "running", "batch"])
@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_query_logits_do_not_depend_on_the_other_queries(algo, mode):
    cfg, exp = _experiment(algo, mode)
    state, task = _state(exp, cfg), _task(exp)
    steps = 0 if algo == "protonet" else 1
    adapted = jax.jit(lambda p, s, sx, sy: exp.algo.adapt(p, s, sx, sy, jax.random.PRNGKey(2), steps))(
        state.params, state.algo_state, task.support_x, task.support_y
    )
    predict = jax.jit(exp.algo.predict)
    queries = task.query_x
    together = np.asarray(predict(state.params, adapted, queries))
    one_by_one = [predict(state.params, adapted, queries[i : i + 1])[0] for i in range(len(queries))]
    alone = np.stack([np.asarray(q) for q in one_by_one])
    order = np.random.default_rng(0).permutation(len(queries))
    permuted = np.asarray(predict(state.params, adapted, queries[order]))
    others = jax.random.uniform(jax.random.PRNGKey(3), queries.shape, queries.dtype)
    replaced = np.asarray(predict(state.params, adapted, others.at[0].set(queries[0])))
    if mode == "batch":  # transductive: the others change a query's logits (the test can fail)
        assert not np.array_equal(alone[1:], together[1:])
        assert not np.array_equal(replaced[0], together[0])
        return
    assert np.array_equal(alone, together)
    assert np.array_equal(permuted, together[order])
    assert np.array_equal(replaced[0], together[0])


@pytest.mark.parametrize("algo", ["protonet", "maml"])
def test_running_averages_follow_the_documented_update(algo):
    """One meta-step of 2 tasks: the running moments of the one BatchNorm layer are the EMA
    (momentum 0.3) from (0, 1) of each task's support+query batch moments under the
    meta-parameters before the step, unbiased variance, task after task; training itself is
    bitwise that of bn_stats=batch."""
    cfg, exp = _experiment(algo, "running", blocks=1, bn_momentum=0.3)
    _, exp_batch = _experiment(algo, "batch", blocks=1)
    data = exp.source.splits["train"]
    state = init_state(exp, cfg.seed)
    before = jax.tree.map(np.asarray, state.params)
    base_key = np.asarray(state.key)
    new, _ = make_meta_step(exp, 2)(state, data)
    new_batch, _ = make_meta_step(exp_batch, 2)(init_state(exp_batch, cfg.seed), data)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(new_batch.params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))

    mean, var = np.zeros(3), np.ones(3)
    for key in step_task_keys(jnp.asarray(base_key), 0, 2):
        task = exp.source.sample(data, key)
        x = np.concatenate([np.asarray(task.support_x), np.asarray(task.query_x)]).astype(np.float64)
        conv = before["conv_0"]
        h = jax.lax.conv_general_dilated(
            x,
            np.asarray(conv["kernel"], np.float64),
            (2, 2),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        h = np.asarray(h) + conv["bias"]
        mean = 0.7 * mean + 0.3 * h.mean(axis=(0, 1, 2))
        var = 0.7 * var + 0.3 * h.reshape(-1, 3).var(axis=0, ddof=1)
    running = new.algo_state.running["norm_0"]
    np.testing.assert_allclose(np.asarray(running["mean"]), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(running["var"]), var, rtol=1e-5, atol=1e-6)


def test_running_without_running_averages_is_refused():
    cfg = make_cfg(model={"name": "conv4", "filters": 3, "blocks": 1})
    model = make_model(cfg.model, (SIZE, SIZE, 1), N_WAY)
    _, exp = _experiment("maml", "batch", blocks=1)
    with pytest.raises(ConfigError, match="model.bn_stats='running'.*no running averages"):
        with_bn_stats(cfg.algo, Problem(model, exp.source), "running", False, 0.1)
