"""`metalearn train`'s loop: open the run (checks, run dir, resume), run the compiled
meta-steps in blocks with logging, validation, checkpoints and stop signals, then evaluate
and write results.json.

The pieces live in modules of their own: the compiled step in metalearn/step.py, host-side
episode gathering in metalearn/prefetch.py, evaluation in metalearn/evaluation.py, block
sizing and stop signals in metalearn/loop_control.py.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
from jax.sharding import Mesh

from metalearn.algos import test_steps
from metalearn.backbone import init_from_of, initial_params
from metalearn.checkpoint import CheckpointWriter, has_checkpoint, restore_latest
from metalearn.config import validate
from metalearn.distributed import is_main_process, maybe_initialize, shared_run_dir
from metalearn.errors import ConfigError, MetalearnError
from metalearn.evaluation import evaluate_params, final_line, final_results, make_evaluator
from metalearn.loop_control import BlockLengths, Preempted, StopSignals, any_process_signalled
from metalearn.metrics import format_summary, write_json
from metalearn.prefetch import HostPrefetcher
from metalearn.preprocess import record_run
from metalearn.protocol import describe_protocol, protocol_of
from metalearn.rundir import commit_record
from metalearn.runlog import RunLog
from metalearn.selection import (
    Validation,
    check_training,
    members_of,
    needs_validation_checkpoints,
    protected_steps,
    rank_by,
    read_validations,
    select_checkpoints,
    stop_early,
    validation_loss_wanted,
    with_retrain_budget,
)
from metalearn.step import (
    Experiment,
    TrainState,
    check_meta_batch,
    init_state,
    make_meta_block,
    replicate,
    setup,
    task_mesh,
)

__all__ = ["OpenRun", "Preempted", "TrainingError", "finish_run", "open_run", "train", "train_loop"]


class TrainingError(MetalearnError):
    """Training cannot continue (e.g. a non-finite loss)."""


class OpenRun(NamedTuple):
    """A run ready for its loop (:func:`open_run`): the composed config, its run directory,
    the experiment, the device mesh, the state to continue from (step 0, or the restored
    checkpoint; replicated over ``mesh``), whether this process is the one that writes
    files and prints, and the multi-process note."""

    cfg: Any
    run_dir: Path
    exp: Experiment
    mesh: Mesh
    state: TrainState
    main: bool
    process_note: str
    # Where every record goes: metrics.jsonl and the chosen trackers (metalearn/runlog.py).
    log: Any = None

    def say(self, *args: Any, **kwargs: Any) -> None:
        """print, on the main process only."""
        if self.main:
            print(*args, **kwargs)


def open_run(cfg: Any, run_dir: str | Path) -> OpenRun:
    """Check the config and the run directory, create it, build the experiment, and with
    ``trainer.resume`` restore the newest usable checkpoint (metrics of later steps dropped).

    Bad input (ConfigError) is raised before anything is written.
    """
    cfg = with_retrain_budget(cfg)
    validate(cfg)
    check_training(cfg)
    t = cfg.trainer
    # Multi-process hook (metalearn.distributed): join the job before any device use; all
    # processes share process 0's run dir, and only process 0 writes files and prints.
    process_note = maybe_initialize(t.distributed)
    main = is_main_process()
    run_dir = shared_run_dir(run_dir)
    mesh = task_mesh()
    check_meta_batch(t.meta_batch_size, mesh)  # before anything is written
    run_dir = Path(run_dir)
    if not t.resume and has_checkpoint(run_dir):
        raise ConfigError(
            f"{run_dir} already holds checkpoints: add trainer.resume=true to continue that run, "
            "or choose another hydra.run.dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    exp = setup(cfg)
    state = init_state(exp, cfg.seed, mesh)
    if init_from_of(cfg.model) is not None and not has_checkpoint(run_dir):
        # model.init_from: another run's backbone, bit for bit (metalearn/backbone.py);
        # the optimizer and algorithm state start afresh from those parameters.
        params, source = initial_params(state.params, cfg)
        state = state._replace(
            params=params, opt_state=exp.optimizer.init(params), algo_state=exp.algo.init_state(params)
        )
        if main:  # the source run, recorded in the new run
            write_json(run_dir / "init_from.json", source)
    run = OpenRun(cfg, run_dir, exp, mesh, state, main, process_note)
    if t.resume:
        restored = restore_latest(run_dir, state, quarantine=True)
        state = restored if restored is not None else state
        if int(state.step) > t.steps:
            raise ConfigError(
                f"invalid trainer.steps={t.steps}: the checkpoint in {run_dir} is at step {int(state.step)}"
            )
        if main:  # multi-process hook
            _truncate_metrics(run_dir / "metrics.jsonl", int(state.step))
        run.say(
            f"metalearn: resuming {run_dir} from step {int(state.step)}"
            if restored is not None
            else f"metalearn: no checkpoint in {run_dir}; starting at step 0",
            flush=True,
        )
    if main:  # the run's .hydra/ record (metalearn.rundir, set by the CLI), now that it is checked
        commit_record(run_dir)
    # metrics.jsonl and the trackers of cfg.logger (a resumed run reopens its tracker runs).
    run = run._replace(log=RunLog(run_dir, cfg, writes=main))
    # Restored arrays follow the template's sharding; put them in place anyway, at no cost.
    return run._replace(state=replicate(state, mesh))


def train(cfg: Any, run_dir: str | Path, resume_command: str | None = None) -> dict[str, Any]:
    """Meta-train as configured; write metrics.jsonl, checkpoints and results.json to run_dir.

    With ``trainer.resume`` training continues from the newest usable checkpoint in run_dir
    (metrics of later steps are dropped and logged again). SIGTERM/SIGINT checkpoint the
    current step and raise :class:`Preempted`, whose message ends with ``resume_command``.
    Returns the results dict (also saved as results.json).
    """
    run = open_run(cfg, run_dir)
    resume_command = resume_command or f"metalearn train ... trainer.resume=true hydra.run.dir={run.run_dir}"
    try:
        state, timings = train_loop(run, resume_command)
        return finish_run(run, state, timings)
    except BaseException as err:  # the tracker runs are closed as stopped (resume reopens them)
        run.log.end("KILLED" if isinstance(err, Preempted | KeyboardInterrupt) else "FAILED")
        raise


def train_loop(run: OpenRun, resume_command: str) -> tuple[TrainState, dict[str, Any]]:
    """Meta-steps from ``run.state`` to ``trainer.steps``, in blocks of steps per compiled
    call (:class:`BlockLengths`): train metrics logged every ``log_every`` steps to
    metrics.jsonl, validation every ``val_every``, a checkpoint every ``checkpoint_every``
    and at the end (with eval.checkpoint=best/top_k also at every validation step, the best
    by validation kept: metalearn/selection.py). ``trainer.early_stop_patience`` ends the
    loop early once the validation loss stops improving. Returns the final state and the
    timings for results.json (``train_time_s``, ``compile_time_s``).

    A non-finite loss or gradient norm at a logged or checkpointed step raises
    :class:`TrainingError` (``trainer.on_nan=skip``: counted instead). A first
    SIGTERM/SIGINT ends the current block, checkpoints it and raises :class:`Preempted`,
    whose message ends with ``resume_command``.
    """
    from tqdm.auto import tqdm

    cfg, exp, mesh, state, run_dir = run.cfg, run.exp, run.mesh, run.state, run.run_dir
    t = cfg.trainer
    start_step = int(state.step)
    skip = t.on_nan == "skip"
    multi_process = jax.process_count() > 1
    blocks = BlockLengths(t, host=exp.source.host is not None, multi_process=multi_process)
    meta_block = make_meta_block(exp, t.meta_batch_size, skip, mesh, blocks.max_steps)
    # Built once, so validation compiles once.
    validator = (
        make_evaluator(
            exp,
            t.val_tasks,
            cfg.eval.batch_size,
            test_steps(cfg.algo),
            split="validation",
            k_query=getattr(cfg.eval, "k_query", None),
            with_loss=validation_loss_wanted(cfg),
        )
        if t.val_every
        else None
    )
    if exp.source.host is None:
        # On every device once, instead of a host-to-device copy per step.
        train_data = replicate(exp.source.splits["train"], mesh)
        batches = None
    else:
        batches = HostPrefetcher(
            exp.source, state.key, t.meta_batch_size, mesh, start_step, t.steps, cfg.dataset.prefetch
        )
    # metrics.jsonl (TensorBoard too if trainer.tensorboard) and the trackers (cfg.logger).
    logger = run.log if run.log is not None else RunLog(run_dir, cfg, writes=run.main)
    _announce(run)
    # eval.checkpoint=best/top_k: every validation step is checkpointed, and retention keeps
    # the best by validation so far besides the newest keep_checkpoints (metalearn/selection.py).
    selecting = needs_validation_checkpoints(cfg)
    metric = exp.source.metric_name
    watching = selecting or bool(getattr(t, "early_stop_patience", 0))
    validations = read_validations(run_dir, metric, up_to=start_step) if watching else []
    protected = (
        (lambda: protected_steps(validations, metric, members_of(cfg), rank_by(cfg))) if selecting else None
    )
    patience = getattr(t, "early_stop_patience", 0)
    writer = CheckpointWriter(run_dir, t.keep_checkpoints, protected)
    bar = tqdm(
        total=t.steps,
        initial=start_step,
        disable=not (t.progress and run.main),
        unit="step",
        dynamic_ncols=True,
    )
    start = last_time = time.perf_counter()
    last_step, compile_s = start_step, None
    step = start_step
    try:
        with StopSignals() as stop:
            while step < t.steps:
                # A block of n meta-steps in one call; the host acts only at its last step.
                n = blocks.length(step)
                began = time.perf_counter()
                state, history = meta_block(state, train_data if batches is None else next(batches), n)
                step += n
                if compile_s is None:
                    jax.block_until_ready(history)
                    compile_s = time.perf_counter() - start
                    last_time, last_step = time.perf_counter(), step
                elif blocks.timed:
                    jax.block_until_ready(history)
                    blocks.observe(n, time.perf_counter() - began)
                log_due = step % t.log_every == 0 or step == t.steps
                stopping = stop.signum is not None
                if multi_process:
                    # Every process must stop at the same step (the checkpoint save is
                    # collective), so a signal is acted on at the next log step, once the
                    # processes have agreed that one of them received it.
                    stopping = log_due and any_process_signalled(stop)
                validation_due = bool(t.val_every) and step % t.val_every == 0
                checkpoint_due = (
                    stopping
                    or (bool(t.checkpoint_every) and step % t.checkpoint_every == 0)
                    or (selecting and validation_due)
                )
                if log_due or checkpoint_due:
                    # The only host sync between logs. Every checkpoint follows this check
                    # of its own step, so a non-finite state never reaches disk.
                    values = _floats(history, n - 1)
                    if skip:
                        values["skipped_steps"] = int(state.skipped)
                    else:
                        _check_finite(values, step, run_dir)
                if log_due:
                    now = time.perf_counter()
                    rate = (step - last_step) / (now - last_time) if step > last_step else float("nan")
                    last_time, last_step = now, step
                    _log_train(run, logger, bar, step, values, rate, now - start)
                if validation_due:
                    val = _validate(run, validator, state, step, logger, bar, start)
                    validations.append(Validation(step, val["mean"], val.get("loss")))
                    if stop_early(validations, patience):
                        # Checkpointed by the final save below; then the final evaluation.
                        run.say(
                            f"metalearn: stopping early at step {step}: the validation loss has not "
                            f"improved for more than trainer.early_stop_patience={patience} validations",
                            flush=True,
                        )
                        bar.update(n)
                        break
                if checkpoint_due:
                    writer.save(state)
                if stopping:
                    bar.close()
                    name = signal.Signals(stop.signum).name
                    raise Preempted(
                        f"{name} at step {step}: checkpoint saved in {run_dir / 'checkpoints'}; "
                        f"resume with: {resume_command}",
                        stop.signum,
                    )
                bar.update(n)
        bar.close()
        jax.block_until_ready(state)
        train_time = time.perf_counter() - start
        writer.save(state)
    finally:
        writer.close()
        if batches is not None:
            batches.close()
    return state, {"train_time_s": train_time, "compile_time_s": compile_s}


def finish_run(run: OpenRun, state: TrainState, timings: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the final ``state``, or the checkpoints eval.checkpoint chooses
    (:func:`final_results`), write results.json and print the result line; returns the
    results."""
    cfg = run.cfg
    selection = select_checkpoints(cfg, run.run_dir, state, run.exp.source.metric_name)
    results = final_results(run.exp, state, cfg, int(state.step), timings, selection)
    if run.main:  # multi-process hook
        write_json(run.run_dir / "results.json", results)
    run.say(final_line(results, cfg, run.run_dir / "results.json"), flush=True)
    if run.log is not None:
        run.log.finish(results, run.say)
    return results


