"""Multi-process training (jax.distributed) on CPU, and the environment detection.

The real test launches two processes with two fake CPU devices each (4 global devices),
joined through a coordinator on 127.0.0.1 (CPU collectives: gloo, jax's default), and one
reference process with 4 fake devices. Both run the same meta-steps and a short train()
with checkpoints and a resume; losses, parameters and results must agree, each process's
devices must hold their own tasks, and only process 0 may write files.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from conftest import REPO

from metalearn import distributed
from metalearn.errors import ConfigError

# serial: its slow checks time kills and signals; CI runs them in one process.
pytestmark = pytest.mark.serial

_WORKER = textwrap.dedent(
    """
    import json, sys
    from metalearn.distributed import is_main_process, maybe_initialize

    desc = maybe_initialize("auto")
    assert maybe_initialize("auto") == desc  # idempotent

    import jax, numpy as np
    from conftest import make_cfg
    from metalearn.step import init_state, make_meta_step, replicate, sample_tasks, setup, task_mesh
    from metalearn.train import train

    out_path, run_dir = sys.argv[1], sys.argv[2]
    mesh = task_mesh()
    assert mesh.devices.size == 4, mesh
    cfg = make_cfg(
        algo={"inner_steps": 1},
        model={"hidden": [8, 8]},
        trainer={"steps": 4, "meta_batch_size": 8, "log_every": 1, "checkpoint_every": 2,
                 "val_every": 2, "val_tasks": 8, "progress": False},
        eval={"n_tasks": 8, "batch_size": 4},
    )
    exp = setup(cfg)
    step = make_meta_step(exp, 8, mesh=mesh)
    state = init_state(exp, 0, mesh)
    data = replicate(exp.source.splits["train"], mesh)
    losses = []
    for _ in range(3):
        state, metrics = step(state, data)
        losses.append(float(metrics["loss"]))
    params = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(state.params))])

    tasks = jax.jit(lambda d, k: sample_tasks(exp, d, k, 8, mesh))(data, jax.random.PRNGKey(0))
    shards = []
    for leaf in jax.tree.leaves(tasks):
        for s in leaf.addressable_shards:
            shards.append([s.index[0].start, s.index[0].stop, s.data.shape[0]])

    first = train(cfg, run_dir)
    cfg.trainer.steps, cfg.trainer.resume = 6, True
    resumed = train(cfg, run_dir)
    out = dict(
        desc=desc, process=jax.process_index(), processes=jax.process_count(), main=is_main_process(),
        local=jax.local_device_count(), losses=losses, params=params.tolist(), shards=shards,
        test=first["test"]["mean"], test_resumed=resumed["test"]["mean"],
    )
    with open(out_path, "w") as f:
        json.dump(out, f)
    print("worker done", flush=True)
    """
)

_TIMEOUT = 240


def _free_port() -> int:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError as err:
        pytest.skip(f"cannot bind a local port for the coordinator: {err}")


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
    }
    env.update(
        XLA_FLAGS=(
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
        ).strip(),
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        **extra,
    )
    return env


def _launch(tmp_path, name: str, env: dict[str, str]) -> tuple[subprocess.Popen, str, str]:
    out, run_dir = str(tmp_path / f"{name}.json"), str(tmp_path / f"run-{name}")
    with open(tmp_path / f"{name}.log", "w") as log:  # the child keeps its own handle
        proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, out, run_dir],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc, out, run_dir


def _finish(procs: list[subprocess.Popen], tmp_path, names: list[str]) -> None:
    try:
        for proc in procs:
            proc.wait(timeout=_TIMEOUT)
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        logs = "\n".join((tmp_path / f"{n}.log").read_text()[-2000:] for n in names)
        pytest.fail(f"multi-process workers timed out:\n{logs}")
    for proc, name in zip(procs, names, strict=True):
        if proc.returncode != 0:  # any failure fails (the one reason to skip is checked first)
            log = (tmp_path / f"{name}.log").read_text()
            raise AssertionError(f"{name} exited with {proc.returncode}:\n{log[-4000:]}")


def _require_gloo() -> None:
    """Skip only when the CPU cross-process backend is not available: this jaxlib has no
    gloo collectives (what jax's CPU client calls with JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo)."""
    from jax._src.lib import _jax

    if not hasattr(_jax, "make_gloo_tcp_collectives"):
        pytest.skip("CPU cross-process collectives (gloo) are not available in this jaxlib")


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_devices(tmp_path):
    _require_gloo()
    port = _free_port()
    names = ["p0", "p1", "ref"]
    launched = [
        _launch(
            tmp_path,
            f"p{i}",
            _env(
                2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)
            ),
        )
        for i in range(2)
    ]
    launched.append(_launch(tmp_path, "ref", _env(4)))
    _finish([p for p, _, _ in launched], tmp_path, names)
    (_, out0, run0), (_, out1, run1), (_, outr, runr) = launched
    r0, r1, ref = (_load(path) for path in (out0, out1, outr))

    assert (r0["process"], r0["processes"], r0["main"], r0["local"]) == (0, 2, True, 2)
    assert (r1["process"], r1["processes"], r1["main"], r1["local"]) == (1, 2, False, 2)
    assert (
        r0["desc"].startswith("process 0 of 2, coordinator 127.0.0.1:") and "2 local / 4 global" in r0["desc"]
    )
    assert ref["desc"].startswith("single process")

    # Same meta-steps as one process over the same 4 devices (also the same in both processes).
    for r in (r0, r1):
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-5)
        np.testing.assert_allclose(r["params"], ref["params"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            [r["test"], r["test_resumed"]], [ref["test"], ref["test_resumed"]], rtol=1e-4
        )

    # Each device holds 2 of the 8 tasks; process 0 holds tasks 0-3, process 1 tasks 4-7.
    for r, want in ((r0, {(0, 2), (2, 4)}), (r1, {(4, 6), (6, 8)})):
        assert all(n == 2 for _, _, n in r["shards"])
        assert {(a, b) for a, b, _ in r["shards"]} == want

    # Process 1 was given another run dir (as Hydra's timestamped default may differ between
    # hosts); it used process 0's, and wrote no file of its own.
    assert not os.path.exists(run1)
    assert sorted(os.listdir(os.path.join(run0, "checkpoints"))) == ["2", "4", "6"]
    for step in ("2", "4", "6"):
        assert os.path.isfile(os.path.join(run0, "checkpoints", step, "metalearn_manifest.json"))
    # metrics.jsonl: every record once (not once per process), equal to the reference's.
    records, ref_records = _records(run0), _records(runr)
    keys = [(r["step"], r["split"]) for r in records]
    assert keys == [(r["step"], r["split"]) for r in ref_records] and len(set(keys)) == len(keys)
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(train_losses) == 6
    np.testing.assert_allclose(
        train_losses, [r["loss"] for r in ref_records if r["split"] == "train"], rtol=1e-5
    )
    assert _load(os.path.join(run0, "results.json"))["test"]["mean"] == pytest.approx(r0["test_resumed"])
    log0, log1 = (tmp_path / "p0.log").read_text(), (tmp_path / "p1.log").read_text()
    assert "metalearn: process 0 of 2" in log0 and "results in" in log0
    assert "metalearn:" not in log1 and "results in" not in log1


# --- environment detection (no processes started) -----------------------------------------

_SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_NODELIST": "gpu[017-018]",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
}


