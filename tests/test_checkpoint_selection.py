"""eval.checkpoint (metalearn/selection.py): which parameters are tested. Retention keeps the
top K by validation, ``best`` picks the best validation step, the ``top_k`` ensemble is the
mean of its members' outputs, ``last`` is what it always was, and what is missing is one line."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from conftest import make_cfg, run_cli_in_process

from metalearn.algos import test_steps as steps_at_test
from metalearn.checkpoint import CheckpointWriter, checkpoint_steps, restore_step
from metalearn.evaluation import TEST_STREAM
from metalearn.selection import Validation, protected_steps, ranked, stop_early
from metalearn.step import init_state, setup, stream_key

TINY = (
    "dataset=sinusoid",
    "model.hidden=[8]",
    "trainer.steps=60",
    "trainer.log_every=10",
    "trainer.val_every=10",
    "trainer.val_tasks=10",
    "trainer.checkpoint_every=0",
    "trainer.keep_checkpoints=1",
    "trainer.progress=false",
    "eval.n_tasks=12",
    "eval.batch_size=4",
)


def _train(run_dir, *overrides: str) -> dict:
    code, out, err = run_cli_in_process("train", *TINY, *overrides, f"hydra.run.dir={run_dir}")
    assert code == 0, out + err
    return json.loads((run_dir / "results.json").read_text())


def _eval(run_dir, *overrides: str) -> dict:
    before = set((run_dir / "eval").glob("*")) if (run_dir / "eval").is_dir() else set()
    code, out, err = run_cli_in_process("eval", f"run_dir={run_dir}", *overrides)
    assert code == 0, out + err
    (new,) = set((run_dir / "eval").glob("*")) - before
    return json.loads((new / "results.json").read_text())


@pytest.fixture(scope="module")
def top_k_run(tmp_path_factory):
    """A tiny sinusoid run trained with eval.checkpoint=top_k, eval.top_k=6: every validation
    step (10, ..., 60) is checkpointed and kept."""
    run_dir = tmp_path_factory.mktemp("selection") / "run"
    _train(run_dir, "eval.checkpoint=top_k", "eval.top_k=6")
    return run_dir


def _with_validation(run_dir, dest, values: dict[int, float]):
    """A copy of ``run_dir`` whose validation records say ``values`` (step -> mse)."""
    shutil.copytree(run_dir, dest)
    lines = []
    for line in (dest / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("split") == "validation":
            record["mse"] = values[record["step"]]
        lines.append(json.dumps(record) + "\n")
    (dest / "metrics.jsonl").write_text("".join(lines))
    return dest


def test_ranking_best_first_by_metric_direction_later_step_on_ties():
    vals = [Validation(10, 0.5), Validation(20, 0.9), Validation(30, 0.9), Validation(40, 0.1)]
    assert [v.step for v in ranked(vals, "accuracy", 3)] == [30, 20, 10]
    assert [v.step for v in ranked(vals, "mse", 2)] == [40, 10]


def test_retention_keeps_the_newest_and_the_top_k_by_validation(tmp_path):
    exp = setup(make_cfg(model={"hidden": [4]}))
    state = init_state(exp, 0)
    accuracy = {10: 0.5, 20: 0.9, 30: 0.3, 40: 0.8, 50: 0.4, 60: 0.2}
    seen: list[Validation] = []
    writer = CheckpointWriter(tmp_path, 1, lambda: protected_steps(seen, "accuracy", 2))
    try:
        for step, value in accuracy.items():
            seen.append(Validation(step, value))
            writer.save(state._replace(step=np.int32(step)))
            if step == 30:  # the top 2 so far (20, 10) and the newest
                assert sorted(checkpoint_steps(tmp_path)) == [10, 20, 30]
    finally:
        writer.close()
    assert sorted(checkpoint_steps(tmp_path)) == [20, 40, 60]


def test_training_with_top_k_keeps_the_top_k_validation_steps(tmp_path):
    run_dir = tmp_path / "run"
    results = _train(run_dir, "eval.checkpoint=top_k", "eval.top_k=2")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [Validation(r["step"], r["mse"]) for r in records if r["split"] == "validation"]
    assert [v.step for v in vals] == [10, 20, 30, 40, 50, 60]
    top = [v.step for v in ranked(vals, "mse", 2)]
    assert set(checkpoint_steps(run_dir)) == {60, *top}
    assert results["checkpoints"]["steps"] == top
    assert results["protocol"]["checkpoint"] == "top_k" and results["protocol"]["top_k"] == 2


def test_best_tests_the_best_validation_step(top_k_run, tmp_path):
    run_dir = _with_validation(
        top_k_run, tmp_path / "run", {10: 3.0, 20: 2.0, 30: 0.5, 40: 1.0, 50: 4.0, 60: 5.0}
    )
    results = _eval(run_dir, "eval.checkpoint=best")
    assert results["checkpoints"] == {"rule": "best", "steps": [30], "validation_mse": [0.5]}
    # The same number as evaluating step 30's parameters themselves.
    from metalearn.evaluation import evaluate_params
    from metalearn.run_config import resolve

    cfg = resolve(run_dir, [], None, "eval").cfg
    exp = setup(cfg)
    state = restore_step(run_dir, init_state(exp, cfg.seed), 30)
    alone = evaluate_params(
        exp, state.params, cfg, "test", cfg.eval.n_tasks, steps_at_test(cfg.algo), state.algo_state
    )
    assert results["test"]["mean"] == pytest.approx(alone["mean"], rel=1e-6)


def test_top_k_ensemble_is_the_mean_of_its_members_outputs(top_k_run, tmp_path):
    """The ensemble's per-task mse, recomputed by hand: each restored member adapts to the
    same task with the same key, its query predictions are averaged, then scored."""
    run_dir = _with_validation(
        top_k_run, tmp_path / "run", {10: 3.0, 20: 2.0, 30: 0.5, 40: 1.0, 50: 4.0, 60: 5.0}
    )
    results = _eval(run_dir, "eval.checkpoint=top_k", "eval.top_k=3")
    assert results["checkpoints"]["steps"] == [30, 40, 20]

    from metalearn.run_config import resolve

    cfg = resolve(run_dir, [], None, "eval").cfg
    exp = setup(cfg)
    template = init_state(exp, cfg.seed)
    members = [restore_step(run_dir, template, s) for s in (30, 40, 20)]
    data = exp.source.splits["test"]
    key = stream_key(cfg.seed, TEST_STREAM)
    per_task = []
    for i in range(cfg.eval.n_tasks):
        task_key, adapt_key = jax.random.split(jax.random.fold_in(key, i))
        task = exp.source.sample(data, task_key)
        outputs = [
            np.asarray(
                exp.algo.predict(
                    m.params,
                    exp.algo.adapt(
                        m.params,
                        m.algo_state,
                        task.support_x,
                        task.support_y,
                        adapt_key,
                        steps_at_test(cfg.algo),
                    ),
                    task.query_x,
                )
            )
            for m in members
        ]
        per_task.append(float(np.mean((np.mean(outputs, axis=0) - np.asarray(task.query_y)) ** 2)))
    assert results["test"]["mean"] == pytest.approx(np.mean(per_task), rel=1e-5)
    # ... which is not the best member's number alone (the members differ a little here).
    single = _eval(run_dir, "eval.checkpoint=best")["test"]["mean"]
    assert abs(results["test"]["mean"] - single) > 1e-4 * single


def test_last_is_unchanged_by_the_selection_machinery(top_k_run, tmp_path):
    """A run trained with top_k trains and validates exactly as a default run; its last
    checkpoint tests to the default run's number."""
    plain = tmp_path / "plain"
    default_results = _train(plain)
    assert "checkpoints" not in default_results and default_results["protocol"]["checkpoint"] == "last"
    records = lambda d: [  # noqa: E731
        {k: v for k, v in json.loads(x).items() if k not in ("time_s", "steps_per_s")}
        for x in (d / "metrics.jsonl").read_text().splitlines()
    ]
    assert records(plain) == records(top_k_run)
    last = _eval(top_k_run, "eval.checkpoint=last")
    assert last["test"] == default_results["test"]


