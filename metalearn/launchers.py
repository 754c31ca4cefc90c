"""What a job needs from the launcher that runs it: how many jobs run at once on one machine
(hydra/launcher=joblib, :func:`parallel_jobs`), and how a job under submitit (hydra/launcher=slurm,
or submitit_local) that is pre-empted or reaches its time limit requeues itself and resumes
(:func:`requeue`, :func:`take_requeue_marker`).

The requeue path reuses the trainer's stop: under submitit, submitit's pre-emption signal
(SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise) stops training like SIGTERM, at the
end of a block with a checkpoint (:class:`metalearn.loop_control.StopSignals`); then the job
marks its run dir and hands over to submitit's own handler for that signal, which saves the
job (the launcher and the same arguments) and requeues it. The requeued job finds the marker
and resumes from the checkpoint, exactly (docs/reliability.md).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from hydra.experimental.callback import Callback

# Written into the run dir of a job that requeued itself; the next start resumes and removes it.
REQUEUE_MARKER = ".requeued"
# The sweep dir of the multirun this process launched (set by :class:`SweepDirCallback`).
LAUNCHED: dict[str, str] = {}


class SweepDirCallback(Callback):
    """A Hydra callback (conf/config.yaml, hydra.callbacks): remembers the sweep dir of a
    multirun in the launching process, where the jobs' error.txt files are looked for when a
    launcher ran them in other processes (metalearn.cli)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        LAUNCHED["sweep_dir"] = str(config.hydra.sweep.dir)


def parallel_jobs() -> int:
    """Jobs at once for hydra/launcher=joblib: METALEARN_JOBS if set; else with GPUs visible,
    METALEARN_JOBS_PER_DEVICE (default 1) per GPU, each job then given 0.9 / that of a GPU's
    memory (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set); else one per 4 CPU cores (at least 1).
    Every job sees every visible GPU and JAX uses the first: on a machine with several GPUs,
    give each sweep its own (CUDA_VISIBLE_DEVICES) or use hydra/launcher=slurm."""
    if os.environ.get("METALEARN_JOBS"):
        return max(1, int(os.environ["METALEARN_JOBS"]))
    gpus = visible_gpus()
    if gpus:
        per_device = max(1, int(os.environ.get("METALEARN_JOBS_PER_DEVICE", "1")))
        if per_device > 1:  # JAX takes 75% of a GPU per process: share it (the jobs inherit this)
            os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / per_device:.2f}")
        return gpus * per_device
    return max(1, (os.cpu_count() or 1) // 4)


def visible_gpus() -> int:
    """NVIDIA GPUs this process may use (CUDA_VISIBLE_DEVICES, else /dev/nvidia<N>), without
    starting JAX (which would take the devices' memory in the launching process)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return len([d for d in listed.split(",") if d.strip() and d.strip() != "-1"])
    return len([p for p in Path("/dev").glob("nvidia[0-9]*")])


def submitit_job() -> bool:
    """Whether this process is a job started by submitit (SLURM or its local executor)."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def preemption_signal() -> signal.Signals:
    """The signal submitit sends before a time limit or pre-emption (SIGUSR2 by default)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


def extra_stop_signals() -> tuple[signal.Signals, ...]:
    """Signals that stop training with a checkpoint besides SIGTERM/SIGINT: submitit's
    pre-emption signal inside a submitit job, else none."""
    return (preemption_signal(),) if submitit_job() else ()


def requeue(run_dir: str | Path) -> bool:
    """Under submitit, after a stop with a checkpoint: mark ``run_dir`` and call submitit's
    handler of its pre-emption signal, which requeues the job and exits the process (it does
    not return). False where this is not a submitit job or no submitit handler is installed."""
    if not submitit_job():
        return False
    sig = preemption_signal()
    handler = signal.getsignal(sig)
    if not callable(handler):
        return False
    (Path(run_dir) / REQUEUE_MARKER).write_text("requeued by submitit after a checkpointed stop\n")
    print(f"metalearn: requeuing the job through submitit; it resumes from {run_dir}", flush=True)
    handler(sig, None)
    return False  # submitit declined (e.g. timed out too many times): the caller fails as usual


def take_requeue_marker(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds the marker of a requeued job (removed): the job must resume."""
    marker = Path(run_dir) / REQUEUE_MARKER
    if not marker.is_file():
        return False
    marker.unlink()
    return True
