"""Where episodes are sampled: on device, or gathered on the host and prefetched.

Both placements must draw the same tasks from the same keys, so a run gives the same
numbers whichever is chosen; classes of different sizes (image folders) must be sampled
uniformly without replacement within the class.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import make_cfg, synthetic_image_arrays

from metalearn.data.common import ClassImages
from metalearn.errors import ConfigError
from metalearn.evaluation import make_evaluator
from metalearn.prefetch import HostPrefetcher
from metalearn.step import init_state, make_meta_step, setup, step_task_keys, task_mesh
from metalearn.tasks import choose_placement, image_source, ragged_indices


def _cfg():
    return make_cfg(
        dataset={"name": "omniglot", "n_way": 3, "k_shot": 1, "k_query": 2},
        model={"name": "conv4", "filters": 4, "blocks": 2},
        algo={"inner_lr": 0.4},
        trainer={"steps": 4, "meta_batch_size": 4},
    )


def _ragged_arrays(seed=0, size=6):
    """ClassImages per split: 7 classes of 2..8 images; image j of class c holds value c*16+j
    (top-left pixel), so a gathered image tells which class and which image it is."""
    rng = np.random.default_rng(seed)
    out = {}
    for split in ("train", "validation", "test"):
        counts = np.array([2, 3, 8, 4, 5, 3, 6])
        images = (rng.random((counts.sum(), size, size, 1)) * 200).astype(np.uint8)
        start = 0
        for c, n in enumerate(counts):
            images[start : start + n, 0, 0, 0] = c * 16 + np.arange(n)
            start += n
        out[split] = ClassImages(images, counts)
    return out


# Ragged classes in the slow tier: the default run checks ragged sampling directly below.
@pytest.mark.parametrize(
    "ragged", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["uniform", "ragged"]
)
def test_host_placement_gives_the_same_training_and_evaluation(ragged):
    cfg = _cfg()
    arrays = _ragged_arrays() if ragged else synthetic_image_arrays(n_classes=6, per_class=5, size=6)
    results = {}
    for placement in ("device", "host"):
        source = image_source(cfg.dataset, arrays, placement=placement)
        assert source.placement == placement
        exp = setup(cfg, source)
        mesh = task_mesh()
        state = init_state(exp, 0, mesh)
        step = make_meta_step(exp, 4, mesh=mesh)
        losses = []
        if placement == "device":
            batches = [exp.source.splits["train"]] * 3
        else:
            batches = HostPrefetcher(exp.source, state.key, 4, mesh, 0, 3, depth=2)
        for _, data in zip(range(3), batches, strict=False):
            state, metrics = step(state, data)
            losses.append(float(metrics["loss"]))
        if placement == "host":
            batches.close()
        evaluate = make_evaluator(exp, 7, 3, 1, split="validation")
        data = exp.source.splits.get("validation")
        values = np.asarray(evaluate(state.params, data, jax.random.PRNGKey(3)))
        results[placement] = (losses, jax.device_get(state.params), values)
    (dl, dp, dv), (hl, hp, hv) = results["device"], results["host"]
    np.testing.assert_allclose(hl, dl, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), hp, dp)
    np.testing.assert_allclose(hv, dv, atol=1e-6)
    assert hv.shape == (7,)


def test_host_batches_follow_the_meta_steps_keys():
    cfg = _cfg()
    source = image_source(cfg.dataset, synthetic_image_arrays(n_classes=6, per_class=5, size=6), "host")
    mesh = task_mesh()
    key = jax.random.PRNGKey(11)
    batches = HostPrefetcher(source, key, 4, mesh, 5, 8)
    got = [np.asarray(b) for b in batches_take(batches, 3)]
    batches.close()
    for offset, batch in enumerate(got):
        keys = step_task_keys(key, 5 + offset, 4)
        expected = np.stack(
            [
                np.asarray(source.host.gather("train", source.host.indices("train", keys[i : i + 1])))[0]
                for i in range(4)
            ]
        )
        np.testing.assert_array_equal(batch, expected)
        assert batch.shape == (4, 3, 3, 6, 6, 1)


def batches_take(it, n):
    return [next(it) for _ in range(n)]


def test_ragged_indices_draw_within_class_without_replacement():
    counts = np.array([2, 3, 8, 4])
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    draw = jax.jit(jax.vmap(lambda k: ragged_indices(k, offsets, counts, 8, 3, 2)))
    idx = np.asarray(draw(jax.random.split(jax.random.PRNGKey(0), 4000)))  # (4000, 3, 2)
    cls = np.searchsorted(offsets, idx, side="right") - 1
    assert (cls == cls[..., :1]).all(), "an episode's class mixes images of two classes"
    assert (idx[..., 0] != idx[..., 1]).all(), "an image was drawn twice in one class"
    assert (idx - offsets[cls] < counts[cls]).all()
    # Each class is chosen in 3/4 of the episodes; within class 2 (8 images) every image
    # appears with frequency 2/8 among the picks.
    chosen = np.bincount(cls[..., 0].ravel(), minlength=4) / 4000
    np.testing.assert_allclose(chosen, 0.75, atol=0.03)
    in_c2 = idx[cls == 2] - offsets[2]
    freq = np.bincount(in_c2, minlength=8) / (cls[..., 0] == 2).sum()
    np.testing.assert_allclose(freq, 2 / 8, atol=0.03)


def test_ragged_source_drops_small_classes_and_samples_true_images():
    cfg = _cfg()
    source = image_source(cfg.dataset, _ragged_arrays(), placement="device")
    assert "dropped: train 1" in source.placement_note  # the class of 2 images < 1 + 2
    keys = jax.random.split(jax.random.PRNGKey(1), 200)
    tasks = jax.vmap(source.sample, in_axes=(None, 0))(source.splits["train"], keys)
    tags = np.rint(np.asarray(tasks.support_x)[:, :, 0, 0, 0] * 255).astype(int)  # (200, 3)
    qtags = np.rint(np.asarray(tasks.query_x)[:, :, 0, 0, 0] * 255).astype(int)  # (200, 6)
    assert not np.isin(tags // 16, [0]).any(), "the dropped class was sampled"
    # query images of label j come from the support image's class, and differ from it
    for t in range(200):
        for j in range(3):
            q = qtags[t, 2 * j : 2 * j + 2]
            assert (q // 16 == tags[t, j] // 16).all() and tags[t, j] not in q


def test_ragged_source_rejects_too_few_usable_classes():
    cfg = make_cfg(dataset={"name": "omniglot", "n_way": 5, "k_shot": 3, "k_query": 3})
    with pytest.raises(ConfigError, match=r"dataset.n_way=5 .*only 2 classes with at least 6 images"):
        image_source(cfg.dataset, _ragged_arrays())


def test_auto_placement_rule():
    assert choose_placement("auto", 10, None)[0] == "device"  # CPU: device memory is host memory
    assert choose_placement("auto", 39, 100)[0] == "device"
    where, note = choose_placement("auto", 41 * 2**30, 100 * 2**30)
    assert where == "host" and "exceed" in note
    assert choose_placement("host", 1, None)[0] == "host"
    assert choose_placement("device", 10**12, 100)[0] == "device"
