"""Task sources (metalearn/tasks.py): image episodes (disjoint classes, consistent labels,
impossible shapes refused) and the sinusoid distribution's ranges."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_cfg

from metalearn.errors import ConfigError
from metalearn.tasks import image_source, sample_episode, sample_sinusoid, sinusoid_source

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
    # test_sinusoid_amplitude_phase_and_x_ranges below.


def test_sinusoid_amplitude_phase_and_x_ranges():
    amp, phase, x_range = (0.5, 2.0), (0.3, 1.2), (-2.0, 3.0)
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    tasks = jax.vmap(lambda k: sample_sinusoid(k, 6, 6, amp, phase, x_range))(keys)
    x = np.concatenate([tasks.support_x, tasks.query_x], axis=1)[..., 0].astype(np.float64)
    y = np.concatenate([tasks.support_y, tasks.query_y], axis=1)[..., 0].astype(np.float64)
    assert x.min() >= x_range[0] and x.max() <= x_range[1]
    # x covers its range (uniform): both ends of it are reached within 5%.
    assert x.min() < x_range[0] + 0.25 and x.max() > x_range[1] - 0.25
    # Recover each task's amplitude and phase exactly: y = A sin(x - p) = a sin x + b cos x
    # with a = A cos p, b = -A sin p, a linear least-squares fit over its 12 points.
    design = np.stack([np.sin(x), np.cos(x)], axis=-1)  # (T, 12, 2)
    coef = np.stack([np.linalg.lstsq(d, t, rcond=None)[0] for d, t in zip(design, y, strict=True)])
    fitted = np.einsum("tnk,tk->tn", design, coef)
    np.testing.assert_allclose(fitted, y, atol=1e-4)  # the tasks are sinusoids of x
    a_hat = np.hypot(coef[:, 0], coef[:, 1])
    p_hat = np.arctan2(-coef[:, 1], coef[:, 0])
    tol = 1e-3
    assert a_hat.min() >= amp[0] - tol and a_hat.max() <= amp[1] + tol
    assert p_hat.min() >= phase[0] - tol and p_hat.max() <= phase[1] + tol
    # ... and fill them (uniform draws): 400 tasks come within 10% of each end.
    assert a_hat.min() < amp[0] + 0.15 and a_hat.max() > amp[1] - 0.15
    assert p_hat.min() < phase[0] + 0.09 and p_hat.max() > phase[1] - 0.09


def test_sinusoid_source_passes_the_config_ranges_to_the_sampler():
    cfg = make_cfg(dataset={"amp_min": 3.0, "amp_max": 3.5, "x_min": 1.0, "x_max": 1.5})
    source = sinusoid_source(cfg.dataset)
    keys = jax.random.split(jax.random.PRNGKey(0), 50)
    tasks = jax.vmap(source.sample, in_axes=(None, 0))(source.splits["train"], keys)
    x = np.asarray(tasks.support_x)
    assert x.min() >= 1.0 and x.max() <= 1.5
    # Over x in [1, 1.5] and phase in [0, pi], |y| <= A <= 3.5, and some task exceeds 2.
    y = np.abs(np.asarray(tasks.support_y))
    assert y.max() <= 3.5 + 1e-5 and y.max() > 2.0
