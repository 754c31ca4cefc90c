"""Shared fixtures: tiny configs, synthetic task sources, float64 switch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from omegaconf import OmegaConf

from metalearn.config import Config, section_config

# The tests run tiny workloads whose time is mostly XLA:CPU compiling, about half of it in
# LLVM's optimisation passes: skip those (measured: test_mamlpp + test_contested 300 s ->
# 146 s). XLA's own HLO passes still run, so the computations are the same; every test
# passes with either setting, and comparisons run both sides under the same flags. Set
# before any backend starts; subprocesses (run_cli) inherit it. The product is unaffected.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

REPO = Path(__file__).resolve().parents[1]
SHARED_OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"


# The choices of the per-choice groups when a test names none (the primary config's defaults).
DEFAULT_CHOICES = {"algo": "maml", "dataset": "sinusoid", "model": "mlp"}


def make_cfg(**sections) -> OmegaConf:
    """A structured Config with per-section overrides, e.g. make_cfg(algo={"inner_lr": 0.1}).
    The algo, dataset and model sections take the schema of their ``name`` (default: maml,
    sinusoid, mlp), so a key that choice lacks fails as it would on the command line."""
    cfg = OmegaConf.structured(Config)
    for group, default in DEFAULT_CHOICES.items():
        values = dict(sections.pop(group, None) or {})
        cfg[group] = section_config(group, {"name": values.pop("name", default), **values})
    for section, values in sections.items():
        if isinstance(values, dict):
            for key, value in values.items():
                OmegaConf.update(cfg, f"{section}.{key}", value)
        else:
            OmegaConf.update(cfg, section, values)
    return cfg


def synthetic_image_arrays(n_classes=12, per_class=20, size=8, seed=0) -> dict[str, np.ndarray]:
    """Class-indexed uint8 arrays per split; every image of class c in split s holds the value
    that identifies (s, c), so a sampled image reveals exactly where it came from."""
    arrays = {}
    rng = np.random.default_rng(seed)
    for split in ("train", "validation", "test"):
        base = (rng.random((n_classes, per_class, size, size, 1)) > 0.5).astype(np.uint8) * 255
        arrays[split] = base
    return arrays


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run only when selected: ``pytest -m slow`` (or any ``-m``
    expression naming slow)."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with pytest -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def float64():
    """Run a test with float64 enabled (finite differences need it), then restore."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Any connection attempt fails at once, so a download attempt cannot hang a test.
    Use with ``pytestmark = pytest.mark.usefixtures("no_network")``; a test that takes the
    fixture gets the list of attempted connections (to assert that a failure is not
    retried)."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[-1] if args else kwargs)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    return attempts


def write_mini_imagenet_pickles(
    folder: Path, split_wnids: dict[str, tuple[str, ...]], per_class: int
) -> Path:
    """mini-imagenet-cache-{train,val,test}.pkl in the real format (image_data (N, 84, 84, 3)
    uint8 + class_dict {wnid: rows}) for a scaled-down split; returns ``folder``."""
    import pickle

    folder.mkdir(parents=True, exist_ok=True)
    names = {"train": "train", "validation": "val", "test": "test"}
    for split, wnids in split_wnids.items():
        rng = np.random.default_rng(len(split))
        image_data = rng.integers(0, 256, size=(len(wnids) * per_class, 84, 84, 3), dtype=np.uint8)
        class_dict = {w: list(range(i * per_class, (i + 1) * per_class)) for i, w in enumerate(wnids)}
        with open(folder / f"mini-imagenet-cache-{names[split]}.pkl", "wb") as f:
            pickle.dump({"image_data": image_data, "class_dict": class_dict}, f, protocol=4)
    return folder


def scaled_mini_imagenet_split(
    train: int = 6, validation: int = 5, test: int = 5
) -> dict[str, tuple[str, ...]]:
    """The first classes of each split of the real (Ravi & Larochelle) split."""
    from metalearn.data import mini_imagenet as mi

    return {
        "train": mi.TRAIN_WNIDS[:train],
        "validation": mi.VALIDATION_WNIDS[:validation],
        "test": mi.TEST_WNIDS[:test],
    }


