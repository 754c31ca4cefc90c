"""Bad inputs: each is one line on stderr naming the problem, exit code 2, and nothing on
disk changed. Most go through the CLI's precheck in-process (no Hydra job, no training);
a few need a real job (data files, checkpoints, sweeps) and run as subprocesses."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
from conftest import copy_run, make_cfg, run_cli, run_cli_in_process
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from metalearn import cli
from metalearn.config import schemas, section_config, validate
from metalearn.errors import ConfigError

TINY = [
    "model.hidden=[8]",
    "trainer.meta_batch_size=4",
    "trainer.log_every=5",
    "trainer.val_every=0",
    "trainer.progress=false",
    "eval.n_tasks=4",
]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (dirs are implied by their files)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A pre-existing output dir with files in it, and a plain file to misuse as a dir."""
    existing = tmp_path / "existing"
    (existing / "sub").mkdir(parents=True)
    (existing / "notes.txt").write_text("keep me\n")
    (existing / "sub" / "data.bin").write_bytes(bytes(range(256)))
    (tmp_path / "a_file").write_text("not a dir\n")
    return tmp_path


# (argv after `metalearn`, text the one-line error must contain). {tmp} is the workdir.
PRECHECK_CASES = [
    (["train", "algo.inner_lr=-1"], "algo.inner_lr"),
    (["train", "algo.inner_lr=0"], "algo.inner_lr"),
    (["train", "algo.inner_lr=nan"], "algo.inner_lr"),
    (["train", "optim.lr=0"], "optim.lr"),
    (["train", "optim.lr=-0.5"], "optim.lr"),
    (["train", "optim.clip_norm=-1"], "optim.clip_norm"),
    (["train", "optim.final_lr_fraction=2"], "optim.final_lr_fraction"),
    (["train", "trainer.steps=-1"], "trainer.steps"),
    (["train", "trainer.steps=abc"], "trainer.steps"),
    (["train", "algo.inner_steps=1.5"], "algo.inner_steps"),
    (["train", "trainer.progress=maybe"], "trainer.progress"),
    (["train", "seed=abc"], "seed"),
    (["train", "trainer.stepz=3"], "trainer.stepz"),
    (["train", "algo=nonexistent"], "algo.name='nonexistent'"),
    (["train", "algo.name=bogus"], "algo.name"),
    (["train", "dataset=imagenet"], "dataset.name='imagenet'"),
    (["train", "dataset.name=imagenet"], "dataset.name"),
    (["train", "model=resnet"], "model.name='resnet'"),
    (["train", "model=conv4"], "model"),
    (["train", "dataset.k_shot=0"], "dataset.k_shot"),
    (["train", "dataset.k_query=-2"], "dataset.k_query"),
    (["train", "trainer.meta_batch_size=0"], "trainer.meta_batch_size"),
    (["train", "trainer.keep_checkpoints=0"], "trainer.keep_checkpoints"),
    (["train", "trainer.on_nan=ignore"], "trainer.on_nan"),
    (["train", "trainer.distributed=maybe"], "trainer.distributed"),
    (["train", "eval.n_tasks=1"], "eval.n_tasks"),
    (["train", "eval.split=dev"], "eval.split"),
    (["train", "attack.eps=-1"], "attack.eps"),
    (["train", "dataset=omniglot", "dataset.variant=small", "dataset.n_way=81"], "dataset.n_way"),
    (["train", "dataset=omniglot", "dataset.k_shot=15", "dataset.k_query=10"], "dataset.k_query"),
    (["train", "dataset=omniglot", "dataset.variant=huge"], "dataset.variant"),
    (["train", "dataset=omniglot", "dataset.manual_dir={tmp}/no_such_dir"], "dataset.manual_dir"),
    (["train", "dataset=image_folder"], "dataset.path"),
    (["train", "dataset=image_folder", "dataset.path={tmp}/no_such_dir"], "dataset.path"),
    (["train", "dataset=image_folder", "dataset.path={tmp}", "dataset.channels=2"], "dataset.channels"),
    (
        ["train", "dataset=image_folder", "dataset.path={tmp}", "dataset.split_ratios=[0.5,0.5,0.5]"],
        "split_ratios",
    ),
    (["train", "dataset=mini_imagenet", "dataset.n_way=17"], "dataset.n_way"),
    (["train", "dataset=mini_imagenet", "dataset.placement=gpu"], "dataset.placement"),
    (["train", "dataset=cifar_fs", "dataset.image_size=84"], "dataset.image_size"),
    (["train", "dataset=fc100", "dataset.k_shot=590"], "dataset.k_shot + dataset.k_query"),
    (["train", "dataset=omniglot", "model=mlp"], "model"),
    (["train", "dataset=omniglot", "model=resnet12", "model.compute_dtype=float16"], "model.compute_dtype"),
    (["train", "dataset=omniglot", "model=resnet12", "model.channels=[64,0]"], "model.channels"),
    (["train", "hydra.run.dir={tmp}/a_file/run"], "hydra.run.dir"),
    (["train", "-m", "seed=0,1", "hydra.sweep.dir={tmp}/a_file/sweep"], "hydra.sweep.dir"),
    (["train", "-m", "algo.inner_lr=-1,0.1"], "algo.inner_lr"),
    (["eval"], "run_dir"),
    (["eval", "run_dir={tmp}/missing_run"], "run_dir"),
    (["eval", "run_dir={tmp}/existing"], "run_dir"),
    (["frobnicate"], "frobnicate"),
]


