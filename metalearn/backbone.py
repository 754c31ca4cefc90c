"""Start from another run's backbone (``model.init_from``) and choose how the head starts
(``model.init_head``), for every algorithm.

The *backbone* is the model's parameter tree without its ``head`` layer (and without
CAML's ``film`` subtree, which conditions the network on a task context and belongs to that
algorithm). It is read from the newest checkpoint of the source run, as stored (no config of
the source run is needed, so a run of any algorithm is a source: ``algo=pretrain``,
MAML, ProtoNet, ...), and written into the new run's initial meta-parameters bit for bit.

Where an algorithm keeps the model's parameters in its meta-parameters:

- the meta-parameters themselves (MAML, FOMAML, ADML, ANIL, Reptile, iMAML, CAML; ProtoNet
  and ProtoMAML, whose meta-parameters are the backbone only);
- ``meta["params"]`` (Meta-SGD and MAML++, beside their learned rates). MAML++'s per-step
  BatchNorm copies (leading axis of length ``inner_steps``) each receive the source's values.

The head (``model.init_head``):

- ``random`` (default): the algorithm's own initial head (``model.head_init``), as without
  init_from; for ProtoNet and ProtoMAML, which have no head parameters, the head is their
  own rule (ProtoMAML's prototype head, built per task from the support set).
- ``zeros``: kernel and bias 0, so every way starts with the same logit (the "zero
  trick" that UNICORN-MAML, Ye & Chao 2022, discusses).
- ``shared``: UNICORN-MAML's single head shared by all ways: one column (kernel column 0
  and bias 0 of the algorithm's initial head) copied to every way, and kept shared through
  meta-training: the meta-gradient of each way's column is replaced by the sum over ways
  (the gradient of the one shared vector), so the columns stay equal under any element-wise
  optimizer. The inner loop still adapts each way's copy on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.errors import ConfigError, DataError

PyTree = Any
HEAD = "head"
# Subtrees that are not part of the transferable backbone.
NOT_BACKBONE = (HEAD, "film")
INIT_HEADS = ("random", "zeros", "shared")


def model_tree(meta: PyTree) -> dict:
    """The model's parameter tree inside an algorithm's meta-parameters (``meta["params"]`` for
    Meta-SGD and MAML++, else ``meta`` itself)."""
    if isinstance(meta, dict) and "params" in meta and isinstance(meta["params"], dict):
        return meta["params"]
    return meta


def _with_model_tree(meta: PyTree, tree: dict) -> PyTree:
    if isinstance(meta, dict) and "params" in meta and isinstance(meta["params"], dict):
        return {**meta, "params": tree}
    return tree


def _flat(tree: Any, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{"conv_0/kernel": leaf}`` of a nested dict."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = (*prefix, str(k))
        if isinstance(v, dict):
            out.update(_flat(v, path))
        else:
            out["/".join(path)] = v
    return out


def _unflat(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for name, leaf in flat.items():
        node = tree
        *parents, last = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


def _is_backbone(name: str) -> bool:
    return name.split("/")[0] not in NOT_BACKBONE


def read_source_params(run_dir: str | Path) -> tuple[dict, int]:
    """The model parameter tree (numpy arrays, as stored) of the newest checkpoint of the run
    in ``run_dir``, and its step; ConfigError (one line) naming model.init_from when there is
    none."""
    from metalearn.checkpoint import CHECKPOINT_DIR, LEGACY_NAME, _quiet_restore, _verify, checkpoint_steps

    run_dir = Path(run_dir)
    steps = checkpoint_steps(run_dir)
    if not steps:
        legacy = run_dir / LEGACY_NAME
        if not legacy.is_file():
            raise ConfigError(
                f"invalid model.init_from={str(run_dir)!r}: no checkpoint there (a train run dir?)"
            )
        from flax import serialization

        raw = serialization.msgpack_restore(legacy.read_bytes())
    else:
        import orbax.checkpoint as ocp

        step_dir = run_dir / CHECKPOINT_DIR / str(steps[0])
        try:
            _verify(step_dir)
            with _quiet_restore():
                raw = ocp.StandardCheckpointer().restore((step_dir / "default").resolve())
        except Exception as err:  # damaged or half-written: report, don't traceback
            raise DataError(f"model.init_from: checkpoint {step_dir} is unusable ({err})") from None
    params = raw["params"] if isinstance(raw, dict) else raw.params
    step = raw["step"] if isinstance(raw, dict) else raw.step
    return model_tree(jax.tree.map(np.asarray, params)), int(np.asarray(step))


def source_backbone(run_dir: str | Path) -> tuple[dict[str, np.ndarray], int]:
    """``{"conv_0/kernel": array}`` of the source run's backbone (head and film left out),
    and the step of the checkpoint it was read from."""
    params, step = read_source_params(run_dir)
    return {k: v for k, v in _flat(params).items() if _is_backbone(k)}, step


def load_backbone(meta: PyTree, backbone: dict[str, np.ndarray], source: str) -> PyTree:
    """``meta`` with every backbone parameter replaced by ``backbone``'s, bit for bit.

    ConfigError (one line, naming both shapes) when a parameter is missing on either side or
    has another shape; a leaf of this model with one more leading axis than the source's
    (MAML++'s per-step BatchNorm) gets the source's value in every row.
    """
    target = _flat(model_tree(meta))
    ours = {k for k in target if _is_backbone(k)}
    hint = f"model.init_from={source!r}: the source run's architecture differs from this run's model"
    for name in sorted(set(backbone) - ours):
        raise ConfigError(f"{hint}: source parameter {name} {tuple(backbone[name].shape)} is absent here")
    for name in sorted(ours - set(backbone)):
        raise ConfigError(f"{hint}: parameter {name} {tuple(np.shape(target[name]))} is absent in the source")
    new = dict(target)
    for name in sorted(ours):
        want, got = target[name], backbone[name]
        if np.shape(want) == got.shape:
            value = got
        elif np.ndim(want) == got.ndim + 1 and np.shape(want)[1:] == got.shape:
            value = np.broadcast_to(got, np.shape(want))
        else:
            raise ConfigError(
                f"{hint}: parameter {name} has shape {tuple(got.shape)} in the source and "
                f"{tuple(np.shape(want))} in this model"
            )
        if np.dtype(got.dtype) != np.dtype(want.dtype):
            raise ConfigError(f"{hint}: parameter {name} is {got.dtype} in the source and {want.dtype} here")
        new[name] = jnp.asarray(value)
    return _with_model_tree(meta, _unflat(new))


def init_head(meta: PyTree, rule: str) -> PyTree:
    """``meta`` with its head set by ``rule`` (:data:`INIT_HEADS`); ``random`` returns it as is."""
    if rule == "random":
        return meta
    tree = model_tree(meta)
    head = tree[HEAD]
    kernel, bias = head["kernel"], head["bias"]
    if rule == "zeros":
        head = {"kernel": jnp.zeros_like(kernel), "bias": jnp.zeros_like(bias)}
    elif rule == "shared":
        head = {
            "kernel": jnp.broadcast_to(kernel[:, :1], kernel.shape),
            "bias": jnp.broadcast_to(bias[:1], bias.shape),
        }
    else:
        raise ValueError(f"unknown head rule {rule!r}; expected one of {INIT_HEADS}")
    return _with_model_tree(meta, {**tree, HEAD: head})


def tie_head_gradient(grads: PyTree) -> PyTree:
    """``model.init_head=shared``: each way's head gradient replaced by the sum over ways
    (kernel (D, N): summed over N; bias (N,)), the gradient of the one shared column."""
    tree = model_tree(grads)
    head = tree[HEAD]
    tied = {
        "kernel": jnp.broadcast_to(jnp.sum(head["kernel"], axis=1, keepdims=True), head["kernel"].shape),
        "bias": jnp.broadcast_to(jnp.sum(head["bias"], keepdims=True), head["bias"].shape),
    }
    return _with_model_tree(grads, {**tree, HEAD: tied})


def init_from_of(model_cfg: Any) -> str | None:
    return getattr(model_cfg, "init_from", None)


def init_head_of(model_cfg: Any) -> str:
    return str(getattr(model_cfg, "init_head", "random"))


def check_head_rule(cfg: Any, meta_shape: PyTree) -> None:
    """ConfigError unless ``model.init_head`` applies to this algorithm's meta-parameters."""
    rule = init_head_of(cfg.model)
    if rule != "random" and HEAD not in model_tree(meta_shape):
        raise ConfigError(
            f"invalid model.init_head={rule!r}: algo={cfg.algo.name} has no head parameters "
            "(its head is its own rule); use random"
        )


def with_head_rule(algo: Any, rule: str) -> Any:
    """The MetaLearner ``algo`` whose initial head follows ``rule`` and, for ``shared``, whose
    meta-gradient keeps the head's columns tied."""
    if rule == "random":
        return algo
    init = lambda key: init_head(algo.init(key), rule)
    if rule != "shared":
        return algo._replace(init=init)

    def meta_grad(meta, algo_state, tasks, key, step):
        grads, algo_state, metrics = algo.meta_grad(meta, algo_state, tasks, key, step)
        return tie_head_gradient(grads), algo_state, metrics

    return algo._replace(init=init, meta_grad=meta_grad)


def initial_params(meta: PyTree, cfg: Any) -> tuple[PyTree, dict[str, Any]]:
    """The initial meta-parameters ``meta`` with the backbone of ``model.init_from``, and the
    record of the source (init_from.json in the new run: its run dir, absolute, and the step
    of the checkpoint read, the head rule)."""
    source = str(init_from_of(cfg.model))
    backbone, step = source_backbone(source)
    record = {"run_dir": str(Path(source).resolve()), "step": step, "init_head": init_head_of(cfg.model)}
    return load_backbone(meta, backbone, source), record
