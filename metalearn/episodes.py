"""Variable-way, variable-shot episodes (``dataset.episodes=variable``): the Meta-Dataset
protocol, padded with masks to one fixed shape so one compiled step serves every episode.

The rules and constants are those of Triantafillou et al., "Meta-Dataset" (ICLR 2020),
Sec. 3.2 and Appendix, as implemented in google-research/meta-dataset
``meta_dataset/data/sampling.py`` (``sample_num_ways_uniformly``, ``compute_num_query``,
``sample_support_set_size``, ``sample_num_support_per_class``); this is our own jax code.
For one episode of a split with C classes (class c holding n_c >= 2 images):

1. ways W ~ uniform on {min_ways, ..., min(max_ways, C)} (paper: 5 and 50);
2. W distinct classes uniformly, in random order (label j = the j-th class drawn);
3. queries per class Q = min(max_query, floor(min over the chosen classes of n_c / 2))
   (paper: max_query 10), the same for every class;
4. beta ~ U(0, 1]; support size S = min(max_support, sum_c ceil(beta * min(100, n_c - Q)))
   (paper: max_support 500, 100 the largest contribution of one class);
5. shots: w_c = n_c * exp(u_c), u_c ~ U(log 0.5, log 2); k_c = min(n_c - Q,
   floor(w_c / sum w * (S - W)) + 1), so every class has at least one shot;
6. each class's images are drawn without replacement: Q for the query set, k_c of the
   others for the support set.

Padding (the representation every algorithm reads; shapes static per run):

- support_x: (max_support, H, W, C) float, support_y: (max_support,) int32;
- query_x: (max_ways * max_query, H, W, C) float, query_y: (max_ways * max_query,) int32.

Real examples come first (class-major), padding after. A padded row has label -1 and an
image that is all NaN: the label masks the losses and accuracy (:func:`masked_loss`,
:func:`masked_metric`: means over real rows only), the NaN marks the row for the models,
whose first operation replaces padded rows by zeros and whose BatchNorm layers take their
statistics over the real rows only (``padded_rows`` in metalearn/models). So the mask
reaches every forward pass (adaptation, prediction, evaluation, attacks, each
``model.bn_stats`` mode) without any change to the MetaLearner contract; NaN survives the
attacks' additions and clipping, so a padded row stays padded. Ways are not padded in the
labels: the episode's ways are the labels 0..W-1, W = 1 + the largest real label (every
way has at least one support and one query example), and logits of the ways W..max_ways-1
are masked out of the softmax and the argmax. Models with a linear head therefore have
max_ways outputs, as Meta-Dataset's learners (``MAX_WAY = 50`` in its learner.py).

Masking alone makes padding change no number mathematically (``dataset.padding=masked``:
equal to float64 rounding); that it changes no bit is the row chunks' work
(``dataset.padding=exact``, the default; metalearn/rows.py): models, losses and prototypes of
a padded episode are computed ``ROW_CHUNK`` rows at a time.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from metalearn.rows import sum_rows

# Meta-Dataset's constants (sampling.py's EpisodeDescriptionConfig defaults, the paper's).
MIN_WAYS = 5
MAX_WAYS = 50
MAX_QUERY = 10
MAX_SUPPORT = 500
MAX_SUPPORT_CONTRIBUTION_PER_CLASS = 100
MIN_LOG_WEIGHT = math.log(0.5)
MAX_LOG_WEIGHT = math.log(2.0)
# Label of a padded example.
PAD_LABEL = -1


def bounds_of(cfg: Any) -> dict[str, int]:
    """The bounds of a DatasetConfig with ``episodes=variable``."""
    return {k: int(getattr(cfg, k)) for k in ("min_ways", "max_ways", "max_support", "max_query")}


def episode_composition(
    key: jax.Array, counts: jax.Array, bounds: dict[str, int]
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """The composition of one episode over classes of ``counts`` (C,) images each (>= 2).

    Returns (classes (max_ways,) int32 class ids, real where way_mask; way_mask
    (max_ways,) bool; ways () int32; queries () int32 per class; shots (max_ways,) int32,
    0 for absent ways). Jittable: C and the bounds are static.
    """
    n_classes = counts.shape[0]
    max_ways = bounds["max_ways"]
    slots = min(max_ways, n_classes)
    k_ways, k_classes, k_beta, k_weights = jax.random.split(key, 4)
    ways = jax.random.randint(k_ways, (), bounds["min_ways"], slots + 1)
    order = jax.random.permutation(k_classes, n_classes)[:slots]
    classes = jnp.zeros((max_ways,), jnp.int32).at[:slots].set(order.astype(jnp.int32))
    way_mask = jnp.arange(max_ways) < ways
    n = jnp.where(way_mask, counts[classes], 0)
    big = jnp.iinfo(jnp.int32).max
    queries = jnp.minimum(bounds["max_query"], jnp.min(jnp.where(way_mask, n // 2, big)))
    remaining = jnp.where(way_mask, n - queries, 0)
    # beta in (0, 1]: 1 - U[0, 1); ceil(beta * m) as in sampling.py's floor(beta' * m + 1).
    beta = 1.0 - jax.random.uniform(k_beta, (), jnp.float32)
    contribution = jnp.minimum(MAX_SUPPORT_CONTRIBUTION_PER_CLASS, remaining).astype(jnp.float32)
    support = jnp.minimum(bounds["max_support"], jnp.sum(jnp.ceil(beta * contribution)).astype(jnp.int32))
    log_w = jax.random.uniform(k_weights, (max_ways,), jnp.float32, MIN_LOG_WEIGHT, MAX_LOG_WEIGHT)
    weights = jnp.where(way_mask, n.astype(jnp.float32) * jnp.exp(log_w), 0.0)
    share = weights / jnp.sum(weights)
    shots = jnp.floor(share * (support - ways).astype(jnp.float32)).astype(jnp.int32) + 1
    shots = jnp.where(way_mask, jnp.minimum(shots, remaining), 0)
    return classes, way_mask, ways, queries, shots


def _compact(valid: jax.Array, index: jax.Array, labels: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """The entries of ``index``/``labels`` (flat) where ``valid``, in order, in ``size`` slots
    (the rest index 0, label -1); at most ``size`` entries may be valid."""
    position = jnp.where(valid, jnp.cumsum(valid) - 1, size)
    out_index = jnp.zeros((size,), jnp.int32).at[position].set(index.astype(jnp.int32), mode="drop")
    out_labels = jnp.full((size,), PAD_LABEL, jnp.int32).at[position].set(labels, mode="drop")
    return out_index, out_labels


def variable_episode_indices(
    key: jax.Array, offsets: jax.Array, counts: jax.Array, max_count: int, bounds: dict[str, int]
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Flat image indices and labels of one variable episode over images grouped by class
    (class c at ``offsets[c] : offsets[c] + counts[c]``; ``max_count`` static, the largest).

    Returns support index (max_support,), support labels (max_support,), query index
    (max_ways * max_query,), query labels (same); padded slots have label -1 (index 0).
    """
    k_composition, k_images = jax.random.split(key)
    classes, way_mask, _, queries, shots = episode_composition(k_composition, counts, bounds)
    max_ways = bounds["max_ways"]
    # A uniform order of each class's images: slots past its count scored +inf.
    scores = jax.random.uniform(k_images, (max_ways, max_count))
    slot = jnp.arange(max_count)
    scores = jnp.where(slot[None, :] < counts[classes][:, None], scores, jnp.inf)
    flat = offsets[classes][:, None] + jnp.argsort(scores, axis=-1)  # (max_ways, max_count)
    label = jnp.broadcast_to(jnp.arange(max_ways, dtype=jnp.int32)[:, None], flat.shape)
    is_query = way_mask[:, None] & (slot[None, :] < queries)
    is_support = way_mask[:, None] & (slot[None, :] >= queries) & (slot[None, :] < queries + shots[:, None])
    support_index, support_labels = _compact(
        is_support.reshape(-1), flat.reshape(-1), label.reshape(-1), bounds["max_support"]
    )
    query_index, query_labels = _compact(
        is_query.reshape(-1), flat.reshape(-1), label.reshape(-1), max_ways * bounds["max_query"]
    )
    return support_index, support_labels, query_index, query_labels


