"""scripts/bench.py runs a row and reports the fields the performance tables are built from
(a smoke test: speeds are measured by running the script, never asserted here), and its
FLOP count of a step with loops is checked against a hand count."""

from __future__ import annotations

import importlib.util
import json

from conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_row_fields_and_isolated_run(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "bench.jsonl"
    bench.main(
        [
            "--workloads",
            "sinusoid",
            "--algos",
            "maml",
            "--min-steps",
            "2",
            "--min-seconds",
            "0",
            "--steps-per-call",
            "3",
            "--out",
            str(out),
        ]
    )
    row = json.loads(out.read_text().splitlines()[0])
    assert row["workload"] == "sinusoid" and row["timed_steps"] >= 2
    assert row["steps_per_call"] == 3 and row["timed_steps"] % 3 == 0  # blocks of 3 steps per call
    # Roofline: MLP 1-40-40-1, 25 tasks x 20 points, second order: about 1e7 FLOPs per step.
    assert 3e6 < row["flops_per_step"] < 3e7
    assert row["peak_flops_per_s"] > 0 and row["peak_bytes_per_s"] > 0
    achieved = row["flops_per_step"] * row["steps_per_s"]
    assert abs(row["achieved_flops_per_s"] - achieved) < 1e-6 * achieved
    assert abs(row["peak_fraction"] - achieved / row["peak_flops_per_s"]) < 1e-6
    assert row["bandwidth_fraction"] > 0 and row["bytes_per_step"] > 0
    assert (
        row["steps_per_s"] > 0
        and abs(row["tasks_per_s"] - row["steps_per_s"] * row["meta_batch"]) < 1e-6 * row["tasks_per_s"]
    )
    assert row["peak_memory_mb"] > 0 and row["memory_kind"] in ("rss", "device")
    assert row["xla_memory_mb"] is None or row["xla_memory_mb"] > 0
    table = capsys.readouterr().out
    assert "steps/s" in table and "XLA MB" in table and "sinusoid" in table
    assert "GF/step" in table and "%peak" in table and "GFLOP/s (matmul, measured)" in table


def test_flop_count_covers_every_loop_iteration():
    import jax
    import jax.numpy as jnp
    from jax import lax

    bench = _bench()
    n = 64
    make = lambda: jax.jit(lambda c, w: lax.scan(lambda c, _: (c @ w, None), c, None, length=5)[0])  # noqa: E731
    x = jnp.ones((n, n), jnp.float32)
    flops, nbytes, how = bench.step_cost(make().lower(x, x).compile(), make, x, x)
    assert how == "xla, scans unrolled" and nbytes > 0
    assert 5 * 2 * n**3 <= flops < 5.5 * 2 * n**3  # five matmuls, not one


def test_count_only_row_has_bytes_and_roof_without_timing(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "bench.jsonl"
    bench.main(
        ["--count-only", "--no-isolate", "--workloads", "sinusoid", "--algos", "maml", "--out", str(out)]
    )
    row = json.loads(out.read_text().splitlines()[0])
    assert row["steps_per_s"] is None and row["timed_steps"] == 0 and row["achieved_flops_per_s"] is None
    assert row["bytes_per_step"] > 0 and 3e6 < row["flops_per_step"] < 3e7
    assert row["arithmetic_intensity"] == row["flops_per_step"] / row["bytes_per_step"]
    assert row["bound"] in ("memory", "compute") and row["ridge_intensity"] > 0
    table = capsys.readouterr().out
    assert "GB/step" in table and "F/B" in table and "roof" in table and "ridge" in table
