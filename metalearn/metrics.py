"""Summaries of per-task results and the append-only metrics log."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def summarize(values: np.ndarray, metric: str) -> dict[str, Any]:
    """Mean and 95% confidence half-width (1.96 * std / sqrt(n)) over per-task values."""
    values = np.asarray(values, dtype=np.float64)
    n = int(values.size)
    std = float(values.std(ddof=0)) if n > 1 else 0.0
    return {
        "metric": metric,
        "mean": float(values.mean()),
        "ci95": 1.96 * std / math.sqrt(n),
        "n_tasks": n,
    }


def format_summary(summary: dict[str, Any]) -> str:
    if summary["metric"] == "accuracy":
        mean, ci = 100 * summary["mean"], 100 * summary["ci95"]
        return f"accuracy {mean:.2f}% +- {ci:.2f}% ({summary['n_tasks']} tasks)"
    return f"{summary['metric']} {summary['mean']:.4f} +- {summary['ci95']:.4f} ({summary['n_tasks']} tasks)"


class JsonlLogger:
    """Appends one JSON object per line; each write is flushed so a crash loses nothing.

    With ``tensorboard=True`` every numeric field of a record is also written as a
    TensorBoard scalar ``<split>/<field>`` at ``record["step"]`` to event files in
    ``<dir of path>/tensorboard/`` (tensorboardX, imported only then: it is an optional
    extra). metrics.jsonl stays the record of truth; the event files are for viewing.
    """

    def __init__(self, path: Path, tensorboard: bool = False):
        self.path = Path(path)
        self._writer = None
        if tensorboard:
            try:
                from tensorboardX.event_file_writer import EventsWriter
            except ImportError as err:  # validate() normally catches this earlier
                from metalearn.errors import ConfigError

                raise ConfigError(
                    'trainer.tensorboard=true needs tensorboardX: pip install "metalearn[tensorboard]"'
                ) from err
            # The synchronous events writer, not SummaryWriter: SummaryWriter queues events to
            # a thread that writes them to disk only every flush_secs (120 s), and its flush()
            # does not wait for that queue, so a killed run lost its last events.
            folder = self.path.parent / "tensorboard"
            folder.mkdir(parents=True, exist_ok=True)
            self._writer = EventsWriter(str(folder / "events"))

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self._writer is not None and "step" in record:
            import time

            from tensorboardX.proto.event_pb2 import Event
            from tensorboardX.proto.summary_pb2 import Summary

            split = record.get("split", "train")
            values = [
                Summary.Value(tag=f"{split}/{key}", simple_value=float(value))
                for key, value in record.items()
                if key not in ("step", "split") and isinstance(value, int | float) and math.isfinite(value)
            ]
            self._writer.write_event(
                Event(wall_time=time.time(), step=int(record["step"]), summary=Summary(value=values))
            )
            # Logs are sparse (every trainer.log_every steps): flush so a live TensorBoard
            # and a killed run both see everything logged so far.
            self._writer.flush()


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename) so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
