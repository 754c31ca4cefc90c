"""The models (metalearn/models/): im2col convolutions against lax.conv, Conv4's shapes and
batch-statistics BatchNorm, ResNet-12 against an independent reference, where FiLM sits, and
mixed precision (model.compute_dtype)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import film_input_shapes, make_cfg
from jax import lax

from metalearn.models import Conv4, conv3x3_im2col, conv3x3_xla, make_model, with_context

TINY = [4, 6, 8, 8]


def _resnet(channels=TINY, input_shape=(16, 16, 3), out=5, **model):
    cfg = make_cfg(model={"name": "resnet12", "channels": list(channels), **model})
    return make_model(cfg.model, input_shape, out)


def _ce(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _to64(tree):
    return jax.tree.map(lambda p: p.astype(jnp.float64), tree)


def _n_params(tree):
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(tree))


def _normal(seed, shape, dtype=np.float32):
    """Standard-normal array from NumPy (no per-shape compile of JAX's RNG)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _random_params(model, seed=0, dtype=None):
    """Random parameters with ``model.init``'s tree, shapes and dtypes, drawn with NumPy.

    ``jit(model.init)`` spends many seconds compiling the random initialisers on a
    loaded CPU; the tests only need generic values (BatchNorm scale ~1, bias ~0.1,
    kernels ~ N(0, 1/fan_in)), so they never run it.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "bias":
            value = 0.1 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        return jnp.asarray(value, dtype or leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(model.init, jax.random.PRNGKey(0)))


# ---------------------------------------------------------------- ResNet-12 architecture


def test_resnet12_shapes_and_parameter_count():
    model = _resnet(channels=[64, 160, 320, 640], input_shape=(84, 84, 3), out=5)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    assert set(shapes) == {"stage_0", "stage_1", "stage_2", "stage_3", "head"}
    assert set(shapes["stage_0"]) == {
        "conv_0", "conv_1", "conv_2", "norm_0", "norm_1", "norm_2", "shortcut_conv", "shortcut_norm",
    }  # fmt: skip
    assert set(shapes["stage_0"]["conv_0"]) == {"kernel"}  # bias-free convs before BatchNorm
    assert shapes["stage_3"]["shortcut_conv"]["kernel"].shape == (1, 1, 320, 640)
    assert shapes["head"]["kernel"].shape == (640, 5)
    out = jax.eval_shape(model.apply, shapes, jax.ShapeDtypeStruct((10, 84, 84, 3), jnp.float32))
    assert out.shape == (10, 5) and out.dtype == jnp.float32

    # Stage c_in -> c: three 3x3 convs 9*c_in*c + 2 * 9*c*c, three BatchNorms 3 * 2c,
    # shortcut 1x1 conv c_in*c + its BatchNorm 2c  =>  10*c_in*c + 18*c^2 + 8c.
    # Head: 640 * 5 + 5.
    expected, c_in = 0, 3
    for c in (64, 160, 320, 640):
        expected += 10 * c_in * c + 18 * c * c + 8 * c
        c_in = c
    expected += 640 * 5 + 5
    assert expected == 12_427_525  # ~12.4M, as reported for MetaOptNet's ResNet-12
    assert _n_params(shapes) == expected


def test_resnet12_32x32_forward():
    model = _resnet(input_shape=(32, 32, 3), out=4)
    params = _random_params(model)
    x = _normal(1, (6, 32, 32, 3))
    apply = jax.jit(model.apply)
    out = apply(params, x)
    assert out.shape == (6, 4) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
    # Transductive BatchNorm: the prediction for x[0] depends on the rest of the batch.
    out2 = apply(params, x.at[1:].set(0.0))
    assert not np.allclose(out[0], out2[0])


def _reference_resnet(params, x, n_stages, slope=0.1, eps=1e-5):
    """Independent ResNet-12 forward pass with lax.conv, written from the documented ops."""
    hi = lax.Precision.HIGHEST

    def conv(h, kernel):
        dn = ("NHWC", "HWIO", "NHWC")
        return lax.conv_general_dilated(h, kernel, (1, 1), "SAME", dimension_numbers=dn, precision=hi)

    def bn(h, p):
        mean = h.mean(axis=(0, 1, 2))
        var = h.var(axis=(0, 1, 2))
        return (h - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]

    def lrelu(h):
        return jnp.where(h >= 0, h, slope * h)

    for i in range(n_stages):
        s = params[f"stage_{i}"]
        h = lrelu(bn(conv(x, s["conv_0"]["kernel"]), s["norm_0"]))
        h = lrelu(bn(conv(h, s["conv_1"]["kernel"]), s["norm_1"]))
        h = bn(conv(h, s["conv_2"]["kernel"]), s["norm_2"])
        shortcut = bn(conv(x, s["shortcut_conv"]["kernel"]), s["shortcut_norm"])
        y = lrelu(h + shortcut)
        x = lax.reduce_window(y, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    features = x.mean(axis=(1, 2))
    return jnp.dot(features, params["head"]["kernel"], precision=hi) + params["head"]["bias"]


def test_resnet12_matches_independent_reference():
    model = _resnet(input_shape=(16, 16, 3))
    params = _random_params(model)  # BatchNorm scale/bias away from 1/0: exercised too
    x = _normal(1, (4, 16, 16, 3))
    with jax.default_matmul_precision("highest"):
        out = jax.jit(model.apply)(params, x)
        ref = jax.jit(_reference_resnet, static_argnums=2)(params, x, len(TINY))
    np.testing.assert_allclose(out, ref, rtol=2e-4, atol=2e-4)


def test_resnet12_im2col_equals_xla_conv():
    im2col = _resnet(conv_impl="im2col")
    xla = _resnet(conv_impl="xla")
    params = _random_params(im2col)
    assert jax.tree.structure(params) == jax.tree.structure(jax.eval_shape(xla.init, jax.random.PRNGKey(0)))
    x = _normal(1, (4, 16, 16, 3))
    with jax.default_matmul_precision("highest"):
        a, b = jax.jit(im2col.apply)(params, x), jax.jit(xla.apply)(params, x)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_resnet12_vmap_over_per_task_params():
    model = _resnet()
    n_tasks = 3
    per_task = [_random_params(model, seed=t) for t in range(n_tasks)]
    params = jax.tree.map(lambda *p: jnp.stack(p), *per_task)
    x = _normal(1, (n_tasks, 4, 16, 16, 3))
    with jax.default_matmul_precision("highest"):
        batched = jax.jit(jax.vmap(model.apply))(params, x)
        apply = jax.jit(model.apply)
        looped = [apply(per_task[t], x[t]) for t in range(n_tasks)]
    np.testing.assert_allclose(batched, np.stack(looped), rtol=1e-5, atol=1e-5)


def test_resnet12_context_film_and_head_for_anil_caml():
    plain = _resnet()
    ctx = with_context(plain, (16, 16, 3), 3)
    params = _random_params(ctx)
    # FiLM starts as the identity (zero biases): its bias must be zero for the check below.
    params["film"]["dense"]["bias"] = jnp.zeros_like(params["film"]["dense"]["bias"])
    plain_shapes = jax.eval_shape(plain.init, jax.random.PRNGKey(0))
    assert set(params) == set(plain_shapes) | {"film"} and "head" in params
    assert params["film"]["dense"]["kernel"].shape == (3, 2 * TINY[2])  # FiLM on the third stage
    x = _normal(1, (4, 16, 16, 3))
    shared = {k: v for k, v in params.items() if k != "film"}
    apply_ctx = jax.jit(ctx.apply)
    # Zero context is the identity FiLM: the context model equals the plain one.
    np.testing.assert_allclose(apply_ctx(params, x), jax.jit(plain.apply)(shared, x), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(apply_ctx(params, x, jnp.ones(3)) - apply_ctx(params, x)))) > 1e-4


def test_resnet12_second_order_maml_gradient_matches_finite_differences(float64):
    model = _resnet(channels=[2, 3, 3, 4], input_shape=(16, 16, 3), out=3)
    params = _random_params(model, dtype=jnp.float64)
    support_x = _normal(1, (3, 16, 16, 3), np.float64)
    query_x = _normal(2, (6, 16, 16, 3), np.float64)
    support_y, query_y = jnp.arange(3), jnp.arange(6) % 3

    def meta_loss(p):
        g = jax.grad(lambda q: _ce(model.apply(q, support_x), support_y))(p)
        adapted = jax.tree.map(lambda a, b: a - 0.5 * b, p, g)
        return _ce(model.apply(adapted, query_x), query_y)

    # One compile serves the gradient and the finite differences.
    value_and_grad = jax.jit(jax.value_and_grad(meta_loss))
    _, grad = value_and_grad(params)
    params_np, grad_np = jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, grad)
    # LeakyReLU and max-pool are piecewise linear: a larger step crosses kinks.
    eps = 1e-7
    for seed in range(2):
        rng = np.random.default_rng(10 + seed)
        direction = jax.tree.map(lambda p, rng=rng: rng.standard_normal(p.shape), params_np)
        plus, _ = value_and_grad(jax.tree.map(lambda p, d: p + eps * d, params_np, direction))
        minus, _ = value_and_grad(jax.tree.map(lambda p, d: p - eps * d, params_np, direction))
        numeric = (plus - minus) / (2 * eps)
        analytic = sum(
            np.vdot(g, d) for g, d in zip(jax.tree.leaves(grad_np), jax.tree.leaves(direction), strict=True)
        )
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------- mixed precision


def _bf16_pair(name, **overrides):
    """The float32 and the bfloat16 variant of a small model ``name``, and its input shape."""
    if name == "mlp":
        extra, shape = {"hidden": [16, 16]}, (3,)
    elif name == "conv4":
        extra, shape = {"filters": 6, "blocks": 3, "downsample": "maxpool"}, (16, 16, 3)
    else:
        extra, shape = {"channels": TINY}, (16, 16, 3)
    extra = {"name": name, **extra, **overrides}
    f32 = make_model(make_cfg(model=extra).model, shape, 4)
    bf16 = make_model(make_cfg(model={**extra, "compute_dtype": "bfloat16"}).model, shape, 4)
    return f32, bf16, shape


@pytest.mark.parametrize("name", ["mlp", "conv4", "resnet12"])
def test_bfloat16_params_outputs_and_grads_float32(name):
    f32, bf16, shape = _bf16_pair(name)
    # init: the float32 model's parameter tree, every leaf float32.
    shapes = jax.eval_shape(bf16.init, jax.random.PRNGKey(0))
    assert shapes == jax.eval_shape(f32.init, jax.random.PRNGKey(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))
    params = _random_params(bf16)

    x = _normal(1, (8, *shape))
    y = jnp.arange(8) % 4

    def loss_and_logits(model):
        def loss(p):
            logits = model.apply(p, x)
            return _ce(logits, y), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    (loss, out), grads = loss_and_logits(bf16)(params)
    (_, ref), ref_grads = loss_and_logits(f32)(params)
    assert out.dtype == jnp.float32 and ref.dtype == jnp.float32 and loss.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 5e-2, rel
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    g, r = (jnp.concatenate([a.ravel() for a in jax.tree.leaves(t)]) for t in (grads, ref_grads))
    # bf16 activations (8-bit mantissa) through BatchNorm: gradients agree only roughly.
    assert float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r)) < 0.3


@pytest.mark.parametrize("name,conv_impl", [("mlp", None), ("conv4", "xla"), ("resnet12", "im2col")])
def test_bfloat16_computes_in_bf16(name, conv_impl):
    f32, bf16, shape = _bf16_pair(name, **({"conv_impl": conv_impl} if conv_impl else {}))
    params = _random_params(bf16)
    x = jnp.zeros((4, *shape))

    def linear_ops(fn):
        """Input dtypes of every dot_general / conv_general_dilated in fn's jaxpr (recursively)."""
        found = []

        def walk(jaxpr):
            for eqn in jaxpr.eqns:
                if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                    found.append((eqn.primitive.name, {str(v.aval.dtype) for v in eqn.invars}))
                for value in eqn.params.values():
                    inner = getattr(value, "jaxpr", value)
                    if hasattr(inner, "eqns"):
                        walk(inner)

        walk(jax.make_jaxpr(fn)(params, x).jaxpr)
        return found

    ops = linear_ops(bf16.apply)
    # Every conv and matmul runs in bf16 but the head's, which is float32 (float32 logits).
    assert [dtypes for _, dtypes in ops].count({"float32"}) == 1
    assert [dtypes for _, dtypes in ops].count({"bfloat16"}) == len(ops) - 1 >= 2
    if conv_impl == "xla":
        assert ("conv_general_dilated", {"bfloat16"}) in ops
    assert all(dtypes == {"float32"} for _, dtypes in linear_ops(f32.apply))
    assert "bf16" not in str(jax.make_jaxpr(f32.apply)(params, x))


def test_bfloat16_context_model_and_unknown_dtype():
    _, bf16, shape = _bf16_pair("resnet12")
    ctx = with_context(bf16, shape, 3)
    assert ctx.module.dtype == jnp.bfloat16
    params = _random_params(ctx)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    x = _normal(1, (4, *shape))
    out, grad_c = jax.jit(jax.value_and_grad(lambda c: ctx.apply(params, x, c).sum()))(jnp.ones(3))
    assert grad_c.dtype == jnp.float32 and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="compute_dtype"):
        make_model(make_cfg(model={"name": "mlp", "compute_dtype": "float16"}).model, (1,), 1)


