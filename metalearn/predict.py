"""`metalearn predict run_dir=R support=DIR query=PATH [overrides]`: adapt a trained run to
labelled examples and classify new files.

Classification runs:

* ``support``: a folder with one subfolder per class (the folder names are the labels), any
  number of images per class (at least one), found recursively; at most as many classes as
  the run's head has outputs. With fewer classes, only the first outputs are used.
* ``query``: a folder of images; or a folder of class subfolders, whose names must be support
  classes (then the accuracy is computed); or both mixed; or an image file, or a list of files
  (``query=[a.png,b.png]``).

Every file must be an image (png, jpg, jpeg, bmp, gif, webp, tif, tiff); hidden files are
skipped. Images get the run's recorded preprocessing (:mod:`metalearn.preprocess`; polarity
per ``preprocess.invert``). The model adapts on the whole support set with the run's
algorithm and ``algo.inner_steps_test`` (:meth:`MetaLearner.adapt`, from the carried
algorithm state), then classifies the query files with :meth:`MetaLearner.predict`. BatchNorm
is transductive, as in training and evaluation: the query files are classified together, in
batches of at most :data:`QUERY_BATCH` (larger sets are split into near-equal batches in a
seeded random order). The probability is the softmax over the outputs in use.

Regression runs (sinusoid): ``support`` is a CSV of ``x,y`` rows, ``query`` a CSV of ``x``
rows, or ``x,y`` rows (then the MSE is computed); a first row that is not numbers is a header.

Writes ``predictions.csv`` (``file, predicted_class, probability, true_class``; for regression
``x, y_pred, y_true``; true values empty when unknown) and ``summary.json`` to the output dir
(``R/predict/<time>/``), and prints the accuracy (MSE) when known and the path.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.adaptation import ADAPTATION_PHRASES, adaptation_of
from metalearn.algos import adaptation_phrase, test_steps
from metalearn.data.image_folder import IMAGE_EXTENSIONS
from metalearn.errors import DataError
from metalearn.metrics import write_json
from metalearn.preprocess import describe, describe_applied, read_image_files
from metalearn.protocol import BN_PHRASES

QUERY_BATCH = 1024


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _files_under(folder: Path, what: str) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden skipped), sorted; DataError for others."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if not _visible(path):
                continue
            if not _is_image(path):
                raise DataError(
                    f"{what}: {path} is not an image (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            found.append(path)
    return sorted(found)


def scan_support(folder: str | Path) -> tuple[list[str], list[list[Path]]]:
    """Class names (sorted) and each class's image files."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"support={str(folder)!r} is not a folder (it needs one subfolder per class)")
    loose = [p for p in root.iterdir() if p.is_file() and _visible(p)]
    if loose:
        raise DataError(
            f"support: {loose[0]} is directly in {root}; put each class's images in a subfolder named "
            "after the class"
        )
    names, files = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and _visible(p)):
        images = _files_under(class_dir, "support")
        if not images:
            raise DataError(f"support: class folder {class_dir} holds no images")
        names.append(class_dir.name)
        files.append(images)
    if not names:
        raise DataError(f"support: {root} has no class subfolders")
    return names, files