def test_missing_validation_or_checkpoints_is_one_line(top_k_run, tmp_path):
    code, _, err = run_cli_in_process(
        "train", *TINY, "trainer.val_every=0", "eval.checkpoint=best", f"hydra.run.dir={tmp_path / 'a'}"
    )
    assert code == 2 and err.count("\n") == 1 and "trainer.val_every=0" in err
    assert not (tmp_path / "a").exists()

    plain = tmp_path / "plain"
    _train(plain, "trainer.val_every=0")
    code, _, err = run_cli_in_process("eval", f"run_dir={plain}", "eval.checkpoint=top_k")
    assert code == 2 and err.count("\n") == 1 and "no validation record" in err

    run_dir = tmp_path / "kept"
    shutil.copytree(top_k_run, run_dir)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    top = ranked([Validation(r["step"], r["mse"]) for r in records if r["split"] == "validation"], "mse", 2)
    shutil.rmtree(run_dir / "checkpoints" / str(top[1].step))
    code, _, err = run_cli_in_process("eval", f"run_dir={run_dir}", "eval.checkpoint=top_k", "eval.top_k=2")
    assert code == 2 and err.count("\n") == 1
    assert f"validation step(s) {top[1].step}," in err and "does not hold" in err

    code, _, err = run_cli_in_process("eval", f"run_dir={run_dir}", "eval.checkpoint=top_k", "attack=fgsm")
    assert code == 2 and err.count("\n") == 1 and "attack=fgsm" in err


