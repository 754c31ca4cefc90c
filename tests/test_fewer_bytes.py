"""Changes that cut the bytes per meta-step (docs/performance.md, "Fewer bytes per meta-step")
reorganise the computation without changing it: ``model.pool_impl=reshape`` gives the max-pool's
values and derivatives of flax's reduce-window, and the same second-order MAML meta-gradient in
float64. And scripts/bench.py names the roof that bounds a step."""

from __future__ import annotations

import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, close64, make_cfg, synthetic_image_arrays

from metalearn.algos import Problem, make_algorithm
from metalearn.models import make_model
from metalearn.models.layers import max_pool_2x2
from metalearn.tasks import image_source


def _flax_pool(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


@pytest.mark.parametrize("shape", [(2, 6, 6, 3), (2, 5, 7, 3)])  # even, and odd (a row/column dropped)
def test_reshape_max_pool_equals_flax_with_ties_to_second_order(float64, shape):
    rng = np.random.default_rng(0)
    # Small integers: most windows hold ties, where the derivative must go to the first maximum.
    x = jnp.asarray(rng.integers(0, 3, shape).astype(np.float64))
    w = jnp.asarray(rng.normal(size=(shape[1] // 2, shape[2] // 2, 3)))

    def loss(pool):
        return lambda x: jnp.sum(jnp.sin(pool(x)) * w)

    def outer(pool):  # a loss of the gradient, differentiated again (second-order MAML)
        return lambda x: jnp.sum(jax.grad(loss(pool))(x) ** 2 * jnp.cos(x))

    np.testing.assert_array_equal(max_pool_2x2(x), _flax_pool(x))
    np.testing.assert_array_equal(jax.grad(loss(max_pool_2x2))(x), jax.grad(loss(_flax_pool))(x))
    np.testing.assert_array_equal(jax.grad(outer(max_pool_2x2))(x), jax.grad(outer(_flax_pool))(x))
    assert np.abs(jax.grad(outer(_flax_pool))(x)).max() > 0


def _maml_meta_grad(model: dict, pool_impl: str):
    """Second-order MAML (2 inner steps) meta-gradient of a small max-pool model in float64."""
    cfg = make_cfg(
        dataset={"name": "omniglot", "n_way": 3, "k_shot": 1, "k_query": 2},
        model={**model, "pool_impl": pool_impl},
        algo={"name": "maml", "inner_lr": 0.1, "inner_steps": 2},
    )
    source = image_source(cfg.dataset, synthetic_image_arrays(n_classes=6, per_class=6, size=12))
    algo = make_algorithm(
        cfg.algo, Problem(make_model(cfg.model, source.input_shape, source.output_dim), source)
    )
    params = jax.tree.map(lambda a: a.astype(jnp.float64), algo.init(jax.random.PRNGKey(0)))
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    tasks = jax.vmap(source.sample, in_axes=(None, 0))(source.splits["train"], keys)
    # Noise on the binary images, so that windows have a unique maximum as real images do.
    noise = 0.1 * jax.random.normal(jax.random.PRNGKey(2), tasks.query_x.shape, jnp.float64)
    tasks = tasks._replace(
        support_x=tasks.support_x.astype(jnp.float64) + noise[:, : tasks.support_x.shape[1]],
        query_x=tasks.query_x.astype(jnp.float64) + noise,
    )
    grads, _, metrics = jax.jit(algo.meta_grad)(params, (), tasks, jax.random.PRNGKey(3), 0)
    return grads, metrics


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(
            {"name": "conv4", "filters": 4, "blocks": 2, "downsample": "maxpool"}, id="conv4_maxpool"
        ),
        # About a minute of compiling (two float64 second-order ResNet-12 steps): slow tier.
        pytest.param({"name": "resnet12", "channels": [4, 6]}, id="resnet12", marks=pytest.mark.slow),
    ],
)
def test_reshape_pool_gives_the_same_second_order_meta_gradient(float64, model):
    ours, our_metrics = _maml_meta_grad(model, "reshape")
    flax_, flax_metrics = _maml_meta_grad(model, "reduce_window")
    close64(ours, flax_)
    close64(our_metrics, flax_metrics)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(flax_)) > 0


def _bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_roofline_names_the_lower_roof():
    roofline = _bench().roofline
    # A device of 100 GFLOP/s and 10 GB/s: ridge at 10 FLOP/B.
    low = roofline(2e9, 1e9, 100e9, 10e9)  # 2 FLOP/B: bandwidth allows 20 GFLOP/s
    assert low["bound"] == "memory" and low["arithmetic_intensity"] == 2.0 and low["ridge_intensity"] == 10.0
    assert low["roof_flops_per_s"] == pytest.approx(20e9)
    high = roofline(50e9, 1e9, 100e9, 10e9)  # 50 FLOP/B: the FLOP/s peak is the lower roof
    assert high["bound"] == "compute" and high["roof_flops_per_s"] == 100e9
    assert roofline(None, 1e9, 100e9, 10e9)["bound"] is None
