"""Multi-process (multi-host) start-up: ``jax.distributed.initialize()`` when asked to.

One ``metalearn train`` process runs per host (or per task of a SLURM step). After
initialization ``jax.devices()`` lists the devices of every process, the training mesh
spans all of them, and each process's devices sample and adapt their own share of the
meta-batch. Files (metrics, results, checkpoint manifests) are written by process 0 only;
orbax checkpoints are saved by every process together.

``trainer.distributed`` selects when to initialize:

* ``auto`` (default): when the environment describes a multi-process job, i.e. a SLURM
  step with more than one task (``srun`` sets ``SLURM_STEP_NUM_TASKS``/``SLURM_NTASKS``,
  ``SLURM_PROCID``, ...), or the explicit variables ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``;
* ``on``: always (jax's own cluster detection fills in what the environment does not say);
* ``off``: never.

It must run before anything initializes a JAX backend (``jax.devices()``, any
computation); importing jax is fine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from metalearn.errors import ConfigError

MODES = ("auto", "on", "off")
EXPLICIT_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"invalid trainer.distributed: environment variable {name}={value!r} is not an integer"
        ) from None


def _slurm_tasks_on_node(env: Mapping[str, str]) -> int | None:
    """Tasks of this SLURM step on this node, when SLURM says (``SLURM_STEP_TASKS_PER_NODE``
    or ``SLURM_TASKS_PER_NODE``, formats ``"2"``, ``"2(x3)"``, ``"2(x3),1"``; the value for
    this node is taken to be the first when they differ, which only matters for the choice
    of visible devices)."""
    for name in ("SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        value = env.get(name, "").strip()
        if value:
            head = value.split(",")[0].split("(")[0]
            if head.isdigit():
                return int(head)
    return None


def _slurm_coordinator(env: Mapping[str, str]) -> str:
    """host:port as jax's SLURM detection chooses it: the first host of the step's node list
    and ``JAX_COORDINATOR_PORT``, else a port derived from the job id (so every task agrees)."""
    port = env.get("JAX_COORDINATOR_PORT") or str(int(env["SLURM_JOB_ID"]) % 2**12 + (65535 - 2**12 + 1))
    nodes = env["SLURM_STEP_NODELIST"]  # "node001", "node001,host2", "node[001-015,020],host2"
    cut = next((i for i, ch in enumerate(nodes) if ch in ",["), len(nodes))
    host = nodes[:cut]
    if cut < len(nodes) and nodes[cut] == "[":
        rest = nodes[cut + 1 :]
        host += rest[: next((i for i, ch in enumerate(rest) if ch in ",-]"), len(rest))]
    return f"{host}:{port}"


def detect(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """What the environment says about a multi-process job: None for a single process,
    else keyword arguments for ``jax.distributed.initialize`` plus ``"source"`` (``"env"``
    or ``"slurm"``). Pure (reads ``env``, default ``os.environ``); ConfigError for
    inconsistent explicit variables."""
    env = os.environ if env is None else env
    given = [name for name in EXPLICIT_VARS if env.get(name, "").strip()]
    slurm_tasks = _int_env(env, "SLURM_STEP_NUM_TASKS")
    if slurm_tasks is None:
        slurm_tasks = _int_env(env, "SLURM_NTASKS")
    in_slurm_step = all(
        name in env for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    )
    if len(given) == len(EXPLICIT_VARS):
        n, i = _int_env(env, "JAX_NUM_PROCESSES"), _int_env(env, "JAX_PROCESS_ID")
        if n < 1 or not 0 <= i < n:
            raise ConfigError(
                f"invalid trainer.distributed: JAX_PROCESS_ID={i} and JAX_NUM_PROCESSES={n} need "
                "0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES"
            )
        if n == 1:
            return None
        address = env["JAX_COORDINATOR_ADDRESS"].strip()
        if ":" not in address:
            raise ConfigError(
                f"invalid trainer.distributed: JAX_COORDINATOR_ADDRESS={address!r} must be host:port"
            )
        # Explicit settings win over a surrounding SLURM allocation: no cluster detection.
        return dict(
            source="env",
            coordinator_address=address,
            num_processes=n,
            process_id=i,
            cluster_detection_method="deactivate",
        )
    if slurm_tasks is not None and slurm_tasks > 1 and in_slurm_step:
        kwargs: dict[str, Any] = dict(source="slurm")
        if _slurm_tasks_on_node(env) == 1 and not env.get("JAX_LOCAL_DEVICE_IDS", "").strip():
            # jax's SLURM detection pins each task to the one GPU numbered SLURM_LOCALID, right
            # for one task per GPU. With one task per node, that task should use every GPU of
            # the node: pass what the detection would, without the pinning.
            kwargs.update(
                coordinator_address=env.get("JAX_COORDINATOR_ADDRESS") or _slurm_coordinator(env),
                num_processes=slurm_tasks,
                process_id=_int_env(env, "SLURM_PROCID"),
                cluster_detection_method="deactivate",
            )
        return kwargs
    if given:
        missing = [name for name in EXPLICIT_VARS if name not in given]
        raise ConfigError(
            f"invalid trainer.distributed: {', '.join(given)} set but not {', '.join(missing)}; "
            "set all three (or none, or run under srun)"
        )
    return None


def secondary_process(mode: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether this process will be one other than 0 of a multi-process job, as ``mode``
    (``trainer.distributed``) and the environment say, before JAX starts: process 0 alone
    checks, locks and writes the run dir (metalearn.rundir). Pure, like :func:`detect`."""
    env = os.environ if env is None else env
    if mode == "off":
        return False
    try:
        job = detect(env)
    except ConfigError:
        return False  # reported by training itself
    if job is not None and "process_id" in job:
        return int(job["process_id"]) != 0
    if job is None and mode == "auto":
        return False
    # jax's own cluster detection: the launcher's rank variable.
    ranks = ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
    return any(env.get(name, "0").strip() not in ("", "0") for name in ranks)


