"""Drive the real ``lazysnap`` command in subprocesses, and never leave a mount or a daemon behind.

``CliSession`` runs ``lazysnap mount/umount/stats`` with a state root of its own, remembers every
mount point and daemon pid it produced, and ``cleanup()`` removes them all: ``lazysnap umount``,
then ``umount -l``, then SIGKILL. ``push`` uploads an image from synchronous test code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from fusefs.mount import is_mounted
from snapshotter.devtools.image_builder import Layer, PushedImage, push_image
from snapshotter.mount.state import MountNotFound, pid_alive, read_record
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.reference import Reference

LAZYSNAP = [sys.executable, "-m", "snapshotter.cli"]
COMMAND_TIMEOUT = 120.0


def push(ref: Reference, layers: Sequence[Layer]) -> PushedImage:
    """Push an image from synchronous code (its own trio loop and client, no docker config)."""

    async def run() -> PushedImage:
        async with RegistryClient(docker_config_path="/nonexistent/config.json") as client:
            return await push_image(client, ref, layers)

    return trio.run(run)


def index_push(ref: str, root: Path, *extra: str, cwd: Path | None = None) -> None:
    """Run ``lazysnap index push`` for ``ref`` with state under ``root`` (no docker config); raises CalledProcessError."""
    argv = [*LAZYSNAP, "index", "push", "--root", str(root), "--docker-config", "/nonexistent/config.json"]
    subprocess.run([*argv, *extra, ref], check=True, capture_output=True, timeout=COMMAND_TIMEOUT, cwd=cwd)


def wait_for(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class CliSession:
    """Runs lazysnap commands with one default ``--root``; tracks what they mount for ``cleanup``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._mounts: list[tuple[str, str]] = []  # (mount point, root)
        self._pids: set[int] = set()

    def run(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run ``lazysnap ARGS`` and return its result (never raises on a non-zero exit)."""
        return subprocess.run(
            [*LAZYSNAP, *args], capture_output=True, text=True, timeout=timeout, check=False
        )

    def mount(
        self, ref: str, mountpoint: Path, *flags: str, root: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``lazysnap mount --root ROOT FLAGS REF DIR``; the mount and its daemon are tracked for cleanup."""
        root = root or self.root
        self._mounts.append((str(mountpoint), str(root)))
        result = self.run("mount", "--root", str(root), *flags, ref, str(mountpoint))
        pid = self.daemon_pid(mountpoint, root)
        if pid is not None:
            self._pids.add(pid)
        return result

    def mount_ok(self, ref: str, mountpoint: Path, *flags: str, root: Path | None = None) -> None:
        """Mount and fail the test with the command's output unless it succeeded."""
        result = self.mount(ref, mountpoint, *flags, root=root)
        assert result.returncode == 0, f"mount failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        assert is_mounted(str(mountpoint))

    def umount(self, mountpoint: Path, root: Path | None = None) -> subprocess.CompletedProcess[str]:
        """``lazysnap umount --root ROOT DIR``."""
        return self.run("umount", "--root", str(root or self.root), str(mountpoint))

    def stats(self, mountpoint: Path, root: Path | None = None) -> dict[str, Any]:
        """``lazysnap stats --json`` of a running mount."""
        result = self.run("stats", "--root", str(root or self.root), "--json", str(mountpoint))
        assert result.returncode == 0, result.stderr
        document: dict[str, Any] = json.loads(result.stdout)
        return document

    def daemon_pid(self, mountpoint: Path, root: Path | None = None) -> int | None:
        """The pid of the daemon serving ``mountpoint``, from its mount record; None without one (or for an eager mount)."""
        try:
            record = read_record(str(root or self.root), str(mountpoint))
        except MountNotFound:
            return None
        # An eager mount has no daemon: its recorded pid is the exited command's, maybe reused since.
        return None if record.mode == "eager" else record.pid

    def daemon_log(self, root: Path | None = None) -> str:
        """Everything the daemons started with this root have logged."""
        logs = sorted((root or self.root).glob("mounts/*.log"))
        return "".join(path.read_text(errors="replace") for path in logs)

    def cleanup(self) -> None:
        """Unmount everything mounted here and kill any daemon left: umount, umount -l, SIGKILL."""
        for mountpoint, root in reversed(self._mounts):
            if is_mounted(mountpoint):
                try:
                    self.run("umount", "--root", root, mountpoint, timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            if is_mounted(mountpoint):
                subprocess.run(["umount", "-l", mountpoint], check=False, capture_output=True)
        for pid in self._pids:
            if pid_alive(pid) and pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