def _announce(run: OpenRun) -> None:
    """The run's opening lines (main process), and its preprocessing record in the run dir:
    what predict and cross-domain eval will do to new data (metalearn/preprocess.py)."""
    cfg, source, t = run.cfg, run.exp.source, run.cfg.trainer
    run.say(
        f"metalearn: {cfg.algo.name} on {cfg.dataset.name} ({source.kind}, input "
        f"{source.input_shape}, {source.output_dim} outputs), {t.steps} steps x "
        f"{t.meta_batch_size} tasks, devices: {jax.devices()}; run dir {run.run_dir}",
        flush=True,
    )
    run.say(f"metalearn: protocol: {describe_protocol(protocol_of(cfg))}", flush=True)
    if jax.process_count() > 1:
        run.say(f"metalearn: {run.process_note}", flush=True)
    if source.placement_note:
        run.say(f"metalearn: episodes {source.placement_note}", flush=True)
    if run.main:
        run.say(record_run(run.run_dir, cfg, source), flush=True)


def _log_train(
    run: OpenRun, logger: Any, bar: Any, step: int, values: dict[str, float], rate: float, elapsed: float
) -> None:
    """The train record of ``step`` in metrics.jsonl, and the progress bar's figures."""
    metric = run.exp.source.metric_name
    logger.log({"step": step, "split": "train", **values, "steps_per_s": rate, "time_s": elapsed})
    bar.set_postfix(
        {"loss": f"{values['loss']:.4f}", metric: f"{values[metric]:.4f}", "steps/s": f"{rate:.1f}"},
        refresh=False,
    )


