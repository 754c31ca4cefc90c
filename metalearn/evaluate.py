"""`metalearn eval`: reload a training run and evaluate it on held-out tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metalearn.checkpoint import checkpoint_steps, load_checkpoint
from metalearn.config import validate
from metalearn.evaluation import final_line, final_results
from metalearn.metrics import write_json
from metalearn.selection import select_checkpoints
from metalearn.step import init_state, setup


def evaluate(cfg: Any, out_dir: str | Path, run: Any = None) -> dict[str, Any]:
    """Evaluate the checkpoint in ``cfg.run_dir`` with the (possibly overridden) config ``cfg``.

    Writes results.json (same format as training's) to ``out_dir`` and returns it. With
    ``cfg.attack`` set (``attack=fgsm``/``pgd``) it also holds ``test_robust`` and ``attack``.
    ``cfg.eval.checkpoint`` picks the parameters (the newest checkpoint, the best by
    validation, or the top-K ensemble: :mod:`metalearn.selection`).
    ``run`` (a :class:`metalearn.run_config.RunConfig`) marks a cross-domain evaluation: the
    test classes of ``cfg.dataset`` in the run's recorded input form; results.json then also
    holds ``train_dataset`` and ``cross_domain`` (both datasets, the preprocessing applied).
    """
    validate(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cross = None
    # The run's own BatchNorm mode decides whether its checkpoint holds running averages.
    trained_bn_stats = run.trained_bn_stats if run is not None else None
    if run is not None and run.cross_domain:
        from metalearn.crossdomain import cross_domain_source, dataset_summary

        if run.record_note:
            print(f"metalearn: {run.record_note}", flush=True)
        source, info = cross_domain_source(cfg, run.record)
        exp = setup(cfg, source, trained_bn_stats)
        cross = {
            "trained_on": dataset_summary(run.train_dataset),
            "evaluated_on": {**dataset_summary(cfg.dataset), **info},
            "preprocessing": run.record,
        }
    else:
        exp = setup(cfg, None, trained_bn_stats)
    template = init_state(exp, cfg.seed)
    # eval.checkpoint=best/top_k: the checkpoints chosen by validation (metalearn/selection.py).
    selection = select_checkpoints(cfg, Path(cfg.run_dir), template, exp.source.metric_name)
    if selection is None:
        state = load_checkpoint(Path(cfg.run_dir), template)
        steps = int(state.step)
    else:
        state, steps = None, max(checkpoint_steps(cfg.run_dir))
    results = final_results(exp, state, cfg, steps, {"run_dir": str(cfg.run_dir)}, selection)
    if cross is not None:
        results.update(train_dataset=run.train_dataset.name, cross_domain=cross)
    write_json(out_dir / "results.json", results)
    print(final_line(results, cfg, out_dir / "results.json"), flush=True)
    return results