@pytest.fixture
def scaled_mini_imagenet(monkeypatch, tmp_path_factory):
    """A manual_dir of synthetic mini-ImageNet pickles with 6/5/5 classes of 20 images, and the
    loader's split constants scaled to match (in this process). Returns (manual_dir, data_dir)."""
    from metalearn.data import mini_imagenet as mi

    split = scaled_mini_imagenet_split()
    monkeypatch.setattr(mi, "SPLIT_WNIDS", split)
    monkeypatch.setattr(mi, "IMAGES_PER_CLASS", 20)
    root = tmp_path_factory.mktemp("mini_imagenet")
    return write_mini_imagenet_pickles(root / "manual", split, 20), root / "data"


def run_cli(
    *args: str, cwd: Path, check: bool = True, prelude: str = "", timeout: float = 600
) -> subprocess.CompletedProcess:
    """``metalearn <args>`` in a subprocess on the CPU. ``check``: fail the test (with the
    output) on a non-zero exit. ``prelude``: Python run in that process first (e.g. to scale
    a loader's constants)."""
    if prelude:
        run_main = (
            f"import sys\nfrom metalearn.cli import main\nsys.argv = ['metalearn', *{list(args)!r}]\nmain()"
        )
        command = [sys.executable, "-c", f"{prelude}\n{run_main}"]
    else:
        command = [sys.executable, "-m", "metalearn.cli", *args]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def run_cli_in_process(*args: str) -> tuple[int, str, str]:
    """``metalearn <args>`` in this process: (exit code, stdout, stderr). For contract checks
    that need no fresh interpreter (a subprocess costs an import of jax and Hydra)."""
    import contextlib
    import io

    from hydra.core.global_hydra import GlobalHydra

    from metalearn import cli

    class _Sink(io.StringIO):
        """Never closed: Hydra's log handlers keep the stream they were configured with."""

        def close(self) -> None:
            pass

    out, err = _Sink(), _Sink()
    argv, streams = sys.argv, (sys.stdout, sys.stderr)
    GlobalHydra.instance().clear()
    cli._STATE.update(fresh_run_dir=True, failed_jobs=[], jobs=0)
    code = 0
    try:
        # No logging config from Hydra here: its dictConfig would shut down the handlers of
        # this process (pytest's log capture among them).
        # (--help and --cfg configure Hydra's logging before any job: use run_cli for them.)
        quiet = ["hydra/job_logging=none", "hydra/hydra_logging=none"] if args[0] in ("train", "eval") else []
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main([*args, *quiet])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        import logging

        sys.argv = argv
        sys.stdout, sys.stderr = streams
        GlobalHydra.instance().clear()
        for handler in list(logging.root.handlers):  # Hydra's job logging, pointed at out/err
            if getattr(handler, "stream", None) in (out, err):
                logging.root.removeHandler(handler)
    return code, out.getvalue(), err.getvalue()


# One sweep of every algorithm on a tiny sinusoid budget, made once per session and shared by
# the CLI, eval and report tests (copy a run with copy_run before changing it).
SWEEP_ALGOS = ("maml", "fomaml", "caml", "metasgd", "reptile", "anil")
SWEEP_TINY = (
    "dataset=sinusoid",
    "trainer.steps=30",
    "trainer.log_every=10",
    "trainer.val_every=15",
    "trainer.val_tasks=10",
    "trainer.checkpoint_every=15",
    "trainer.progress=false",
    "eval.n_tasks=20",
)


def built_once_per_session(tmp_path_factory, name: str, build) -> Path:
    """``build(dir)`` run once per test session, also when pytest-xdist splits the session
    over worker processes: the first worker to get here builds under a file lock in the
    directory the workers share, the others wait and reuse it. Users must not modify it
    (copy first)."""
    import fcntl

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's basetemp; each worker's is a child of it
    target = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".complete").exists():
            target.mkdir(exist_ok=True)
            build(target)
            (target / ".complete").touch()
    return target


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> Path:
    """``metalearn train -m algo=<all> ...`` (one process); job dirs ``<n>_algo=<name>``."""

    def build(root: Path) -> None:
        algos = f"algo={','.join(SWEEP_ALGOS)}"
        sweep_dir = f"hydra.sweep.dir={root / 'sweep'}"
        run_cli("train", "-m", algos, *SWEEP_TINY, sweep_dir, cwd=root, timeout=1800)  # ~1 min unloaded

    return built_once_per_session(tmp_path_factory, "tiny_sweep", build) / "sweep"


def sweep_run(sweep: Path, algo: str) -> Path:
    """The job dir of ``algo`` in :func:`tiny_sweep`."""
    (run,) = sweep.glob(f"*_algo={algo},*")
    return run


