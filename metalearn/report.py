"""`metalearn report <dir>`: aggregate finished runs into a table, a CSV and learning curves.

Any folder that holds `metalearn train` run dirs works: a multirun sweep
(``outputs/multirun/<date>/<time>``), a ``metalearn reproduce`` report folder, or a
hand-made folder of runs. A run dir is a folder with ``.hydra/config.yaml``; evaluation
dirs (``<run>/eval/<time>``, whose config has ``run_dir`` set) are not training runs and are
skipped.

Runs are grouped into *configurations*: runs whose command-line overrides differ only in
``seed`` (and in paths or flags that do not change the experiment, see ``_IGNORED_KEYS``)
belong together. Per configuration the table shows

* ``mean``: the mean over seeds of each seed's test mean (each seed's mean is itself over
  ``eval.n_tasks`` test tasks; with equal task counts this equals the mean over all tasks);
* ``ci95``: a 95% confidence half-width over all test tasks of all seeds pooled,
  ``1.96 * sqrt(v / N)`` where ``N`` is the total task count and ``v`` the pooled per-task
  variance, i.e. the within-seed variances (recovered from each seed's ``ci95``) plus the
  spread of the seed means around the overall mean. It answers "how precisely do we know
  the mean over tasks", counting seed-to-seed differences as extra task-level noise;
* ``seed_std``: the standard deviation of the per-seed means (ddof=1), the spread one
  should expect from rerunning with another seed. Compare it with ``ci95`` before reading
  much into a difference between configurations.
* ``protocol``: how the runs were evaluated, as their final line states it (split, rotation,
  test tasks, which checkpoint was tested; metalearn/protocol.py).

Runs with several sources (``dataset=multi``: ``test.sources`` in results.json) show the mean
over sources in the table and each source's result, pooled over seeds the same way, in a
section of its own (and as JSON in the CSV's ``per_source`` column).

Failed runs (a run dir with ``error.txt``, or without ``results.json``) are counted per
configuration and listed; a configuration without any finished run is marked ``failed``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metalearn.errors import ConfigError, OneLineArgumentParser
from metalearn.rundir import check_writable

# Override keys that do not define an experiment: where data lives, console output, and
# Hydra's own settings. ``seed`` is what is aggregated over.
_IGNORED_KEYS = ("seed", "dataset.manual_dir", "dataset.data_dir", "trainer.progress")


@dataclass
class Run:
    """One training run dir as found on disk."""

    path: Path
    overrides: list[str]
    config: dict[str, Any]
    results: dict[str, Any] | None
    error: str | None
    curves: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def ok(self) -> bool:
        return self.results is not None and self.error is None and "test" in self.results


@dataclass
class Row:
    """One configuration: its runs aggregated over seeds."""

    label: str
    runs: list[Run]
    metric: str = ""
    mean: float | None = None
    ci95: float | None = None
    seed_std: float | None = None
    paper: dict[str, Any] = field(default_factory=dict)
    # The evaluation protocol of its runs (metalearn/protocol.py: split, rotation, tasks, the
    # checkpoint rule), as the final line states it; "" for runs of versions before it.
    protocol: str = ""
    # dataset=multi: label -> (mean, ci95) of each source, pooled over seeds like the row's.
    sources: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.ok]

    @property
    def failed(self) -> list[Run]:
        return [r for r in self.runs if not r.ok]

    @property
    def diff(self) -> float | None:
        value = self.paper.get("value")
        return None if value is None or self.mean is None else self.mean - value


def _load_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _read_curves(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
            continue
    return records


def find_runs(root: str | Path) -> list[Run]:
    """Every training run dir under ``root`` (``root`` itself included), sorted by path."""
    root = Path(root)
    runs = []
    for cfg_path in sorted(root.glob("**/.hydra/config.yaml")):
        run_dir = cfg_path.parent.parent
        config = _load_yaml(cfg_path)
        if not isinstance(config, dict) or config.get("run_dir"):
            continue  # an eval dir of some run, not a training run
        overrides_path = run_dir / ".hydra" / "overrides.yaml"
        overrides = _load_yaml(overrides_path) if overrides_path.is_file() else []
        results_path = run_dir / "results.json"
        results = json.loads(results_path.read_text()) if results_path.is_file() else None
        error_path = run_dir / "error.txt"
        error = None
        if error_path.is_file():
            error = (error_path.read_text().strip().splitlines() or ["error"])[0]
        elif results is None:
            error = "no results.json (unfinished or crashed)"
        runs.append(
            Run(
                run_dir,
                list(overrides or []),
                config,
                results,
                error,
                _read_curves(run_dir / "metrics.jsonl"),
            )
        )
    return runs


def config_label(overrides: list[str]) -> str:
    """The overrides that define a configuration, in a stable order ('defaults' if none)."""
    kept = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in _IGNORED_KEYS or key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        kept.append(item)
    # experiment= first: it names the preset; the rest alphabetically.
    kept.sort(key=lambda o: (not o.startswith("experiment="), o))
    return " ".join(kept) or "defaults"


def _pooled(means: list[float], cis: list[float], ns: list[int]) -> tuple[float, float]:
    """Mean over seeds and the pooled 95% half-width over all tasks (see module docstring)."""
    total = sum(ns)
    mean = sum(m * n for m, n in zip(means, ns, strict=True)) / total
    # Each seed's per-task std from its ci95 = 1.96 * std / sqrt(n).
    within = sum(n * (ci * math.sqrt(n) / 1.96) ** 2 for ci, n in zip(cis, ns, strict=True))
    between = sum(n * (m - mean) ** 2 for m, n in zip(means, ns, strict=True))
    return mean, 1.96 * math.sqrt((within + between) / total / total)


def aggregate(runs: list[Run]) -> list[Row]:
    """Group runs into configurations (see module docstring) and summarise each."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(config_label(run.overrides), []).append(run)
    rows = []
    for label, members in groups.items():
        row = Row(label, sorted(members, key=lambda r: r.seed))
        paper = next((r.config.get("paper") for r in members if r.config.get("paper")), None) or {}
        row.paper = paper if paper.get("source") else {}
        done = row.finished
        if done:
            tests = [r.results["test"] for r in done]
            row.protocol = _protocols(done)
            row.metric = tests[0]["metric"]
            means = [t["mean"] for t in tests]
            row.mean, row.ci95 = _pooled(means, [t["ci95"] for t in tests], [t["n_tasks"] for t in tests])
            if len(means) > 1:
                mu = sum(means) / len(means)
                row.seed_std = math.sqrt(sum((m - mu) ** 2 for m in means) / (len(means) - 1))
            row.sources = _per_source(tests)
        rows.append(row)
    return rows


