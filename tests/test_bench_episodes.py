"""scripts/bench_episodes.py: the fixed config has the variable config's mean episode size,
and a tiny synthetic bench produces both rows with positive costs (a smoke test: speeds
and memory are measured by running the script, never compared here)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from conftest import REPO


def _bench_episodes():
    spec = importlib.util.spec_from_file_location("bench_episodes", REPO / "scripts" / "bench_episodes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = [
    "--synthetic", "--image-size", "8", "--per-class", "6",
    "--min-ways", "2", "--max-ways", "4", "--max-support", "12", "--max-query", "2",
    "--steps", "4", "--log-every", "2", "--samples", "300", "--eval-tasks", "2",
]  # fmt: skip


def test_mean_episode_counts_the_sampled_compositions():
    bench = _bench_episodes()
    # 6 images per class: queries min(2, 6 // 2) = 2 always; ways uniform on 2..4.
    bounds = {"min_ways": 2, "max_ways": 4, "max_support": 12, "max_query": 2}
    mean = bench.mean_episode(np.full(40, 6), bounds, samples=2000)
    assert abs(mean["mean_ways"] - 3.0) < 0.1
    assert mean["mean_queries_per_class"] == 2.0
    assert mean["mean_query_rows"] == pytest.approx(2.0 * mean["mean_ways"])
    assert mean["query_real_fraction"] == pytest.approx(mean["mean_query_rows"] / 8)
    assert mean["support_real_fraction"] == pytest.approx(mean["mean_support"] / 12)
    # Support: beta * min(100, 6 - 2) per class, ceil'd, at least one shot per way.
    assert mean["mean_ways"] <= mean["mean_support"] <= 4 * mean["mean_ways"]


def test_fixed_episode_of_the_same_mean_size():
    bench = _bench_episodes()
    mean = {"mean_ways": 12.48, "mean_support": 65.5, "mean_queries_per_class": 5.0}
    assert bench.fixed_of(mean) == {"n_way": 12, "k_shot": 5, "k_query": 5}
    # Shots per way from the mean ways, not the rounded ones: 10 / 3.6 -> 3 (10 / 4 -> 2).
    mean = {"mean_ways": 3.6, "mean_support": 10.0, "mean_queries_per_class": 1.7}
    assert bench.fixed_of(mean) == {"n_way": 4, "k_shot": 3, "k_query": 2}


def test_tiny_bench_writes_both_rows_and_the_record(tmp_path, capsys):
    bench = _bench_episodes()
    jsonl, out = tmp_path / "bench.jsonl", tmp_path / "record"
    argv = [
        *TINY,
        "--data-dir", str(tmp_path / "data"), "--work", str(tmp_path / "runs"),
        "--jsonl", str(jsonl), "--out", str(out), "model.filters=2", "model.blocks=1",
    ]  # fmt: skip
    assert bench.main(argv) == 0
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["config"] for r in rows] == ["variable", "variable_masked", "fixed"]
    variable, masked, fixed = rows
    assert masked["support_rows"] == variable["support_rows"] and "masked" in masked["episode_desc"]
    mean = variable["mean_episode"]
    assert fixed["episode"] == {
        "n_way": round(mean["mean_ways"]),
        "k_shot": round(mean["mean_support"] / mean["mean_ways"]),
        "k_query": round(mean["mean_queries_per_class"]),
    }
    assert (variable["support_rows"], variable["query_rows"]) == (12, 8)
    assert 0 < variable["support_real_fraction"] < 1 and 0 < variable["query_real_fraction"] <= 1
    for row in rows:
        assert row["kind"] == "episodes" and row["algo"] == "protonet" and row["steps"] == 4
        assert row["seconds_per_step"] > 0 and row["compile_s"] > 0 and row["peak_rss_mib"] > 0
    assert (out / "cmd.txt").read_text().startswith("python scripts/bench_episodes.py --synthetic")
    assert "fixed" in (out / "table.md").read_text() and "padding costs" in capsys.readouterr().out
    assert [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()] == rows


def test_bad_override_is_one_line_and_exit_2(tmp_path, capsys):
    bench = _bench_episodes()
    jsonl = tmp_path / "bench.jsonl"
    argv = [*TINY, "--data-dir", str(tmp_path / "data"), "--jsonl", str(jsonl), "trainer.no_such_key=1"]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trainer.no_such_key" in err
    assert not jsonl.exists()
