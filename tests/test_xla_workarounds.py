"""The XLA:CPU workaround for jaxlib 0.10.2's YNNPACK reduce fusion (metalearn/xla_workarounds.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from metalearn.xla_workarounds import YNN_FLAG, xla_flags_with_workarounds

# jax-ml/jax#40412's reproducer: an f32 multiply-reduce of rank 7 with a size-1 dimension,
# which jaxlib 0.10.2 runs through the faulty kernel and kills the process with SIGSEGV.
MULTIPLY_REDUCE = """
import metalearn  # noqa: F401  (first, as every entry point imports it before JAX starts)
import jax, jax.numpy as jnp, numpy as np
shape = (3, 1, 2, 2, 8, 8, 8)
u = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
v = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
out = np.asarray(jax.jit(lambda a, b: jnp.sum(a * b, axis=3))(u, v))
np.save(sys.argv[1], out)
"""


def test_flag_added_only_for_affected_releases_and_never_over_the_users_choice():
    assert xla_flags_with_workarounds("", "0.10.2") == f"{YNN_FLAG}=-reduce"
    dump = "--xla_dump_to=/tmp/d"
    assert xla_flags_with_workarounds(dump, "0.10.2") == f"{dump} {YNN_FLAG}=-reduce"
    assert xla_flags_with_workarounds(f"{YNN_FLAG}=dot", "0.10.2") == f"{YNN_FLAG}=dot"
    # Releases without the kernel, or without the flag (XLA aborts on an unknown flag).
    assert xla_flags_with_workarounds("", "0.10.1") == ""
    assert xla_flags_with_workarounds("", "0.9.2") == ""
    assert xla_flags_with_workarounds("", "0.12.0") == ""
    assert xla_flags_with_workarounds("--a", None) == "--a"


def test_the_reported_multiply_reduce_runs_and_matches_float64(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = tmp_path / "out.npy"
    script = "import sys\n" + MULTIPLY_REDUCE
    proc = subprocess.run([sys.executable, "-c", script, str(out)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    shape = (3, 1, 2, 2, 8, 8, 8)
    u = np.random.default_rng(0).standard_normal(shape).astype(np.float32).astype(np.float64)
    v = np.random.default_rng(1).standard_normal(shape).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(np.load(out), np.sum(u * v, axis=3), rtol=1e-5, atol=1e-5)
