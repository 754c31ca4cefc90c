"""The config restructuring (per-axis groups) changed no behaviour: every preset and every
``algo=X dataset=Y`` default pair composes to the values recorded before it
(tests/fixtures/composed_configs.json), and a short fixed-seed run of every algorithm writes the
same metrics.jsonl and results.json, bitwise, timing fields aside
(tests/fixtures/reference_runs/, made by scripts/capture_structure_fixtures.py before the change).
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import REPO, SHARED_OMNIGLOT, metric_records
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from metalearn.cli import config_dir
from metalearn.config import register_configs

FIXTURES = REPO / "tests" / "fixtures"
COMPOSED = json.loads((FIXTURES / "composed_configs.json").read_text())
REFERENCE = sorted(p.name for p in (FIXTURES / "reference_runs").iterdir())

# Keys renamed by the restructuring: new dotted key -> old dotted key.
RENAMED: dict[str, str] = {}
# Keys added since the recording -> the value that keeps the recorded behaviour.
ADDED: dict[str, object] = {"dataset.split": None}
# results.json entries added since the recording (the evaluation protocol, stated).
ADDED_RESULTS = ("protocol",)


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _compose(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        return compose(config_name="config", overrides=overrides)


def _dropped_is_allowed(key: str, new_cfg) -> bool:
    """A key of the old flat config may be absent now only where the group now composed has
    no such key (a key the selected algorithm, dataset or model never read)."""
    group = key.split(".")[0]
    return group in ("algo", "dataset", "model") and OmegaConf.select(new_cfg, key) is None


@pytest.mark.parametrize("overrides", sorted(COMPOSED))
def test_composes_to_the_recorded_values(overrides):
    old = _flat(COMPOSED[overrides])
    new_cfg = _compose(overrides.split())
    new = _flat(OmegaConf.to_container(new_cfg, resolve=True))
    for key, value in new.items():
        if key in ADDED:
            assert value == ADDED[key], f"{key}: {value!r}, not the value that keeps behaviour"
            continue
        old_key = RENAMED.get(key, key)
        assert old_key in old, f"{key}: new key with no recorded value (add it to RENAMED?)"
        assert value == old[old_key], f"{key}: {value!r} != recorded {old[old_key]!r}"
    renamed_from = set(RENAMED.values())
    for key in old.keys() - new.keys() - renamed_from:
        assert _dropped_is_allowed(key, new_cfg), f"{key} dropped"


def _strip(results: dict) -> dict:
    drop = {"train_time_s", "compile_time_s", "eval_time_s", "time_s"}
    return {k: (_strip(v) if isinstance(v, dict) else v) for k, v in results.items() if k not in drop}


# Two algorithms in the default run, every algorithm in the slow tier.
_DEFAULT = {"maml", "protonet"}


@pytest.mark.parametrize(
    "algo", [pytest.param(a, marks=() if a in _DEFAULT else pytest.mark.slow) for a in REFERENCE]
)
def test_reference_run_is_bitwise_the_same(algo, tmp_path):
    from metalearn.train import train

    recorded = FIXTURES / "reference_runs" / algo
    overrides = json.loads((recorded / "overrides.json").read_text())
    if any(o.startswith("dataset=omniglot") for o in overrides):
        if not SHARED_OMNIGLOT.is_dir():
            pytest.skip("needs ../shared/data/omniglot")
        overrides = [o for o in overrides if not o.startswith("dataset.manual_dir=")]
        overrides += [f"dataset.manual_dir={SHARED_OMNIGLOT}", f"dataset.data_dir={tmp_path / 'data'}"]
    cfg = _compose(overrides)
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    assert metric_records(run_dir) == metric_records(recorded)
    new = _strip(json.loads((run_dir / "results.json").read_text()))
    old = _strip(json.loads((recorded / "results.json").read_text()))
    for key in ADDED_RESULTS:
        new.pop(key)
    assert new == old
    shutil.rmtree(run_dir)
