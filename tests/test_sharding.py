"""Data parallelism of the meta-step over several devices.

jax fixes its device count when it is first imported, and the test session has already
imported it with one CPU device. So the checks run in a fresh interpreter whose
environment asks XLA for 4 host-platform (CPU) devices before jax loads; the one-device
reference runs in that same process on a mesh holding only the first device.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    from conftest import make_cfg, synthetic_image_arrays
    from metalearn.errors import ConfigError
    from metalearn.step import (
        check_meta_batch, init_state, make_meta_step, replicate, sample_tasks, setup, task_mesh,
    )
    from metalearn.tasks import image_source

    assert jax.device_count() == 4, jax.devices()
    mesh4, mesh1 = task_mesh(), task_mesh(jax.devices()[:1])

    def run(exp, batch, mesh, steps=3):
        step = make_meta_step(exp, batch, mesh=mesh)
        state = init_state(exp, seed=0, mesh=mesh)
        data = replicate(exp.source.splits["train"], mesh)
        losses = []
        for _ in range(steps):
            state, metrics = step(state, data)
            losses.append(float(metrics["loss"]))
        assert step._cache_size() == 1, "the meta-step retraced"
        return state, np.array(losses)

    def flat(tree):
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(tree))])

    # Sinusoid MLP (second-order MAML) and a tiny Conv4 with batch-statistics BatchNorm.
    sinusoid = make_cfg(algo={"inner_steps": 2}, model={"hidden": [16, 16]})
    image = make_cfg(
        dataset={"name": "omniglot", "n_way": 3, "k_shot": 1, "k_query": 2},
        model={"name": "conv4", "filters": 4, "blocks": 2},
        algo={"inner_lr": 0.1},
        # SGD, not Adam: a conv bias followed by batch-statistics BatchNorm has a zero
        # gradient up to rounding, and Adam would scale that rounding noise up to lr.
        optim={"name": "sgd", "lr": 0.1},
    )
    image_src = image_source(image.dataset, synthetic_image_arrays(n_classes=6, per_class=5, size=8))
    for name, exp in [("sinusoid", setup(sinusoid)), ("conv4", setup(image, image_src))]:
        s4, l4 = run(exp, 8, mesh4)
        s1, l1 = run(exp, 8, mesh1)
        np.testing.assert_allclose(l4, l1, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(flat(s4.params), flat(s1.params), rtol=1e-5, atol=1e-6, err_msg=name)
        if jax.tree.leaves(s4.opt_state):  # Adam's moments (SGD has no state)
            np.testing.assert_allclose(flat(s4.opt_state), flat(s1.opt_state), rtol=1e-5, atol=1e-7)
        assert int(s4.step) == 3
        # Parameters stay replicated: every device holds the whole array.
        for leaf in jax.tree.leaves(s4.params):
            assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4

        # Each device holds a quarter of the tasks, and the four quarters are distinct.
        sample = jax.jit(lambda data, key, exp=exp: sample_tasks(exp, data, key, 8, mesh4))
        tasks = sample(replicate(exp.source.splits["train"], mesh4), jax.random.PRNGKey(0))
        for leaf in jax.tree.leaves(tasks):
            shards = leaf.addressable_shards
            assert len({s.device for s in shards}) == 4
            assert all(s.data.shape[0] == 2 and s.data.shape[1:] == leaf.shape[1:] for s in shards)
        quarters = [np.asarray(s.data) for s in tasks.support_x.addressable_shards]
        assert not np.allclose(quarters[0], quarters[1])
        print(name, "ok", l4)

    # Host placement over 4 devices: each device receives its quarter of the gathered
    # episodes, and training follows the on-device sampler's numbers.
    from metalearn.prefetch import HostPrefetcher

    host_src = image_source(
        image.dataset, synthetic_image_arrays(n_classes=6, per_class=5, size=8), placement="host"
    )
    host_exp = setup(image, host_src)
    step = make_meta_step(host_exp, 8, mesh=mesh4)
    state = init_state(host_exp, seed=0, mesh=mesh4)
    batches = HostPrefetcher(host_src, state.key, 8, mesh4, 0, 3)
    first = next(batches)
    assert [sh.data.shape[0] for sh in first.addressable_shards] == [2, 2, 2, 2]
    host_losses = []
    for batch in [first, next(batches), next(batches)]:
        state, metrics = step(state, batch)
        host_losses.append(float(metrics["loss"]))
    batches.close()
    _, device_losses = run(setup(image, image_src), 8, mesh4)
    np.testing.assert_allclose(host_losses, device_losses, rtol=1e-5)
    print("host placement ok", host_losses)

    # A meta-batch that does not split evenly: one-line ConfigError naming the key and count.
    for check in (lambda: check_meta_batch(6, mesh4), lambda: make_meta_step(setup(sinusoid), 6)):
        try:
            check()
        except ConfigError as err:
            msg = str(err)
            assert "trainer.meta_batch_size=6" in msg and "(4)" in msg and "\\n" not in msg, msg
        else:
            raise AssertionError("no ConfigError for meta_batch_size=6 on 4 devices")
    print("done")
    """
)


# Slow tier: a fresh interpreter with 4 CPU devices (about 25 s); the multi-process checks
# of test_multihost (also slow) compare sharded training across processes.
@pytest.mark.slow
def test_sharded_meta_step_matches_one_device_and_splits_tasks():
    env = dict(
        os.environ,
        XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip(),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "done" in proc.stdout
