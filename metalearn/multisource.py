"""``dataset=multi``: several image datasets as the sources of one run.

``dataset.sources`` lists the sources, each any image dataset config (``name`` picks its
schema: omniglot, mini_imagenet, cifar_fs, fc100, image_folder, tfds) with its own keys
(``manual_dir``, ``data_dir``, ``variant``, ``split``, ``path``, ``tfds_name`` ...) plus two of
its own: ``weight`` (> 0; its share of the training episodes is weight / sum of weights)
and ``label`` (its name in results; default: the dataset name, ``<name>_<index>`` when two
sources share one). The episode shape and the input are shared: ``dataset.n_way``,
``k_shot``, ``k_query``, ``n_way_train``, ``k_query_test``, ``image_size``, ``channels``
(and ``placement``, ``prefetch``, ``train_on_validation``) are set on ``dataset`` and given
to every source, which may not set them itself; ``dataset.data_dir`` is the default of a
source without its own.

Each source is loaded by its own module (:func:`metalearn.tasks.load_image_arrays`), its
images brought to ``image_size`` squared and ``channels`` (:func:`conform`: greyscale repeated
to 3 channels, colour to luma for 1), and made a task source of its own by
:func:`metalearn.tasks.image_source`, exactly as it would be alone. The multi-source sampler
(:func:`mixed_sample`) draws each episode from ONE source: the source is drawn from the
episode's key (fold_in(key, SOURCE_CHOICE_SALT), by the weights; the episode keys derive
from fold_in(train key, step)), then the episode from that source's own sampler with the
episode's key. Whatever episode sampler a source is configured with is used as it is, so a
different sampler (e.g. variable ways and shots) composes with the choice of the source.

Evaluation is per source (:mod:`metalearn.evaluation`): each source's tasks are those of that
source evaluated alone with the same seed, and the summary is the mean over sources with its
95% interval (:func:`combine_summaries`). Episodes are sampled on device only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from PIL import Image

from metalearn.config import need, schema, schemas
from metalearn.data.common import ClassImages, ImageDatasetConfig
from metalearn.errors import ConfigError, DataError

# Keys of ``dataset`` shared by every source (a source may not set them).
SHARED_KEYS = (
    "n_way",
    "k_shot",
    "k_query",
    "n_way_train",
    "k_query_test",
    "image_size",
    "placement",
    "prefetch",
    "train_on_validation",
    # The episode rule (metalearn/episodes.py): one for all sources, so that every source's
    # sampler returns the same padded shapes (lax.switch picks among them).
    "episodes",
    "min_ways",
    "max_ways",
    "max_support",
    "max_query",
    "padding",
)
# Sources whose images have one size only (their schema refuses any other image_size); their
# images are resized to dataset.image_size after loading.
NATIVE_SIZE = {"cifar_fs": 32, "fc100": 32}
# Datasets that cannot be a source: regression, and multi itself.
NOT_SOURCES = ("sinusoid", "multi")
# fold_in tag of the key that picks an episode's source (the episode itself is drawn from the
# episode key unchanged, as the source alone would draw it).
SOURCE_CHOICE_SALT = 0x50C


class SourceEntry(NamedTuple):
    """One parsed ``dataset.sources[index]``: its label, weight and config section (a struct
    DictConfig of its dataset's schema, shared keys filled in)."""

    index: int
    label: str
    weight: float
    config: Any
    own_keys: tuple[str, ...]  # the keys the source sets itself (besides name, weight, label)

    @property
    def where(self) -> str:
        return f"dataset.sources[{self.index}] ({self.label})"


def _source_values(index: int, raw: Any) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    key = f"dataset.sources[{index}]"
    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    need(isinstance(raw, dict), key, raw, "a mapping with a name (e.g. {name: omniglot, weight: 1})")
    return dict(raw)


def source_entries(d: Any) -> list[SourceEntry]:
    """Parse ``dataset.sources`` of a multi config ``d``: ConfigError (one line, naming the
    key) for an empty list, an unknown dataset, a key its dataset does not have, a shared
    key set on a source, a weight that is not > 0, or two sources with the same label."""
    from omegaconf.errors import OmegaConfBaseException

    from metalearn.config import section_config

    sources = list(d.sources or [])
    need(bool(sources), "dataset.sources", sources, "a non-empty list of sources, e.g. [{name: omniglot}]")
    # Sources without a label of their own that share a name get their index in the default.
    names = [s.get("name") if hasattr(s, "get") and not s.get("label") else None for s in sources]
    allowed = sorted(n for n in schemas("dataset") if n not in NOT_SOURCES)
    entries, labels = [], set()
    for index, raw in enumerate(sources):
        values = _source_values(index, raw)
        key = f"dataset.sources[{index}]"
        name = values.pop("name", None)
        need(name in allowed, f"{key}.name", name, f"one of {allowed}")
        weight = values.pop("weight", 1.0)
        need(
            isinstance(weight, int | float)
            and not isinstance(weight, bool)
            and math.isfinite(weight)
            and weight > 0,
            f"{key}.weight",
            weight,
            "a number > 0",
        )
        default_label = name if names.count(name) == 1 else f"{name}_{index}"
        label = str(values.pop("label", None) or default_label)
        need(label not in labels, f"{key}.label", label, "distinct from the other sources' labels")
        labels.add(label)
        for shared in SHARED_KEYS + ("channels",):
            need(
                shared not in values,
                f"{key}.{shared}",
                values.get(shared),
                f"unset: use dataset.{shared}, shared by all sources",
            )
        fields = schemas("dataset")[name].__dataclass_fields__
        for own in values:
            need(own in fields, f"{key}.{own}", values[own], f"a key of dataset={name} (it has no {own!r})")
        shared_values = {k: d[k] for k in SHARED_KEYS if k in fields}
        shared_values["image_size"] = NATIVE_SIZE.get(name, d.image_size)
        if "channels" in fields:
            shared_values["channels"] = d.channels
        if "data_dir" in fields and values.get("data_dir") is None:
            values["data_dir"] = d.data_dir
        try:
            config = section_config("dataset", {"name": name, **shared_values, **values})
        except OmegaConfBaseException as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(f"invalid {key}: {first}") from None
        entries.append(SourceEntry(index, label, float(weight), config, tuple(values)))
    return entries


def in_source(entry: SourceEntry, action, *args):
    """``action(*args)``, its ConfigError or DataError naming the source: a key the source
    set itself as ``dataset.sources[i].<key>``, otherwise (a shared key such as
    dataset.n_way, or a data problem) prefixed with ``dataset.sources[i] (<label>):``."""
    try:
        return action(*args)
    except (ConfigError, DataError) as err:
        message = str(err)
        own = re.match(r"invalid dataset\.(\w+)", message)
        if own and own.group(1) in entry.own_keys:
            raise type(err)(message.replace("dataset.", f"dataset.sources[{entry.index}].", 1)) from None
        raise type(err)(f"{entry.where}: {message}") from None


def conform(splits: dict[str, Any], image_size: int, channels: int) -> dict[str, Any]:
    """A source's splits (class-indexed uint8 (C, P, H, W, ch) arrays or ClassImages) as
    ``image_size`` squared images with ``channels`` channels: resized with PIL LANCZOS,
    greyscale repeated to 3 channels, colour converted to luma (PIL "L") for 1. Splits that
    already have that shape are returned as they are."""
    from metalearn.data.pipeline import resize_images

    def images(flat: np.ndarray) -> np.ndarray:
        if flat.shape[1] != image_size:
            grey = flat.shape[-1] == 1
            flat = resize_images(flat[..., 0] if grey else flat, image_size)
            flat = flat[..., None] if grey else flat
        if flat.shape[-1] == channels:
            return flat
        if channels == 3:
            return np.repeat(flat, 3, axis=-1)
        return np.stack([np.asarray(Image.fromarray(img).convert("L"))[..., None] for img in flat])

    out = {}
    for split, value in splits.items():
        if isinstance(value, ClassImages):
            out[split] = ClassImages(images(value.images), value.counts)
        else:
            flat = images(value.reshape(-1, *value.shape[2:]))
            out[split] = flat.reshape(*value.shape[:2], *flat.shape[1:])
    return out


def source_choice(key: jax.Array, weights: tuple[float, ...]) -> jax.Array:
    """The index of the source an episode with key ``key`` is drawn from: categorical with
    probabilities ``weights`` / sum, from fold_in(key, SOURCE_CHOICE_SALT)."""
    logits = jnp.log(jnp.asarray(weights, jnp.float32))
    return jax.random.categorical(jax.random.fold_in(key, SOURCE_CHOICE_SALT), logits)


def mixed_sample(samplers: tuple, weights: tuple[float, ...]):
    """``sample(data, key) -> Task`` over sources: ``data`` is the tuple of the sources' own
    sampler data, ``samplers`` their ``sample`` functions (each returning the same shapes).
    The episode is ``samplers[i](data[i], key)`` for i = :func:`source_choice` (key, weights).
    Under vmap ``lax.switch`` computes every source's episode and selects one; the draw is
    the same either way."""

    def sample(data: tuple, key: jax.Array):
        branches = [lambda d, k, i=i: samplers[i](d[i], k) for i in range(len(samplers))]
        return lax.switch(source_choice(key, weights), branches, data, key)

    return sample


def multi_task_source(d: Any):
    """The TaskSource of a multi config ``d``: one part per source (its own TaskSource, for
    per-source evaluation) and, per split, the mixed sampler over them."""
    from metalearn.tasks import (
        TaskSource,
        choose_placement,
        device_memory_limit,
        image_source,
        load_image_arrays,
    )

    entries = source_entries(d)
    loaded = []
    for entry in entries:
        arrays = in_source(entry, load_image_arrays, entry.config)
        loaded.append(conform(arrays, int(d.image_size), int(d.channels)))
    nbytes = sum(_nbytes(v) for arrays in loaded for v in arrays.values())
    where, note = choose_placement(d.placement, nbytes, device_memory_limit())
    if where != "device":
        raise ConfigError(
            f"invalid dataset.placement={d.placement!r} with dataset=multi: multi-source episodes are "
            f"sampled on device only, but the sources would be {note}"
        )
    parts = tuple(
        (entry.label, in_source(entry, image_source, entry.config, arrays, "device"))
        for entry, arrays in zip(entries, loaded, strict=True)
    )
    shared_splits = set.intersection(*(set(part.splits) for _, part in parts))
    first = parts[0][1]
    weights = tuple(entry.weight for entry in entries)
    total = sum(weights)
    shares = ", ".join(f"{e.label} {e.weight / total:.0%}" for e in entries)
    return TaskSource(
        "classification",
        first.input_shape,
        first.output_dim,
        {split: tuple(part.splits[split] for _, part in parts) for split in sorted(shared_splits)},
        mixed_sample(tuple(part.sample for _, part in parts), weights),
        first.input_range,
        placement_note=f"{note}; training episodes by source: {shares}",
        parts=parts,
        padded=first.padded,
        row_chunk=first.row_chunk,
    )


def _nbytes(value: Any) -> int:
    return value.images.nbytes if isinstance(value, ClassImages) else value.nbytes


def combine_summaries(by_source: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The summary of a multi-source evaluation from each source's (``summarize``): mean =
    the mean of the sources' means (every source counts the same, whatever its tasks);
    ci95 = 1.96 * sqrt(sum_i s_i^2 / n_i) / S, the 95% half-width of that mean with the
    sources' per-task standard deviations s_i (recovered from their ci95) and task counts
    n_i; n_tasks = sum n_i; and the sources' summaries under ``sources``. A ``loss`` is
    averaged over sources like the mean."""
    summaries = list(by_source.values())
    s = len(summaries)
    variance = sum((x["ci95"] / 1.96) ** 2 for x in summaries)  # sum of s_i^2 / n_i
    combined = {
        "metric": summaries[0]["metric"],
        "mean": sum(x["mean"] for x in summaries) / s,
        "ci95": 1.96 * math.sqrt(variance) / s,
        "n_tasks": sum(x["n_tasks"] for x in summaries),
    }
    if all("loss" in x for x in summaries):
        combined["loss"] = sum(x["loss"] for x in summaries) / s
    return {**combined, "sources": by_source}


@schema("dataset", "multi")
@dataclass
class MultiSourceConfig(ImageDatasetConfig):
    """Several image datasets in one run: sources (a list of dataset configs, each with its
    name, its own keys, weight and label; see the module docstring); every source's images
    become image_size squared with channels channels (1 or 3)."""

    sources: list[Any] = field(default_factory=list)
    channels: int = 3

    @classmethod
    def check(cls, d: Any, cfg: Any) -> None:
        super().check(d, cfg)
        need(d.channels in (1, 3), "dataset.channels", d.channels, "1 (grey) or 3 (RGB)")
        need(
            d.placement in ("auto", "device"),
            "dataset.placement",
            d.placement,
            "auto or device with dataset=multi (multi-source episodes are sampled on device)",
        )
        algo = cfg.get("algo") if hasattr(cfg, "get") else None
        if algo is not None:
            need(
                algo.name != "pretrain",
                "algo.name",
                algo.name,
                "an episodic algorithm with dataset=multi (pretrain's global classes span one dataset)",
            )
        entries = source_entries(d)
        check_folders_given(entries)
        for entry in entries:
            in_source(entry, schemas("dataset")[entry.config.name].check, entry.config, cfg)


def check_folders_given(entries: list[SourceEntry]) -> None:
    """ConfigError (one line) naming every image_folder source whose ``path`` is unset, with
    the key to set for each: a preset that lists sources whose files are not on this machine
    (conf/experiment/*_metadataset_*.yaml) names all of them at once, where each source's
    own check would stop at the first. (A path that is set but no folder is the source's own
    check's error, naming that key.)"""
    missing = [
        e
        for e in entries
        if e.config.name == "image_folder" and (e.config.path is None or not str(e.config.path).strip())
    ]
    if missing:
        listed = ", ".join(f"{e.label} (dataset.sources.{e.index}.path={e.config.path})" for e in missing)
        raise ConfigError(
            f"invalid dataset.sources: {len(missing)} source(s) without their files: {listed}; "
            "set each path to that dataset's image folder, or leave the source out"
        )
