"""The evaluation protocol a result was obtained under, stated with the result.

:func:`protocol_of` is the ``protocol`` entry of results.json (training and ``metalearn
eval``); :func:`describe_protocol` is its phrase in the final line and at the start of
training. Entries: ``split`` (the class split in effect, :mod:`metalearn.data.class_splits`),
``rotation`` (the rotation rule, :mod:`metalearn.data.rotation`), ``n_tasks`` (tasks of the
final evaluation) and ``queries_per_class`` (query examples per class scored in them). The
BatchNorm mode and the checkpoint rule are to join them as further keys.
"""

from __future__ import annotations

from typing import Any

from metalearn.data.class_splits import split_name
from metalearn.data.rotation import rotation_rule


def queries_per_class(cfg: Any, split: str) -> int:
    """Query examples per class scored in a task of ``split`` at evaluation: dataset.k_query
    (validation and test: dataset.k_query_test when set), cut to eval.k_query when set."""
    d = cfg.dataset
    k_query_test = getattr(d, "k_query_test", None)
    sampled = d.k_query if split == "train" or k_query_test is None else k_query_test
    scored = getattr(cfg.eval, "k_query", None)
    return sampled if scored is None else min(scored, sampled)


def protocol_of(cfg: Any) -> dict[str, Any]:
    """``{"split", "rotation", "n_tasks", "queries_per_class"}`` of the final evaluation."""
    return {
        "split": split_name(cfg.dataset),
        "rotation": rotation_rule(cfg.dataset),
        "n_tasks": int(cfg.eval.n_tasks),
        "queries_per_class": int(queries_per_class(cfg, cfg.eval.split)),
    }


def describe_protocol(protocol: dict[str, Any]) -> str:
    """E.g. ``"split random, rotation classes, 600 tasks x 1 query per class"``."""
    q = protocol["queries_per_class"]
    parts = [] if protocol["split"] is None else [f"split {protocol['split']}"]
    parts.append(f"rotation {protocol['rotation']}")
    parts.append(f"{protocol['n_tasks']} tasks x {q} quer{'y' if q == 1 else 'ies'} per class")
    return ", ".join(parts)
