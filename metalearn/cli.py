"""`metalearn <command> [hydra overrides]`: a thin dispatcher in front of Hydra.

The subcommand is popped from argv and the rest is handed to a ``@hydra.main`` function,
so Hydra's own flags (``-m``, ``--cfg job``, ``--help``) work unchanged. Before Hydra
creates a run dir, the overrides are composed and validated once, so a misspelt key or a
bad value is a one-line error with exit code 2 and nothing is written.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from metalearn.overrides import (
    as_group_choices,
    override_key,
    override_value,
    user_overrides,
    with_run_choices,
    with_stored_overrides,
)

USAGE = """usage: metalearn <command> [overrides] [hydra flags]

commands:
  train      meta-train and evaluate (config: conf/config.yaml)
  eval       evaluate a finished run: metalearn eval run_dir=<run dir> [dataset=<other dataset>] [overrides]
  predict    adapt a run to labelled examples and classify files:
             metalearn predict run_dir=<run dir> support=<class folders> query=<folder or files>
  reproduce  run a suite of experiment presets over seeds, then report (metalearn reproduce --help)
  report     aggregate a sweep dir (or any dir of runs) into a table and plots: metalearn report DIR

`metalearn <command> --help` lists the config groups and options.
"""

_HYDRA_INFO_FLAGS = {
    "--help",
    "-h",
    "--hydra-help",
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--version",
    "--shell-completion",
    "-sc",
}


def config_dir() -> str:
    """conf/ packaged inside the wheel (metalearn/conf), else the repository's conf/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"metalearn config directory not found near {here}")


def _end_progress_bars() -> None:
    """Close the progress bars an error left open: a bar ends its line, so the error that
    follows starts a line of its own instead of being appended to the bar."""
    std = sys.modules.get("tqdm.std")
    if std is None:
        return
    classes, bars = [std.tqdm], set()
    while classes:  # tqdm keeps the live bars per class (tqdm.auto's is a subclass)
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        bars.update(cls.__dict__.get("_instances", ()))
    for bar in bars:
        bar.close()