@pytest.mark.parametrize("argv,needle", PRECHECK_CASES, ids=[" ".join(a) for a, _ in PRECHECK_CASES])
def test_precheck_rejects(workdir, monkeypatch, capsys, argv, needle):
    def no_job(*args, **kwargs):  # precheck must fail before Hydra starts a job
        raise AssertionError(f"precheck accepted {argv}")

    monkeypatch.setattr(cli, "_hydra_entry", no_job)
    monkeypatch.setattr(sys, "argv", ["metalearn"])
    monkeypatch.chdir(workdir)
    argv = [a.replace("{tmp}", str(workdir)) for a in argv]
    if argv[0] == "train" and not any(a.startswith("hydra.") for a in argv):
        argv.append(f"hydra.run.dir={workdir / 'existing'}")
    before = snapshot(workdir)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    assert snapshot(workdir) == before


def test_fresh_run_over_existing_checkpoints_is_refused(workdir, monkeypatch, capsys):
    run = workdir / "existing"
    (run / "checkpoints" / "10").mkdir(parents=True)
    monkeypatch.setattr(cli, "_hydra_entry", lambda *a: pytest.fail("precheck accepted"))
    before = snapshot(workdir)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", f"hydra.run.dir={run}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainer.resume=true" in err[0]
    assert snapshot(workdir) == before


