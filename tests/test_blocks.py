"""Several meta-steps per compiled call (train.make_meta_block) give bitwise the results of
one step per call; the training loop cuts blocks exactly at its log, validation and
checkpoint steps. (The kill-and-resume check of whole runs is in test_resume.py.)"""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest
from conftest import make_cfg

from metalearn.loop_control import BlockLengths
from metalearn.step import init_state, make_meta_block, make_meta_step, replicate, setup, task_mesh


def test_blocks_match_single_steps_bitwise_with_skipped_steps():
    # inner_lr=2200 overflows on some tasks only: a mix of applied and skipped updates.
    exp = setup(make_cfg(model={"hidden": [8]}, algo={"inner_lr": 2200.0}))
    mesh = task_mesh()
    data = replicate(exp.source.splits["train"], mesh)
    single = make_meta_step(exp, 4, skip_nonfinite=True, mesh=mesh)
    block = make_meta_block(exp, 4, skip_nonfinite=True, mesh=mesh, max_steps=8)

    ref, ref_metrics = init_state(exp, 0, mesh), []
    for _ in range(20):
        ref, m = single(ref, data)
        ref_metrics.append(jax.device_get(m))
    assert 0 < int(ref.skipped) < 20  # both branches of on_nan=skip were taken

    state, rows = init_state(exp, 0, mesh), []
    for n in (1, 7, 8, 4):
        state, history = block(state, data, n)
        history = jax.device_get(history)
        assert all(np.isnan(v[n:]).all() for v in history.values())  # unused rows
        rows += [{k: v[i] for k, v in history.items()} for i in range(n)]
    assert int(state.step) == 20
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref), strict=True):
        assert np.array_equal(a, b)  # params, Adam moments, step, key, skipped count
    assert len(rows) == len(ref_metrics)
    for got, want in zip(rows, ref_metrics, strict=True):
        assert got.keys() == want.keys()
        for k in want:
            assert np.array_equal(got[k], want[k], equal_nan=True), k


def test_host_episodes_take_one_step_per_call():
    from conftest import synthetic_image_arrays

    from metalearn.tasks import image_source

    cfg = make_cfg(
        dataset={"name": "omniglot", "n_way": 3, "k_shot": 1, "k_query": 1, "image_size": 8},
        model={"name": "conv4", "filters": 4, "blocks": 2},
    )
    source = image_source(cfg.dataset, synthetic_image_arrays(), placement="host")
    exp = setup(cfg, source)
    with pytest.raises(ValueError, match="host-gathered"):
        make_meta_block(exp, 2, max_steps=2)
    t = types.SimpleNamespace(steps_per_call=0, log_every=100, val_every=0, checkpoint_every=0, steps=1000)
    assert BlockLengths(t, host=True, multi_process=False).max_steps == 1


def _lengths(blocks: BlockLengths, start: int, stop: int) -> list[int]:
    out, step = [], start
    while step < stop:
        n = blocks.length(step)
        out.append(n)
        step += n
    return out


def test_blocks_end_at_log_validation_checkpoint_and_last_steps():
    t = types.SimpleNamespace(steps_per_call=0, log_every=10, val_every=25, checkpoint_every=30, steps=67)
    # multi-process (untimed): boundary to boundary, the first block one step
    lengths = _lengths(BlockLengths(t, host=False, multi_process=True), 0, t.steps)
    assert np.cumsum(lengths).tolist() == [1, 10, 20, 25, 30, 40, 50, 60, 67]
    # resumed at a step off the grid (a pre-emption checkpoint)
    lengths = _lengths(BlockLengths(t, host=False, multi_process=True), 33, t.steps)
    assert (33 + np.cumsum(lengths)).tolist() == [34, 40, 50, 60, 67]
    # a fixed maximum, and one step per call
    t.steps_per_call = 4
    lengths = _lengths(BlockLengths(t, host=False, multi_process=False), 0, 20)
    assert np.cumsum(lengths).tolist() == [1, 5, 9, 10, 14, 18, 20]
    t.steps_per_call = 1
    assert set(_lengths(BlockLengths(t, host=False, multi_process=False), 0, t.steps)) == {1}


def test_automatic_blocks_are_sized_by_time():
    t = types.SimpleNamespace(steps_per_call=0, log_every=500, val_every=0, checkpoint_every=0, steps=10**6)
    blocks = BlockLengths(t, host=False, multi_process=False)
    assert blocks.timed and blocks.max_steps == 500
    assert blocks.length(0) == 1
    blocks.observe(1, 0.5)  # slow steps: one per call
    assert blocks.length(1) == 1
    blocks.observe(10, 0.01)  # 1 ms per step: about 0.1 s per block
    assert blocks.length(2) == 100
    assert blocks.length(450) == 50  # cut at the log step
    blocks.observe(100, 1e-4)  # fast: capped at max_steps, the log period
    assert blocks.length(500) == 500
