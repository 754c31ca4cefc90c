"""`metalearn predict`, the preprocessing record, cross-domain `eval` and its mismatch errors,
on small synthetic drawings (light strokes on a dark background, like Omniglot's training data).

One tiny MAML run is trained in-process on an image folder (module fixture, about 10 s); the
rest adapts it to new classes.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import make_cfg, run_cli
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from metalearn.checkpoint import CheckpointMismatch, load_checkpoint, restore_latest
from metalearn.crossdomain import cross_domain_source
from metalearn.errors import ConfigError, DataError
from metalearn.evaluate import evaluate
from metalearn.predict import run_predict
from metalearn.preprocess import RECORD_NAME, border_brightness, fit_images, read_image_files
from metalearn.run_config import resolve
from metalearn.step import init_state, setup
from metalearn.tasks import TaskSource
from metalearn.train import train

PNG_SIZE = 24  # files are resized to the run's 16x16
SIZE = 16


def drawing(class_seed: int, image_seed: int) -> np.ndarray:
    """A 'character': three thick strokes fixed per class, jittered per image; 255 on 0."""
    rng = np.random.default_rng(class_seed)
    strokes = rng.integers(3, PNG_SIZE - 3, size=(3, 4))
    jitter = np.random.default_rng(1000 + image_seed).integers(-1, 2, size=strokes.shape)
    img = Image.new("L", (PNG_SIZE, PNG_SIZE), 0)
    draw = ImageDraw.Draw(img)
    for x0, y0, x1, y1 in np.clip(strokes + jitter, 2, PNG_SIZE - 3):
        draw.line((int(x0), int(y0), int(x1), int(y1)), fill=255, width=2)
    return np.asarray(img)


def write_class(folder: Path, class_seed: int, n: int, first: int = 0, invert: bool = False) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(first, first + n):
        pixels = drawing(class_seed, class_seed * 100 + i)
        path = folder / f"{i:02d}.png"
        Image.fromarray(255 - pixels if invert else pixels).save(path)
        files.append(path)
    return files


def inverted_copy(src: Path, dst: Path) -> Path:
    """The same tree with every PNG inverted (dark strokes on light, as users' scans are)."""
    for f in sorted(src.rglob("*.png")):
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - np.asarray(Image.open(f).convert("L"))).save(target)
    return dst


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predict")
    for c in range(10):
        write_class(root / "train_set" / f"c{c}", class_seed=c, n=6)
    cfg = make_cfg(
        dataset={
            "name": "image_folder",
            "path": str(root / "train_set"),
            "data_dir": str(root / "data"),
            "n_way": 3,
            "k_shot": 1,
            "k_query": 2,
            "image_size": SIZE,
            "channels": 1,
            "split_ratios": [0.4, 0.3, 0.3],
        },
        model={"name": "conv4", "filters": 8},
        algo={"inner_lr": 0.4, "inner_steps": 1, "inner_steps_test": 2},
        trainer={"steps": 30, "meta_batch_size": 4, "val_every": 0, "checkpoint_every": 0, "progress": False},
        eval={"n_tasks": 10, "batch_size": 10},
    )
    run = root / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    train(cfg, run)
    # New classes, never trained on: support (1 or 2 images per class) and query folders.
    new = root / "new"
    for name, seed, n_support in (("alpha", 50, 1), ("beta", 51, 2), ("gamma", 52, 1)):
        write_class(new / "support" / name, seed, n_support)
        write_class(new / "query" / name, seed, 3, first=n_support)
    write_class(new / "query", 51, 1, first=9)  # a loose query file: class unknown
    return run


def predict_in_process(run: Path, out: Path, support: Path, query, **keys) -> dict:
    overrides = [f"run_dir={run}", f"support={support}", f"query={query}"]
    overrides += [f"{k}={v}" for k, v in keys.items()]
    composed = make_cfg(support=str(support), query=query if isinstance(query, list) else str(query))
    return run_predict(resolve(run, overrides, composed, "predict"), out, say=lambda *a, **k: None)


