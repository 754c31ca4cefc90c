"""When the training loop hands control back to the host: how many meta-steps each
compiled call runs (:class:`BlockLengths`), and how SIGTERM/SIGINT stop a run at the end of
a block with a checkpoint (:class:`StopSignals`, :class:`Preempted`)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import numpy as np

from metalearn.errors import MetalearnError

# Automatic block length (trainer.steps_per_call=0): blocks of about this many seconds, so a
# first SIGTERM/SIGINT is acted on within about that time, and at most this many steps.
_BLOCK_SECONDS = 0.1
_AUTO_MAX_STEPS = 1000


def _next_boundary(step: int, t: Any) -> int:
    """The first step after ``step`` at which the host must see the state: a log,
    validation or checkpoint step, or the last step."""
    periods = (t.log_every, t.val_every, t.checkpoint_every)
    return min([t.steps] + [(step // p + 1) * p for p in periods if p])


class BlockLengths:
    """How many meta-steps each compiled call runs (:func:`metalearn.step.make_meta_block`).

    A block never crosses a log, validation or checkpoint step or the last step, so
    logging, validation, checkpoints and the on_nan check see exactly the states they saw
    with one step per call. The first block is one step (its time is the compile time).
    Blocks are at most ``max_steps`` long: trainer.steps_per_call, or with 0 (automatic)
    the log period capped at ``_AUTO_MAX_STEPS``; host-gathered episodes take one step per
    call. Automatic in a single process, blocks are also timed (each is waited for) and
    sized to about ``_BLOCK_SECONDS``, which bounds the delay before a signal is acted
    on; in a multi-process job signals are acted on at log steps only, so blocks run from
    boundary to boundary and every process makes the same cuts.
    """

    def __init__(self, t: Any, host: bool, multi_process: bool):
        cap = t.steps_per_call or _AUTO_MAX_STEPS
        self.max_steps = 1 if host else max(1, min(cap, t.log_every, t.steps))
        self.timed = t.steps_per_call == 0 and not multi_process and self.max_steps > 1
        self._t, self._cap, self._first = t, self.max_steps, True

    def length(self, step: int) -> int:
        n = 1 if self._first else min(self._cap, _next_boundary(step, self._t) - step)
        self._first = False
        return n

    def observe(self, steps: int, seconds: float) -> None:
        """A timed block of ``steps`` steps took ``seconds`` from dispatch to result."""
        per_step = seconds / steps
        fit = int(_BLOCK_SECONDS / per_step) if per_step > 0 else self.max_steps
        self._cap = max(1, min(self.max_steps, fit))


class Preempted(MetalearnError):
    """Training stopped on SIGTERM/SIGINT after checkpointing; exit code 128 + signal number
    (143 for SIGTERM, 130 for SIGINT), the shell's convention for "ended by a signal"."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """While active, a first SIGTERM/SIGINT only sets ``signum``: the loop finishes the
    current block of steps (:class:`BlockLengths`), checkpoints it and stops. A second
    one exits at once. The previous handlers are restored on exit. Does nothing outside
    the main thread, where Python cannot install handlers."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            print(
                f"metalearn: second {signal.Signals(signum).name}: exiting now", file=sys.stderr, flush=True
            )
            os._exit(128 + signum)
        self.signum = signum

    def __enter__(self) -> StopSignals:
        from metalearn.launchers import extra_stop_signals

        if threading.current_thread() is threading.main_thread():
            # Under submitit also its pre-emption signal (metalearn/launchers.py: requeue).
            for sig in self.SIGNALS + extra_stop_signals():
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def any_process_signalled(stop: StopSignals) -> bool:
    """Whether any process of a multi-process job has received SIGTERM/SIGINT (a small
    all-gather; collective, so every process must call it at the same step). A process
    that was not signalled itself adopts the first signal seen, for its exit code."""
    from jax.experimental import multihost_utils

    mine = np.array([stop.signum or 0], np.int32)
    signals = np.asarray(multihost_utils.process_allgather(mine)).ravel()
    received = [int(s) for s in signals if s]
    if received and stop.signum is None:
        stop.signum = received[0]
    return bool(received)