def copy_run(sweep: Path, algo: str, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(sweep_run(sweep, algo), dest))


def metric_records(run_dir: Path) -> list[dict]:
    """The rows of ``run_dir``/metrics.jsonl without their wall-clock fields (``steps_per_s``,
    ``time_s``), so that the rows of two runs of the same config compare equal."""
    import json

    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        r.pop("steps_per_s", None)
        r.pop("time_s", None)
        out.append(r)
    return out


def counting_traces(exp):
    """(``exp`` with a task sampler that appends to ``traces`` each time it is traced, ``traces``):
    a jitted meta-step that never retraces leaves one entry, however many times it runs."""
    import dataclasses

    traces = []
    original = exp.source.sample

    def counting_sample(data, key):
        traces.append(1)  # runs only while tracing
        return original(data, key)

    return exp._replace(source=dataclasses.replace(exp.source, sample=counting_sample)), traces


# Shared pieces of the algorithms' reference checks (test_maml, test_metasgd, test_anil,
# test_caml, test_reptile, test_models): sinusoid problems, sampled tasks, tree comparisons,
# and the written-out MAML-style outer loss.


def sinusoid_problem(cfg):
    """A Problem (model + sinusoid task source) of ``cfg``'s model and dataset sections."""
    from metalearn.algos import Problem
    from metalearn.models import make_model
    from metalearn.tasks import sinusoid_source

    source = sinusoid_source(cfg.dataset)
    return Problem(make_model(cfg.model, source.input_shape, source.output_dim), source)


def sampled_tasks(problem, n: int, seed: int = 1):
    """``n`` training tasks of ``problem``'s source, stacked along a leading axis."""
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    return jax.vmap(problem.source.sample, in_axes=(None, 0))(problem.source.splits["train"], keys)


def sampled_tasks64(problem, n: int, seed: int = 1):
    """:func:`sampled_tasks` in float64 (run under the ``float64`` fixture)."""
    import jax.numpy as jnp

    return jax.tree.map(lambda a: a.astype(jnp.float64), sampled_tasks(problem, n, seed))


def task_at(tasks, i):
    return jax.tree.map(lambda a: a[i], tasks)


def assert_trees_close(a, b, rtol: float, atol: float) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def close64(a, b) -> None:
    """Trees equal to float64 rounding."""
    assert_trees_close(a, b, rtol=1e-9, atol=1e-12)


def close32(a, b, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Trees equal to float32 rounding."""
    assert_trees_close(a, b, rtol=rtol, atol=atol)


def leaf_norms(tree) -> list[float]:
    import jax.numpy as jnp

    return [float(jnp.linalg.norm(x)) for x in jax.tree.leaves(tree)]


def max_leaf_diff(a, b) -> float:
    import jax.numpy as jnp

    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in pairs)


def stop_gradient_if(tree, first_order: bool):
    return jax.lax.stop_gradient(tree) if first_order else tree


def explicit_outer_loss(problem, tasks, n_tasks: int, steps: int, params, update):
    """Mean over the first ``n_tasks`` of ``tasks`` of the query loss after ``steps`` inner
    steps ``p <- update(p, grad of the support loss at p)`` from ``params``, written out."""
    total = 0.0
    for i in range(n_tasks):
        t = task_at(tasks, i)
        p = params
        for _ in range(steps):
            p = update(p, jax.grad(problem.loss)(p, t.support_x, t.support_y))
        total = total + problem.loss(p, t.query_x, t.query_y)
    return total / n_tasks


def meta_grad_matches(algo, meta, tasks, outer):
    """Check ``algo.meta_grad``'s loss and gradients at ``meta`` against ``outer``'s
    (float64); return the gradients."""
    grads, _, metrics = jax.jit(algo.meta_grad)(meta, (), tasks, jax.random.PRNGKey(0), 0)
    loss, reference = jax.jit(jax.value_and_grad(outer))(meta)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-12)
    close64(grads, reference)
    return grads


def film_input_shapes(model, params, x, context):
    """Shapes of the activations FiLM modulates (captured from the module's forward pass)."""
    from metalearn.models import FiLM

    _, state = jax.eval_shape(
        lambda p: model.module.apply(
            {"params": p},
            x,
            context,
            capture_intermediates=lambda mdl, _: isinstance(mdl, FiLM),
            mutable=["intermediates"],
        ),
        params,
    )
    return [leaf.shape for leaf in jax.tree.leaves(state["intermediates"])]
