"""Task distributions: jittable samplers that draw one task from a key.

A task source holds, per split, a pytree of device arrays (``data``) and a pure function
``sample(data, key) -> Task``. The data is passed into the jitted meta-step as an
argument rather than closed over, so large image arrays are not baked into the compiled
program as constants, and no host-to-device copy happens per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metalearn.config import need, schema
from metalearn.data import IMAGE_DATASETS, load_dataset
from metalearn.data.common import EpisodeConfig
from metalearn.data.rotation import rotated_splits
from metalearn.episodes import masked_loss, masked_metric
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
    # Set when episodes are gathered on the host (dataset.placement); ``splits`` is then empty.
    host: HostSampler | None = None
    # Where episodes are sampled and why, for the start-of-run report.
    placement_note: str = ""
    # dataset=multi (metalearn/multisource.py): (label, TaskSource) of each source, evaluated
    # one by one; ``splits[split]`` then holds their data in this order. Empty otherwise.
    parts: tuple[tuple[str, TaskSource], ...] = ()
    # Variable episodes padded to one shape (dataset.episodes=variable, metalearn/episodes.py):
    # labels -1 mark padded rows, which loss and metric leave out; row_chunk > 0: computed in
    # chunks of that many rows (dataset.padding=exact, metalearn/rows.py), 0: at once.
    padded: bool = False
    row_chunk: int = 0

    @property
    def placement(self) -> str:
        return "host" if self.host is not None else "device"

    @property
    def metric_name(self) -> str:
        return "mse" if self.kind == "regression" else "accuracy"

    def loss(self, pred: jax.Array, y: jax.Array) -> jax.Array:
        """Mean loss of a batch of predictions: MSE, or softmax cross-entropy."""
        if self.kind == "regression":
            return jnp.mean(jnp.square(pred - y))
        if self.padded:
            return masked_loss(pred, y, self.row_chunk)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(pred, y))

    def metric(self, pred: jax.Array, y: jax.Array) -> jax.Array:
        """MSE for regression, accuracy for classification."""
        if self.kind == "regression":
            return jnp.mean(jnp.square(pred - y))
        if self.padded:
            return masked_metric(pred, y)
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


def uniform_indices(
    key: jax.Array, n_classes: int, per_class: int, n_way: int, n_per_class: int
) -> tuple[jax.Array, jax.Array]:
    """Indices of one episode into a class-indexed array (n_classes, per_class, ...).

    ``n_way`` distinct classes in random order (so the class -> label map is a fresh
    permutation per task) and, per class, ``n_per_class`` distinct images.
    Returns the index tuple (classes (n_way, 1), picks (n_way, n_per_class)), so that
    ``images[index]`` is the episode, like the flat indices of :func:`ragged_indices`.
    """
    kc, ki = jax.random.split(key)
    classes = jax.random.choice(kc, n_classes, (n_way,), replace=False)
    picks = jax.vmap(lambda k: jax.random.permutation(k, per_class)[:n_per_class])(
        jax.random.split(ki, n_way)
    )
    return classes[:, None], picks


def ragged_indices(
    key: jax.Array, offsets: jax.Array, counts: jax.Array, max_count: int, n_way: int, n_per_class: int
) -> jax.Array:
    """Indices of one episode into images grouped by class, (N, ...) with class c at
    ``offsets[c] : offsets[c] + counts[c]``: (n_way, n_per_class) flat indices.

    Like :func:`uniform_indices` for classes of different sizes (every count must be >=
    ``n_per_class``): each class's images are ranked by uniform scores, the slots past its
    count scored +inf, and the ``n_per_class`` lowest taken, i.e. a uniform draw without
    replacement from that class. ``max_count`` (static) is the largest count.
    """
    offsets, counts = jnp.asarray(offsets), jnp.asarray(counts)
    kc, ki = jax.random.split(key)
    classes = jax.random.choice(kc, counts.shape[0], (n_way,), replace=False)
    scores = jax.random.uniform(ki, (n_way, max_count))
    slots = jnp.arange(max_count)
    scores = jnp.where(slots[None, :] < counts[classes][:, None], scores, jnp.inf)
    picks = jnp.argsort(scores, axis=-1)[:, :n_per_class]
    return offsets[classes][:, None] + picks


def episode_from_images(x: jax.Array, k_shot: int) -> Task:
    """A task from gathered images x: (n_way, k_shot + k_query, H, W, C) uint8 (class-major).

    Support = the first ``k_shot`` images per class. x becomes float32 in [0, 1]; labels are
    the class positions 0..n_way-1. Shapes as in :func:`sample_episode`.
    """
    n_way = x.shape[0]
    x = x.astype(jnp.float32) / 255.0
    y = jnp.broadcast_to(jnp.arange(n_way, dtype=jnp.int32)[:, None], x.shape[:2])
    shape = x.shape[2:]
    return Task(
        x[:, :k_shot].reshape((-1, *shape)),
        y[:, :k_shot].reshape(-1),
        x[:, k_shot:].reshape((-1, *shape)),
        y[:, k_shot:].reshape(-1),
    )


def rotate_classes(x: jax.Array, key: jax.Array) -> jax.Array:
    """Each class of an episode rotated by its own random multiple of 90 degrees.

    x: (n_way, n, H, W, C) with H == W -> same shape; class c is ``np.rot90``-ed k_c times
    in the (H, W) plane, k_c uniform on {0, 1, 2, 3} and independent across classes (all
    images of a class, support and query, share k_c). cbfinn/maml's Omniglot sampler
    (data_generator.py: ``tf.multinomial`` over 4 rotations per class, ``tf.image.rot90``).
    """
    ks = jax.random.randint(key, (x.shape[0],), 0, 4)
    rotations = jnp.stack([jnp.rot90(x, k, axes=(-3, -2)) for k in range(4)])
    return rotations[ks, jnp.arange(x.shape[0])]


def sample_episode(images: jax.Array, key: jax.Array, n_way: int, k_shot: int, k_query: int) -> Task:
    """An N-way K-shot Q-query episode from a class-indexed image array.

    images: uint8 (classes, per_class, H, W, C). Draws ``n_way`` distinct classes in random
    order (so the class -> label map is a fresh permutation per task) and, per class,
    ``k_shot + k_query`` distinct images, the first ``k_shot`` for support.
    Returns support x: (n_way * k_shot, H, W, C) float32 in [0, 1], y: (n_way * k_shot,) int32;
    query likewise with ``k_query``. Examples are ordered class-major.
    """
    classes, picks = uniform_indices(key, images.shape[0], images.shape[1], n_way, k_shot + k_query)
    return episode_from_images(images[classes, picks], k_shot)


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


# Share of the smallest device's memory the dataset may take with placement=auto; the rest
# is left to parameters, activations and XLA's workspace.
DEVICE_DATA_FRACTION = 0.4


def device_memory_limit() -> int | None:
    """Bytes of memory of the smallest local accelerator, or None when the devices report
    none (CPU, where device memory is host memory)."""
    limits = []
    for device in jax.local_devices():
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if not stats or "bytes_limit" not in stats:
            return None
        limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


def choose_placement(requested: str, nbytes: int, limit: int | None) -> tuple[str, str]:
    """("device" or "host", a one-line reason) for ``dataset.placement=requested``."""
    size = f"{nbytes / 2**30:.2f} GiB of images"
    if requested == "device":
        return "device", f"sampled on device ({size} in device memory; dataset.placement=device)"
    if requested == "host":
        return "host", f"sampled on the host and prefetched ({size} in host memory; dataset.placement=host)"
    if limit is None:
        return "device", f"sampled on device ({size}; device memory is host memory)"
    budget = DEVICE_DATA_FRACTION * limit
    if nbytes <= budget:
        return "device", f"sampled on device ({size} fit in {budget / 2**30:.1f} GiB, 40% of device memory)"
    return "host", (
        f"sampled on the host and prefetched ({size} exceed {budget / 2**30:.1f} GiB, 40% of device memory)"
    )


@dataclass(frozen=True)
class HostSampler:
    """Episodes gathered from host memory, for datasets kept off the accelerator.

    ``indices(split, keys)``: keys (B, 2) -> numpy indices of B episodes, computed by the same
    jax functions as the on-device sampler (run on the CPU), so a key gives the same episode
    either way. ``gather(split, idx)`` -> uint8 (B, n_way, k_shot + k_query, H, W, C).
    ``to_tasks`` (jittable) turns such a batch into float Tasks on the accelerator.
    """

    arrays: dict[str, dict[str, np.ndarray]]
    index_fns: dict[str, Callable[[jax.Array], Any]]
    to_tasks: Callable[[jax.Array], Task]

    def indices(self, split: str, keys: jax.Array) -> Any:
        cpu = jax.local_devices(backend="cpu")[0]
        return jax.device_get(self.index_fns[split](jax.device_put(keys, cpu)))

    def gather(self, split: str, idx: Any) -> np.ndarray:
        return self.arrays[split]["images"][idx]

    def batch_shape(self, split: str, idx: Any) -> tuple[int, ...]:
        """Shape of ``gather(split, idx)``, without gathering."""
        index_shape = np.broadcast_shapes(*(np.shape(a) for a in jax.tree.leaves(idx)))
        return tuple(index_shape) + self.arrays[split]["images"].shape[-3:]


def _split_layout(
    split: str, arr: Any, n_way: int, n_per_class: int, way_key: str = "dataset.n_way"
) -> tuple[dict[str, np.ndarray], int]:
    """The sampler's data for one split, and how many classes were dropped as too small.

    A class-indexed array (C, per_class, H, W, C) stays as it is ({"images"}); a
    :class:`ClassImages` becomes {"images" (N, ...), "offsets", "counts", "slots"} where
    ``slots`` = arange(largest count) carries that count as a static shape. Classes of a
    ClassImages with fewer than ``n_per_class`` images cannot be sampled and are dropped.
    """
    from metalearn.data.common import ClassImages

    k_msg = f"dataset.k_shot + dataset.k_query = {n_per_class}"
    if isinstance(arr, ClassImages):
        counts = np.asarray(arr.counts, np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        keep = np.flatnonzero(counts >= n_per_class)
        if len(keep) < n_way:
            raise ConfigError(
                f"invalid {way_key}={n_way} with {k_msg}: the {split} split has only {len(keep)} "
                f"classes with at least {n_per_class} images (of {len(counts)} classes)"
            )
        images = np.concatenate([arr.images[starts[c] : starts[c] + counts[c]] for c in keep])
        kept = counts[keep]
        offsets = np.concatenate([[0], np.cumsum(kept)[:-1]])
        layout = {
            "images": images,
            "offsets": offsets.astype(np.int32),
            "counts": kept.astype(np.int32),
            "slots": np.arange(int(kept.max()), dtype=np.int32),
        }
        return layout, len(counts) - len(keep)
    if arr.shape[0] < n_way:
        raise ConfigError(f"invalid {way_key}={n_way}: the {split} split has only {arr.shape[0]} classes")
    if arr.shape[1] < n_per_class:
        raise ConfigError(f"invalid {k_msg}: the {split} split has only {arr.shape[1]} images per class")
    return {"images": arr}, 0


def _episode_indices(data: dict[str, Any], key: jax.Array, n_way: int, n_per_class: int) -> Any:
    """Indices of one episode for a split's sampler data (see :func:`_split_layout`).

    A split whose data holds ``ways`` (the training split with ``dataset.n_way_train``) draws
    ``len(ways)`` classes instead of ``n_way``; like ``slots``, the array carries the number
    as a static shape.
    """
    if "ways" in data:
        n_way = data["ways"].shape[0]
    if "counts" in data:
        max_count = data["slots"].shape[0]
        return ragged_indices(key, data["offsets"], data["counts"], max_count, n_way, n_per_class)
    n_classes, per_class = data["images"].shape[:2]
    return uniform_indices(key, n_classes, per_class, n_way, n_per_class)


def joined_classes(first: Any, second: Any) -> Any:
    """The classes of two splits as one split: first's classes, then second's. Class-indexed
    arrays (C, per_class, H, W, ch) of equal per_class stay one; otherwise a ClassImages."""
    from metalearn.data.common import ClassImages

    plain = not isinstance(first, ClassImages) and not isinstance(second, ClassImages)
    if plain and first.shape[1:] == second.shape[1:]:
        return np.concatenate([first, second])

    def flat(split: Any) -> ClassImages:
        if isinstance(split, ClassImages):
            return split
        counts = np.full(split.shape[0], split.shape[1], np.int64)
        return ClassImages(split.reshape(-1, *split.shape[2:]), counts)

    a, b = flat(first), flat(second)
    return ClassImages(np.concatenate([a.images, b.images]), np.concatenate([a.counts, b.counts]))


# Layout key of a split whose tasks are rotated when sampled (dataset.rotation_sampling).
_ROTATE_MARK = "rotate_per_task"


def image_source(cfg: Any, arrays: dict[str, Any], placement: str | None = None) -> TaskSource:
    """Classification episodes from per-split images: class-indexed uint8 arrays
    (classes, per_class, H, W, C), or :class:`~metalearn.data.common.ClassImages` when
    classes differ in size (classes too small for the episode shape are dropped).

    ``cfg.k_query_test`` (when set) is the query size of the validation and test splits'
    episodes; ``cfg.rotation_sampling="per_task"`` rotates each sampled class by a random
    multiple of 90 degrees (:func:`rotate_classes`; device sampling only), in every split;
    ``"per_task_train_only"`` in the training split only (:mod:`metalearn.data.rotation`).

    Checks that every split can hold the requested episode shape. ``placement`` ("device",
    "host" or "auto"; default ``cfg.placement``) decides where episodes are sampled: on
    device, the arrays are moved to accelerator memory once and ``sample`` gathers from
    them inside jit; on the host, ``splits`` is empty and ``host`` gathers each batch.
    """
    if getattr(cfg, "train_on_validation", False) and "validation" in arrays:
        joined = joined_classes(arrays["train"], arrays["validation"])
        arrays = {**{k: v for k, v in arrays.items() if k != "validation"}, "train": joined}
    if getattr(cfg, "episodes", "fixed") == "variable":
        from metalearn.episodes_source import variable_image_source

        return variable_image_source(cfg, arrays, placement)
    n_way, k_shot, k_query = cfg.n_way, cfg.k_shot, cfg.k_query
    k_query_test = getattr(cfg, "k_query_test", None)
    rotation_sampling = getattr(cfg, "rotation_sampling", "classes")
    rotate_in = rotated_splits(rotation_sampling)
    # Training episodes may have more (or fewer) ways than evaluation ones (ProtoNets).
    n_way_train = getattr(cfg, "n_way_train", None) or n_way

    def per_class(split: str) -> int:
        """Images per class of one episode of ``split`` (evaluation splits: k_query_test)."""
        return k_shot + (k_query if split == "train" or k_query_test is None else k_query_test)

    layouts, dropped = {}, {}
    for split, arr in arrays.items():
        ways = n_way_train if split == "train" else n_way
        way_key = "dataset.n_way_train" if ways != n_way else "dataset.n_way"
        layouts[split], dropped[split] = _split_layout(split, arr, ways, per_class(split), way_key)
        if ways != n_way:
            layouts[split]["ways"] = np.zeros((ways,), np.uint8)
        if per_class(split) != k_shot + k_query:
            # The episode size rides along as a static shape (like "slots"), so the one
            # ``sample`` serves every split.
            layouts[split]["episode_slots"] = np.arange(per_class(split), dtype=np.int32)
        if split in rotate_in:
            # Its presence (a static part of the pytree) tells ``sample`` to rotate this
            # split's tasks; ``sample`` serves every split.
            layouts[split][_ROTATE_MARK] = np.zeros((1,), np.uint8)
    first = next(iter(layouts.values()))["images"]
    input_shape = tuple(first.shape[-3:])
    nbytes = sum(v.nbytes for layout in layouts.values() for v in layout.values())
    requested = placement or getattr(cfg, "placement", "device")
    where, note = choose_placement(requested, nbytes, device_memory_limit())
    if any(dropped.values()):
        note += "; classes with fewer than k_shot + k_query images dropped: " + ", ".join(
            f"{s} {n}" for s, n in dropped.items() if n
        )

    def sample(data: Any, key: jax.Array) -> Task:
        n = data["episode_slots"].shape[0] if "episode_slots" in data else k_shot + k_query
        if _ROTATE_MARK not in data:
            idx = _episode_indices(data, key, n_way, n)
            return episode_from_images(data["images"][idx], k_shot)
        key, rotation_key = jax.random.split(key)
        x = rotate_classes(data["images"][_episode_indices(data, key, n_way, n)], rotation_key)
        return episode_from_images(x, k_shot)

    if rotate_in and where == "host":
        raise ConfigError(
            f"invalid dataset.rotation_sampling={rotation_sampling!r}: needs episodes sampled on device, "
            f"but they would be {note} (use dataset.rotation_sampling=classes)"
        )
    if where == "device":
        splits = {name: jax.tree.map(jnp.asarray, layout) for name, layout in layouts.items()}
        host = None
    else:
        splits = {}
        index_fns = {}
        for name, layout in layouts.items():
            meta = {k: v for k, v in layout.items() if k != "images"}
            shape = layout["images"].shape
            n_split = per_class(name)

            def index_batch(keys, meta=meta, shape=shape, n=n_split):
                data = dict(jax.tree.map(jnp.asarray, meta), images=jax.ShapeDtypeStruct(shape, jnp.uint8))
                return jax.vmap(lambda key: _episode_indices(data, key, n_way, n))(keys)

            index_fns[name] = jax.jit(index_batch)
        to_tasks = jax.vmap(lambda x: episode_from_images(x, k_shot))
        host = HostSampler(layouts, index_fns, to_tasks)
    return TaskSource(
        "classification", input_shape, n_way, splits, sample, (0.0, 1.0), host=host, placement_note=note
    )


DATASETS = ("sinusoid", *IMAGE_DATASETS)


def load_image_arrays(cfg: Any) -> dict[str, Any]:
    """The per-split images of the image dataset ``cfg.name`` (a DatasetConfig), through the
    dataset's module in :data:`metalearn.data.IMAGE_DATASETS`."""
    if cfg.name not in IMAGE_DATASETS:
        raise ConfigError(f"invalid dataset.name={cfg.name!r}: must be one of {list(DATASETS)}")
    return load_dataset(cfg)