def padded_images(images: jax.Array, labels: jax.Array) -> jax.Array:
    """uint8 images (N, H, W, C) -> float in [0, 1], rows with label -1 all NaN."""
    x = images.astype(jnp.float32) / 255.0
    real = (labels != PAD_LABEL).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(real, x, jnp.nan)


def way_mask_of(y: jax.Array, n_out: int) -> jax.Array:
    """(n_out,) bool: the episode's ways, 0..max(y) (labels y (N,), -1 for padding)."""
    return jnp.arange(n_out) <= jnp.max(y)


def masked_logits(pred: jax.Array, y: jax.Array) -> jax.Array:
    """Logits pred (N, n_out) with the ways absent from the episode set to -inf."""
    return jnp.where(way_mask_of(y, pred.shape[-1])[None, :], pred, -jnp.inf)


def masked_loss(pred: jax.Array, y: jax.Array, chunk: int) -> jax.Array:
    """Mean softmax cross-entropy over the real rows (y != -1), absent ways masked; computed
    ``chunk`` rows at a time (metalearn/rows.py; 0: at once), so padding changes no bit of it."""
    ways = way_mask_of(y, pred.shape[-1])
    real = (y != PAD_LABEL).astype(pred.dtype)

    def chunk_sum(chunk: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        logits, labels, weight = chunk
        masked = jnp.where(ways[None, :], logits, -jnp.inf)
        ce = optax.softmax_cross_entropy_with_integer_labels(masked, jnp.maximum(labels, 0))
        return jnp.sum(jnp.where(weight > 0, ce, 0.0))

    return sum_rows(chunk_sum, (pred, y, real), chunk) / jnp.maximum(jnp.sum(real), 1)


def masked_metric(pred: jax.Array, y: jax.Array) -> jax.Array:
    """Accuracy over the real rows, the argmax over the episode's ways only."""
    real = y != PAD_LABEL
    hit = (jnp.argmax(masked_logits(pred, y), axis=-1) == y) & real
    return jnp.sum(hit) / jnp.maximum(jnp.sum(real), 1)
