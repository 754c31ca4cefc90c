"""Which parameters are tested: ``eval.checkpoint``.

- ``last``: the final parameters (training's final state; `metalearn eval`: the newest
  checkpoint). What every run did before the key existed.
- ``best``: the checkpoint whose validation metric is best (highest accuracy, lowest mse).
- ``top_k``: the ``eval.top_k`` best checkpoints by validation, as an ensemble: each member
  adapts to every test task from its own parameters and algorithm state, and the metric is
  taken of the mean of the members' outputs (logits for classification, predictions for
  regression). That is MAML++'s test: its code ranks the epochs by validation accuracy, keeps
  the top 5 and averages their raw logits (the classifier's outputs, before any softmax) on
  each test task before the argmax (HowToTrainYourMAMLPytorch experiment_builder.py:247-290,
  called with top_n_models=5 at :371; the logits are ``target_preds`` of
  few_shot_learning_system.py:246).

The validation results come from metrics.jsonl (records of ``"split": "validation"``, each with
its step). Ties rank the later step first (as reversing an ascending sort does). With best or
top_k, training saves a checkpoint at every validation step and its retention keeps the top
``k`` by validation besides the newest ``trainer.keep_checkpoints``
(:class:`metalearn.checkpoint.CheckpointWriter`), so the chosen steps are on disk at the end.
Asking for best or top_k on a run without validation records, or whose retention did not
keep the chosen checkpoints, is a one-line DataError naming what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metalearn.checkpoint import CHECKPOINT_DIR, checkpoint_steps, restore_step
from metalearn.errors import ConfigError, DataError

RULES = ("last", "best", "top_k")


class Validation(NamedTuple):
    step: int
    value: float  # the validation metric's mean over trainer.val_tasks tasks
    loss: float | None = None  # their mean query loss, where recorded (validation_loss_wanted)


class Selection(NamedTuple):
    """The checkpoints ``eval.checkpoint`` chose, restored: ``params`` and ``algo_state`` of
    the one state (best), or of the K states stacked on a leading axis (top_k, ``ensemble``)."""

    rule: str
    steps: list[int]  # best first
    values: list[float]  # their validation metric, same order
    metric: str
    params: Any
    algo_state: Any
    ensemble: bool

    def record(self) -> dict[str, Any]:
        """results.json's ``checkpoints`` entry: the tested steps and their validation metric
        (or loss, when ranked by it)."""
        return {"rule": self.rule, "steps": self.steps, f"validation_{self.metric}": self.values}


def rule_of(cfg: Any) -> str:
    return getattr(cfg.eval, "checkpoint", "last")


def rank_by(cfg: Any) -> str:
    return getattr(cfg.eval, "rank_by", "metric")


def validation_loss_wanted(cfg: Any) -> bool:
    """True when validation must also record the query loss: early stopping watches it, or
    best/top_k rank by it. Otherwise validation is as it always was."""
    ranks_by_loss = rule_of(cfg) != "last" and rank_by(cfg) == "loss"
    return bool(getattr(cfg.trainer, "early_stop_patience", 0)) or ranks_by_loss


def members_of(cfg: Any) -> int:
    """How many checkpoints the rule tests: 1 (last, best) or eval.top_k (top_k)."""
    return int(cfg.eval.top_k) if rule_of(cfg) == "top_k" else 1


def needs_validation_checkpoints(cfg: Any) -> bool:
    """True when training must checkpoint its validation steps and keep the best of them."""
    return rule_of(cfg) != "last"


def check_training(cfg: Any) -> None:
    """ConfigError (one line) when best or top_k cannot be had from this training config."""
    rule, t = rule_of(cfg), cfg.trainer
    if rule == "last":
        return
    if not t.val_every:
        raise ConfigError(
            f"invalid trainer.val_every=0 with eval.checkpoint={rule}: checkpoints are ranked by "
            "validation, so the run must validate (trainer.val_every > 0), or use eval.checkpoint=last"
        )
    if t.steps < t.val_every:
        raise ConfigError(
            f"invalid trainer.val_every={t.val_every} with eval.checkpoint={rule}: no validation "
            f"happens in trainer.steps={t.steps} steps (use trainer.val_every <= trainer.steps)"
        )


def higher_is_better(metric: str) -> bool:
    return metric != "mse"


def ranked(validations: list[Validation], metric: str, k: int, by: str = "metric") -> list[Validation]:
    """The ``k`` best validations by ``by`` ("metric" or "loss", lower is better), best first
    (later step first among equals)."""
    if by == "loss":
        return sorted(validations, key=lambda v: (v.loss, -v.step))[:k]
    sign = -1.0 if higher_is_better(metric) else 1.0
    return sorted(validations, key=lambda v: (sign * v.value, -v.step))[:k]


def stop_early(validations: list[Validation], patience: int) -> bool:
    """True once the validation loss has not improved on its lowest value for more than
    ``patience`` validations in a row (ProtoNet's rule: wait > patience)."""
    if not patience:
        return False
    best, wait = float("inf"), 0
    for v in validations:
        if v.loss is not None and v.loss < best:
            best, wait = v.loss, 0
        else:
            wait += 1
    return wait > patience


def read_validations(run_dir: str | Path, metric: str, up_to: int | None = None) -> list[Validation]:
    """The validation records of ``run_dir/metrics.jsonl`` (steps <= ``up_to`` if given), one
    per step (a later line of the same step wins); a line cut short by a kill is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, tuple[float, float | None]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or record.get("split") != "validation" or metric not in record:
            continue
        step = int(record["step"])
        if up_to is None or step <= up_to:
            loss = record.get("loss")
            by_step[step] = (float(record[metric]), None if loss is None else float(loss))
    return [Validation(s, v, loss) for s, (v, loss) in sorted(by_step.items())]


def protected_steps(validations: list[Validation], metric: str, k: int, by: str = "metric") -> list[int]:
    """The steps retention must keep for a rule testing ``k`` checkpoints."""
    return [v.step for v in ranked(validations, metric, k, by)]


def select_checkpoints(cfg: Any, run_dir: str | Path, template: Any, metric: str) -> Selection | None:
    """The checkpoints of run_dir that ``eval.checkpoint`` tests, restored into ``template``'s
    shape; None for ``last`` (the caller tests its final or newest state). DataError (one
    line) when the run has no validation record or lacks a chosen checkpoint."""
    rule = rule_of(cfg)
    if rule == "last":
        return None
    run_dir = Path(run_dir)
    asked = f"eval.checkpoint={rule}" + (f" (eval.top_k={cfg.eval.top_k})" if rule == "top_k" else "")
    validations = read_validations(run_dir, metric)
    if not validations:
        raise DataError(
            f"{asked} ranks checkpoints by validation {metric}, but {run_dir / 'metrics.jsonl'} holds "
            "no validation record (trained with trainer.val_every=0, or stopped before its first "
            "validation): use eval.checkpoint=last"
        )
    by = rank_by(cfg)
    if by == "loss" and any(v.loss is None for v in validations):
        raise DataError(
            f"{asked} with eval.rank_by=loss needs the validation loss, which "
            f"{run_dir / 'metrics.jsonl'} does not record (the run was trained without eval.rank_by=loss "
            "or trainer.early_stop_patience): use eval.rank_by=metric"
        )
    chosen = ranked(validations, metric, members_of(cfg), by)
    if len(chosen) < members_of(cfg):  # as MAML++'s code, which takes what there is
        print(f"metalearn: {asked}: the run validated only {len(chosen)} times; testing those", flush=True)
    on_disk = set(checkpoint_steps(run_dir))
    missing = [v.step for v in chosen if v.step not in on_disk]
    if missing:
        held = ", ".join(str(s) for s in sorted(on_disk)) or "none"
        raise DataError(
            f"{asked} needs the checkpoints of validation step(s) {', '.join(map(str, missing))}, which "
            f"{run_dir / CHECKPOINT_DIR} does not hold (it holds steps {held}): retention keeps the newest "
            "trainer.keep_checkpoints, and the best by validation only as many as the eval.checkpoint "
            "and eval.top_k the run was trained with"
        )
    states = [restore_step(run_dir, template, v.step) for v in chosen]
    if rule == "top_k":
        params = jax.tree.map(lambda *xs: jnp.stack(xs), *[s.params for s in states])
        algo_state = jax.tree.map(lambda *xs: jnp.stack(xs), *[s.algo_state for s in states])
    else:
        params, algo_state = states[0].params, states[0].algo_state
    return Selection(
        rule,
        [v.step for v in chosen],
        [v.loss if by == "loss" else v.value for v in chosen],
        "loss" if by == "loss" else metric,
        params,
        algo_state,
        ensemble=rule == "top_k",
    )


def describe_rule(rule: str, top_k: int | None, by: str | None = None) -> str:
    """The rule's phrase in the final line, e.g. ``"top-5 checkpoints by validation, outputs averaged"``."""
    what = "validation loss" if by == "loss" else "validation"
    if rule == "best":
        return f"best checkpoint by {what}"
    if rule == "top_k":
        return f"top-{top_k} checkpoints by {what}, outputs averaged"
    return "last checkpoint"


def retrain_steps(run_dir: str | Path) -> tuple[int, int]:
    """``(steps, best_step)`` of ProtoNet's retraining on train+validation after a run
    ``run_dir`` trained with ``trainer.early_stop_patience``: the step of its lowest
    validation loss plus its patience in validations (jakesnell/prototypical-networks
    scripts/train/few_shot/trainval.py: ``best_epoch + patience`` epochs). DataError (one
    line) when the run has no validation loss to read."""
    from metalearn.rundir import load_run_config

    run_dir = Path(run_dir)
    source = load_run_config(run_dir, "trainer.steps_from")
    patience = int(source.trainer.get("early_stop_patience", 0) or 0)
    metric = "mse" if source.dataset.name == "sinusoid" else "accuracy"
    validations = [v for v in read_validations(run_dir, metric) if v.loss is not None]
    if not patience or not validations:
        raise DataError(
            f"invalid trainer.steps_from={run_dir}: that run was not trained with "
            "trainer.early_stop_patience (its validation records carry no loss to take the best step from)"
        )
    best = ranked(validations, metric, 1, by="loss")[0].step
    return best + patience * int(source.trainer.val_every), best


def with_retrain_budget(cfg: Any) -> Any:
    """``cfg`` with ``trainer.steps`` from ``trainer.steps_from`` (:func:`retrain_steps`) when
    that is set; unchanged otherwise. Idempotent."""
    source = getattr(cfg.trainer, "steps_from", None)
    if not source:
        return cfg
    from omegaconf import open_dict

    steps, best = retrain_steps(source)
    if cfg.trainer.steps != steps:
        print(
            f"metalearn: trainer.steps={steps} from {source} (its lowest validation loss at step {best}, "
            f"plus its early-stopping patience)",
            flush=True,
        )
    with open_dict(cfg):
        cfg.trainer.steps = steps
    return cfg