def test_corrupt_archive_fails_in_job_and_leaves_no_run_dir(workdir):
    manual = workdir / "zips"
    manual.mkdir()
    for name in ("images_background_small1.zip", "images_background_small2.zip"):
        (manual / name).write_bytes(b"PK\x03\x04 truncated garbage")
    before = snapshot(workdir)
    proc = run_cli(
        "train",
        "dataset=omniglot",
        "dataset.variant=small",
        f"dataset.manual_dir={manual}",
        f"dataset.data_dir={workdir / 'data'}",
        "dataset.download=false",
        f"hydra.run.dir={workdir / 'run'}",
        cwd=workdir,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "images_background_small" in lines[0], proc.stderr
    assert not (workdir / "run").exists()
    shutil.rmtree(workdir / "data", ignore_errors=True)  # the data cache dir TFDS may create
    assert snapshot(workdir) == before


def test_eval_with_corrupt_checkpoints_is_one_line_and_touches_nothing(tiny_sweep, tmp_path):
    run = copy_run(tiny_sweep, "maml", tmp_path / "run")
    for step_dir in (run / "checkpoints").iterdir():  # damage every checkpoint
        for f in step_dir.rglob("*"):
            if f.is_file() and "ocdbt" in str(f):
                f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    before = snapshot(tmp_path)
    code, _, stderr = run_cli_in_process("eval", f"run_dir={run}")
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "no usable checkpoint" in lines[0], stderr
    assert snapshot(tmp_path) == before
    assert not (run / "eval").exists()


def test_sweep_with_a_failing_job_keeps_the_others(tmp_path):
    """Both jobs pass precheck (every job's values are checked before the first starts, see
    test_run_directories); the second fails inside its job (an inner lr that makes the loss
    non-finite, found only by training)."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "train",
        "-m",
        "algo.inner_lr=0.01,1e30",
        *TINY,
        "trainer.steps=5",
        "trainer.log_every=1",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "1 of 2 sweep jobs failed" in proc.stderr.strip().splitlines()[-1]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2
    ok, bad = jobs
    assert json.loads((ok / "results.json").read_text())["steps"] == 5
    assert "non-finite" in (bad / "error.txt").read_text()
    assert not (bad / "results.json").exists()


# Property: validate raises ConfigError (naming the bad key) exactly when the values break a
# rule; the rules are restated here independently of metalearn.config.validate.
_FIELDS = {
    "algo.inner_lr": st.floats(allow_nan=True, allow_infinity=True),
    "algo.inner_steps": st.integers(-5, 10),
    "algo.inner_steps_test": st.integers(-5, 10),
    "dataset.n_way": st.integers(-3, 2000),
    "dataset.k_shot": st.integers(-3, 30),
    "dataset.k_query": st.integers(-3, 30),
    "dataset.name": st.sampled_from(["sinusoid", "omniglot", "mnist"]),
    "dataset.variant": st.sampled_from(["standard", "small", "tiny"]),
    "model.name": st.sampled_from(["mlp", "conv4", "vit"]),
    "optim.lr": st.floats(min_value=-1e3, max_value=1e3),
    "optim.warmup_steps": st.integers(-10, 10),
    "trainer.steps": st.integers(-10, 10**6),
    "trainer.meta_batch_size": st.integers(-2, 64),
    "trainer.keep_checkpoints": st.integers(-2, 5),
    "trainer.on_nan": st.sampled_from(["stop", "skip", "warn"]),
    "eval.n_tasks": st.integers(-2, 1000),
}


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(sorted(_FIELDS)), st.none(), max_size=6).flatmap(
        lambda keys: st.fixed_dictionaries({k: _FIELDS[k] for k in keys})
    )
)
def test_validate_raises_only_config_errors_naming_a_key(values):
    cfg = _cfg_with(values)
    broken = _broken_rules(cfg)
    try:
        validate(cfg)
    except ConfigError as err:
        assert broken, f"valid config rejected: {err}"
        message = str(err)
        assert "\n" not in message
        named = re.match(r"invalid ([a-z_.]+(?: \+ [a-z_.]+)?)=", message)
        assert named, message
        for key in named.group(1).split(" + "):
            assert OmegaConf.select(cfg, key, default="absent") != "absent", message
    else:
        assert not broken, f"invalid config accepted: {broken}"


def _cfg_with(values: dict):
    """The default config with ``values``: a ``<group>.name`` picks that choice's schema (an
    unknown name keeps the other keys, so that validate sees the unknown name); keys the chosen
    schema lacks are left out (composition refuses them, test_config_groups)."""
    cfg = make_cfg()
    for group in ("dataset", "model"):
        name = values.get(f"{group}.name")
        if name in schemas(group):
            cfg[group] = section_config(group, {"name": name})
        elif name is not None:
            cfg[group] = OmegaConf.create({**OmegaConf.to_container(cfg[group]), "name": name})
    for key, value in values.items():
        if key.endswith(".name") or OmegaConf.select(cfg, key, default="absent") != "absent":
            OmegaConf.update(cfg, key, value)
    return cfg


def _broken_rules(cfg) -> list[str]:
    """The rules (of README / config.py docs) that the sampled fields break; the other
    fields keep their valid defaults."""
    a, d, m, o, t = cfg.algo, cfg.dataset, cfg.model, cfg.optim, cfg.trainer
    rules = {
        "algo.inner_lr": math.isfinite(a.inner_lr) and a.inner_lr > 0,
        "algo.inner_steps": a.inner_steps >= 1,
        "algo.inner_steps_test": a.inner_steps_test >= 0,
        "dataset.name": d.name in ("sinusoid", "omniglot"),
        "dataset.k_shot": d.k_shot >= 1,
        "dataset.k_query": d.k_query >= 1,
        "model.name": m.name in ("mlp", "conv4"),
        "model": m.name == ("mlp" if d.name == "sinusoid" else "conv4") or d.name == "mnist",
        "optim.lr": math.isfinite(o.lr) and o.lr > 0,
        "optim.warmup_steps": o.warmup_steps >= 0,
        "trainer.steps": t.steps >= 0,
        "trainer.meta_batch_size": t.meta_batch_size >= 1,
        "trainer.keep_checkpoints": t.keep_checkpoints >= 1,
        "trainer.on_nan": t.on_nan in ("stop", "skip"),
        "eval.n_tasks": cfg.eval.n_tasks >= 2,
    }
    if d.name == "omniglot":  # 20 drawings per character; 4 rotations of 100 or 20 characters
        rules["dataset.variant"] = d.variant in ("standard", "small")
        rules["dataset.n_way"] = d.n_way >= 2 and d.n_way <= 4 * {"small": 20}.get(d.variant, 100)
        rules["dataset.k_shot + dataset.k_query"] = d.k_shot + d.k_query <= 20
    return [rule for rule, ok in rules.items() if not ok]


@pytest.mark.parametrize(
    "values,valid",
    [
        ({}, True),
        ({"dataset.name": "omniglot", "model.name": "conv4", "dataset.n_way": 80}, True),
        ({"dataset.name": "omniglot", "model.name": "conv4", "dataset.n_way": 401}, False),
        ({"algo.inner_lr": float("nan")}, False),
        ({"trainer.on_nan": "warn"}, False),
        ({"algo.inner_steps_test": 0, "trainer.steps": 0}, True),
    ],
)
def test_validate_property_oracle_examples(values, valid):
    """The property's oracle on fixed cases, so both outcomes are always exercised."""
    cfg = _cfg_with(values)
    assert (not _broken_rules(cfg)) == valid
    if valid:
        validate(cfg)
    else:
        with pytest.raises(ConfigError):
            validate(cfg)


def test_out_of_memory_becomes_one_line_naming_the_settings():
    err = RuntimeError(
        "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating 30494697576 bytes.\nmore"
    )
    train_msg = str(cli._out_of_memory(err, cli._train_command))
    assert "\n" not in train_msg and "30494697576 bytes" in train_msg
    assert "trainer.meta_batch_size" in train_msg and "eval.batch_size" in train_msg
    eval_msg = str(cli._out_of_memory(err, cli._eval_command))
    assert "eval.batch_size" in eval_msg and "trainer.meta_batch_size" not in eval_msg
