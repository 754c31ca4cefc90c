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
from pathlib import Path

USAGE = """usage: metalearn <command> [overrides] [hydra flags]

commands:
  train   meta-train and evaluate (config: conf/config.yaml)
  eval    evaluate a finished run: metalearn eval run_dir=<run dir> [overrides]

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


def _fail(message: str) -> None:
    print(f"metalearn: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _single_run_overrides(overrides: list[str]) -> list[str]:
    """For a sweep, the overrides of its first job (each swept key at its first value)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    single = []
    for override in parsed:
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            single.append(f"{override.get_key_element()}={first}")
        else:
            single.append(override.input_line)
    return single


def precheck(config_name: str, overrides: list[str], multirun: bool) -> None:
    """Compose the config as Hydra will and validate it; exit 2 with one line on error."""
    from hydra import compose, initialize_config_dir

    from metalearn.config import validate
    from metalearn.errors import MetalearnError

    overrides = [o for o in overrides if not o.startswith("hydra.") and not o.startswith("hydra/")]
    try:
        single = _single_run_overrides(overrides) if multirun else overrides
        with initialize_config_dir(config_dir=config_dir(), version_base=None):
            cfg = compose(config_name=config_name, overrides=single)
    except Exception as err:  # Hydra/OmegaConf composition errors are multi-line
        cause = err.__cause__ or err.__context__
        detail = f" ({_first_line(cause)})" if cause is not None else ""
        _fail(f"{_first_line(err)}{detail}")
        return
    if config_name == "eval":
        if cfg.run_dir is None:
            _fail("run_dir is required: metalearn eval run_dir=<a metalearn train run dir>")
        run_config = Path(cfg.run_dir) / ".hydra" / "config.yaml"
        if not run_config.is_file():
            _fail(f"invalid run_dir={cfg.run_dir!r}: no {run_config} (not a `metalearn train` run dir)")
        return
    try:
        validate(cfg)
    except MetalearnError as err:
        _fail(str(err))


def _run_guarded(fn, cfg) -> None:
    """Run a command; a MetalearnError becomes one line on stderr and exit code 2."""
    from hydra.core.hydra_config import HydraConfig

    from metalearn.errors import MetalearnError

    try:
        fn(cfg)
    except MetalearnError as err:
        if HydraConfig.get().mode.name == "MULTIRUN":
            # Keep the sweep going; record the failure in the job dir for reports.
            out = Path(HydraConfig.get().runtime.output_dir)
            (out / "error.txt").write_text(str(err) + "\n")
            print(f"metalearn: error: {err}", file=sys.stderr, flush=True)
            raise
        _fail(str(err))


def _train_command(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from metalearn.train import train

    train(cfg, HydraConfig.get().runtime.output_dir)


def _eval_command(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from metalearn.config import Config
    from metalearn.errors import ConfigError
    from metalearn.evaluate import evaluate

    run_dir = Path(cfg.run_dir)
    stored = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(run_dir / ".hydra" / "config.yaml"))
    OmegaConf.set_struct(stored, True)
    for override in OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task)):
        key = override.get_key_element()
        if key == "run_dir":
            continue
        if key == "attack":
            # The attack is not part of the trained run, so its group may be chosen here:
            # take the composed group (with any attack.* overrides already applied).
            stored.attack = cfg.attack
            continue
        if "." not in key:
            raise ConfigError(
                f"cannot change config group {key!r} in eval: the run's own config is used; "
                "override single keys (e.g. algo.inner_steps_test=10)"
            )
        OmegaConf.update(stored, key, override.value(), merge=True)
    stored.run_dir = str(run_dir)
    evaluate(stored, HydraConfig.get().runtime.output_dir)


def _hydra_entry(config_name: str, command):
    import hydra

    from metalearn.config import register_configs

    register_configs()

    @hydra.main(config_path=config_dir(), config_name=config_name, version_base=None)
    def entry(cfg) -> None:
        # Hydra sets the root logger to INFO; JAX's backend probing is noise at that level.
        logging.getLogger("jax").setLevel(logging.WARNING)
        logging.getLogger("absl").setLevel(logging.WARNING)
        _run_guarded(command, cfg)

    return entry


COMMANDS = {"train": ("config", _train_command), "eval": ("eval", _eval_command)}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        _fail(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    config_name, fn = COMMANDS[command]
    # Quieter TF/absl logs from tensorflow-datasets; JAX on CPU unless told otherwise.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from metalearn.config import register_configs

    register_configs()
    flags = {a.split("=")[0] for a in rest if a.startswith("-")}
    if not flags & _HYDRA_INFO_FLAGS:
        multirun = bool(flags & {"-m", "--multirun"})
        precheck(config_name, [a for a in rest if not a.startswith("-")], multirun)
    sys.argv = [f"metalearn {command}", *rest]
    _hydra_entry(config_name, fn)()


if __name__ == "__main__":
    main()
