"""BatchNorm at evaluation (model.bn_stats, metalearn/batchnorm.py): in the non-transductive
modes a query's logits do not depend on the other queries, for every algorithm; the
transductive mode does depend on them; running averages are what the docs say they are."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_cfg, run_cli_in_process, synthetic_image_arrays
from omegaconf import OmegaConf
from PIL import Image

from metalearn.algos import ALGORITHMS, Problem
from metalearn.batchnorm import BatchNormState, with_bn_stats
from metalearn.errors import ConfigError
from metalearn.models import make_model
from metalearn.predict import run_predict
from metalearn.protocol import BN_PHRASES
from metalearn.run_config import resolve
from metalearn.step import init_state, make_meta_step, setup, step_task_keys
from metalearn.tasks import image_source
from metalearn.train import train

N_WAY, K_SHOT, K_QUERY, SIZE = 3, 2, 3, 8


def _experiment(algo: str, bn_stats: str, blocks: int = 2, **model):
    cfg = make_cfg(
        algo={"name": algo},
        dataset={
            "name": "omniglot",
            "n_way": N_WAY,
            "k_shot": K_SHOT,
            "k_query": K_QUERY,
            "placement": "device",
        },
        model={"name": "conv4", "filters": 3, "blocks": blocks, "bn_stats": bn_stats, **model},
    )
    source = image_source(cfg.dataset, synthetic_image_arrays(n_classes=6, per_class=10, size=SIZE))
    return cfg, setup(cfg, source)


def _task(exp):
    return jax.jit(exp.source.sample)(exp.source.splits["test"], jax.random.PRNGKey(1))


def _state(exp, cfg):
    state = init_state(exp, cfg.seed)
    if isinstance(state.algo_state, BatchNormState):
        # Moments unlike any batch's, so that using them shows.
        rng = np.random.default_rng(0)
        running = jax.tree.map(
            lambda v: jnp.asarray(rng.uniform(0.5, 2.0, v.shape), v.dtype), state.algo_state.running
        )
        state = state._replace(algo_state=state.algo_state._replace(running=running))
    return state


# One algorithm of each kind in the default run (a differentiated inner loop, a metric one, a
# prototype-initialised one, a carried inner-optimizer state); every algorithm in the slow tier.
_DEFAULT_RUN = {"maml", "protonet", "protomaml", "reptile"}


@pytest.mark.parametrize("mode", ["support", "running", "support_query", "batch"])
@pytest.mark.parametrize(
    "algo", [pytest.param(a, marks=() if a in _DEFAULT_RUN else pytest.mark.slow) for a in sorted(ALGORITHMS)]
)
def test_query_logits_do_not_depend_on_the_other_queries(algo, mode):
    cfg, exp = _experiment(algo, mode)
    state, task = _state(exp, cfg), _task(exp)
    steps = 0 if algo == "protonet" else 1
    adapted = jax.jit(lambda p, s, sx, sy: exp.algo.adapt(p, s, sx, sy, jax.random.PRNGKey(2), steps))(
        state.params, state.algo_state, task.support_x, task.support_y
    )
    predict = jax.jit(exp.algo.predict)
    queries = task.query_x
    together = np.asarray(predict(state.params, adapted, queries))
    one_by_one = [predict(state.params, adapted, queries[i : i + 1])[0] for i in range(len(queries))]
    alone = np.stack([np.asarray(q) for q in one_by_one])
    order = np.random.default_rng(0).permutation(len(queries))
    permuted = np.asarray(predict(state.params, adapted, queries[order]))
    others = jax.random.uniform(jax.random.PRNGKey(3), queries.shape, queries.dtype)
    replaced = np.asarray(predict(state.params, adapted, others.at[0].set(queries[0])))
    if mode == "batch":  # transductive: the others change a query's logits (the test can fail)
        assert not np.array_equal(alone[1:], together[1:])
        assert not np.array_equal(replaced[0], together[0])
        return
    assert np.array_equal(alone, together)
    assert np.array_equal(permuted, together[order])
    assert np.array_equal(replaced[0], together[0])


@pytest.mark.parametrize("algo", ["protonet", "maml"])
def test_running_averages_follow_the_documented_update(algo):
    """One meta-step of 2 tasks: the running moments of the one BatchNorm layer are the EMA
    (momentum 0.3) from (0, 1) of each task's support+query batch moments under the
    meta-parameters before the step, unbiased variance, task after task; training itself is
    bitwise that of bn_stats=batch."""
    cfg, exp = _experiment(algo, "running", blocks=1, bn_momentum=0.3)
    _, exp_batch = _experiment(algo, "batch", blocks=1)
    data = exp.source.splits["train"]
    state = init_state(exp, cfg.seed)
    before = jax.tree.map(np.asarray, state.params)
    base_key = np.asarray(state.key)
    new, _ = make_meta_step(exp, 2)(state, data)
    new_batch, _ = make_meta_step(exp_batch, 2)(init_state(exp_batch, cfg.seed), data)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(new_batch.params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))

    mean, var = np.zeros(3), np.ones(3)
    for key in step_task_keys(jnp.asarray(base_key), 0, 2):
        task = exp.source.sample(data, key)
        x = np.concatenate([np.asarray(task.support_x), np.asarray(task.query_x)]).astype(np.float64)
        conv = before["conv_0"]
        h = jax.lax.conv_general_dilated(
            x,
            np.asarray(conv["kernel"], np.float64),
            (2, 2),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        h = np.asarray(h) + conv["bias"]
        mean = 0.7 * mean + 0.3 * h.mean(axis=(0, 1, 2))
        var = 0.7 * var + 0.3 * h.reshape(-1, 3).var(axis=0, ddof=1)
    running = new.algo_state.running["norm_0"]
    np.testing.assert_allclose(np.asarray(running["mean"]), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(running["var"]), var, rtol=1e-5, atol=1e-6)


def test_running_without_running_averages_is_refused():
    cfg = make_cfg(model={"name": "conv4", "filters": 3, "blocks": 1})
    model = make_model(cfg.model, (SIZE, SIZE, 1), N_WAY)
    _, exp = _experiment("maml", "batch", blocks=1)
    with pytest.raises(ConfigError, match="model.bn_stats='running'.*no running averages"):
        with_bn_stats(cfg.algo, Problem(model, exp.source), "running", False, 0.1)


@pytest.fixture(scope="module")
def image_runs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny ProtoNet runs on an image folder: trained with bn_stats=running and =batch."""
    root = tmp_path_factory.mktemp("bn_runs")
    rng = np.random.default_rng(0)
    for c in range(8):
        (root / "images" / f"c{c}").mkdir(parents=True)
        pattern = rng.random((16, 16)) > 0.5
        for i in range(5):
            noisy = pattern ^ (rng.random((16, 16)) > 0.9)
            Image.fromarray((noisy * 255).astype(np.uint8)).save(root / "images" / f"c{c}" / f"{i}.png")
    runs = {}
    for mode in ("running", "batch"):
        cfg = make_cfg(
            dataset={
                "name": "image_folder",
                "path": str(root / "images"),
                "data_dir": str(root / "data"),
                "n_way": 2,
                "k_shot": 1,
                "k_query": 2,
                "image_size": 16,
                "channels": 1,
                "split_ratios": [0.5, 0.25, 0.25],
            },
            model={"name": "conv4", "filters": 4, "blocks": 2, "bn_stats": mode},
            algo={"name": "protonet"},
            trainer={
                "steps": 3,
                "meta_batch_size": 2,
                "val_every": 0,
                "checkpoint_every": 0,
                "progress": False,
            },
            eval={"n_tasks": 4, "batch_size": 4},
        )
        run = root / mode
        (run / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
        train(cfg, run)
        runs[mode] = run
    return runs


def _results_of(stdout: str) -> dict:
    return json.loads(Path(stdout.strip().splitlines()[-1].split("results in ")[1]).read_text())


def test_eval_and_predict_honour_an_override_and_say_which_mode(image_runs, tmp_path):
    run = image_runs["running"]
    trained = json.loads((run / "results.json").read_text())
    assert trained["protocol"]["bn_stats"] == "running"
    accuracies = {}
    for mode, phrase in BN_PHRASES.items():
        code, out, err = run_cli_in_process("eval", f"run_dir={run}", f"model.bn_stats={mode}")
        assert code == 0, err
        results = _results_of(out)
        assert results["protocol"]["bn_stats"] == mode and phrase in out.strip().splitlines()[-1]
        accuracies[mode] = results["test"]
    # The same checkpoint, tasks and mode as the end of training: the same numbers.
    assert {k: v for k, v in accuracies["running"].items() if not k.endswith("_s")} == {
        k: v for k, v in trained["test"].items() if not k.endswith("_s")
    }

    support = tmp_path / "support"
    for c in ("c6", "c7"):
        (support / c).mkdir(parents=True)
        src = image_runs["running"].parent / "images" / c / "0.png"
        (support / c / "0.png").write_bytes(src.read_bytes())
    query = image_runs["running"].parent / "images" / "c6"
    probabilities = {}
    for mode, phrase in BN_PHRASES.items():
        overrides = [f"run_dir={run}", f"support={support}", f"query={query}", f"model.bn_stats={mode}"]
        composed = make_cfg(support=str(support), query=str(query))
        said = []
        out = tmp_path / f"predict_{mode}"
        summary = run_predict(
            resolve(run, overrides, composed, "predict"), out, say=lambda m, _said=said, **k: _said.append(m)
        )
        assert summary["bn_stats"] == mode and phrase in said[-1]
        probabilities[mode] = (out / "predictions.csv").read_text()
    # The mode is used, not only named: each normalises the queries differently.
    assert len(set(probabilities.values())) == len(BN_PHRASES)


def test_running_on_a_run_without_running_averages_is_one_line(image_runs):
    run = image_runs["batch"]
    message = (
        "invalid model.bn_stats='running': the run was trained with model.bn_stats=batch, so its "
        "checkpoint holds no running averages (use batch or support, or train with running)"
    )
    code, out, err = run_cli_in_process("eval", f"run_dir={run}", "model.bn_stats=running")
    assert code == 2
    assert err.strip().splitlines() == [f"metalearn: error: {message}"]
    overrides = [f"run_dir={run}", f"support={run}", f"query={run}", "model.bn_stats=running"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve(run, overrides, make_cfg(support=str(run), query=str(run)), "predict")
