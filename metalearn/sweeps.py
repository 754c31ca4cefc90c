"""The jobs of a Hydra sweep, listed and checked before the first one starts.

``metalearn train -m algo.inner_lr=-1,0.1`` must be judged the same as ``0.1,-1``: every job's
config is composed and validated up front, so a bad value refuses the sweep (one line listing
each refused combination) whatever its position, and nothing is run or written.
"""

from __future__ import annotations

import itertools


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def sweep_jobs(overrides: list[str]) -> list[tuple[str, list[str]]]:
    """Every job of a sweep (the basic sweeper's cartesian product of the comma lists), as
    (label of its swept values, its overrides); one job if a swept value cannot be listed
    (a range or interval for another sweeper: then only its first job can be checked)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for override in parsed:
        if not override.is_sweep_override():
            choices.append([(None, override.input_line)])
            continue
        key = override.get_key_element()
        try:
            values = list(override.sweep_string_iterator())
        except Exception:  # not a listable sweep: its first value stands for all
            values = [next(iter(override.sweep_string_iterator()))]
        choices.append([(f"{key}={v}", f"{key}={v}") for v in values])
    jobs = []
    for combination in itertools.product(*choices):
        label = ",".join(lbl for lbl, _ in combination if lbl is not None)
        jobs.append((label, [line for _, line in combination]))
    return jobs


def refused_jobs(config_dir: str, config_name: str, overrides: list[str]) -> tuple[list[str], int]:
    """(``"[<swept values>] <why>"`` for each job whose config does not compose or validate,
    number of jobs). Raises the parser's error for a malformed override."""
    from hydra import compose, initialize_config_dir

    from metalearn.config import validate
    from metalearn.errors import MetalearnError

    jobs = sweep_jobs(overrides)
    refused = []
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        for label, job in jobs:
            try:
                validate(compose(config_name=config_name, overrides=job))
            except MetalearnError as err:
                refused.append(f"[{label}] {err}")
            except Exception as err:  # composition errors are multi-line
                cause = err.__cause__ or err.__context__
                detail = f" ({_first_line(cause)})" if cause is not None else ""
                refused.append(f"[{label}] {_first_line(err)}{detail}")
    return refused, len(jobs)
