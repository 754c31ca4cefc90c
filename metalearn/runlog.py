"""The one place a training run's records go: :class:`RunLog` writes every metrics record to
metrics.jsonl (and TensorBoard with trainer.tensorboard) and to the chosen experiment trackers
(:mod:`metalearn.trackers`), and at the end the final result and the run's files.

The tracker runs' ids and how far each has been sent (per split, the last step) are kept in
``<run dir>/trackers.json``: a resumed run reopens the same tracker runs and skips the records it
logs again (the steps between its checkpoint and the stop, identical by exact resume).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from metalearn.metrics import JsonlLogger
from metalearn.rundir import atomic_write_text
from metalearn.trackers import (
    RUN_ARTIFACTS,
    STATE_FILE,
    TRACKERS,
    chosen,
    record_metrics,
    result_metrics,
    run_params,
    tracker_group,
)


def read_state(run_dir: Path) -> dict[str, Any]:
    """``<run dir>/trackers.json`` ({} if absent or unreadable)."""
    try:
        state = json.loads((Path(run_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


class RunLog:
    """metrics.jsonl plus the trackers of ``cfg.logger`` for the run in ``run_dir``.

    ``log(record)`` takes a metrics.jsonl record (``{"step", "split", <fields>}``);
    :meth:`finish` the results dict; :meth:`end` closes the tracker runs of a run that stopped
    (status "KILLED" for a pre-emption, "FAILED" otherwise). ``writes=False`` (processes other
    than 0 of a multi-process job) makes every call a no-op.
    """

    def __init__(self, run_dir: str | Path, cfg: Any, writes: bool = True):
        self.run_dir = Path(run_dir)
        self.jsonl = (
            JsonlLogger(self.run_dir / "metrics.jsonl", tensorboard=cfg.trainer.tensorboard)
            if writes
            else None
        )
        self.trackers: list[Any] = []
        self.state = read_state(self.run_dir) if writes else {}
        if not writes:
            return
        group = tracker_group(cfg)
        try:
            for name in chosen(cfg):
                tracker = TRACKERS[name](cfg.logger[name], group, self.run_dir, self.state.get(name, {}))
                self.trackers.append(tracker)
                self.state[name] = {**self.state.get(name, {}), **tracker.state}
                self._save_state()
            params = run_params(cfg)
            for tracker in self.trackers:
                tracker.log_params(params)
        except BaseException:
            self.end("FAILED")
            raise

    def _save_state(self) -> None:
        atomic_write_text(self.run_dir / STATE_FILE, json.dumps(self.state, indent=2) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        if self.jsonl is None:
            return
        self.jsonl.log(record)
        if not self.trackers or "step" not in record:
            return
        step, split = int(record["step"]), str(record.get("split", "train"))
        metrics = record_metrics(record)
        sent = False
        for tracker in self.trackers:
            through = self.state[tracker.name].setdefault("logged_through", {})
            if step <= through.get(split, -1):
                continue  # sent before the stop this run resumed from
            tracker.log_metrics(metrics, step)
            through[split] = step
            sent = True
        if sent:
            self._save_state()

    def finish(self, results: dict[str, Any], say: Any = print) -> None:
        """The final result (metrics at the run's last step; W&B: also the summary), the
        run's files (:data:`RUN_ARTIFACTS`, a learning curve drawn from metrics.jsonl), then
        the tracker runs are closed."""
        if not self.trackers:
            return
        draw_learning_curve(self.run_dir)
        final = result_metrics(results)
        files = [(self.run_dir / name, "") for name in RUN_ARTIFACTS if (self.run_dir / name).is_file()]
        try:
            for tracker in self.trackers:
                tracker.log_metrics(final, int(results.get("steps", 0)))
                if hasattr(tracker, "log_summary"):
                    tracker.log_summary(final)
                tracker.log_files(files)
        except BaseException:
            self.end("FAILED")
            raise
        hints = [t.sync_hint() for t in self.trackers if hasattr(t, "sync_hint")]
        ids = ", ".join(f"{t.name} run {self.state[t.name]['run_id']}" for t in self.trackers)
        self.end("FINISHED")
        for hint in hints:
            if hint:
                say(f"metalearn: {hint}", flush=True)
        say(f"metalearn: tracked as {ids} (ids in {self.run_dir / STATE_FILE})", flush=True)

    def end(self, status: str) -> None:
        """Close every tracker run with ``status`` (FINISHED, FAILED or KILLED); errors of a
        tracker while closing do not hide the run's own error."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.end(status)
            except Exception as err:  # noqa: BLE001 - the run's own outcome matters more
                print(f"metalearn: warning: closing the {tracker.name} run failed: {err}", flush=True)


def draw_learning_curve(run_dir: Path) -> Path | None:
    """``<run dir>/learning_curve.png`` from metrics.jsonl (metalearn.report's plot of one run)."""
    from metalearn.report import Row, find_runs, plot_curves

    runs = [r for r in find_runs(run_dir) if r.path == run_dir]
    if not runs:
        return None
    metric = (runs[0].results or {}).get("test", {}).get("metric", "")
    return plot_curves(Row(label=run_dir.name, runs=runs, metric=metric), run_dir / "learning_curve.png")


def log_prediction(trained_run_dir: str | Path, files: list[Path], folder: str) -> list[str]:
    """Add ``files`` (predictions.csv, summary.json of `metalearn predict`) under ``folder`` to
    the tracker runs of the training run in ``trained_run_dir`` (those of its trackers.json
    whose package is installed); returns the names of the trackers written to."""
    import importlib.util

    from omegaconf import OmegaConf

    state = read_state(Path(trained_run_dir))
    done = []
    for name in ("mlflow", "wandb"):
        entry = state.get(name)
        if not entry or importlib.util.find_spec(name) is None:
            continue
        stored = OmegaConf.load(Path(trained_run_dir) / ".hydra" / "config.yaml")
        section = stored.logger[name] if stored.get("logger") and stored.logger.get(name) else None
        if section is None:
            continue
        tracker = TRACKERS[name](
            section, str(stored.logger.get("group") or "metalearn"), Path(trained_run_dir), entry
        )
        try:
            tracker.log_files([(Path(f), folder) for f in files])
        finally:
            tracker.end("FINISHED")
        done.append(name)
    return done
