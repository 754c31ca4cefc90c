"""Run directories made by an earlier release (tests/fixtures/old_runs/, written by the flat-config
release before the per-axis config groups) still load in ``eval`` and ``predict`` and give the
numbers that release gave (tests/fixtures/old_runs/expected.json, recorded with it).

METALEARN_RECORD_FIXTURES=1 rewrites expected.json instead of comparing (only ever done with the
release that made the runs).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SHARED_OMNIGLOT, run_cli

FIXTURES = REPO / "tests" / "fixtures" / "old_runs"
EXPECTED = FIXTURES / "expected.json"
RECORD = os.environ.get("METALEARN_RECORD_FIXTURES") == "1"


def _copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def _only_dir(parent: Path) -> Path:
    (out,) = [p for p in parent.iterdir() if p.is_dir()]
    return out


def _numbers(results: dict) -> dict:
    """The numbers of a results.json or summary.json, without paths and wall-clock fields."""
    drop = {"train_time_s", "compile_time_s", "eval_time_s", "time_s", "predictions", "run_dir", "path"}
    if isinstance(results, dict):
        return {k: _numbers(v) for k, v in results.items() if k not in drop}
    if isinstance(results, list):
        return [_numbers(v) for v in results]
    return results


# Fields that changed on purpose since the fixtures were recorded: key -> {field: new value}.
# ProtoNet has no inner loop: its results record 0 test-time steps, not the 3 the flat config
# carried for it (test_structure_preserved.INTENTIONAL_RESULT_CHANGES).
INTENTIONAL_CHANGES = {"protonet_omniglot/eval": {"inner_steps_test": 0}}


def _check(key: str, value) -> None:
    expected = json.loads(EXPECTED.read_text()) if EXPECTED.is_file() else {}
    if RECORD:
        expected[key] = value
        EXPECTED.write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
        return
    recorded = expected[key]
    if key in INTENTIONAL_CHANGES:
        recorded = {**recorded, **INTENTIONAL_CHANGES[key]}
    _assert_subset(recorded, value, key)


def _assert_subset(expected, value, where: str) -> None:
    """Every value recorded then is the same now; fields added since (say, protocol fields) are
    allowed."""
    if isinstance(expected, dict):
        assert isinstance(value, dict), where
        for k, v in expected.items():
            assert k in value, f"{where}.{k} missing"
            _assert_subset(v, value[k], f"{where}.{k}")
    else:
        assert value == expected, where


def _sinusoid_csvs(folder: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(7)
    x = rng.uniform(-5, 5, size=13)
    y = 2.0 * np.sin(x - 0.5)
    folder.mkdir(parents=True, exist_ok=True)
    support, query = folder / "support.csv", folder / "query.csv"
    support.write_text("".join(f"{a:.6f},{b:.6f}\n" for a, b in zip(x[:10], y[:10], strict=True)))
    query.write_text("".join(f"{a:.6f}\n" for a in x[10:]))
    return support, query


def _omniglot_folders(folder: Path) -> tuple[Path, Path]:
    from PIL import Image

    rng = np.random.default_rng(11)
    for split, count in (("support", 1), ("query", 2)):
        for c in range(5):
            d = folder / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            base = rng.random((28, 28)) > 0.8
            for i in range(count):
                noisy = base ^ (rng.random((28, 28)) > 0.97)
                Image.fromarray(np.where(noisy, 0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return folder / "support", folder / "query"


def test_old_sinusoid_run_evaluates_and_predicts(tmp_path):
    run = _copy("maml_sinusoid", tmp_path)
    run_cli("eval", f"run_dir={run}", "eval.n_tasks=8", "eval.batch_size=8", cwd=tmp_path)
    results = json.loads((_only_dir(run / "eval") / "results.json").read_text())
    _check("maml_sinusoid/eval", _numbers(results))
    support, query = _sinusoid_csvs(tmp_path / "new")
    run_cli("predict", f"run_dir={run}", f"support={support}", f"query={query}", cwd=tmp_path)
    out = _only_dir(run / "predict")
    _check("maml_sinusoid/predictions", (out / "predictions.csv").read_text())


@pytest.mark.skipif(not SHARED_OMNIGLOT.is_dir(), reason="needs ../shared/data/omniglot")
def test_old_omniglot_protonet_run_evaluates_and_predicts(tmp_path):
    run = _copy("protonet_omniglot", tmp_path)
    data = [f"dataset.manual_dir={SHARED_OMNIGLOT}", f"dataset.data_dir={tmp_path / 'data'}"]
    run_cli("eval", f"run_dir={run}", *data, "eval.n_tasks=8", "eval.batch_size=8", cwd=tmp_path)
    results = json.loads((_only_dir(run / "eval") / "results.json").read_text())
    _check("protonet_omniglot/eval", _numbers(results))
    support, query = _omniglot_folders(tmp_path / "new")
    run_cli("predict", f"run_dir={run}", f"support={support}", f"query={query}", cwd=tmp_path)
    out = _only_dir(run / "predict")
    _check("protonet_omniglot/predictions", (out / "predictions.csv").read_text())
