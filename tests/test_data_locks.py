"""Builds and caches are safe under concurrent jobs: N processes on one empty data dir all
succeed with identical arrays (one builds, the others wait and reuse), and a build killed while
holding the lock is taken over by the next one. Synthetic Omniglot archives (a 2 s build)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from test_data_identity import EXPECTED
from test_omniglot_data import synth_archives

from metalearn.data.pipeline import file_lock, lock_file

# serial: its slow checks time kills and signals; CI runs them in one process.
pytestmark = [pytest.mark.usefixtures("no_network"), pytest.mark.serial]

# Load synthetic Omniglot (default settings) and print the digest of its arrays. ``hang``:
# stop for good after writing part of the TFDS build (to be killed there).
LOADER = """
import json, logging, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
sys.path.insert(0, {tests!r})
from metalearn.data import omniglot, omniglot_tfds
if {hang!r}:
    real = omniglot_tfds.iter_archive_examples
    def hanging(paths, seen=None):
        for i, example in enumerate(real(paths, seen)):
            yield example
            if i == 50:
                print("HANGING", flush=True)
                time.sleep(3600)
    omniglot_tfds.iter_archive_examples = hanging
from test_data_identity import _digest
arrays = omniglot.load_omniglot("small", {manual!r}, {data!r}, checksums={checksums!r})
print("DIGEST", _digest(arrays), flush=True)
"""


def start(manual: Path, data: Path, checksums: dict, log: Path, hang: bool = False) -> subprocess.Popen:
    code = LOADER.format(tests=str(REPO / "tests"), hang=hang, manual=str(manual), data=str(data),
                         checksums=checksums)  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_for(predicate, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    manual = tmp_path_factory.mktemp("manual")
    return manual, synth_archives(manual)


def test_three_processes_build_one_dataset_together(archives, tmp_path):
    manual, checksums = archives
    data = tmp_path / "data"
    tfds_dir = data / "metalearn_omniglot" / "small" / "1.0.0"
    logs = [tmp_path / f"job{i}.log" for i in range(3)]
    # Hold the TFDS lock while the three start, so that all of them must wait for it (one
    # inside the cache lock, two outside it) however fast or slow each one starts.
    with file_lock(tfds_dir, "the test", data):
        jobs = [start(manual, data, checksums, log) for log in logs]
        wait_for(lambda: all("waiting for another process" in log.read_text() for log in logs), "3 waiters")
    codes = [job.wait(timeout=300) for job in jobs]
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0, 0], outputs
    digests = {line for out in outputs for line in out.splitlines() if line.startswith("DIGEST")}
    assert digests == {f"DIGEST {EXPECTED['omniglot_synth_small']}"}, outputs
    # One process built the TFDS dataset and the cache; the others reused them.
    assert sum(out.count("built TFDS metalearn_omniglot/small") for out in outputs) == 1, outputs
    assert sum(out.count("Omniglot: built") for out in outputs) == 1, outputs
    assert sum("waiting for another process" in out and "the Omniglot cache" in out for out in outputs) == 2
    assert not list(tfds_dir.parent.glob("incomplete.*"))


def test_killed_build_is_taken_over(archives, tmp_path):
    manual, checksums = archives
    data = tmp_path / "data"
    small = data / "metalearn_omniglot" / "small"
    first = start(manual, data, checksums, tmp_path / "killed.log", hang=True)
    try:
        wait_for(lambda: "HANGING" in (tmp_path / "killed.log").read_text(), "the build to start")
        assert list(small.glob("incomplete.*"))  # a half-written build
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert lock_file(small / "1.0.0", data).read_text().strip() == str(first.pid)  # stale pid left
    second = start(manual, data, checksums, tmp_path / "second.log")
    assert second.wait(timeout=300) == 0
    out = (tmp_path / "second.log").read_text()
    assert f"by pid {first.pid} was interrupted; taking over its lock" in out, out
    assert "left by an interrupted TFDS build" in out, out
    assert f"DIGEST {EXPECTED['omniglot_synth_small']}" in out
    assert not list(small.glob("incomplete.*"))


def test_failed_run_removes_its_run_dir(tmp_path):
    """An unexpected error (not a one-line MetalearnError) keeps its traceback and exit code,
    and leaves no run dir behind."""
    prelude = (
        "import metalearn.train as t\ndef boom(*a, **k):\n    raise RuntimeError('boom')\nt.setup = boom"
    )
    run = tmp_path / "run"
    proc = run_cli(
        "train", "trainer.steps=1", f"hydra.run.dir={run}", cwd=tmp_path, check=False, prelude=prelude
    )
    assert proc.returncode == 1 and "RuntimeError: boom" in proc.stderr, proc.stderr
    assert not run.exists()