def read_rows(out: Path) -> list[dict]:
    with (out / "predictions.csv").open() as f:
        return list(csv.DictReader(f))


def test_record_written_at_training(folder_run):
    record = json.loads((folder_run / RECORD_NAME).read_text())
    assert record["kind"] == "image" and record["input_shape"] == [SIZE, SIZE, 1]
    assert record["outputs"] == 3 and record["size"] == [SIZE, SIZE] and record["channels"] == 1
    assert record["resize"] == "lanczos" and record["value_range"] == [0.0, 1.0]
    # Measured on the training drawings: light strokes on a dark background.
    assert record["polarity"] == "light_on_dark" and record["recorded"] == "at training"


def test_predict_rows_accuracy_and_same_as_library(folder_run, tmp_path):
    new = folder_run.parent / "new"
    summary = predict_in_process(folder_run, tmp_path / "out", new / "support", new / "query")
    rows = read_rows(tmp_path / "out")
    assert list(rows[0]) == ["file", "predicted_class", "probability", "true_class"]
    query_files = sorted(p.relative_to(new / "query").as_posix() for p in (new / "query").rglob("*.png"))
    assert sorted(r["file"] for r in rows) == query_files  # one row per query file
    for r in rows:
        assert r["true_class"] == ("" if "/" not in r["file"] else r["file"].split("/")[0])
        assert r["predicted_class"] in ("alpha", "beta", "gamma") and 1 / 3 <= float(r["probability"]) <= 1
    known = [r for r in rows if r["true_class"]]
    assert summary["query"] == {"files": 10, "with_true_class": 9}
    assert summary["correct"] == sum(r["predicted_class"] == r["true_class"] for r in known)
    assert summary["accuracy"] == pytest.approx(summary["correct"] / 9)
    assert summary["support"]["images_per_class"] == {"alpha": 1, "beta": 2, "gamma": 1}
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["accuracy"] == summary["accuracy"] and saved["inner_steps_test"] == 2

    # The same through the library directly: PIL decoding, adapt, predict.
    def load(files):
        return (
            np.stack(
                [
                    np.asarray(Image.open(f).convert("L").resize((SIZE, SIZE), Image.Resampling.LANCZOS))
                    for f in files
                ]
            )[..., None].astype(np.float32)
            / 255.0
        )

    classes = ["alpha", "beta", "gamma"]
    support = [(f, i) for i, c in enumerate(classes) for f in sorted((new / "support" / c).glob("*.png"))]
    sx, sy = load([f for f, _ in support]), np.array([i for _, i in support], np.int32)
    qx = load([new / "query" / r["file"] for r in rows])
    cfg = OmegaConf.load(folder_run / ".hydra" / "config.yaml")
    source = TaskSource("classification", (SIZE, SIZE, 1), 3, {}, None, (0.0, 1.0))
    exp = setup(cfg, source)
    state = load_checkpoint(folder_run, init_state(exp, cfg.seed))
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0)
    adapted = exp.algo.adapt(state.params, state.algo_state, sx, sy, key, 2)
    logits = np.asarray(exp.algo.predict(state.params, adapted, qx), np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    assert [classes[i] for i in probs.argmax(-1)] == [r["predicted_class"] for r in rows]
    np.testing.assert_allclose(probs.max(-1), [float(r["probability"]) for r in rows], atol=2e-5)


def test_inverted_copy_predicts_like_training_polarity(folder_run, tmp_path):
    new = folder_run.parent / "new"
    inv = inverted_copy(new, tmp_path / "inverted")
    a = predict_in_process(folder_run, tmp_path / "a", new / "support", new / "query")
    b = predict_in_process(folder_run, tmp_path / "b", inv / "support", inv / "query")
    assert a["applied"]["query"]["inverted"] == 0 and b["applied"]["query"]["inverted"] == 10
    assert b["applied"]["support"]["inverted"] == 4
    rows_a, rows_b = read_rows(tmp_path / "a"), read_rows(tmp_path / "b")
    assert [r["predicted_class"] for r in rows_a] == [r["predicted_class"] for r in rows_b]
    np.testing.assert_allclose(
        [float(r["probability"]) for r in rows_a], [float(r["probability"]) for r in rows_b], atol=1e-3
    )
    assert a["accuracy"] == b["accuracy"]
    # The model's input is the same up to LANCZOS rounding (at most 1 of 255 per pixel)...
    record = json.loads((folder_run / RECORD_NAME).read_text())
    files = sorted((new / "query").rglob("*.png"))
    x_a, _ = read_image_files(files, record, "auto", "query")
    x_b, _ = read_image_files([inv / f.relative_to(new) for f in files], record, "auto", "query")
    assert np.abs(x_a.astype(int) - x_b.astype(int)).max() <= 1
    # ...and without the record's polarity (preprocess.invert=false) it is far from it.
    x_c, done = read_image_files([inv / f.relative_to(new) for f in files], record, "false", "query")
    assert done["inverted"] == 0 and np.abs(x_a.astype(int) - x_c.astype(int)).mean() > 100


def test_predict_mismatches_are_one_line(folder_run, tmp_path):
    new = folder_run.parent / "new"
    support = tmp_path / "support4"
    shutil.copytree(new / "support", support)
    write_class(support / "delta", 53, 1)
    with pytest.raises(DataError, match="support has 4 classes but the run's head has 3 outputs"):
        predict_in_process(folder_run, tmp_path / "o1", support, new / "query")
    query = tmp_path / "query"
    shutil.copytree(new / "query", query)
    (query / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="notes.txt is not an image"):
        predict_in_process(folder_run, tmp_path / "o2", new / "support", query)
    (query / "notes.txt").unlink()
    (query / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png is not a readable image"):
        predict_in_process(folder_run, tmp_path / "o3", new / "support", query)
    (query / "broken.png").unlink()
    shutil.copytree(support / "delta", query / "delta")
    with pytest.raises(DataError, match="class folder 'delta' is not a support class"):
        predict_in_process(folder_run, tmp_path / "o4", new / "support", query)
    # A single file works and has no true class.
    one = sorted((new / "query" / "beta").glob("*.png"))[0]
    summary = predict_in_process(folder_run, tmp_path / "o5", new / "support", str(one))
    assert summary["accuracy"] is None and read_rows(tmp_path / "o5")[0]["true_class"] == ""
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def _snapshot(run: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted((run / "checkpoints").rglob("*"))
    }


def test_head_mismatch_detected_before_restore(folder_run, tmp_path):
    """A template of another head size is a config mismatch, not damage, even when resuming."""
    cfg = OmegaConf.load(folder_run / ".hydra" / "config.yaml")
    before = _snapshot(folder_run)
    source = TaskSource("classification", (SIZE, SIZE, 1), 5, {}, None, (0.0, 1.0))
    template = init_state(setup(cfg, source), 0)
    with pytest.raises(
        CheckpointMismatch, match=r"parameter head/(bias|kernel) of shape .*3.* where this config.s model has"
    ):
        restore_latest(folder_run, template, quarantine=True)
    assert _snapshot(folder_run) == before
    with pytest.raises(ConfigError, match="the run's head has 3 outputs but dataset.n_way=5"):
        resolve(folder_run, [f"run_dir={folder_run}", "dataset.n_way=5"], make_cfg(), "eval")
    with pytest.raises(ConfigError, match=r"takes 16x16x1 inputs but dataset.image_size=28"):
        resolve(folder_run, [f"run_dir={folder_run}", "dataset.image_size=28"], make_cfg(), "eval")


def test_cross_domain_eval_uses_a_whole_folder(folder_run, tmp_path):
    """Another folder (only 4 classes, no train/val classes), originals and an inverted copy."""
    other = tmp_path / "other"
    for c in range(4):
        write_class(other / f"k{c}", 70 + c, 4)
    inv = inverted_copy(other, tmp_path / "other_inverted")
    runs = []
    for folder in (other, inv):
        overrides = [f"run_dir={folder_run}", "dataset=image_folder", f"dataset.path={folder}"]
        composed = make_cfg(
            dataset={"name": "image_folder", "path": str(folder), "image_size": 84, "channels": 3}
        )
        run = resolve(folder_run, overrides, composed, "eval")
        assert run.cross_domain and run.cfg.dataset.image_size == SIZE and run.cfg.dataset.channels == 1
        assert (run.cfg.dataset.n_way, run.cfg.dataset.k_shot, run.cfg.dataset.k_query) == (3, 1, 2)
        runs.append(run)
    # The inverted copy becomes the originals' input (up to LANCZOS rounding).
    (src_a, info_a), (src_b, info_b) = (cross_domain_source(r.cfg, r.record, say=print) for r in runs)
    assert info_a["applied"]["inverted"] == 0 and info_b["applied"]["inverted"] == 16
    x_a, x_b = (np.asarray(src.splits["test"]["images"], int) for src in (src_a, src_b))
    assert x_a.shape == (16, SIZE, SIZE, 1) and np.abs(x_a - x_b).max() <= 1
    a = evaluate(runs[1].cfg, tmp_path / "eval", runs[1])
    assert a["dataset"] == "image_folder" and a["train_dataset"] == "image_folder"
    assert a["cross_domain"]["trained_on"]["path"] == str(folder_run.parent / "train_set")
    assert a["cross_domain"]["evaluated_on"]["path"] == str(inv)
    assert a["cross_domain"]["evaluated_on"]["classes"] == 4  # the whole folder is the test split
    assert a["cross_domain"]["evaluated_on"]["applied"]["inverted"] == 16
    assert a["cross_domain"]["preprocessing"]["polarity"] == "light_on_dark"
    assert a["test"]["n_tasks"] == 10 and (tmp_path / "eval" / "results.json").is_file()


def test_cli_predict_and_n_way_mismatch(folder_run, tmp_path):
    new = folder_run.parent / "new"
    before = _snapshot(folder_run)
    proc = run_cli(
        "predict",
        f"run_dir={folder_run}",
        f"support={new / 'support'}",
        f"query={new / 'query'}",
        cwd=tmp_path,
    )
    out = Path(proc.stdout.strip().splitlines()[-1].split("predictions in ")[1]).parent
    assert out.parent == folder_run / "predict" and (out / "summary.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert f"accuracy {summary['accuracy']:.2%}" in proc.stdout
    assert "metalearn: preprocessing (recorded with the run): 16x16x1 greyscale" in proc.stdout

    bad = run_cli("eval", f"run_dir={folder_run}", "dataset.n_way=20", cwd=tmp_path, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "metalearn: error: the run's head has 3 outputs but dataset.n_way=20: a trained model classifies "
        "exactly as many ways as it was trained for (use dataset.n_way=3)"
    ]
    assert "Traceback" not in bad.stdout and _snapshot(folder_run) == before
    assert not (folder_run / "eval").exists()
    assert os.listdir(folder_run / "predict") == [out.name]


def test_fit_images_converts_resizes_and_inverts():
    """Against PIL directly: RGB 32x32 -> L 16x16 (LANCZOS); a light border is inverted."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 3, 32, 32, 3), dtype=np.uint8)  # (classes, per class, ...)
    images[1, :, :12] = 250  # light top rows: a light border ring for class 1's images
    record = {"size": [16, 16], "channels": 1, "polarity": "light_on_dark"}
    out, done = fit_images(images, record, "auto")
    expected = np.stack(
        [
            np.asarray(Image.fromarray(img).convert("L").resize((16, 16), Image.Resampling.LANCZOS))
            for img in images.reshape(-1, 32, 32, 3)
        ]
    )[..., None]
    light = border_brightness(expected) > 127.5
    assert light.reshape(2, 3)[1].all()
    expected[light] = 255 - expected[light]
    assert out.shape == (2, 3, 16, 16, 1) and done["resized_from"] == [32, 32] and done["channels_from"] == 3
    np.testing.assert_array_equal(out.reshape(-1, 16, 16, 1), expected)
    assert done["inverted"] == int(light.sum())
    ring = np.ones((16, 16), bool)
    ring[1:15, 1:15] = False
    np.testing.assert_allclose(border_brightness(expected[:1]), expected[0, ring].mean())
    assert fit_images(images, record, "true")[1]["inverted"] == 6
    assert fit_images(images, dict(record, polarity=None), "auto")[1]["inverted"] == 0


def test_cross_domain_eval_on_another_dataset(folder_run, scaled_mini_imagenet, tmp_path):
    """A 16x16 greyscale run on (synthetic) mini-ImageNet's test classes: 84x84 RGB made 16x16 L."""
    manual, data = scaled_mini_imagenet
    overrides = [f"run_dir={folder_run}", "dataset=mini_imagenet", f"dataset.manual_dir={manual}"]
    composed = make_cfg(dataset={"name": "mini_imagenet", "manual_dir": str(manual), "image_size": 84})
    run = resolve(folder_run, overrides, composed, "eval")
    run.cfg.dataset.data_dir = str(data)
    assert run.cfg.dataset.image_size == SIZE and run.cfg.dataset.n_way == 3
    results = evaluate(run.cfg, tmp_path / "eval", run)
    assert results["dataset"] == "mini_imagenet" and results["train_dataset"] == "image_folder"
    evaluated = results["cross_domain"]["evaluated_on"]
    assert evaluated["classes"] == 5 and evaluated["images"] == 100
    assert evaluated["applied"]["channels_from"] == 3 and 0 <= results["test"]["mean"] <= 1


def test_runs_without_a_record_get_one_derived(tmp_path):
    """Runs trained before preprocessing.json existed: derived from the stored config, with a note."""
    from metalearn.preprocess import load_record

    cfg = make_cfg(dataset={"name": "omniglot", "n_way": 5, "image_size": 28})
    record, note = load_record(tmp_path, cfg)
    assert "has no preprocessing.json" in note and record["recorded"].startswith("derived")
    assert record["input_shape"] == [28, 28, 1] and record["outputs"] == 5
    assert record["polarity"] == "light_on_dark" and record["channels"] == 1
    folder = make_cfg(dataset={"name": "image_folder", "n_way": 4, "image_size": 32, "channels": 3})
    record, _ = load_record(tmp_path, folder)
    assert record["input_shape"] == [32, 32, 3] and record["polarity"] is None
    (tmp_path / RECORD_NAME).write_text('{"kind": "image"}')
    with pytest.raises(DataError, match="cannot read .*preprocessing.json"):
        load_record(tmp_path, cfg)


@pytest.mark.parametrize("algo", ["maml", "fomaml", "metasgd", "anil", "caml", "reptile", "adml"])
def test_every_adapting_algorithm_predicts(algo):
    """predict's adapt-then-predict path for each algorithm (a sinusoid MLP at initialisation),
    against adapt and predict called directly."""
    from metalearn.predict import _problem, adapt_and_predict

    cfg = make_cfg(algo={"name": algo, "inner_steps_test": 2}, model={"hidden": [8]})
    record = {"kind": "regression", "input_shape": [1], "outputs": 1}
    exp = _problem(cfg, record)
    state = init_state(exp, 0)
    sx = np.linspace(-3, 3, 5, dtype=np.float32)[:, None]
    sy, qx = np.sin(sx), np.linspace(-4, 4, 7, dtype=np.float32)[:, None]
    got = adapt_and_predict(exp, state, sx, sy, qx, 2, seed=0)
    key = jax.random.fold_in(jax.random.PRNGKey(0), 0)
    adapted = exp.algo.adapt(state.params, state.algo_state, sx, sy, key, 2)
    want = np.asarray(exp.algo.predict(state.params, adapted, qx))
    assert got.shape == (7, 1) and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    unadapted = np.asarray(
        exp.algo.predict(state.params, exp.algo.adapt(state.params, state.algo_state, sx, sy, key, 0), qx)
    )
    assert not np.allclose(got, unadapted)  # the support set was used
