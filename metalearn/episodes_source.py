"""The task source of ``dataset.episodes=variable``: Meta-Dataset episodes
(metalearn/episodes.py) sampled on device from the per-split images of any image dataset."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.episodes import bounds_of, padded_images, variable_episode_indices
from metalearn.errors import ConfigError
from metalearn.rows import ROW_CHUNK
from metalearn.tasks import Task, TaskSource, choose_placement, device_memory_limit


def flat_layout(split: str, arr: Any, min_ways: int) -> tuple[dict[str, np.ndarray], int]:
    """{"images" (N, H, W, C), "offsets", "counts", "slots"} of one split (a class-indexed
    array or a ClassImages; see tasks._split_layout), classes with fewer than 2 images
    dropped (an episode's query takes half the smallest class); and how many were."""
    from metalearn.data.common import ClassImages

    if isinstance(arr, ClassImages):
        images, counts = arr.images, np.asarray(arr.counts, np.int64)
    else:
        images, counts = arr.reshape((-1, *arr.shape[2:])), np.full(arr.shape[0], arr.shape[1], np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    keep = np.flatnonzero(counts >= 2)
    if len(keep) < min_ways:
        raise ConfigError(
            f"invalid dataset.min_ways={min_ways}: the {split} split has only {len(keep)} classes "
            f"with at least 2 images (of {len(counts)} classes)"
        )
    if len(keep) < len(counts):
        images = np.concatenate([images[starts[c] : starts[c] + counts[c]] for c in keep])
    kept = counts[keep]
    layout = {
        "images": images,
        "offsets": np.concatenate([[0], np.cumsum(kept)[:-1]]).astype(np.int32),
        "counts": kept.astype(np.int32),
        "slots": np.arange(int(kept.max()), dtype=np.int32),
    }
    return layout, len(counts) - len(keep)


def variable_image_source(cfg: Any, arrays: dict[str, Any], placement: str | None = None) -> TaskSource:
    """Variable-way, variable-shot episodes of ``arrays`` (split -> images), padded to the
    bounds of ``cfg`` (metalearn/episodes.py); the model's head has ``cfg.max_ways`` outputs.
    Sampled on device only (dataset.placement=host is refused)."""
    bounds = bounds_of(cfg)
    if getattr(cfg, "rotation_sampling", "classes") != "classes":
        raise ConfigError(
            f"invalid dataset.rotation_sampling={cfg.rotation_sampling!r} with dataset.episodes=variable: "
            "use dataset.rotation_sampling=classes"
        )
    for key in ("n_way_train", "k_query_test"):
        if getattr(cfg, key, None) is not None:
            raise ConfigError(
                f"invalid dataset.{key}={getattr(cfg, key)!r} with dataset.episodes=variable: "
                "variable episodes draw their ways and queries themselves (set it to null)"
            )
    layouts, dropped = {}, {}
    for split, arr in arrays.items():
        layouts[split], dropped[split] = flat_layout(split, arr, bounds["min_ways"])
    input_shape = tuple(next(iter(layouts.values()))["images"].shape[-3:])
    nbytes = sum(v.nbytes for layout in layouts.values() for v in layout.values())
    where, note = choose_placement(
        placement or getattr(cfg, "placement", "device"), nbytes, device_memory_limit()
    )
    if where != "device":
        raise ConfigError(
            f"invalid dataset.placement={getattr(cfg, 'placement', None)!r} with dataset.episodes=variable: "
            f"variable episodes are sampled on device, but would be {note} (use dataset.placement=device)"
        )
    note += (
        f"; variable episodes (Meta-Dataset): {bounds['min_ways']}-{bounds['max_ways']} ways, "
        f"support <= {bounds['max_support']}, queries <= {bounds['max_query']} per class, padded"
    )
    if any(dropped.values()):
        note += "; classes with fewer than 2 images dropped: " + ", ".join(
            f"{s} {n}" for s, n in dropped.items() if n
        )

    def sample(data: Any, key: jax.Array) -> Task:
        max_count = data["slots"].shape[0]
        sidx, sy, qidx, qy = variable_episode_indices(key, data["offsets"], data["counts"], max_count, bounds)
        return Task(padded_images(data["images"][sidx], sy), sy, padded_images(data["images"][qidx], qy), qy)

    splits = {name: jax.tree.map(jnp.asarray, layout) for name, layout in layouts.items()}
    return TaskSource(
        "classification",
        input_shape,
        bounds["max_ways"],
        splits,
        sample,
        (0.0, 1.0),
        host=None,
        placement_note=note,
        padded=True,
        row_chunk=ROW_CHUNK if getattr(cfg, "padding", "exact") == "exact" else 0,
    )
