"""dataset=multi (metalearn/multisource.py): several sources in one run.

The sources are synthetic image folders whose every pixel says where it came from: source s,
class c holds the grey value 40 * s + 2 * c + 1 (flat images stay flat through resizing and
the grey-to-RGB repeat), so a sampled episode reveals the source and the classes of each of
its images. Plus the local TFDS builder of test_tfds_source.py and the shared Omniglot
archives for the end-to-end run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import SHARED_OMNIGLOT, make_cfg, run_cli, run_cli_in_process

from metalearn.config import validate
from metalearn.evaluation import evaluate_params, final_results, format_final
from metalearn.multisource import SHARED_KEYS, combine_summaries, source_choice
from metalearn.step import init_state, setup
from metalearn.tasks import build_task_source
from metalearn.train import train

pytestmark = pytest.mark.usefixtures("no_network")

N_CLASSES = 20  # per synthetic source; split 0.64 / 0.16 / 0.2 by image_folder
PER_CLASS = 6


def pixel(source: int, label: int) -> int:
    return 40 * source + 2 * label + 1


def write_folder(root: Path, source: int, n_classes: int = N_CLASSES, size: int = 10) -> Path:
    """A flat image folder: class c holds PER_CLASS flat grey images of value pixel(source, c)."""
    from PIL import Image

    for label in range(n_classes):
        folder = root / f"class{label:02d}"
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.new("L", (size + i, size), pixel(source, label)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("multi_folders")
    return [write_folder(base / f"source{s}", s) for s in range(3)]


def folder_source(path: Path, **keys) -> dict:
    return {"name": "image_folder", "path": str(path), **keys}


def multi_cfg(sources: list[dict], tmp_path: Path, **dataset):
    values = dict(
        name="multi",
        sources=sources,
        n_way=3,
        k_shot=1,
        k_query=2,
        image_size=8,
        data_dir=str(tmp_path / "data"),
    )
    values.update(dataset)
    return make_cfg(
        dataset=values,
        model={"name": "conv4", "filters": 4},
        algo={"inner_steps": 1, "inner_steps_test": 1},
        trainer={"meta_batch_size": 2},
        eval={"n_tasks": 6, "batch_size": 3},
    )


def source_and_classes(images: np.ndarray) -> tuple[set[int], set[int]]:
    """The sources and the classes (source, label) that flat images of pixel(s, c) came from."""
    values = np.asarray(images)[..., 0, 0, 0].reshape(-1)
    pixels = np.rint(values * 255).astype(int)
    return {(p - 1) // 40 for p in pixels}, {((p - 1) // 40, ((p - 1) % 40) // 2) for p in pixels}


def test_each_episode_comes_from_one_source_drawn_by_the_weights(folders, tmp_path):
    weights = [1.0, 2.0, 5.0]
    cfg = multi_cfg([folder_source(p, weight=w) for p, w in zip(folders, weights, strict=True)], tmp_path)
    validate(cfg)
    source = build_task_source(cfg.dataset)
    assert source.input_shape == (8, 8, 3) and [label for label, _ in source.parts] == [
        "image_folder_0",
        "image_folder_1",
        "image_folder_2",
    ]
    n = 1200
    keys = jax.random.split(jax.random.PRNGKey(7), n)
    tasks = jax.jit(jax.vmap(source.sample, in_axes=(None, 0)))(source.splits["train"], keys)
    counts = np.zeros(3, int)
    chosen = np.asarray(jax.vmap(lambda k: source_choice(k, tuple(weights)))(keys))
    for i in range(n):
        images = np.concatenate([np.asarray(tasks.support_x[i]), np.asarray(tasks.query_x[i])])
        sources, classes = source_and_classes(images)
        assert len(sources) == 1, f"episode {i} mixes sources {sources}"
        (s,) = sources
        assert s == chosen[i]  # the source the key names
        assert len(classes) == 3  # n_way classes of that source
        counts[s] += 1
    expected = n * np.asarray(weights) / sum(weights)
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    # Chi-square with 2 degrees of freedom: P(chi2 > 13.8) = 0.001.
    assert chi2 < 13.8, (counts, expected)


def test_per_source_evaluation_equals_each_source_alone(folders, tmp_path):
    """Validation and test of a multi run: each source's numbers are those of that source
    evaluated alone (same parameters, same seed, so the same tasks); the summary is their
    mean with the stratified 95% interval."""
    sources = [folder_source(folders[0], weight=3), folder_source(folders[2], label="third")]
    cfg = multi_cfg(sources, tmp_path)
    validate(cfg)
    exp = setup(cfg)
    state = init_state(exp, cfg.seed)
    results = final_results(exp, state, cfg, 0, {})
    test = results["test"]
    assert list(test["sources"]) == ["image_folder", "third"]
    for source, (label, summary) in zip(sources, test["sources"].items(), strict=True):
        alone = make_cfg(**{**cfg, "dataset": {**source_alone(cfg, source)}})
        validate(alone)
        alone_exp = setup(alone)
        assert alone_exp.source.input_shape == exp.source.input_shape
        for split in ("validation", "test"):
            want = evaluate_params(alone_exp, state.params, alone, split, 6, 1)
            got = evaluate_params(exp, state.params, cfg, split, 6, 1)["sources"][label]
            assert got == want, (label, split)
        assert summary == evaluate_params(alone_exp, state.params, alone, "test", 6, 1)
    means = [s["mean"] for s in test["sources"].values()]
    assert test["mean"] == pytest.approx(sum(means) / 2) and test["n_tasks"] == 12
    half_widths = [s["ci95"] for s in test["sources"].values()]
    assert test["ci95"] == pytest.approx(math.sqrt(sum(h * h for h in half_widths)) / 2)
    line = format_final(results, "test")
    assert "= mean over 2 sources [image_folder accuracy" in line and "; third accuracy" in line


def source_alone(cfg, source: dict) -> dict:
    """The single-dataset config of one multi source: its keys plus the shared ones."""
    shared = {k: cfg.dataset[k] for k in (*SHARED_KEYS, "channels", "data_dir")}
    return {**shared, **{k: v for k, v in source.items() if k not in ("weight", "label")}}


FOLDER_SOURCE = "dataset.sources=[{name:image_folder,path:FOLDER"
OMNIGLOT_SOURCE = "dataset.sources=[{name:omniglot,variant:small}]"
BAD = [
    ("dataset.sources=[]", "invalid dataset.sources=[]"),
    ("dataset.sources=[{name:no_such}]", "invalid dataset.sources[0].name='no_such'"),
    ("dataset.sources=[{name:sinusoid}]", "invalid dataset.sources[0].name='sinusoid'"),
    (FOLDER_SOURCE + ",weight:0}]", "invalid dataset.sources[0].weight=0"),
    (FOLDER_SOURCE + ",weight:-1.5}]", "invalid dataset.sources[0].weight=-1.5"),
    (FOLDER_SOURCE + ",n_way:3}]", "invalid dataset.sources[0].n_way=3"),
    (FOLDER_SOURCE + ",varaint:small}]", "invalid dataset.sources[0].varaint"),
    (FOLDER_SOURCE + ",label:a},{name:omniglot,label:a}]", "invalid dataset.sources[1].label='a'"),
    (
        "dataset.sources=[{name:omniglot,variant:tiny}]",
        "invalid dataset.sources[0].variant='tiny'",
    ),
    (FOLDER_SOURCE + "},{name:image_folder,path:/no/such}]", "invalid dataset.sources[1].path='/no/such'"),
    # 20 classes split 0.64 / 0.16 / 0.2: 3 validation classes, fewer than 5 ways.
    (FOLDER_SOURCE + "}] dataset.n_way=5", "dataset.sources[0] (image_folder): invalid dataset.n_way=5"),
    (OMNIGLOT_SOURCE + " dataset.n_way=90", "dataset.sources[0] (omniglot): invalid dataset.n_way=90"),
    (FOLDER_SOURCE + "}] dataset.placement=host", "invalid dataset.placement='host'"),
]


@pytest.mark.parametrize(("override", "needle"), BAD)
def test_bad_configs_are_one_line_and_exit_2(folders, tmp_path, override, needle):
    args = [o.replace("FOLDER", str(folders[0])) for o in override.split()]
    code, out, err = run_cli_in_process(
        "train",
        "dataset=multi",
        *args,
        f"dataset.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer.steps=1",
        "trainer.progress=false",
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], (code, err, out)
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    """The local TFDS dataset of test_tfds_source.py (10 flat-colour classes), prepared
    offline."""
    import tensorflow_datasets as tfds
    from test_tfds_source import MetalearnTestShapes

    data_dir = tmp_path_factory.mktemp("tfds")
    builder = MetalearnTestShapes(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return data_dir


def end_to_end_sources(omniglot: Path, folder: Path, tfds_dir: Path) -> str:
    """The dataset.sources override of docs/datasets.md's example: Omniglot small (weight 2),
    an image folder and a TFDS dataset."""
    from test_tfds_source import NAME

    return (
        f"dataset.sources=[{{name:omniglot,variant:small,manual_dir:'{omniglot}',weight:2}},"
        f"{{name:image_folder,path:'{folder}',label:shapes_folder}},"
        f"{{name:tfds,tfds_name:{NAME},tfds_splits:[train,test],image_key:picture,label_key:kind,"
        f"download:false,data_dir:'{tfds_dir}'}}]"
    )


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_OMNIGLOT.is_dir(), reason="shared Omniglot archives not present")
def test_end_to_end_omniglot_folder_and_tfds(folders, shapes_dir, tmp_path):
    """One `metalearn train` on three sources, then `metalearn eval` of the run and
    `metalearn report`: per-source results in results.json, the final line and the report.
    About a CPU-minute: pytest -m slow -n 0 tests/test_multisource.py"""
    run = tmp_path / "run"
    train = [
        "train", "dataset=multi", end_to_end_sources(SHARED_OMNIGLOT, folders[1], shapes_dir),
        "dataset.n_way=2", "dataset.k_shot=1", "dataset.k_query=1", "dataset.image_size=16",
        f"dataset.data_dir={tmp_path / 'data'}", "model.filters=4", "algo.inner_steps=1",
        "algo.inner_steps_test=1", "trainer.steps=4", "trainer.meta_batch_size=4", "trainer.log_every=2",
        "trainer.val_every=2", "trainer.val_tasks=4", "trainer.checkpoint_every=2", "trainer.progress=false",
        "eval.n_tasks=8", "eval.batch_size=8", f"hydra.run.dir={run}",
    ]  # fmt: skip
    proc = run_cli(*train, cwd=tmp_path)
    results = json.loads((run / "results.json").read_text())
    test = results["test"]
    assert results["dataset"] == "multi" and list(test["sources"]) == ["omniglot", "shapes_folder", "tfds"]
    assert test["n_tasks"] == 24 and all(s["n_tasks"] == 8 for s in test["sources"].values())
    assert test["mean"] == pytest.approx(sum(s["mean"] for s in test["sources"].values()) / 3)
    final = proc.stdout.strip().splitlines()[-1]
    assert final.startswith("test accuracy ") and "= mean over 3 sources [omniglot accuracy" in final, final
    assert "shapes_folder accuracy" in final and "tfds accuracy" in final
    validation = [
        r
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if r["split"] == "validation"
    ]
    assert len(validation) == 2 and {"accuracy/omniglot", "accuracy/shapes_folder", "accuracy/tfds"} <= set(
        validation[0]
    )

    # `metalearn eval` of the run: the same per-source numbers from the stored config.
    run_cli("eval", f"run_dir={run}", cwd=tmp_path)
    (evaluated,) = (run / "eval").glob("*/results.json")
    assert json.loads(evaluated.read_text())["test"] == test

    proc = run_cli("report", str(tmp_path), "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert "## Per source" in proc.stdout
    for label, summary in test["sources"].items():
        assert f"| {label} | {100 * summary['mean']:.2f} ± {100 * summary['ci95']:.2f} |" in proc.stdout
    assert f"| mean over 3 sources | {100 * test['mean']:.2f} ± {100 * test['ci95']:.2f} |" in proc.stdout


def test_report_pools_each_source_over_seeds(tmp_path):
    """`metalearn report` of two seeds of a multi run: each source's row pooled over seeds
    like the configuration's (report._pooled), in results.md and the CSV."""
    import csv

    import yaml

    from metalearn.report import _pooled

    def summary(mean, ci, n=10):
        return {"metric": "accuracy", "mean": mean, "ci95": ci, "n_tasks": n}

    seeds = {
        0: {"a": summary(0.6, 0.05), "b": summary(0.8, 0.04)},
        1: {"a": summary(0.7, 0.06), "b": summary(0.9, 0.02)},
    }
    for seed, sources in seeds.items():
        run = tmp_path / "runs" / f"seed{seed}"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(f"seed: {seed}\nrun_dir: null\n")
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["dataset=multi", f"seed={seed}"]))
        (run / "results.json").write_text(json.dumps({"test": combine_summaries(sources)}))
    code, out, err = run_cli_in_process("report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"))
    assert code == 0, err
    for label in ("a", "b"):
        each = [seeds[s][label] for s in (0, 1)]
        mean, ci = _pooled([x["mean"] for x in each], [x["ci95"] for x in each], [10, 10])
        assert f"| `dataset=multi` | {label} | {100 * mean:.2f} ± {100 * ci:.2f} |" in out, out
    with (tmp_path / "rep" / "results.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert set(json.loads(row["per_source"])) == {"a", "b"}
    assert float(row["mean"]) == pytest.approx((0.6 + 0.8 + 0.7 + 0.9) / 4)


@pytest.mark.slow
def test_variable_episodes_from_several_sources(folders, tmp_path):
    """dataset.episodes=variable on a multi run: every source samples Meta-Dataset episodes of
    the one padded shape, each episode from one source; padded rows (label -1) hold no image
    of any source; the run trains and reports each source."""
    sources = [folder_source(folders[0]), folder_source(folders[1], label="second")]
    cfg = multi_cfg(
        sources, tmp_path, episodes="variable", min_ways=2, max_ways=4, max_support=12, max_query=2
    )
    validate(cfg)
    source = build_task_source(cfg.dataset)
    assert source.padded and all(part.padded for _, part in source.parts)
    keys = jax.random.split(jax.random.PRNGKey(3), 40)
    tasks = jax.jit(jax.vmap(source.sample, in_axes=(None, 0)))(source.splits["train"], keys)
    assert tasks.support_x.shape[1] == 12 and tasks.query_x.shape[1] == 4 * 2
    for i in range(40):
        real = np.concatenate(
            [np.asarray(tasks.support_x[i])[np.asarray(tasks.support_y[i]) >= 0],
             np.asarray(tasks.query_x[i])[np.asarray(tasks.query_y[i]) >= 0]]
        )  # fmt: skip
        sources_seen, _ = source_and_classes(real)
        assert len(sources_seen) == 1, (i, sources_seen)
        assert 2 <= int(np.asarray(tasks.support_y[i]).max()) + 1 <= 4
    cfg.trainer.steps, cfg.trainer.val_every, cfg.trainer.progress = 4, 2, False  # (default: 20,000)
    results = train(cfg, tmp_path / "run")
    assert results["steps"] == 4 and set(results["test"]["sources"]) == {"image_folder", "second"}