def test_detect_single_process_environments():
    assert distributed.detect({}) is None
    assert distributed.detect({**_SLURM, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}) is None
    # sbatch's batch script (no srun step: no SLURM_STEP_NODELIST / SLURM_LOCALID) is one process.
    assert distributed.detect({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8", "SLURM_PROCID": "0"}) is None
    explicit_one = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}
    assert distributed.detect(explicit_one) is None


def test_detect_explicit_variables_win_over_slurm():
    env = {
        **_SLURM,
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "3",
    }
    assert distributed.detect(env) == dict(
        source="env",
        coordinator_address="10.0.0.1:1234",
        num_processes=4,
        process_id=3,
        cluster_detection_method="deactivate",
    )


@pytest.mark.parametrize(
    "env, words",
    [
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, ["JAX_NUM_PROCESSES", "JAX_PROCESS_ID"]),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
            ["JAX_PROCESS_ID=2"],
        ),
        ({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, ["host:port"]),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, ["'two'"]),
    ],
)
def test_detect_bad_explicit_variables(env, words):
    with pytest.raises(ConfigError) as err:
        distributed.detect(env)
    msg = str(err.value)
    assert "trainer.distributed" in msg and "\n" not in msg
    assert all(w in msg for w in words), msg


def test_detect_slurm_one_task_per_node_uses_all_local_devices():
    # One task per node: jax's own detection would pin the task to GPU SLURM_LOCALID only,
    # so the arguments are given in full (coordinator as jax's SLURM detection computes it).
    got = distributed.detect({**_SLURM, "SLURM_STEP_TASKS_PER_NODE": "1(x2)"})
    port = 4242 % 2**12 + (65535 - 2**12 + 1)
    assert got == dict(
        source="slurm",
        coordinator_address=f"gpu017:{port}",
        num_processes=2,
        process_id=1,
        cluster_detection_method="deactivate",
    )
    got = distributed.detect({**_SLURM, "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "JAX_COORDINATOR_PORT": "7777"})
    assert got["coordinator_address"] == "gpu017:7777"
    for nodes, host in [("n1", "n1"), ("n1,n2", "n1"), ("n[001-015],x", "n001"), ("n[003,007-009]", "n003")]:
        got = distributed.detect({**_SLURM, "SLURM_STEP_NODELIST": nodes, "SLURM_NTASKS_PER_NODE": "1"})
        assert got["coordinator_address"] == f"{host}:{port}"
    # Devices chosen explicitly: jax's detection honours JAX_LOCAL_DEVICE_IDS.
    env = {**_SLURM, "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "JAX_LOCAL_DEVICE_IDS": "0,1"}
    assert distributed.detect(env) == {"source": "slurm"}


def test_detect_slurm_several_tasks_per_node_leaves_it_to_jax():
    # One task per GPU: jax's SLURM detection (coordinator, ids, GPU SLURM_LOCALID) is right.
    assert distributed.detect({**_SLURM, "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8"}) == {
        "source": "slurm"
    }
    assert distributed.detect({**_SLURM, "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}) == {"source": "slurm"}


def test_maybe_initialize_modes_in_a_single_process(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in distributed.EXPLICIT_VARS:
            monkeypatch.delenv(name)
    jax.devices()  # the backend is up, as in any test process
    assert distributed.maybe_initialize("off").startswith("single process")
    assert distributed.maybe_initialize("auto").startswith("single process")
    assert distributed.is_main_process() and not distributed.is_multiprocess()
    assert distributed.shared_run_dir("some/dir") == "some/dir"
    with pytest.raises(ConfigError, match=r"invalid trainer.distributed='yes': must be one of auto, on, off"):
        distributed.maybe_initialize("yes")
    # "on" wants jax.distributed, which must come before any device use: one line, no hang.
    with pytest.raises(ConfigError) as err:
        distributed.maybe_initialize("on")
    assert "trainer.distributed=on" in str(err.value) and "\n" not in str(err.value)
    # "auto" in a described multi-process job, too late: the same error, not a silent single run.
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    with pytest.raises(ConfigError, match="trainer.distributed=auto"):
        distributed.maybe_initialize("auto")


_PREEMPT_WORKER = textwrap.dedent(
    """
    import sys
    from metalearn.distributed import maybe_initialize

    maybe_initialize("auto")
    from conftest import make_cfg
    from metalearn.loop_control import Preempted
    from metalearn.train import train

    cfg = make_cfg(
        model={"hidden": [8, 8]},
        trainer={"steps": 100000, "meta_batch_size": 8, "log_every": 5, "checkpoint_every": 0,
                 "val_every": 0, "progress": False},
    )
    try:
        train(cfg, sys.argv[1])
    except Preempted as err:
        print("PREEMPTED", str(err).split(":")[0], flush=True)
        sys.exit(err.exit_code)
    sys.exit(3)  # the 100000 steps are never meant to finish
    """
)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step_with_a_checkpoint(tmp_path):
    _require_gloo()
    port = _free_port()
    run_dir = tmp_path / "run"
    procs = []
    for i in range(2):
        env = _env(
            2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)
        )
        with open(tmp_path / f"q{i}.log", "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", _PREEMPT_WORKER, str(run_dir)],
                    env=env,
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + _TIMEOUT
    try:
        # Signal only process 1, once training is under way (its handler is installed).
        while not (
            metrics.is_file() and any(json.loads(x)["step"] >= 10 for x in metrics.read_text().splitlines())
        ):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                break
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("processes did not stop:\n" + (tmp_path / "q0.log").read_text()[-2000:])
    logs = [(tmp_path / f"q{i}.log").read_text() for i in range(2)]
    assert codes == [143, 143], logs
    stops = [next(line for line in log.splitlines() if line.startswith("PREEMPTED")) for log in logs]
    assert stops[0] == stops[1], stops  # e.g. "PREEMPTED SIGTERM at step 15", in both
    step = int(stops[0].rsplit(" ", 1)[1])
    assert step % 5 == 0  # acted on at a log step, where the processes agree
    assert sorted(os.listdir(run_dir / "checkpoints")) == [str(step)]
