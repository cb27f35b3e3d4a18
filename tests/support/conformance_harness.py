"""Build and run the project's Go conformance harness (``tests/conformance``).

The harness runs containerd's ``snapshots/testsuite.SnapshotterSuite`` through containerd's snapshot
proxy client against a snapshotter's unix socket. ``harness_binary()`` builds it once from Debian's
Go sources (``tests/conformance/build.sh``) into a cache directory under the system temp dir, keyed
by the harness source, the Go version and the containerd sources, so an edit to ``main.go`` or an
upgraded package rebuilds it and nothing is ever written into the working tree.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CONFORMANCE_DIR = Path(__file__).resolve().parents[1] / "conformance"
BUILD_SCRIPT = CONFORMANCE_DIR / "build.sh"
CONTAINERD_DEV = "golang-github-containerd-containerd-dev"
SETUP_HINT = "run ./scripts/setup.sh, which installs golang-go and " + CONTAINERD_DEV
# One line per subtest in Go's -test.v output, e.g. "    --- SKIP: TestSnapshotterSuite/Rename (0.01s)".
OUTCOME = re.compile(r"^\s*--- (PASS|FAIL|SKIP): TestSnapshotterSuite/(\S+) \(", re.MULTILINE)
LEFTOVERS = re.compile(r"^harness: snapshots-left=(\d+)", re.MULTILINE)


class HarnessUnavailable(Exception):
    """The harness cannot be built here (no Go, no containerd sources, or the build failed)."""


@dataclass(frozen=True)
class SuiteRun:
    """What one run of the suite reported."""

    returncode: int
    output: str  # the harness's stdout and stderr, interleaved as Go wrote them
    outcomes: dict[str, str]  # subtest name -> "PASS" | "FAIL" | "SKIP"
    snapshots_left: int | None  # what the server still held after every subtest cleaned up


def _package_version(package: str) -> str:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() if result.returncode == 0 else ""


def build_key() -> str:
    """A digest of everything the binary is made from: our sources, Go's version, containerd's version."""
    go = shutil.which("go")
    if go is None:
        raise HarnessUnavailable(f"Go is not installed ('go' is not on PATH): {SETUP_HINT}")
    containerd_version = _package_version(CONTAINERD_DEV)
    if not containerd_version:
        raise HarnessUnavailable(
            f"containerd's Go sources ({CONTAINERD_DEV}) are not installed: {SETUP_HINT}"
        )
    go_version = subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256(f"{go_version}\n{containerd_version}\n".encode())
    for source in sorted(CONFORMANCE_DIR.rglob("*")):
        if source.is_file():
            digest.update(str(source.relative_to(CONFORMANCE_DIR)).encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    """Where built harnesses live: $LAZYSNAP_CACHE_DIR, else the system temp dir."""
    base = os.environ.get("LAZYSNAP_CACHE_DIR") or tempfile.gettempdir()
    return Path(base) / "lazysnap-conformance"


def harness_binary() -> Path:
    """The harness built from the current sources, building it first if needed (about a minute cold).

    Raises:
        HarnessUnavailable: Go or the containerd sources are missing, or the build failed.
    """
    out = cache_root() / build_key()
    binary = out / "harness"
    if binary.exists():
        return binary
    # build.sh shares one Go build cache between keys, so a rebuild after an edit is quick.
    env = {**os.environ, "GOCACHE": str(cache_root() / "gocache")}
    build = subprocess.run(
        ["bash", str(BUILD_SCRIPT), str(out)], capture_output=True, text=True, env=env, timeout=900
    )
    if build.returncode != 0 or not binary.exists():
        raise HarnessUnavailable(
            f"building the conformance harness failed (exit {build.returncode}):\n{build.stdout}{build.stderr}"
        )
    return binary


def run_suite(binary: Path, socket: Path, scratch: Path, timeout: float = 1200) -> SuiteRun:
    """Run the whole suite against ``socket``; the suite's temp dirs go under ``scratch``."""
    scratch.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [str(binary), "-socket", str(socket), "-test.v", "-test.timeout", f"{int(timeout)}s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Each subtest makes its temp dir with os.MkdirTemp: keep them out of the shared /tmp.
        env={**os.environ, "TMPDIR": str(scratch)},
        timeout=timeout + 60,
    )
    left = LEFTOVERS.search(result.stdout)
    return SuiteRun(
        returncode=result.returncode,
        output=result.stdout,
        outcomes={name: outcome for outcome, name in OUTCOME.findall(result.stdout)},
        snapshots_left=int(left.group(1)) if left else None,
    )
