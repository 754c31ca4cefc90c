"""Record what the config restructuring (issue 22) must preserve, from the code as it is now.

Writes under tests/fixtures/:
  composed_configs.json   every preset and every algo x dataset default pair, composed
  reference_runs/<algo>/  a short fixed-seed run per algorithm (metrics.jsonl, results.json)
  old_run_sinusoid/       a tiny run directory (config + checkpoint) made by this release

Run once, before the change: python scripts/capture_structure_fixtures.py
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The flag tests/conftest.py sets, so that the recorded numbers are bitwise those the tests get.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures"
OMNI = REPO.parent / "shared" / "data" / "omniglot"

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from metalearn.cli import config_dir  # noqa: E402
from metalearn.config import register_configs  # noqa: E402

ALGOS = sorted(p.stem for p in (REPO / "conf" / "algo").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (REPO / "conf" / "dataset").glob("*.yaml"))
PRESETS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
# Keys a dataset needs before it composes/validates; recorded with the pair.
DATASET_ARGS = {
    "image_folder": ["dataset.path=/nonexistent"],
    "tfds": ["dataset.tfds_name=mnist"],
}


def compose_all() -> dict:
    register_configs()
    out = {}
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        for algo in ALGOS:
            for ds in DATASETS:
                overrides = [f"algo={algo}", f"dataset={ds}", *DATASET_ARGS.get(ds, [])]
                try:
                    cfg = compose(config_name="config", overrides=overrides)
                    out[" ".join(overrides)] = OmegaConf.to_container(cfg, resolve=True)
                except Exception as err:  # noqa: BLE001
                    out[" ".join(overrides)] = {"error": type(err).__name__}
        for preset in PRESETS:
            overrides = [f"experiment={preset}"]
            cfg = compose(config_name="config", overrides=overrides)
            out[" ".join(overrides)] = OmegaConf.to_container(cfg, resolve=True)
    return out


# Short fixed-seed runs: every algorithm, sinusoid where it regresses, tiny Omniglot otherwise.
TINY = [
    "trainer.steps=4",
    "trainer.meta_batch_size=2",
    "trainer.log_every=2",
    "trainer.val_every=4",
    "trainer.val_tasks=4",
    "trainer.checkpoint_every=0",
    "trainer.progress=false",
    "eval.n_tasks=4",
    "eval.batch_size=4",
    "seed=3",
]
SINUSOID = ["dataset=sinusoid", "model.hidden=[8,8]"]
OMNIGLOT = [
    "dataset=omniglot",
    "dataset.variant=small",
    f"dataset.manual_dir={OMNI}",
    "dataset.image_size=14",
    "model.filters=4",
    "model.blocks=2",
]
IMAGE_ONLY = {"protonet", "protomaml"}


def reference_overrides(algo: str) -> list[str]:
    data = OMNIGLOT if algo in IMAGE_ONLY else SINUSOID
    extra = ["algo.cg_steps=2"] if algo == "imaml" else []
    return [f"algo={algo}", *data, *TINY, *extra]


def run_reference(algo: str, data_dir: Path) -> None:
    from metalearn.train import train

    overrides = reference_overrides(algo)
    if algo in IMAGE_ONLY:
        overrides.append(f"dataset.data_dir={data_dir}")
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    run_dir = Path("/tmp/ml_fixture_runs") / algo
    shutil.rmtree(run_dir, ignore_errors=True)
    train(cfg, run_dir)
    dest = FIX / "reference_runs" / algo
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(run_dir / "metrics.jsonl", dest / "metrics.jsonl")
    shutil.copy(run_dir / "results.json", dest / "results.json")
    (dest / "overrides.json").write_text(json.dumps(overrides, indent=1) + "\n")


def main() -> None:
    FIX.mkdir(parents=True, exist_ok=True)
    which = sys.argv[1:] or ["configs", "runs"]
    if "configs" in which:
        (FIX / "composed_configs.json").write_text(json.dumps(compose_all(), indent=1, sort_keys=True) + "\n")
    if "runs" in which:
        register_configs()
        data_dir = Path("/tmp/ml_fixture_omniglot_data")
        for algo in ALGOS:
            run_reference(algo, data_dir)
            print("recorded", algo, flush=True)


if __name__ == "__main__":
    main()
