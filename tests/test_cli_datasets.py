"""The command line on the image datasets of issue 4: users' image folders (train, then
eval), mini-ImageNet from synthetic files in the real format, and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, scaled_mini_imagenet_split, write_mini_imagenet_pickles
from PIL import Image

TINY = [
    "trainer.steps=6",
    "trainer.log_every=3",
    "trainer.val_every=3",
    "trainer.val_tasks=4",
    "trainer.checkpoint_every=3",
    "trainer.progress=false",
    "trainer.meta_batch_size=2",
    "eval.n_tasks=6",
    "model.filters=4",
    "model.blocks=2",
    "algo.inner_steps=1",
    "algo.inner_steps_test=2",
]


def make_image_folder(root: Path, classes: int = 32, seed: int = 0) -> Path:
    """``root/<class>/<n>.png``: 32 classes of 6-9 RGB images, 20x20; each class has its own
    colour so the task is learnable."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True)
        colour = rng.integers(0, 256, size=3)
        for i in range(6 + c % 4):
            noise = rng.integers(-40, 40, size=(20, 20, 3))
            pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


# Slow tier: the default run trains an image folder in-process (test_predict.folder_run)
# and checks eval's reproduction on the shared sweep (test_evaluation).
@pytest.mark.slow
def test_image_folder_train_then_eval(tmp_path):
    images = make_image_folder(tmp_path / "my_images")
    run_dir = tmp_path / "run"
    common = [f"dataset.data_dir={tmp_path / 'data'}", "dataset.image_size=16", "dataset.k_query=3"]
    proc = run_cli(
        "train",
        "dataset=image_folder",
        f"dataset.path={images}",
        *common,
        *TINY,
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert "episodes sampled on device" in proc.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert results["dataset"] == "image_folder" and results["test"]["n_tasks"] == 6
    assert 0.0 <= results["test"]["mean"] <= 1.0
    proc = run_cli("eval", f"run_dir={run_dir}", "algo.inner_steps_test=2", cwd=tmp_path)
    evaluated = json.loads(next((run_dir / "eval").glob("*/results.json")).read_text())
    # The same tasks and test steps: eval reproduces the training run's final test.
    assert evaluated["test"]["mean"] == pytest.approx(results["test"]["mean"], abs=1e-6)


# Slow tier: host vs device placement is checked in-process by test_placement.
@pytest.mark.slow
def test_image_folder_host_placement_matches_device(tmp_path):
    images = make_image_folder(tmp_path / "imgs")
    out = {}
    for placement in ("device", "host"):
        run_dir = tmp_path / placement
        common = [f"dataset.data_dir={tmp_path / 'data'}", "dataset.image_size=16", "dataset.k_query=3"]
        proc = run_cli(
            "train",
            "dataset=image_folder",
            f"dataset.path={images}",
            f"dataset.placement={placement}",
            *common,
            *TINY,
            f"hydra.run.dir={run_dir}",
            cwd=tmp_path,
        )
        assert f"episodes sampled on {'device' if placement == 'device' else 'the host'}" in proc.stdout
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        out[placement] = [json.loads(line)["loss"] for line in lines if '"train"' in line]
    np.testing.assert_allclose(out["host"], out["device"], rtol=1e-5)


# Slow tier: the default run trains the mini-ImageNet presets on the same synthetic files
# in-process (test_experiments) and parses them in test_mini_imagenet_data.
@pytest.mark.slow
def test_mini_imagenet_from_synthetic_files(tmp_path):
    split = scaled_mini_imagenet_split()
    manual = write_mini_imagenet_pickles(tmp_path / "manual", split, per_class=20)
    # The real split has 64/16/20 classes of 600 images; the synthetic files are scaled to
    # 6/5/5 classes of 20, so the loader's constants are scaled the same way in that process.
    prelude = (
        "from metalearn.data import mini_imagenet as mi\n"
        f"mi.SPLIT_WNIDS = {split!r}\n"
        "mi.IMAGES_PER_CLASS = 20\n"
    )
    run_dir = tmp_path / "run"
    args = [
        "train",
        "dataset=mini_imagenet",
        f"dataset.manual_dir={manual}",
        f"dataset.data_dir={tmp_path / 'd'}",
    ]
    run_cli(*args, *TINY, "dataset.k_query=3", f"hydra.run.dir={run_dir}", cwd=tmp_path, prelude=prelude)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["dataset"] == "mini_imagenet" and results["steps"] == 6


def test_mini_imagenet_missing_files_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli(
        "train",
        "dataset=mini_imagenet",
        f"dataset.manual_dir={empty}",
        f"dataset.data_dir={tmp_path / 'd'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "mini-imagenet-cache-train.pkl" in lines[0], proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