def _fail(message: str, code: int = 2) -> None:
    _end_progress_bars()
    print(f"metalearn: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# Set by precheck/_run_guarded (same process as the Hydra jobs): a run dir that did not exist
# before this command (removed again if its job fails before checkpointing), and the
# failed/total jobs of a multirun sweep.
_STATE: dict = {"fresh_run_dir": True, "failed_jobs": [], "jobs": 0}


def _check_writable(key: str, target: str) -> None:
    """Exit 2 unless ``target`` (a dir to be created) can be created or written to."""
    from metalearn.errors import MetalearnError
    from metalearn.rundir import check_writable

    try:
        check_writable(key, target)
    except MetalearnError as err:
        _fail(str(err))


def _path_override(key: str, path: str) -> str:
    """``key=path`` for Hydra's override parser, quoted where the path has characters its
    grammar reads as syntax (spaces, commas, brackets, quotes)."""
    import re

    if re.fullmatch(r"[\w./:@+~-]+", path):
        return f"{key}={path}"
    return f"{key}='" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _check_sweep(config_name: str, overrides: list[str]) -> None:
    """Every job of a sweep validated before the first starts (metalearn.sweeps); exit 2 with
    one line listing each refused combination."""
    from metalearn.sweeps import refused_jobs

    refused, total = refused_jobs(config_dir(), config_name, overrides)
    if refused:
        _fail(f"{len(refused)} of {total} sweep jobs refused, none started: " + "; ".join(refused))


def precheck(config_name: str, overrides: list[str], multirun: bool) -> str | None:
    """Compose the config as Hydra will and validate it; exit 2 with one line on error.

    Then take the run dir (metalearn.rundir): checked, created if new, and locked, all before
    Hydra writes anything. Returns the run dir Hydra must use (a folder made unique here when
    the config's default would be used), or None to leave Hydra's setting alone (sweeps).
    """
    from hydra import compose, initialize_config_dir

    from metalearn.config import validate
    from metalearn.errors import MetalearnError
    from metalearn.sweeps import sweep_jobs

    overrides_all = overrides
    overrides = [o for o in overrides if not o.startswith("hydra.") and not o.startswith("hydra/")]
    try:
        if multirun and config_name == "config":  # eval/predict sweeps: judged by their first job
            _check_sweep(config_name, overrides)
        single = sweep_jobs(overrides)[0][1] if multirun else overrides
        with initialize_config_dir(config_dir=config_dir(), version_base=None):
            cfg = compose(config_name=config_name, overrides=single)
            default_dir = compose(config_name=config_name, overrides=single, return_hydra_config=True)
            default_dir = str(default_dir.hydra.run.dir)
    except Exception as err:  # Hydra/OmegaConf composition errors are multi-line
        from metalearn.config import composition_error

        def chosen(group: str, key: str) -> str | None:
            """The group's choice, from the config composed without the offending key."""
            rest = [o for o in single if override_key(o) != f"{group}.{key}"]
            try:
                with initialize_config_dir(config_dir=config_dir(), version_base=None):
                    return str(compose(config_name=config_name, overrides=rest)[group].name)
            except Exception:
                return None

        _fail(composition_error(err, chosen))
        return None
    if config_name in ("eval", "predict"):
        return _precheck_reader(config_name, single, overrides_all, cfg, default_dir, multirun)
    try:
        validate(cfg)
    except MetalearnError as err:
        _fail(str(err))
    if multirun:  # the trackers' stores made once here, not by parallel jobs at the same time
        from metalearn.trackers import prepare_stores

        prepare_stores(cfg)
    return _precheck_output(overrides_all, cfg, multirun, default_dir)


def _precheck_reader(
    config_name: str, overrides, overrides_all, cfg, default_dir: str, multirun: bool
) -> str | None:
    """eval/predict: the run dir is shared-locked and its files checked; the output folder
    (``<run_dir>/<command>/<time>``, suffixed if taken) is created last, when all has passed."""
    from metalearn.checkpoint import CHECKPOINT_DIR, has_checkpoint
    from metalearn.errors import MetalearnError
    from metalearn.run_config import check_predict_paths, resolve
    from metalearn.rundir import load_run_config, lock_run_dir, unique_dir

    if cfg.run_dir is None or not str(cfg.run_dir).strip():
        _fail(f"run_dir is required: metalearn {config_name} run_dir=<a metalearn train run dir>")
    run_dir = Path(cfg.run_dir)
    target = override_value(overrides_all, "hydra.run.dir")
    try:
        load_run_config(run_dir)  # a run dir at all, its config readable: before the lock file
        _check_writable("hydra.run.dir", target if target is not None else str(run_dir / config_name))
        lock_run_dir(run_dir, exclusive=False, key="run_dir")
        if not has_checkpoint(run_dir):
            _fail(
                f"invalid run_dir={cfg.run_dir}: no checkpoint in {run_dir / CHECKPOINT_DIR} (the run "
                "has not saved one yet, or it was removed): resume or repeat its training first"
            )
        if config_name == "predict":
            check_predict_paths(cfg)
        resolve(cfg.run_dir, user_overrides(overrides), cfg, config_name)
    except MetalearnError as err:
        _fail(str(err))
    if target is not None or multirun:  # a sweep's job dirs are Hydra's (hydra.sweep.dir)
        return None
    return str(unique_dir(default_dir))


def _precheck_output(overrides: list[str], cfg, multirun: bool, default_dir: str) -> str | None:
    """The run (or sweep) dir must be creatable. A single run's dir is then created if new
    and locked (exclusive), and refused if it holds an earlier run's files and trainer.resume
    is not set: a fresh run never overwrites another."""
    from metalearn.errors import MetalearnError
    from metalearn.rundir import lock_run_dir, run_files, unique_dir

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    target = override_value(overrides, key)
    if target is not None and not target.strip().strip("'\""):
        _fail(f"invalid {key}='': empty (give a folder, or leave it out for a new one under outputs/)")
    _check_writable(key, target if target is not None else "outputs")
    if multirun:
        return None
    from metalearn.distributed import secondary_process

    if secondary_process(str(cfg.trainer.distributed)):
        return None  # process 0 of a multi-process job alone checks, locks and writes the run dir
    given = target is not None
    if not given:  # the config's default, made unique: same-second runs get two dirs
        target = str(unique_dir(default_dir))
    run_dir = Path(target)
    _STATE["fresh_run_dir"] = not given or not run_dir.exists()  # removed again if its job fails
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_run_dir(run_dir, exclusive=True, key=key)
    except MetalearnError as err:
        _fail(str(err))
    except OSError as err:
        _fail(f"invalid {key}={target}: cannot create or lock it ({err.strerror})")
    found = run_files(run_dir)
    if not cfg.trainer.resume and found:
        _fail(
            f"{key}={target} already holds a run ({', '.join(found)}): add trainer.resume=true to "
            "continue it, or choose another dir"
        )
    return None if given else target


def _remove_failed_output(out: Path, command) -> None:
    """Remove the dir Hydra created for a job that failed before producing anything, so a
    failed command leaves the disk as it was (an existing run dir is never removed)."""
    import shutil

    from metalearn.checkpoint import has_checkpoint

    if (out / "results.json").exists() or has_checkpoint(out):
        return
    if command in (_eval_command, _predict_command):  # <run_dir>/eval|predict/<time>/ is always new
        shutil.rmtree(out, ignore_errors=True)
        if out.parent.name in ("eval", "predict") and not any(out.parent.iterdir()):
            out.parent.rmdir()
    elif _STATE["fresh_run_dir"]:
        shutil.rmtree(out, ignore_errors=True)


def _out_of_memory(err: Exception, command) -> Exception:
    """A one-line MetalearnError for an accelerator/host allocation failure, naming the
    settings that set the memory of the meta-step and of evaluation."""
    from metalearn.errors import MetalearnError

    first = next((line for line in str(err).splitlines() if "RESOURCE_EXHAUSTED" in line), "")
    detail = first.split("RESOURCE_EXHAUSTED:", 1)[-1].strip()
    hint = (
        "lower eval.batch_size (tasks evaluated in parallel)"
        if command is not _train_command
        else "lower trainer.meta_batch_size, eval.batch_size (tasks evaluated in parallel) "
        "or set algo.remat=true"
    )
    return MetalearnError(f"out of memory ({detail}): {hint}; checkpoints already written are kept")


def _run_guarded(fn, cfg) -> float | None:
    """Run a command; a MetalearnError becomes one line on stderr and its exit code (2;
    128 + signal for a pre-empted training run).

    In a multirun sweep a failing job does not stop the others: its message goes to
    ``error.txt`` in its job dir and stderr, and :func:`main` exits 2 after the sweep.
    """
    from hydra.core.hydra_config import HydraConfig

    from metalearn.errors import MetalearnError
    from metalearn.train import Preempted

    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    out = Path(HydraConfig.get().runtime.output_dir)
    _STATE["jobs"] += 1
    try:
        try:
            # A train job's return value is its test metric: the objective a Hydra sweeper
            # such as Optuna minimises or maximises (the basic sweeper ignores it).
            return fn(cfg)
        except Exception as err:
            if "RESOURCE_EXHAUSTED" not in str(err):
                raise
            raise _out_of_memory(err, fn) from err
    except Preempted as err:
        from metalearn.launchers import requeue

        requeue(out)  # under submitit: requeued and resumed later (does not return)
        _fail(str(err), err.exit_code)  # also ends a sweep: the machine is going away
    except MetalearnError as err:
        if multirun:
            (out / "error.txt").write_text(str(err) + "\n")
            print(f"metalearn: error: {out.name}: {err}", file=sys.stderr, flush=True)
            _STATE["failed_jobs"].append(str(out))
            return
        _remove_failed_output(out, fn)
        _fail(str(err), err.exit_code)
    except Exception as err:
        if not multirun:
            # A bug: the traceback is what to report, but not the empty run dir it leaves.
            _remove_failed_output(out, fn)
            raise
        # An unexpected error in one job of a sweep: recorded like a MetalearnError (first
        # line, then the traceback for the bug report), and the other jobs still run.
        import traceback

        line = f"{type(err).__name__}: {_first_line(err)}"
        (out / "error.txt").write_text(line + "\n\n" + traceback.format_exc())
        print(f"metalearn: error: {out.name}: {line}", file=sys.stderr, flush=True)
        _STATE["failed_jobs"].append(str(out))


def _collect_failed_jobs(since: float) -> None:
    """The jobs of this sweep that a launcher ran in other processes and that failed: their
    error.txt (written by :func:`_run_guarded` in the job), newer than ``since``."""
    from metalearn.launchers import LAUNCHED

    if "sweep_dir" not in LAUNCHED:
        return
    jobs = [p.parent.parent for p in Path(LAUNCHED["sweep_dir"]).glob("*/.hydra/config.yaml")]
    jobs = [j for j in jobs if (j / ".hydra" / "config.yaml").stat().st_mtime >= since - 1]
    _STATE["jobs"] = len(jobs)
    for job in sorted(jobs):
        error = job / "error.txt"
        if error.is_file() and error.stat().st_mtime >= since - 1:
            _STATE["failed_jobs"].append(str(job))


def _train_command(cfg) -> float:
    import shlex

    from hydra.core.hydra_config import HydraConfig

    from metalearn.selection import with_retrain_budget
    from metalearn.train import train

    hc = HydraConfig.get()
    cfg = with_retrain_budget(cfg)  # before the run's record is written: it holds the steps
    if hc.output_subdir is None and hc.mode.name != "MULTIRUN":
        _defer_hydra_record(cfg, hc.runtime.output_dir)
    from metalearn.launchers import take_requeue_marker

    if take_requeue_marker(hc.runtime.output_dir):  # a submitit job requeued after its stop
        cfg.trainer.resume = True
    kept = [o for o in hc.overrides.task if override_key(o) != "trainer.resume"]
    resume = [*kept, "trainer.resume=true", f"hydra.run.dir={hc.runtime.output_dir}"]
    results = train(cfg, hc.runtime.output_dir, "metalearn train " + shlex.join(resume))
    return float(results["test"]["mean"])


def _defer_hydra_record(cfg, run_dir: str) -> None:
    """The .hydra/ files Hydra would have written at job start (main() turned that off),
    handed to metalearn.rundir to be written atomically once train() has checked the run."""
    import copy

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict, read_write

    from metalearn.rundir import defer_record

    hydra_cfg = copy.deepcopy(HydraConfig.instance().cfg)
    with read_write(hydra_cfg.hydra), open_dict(hydra_cfg.hydra):  # as if Hydra had written it
        hydra_cfg.hydra.output_subdir = ".hydra"
        hydra_cfg.hydra.overrides.hydra = [
            o for o in hydra_cfg.hydra.overrides.hydra if override_key(o) != "hydra.output_subdir"
        ]
    defer_record(
        run_dir,
        {
            ".hydra/config.yaml": OmegaConf.to_yaml(cfg),
            ".hydra/hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
            ".hydra/overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task),
        },
    )


def _eval_command(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from metalearn.evaluate import evaluate
    from metalearn.run_config import resolve

    hc = HydraConfig.get()
    run = resolve(cfg.run_dir, user_overrides(list(hc.overrides.task)), cfg, "eval")
    evaluate(run.cfg, hc.runtime.output_dir, run)


def _predict_command(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from metalearn.predict import run_predict
    from metalearn.run_config import resolve
    from metalearn.runlog import log_prediction

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    run_predict(resolve(cfg.run_dir, user_overrides(list(hc.overrides.task)), cfg, "predict"), out)
    # Also a file of the training run's tracker runs, if it has any (its trackers.json).
    files = [out / name for name in ("predictions.csv", "summary.json") if (out / name).is_file()]
    log_prediction(cfg.run_dir, files, f"predict/{out.name}")


def _register_resolvers() -> None:
    """``${metalearn_jobs:}``: jobs at once of hydra/launcher=joblib (metalearn/launchers.py).
    Registered when this module is imported, so the launcher's worker processes (which import
    it to run the pickled job function) resolve it too."""
    from omegaconf import OmegaConf

    from metalearn.launchers import parallel_jobs

    if not OmegaConf.has_resolver("metalearn_jobs"):
        OmegaConf.register_new_resolver("metalearn_jobs", parallel_jobs)


_register_resolvers()


def _hydra_entry(config_name: str, command):
    import hydra

    from metalearn.config import register_configs

    register_configs()

    @hydra.main(config_path=config_dir(), config_name=config_name, version_base=None)
    def entry(cfg) -> float | None:
        # Hydra sets the root logger to INFO; JAX's backend probing is noise at that level.
        logging.getLogger("jax").setLevel(logging.WARNING)
        logging.getLogger("absl").setLevel(logging.WARNING)
        return _run_guarded(command, cfg)

    return entry


def _reproduce_command(argv: list[str]) -> int:
    from metalearn.reproduce import main as reproduce_main

    return reproduce_main(argv)


def _report_command(argv: list[str]) -> int:
    from metalearn.report import main as report_main

    return report_main(argv)


# name -> (Hydra config name, function). A config name of None marks a plain argparse
# command that takes the raw argv and does not go through Hydra (reproduce and report
# drive or read `metalearn train` runs; they have no run dir of their own).
COMMANDS = {
    "train": ("config", _train_command),
    "eval": ("eval", _eval_command),
    "predict": ("predict", _predict_command),
    "reproduce": (None, _reproduce_command),
    "report": (None, _report_command),
}


def main(argv: list[str] | None = None) -> None:
    from metalearn.rundir import release_locks

    try:
        _main(argv)
    finally:  # a command run in-process (tests) must not keep its run dir locked
        release_locks()


def _main(argv: list[str] | None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        _fail(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    config_name, fn = COMMANDS[command]
    if config_name is None:
        sys.exit(fn(rest))
    # Quieter TF/absl logs from tensorflow-datasets; JAX on CPU unless told otherwise.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from metalearn.config import register_configs
    from metalearn.errors import MetalearnError

    register_configs()
    flags = {a.split("=")[0] for a in rest if a.startswith("-")}
    rest = as_group_choices(rest)
    try:
        rest = with_stored_overrides(rest) if command == "train" else with_run_choices(rest)
    except MetalearnError as err:
        _fail(str(err))
    if not flags & _HYDRA_INFO_FLAGS:
        multirun = bool(flags & {"-m", "--multirun"})
        run_dir = precheck(config_name, [a for a in rest if not a.startswith("-")], multirun)
        if run_dir is not None:
            rest = [a for a in rest if override_key(a) != "hydra.run.dir"] + [
                _path_override("hydra.run.dir", run_dir)
            ]
        if command == "train" and not multirun:
            # The run's record is written by _train_command once its checks have passed,
            # not by Hydra at job start (a refused resume must leave it as it was).
            rest = [*rest, "hydra.output_subdir=null"]
    sys.argv = [f"metalearn {command}", *rest]
    import warnings

    # conf/hydra/launcher/joblib.yaml replaces the plugin's config of that name on purpose
    # (Hydra validates it against the plugin's schema, and says so with a deprecation warning).
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/joblib' is validated against ConfigStore")
    started = time.time()
    _hydra_entry(config_name, fn)()
    if _STATE["jobs"] == 0:  # a multirun whose jobs ran in other processes (joblib, submitit)
        _collect_failed_jobs(started)
    failed = _STATE["failed_jobs"]
    if failed:
        _fail(f"{len(failed)} of {_STATE['jobs']} sweep jobs failed (see error.txt in {', '.join(failed)})")


if __name__ == "__main__":
    main()
