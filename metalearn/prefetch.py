"""Episodes gathered on the host (``TaskSource.host``): a background thread prepares the
batches of upcoming meta-steps while the accelerator runs the current one."""

from __future__ import annotations

import queue
import threading

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metalearn.step import TASK_AXIS, step_task_keys
from metalearn.tasks import TaskSource


class HostPrefetcher:
    """Gathers the episodes of upcoming meta-steps on the host while the accelerator runs.

    A background thread computes, for each state step ``s`` in ``[start, stop)``, the same
    task keys as the on-device sampler (:func:`step_task_keys`), gathers the episodes from
    host memory and transfers them with the meta-step's task sharding; up to ``depth``
    batches wait in a queue. Iterate to get them in order. Each process gathers only the
    tasks of its own devices (``jax.make_array_from_callback``).
    """

    def __init__(
        self,
        source: TaskSource,
        base_key: jax.Array,
        meta_batch_size: int,
        mesh: Mesh,
        start: int,
        stop: int,
        depth: int = 2,
    ):
        self._host = source.host
        self._base_key = jax.device_get(base_key)
        self._batch, self._start, self._stop = meta_batch_size, start, stop
        self._sharding = NamedSharding(mesh, P(TASK_AXIS))
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metalearn-prefetch", daemon=True)
        self._thread.start()

    def _batch_for(self, step: int) -> jax.Array:
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            keys = step_task_keys(self._base_key, step, self._batch)
        idx = self._host.indices("train", keys)
        shape = self._host.batch_shape("train", idx)

        def shard(index: tuple[slice, ...]) -> np.ndarray:
            return self._host.gather("train", jax.tree.map(lambda a: a[index[0]], idx))

        return jax.make_array_from_callback(shape, self._sharding, shard)

    def _run(self) -> None:
        try:
            for step in range(self._start, self._stop):
                if self._done.is_set():
                    return
                item = self._batch_for(step)
                while not self._done.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # surfaced to the training loop by __next__
            self._queue.put(err)

    def __iter__(self) -> HostPrefetcher:
        return self

    def __next__(self) -> jax.Array:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._done.set()
