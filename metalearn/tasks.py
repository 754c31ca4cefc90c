"""Task distributions: jittable samplers that draw one task from a key.

A task source holds, per split, a pytree of device arrays (``data``) and a pure function
``sample(data, key) -> Task``. The data is passed into the jitted meta-step as an
argument rather than closed over, so large image arrays are not baked into the compiled
program as constants, and no host-to-device copy happens per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metalearn.errors import ConfigError


class Task(NamedTuple):
    """One few-shot task. x: (N, *input_shape) float32; y: (N, out) float32 or (N,) int32."""

    support_x: jax.Array
    support_y: jax.Array
    query_x: jax.Array
    query_y: jax.Array


@dataclass(frozen=True)
class TaskSource:
    """A task distribution with train / validation / test splits.

    kind: "regression" (metric: mse, lower is better) or "classification" (accuracy).
    splits: split name -> pytree of device arrays handed to ``sample``.
    sample(data, key) -> Task; pure and jittable; vmap over keys for a batch of tasks.
    """

    kind: str
    input_shape: tuple[int, ...]
    output_dim: int
    splits: dict[str, Any]
    sample: Callable[[Any, jax.Array], Task]
    # Valid input range of x, for attacks that clip to it (None: unbounded).
    input_range: tuple[float, float] | None = None

    @property
    def metric_name(self) -> str:
        return "mse" if self.kind == "regression" else "accuracy"

    def loss(self, pred: jax.Array, y: jax.Array) -> jax.Array:
        """Mean loss of a batch of predictions: MSE, or softmax cross-entropy."""
        if self.kind == "regression":
            return jnp.mean(jnp.square(pred - y))
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(pred, y))

    def metric(self, pred: jax.Array, y: jax.Array) -> jax.Array:
        """MSE for regression, accuracy for classification."""
        if self.kind == "regression":
            return jnp.mean(jnp.square(pred - y))
        return jnp.mean(jnp.argmax(pred, axis=-1) == y)


def sample_sinusoid(
    key: jax.Array,
    k_shot: int,
    k_query: int,
    amp: tuple[float, float],
    phase: tuple[float, float],
    x_range: tuple[float, float],
) -> Task:
    """y = A sin(x - phase) with A, phase, x uniform; x, y: (k, 1)."""
    ka, kp, kx = jax.random.split(key, 3)
    a = jax.random.uniform(ka, (), minval=amp[0], maxval=amp[1])
    p = jax.random.uniform(kp, (), minval=phase[0], maxval=phase[1])
    x = jax.random.uniform(kx, (k_shot + k_query, 1), minval=x_range[0], maxval=x_range[1])
    y = a * jnp.sin(x - p)
    return Task(x[:k_shot], y[:k_shot], x[k_shot:], y[k_shot:])


def sample_episode(images: jax.Array, key: jax.Array, n_way: int, k_shot: int, k_query: int) -> Task:
    """An N-way K-shot Q-query episode from a class-indexed image array.

    images: uint8 (classes, per_class, H, W, C). Draws ``n_way`` distinct classes in random
    order (so the class -> label map is a fresh permutation per task) and, per class,
    ``k_shot + k_query`` distinct images, the first ``k_shot`` for support.
    Returns support x: (n_way * k_shot, H, W, C) float32 in [0, 1], y: (n_way * k_shot,) int32;
    query likewise with ``k_query``. Examples are ordered class-major.
    """
    n_classes, per_class = images.shape[0], images.shape[1]
    kc, ki = jax.random.split(key)
    classes = jax.random.choice(kc, n_classes, (n_way,), replace=False)
    picks = jax.vmap(lambda k: jax.random.permutation(k, per_class)[: k_shot + k_query])(
        jax.random.split(ki, n_way)
    )  # (n_way, k_shot + k_query)
    x = images[classes[:, None], picks].astype(jnp.float32) / 255.0
    y = jnp.broadcast_to(jnp.arange(n_way, dtype=jnp.int32)[:, None], picks.shape)
    shape = x.shape[2:]
    return Task(
        x[:, :k_shot].reshape((-1, *shape)),
        y[:, :k_shot].reshape(-1),
        x[:, k_shot:].reshape((-1, *shape)),
        y[:, k_shot:].reshape(-1),
    )


def sinusoid_source(cfg: Any) -> TaskSource:
    """Sinusoid regression (MAML paper, section 5.1). Every split is the same distribution."""
    amp, phase, xr = (cfg.amp_min, cfg.amp_max), (cfg.phase_min, cfg.phase_max), (cfg.x_min, cfg.x_max)
    k_shot, k_query = cfg.k_shot, cfg.k_query

    def sample(data: Any, key: jax.Array) -> Task:
        del data
        return sample_sinusoid(key, k_shot, k_query, amp, phase, xr)

    empty: dict[str, Any] = {}
    return TaskSource(
        "regression", (1,), 1, {"train": empty, "validation": empty, "test": empty}, sample, None
    )


def image_source(cfg: Any, arrays: dict[str, np.ndarray]) -> TaskSource:
    """Classification episodes from class-indexed uint8 arrays (one per split).

    Checks that every split can hold the requested episode shape and moves the arrays to
    device memory once.
    """
    n_way, k_shot, k_query = cfg.n_way, cfg.k_shot, cfg.k_query
    for split, arr in arrays.items():
        if arr.shape[0] < n_way:
            raise ConfigError(
                f"invalid dataset.n_way={n_way}: the {split} split has only {arr.shape[0]} classes"
            )
        if arr.shape[1] < k_shot + k_query:
            raise ConfigError(
                f"invalid dataset.k_shot + dataset.k_query = {k_shot} + {k_query}: the {split} "
                f"split has only {arr.shape[1]} images per class"
            )

    def sample(data: Any, key: jax.Array) -> Task:
        return sample_episode(data["images"], key, n_way, k_shot, k_query)

    splits = {name: {"images": jnp.asarray(arr)} for name, arr in arrays.items()}
    input_shape = tuple(next(iter(arrays.values())).shape[2:])
    return TaskSource("classification", input_shape, n_way, splits, sample, (0.0, 1.0))


def build_task_source(cfg: Any) -> TaskSource:
    """The task source for ``cfg.dataset`` (a DatasetConfig)."""
    if cfg.name == "sinusoid":
        return sinusoid_source(cfg)
    if cfg.name == "omniglot":
        from metalearn.data.omniglot import load_omniglot

        arrays = load_omniglot(
            variant=cfg.variant,
            manual_dir=cfg.manual_dir,
            data_dir=cfg.data_dir,
            image_size=cfg.image_size,
            rotations=cfg.rotations,
            split_seed=cfg.split_seed,
            download=cfg.download,
        )
        return image_source(cfg, arrays)
    raise ConfigError(f"invalid dataset.name={cfg.name!r}: must be one of ['sinusoid', 'omniglot']")