def describe() -> str:
    """One line: "single process" or "process i of n, coordinator host:port, k local / m
    global devices". Initializes the backend."""
    import jax
    from jax._src import distributed as jax_distributed

    if jax.process_count() == 1:
        return f"single process, {jax.local_device_count()} device(s)"
    return (
        f"process {jax.process_index()} of {jax.process_count()}, coordinator "
        f"{jax_distributed.global_state.coordinator_address}, {jax.local_device_count()} local / "
        f"{jax.device_count()} global devices"
    )


def maybe_initialize(mode: str = "auto") -> str:
    """Call ``jax.distributed.initialize()`` as ``mode`` (``trainer.distributed``) and the
    environment say; return :func:`describe`'s line. Idempotent: a second call (or one
    after someone else initialized) only describes. ConfigError, one line naming
    ``trainer.distributed``, when initialization is wanted but fails or comes too late."""
    import jax
    from jax._src import xla_bridge

    if mode not in MODES:
        raise ConfigError(f"invalid trainer.distributed={mode!r}: must be one of {', '.join(MODES)}")
    if mode == "off" or jax.distributed.is_initialized():
        return describe()
    kwargs = detect()
    if kwargs is None and mode == "auto":
        return describe()
    kwargs = dict(kwargs or {})
    source = kwargs.pop("source", "jax cluster detection")
    if xla_bridge.backends_are_initialized():
        raise ConfigError(
            f"invalid trainer.distributed={mode}: a multi-process job ({source}) needs "
            "jax.distributed.initialize() before JAX uses any device, but this process already has"
        )
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as err:  # RuntimeError/ValueError/XlaRuntimeError (timeouts, bad address)
        text = str(err).strip()
        line = text.splitlines()[0] if text else type(err).__name__
        raise ConfigError(
            f"trainer.distributed={mode}: jax.distributed.initialize() failed ({source}): {line[:300]}"
        ) from None
    return describe()


def is_main_process() -> bool:
    """True in process 0 (and in a single-process run): the one that writes files and prints."""
    import jax

    return jax.process_index() == 0


def is_multiprocess() -> bool:
    import jax

    return jax.process_count() > 1


def shared_run_dir(run_dir: str) -> str:
    """Process 0's ``run_dir`` in every process (one process: unchanged). Checkpoints must be
    written by all processes to one directory on a shared filesystem, but Hydra's default run
    dir contains a timestamp that can differ between hosts."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return str(run_dir)
    from jax.experimental import multihost_utils

    size = 4096
    raw = os.fsencode(str(run_dir))[:size]
    buf = np.frombuffer(raw.ljust(size, b"\0"), np.uint8).copy()
    agreed = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return os.fsdecode(bytes(agreed.astype(np.uint8)).rstrip(b"\0"))


class NullLogger:
    """Stands in for :class:`metalearn.metrics.JsonlLogger` in processes other than 0."""

    def log(self, record: dict[str, Any]) -> None:
        pass