def build_task_source(cfg: Any) -> TaskSource:
    """The task source for ``cfg.dataset`` (a DatasetConfig)."""
    if cfg.name == "sinusoid":
        return sinusoid_source(cfg)
    if cfg.name == "multi":
        from metalearn.multisource import multi_task_source

        return multi_task_source(cfg)
    return image_source(cfg, load_image_arrays(cfg))


@schema("dataset", "sinusoid")
@dataclass
class SinusoidConfig(EpisodeConfig):
    """Sinusoid regression (MAML paper, section 5.1): y = A sin(x - phase) with amplitude
    A ~ U[amp_min, amp_max], phase ~ U[phase_min, phase_max], x ~ U[x_min, x_max]; k_shot and
    k_query points per task."""

    amp_min: float = 0.1
    amp_max: float = 5.0
    phase_min: float = 0.0
    phase_max: float = math.pi
    x_min: float = -5.0
    x_max: float = 5.0

    @classmethod
    def check(cls, d: Any, cfg: Any) -> None:
        EpisodeConfig.check(d, cfg)
        need(d.amp_max >= d.amp_min > 0, "dataset.amp_min", d.amp_min, "> 0 and <= dataset.amp_max")
        need(d.x_max > d.x_min, "dataset.x_max", d.x_max, "> dataset.x_min")
        need(d.phase_max >= d.phase_min, "dataset.phase_max", d.phase_max, ">= dataset.phase_min")
