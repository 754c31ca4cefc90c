"""scripts/bench.py runs a row and reports the fields the performance tables are built from
(a smoke test: figures are measured by running the script, never asserted here)."""

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
            "--out",
            str(out),
        ]
    )
    row = json.loads(out.read_text().splitlines()[0])
    assert row["workload"] == "sinusoid" and row["timed_steps"] >= 2
    assert (
        row["steps_per_s"] > 0
        and abs(row["tasks_per_s"] - row["steps_per_s"] * row["meta_batch"]) < 1e-6 * row["tasks_per_s"]
    )
    assert row["peak_memory_mb"] > 0 and row["memory_kind"] in ("rss", "device")
    assert row["xla_memory_mb"] is None or row["xla_memory_mb"] > 0
    table = capsys.readouterr().out
    assert "steps/s" in table and "XLA MB" in table and "sinusoid" in table
