"""Episode sampler and model building blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_cfg
from jax import lax

from metalearn.errors import ConfigError
from metalearn.models import Conv4, conv3x3_im2col, conv3x3_xla, make_model
from metalearn.tasks import image_source, sample_episode, sample_sinusoid

SPLITS = ("train", "validation", "test")


def _tagged_arrays(n_classes=9, per_class=7, size=5):
    """Image (split s, class c, index i) holds s, c, i in its first three pixels."""
    arrays = {}
    for s, split in enumerate(SPLITS):
        arr = np.zeros((n_classes, per_class, size, size, 1), np.uint8)
        arr[:, :, 0, 0, 0] = s
        arr[:, :, 0, 1, 0] = np.arange(n_classes)[:, None]
        arr[:, :, 0, 2, 0] = np.arange(per_class)[None, :]
        arrays[split] = arr
    return arrays


def _tags(x):
    px = np.rint(np.asarray(x)[..., 0, :3, 0] * 255).astype(int)  # (N, 3): split, class, index
    return px[:, 0], px[:, 1], px[:, 2]


@pytest.mark.parametrize("split_id", [0, 1, 2])
def test_episode_disjoint_consistent_labels_and_split(split_id):
    arrays = _tagged_arrays()
    images = jnp.asarray(arrays[SPLITS[split_id]])
    n_way, k_shot, k_query = 4, 2, 3
    sample = jax.jit(lambda k: sample_episode(images, k, n_way, k_shot, k_query))
    first_label_class = []
    for seed in range(30):
        task = sample(jax.random.PRNGKey(seed))
        assert task.support_x.shape == (n_way * k_shot, 5, 5, 1)
        assert task.query_x.shape == (n_way * k_query, 5, 5, 1)
        s_split, s_cls, s_idx = _tags(task.support_x)
        q_split, q_cls, q_idx = _tags(task.query_x)
        # only the requested split
        assert set(s_split) == {split_id} and set(q_split) == {split_id}
        # n_way distinct classes, each label maps to exactly one class, the same in support and query
        label_to_class = {}
        for y, c in zip(
            np.concatenate([task.support_y, task.query_y]), np.concatenate([s_cls, q_cls]), strict=True
        ):
            assert label_to_class.setdefault(int(y), int(c)) == int(c)
        assert sorted(label_to_class) == list(range(n_way))
        assert len(set(label_to_class.values())) == n_way
        # support and query share no image; no image repeats
        images_s = set(zip(s_cls, s_idx, strict=True))
        images_q = set(zip(q_cls, q_idx, strict=True))
        assert len(images_s) == n_way * k_shot and len(images_q) == n_way * k_query
        assert not images_s & images_q
        first_label_class.append(label_to_class[0])
    # the class -> label map is permuted per task, not sorted
    assert len(set(first_label_class)) > 3


def test_image_source_rejects_impossible_episodes():
    arrays = _tagged_arrays(n_classes=9, per_class=7)
    cfg = make_cfg(dataset={"name": "omniglot", "n_way": 10, "k_shot": 1, "k_query": 1})
    with pytest.raises(ConfigError, match="dataset.n_way"):
        image_source(cfg.dataset, arrays)
    cfg = make_cfg(dataset={"name": "omniglot", "n_way": 5, "k_shot": 4, "k_query": 4})
    with pytest.raises(ConfigError, match="dataset.k_shot"):
        image_source(cfg.dataset, arrays)


def test_sinusoid_ranges():
    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    tasks = jax.vmap(lambda k: sample_sinusoid(k, 10, 7, (0.1, 5.0), (0.0, np.pi), (-5.0, 5.0)))(keys)
    assert tasks.support_x.shape == (200, 10, 1) and tasks.query_x.shape == (200, 7, 1)
    x = np.concatenate([tasks.support_x, tasks.query_x], axis=1)
    y = np.concatenate([tasks.support_y, tasks.query_y], axis=1)
    assert x.min() >= -5 and x.max() <= 5
    assert np.abs(y).max() <= 5.0 + 1e-6
    # Each task's amplitude and phase recovered and checked against their ranges:
    # test_holes_math.py::test_sinusoid_amplitude_phase_and_x_ranges.


@pytest.mark.parametrize("size,stride,channels", [(28, 2, 1), (7, 2, 3), (8, 1, 2), (5, 2, 4)])
def test_im2col_conv_equals_lax_conv(size, stride, channels):
    kx, kk = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (3, size, size, channels))
    kernel = jax.random.normal(kk, (3, 3, channels, 5))
    reference = lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )
    np.testing.assert_allclose(conv3x3_im2col(x, kernel, stride), reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(conv3x3_xla(x, kernel, stride), reference, rtol=1e-4, atol=1e-4)


def test_conv4_shapes_and_transductive_batchnorm():
    model = make_model(make_cfg(model={"name": "conv4"}).model, (28, 28, 1), 5)
    params = model.init(jax.random.PRNGKey(0))
    assert params["conv_0"]["kernel"].shape == (3, 3, 1, 64)
    assert params["head"]["kernel"].shape == (2 * 2 * 64, 5)  # 28 -> 14 -> 7 -> 4 -> 2
    x = jax.random.uniform(jax.random.PRNGKey(1), (6, 28, 28, 1))
    out = model.apply(params, x)
    assert out.shape == (6, 5)
    # Batch statistics: the prediction for x[0] depends on the rest of the batch.
    out2 = model.apply(params, x.at[1:].set(0.0))
    assert not np.allclose(out[0], out2[0])

    pooled = Conv4(out=5, filters=32, downsample="maxpool")
    p = pooled.init(jax.random.PRNGKey(0), jnp.zeros((2, 84, 84, 3)))["params"]
    assert p["head"]["kernel"].shape == (5 * 5 * 32, 5)  # 84 -> 42 -> 21 -> 10 -> 5