def _validate(
    run: OpenRun, validator: Any, state: TrainState, step: int, logger: Any, bar: Any, start: float
) -> dict[str, Any]:
    """Evaluate ``state`` on ``trainer.val_tasks`` validation tasks, log the summary and
    return it."""
    cfg, metric = run.cfg, run.exp.source.metric_name
    t = cfg.trainer
    val = evaluate_params(
        run.exp,
        state.params,
        cfg,
        "validation",
        t.val_tasks,
        test_steps(cfg.algo),
        state.algo_state,
        evaluator=validator,
    )
    logger.log(
        {
            "step": step,
            "split": "validation",
            metric: val["mean"],
            "ci95": val["ci95"],
            "n_tasks": val["n_tasks"],
            **({"loss": val["loss"]} if "loss" in val else {}),
            # dataset=multi: each source's validation metric beside their mean.
            **{f"{metric}/{label}": s["mean"] for label, s in val.get("sources", {}).items()},
            "time_s": time.perf_counter() - start,
        }
    )
    if run.main:
        bar.write(f"step {step}: validation {format_summary(val)}")
    return val


def _check_finite(values: dict[str, float], step: int, run_dir: Path) -> None:
    if not all(math.isfinite(v) for v in values.values()):
        bad = ", ".join(f"{k}={v}" for k, v in values.items() if not math.isfinite(v))
        raise TrainingError(
            f"non-finite values at step {step} ({bad}); stopped without overwriting the last "
            f"checkpoint in {run_dir} (try a lower algo.inner_lr or optim.lr, optim.clip_norm, "
            "or trainer.on_nan=skip)"
        )


def _floats(history: dict[str, jax.Array], row: int) -> dict[str, float]:
    """Row ``row`` (a step of the block) of a block's stacked metrics, as Python floats."""
    return {k: float(v[row]) for k, v in jax.device_get(history).items()}


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records of steps <= ``step`` (resume logs the later ones again).

    Rewritten atomically; a line cut short by a kill is dropped.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write("".join(kept))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