def _per_source(tests: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """label -> pooled (mean, ci95) over seeds of the sources every run's test reports."""
    labels = [
        label for label in tests[0].get("sources", {}) if all(label in t.get("sources", {}) for t in tests)
    ]
    pooled = {}
    for label in labels:
        each = [t["sources"][label] for t in tests]
        pooled[label] = _pooled(
            [x["mean"] for x in each], [x["ci95"] for x in each], [x["n_tasks"] for x in each]
        )
    return pooled


def _protocols(runs: list[Run]) -> str:
    """The protocol phrase of ``runs`` (distinct phrases joined by " / ": mixed runs show it)."""
    from metalearn.protocol import describe_protocol

    phrases = [describe_protocol(r.results["protocol"]) for r in runs if "protocol" in r.results]
    return " / ".join(dict.fromkeys(phrases))


def sort_rows(rows: list[Row], by: str = "metric") -> list[Row]:
    """``metric``: best first within each metric (accuracy descending, mse ascending), failed
    configurations last; ``name``: by label; ``diff``: largest gap to the paper first."""
    if by == "name":
        return sorted(rows, key=lambda r: r.label)
    if by == "diff":
        return sorted(rows, key=lambda r: (r.diff is None, -abs(r.diff or 0.0), r.label))
    if by != "metric":
        raise ValueError(f"unknown sort key {by!r}: metric, name or diff")

    def key(r: Row):
        if r.mean is None:
            return (1, "", 0.0, r.label)
        sign = -1.0 if r.metric == "accuracy" else 1.0
        return (0, r.metric, sign * r.mean, r.label)

    return sorted(rows, key=key)


def _fmt(value: float | None, metric: str, signed: bool = False) -> str:
    """Accuracy in percent with 2 decimals, MSE with 3; '' for missing values."""
    if value is None:
        return ""
    if metric == "accuracy":
        return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _pm(mean: float | None, ci: float | None, metric: str) -> str:
    if mean is None:
        return ""
    return _fmt(mean, metric) + (f" ± {_fmt(ci, metric)}" if ci is not None else "")


def _status(row: Row) -> str:
    if not row.finished:
        return "failed: " + (row.failed[0].error or "?") if row.failed else "no runs"
    if row.failed:
        return f"{len(row.failed)} failed"
    return "ok"


def _slug(label: str) -> str:
    """A short file name: the label's start plus a hash, so long labels stay distinct."""
    digest = hashlib.sha1(label.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_.=-]+', '_', label).strip('_')[:60]}_{digest}"


CSV_FIELDS = [
    "configuration",
    "metric",
    "seeds",
    "failed",
    "mean",
    "ci95",
    "seed_std",
    "paper_value",
    "paper_ci95",
    "diff",
    "paper_source",
    "status",
    "run_dirs",
    "protocol",
    "per_source",
]


def write_csv(rows: list[Row], path: Path) -> None:
    """Raw numbers (accuracy as a fraction), one row per configuration."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {
                    "configuration": r.label,
                    "metric": r.metric or r.paper.get("metric", ""),
                    "seeds": " ".join(str(x.seed) for x in r.finished),
                    "failed": len(r.failed),
                    "mean": r.mean,
                    "ci95": r.ci95,
                    "seed_std": r.seed_std,
                    "paper_value": r.paper.get("value"),
                    "paper_ci95": r.paper.get("ci95"),
                    "diff": r.diff,
                    "paper_source": r.paper.get("source", ""),
                    "status": _status(r),
                    "run_dirs": " ".join(str(x.path) for x in r.runs),
                    "protocol": r.protocol,
                    "per_source": json.dumps(
                        {label: {"mean": m, "ci95": ci} for label, (m, ci) in r.sources.items()}
                    )
                    if r.sources
                    else "",
                }
            )


def markdown_table(rows: list[Row], plots: dict[str, Path] | None = None, base: Path | None = None) -> str:
    """The results table (accuracy in %, MSE as is) with links to the learning curves."""
    lines = [
        "| configuration | metric | seeds | ours (mean ± 95% CI) | seed std | paper | ours − paper "
        "| status | curves | protocol |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        metric = r.metric or r.paper.get("metric", "")
        unit = " (%)" if metric == "accuracy" else ""
        paper = _pm(r.paper.get("value"), r.paper.get("ci95"), metric)
        plot = (plots or {}).get(r.label)
        link = f"[png]({plot.relative_to(base) if base else plot})" if plot else ""
        seeds = ",".join(str(x.seed) for x in r.finished)
        lines.append(
            f"| `{r.label}` | {metric}{unit} | {seeds} | {_pm(r.mean, r.ci95, metric)} | "
            f"{_fmt(r.seed_std, metric)} | {paper} | {_fmt(r.diff, metric, signed=True)} | "
            f"{_status(r)} | {link} | {r.protocol} |"
        )
    return "\n".join(lines) + "\n"


def per_source_table(rows: list[Row]) -> str:
    """The sources of multi-source configurations (dataset=multi), one line each; "" if none."""
    lines = []
    for r in rows:
        for label, (mean, ci) in r.sources.items():
            lines.append(f"| `{r.label}` | {label} | {_pm(mean, ci, r.metric)} |")
        if r.sources:
            lines.append(
                f"| `{r.label}` | mean over {len(r.sources)} sources | {_pm(r.mean, r.ci95, r.metric)} |"
            )
    if not lines:
        return ""
    head = ["| configuration | source | ours (mean ± 95% CI) |", "| --- | --- | --- |"]
    return "\n".join(head + lines) + "\n"


def plot_curves(row: Row, path: Path) -> Path | None:
    """PNG of the training metric (solid) and validation metric (dashed, markers) against the
    meta-training step, one colour per seed. None if no run logged anything."""
    runs = [r for r in row.runs if r.curves]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    metric = row.metric or next(
        (k for k in ("accuracy", "mse") if any(k in rec for r in runs for rec in r.curves)), "loss"
    )
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        for split, style in (("train", "-"), ("validation", "--o")):
            pts = [
                (rec["step"], rec[metric])
                for rec in run.curves
                if rec.get("split") == split and metric in rec
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, style, color=color, markersize=3, label=f"seed {run.seed} {split}")
    ax.set_xlabel("meta-training step")
    ax.set_ylabel(f"{metric} (query set, after adaptation)")
    if metric == "mse":
        ax.set_yscale("log")
    # The whole configuration, wrapped: the preset name comes first (see config_label).
    title = textwrap.wrap(row.label, 85)
    ax.set_title(
        "\n".join(title[:3]) + (" ..." if len(title) > 3 else ""), fontsize=9 if len(title) > 1 else 11
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    root: str | Path, out: str | Path, sort: str = "metric", title: str | None = None
) -> list[Row]:
    """Find runs under ``root``; write ``out``/results.md, results.csv and curves/*.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = find_runs(root)
    rows = sort_rows(aggregate(runs), sort)
    plots = {}
    for r in rows:
        png = plot_curves(r, out / "curves" / f"{_slug(r.label)}.png")
        if png is not None:
            plots[r.label] = png
    write_csv(rows, out / "results.csv")
    failed = [run for run in runs if not run.ok]
    text = [
        f"# {title or 'metalearn report'}",
        "",
        f"{len(runs)} run(s) under `{root}`, {len(rows)} configuration(s), {len(failed)} failed.",
        "ours: mean over seeds of the test mean, ± 95% CI over all test tasks of all seeds "
        "pooled (within-seed task variance plus the spread of seed means); seed std: standard "
        "deviation of the per-seed means. Accuracy in %.",
        "",
        markdown_table(rows, plots, out),
    ]
    by_source = per_source_table(rows)
    if by_source:
        text += ["## Per source", "", by_source]
    if failed:
        text += ["## Failed runs", ""] + [f"- `{run.path}`: {run.error}" for run in failed] + [""]
    (out / "results.md").write_text("\n".join(text))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(
        prog="metalearn report",
        description="Aggregate the runs under DIR (a sweep dir or any dir of run dirs) into "
        "results.md, results.csv and learning-curve PNGs; one row per configuration, "
        "aggregated over seeds.",
    )
    parser.add_argument("dir", type=Path, help="folder to search for run dirs (.hydra/config.yaml)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: DIR/report)")
    parser.add_argument(
        "--sort",
        choices=("metric", "name", "diff"),
        default="metric",
        help="metric: best first (accuracy descending, mse ascending); name; "
        "diff: largest gap to the paper first",
    )
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        print(f"metalearn: error: report: no such directory: {args.dir}", file=sys.stderr)
        return 2
    if not find_runs(args.dir):  # checked first, so nothing is written for a wrong folder
        print(f"metalearn: error: no run dirs (.hydra/config.yaml) under {args.dir}", file=sys.stderr)
        return 2
    out = args.out or args.dir / "report"
    try:
        check_writable("--out", out)
    except ConfigError as err:
        print(f"metalearn: error: report: {err}", file=sys.stderr)
        return 2
    write_report(args.dir, out, args.sort)
    print((out / "results.md").read_text())
    print(f"report written to {out}")
    return 0
