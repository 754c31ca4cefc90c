"""The evaluation protocol a result was obtained under, stated with the result.

:func:`protocol_of` is the ``protocol`` entry of results.json (training and ``metalearn
eval``); :func:`describe_protocol` is its phrase in the final line and at the start of
training. Entries: ``split`` (the class split in effect, :mod:`metalearn.data.class_splits`)
and ``split_seed`` (where it depends on one),
``rotation`` (the rotation rule, :mod:`metalearn.data.rotation`), ``n_tasks`` (tasks of the
final evaluation), ``queries_per_class`` (query examples per class scored in them),
``bn_stats`` (the BatchNorm statistics at evaluation, :mod:`metalearn.batchnorm`; None for a
model without BatchNorm), ``checkpoint`` (which parameters are tested, eval.checkpoint: last,
best or top_k; :mod:`metalearn.selection`), ``top_k`` (the ensemble's size; None unless
top_k), ``ranked_by`` (eval.rank_by, "metric" or "loss"; None for last) and ``adaptation``
(eval.adaptation: "algorithm", the algorithm's own, or a rule on the trained backbone,
:mod:`metalearn.adaptation`).
"""

from __future__ import annotations

from typing import Any

from metalearn.adaptation import ADAPTATION_PHRASES, adaptation_of
from metalearn.data.class_splits import split_name, split_seed_used
from metalearn.data.rotation import rotation_rule
from metalearn.selection import describe_rule, rank_by, rule_of

# How the final line names each BatchNorm mode (model.bn_stats).
BN_PHRASES = {
    "batch": "BatchNorm batch statistics (transductive)",
    "support": "BatchNorm support-set moments",
    "running": "BatchNorm running averages",
    "support_query": "BatchNorm support set plus one query",
}


def queries_per_class(cfg: Any, split: str) -> int:
    """Query examples per class scored in a task of ``split`` at evaluation: dataset.k_query
    (validation and test: dataset.k_query_test when set), cut to eval.k_query when set."""
    d = cfg.dataset
    k_query_test = getattr(d, "k_query_test", None)
    sampled = d.k_query if split == "train" or k_query_test is None else k_query_test
    scored = getattr(cfg.eval, "k_query", None)
    return sampled if scored is None else min(scored, sampled)


def protocol_of(cfg: Any) -> dict[str, Any]:
    """``{"split", "split_seed", "rotation", "n_tasks", "queries_per_class", "bn_stats",
    "checkpoint", "top_k", "ranked_by"}`` of the final evaluation (``split_seed``: None where the
    split does not depend on it); with variable episodes also ``"episodes"``, their bounds."""
    protocol = {
        "split": split_name(cfg.dataset),
        "split_seed": split_seed_used(cfg.dataset),
        "rotation": rotation_rule(cfg.dataset),
        "n_tasks": int(cfg.eval.n_tasks),
        "queries_per_class": int(queries_per_class(cfg, cfg.eval.split)),
        "bn_stats": getattr(cfg.model, "bn_stats", None),
        "checkpoint": rule_of(cfg),
        "top_k": int(cfg.eval.top_k) if rule_of(cfg) == "top_k" else None,
        "ranked_by": None if rule_of(cfg) == "last" else rank_by(cfg),
        # eval.adaptation (metalearn/adaptation.py): the test-time adaptation.
        "adaptation": adaptation_of(cfg.eval),
    }
    if getattr(cfg.dataset, "episodes", "fixed") == "variable":
        # Meta-Dataset's episodes (metalearn/episodes.py): queries_per_class is their bound.
        bounds = ("min_ways", "max_ways", "max_support", "max_query")
        protocol["episodes"] = {key: int(getattr(cfg.dataset, key)) for key in bounds}
        protocol["queries_per_class"] = protocol["episodes"]["max_query"]
    return protocol


def describe_protocol(protocol: dict[str, Any]) -> str:
    """E.g. ``"split random (seed 0), rotation classes, 600 tasks x 1 query per class, BatchNorm
    batch statistics (transductive), last checkpoint"``."""
    q = protocol["queries_per_class"]
    seed = protocol.get("split_seed")
    parts = [] if protocol["split"] is None else [f"split {protocol['split']}"]
    if seed is not None:
        parts[-1] += f" (seed {seed})"
    parts.append(f"rotation {protocol['rotation']}")
    if "episodes" in protocol:
        e = protocol["episodes"]
        parts.append(
            f"{protocol['n_tasks']} variable episodes ({e['min_ways']}-{e['max_ways']} ways, "
            f"support <= {e['max_support']}, <= {q} queries per class)"
        )
    else:
        parts.append(f"{protocol['n_tasks']} tasks x {q} quer{'y' if q == 1 else 'ies'} per class")
    if protocol.get("bn_stats") is not None:  # results.json of older runs have no such key
        parts.append(BN_PHRASES.get(protocol["bn_stats"], f"BatchNorm {protocol['bn_stats']}"))
    if "checkpoint" in protocol:  # results.json of older versions lack it
        parts.append(describe_rule(protocol["checkpoint"], protocol.get("top_k"), protocol.get("ranked_by")))
    if protocol.get("adaptation", "algorithm") != "algorithm":  # the default is named by the steps
        parts.append(f"adapted by {ADAPTATION_PHRASES[protocol['adaptation']]}")
    return ", ".join(parts)
