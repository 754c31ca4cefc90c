"""BatchNorm at evaluation (model.bn_stats, metalearn/batchnorm.py): in the non-transductive
modes a query's logits do not depend on the other queries, for every algorithm; the
transductive mode does depend on them; running averages are what the docs say they are."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_cfg, synthetic_image_arrays

from metalearn.algos import ALGORITHMS
from metalearn.batchnorm import BatchNormState, with_bn_stats
from metalearn.errors import ConfigError
from metalearn.models import make_model
from metalearn.step import init_state, setup
from metalearn.tasks import image_source

N_WAY, K_SHOT, K_QUERY, SIZE = 3, 2, 3, 8


def _experiment(algo: str, bn_stats: str):
    cfg = make_cfg(
        algo={"name": algo},
        dataset={"name": "omniglot", "n_way": N_WAY, "k_shot": K_SHOT, "k_query": K_QUERY, "placement": "device"},
        model={"name": "conv4", "filters": 3, "blocks": 2, "bn_stats": bn_stats},
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
    alone = np.stack([np.asarray(predict(state.params, adapted, queries[i : i + 1]))[0] for i in range(len(queries))])
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
