"""The config restructuring (per-axis groups) changed no behaviour: every preset and every
``algo=X dataset=Y`` default pair composes to the values recorded before it
(tests/fixtures/composed_configs.json), and a short fixed-seed run of every algorithm writes the
same metrics.jsonl and results.json, bitwise, timing fields aside
(tests/fixtures/reference_runs/, made by scripts/capture_structure_fixtures.py before the change).
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import REPO, SHARED_OMNIGLOT, metric_records
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from metalearn.cli import config_dir
from metalearn.config import register_configs

FIXTURES = REPO / "tests" / "fixtures"
COMPOSED = json.loads((FIXTURES / "composed_configs.json").read_text())
REFERENCE = sorted(p.name for p in (FIXTURES / "reference_runs").iterdir())

# Keys renamed by the restructuring: new dotted key -> old dotted key.
RENAMED: dict[str, str] = {}
# Keys added since the recording, with the value that keeps the old behaviour; every recorded
# config is compared as if it had them.
ADDED: dict[str, object] = {
    # Weight decay before the outer optimizer (metalearn/optim.py); 0.0 is none.
    "optim.weight_decay": 0.0,
    # The class split (metalearn/data/class_splits.py); null is the dataset's own, as before.
    "dataset.split": None,
    # Which parameters are tested (metalearn/selection.py); "last" is the final ones, as before.
    "eval.checkpoint": "last",
    "eval.top_k": 5,
    "eval.rank_by": "metric",
    # Early stopping on the validation loss (metalearn/selection.py); 0 is never.
    "trainer.early_stop_patience": 0,
    # ProtoNet's retraining on train+validation (tests/test_retrain_on_validation.py): off.
    "trainer.steps_from": None,
    "dataset.train_on_validation": False,
    # ProtoNet: support and query as two batches in training, as before.
    "algo.joint_bn": False,
    # BatchNorm at evaluation (metalearn/batchnorm.py): the batch's statistics, as before;
    # the running averages' momentum is read only with bn_stats=running.
    "model.bn_stats": "batch",
    "model.bn_momentum": 0.1,
    # Experiment trackers (metalearn/trackers.py); none chosen is metrics.jsonl only, as before.
    "logger.group": None,
    "logger.mlflow": None,
    "logger.wandb": None,
    # How the conv models' max-pools are written (metalearn/models/layers.py): flax's, as before.
    "model.pool_impl": "reduce_window",
    # Start from another run's backbone (metalearn/backbone.py): off; the algorithm's own head.
    "model.init_from": None,
    "model.init_head": "random",
    # Test-time adaptation (metalearn/adaptation.py): the algorithm's own, as before; the other
    # keys are read only by the backbone rules.
    "eval.adaptation": "algorithm",
    "eval.adaptation_steps": 100,
    "eval.adaptation_lr": 0.01,
    "eval.probe_l2": 1.0,
    # Variable-way, variable-shot episodes (metalearn/episodes.py): off, fixed episodes as
    # before; the bounds are read only with dataset.episodes=variable.
    "dataset.episodes": "fixed",
    "dataset.min_ways": 5,
    "dataset.max_ways": 50,
    "dataset.max_support": 500,
    "dataset.max_query": 10,
    # How a padded episode is computed (metalearn/rows.py): read only with episodes=variable.
    "dataset.padding": "exact",
}
# results.json entries added since the recording (the evaluation protocol, stated).
ADDED_RESULTS = ("protocol",)

# Intentional value changes of presets after the recording (the evaluation-protocol audit,
# shared/reviews/protocol-audit.md): "experiment=<preset>" -> {dotted key: new value}, applied
# to the recorded values before comparing. Each follows the authors' code named beside it.
_HTTYM_ALL = {
    # HowToTrainYourMAMLPytorch meta_neural_network_architectures.py:116: the linear head's
    # weight from nn.init.xavier_uniform_ (Glorot uniform).
    "model.head_init": "glorot_uniform",
    # HowToTrainYourMAMLPytorch experiment_builder.py:247-290, :371: the test is an ensemble of
    # the 5 checkpoints with the best validation accuracy, logits averaged; its candidates are
    # the epochs (500 meta-steps), each validated on num_evaluation_tasks=600 tasks (:327-352).
    "eval.checkpoint": "top_k",
    "eval.top_k": 5,
    "trainer.val_every": 500,
    "trainer.val_tasks": 600,
}
_HTTYM_MINI_IMAGENET = {
    **_HTTYM_ALL,
    # HowToTrainYourMAMLPytorch few_shot_learning_system.py:332-335: every meta-gradient
    # element clamped to [-10, 10] for imagenet datasets.
    "optim.clip_value": 10.0,
}
_SNELL_BATCHNORM = {
    # jakesnell/prototypical-networks eval.py:16: model.eval(), BatchNorm with running averages.
    "model.bn_stats": "running",
    # jakesnell/prototypical-networks protonets/models/few_shot.py:39-42: support and query
    # embedded as one batch in training.
    "algo.joint_bn": True,
}
_SNELL_OMNIGLOT = {
    **_SNELL_BATCHNORM,
    # jakesnell/prototypical-networks run_train.py:24: 15 queries per class in test episodes.
    "dataset.k_query_test": 15,
    # jakesnell/prototypical-networks splits/vinyals/: the Vinyals class split.
    "dataset.split": "vinyals",
}
_HTTYM_OMNIGLOT = {
    **_HTTYM_ALL,
    # HowToTrainYourMAMLPytorch data.py: its own seeded 1150 / 50 / 423 character cut, and one
    # random rotation per class of a training task only (data.py:92-95).
    "dataset.split": "mamlpp",
    "dataset.rotation_sampling": "per_task_train_only",
}
# Each algorithm's default BatchNorm mode at evaluation follows its paper's code
# (conf/algo_model/<algo>_<model>.yaml): ProtoNet's running averages (model.eval()), ProtoMAML's
# support-set moments; on the datasets whose default model has BatchNorm.
_PAPER_BATCHNORM_DEFAULTS = {
    overrides: {"model.bn_stats": mode}
    for algo, mode in (("protonet", "running"), ("protomaml", "support"))
    for overrides in COMPOSED
    if overrides.startswith(f"algo={algo} ") and "dataset=sinusoid" not in overrides
}
INTENDED: dict[str, dict[str, object]] = {
    **_PAPER_BATCHNORM_DEFAULTS,
    "experiment=mamlpp_omniglot_5w1s": _HTTYM_OMNIGLOT,
    "experiment=mamlpp_omniglot_20w1s": _HTTYM_OMNIGLOT,
    "experiment=mamlpp_miniimagenet_5w1s": _HTTYM_MINI_IMAGENET,
    "experiment=mamlpp_miniimagenet_5w5s": _HTTYM_MINI_IMAGENET,
    "experiment=protonet_omniglot_5w1s": _SNELL_OMNIGLOT,
    "experiment=protonet_omniglot_20w1s": _SNELL_OMNIGLOT,
    "experiment=protonet_miniimagenet_5w1s": _SNELL_BATCHNORM,
    "experiment=protonet_miniimagenet_5w5s": _SNELL_BATCHNORM,
    "experiment=protomaml_omniglot_5w1s": {
        # google-research/meta-dataset trainer_config.gin:12 and optimization_learners.py:602-618:
        # the queries normalised with the support set's BatchNorm moments.
        "model.bn_stats": "support",
        # google-research/meta-dataset maml_init_with_proto_config.gin:7 weight_decay = 1e-4,
        # a tf.keras.regularizers.L2(1e-4) penalty 1e-4 * sum(w ** 2) on every conv and dense
        # kernel (functional_backbones.py weight_variable), added to the loss before the
        # optimizer (trainer.py get_run_fn_with_train_op): gradient + 2e-4 * w.
        "optim.weight_decay": 2.0e-4,
    },
}


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _compose(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        return compose(config_name="config", overrides=overrides)


def _dropped_is_allowed(key: str, new_cfg) -> bool:
    """A key of the old flat config may be absent now only where the group now composed has
    no such key (a key the selected algorithm, dataset or model never read)."""
    group = key.split(".")[0]
    return group in ("algo", "dataset", "model") and OmegaConf.select(new_cfg, key) is None


def test_intended_changes_name_recorded_presets_and_keys():
    for overrides, changes in INTENDED.items():
        assert overrides in COMPOSED, overrides
        recorded = _flat(COMPOSED[overrides])
        for key in changes:
            assert key in recorded or key in ADDED, f"{overrides}: {key} was not recorded"


@pytest.mark.parametrize("overrides", sorted(COMPOSED))
def test_composes_to_the_recorded_values(overrides):
    old = {**ADDED, **_flat(COMPOSED[overrides]), **INTENDED.get(overrides, {})}
    new_cfg = _compose(overrides.split())
    new = _flat(OmegaConf.to_container(new_cfg, resolve=True))
    for key, value in new.items():
        old_key = RENAMED.get(key, key)
        assert old_key in old, f"{key}: new key with no recorded value (add it to RENAMED?)"
        assert value == old[old_key], f"{key}: {value!r} != recorded {old[old_key]!r}"
    renamed_from = set(RENAMED.values())
    for key in old.keys() - new.keys() - renamed_from:
        assert _dropped_is_allowed(key, new_cfg), f"{key} dropped"


# Result fields that changed on purpose: algorithm -> {field: new value}. ProtoNet has no inner
# loop, so its schema has no algo.inner_steps_test and its results record 0 test-time steps
# (they recorded the dataset's MAML default, 3, which ProtoNet never used).
INTENTIONAL_RESULT_CHANGES = {"protonet": {"inner_steps_test": 0}}
# The recorded runs evaluated with the batch's statistics, then every algorithm's default; the
# algorithms whose default changed since (_PAPER_BATCHNORM_DEFAULTS) are rerun in that mode.
RECORDED_BN_STATS = {"protonet": "model.bn_stats=batch", "protomaml": "model.bn_stats=batch"}


def _strip(results: dict) -> dict:
    drop = {"train_time_s", "compile_time_s", "eval_time_s", "time_s"}
    return {k: (_strip(v) if isinstance(v, dict) else v) for k, v in results.items() if k not in drop}


# Two algorithms in the default run, every algorithm in the slow tier.
_DEFAULT = {"maml", "protonet"}


@pytest.mark.parametrize(
    "algo", [pytest.param(a, marks=() if a in _DEFAULT else pytest.mark.slow) for a in REFERENCE]
)
def test_reference_run_is_bitwise_the_same(algo, tmp_path):
    from metalearn.train import train

    recorded = FIXTURES / "reference_runs" / algo
    overrides = json.loads((recorded / "overrides.json").read_text())
    if any(o.startswith("dataset=omniglot") for o in overrides):
        if not SHARED_OMNIGLOT.is_dir():
            pytest.skip("needs ../shared/data/omniglot")
        overrides = [o for o in overrides if not o.startswith("dataset.manual_dir=")]
        overrides += [f"dataset.manual_dir={SHARED_OMNIGLOT}", f"dataset.data_dir={tmp_path / 'data'}"]
    cfg = _compose(overrides + ([RECORDED_BN_STATS[algo]] if algo in RECORDED_BN_STATS else []))
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    assert metric_records(run_dir) == metric_records(recorded)
    new = _strip(json.loads((run_dir / "results.json").read_text()))
    old = _strip(json.loads((recorded / "results.json").read_text()))
    old.update(INTENTIONAL_RESULT_CHANGES.get(algo, {}))
    for key in ADDED_RESULTS:
        new.pop(key)
    assert new == old
    shutil.rmtree(run_dir)
