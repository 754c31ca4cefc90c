"""algo=pretrain (metalearn/algos/pretrain.py): supervised pre-training over all training
classes in mini-batches, with a linear or Baseline++ cosine head, evaluated by nearest class
mean on few-shot episodes; its backbone then starts another run (model.init_from)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_cfg, synthetic_image_arrays

from metalearn.algos import Problem, make_algorithm
from metalearn.algos.pretrain import classification_batches, cosine_head_logits
from metalearn.algos.protonet import embed
from metalearn.models import make_model, with_outputs
from metalearn.tasks import image_source


def test_cosine_head_hand_derived(float64):
    """Features (3, 4) and (0, -2); class vectors e1, e2 and (1, 1) as kernel columns."""
    z = jnp.array([[3.0, 4.0], [0.0, -2.0]])
    kernel = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    r = 1 / math.sqrt(2)
    want = 2.0 * np.array([[0.6, 0.8, 1.4 * r], [0.0, -1.0, -r]])
    np.testing.assert_allclose(np.asarray(cosine_head_logits(z, kernel, 2.0)), want, rtol=1e-14, atol=1e-14)


def _problem(head: str):
    cfg = make_cfg(
        algo={"name": "pretrain", "head": head},
        dataset={"name": "omniglot", "n_way": 3, "k_shot": 1, "k_query": 2},
        model={"name": "conv4", "filters": 4, "blocks": 2},
    )
    arrays = synthetic_image_arrays(n_classes=6, per_class=8, size=8)
    source = classification_batches(image_source(cfg.dataset, arrays))
    model = make_model(cfg.model, source.input_shape, source.output_dim)
    return cfg, arrays, source, model


def test_training_batches_are_labelled_images_of_all_classes():
    _, arrays, source, _ = _problem("linear")
    keys = jax.random.split(jax.random.PRNGKey(0), 64)
    batch = jax.vmap(source.sample, in_axes=(None, 0))(source.splits["train"], keys)
    assert batch.support_x.shape == (64, 1, 8, 8, 1) and batch.support_y.shape == (64, 1)
    labels = np.asarray(batch.support_y[:, 0])
    assert set(labels) == set(range(6))  # 64 draws over 6 classes: all of them
    for x, y in zip(np.asarray(batch.support_x[:, 0]), labels, strict=True):
        images = arrays["train"][y].astype(np.float32) / 255.0
        assert any(np.array_equal(x, image) for image in images)
    # Validation and test splits still give episodes with labels 0..n_way-1.
    episode = source.sample(source.splits["test"], jax.random.PRNGKey(1))
    assert episode.support_x.shape == (3, 8, 8, 1) and set(np.asarray(episode.support_y)) == {0, 1, 2}


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_meta_grad_is_the_cross_entropy_gradient_over_all_classes(float64, head):
    cfg, _, source, model = _problem(head)
    algo = make_algorithm(cfg.algo, Problem(model, source))
    to64 = lambda t: jax.tree.map(
        lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, t
    )
    params = to64(algo.init(jax.random.PRNGKey(0)))
    assert params["head"]["kernel"].shape[1] == 6 and (("bias" in params["head"]) == (head == "linear"))
    keys = jax.random.split(jax.random.PRNGKey(1), 8)
    batch = to64(jax.vmap(source.sample, in_axes=(None, 0))(source.splits["train"], keys))
    grads, _, metrics = algo.meta_grad(params, (), batch, jax.random.PRNGKey(2), 0)

    wide = with_outputs(model, 6)
    x, y = batch.support_x[:, 0], batch.support_y[:, 0]

    def loss(p):  # written out here: the model with 6 outputs, or features and cosine by hand
        if head == "linear":
            logits = wide.apply(p, x)
        else:
            z = embed(wide, {k: v for k, v in p.items() if k != "head"}, x)
            w = p["head"]["kernel"]
            logits = (
                10.0 * (z @ w) / (jnp.linalg.norm(z, axis=1)[:, None] * jnp.linalg.norm(w, axis=0)[None, :])
            )
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    want_loss, want = jax.value_and_grad(loss)(params)
    np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=1e-12)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)


def test_pretrain_run_then_maml_from_its_backbone(tmp_path):
    from test_init_from import assert_backbone_bitwise, save_config, tiny_cfg, write_images

    from metalearn.backbone import source_backbone
    from metalearn.evaluate import evaluate
    from metalearn.train import open_run, train

    write_images(tmp_path / "images")
    cfg = tiny_cfg(tmp_path, {"name": "pretrain", "head": "cosine"}, steps=3)
    run = tmp_path / "pretrained"
    save_config(cfg, run)
    results = train(cfg, run)
    assert results["algo"] == "pretrain" and 0.0 <= results["test"]["mean"] <= 1.0
    assert results["protocol"]["adaptation"] == "algorithm"
    # The same run probed by logistic regression instead of nearest class mean.
    cfg.run_dir = str(run)
    cfg.eval.adaptation = "linear_probe"
    probed = evaluate(cfg, run / "eval_probe")
    assert probed["protocol"]["adaptation"] == "linear_probe"
    # MAML starts from the pre-trained backbone, its own 2-way head.
    maml = tiny_cfg(tmp_path, {"name": "maml"}, {"init_from": str(run)})
    save_config(maml, tmp_path / "maml")
    params = open_run(maml, tmp_path / "maml").state.params
    assert_backbone_bitwise(params, source_backbone(run)[0])
    assert params["head"]["kernel"].shape[1] == 2
    assert json.loads((tmp_path / "maml" / "init_from.json").read_text())["run_dir"] == str(run.resolve())
