"""Supervised pre-training on all training classes (Chen et al. 2019, "A Closer Look at
Few-shot Classification": Baseline and Baseline++; the pre-training of RFS, Tian et al.
2020, and of FEAT and UNICORN-MAML).

Training is ordinary classification, not episodes: each meta-step takes a mini-batch of
``trainer.meta_batch_size`` (image, global class) pairs drawn uniformly from the images of
the training split (:func:`classification_batches`: each "task" of the batch is one labelled
image) and minimises the cross-entropy over all C training classes of

- ``algo.head=linear`` (Baseline, RFS): logits = W^T z + b, the model's own ``head`` layer
  with C outputs;
- ``algo.head=cosine`` (Baseline++): logits_k = s cos(z, w_k), the scaled cosine
  similarity between the features z = f(x) and class weight vectors w_k (kernel (D, C), no
  bias), s = ``algo.cosine_scale`` (fixed, as in Chen et al.).

Validation and test are few-shot episodes on their own classes, adapted by nearest class
mean on the features (Euclidean, ProtoNet's rule): ``eval.checkpoint=best`` then selects the
parameters by few-shot accuracy on the validation classes, as FEAT's pretrain.py does. Any other
rule of ``eval.adaptation`` (metalearn/adaptation.py) applies: Baseline's fine-tuned head
(finetune_head), RFS's logistic regression (linear_probe), cosine nearest class mean. The
papers' optimisers: Chen et al. Adam, lr 1e-3, batch 16 (400 epochs for Conv4/ResNet);
RFS SGD lr 0.05, momentum 0.9, weight decay 5e-4, batch 64, lr x 0.1 after epochs 60 and 80
of 100 (optim.* and trainer.* keys; the presets set them, with their sources and deviations).
No data augmentation here.

State: meta_params = the model's parameters with a C-way head; adapted = prototypes.
``model.init_from`` of another run then takes the backbone (metalearn/backbone.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.algos.base import MetaLearner, Problem, stateless_learner
from metalearn.algos.protonet import distance_logits, embed, prototypes
from metalearn.config import ChoiceConfig, finite, need, one_of, schema
from metalearn.errors import ConfigError
from metalearn.models import with_outputs
from metalearn.tasks import Task, TaskSource

HEADS = ("linear", "cosine")
# Marks the training split's data: ``sample`` draws one labelled image, not an episode. Its
# length is the number of training classes (a static shape, like the samplers' "slots").
CLASSES_MARK = "pretrain_classes"


@schema("algo", "pretrain")
@dataclass
class PretrainConfig(ChoiceConfig):
    """head: "linear" (Baseline, RFS) or "cosine" (Baseline++: scaled cosine similarity,
    scale cosine_scale). The mini-batch is trainer.meta_batch_size images."""

    head: str = "linear"
    cosine_scale: float = 10.0

    @classmethod
    def check(cls, a: Any, cfg: Any) -> None:
        one_of(a.head, "algo.head", HEADS)
        need(finite(a.cosine_scale) and a.cosine_scale > 0, "algo.cosine_scale", a.cosine_scale, "> 0")
        need(cfg.dataset.name != "sinusoid", "algo.name", "pretrain", "used with an image dataset")
        placement = cfg.dataset.get("placement", "device")
        need(placement != "host", "dataset.placement", placement, "device or auto for algo=pretrain")
        episodes = cfg.dataset.get("episodes", "fixed")
        need(
            episodes == "fixed",
            "dataset.episodes",
            episodes,
            "fixed for algo=pretrain (it trains on class batches)",
        )


def n_classes_of(train_data: Any) -> int:
    """Classes of a training split's sampler data (class-indexed array or ragged layout)."""
    if CLASSES_MARK in train_data:
        return int(train_data[CLASSES_MARK].shape[0])
    if "counts" in train_data:
        return int(train_data["counts"].shape[0])
    return int(train_data["images"].shape[0])


def classification_batches(source: TaskSource) -> TaskSource:
    """``source`` whose training split yields one (image, global class) pair per sampled
    "task": support and query x (1, *input) float32 in [0, 1], y (1,) the class index in
    [0, C). The image is uniform over the split's images. Other splits: episodes as before."""
    if source.host is not None:
        raise ConfigError("invalid dataset.placement=host for algo=pretrain: it samples on the device")
    train = dict(source.splits["train"])
    n_classes = n_classes_of(train)
    train[CLASSES_MARK] = np.zeros((n_classes,), np.uint8)
    episode = source.sample

    def sample(data: Any, key: jax.Array) -> Task:
        if CLASSES_MARK not in data:
            return episode(data, key)
        if "counts" in data:
            i = jax.random.randint(key, (), 0, data["images"].shape[0])
            y = jnp.searchsorted(data["offsets"], i, side="right") - 1
            image = data["images"][i]
        else:
            c, per_class = data["images"].shape[:2]
            i = jax.random.randint(key, (), 0, c * per_class)
            y, image = i // per_class, data["images"][i // per_class, i % per_class]
        x = image.astype(jnp.float32)[None] / 255.0
        y = y.astype(jnp.int32)[None]
        return Task(x, y, x, y)

    return dataclasses.replace(source, splits={**source.splits, "train": train}, sample=sample)


def cosine_head_logits(z: jax.Array, kernel: jax.Array, scale: float) -> jax.Array:
    """Baseline++: s cos(z_i, w_k) for features z (B, D) and kernel (D, C): (B, C)."""
    zn = z / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(z), -1, keepdims=True), 1e-12))
    wn = kernel / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(kernel), 0, keepdims=True), 1e-12))
    return scale * zn @ wn


def make_pretrain(cfg: Any, problem: Problem) -> MetaLearner:
    """cfg: a PretrainConfig; ``problem.source`` from :func:`classification_batches` (its
    training split gives C, the head's outputs)."""
    source = problem.source
    n_classes = n_classes_of(source.splits["train"])
    model = with_outputs(problem.model, n_classes)

    def init(key: jax.Array) -> Any:
        params = model.init(key)
        if cfg.head == "cosine":
            params = {**params, "head": {"kernel": params["head"]["kernel"]}}
        return params

    def class_logits(params: Any, x: jax.Array) -> jax.Array:
        if cfg.head == "linear":
            return model.apply(params, x)
        z = embed(model, {k: v for k, v in params.items() if k != "head"}, x)
        return cosine_head_logits(z, params["head"]["kernel"], cfg.cosine_scale)

    def meta_grad(params: Any, tasks: Task, key: jax.Array):
        del key
        x = tasks.support_x.reshape((-1, *tasks.support_x.shape[2:]))
        y = tasks.support_y.reshape(-1)

        def loss_fn(p):
            logits = class_logits(p, x)
            return source.loss(logits, y), source.metric(logits, y)

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, {"loss": loss, source.metric_name: accuracy}

    def backbone(params: Any) -> Any:
        return {k: v for k, v in params.items() if k != "head"}

    def adapt(params: Any, support_x: jax.Array, support_y: jax.Array, key: jax.Array, steps: int) -> Any:
        del key, steps
        return prototypes(embed(model, backbone(params), support_x), support_y)

    def predict(params: Any, protos: Any, x: jax.Array) -> jax.Array:
        return distance_logits(embed(model, backbone(params), x), protos)

    return stateless_learner(init=init, meta_grad=meta_grad, adapt=adapt, predict=predict)
