"""containerd's own snapshotter conformance suite against a real ``lazysnap serve`` process."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
SUMMARY = re.compile(r"conformance: (\d+) passed, (\d+) failed, (\d+) skipped")


def lazysnap_command() -> list[str]:
    """The installed ``lazysnap`` script next to this interpreter, else the module."""
    script = Path(sys.executable).parent / "lazysnap"
    return [str(script)] if script.exists() else [sys.executable, "-m", "snapshotter.cli"]


def wait_for_socket(address: Path, process: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    """Block until something accepts connections on address; fail with the server log if it dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"lazysnap serve exited with {process.returncode}:\n{log.read_text()}")
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(address))
                return
            except OSError:
                time.sleep(0.05)
    pytest.fail(f"lazysnap serve did not listen on {address} within {timeout} s:\n{log.read_text()}")


@contextmanager
def lazysnap_serve(root: Path, address: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``lazysnap serve`` as a subprocess until the block ends (SIGTERM, then SIGKILL)."""
    log = root.parent / f"{root.name}-serve.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [*lazysnap_command(), "serve", "--root", str(root), "--address", str(address)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
    try:
        wait_for_socket(address, process, log)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def conformance_dir() -> Path:
    """Find the harness: $LAZYSNAP_CONFORMANCE_DIR, ../shared/conformance, /work/shared/conformance."""
    candidates = [REPO_ROOT.parent / "shared" / "conformance", Path("/work/shared/conformance")]
    if os.environ.get("LAZYSNAP_CONFORMANCE_DIR"):
        candidates.insert(0, Path(os.environ["LAZYSNAP_CONFORMANCE_DIR"]))
    for candidate in candidates:
        if (candidate / "run.sh").exists():
            return candidate
    pytest.fail(
        "containerd's snapshotter conformance harness was not found (looked in "
        + ", ".join(map(str, candidates))
        + "); set LAZYSNAP_CONFORMANCE_DIR to the directory holding run.sh and build.sh"
    )


def ensure_built(harness: Path) -> None:
    """Build the conformance binary with the harness's build.sh if it is not there yet (~20 s)."""
    out = Path(
        os.environ.get("CONFORMANCE_OUT")
        or Path(os.environ.get("TMPDIR", "/tmp")) / "snapshotter-conformance"
    )
    if (out / "conformance.test").exists():
        return
    build = subprocess.run(
        ["bash", str(harness / "build.sh")], cwd=harness, capture_output=True, text=True, timeout=600
    )
    if build.returncode != 0:
        pytest.fail(f"building the conformance suite failed:\n{build.stdout}\n{build.stderr}")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the suite mounts snapshots: needs root")
def test_containerd_conformance_suite(tmp_path: Path) -> None:
    """containerd's SnapshotterSuite passes against lazysnap serve: 20 passed, 0 failed, 1 skipped."""
    harness = conformance_dir()
    ensure_built(harness)
    address = tmp_path / "lazysnap.sock"
    with lazysnap_serve(tmp_path / "root", address):
        run = subprocess.run(
            ["bash", str(harness / "run.sh"), "-l", str(tmp_path / "conformance.log"), str(address)],
            capture_output=True,
            text=True,
            timeout=1200,
        )
    report = f"run.sh exit {run.returncode}\n{run.stdout}\n{run.stderr}"
    match = SUMMARY.search(run.stdout)
    assert match, f"no summary line from run.sh:\n{report}"
    passed, failed, skipped = map(int, match.groups())
    assert (passed, failed, skipped) == (20, 0, 1), report
    assert run.returncode == 0, report
