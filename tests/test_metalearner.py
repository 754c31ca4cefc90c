"""The MetaLearner contract (metalearn/algos/base.py): one signature for every algorithm,
with the algorithm's state always passed, and the lift of stateless functions into it."""

from __future__ import annotations

import jax.numpy as jnp

from metalearn.algos.base import MetaLearner, no_state, stateless_learner


def test_one_signature_without_twins():
    assert MetaLearner._fields == ("init", "init_state", "meta_grad", "adapt", "predict")


def test_stateless_learner_passes_the_state_through_and_ignores_step():
    calls = []

    def meta_grad(meta, tasks, key):
        calls.append(("meta_grad", meta, tasks, key))
        return {"w": meta["w"] * 2}, {"loss": jnp.float32(1.0)}

    def adapt(meta, support_x, support_y, key, steps):
        calls.append(("adapt", meta, support_x, support_y, key, steps))
        return meta["w"] + steps

    learner = stateless_learner(
        init=lambda key: {"w": jnp.float32(3.0)},
        meta_grad=meta_grad,
        adapt=adapt,
        predict=lambda m, a, x: a * x,
    )
    meta = learner.init(None)
    state = learner.init_state(meta)
    assert state == () and learner.init_state is no_state
    # Whatever state the caller holds comes back unchanged (a marker, since () is a singleton).
    held = {"marker": jnp.int32(5)}
    grads, new_state, metrics = learner.meta_grad(meta, held, "tasks", "key", jnp.int32(7))
    assert float(grads["w"]) == 6.0 and new_state is held and float(metrics["loss"]) == 1.0
    assert float(learner.adapt(meta, held, "sx", "sy", "key", 4)) == 7.0
    assert calls == [("meta_grad", meta, "tasks", "key"), ("adapt", meta, "sx", "sy", "key", 4)]