def test_report_states_the_checkpoint_rule(top_k_run):
    from metalearn.report import aggregate, find_runs, markdown_table

    (row,) = aggregate(find_runs(top_k_run.parent))
    assert row.protocol.endswith("top-6 checkpoints by validation, outputs averaged")
    assert row.protocol in markdown_table([row])


def test_early_stop_rule_is_protonets_wait_beyond_patience():
    losses = [3.0, 2.0, 2.5, 2.0, 1.0, 1.5, 1.5]
    vals = [Validation(10 * (i + 1), 0.0, loss) for i, loss in enumerate(losses)]
    # wait after each: 0, 0, 1, 2 (2.0 is no strict improvement), 0, 1, 2
    assert not stop_early(vals[:3], 1) and stop_early(vals[:4], 1)
    assert not stop_early(vals, 2) and stop_early([*vals, Validation(80, 0.0, 1.2)], 2)
    assert not stop_early(vals, 0)  # 0: off


def test_training_stops_early_on_the_validation_loss(tmp_path):
    run_dir = tmp_path / "run"
    overrides = ("trainer.steps=400", "optim.lr=0.05", "trainer.early_stop_patience=1")
    results = _train(run_dir, *overrides, "eval.checkpoint=best", "eval.rank_by=loss")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [Validation(r["step"], r["mse"], r["loss"]) for r in records if r["split"] == "validation"]
    stops = [v.step for i, v in enumerate(vals) if stop_early(vals[: i + 1], 1)]
    assert stops == [vals[-1].step] and results["steps"] == vals[-1].step < 400
    assert max(checkpoint_steps(run_dir)) == vals[-1].step
    assert results["checkpoints"]["steps"] == [ranked(vals, "mse", 1, "loss")[0].step]
    assert results["protocol"]["ranked_by"] == "loss"


def test_ranking_by_loss_needs_recorded_losses(top_k_run):
    code, _, err = run_cli_in_process(
        "eval", f"run_dir={top_k_run}", "eval.checkpoint=best", "eval.rank_by=loss"
    )
    assert code == 2 and err.count("\n") == 1 and "does not record" in err


def test_resumed_run_ranks_the_validations_before_it(tmp_path):
    """Retention after a resume counts the validations logged before it: a step made the best
    by its record before the resume stays on disk and is tested."""
    run_dir = tmp_path / "run"
    _train(run_dir, "eval.checkpoint=top_k", "eval.top_k=2", "trainer.steps=30")
    assert 20 in checkpoint_steps(run_dir)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        if r["split"] == "validation" and r["step"] == 20:
            r["mse"] = 0.0
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    resumed = _train(run_dir, "eval.checkpoint=top_k", "eval.top_k=2", "trainer.resume=true")
    assert resumed["checkpoints"]["steps"][0] == 20 and 20 in checkpoint_steps(run_dir)
