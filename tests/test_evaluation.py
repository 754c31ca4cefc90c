"""`metalearn eval` on runs of every algorithm, against what training logged and against a
direct computation; and that training learns. All on the session's tiny sweep
(conftest.tiny_sweep), evaluated in this process."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SWEEP_ALGOS, copy_run, run_cli_in_process, sweep_run
from omegaconf import OmegaConf

from metalearn.checkpoint import load_checkpoint
from metalearn.config import Config


def _eval(run: Path, *overrides: str) -> dict:
    code, out, err = run_cli_in_process("eval", f"run_dir={run}", *overrides)
    assert code == 0, out + err
    newest = max((run / "eval").glob("*/results.json"), key=lambda p: p.stat().st_mtime_ns)
    results = json.loads(newest.read_text())
    newest.unlink()  # the next eval of this run must not find this one
    return results


def _trained(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _run_config(run: Path):
    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(run / ".hydra" / "config.yaml"))


def test_the_sweep_trained_every_algorithm(tiny_sweep):
    """Each algorithm's job of one `train -m` wrote its results (was one subprocess each)."""
    for algo in SWEEP_ALGOS:
        results = _trained(sweep_run(tiny_sweep, algo))
        assert results["algo"] == algo and results["test"]["n_tasks"] == 20 and results["steps"] == 30
        assert np.isfinite(results["test"]["mean"]) and results["test"]["metric"] == "mse"


@pytest.mark.parametrize("algo", ["caml", "metasgd", "reptile", "anil"])
def test_eval_reproduces_the_training_result_of_each_algorithm(tiny_sweep, tmp_path, algo):
    run = copy_run(tiny_sweep, algo, tmp_path / "run")
    results = _eval(run)
    assert results["algo"] == algo and results["steps"] == 30
    # Same checkpoint, same test tasks, same adaptation: the same numbers.
    np.testing.assert_allclose(results["test"]["mean"], _trained(run)["test"]["mean"], rtol=1e-6)
    np.testing.assert_allclose(results["test"]["ci95"], _trained(run)["test"]["ci95"], rtol=1e-5)


def _direct_maml_mse(run: Path, steps: int, n_tasks: int) -> float:
    """Adapt-and-predict written out: load the checkpoint, draw the evaluator's test tasks
    (task i from fold_in(test key, i)), take ``steps`` plain gradient steps, score the query."""
    from metalearn.evaluation import TEST_STREAM
    from metalearn.step import init_state, setup, stream_key

    cfg = _run_config(run)
    exp = setup(cfg)
    params = load_checkpoint(run, init_state(exp, cfg.seed)).params
    lr = cfg.algo.inner_lr
    loss = lambda p, x, y: jnp.mean((exp.model.apply(p, x) - y) ** 2)
    key = stream_key(cfg.seed, TEST_STREAM)
    mses = []
    for i in range(n_tasks):
        sample_key, _ = jax.random.split(jax.random.fold_in(key, i))
        task = exp.source.sample(None, sample_key)
        p = params
        for _ in range(steps):
            g = jax.grad(loss)(p, task.support_x, task.support_y)
            p = jax.tree.map(lambda w, gw: w - lr * gw, p, g)
        mses.append(float(loss(p, task.query_x, task.query_y)))
    return float(np.mean(mses))


def test_inner_steps_test_changes_eval_and_equals_direct_adaptation(tiny_sweep, tmp_path):
    run = copy_run(tiny_sweep, "maml", tmp_path / "run")
    one = _eval(run, "eval.n_tasks=6")
    three = _eval(run, "eval.n_tasks=6", "algo.inner_steps_test=3")
    assert (one["inner_steps_test"], three["inner_steps_test"]) == (1, 3)
    assert abs(three["test"]["mean"] - one["test"]["mean"]) > 1e-4 * one["test"]["mean"]
    np.testing.assert_allclose(one["test"]["mean"], _direct_maml_mse(run, 1, 6), rtol=1e-5)
    np.testing.assert_allclose(three["test"]["mean"], _direct_maml_mse(run, 3, 6), rtol=1e-5)


def test_eval_on_validation_equals_the_validation_logged_in_training(tiny_sweep, tmp_path):
    run = copy_run(tiny_sweep, "maml", tmp_path / "run")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (logged,) = [r for r in records if r["split"] == "validation" and r["step"] == 30]
    assert logged["n_tasks"] == 10
    results = _eval(run, "eval.split=validation", "eval.n_tasks=10")
    assert results["split"] == "validation" and results["steps"] == 30
    np.testing.assert_allclose(results["test"]["mean"], logged["mse"], rtol=1e-6)
    np.testing.assert_allclose(results["test"]["ci95"], logged["ci95"], rtol=1e-5)
    # ... and the validation tasks are not the test tasks.
    assert results["test"]["mean"] != pytest.approx(_eval(run, "eval.n_tasks=10")["test"]["mean"])


def test_eval_results_do_not_depend_on_eval_batch_size(tiny_sweep, tmp_path):
    run = copy_run(tiny_sweep, "metasgd", tmp_path / "run")
    trained = _trained(run)["test"]  # eval.batch_size=100: the 20 tasks in one chunk
    for batch_size in (3, 20):  # 7 chunks, the last one padded; one chunk
        results = _eval(run, f"eval.batch_size={batch_size}")
        assert results["test"]["n_tasks"] == 20
        np.testing.assert_allclose(results["test"]["mean"], trained["mean"], rtol=1e-5)
        np.testing.assert_allclose(results["test"]["ci95"], trained["ci95"], rtol=1e-4)


def test_training_learns(tiny_sweep):
    """The 30 meta-steps lower the test MSE, on the same tasks, from that of the initial
    parameters (step 0, seed 0)."""
    from metalearn.evaluation import evaluate_params
    from metalearn.step import init_state, setup

    for algo in ("maml", "reptile"):
        run = sweep_run(tiny_sweep, algo)
        cfg = _run_config(run)
        exp = setup(cfg)
        state = init_state(exp, cfg.seed)
        before = evaluate_params(
            exp, state.params, cfg, "test", cfg.eval.n_tasks, cfg.algo.inner_steps_test, state.algo_state
        )
        after = _trained(run)["test"]
        assert after["mean"] < 0.9 * before["mean"], (algo, before, after)
