"""``algo.remat``: recomputing the inner steps in the backward pass changes memory, not math."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import make_cfg, synthetic_image_arrays

from metalearn.algos import Problem, make_algorithm
from metalearn.models import make_model
from metalearn.tasks import image_source


def _meta_grad_fn(remat: bool):
    """MAML, 5 second-order inner steps, on a small Conv4 (3-way 1-shot 8x8 images);
    returns (meta_grad, params, tasks, key)."""
    cfg = make_cfg(
        dataset={"name": "omniglot", "n_way": 3, "k_shot": 1, "k_query": 3},
        model={"name": "conv4", "filters": 8, "blocks": 2},
        algo={"name": "maml", "inner_lr": 0.1, "inner_steps": 5, "remat": remat},
    )
    source = image_source(cfg.dataset, synthetic_image_arrays(n_classes=6, per_class=6, size=8))
    model = make_model(cfg.model, source.input_shape, source.output_dim)
    algo = make_algorithm(cfg.algo, Problem(model, source))
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    tasks = jax.vmap(source.sample, in_axes=(None, 0))(source.splits["train"], keys)
    return algo.meta_grad, algo.init(jax.random.PRNGKey(0)), tasks, jax.random.PRNGKey(2)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_remat_gives_the_same_meta_gradient_with_less_temporary_memory():
    compiled = {}
    grads = {}
    for remat in (False, True):
        meta_grad, params, tasks, key = _meta_grad_fn(remat)
        compiled[remat] = jax.jit(meta_grad).lower(params, (), tasks, key, 0).compile()
        grads[remat], _, metrics = compiled[remat](params, (), tasks, key, 0)
        assert np.isfinite(float(metrics["loss"]))
    np.testing.assert_allclose(_flat(grads[True]), _flat(grads[False]), rtol=1e-5, atol=1e-7)
    assert np.abs(_flat(grads[False])).max() > 0

    analyses = {remat: c.memory_analysis() for remat, c in compiled.items()}
    if any(a is None or not hasattr(a, "temp_size_in_bytes") for a in analyses.values()):
        pytest.skip(f"memory_analysis() gives no temp sizes on backend {jax.default_backend()}")
    temp = {remat: a.temp_size_in_bytes for remat, a in analyses.items()}
    # Without remat the backward pass keeps every inner step's activations (5 steps);
    # with remat only the parameters entering each step.
    assert temp[True] < temp[False], temp
