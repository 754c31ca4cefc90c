"""The command line's overrides, adjusted before Hydra composes them (metalearn/cli.py).

- resume: ``trainer.resume=true hydra.run.dir=DIR`` reuses DIR's stored overrides;
- ``algo.name=X`` (likewise dataset, model) is the group choice ``algo=X``;
- eval and predict compose against the run's own algorithm, model and dataset schemas.
"""

from __future__ import annotations

from pathlib import Path

from metalearn.errors import DataError

# The choices :func:`with_run_choices` added for the current command (eval, predict).
_ADDED: list[str] = []


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def override_value(overrides: list[str], key: str) -> str | None:
    values = [o.split("=", 1)[1] for o in overrides if "=" in o and override_key(o) == key]
    return values[-1] if values else None


def with_stored_overrides(rest: list[str]) -> list[str]:
    """For ``trainer.resume=true hydra.run.dir=DIR`` (not a sweep): DIR's original
    overrides (DIR/.hydra/overrides.yaml) come first, so the short form resumes the same
    config; overrides given now still win."""
    resume = override_value(rest, "trainer.resume") in ("true", "True")
    if not resume or "-m" in rest or "--multirun" in rest:
        return rest
    run_dir = override_value(rest, "hydra.run.dir")
    stored = Path(run_dir or "") / ".hydra" / "overrides.yaml"
    if run_dir is None or not stored.is_file():
        return rest
    from omegaconf import OmegaConf

    try:
        previous = [str(o) for o in OmegaConf.to_container(OmegaConf.load(stored))]
    except Exception as err:  # a damaged file: say which, don't guess the config
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"cannot read {stored} ({first}): repeat the run's overrides instead") from None
    given = {override_key(o) for o in rest if not o.startswith("-")}
    return [o for o in previous if override_key(o) not in given] + rest


def as_group_choices(rest: list[str]) -> list[str]:
    """``algo.name=X`` (likewise dataset, model) as the group choice ``algo=X``: the name picks
    the schema, so it is a choice of the group, as in the configs of earlier releases."""
    out = []
    for arg in rest:
        key = override_key(arg)
        group = key[: -len(".name")] if key.endswith(".name") else None
        if group in ("algo", "dataset", "model") and "=" in arg and not arg.startswith(("+", "~")):
            arg = f"{group}={arg.split('=', 1)[1]}"
        out.append(arg)
    return out


def with_run_choices(rest: list[str]) -> list[str]:
    """For ``eval`` and ``predict``: the run's algorithm, model and dataset (from its stored
    config) chosen first, so the command line's ``algo.*``, ``model.*`` and ``dataset.*`` keys
    compose against the run's own schemas; a ``dataset=`` given now still wins (cross-domain
    evaluation). The added choices are remembered so that :func:`user_overrides` can tell
    them from the user's. A missing or damaged stored config is left to precheck to report."""
    from omegaconf import OmegaConf

    run_dir = override_value(rest, "run_dir")
    stored = Path(run_dir or "") / ".hydra" / "config.yaml"
    try:
        config = OmegaConf.to_container(OmegaConf.load(stored))
        added = [f"{group}={config[group]['name']}" for group in ("algo", "model", "dataset")]
    except Exception:
        return rest
    given = {override_key(o) for o in rest}
    added = [o for o in added if override_key(o) not in given]
    _ADDED[:] = added
    return added + rest


def user_overrides(task: list[str]) -> list[str]:
    """The command line's overrides, without the run's choices :func:`with_run_choices` added."""
    added = list(_ADDED)
    out = []
    for override in task:
        if override in added:
            added.remove(override)
        else:
            out.append(override)
    return out