def test_resnet12_film_sits_on_the_third_stage_with_distinct_widths():
    channels = [3, 5, 7, 9]
    cfg = make_cfg(model={"name": "resnet12", "channels": channels})
    model = make_model(cfg.model, (16, 16, 3), 5, context_size=4)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    assert params["film"]["dense"]["kernel"].shape == (4, 2 * 7)
    # Stages halve the size: 16 -> 8 -> 4 -> 2; the third stage computes at 4x4.
    shapes = film_input_shapes(model, params, jnp.zeros((2, 16, 16, 3)), jnp.zeros(4))
    assert shapes == [(2, 4, 4, 7)]


@pytest.mark.parametrize("size,stride,channels", [(28, 2, 1), (7, 2, 3), (8, 1, 2), (5, 2, 4)])
def test_im2col_conv_equals_lax_conv(size, stride, channels):
    kx, kk = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (3, size, size, channels))
    kernel = jax.random.normal(kk, (3, 3, channels, 5))
    reference = lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )
    np.testing.assert_allclose(conv3x3_im2col(x, kernel, stride), reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(conv3x3_xla(x, kernel, stride), reference, rtol=1e-4, atol=1e-4)


def test_conv4_shapes_and_transductive_batchnorm():
    model = make_model(make_cfg(model={"name": "conv4"}).model, (28, 28, 1), 5)
    params = model.init(jax.random.PRNGKey(0))
    assert params["conv_0"]["kernel"].shape == (3, 3, 1, 64)
    assert params["head"]["kernel"].shape == (2 * 2 * 64, 5)  # 28 -> 14 -> 7 -> 4 -> 2
    x = jax.random.uniform(jax.random.PRNGKey(1), (6, 28, 28, 1))
    out = model.apply(params, x)
    assert out.shape == (6, 5)
    # Batch statistics: the prediction for x[0] depends on the rest of the batch.
    out2 = model.apply(params, x.at[1:].set(0.0))
    assert not np.allclose(out[0], out2[0])

    pooled = Conv4(out=5, filters=32, downsample="maxpool")
    p = pooled.init(jax.random.PRNGKey(0), jnp.zeros((2, 84, 84, 3)))["params"]
    assert p["head"]["kernel"].shape == (5 * 5 * 32, 5)  # 84 -> 42 -> 21 -> 10 -> 5