def scan_query(query: Any, classes: list[str]) -> tuple[list[Path], list[str], list[str | None]]:
    """Query files, their names in predictions.csv and their true classes (None: unknown)."""
    entries = [query] if isinstance(query, str | os.PathLike) else list(query)
    files: list[Path] = []
    shown: list[str] = []
    truth: list[str | None] = []
    for entry in entries:
        path = Path(str(entry)).expanduser()
        if path.is_file():
            if not _is_image(path):
                raise DataError(
                    f"query: {path} is not an image (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            files.append(path)
            shown.append(str(entry))
            truth.append(None)
            continue
        if not path.is_dir():
            raise DataError(f"query: {path} is neither an image file nor a folder")
        for child in sorted(p for p in path.iterdir() if _visible(p)):
            if child.is_dir():
                if child.name not in classes:
                    raise DataError(
                        f"query: class folder {child.name!r} is not a support class "
                        f"(support classes: {', '.join(classes)})"
                    )
                for f in _files_under(child, "query"):
                    files.append(f)
                    shown.append(f.relative_to(path).as_posix())
                    truth.append(child.name)
            elif not _is_image(child):
                raise DataError(
                    f"query: {child} is not an image (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            else:
                files.append(child)
                shown.append(child.relative_to(path).as_posix())
                truth.append(None)
    if not files:
        raise DataError(f"query: no image files in {', '.join(str(e) for e in entries)}")
    return files, shown, truth


def _read_csv(path: Path, columns: tuple[int, ...], what: str) -> np.ndarray:
    """Rows of numbers (n, k) with k in ``columns``; a non-numeric first row is a header."""
    try:
        rows = [r for r in csv.reader(path.read_text().splitlines()) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{what}: cannot read {path} ({err})") from None
    values = []
    for i, row in enumerate(rows):
        try:
            values.append([float(c) for c in row])
        except ValueError:
            if i == 0:
                continue  # header
            raise DataError(f"{what}: {path} line {i + 1} is not numbers: {','.join(row)}") from None
    if not values:
        raise DataError(f"{what}: {path} has no rows of numbers")
    widths = {len(v) for v in values}
    if len(widths) != 1 or widths.pop() not in columns:
        raise DataError(f"{what}: {path} must have {' or '.join(map(str, columns))} column(s) on every row")
    arr = np.asarray(values, np.float64)
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{what}: {path} holds a non-finite value")
    return arr


def _stored_head_outputs(run_dir: Any) -> int:
    """The head's outputs (the training classes) of algo=pretrain's newest checkpoint."""
    from metalearn.checkpoint import CHECKPOINT_DIR, _stored_param_shapes, checkpoint_steps

    steps = checkpoint_steps(run_dir)
    shapes = _stored_param_shapes(Path(run_dir) / CHECKPOINT_DIR / str(steps[0])) if steps else None
    if not shapes or "head/kernel" not in shapes:
        raise DataError(f"no readable checkpoint in {Path(run_dir) / CHECKPOINT_DIR}")
    return shapes["head/kernel"][1]


def _problem(cfg: Any, record: dict, trained_bn_stats: str | None = None):
    """Model and algorithm for the run's recorded input and head, without its dataset."""
    from metalearn.step import setup
    from metalearn.tasks import TaskSource

    def no_sampler(data, key):
        raise NotImplementedError("predict has no task sampler")

    kind = "regression" if record["kind"] == "regression" else "classification"
    input_range = None if kind == "regression" else (0.0, 1.0)
    shape = tuple(int(d) for d in record["input_shape"])
    splits = {}
    if cfg.algo.name == "pretrain":  # its head has one output per training class: as stored
        splits = {"train": {"images": np.zeros((_stored_head_outputs(cfg.run_dir), 1, *shape), np.uint8)}}
    source = TaskSource(kind, shape, int(record["outputs"]), splits, no_sampler, input_range)
    return setup(cfg, source, trained_bn_stats)


def load_trained(cfg: Any, record: dict, trained_bn_stats: str | None = None):
    """(experiment, train state) of the run in ``cfg.run_dir`` (newest usable checkpoint);
    ``trained_bn_stats``: the run's own model.bn_stats where ``cfg`` overrides it."""
    from metalearn.checkpoint import load_checkpoint
    from metalearn.step import init_state

    exp = _problem(cfg, record, trained_bn_stats)
    state = load_checkpoint(Path(cfg.run_dir), init_state(exp, cfg.seed))
    return exp, state


def adapt_and_predict(
    exp: Any,
    state: Any,
    support_x: np.ndarray,
    support_y: np.ndarray,
    query_x: np.ndarray,
    steps: int,
    seed: int,
) -> np.ndarray:
    """The adapted model's outputs for ``query_x`` (float32 inputs), in batches of QUERY_BATCH."""
    algo = exp.algo
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)

    @jax.jit
    def adapt(params, algo_state, sx, sy):
        return algo.adapt(params, algo_state, sx, sy, key, steps)

    predict = jax.jit(algo.predict)
    adapted = adapt(state.params, state.algo_state, jnp.asarray(support_x), jnp.asarray(support_y))
    n = len(query_x)
    if n <= QUERY_BATCH:
        return np.asarray(predict(state.params, adapted, jnp.asarray(query_x)))
    n_batches = math.ceil(n / QUERY_BATCH)
    order = np.random.default_rng(seed).permutation(n)
    out = None
    for part in np.array_split(order, n_batches):
        values = np.asarray(predict(state.params, adapted, jnp.asarray(query_x[part])))
        out = np.empty((n, *values.shape[1:]), values.dtype) if out is None else out
        out[part] = values
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _write_summary(
    cfg: Any, state: Any, steps: int, fields: dict, csv_path: Path, said: tuple[str, str, str], say
) -> dict:
    """Write and return summary.json (next to ``csv_path``, the predictions): the run and
    checkpoint, then ``fields`` (what was predicted, from which support, the score); say it in
    one line.

    said: (query, support, score) as words, e.g. ("12 query files", "25 support images of
    5 classes", "accuracy 80.00% (8/10)").
    """
    summary = {
        "run_dir": str(cfg.run_dir),
        "algo": str(cfg.algo.name),
        "inner_steps_test": steps,
        "checkpoint_step": int(state.step),
        "seed": int(cfg.seed),
        # The BatchNorm statistics the queries were normalised with (None: no BatchNorm).
        "bn_stats": getattr(cfg.model, "bn_stats", None),
        # The test-time adaptation (eval.adaptation, metalearn/adaptation.py).
        "adaptation": adaptation_of(cfg.eval),
        **fields,
        "predictions": str(csv_path),
    }
    write_json(csv_path.parent / "summary.json", summary)
    query, support, score = said
    bn = summary["bn_stats"]
    how = adaptation_phrase(cfg.algo.name, steps)
    if summary["adaptation"] != "algorithm":
        how = f" adapted by {ADAPTATION_PHRASES[summary['adaptation']]}"
    say(
        f"predicted {query} with {cfg.algo.name}{how} on "
        f"{support}{'' if bn is None else ', ' + BN_PHRASES[bn]}: {score}; predictions in {csv_path}",
        flush=True,
    )
    return summary


def run_predict(run: Any, out_dir: str | Path, say=print) -> dict:
    """Predict as configured by ``run`` (a :class:`metalearn.run_config.RunConfig`); write
    predictions.csv and summary.json to ``out_dir``; returns the summary."""
    cfg, record = run.cfg, run.record
    out_dir = Path(out_dir)
    steps = test_steps(cfg.algo)
    if run.record_note:
        say(f"metalearn: {run.record_note}", flush=True)
    if record["kind"] == "regression":
        return _predict_regression(run, out_dir, steps, say)

    head = int(record["outputs"])
    classes, support_files = scan_support(cfg.support)
    if len(classes) > head:
        raise DataError(
            f"support has {len(classes)} classes but the run's head has {head} outputs (trained "
            f"{head}-way): give at most {head} class folders"
        )
    files, shown, truth = scan_query(cfg.query, classes)
    flat_support = [f for fs in support_files for f in fs]
    support_y = np.concatenate([np.full(len(fs), i, np.int32) for i, fs in enumerate(support_files)])
    sx, s_done = read_image_files(flat_support, record, cfg.preprocess.invert, "support")
    qx, q_done = read_image_files(files, record, cfg.preprocess.invert, "query")
    say(
        f"metalearn: preprocessing ({'derived' if run.record_note else 'recorded with the run'}): "
        f"{describe(record)}; support {describe_applied(s_done, record)}; "
        f"query {describe_applied(q_done, record)}",
        flush=True,
    )
    exp, state = load_trained(cfg, record, run.trained_bn_stats)
    to_float = lambda x: x.astype(np.float32) / 255.0
    logits = adapt_and_predict(exp, state, to_float(sx), support_y, to_float(qx), steps, cfg.seed)
    probs = _softmax(logits[:, : len(classes)])
    pred = probs.argmax(axis=-1)

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "predictions.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "predicted_class", "probability", "true_class"])
        for name, p, row, t in zip(shown, pred, probs, truth, strict=True):
            writer.writerow([name, classes[p], f"{row[p]:.6f}", "" if t is None else t])
    known = [i for i, t in enumerate(truth) if t is not None]
    correct = sum(classes[pred[i]] == truth[i] for i in known)
    accuracy = correct / len(known) if known else None
    fields = {
        "support": {
            "path": str(cfg.support),
            "classes": classes,
            "images_per_class": {c: len(fs) for c, fs in zip(classes, support_files, strict=True)},
        },
        "query": {"files": len(files), "with_true_class": len(known)},
        "accuracy": accuracy,
        "correct": int(correct) if known else None,
        "head_outputs": head,
        "outputs_used": len(classes),
        "preprocessing": record,
        "applied": {"support": s_done, "query": q_done},
    }
    score = f"accuracy {accuracy:.2%} ({correct}/{len(known)})" if known else "no true classes given"
    said = (
        f"{len(files)} query files",
        f"{len(flat_support)} support images of {len(classes)} classes",
        score,
    )
    return _write_summary(cfg, state, steps, fields, csv_path, said, say)


def _predict_regression(run: Any, out_dir: Path, steps: int, say) -> dict:
    cfg, record = run.cfg, run.record
    support_path = Path(str(cfg.support)).expanduser()
    query_entries = [cfg.query] if isinstance(cfg.query, str | os.PathLike) else list(cfg.query)
    if len(query_entries) != 1:
        raise DataError("query: give one CSV file for a regression run")
    query_path = Path(str(query_entries[0])).expanduser()
    if not support_path.is_file() or not query_path.is_file():
        raise DataError("support and query must be CSV files for a regression run (x,y rows and x rows)")
    support = _read_csv(support_path, (2,), "support")
    query = _read_csv(query_path, (1, 2), "query")
    say(f"metalearn: preprocessing: {describe(record)}; x and y used as they are", flush=True)
    exp, state = load_trained(cfg, record)
    y_pred = adapt_and_predict(
        exp,
        state,
        support[:, :1].astype(np.float32),
        support[:, 1:].astype(np.float32),
        query[:, :1].astype(np.float32),
        steps,
        cfg.seed,
    )[:, 0]
    known = query.shape[1] == 2
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "predictions.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["x", "y_pred", "y_true"])
        for i in range(len(query)):
            writer.writerow([f"{query[i, 0]:.9g}", f"{y_pred[i]:.9g}", f"{query[i, 1]:.9g}" if known else ""])
    mse = float(np.mean((y_pred.astype(np.float64) - query[:, 1]) ** 2)) if known else None
    fields = {
        "support": {"path": str(support_path), "points": len(support)},
        "query": {"path": str(query_path), "points": len(query), "with_true_y": len(query) if known else 0},
        "mse": mse,
        "preprocessing": record,
    }
    score = f"MSE {mse:.4f}" if known else "no true y given"
    said = (f"{len(query)} query points", f"{len(support)} support points", score)
    return _write_summary(cfg, state, steps, fields, csv_path, said, say)
