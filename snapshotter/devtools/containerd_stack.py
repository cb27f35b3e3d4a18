"""containerd with ``lazysnap serve`` as its proxy snapshotter, both in one private mount namespace.

Used by the end-to-end tests (``tests/support/snapshotter_stack.py`` re-exports it) and by
``lazysnap bench`` for its ``containerd-lazysnap`` row.

``LazysnapStack`` starts a ``Containerd`` (``snapshotter/containerd_env.py``) configured with
``[proxy_plugins.lazysnap]``, then the daemon inside the same namespace (FUSE and overlay mounts
are private, so containerd must see the daemon's mounts), and probes it with a real
``prepare`` + ``rm``. The daemon's root lives under containerd's base directory, so
``Containerd.stop`` also kills the daemon, unmounts its FUSE forest and removes its files::

    with LazysnapStack(plain_http=[registry.host]) as stack:
        stack.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "lazysnap", ref)
        stack.ctr("run", "--rm", "--snapshotter", "lazysnap", ref, "c1", "cat", "/etc/x")
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from snapshotter.devtools.containerd_env import Containerd

SNAPSHOTTER = "lazysnap"
LAZYSNAP_SERVE = [sys.executable, "-m", "snapshotter.cli", "serve"]
_probe_counter = itertools.count()


class LazysnapStack:
    """One containerd and one ``lazysnap serve`` in the same mount namespace; ``stop`` removes all."""

    def __init__(self, *, plain_http: Sequence[str] = (), config_extra: str = "") -> None:
        self.containerd = Containerd()
        base = self.containerd.base
        self.root = base / "ls"
        self.socket = base / "ls.sock"
        self.config_path = base / "lazysnap.toml"
        self.log_path = base / "lazysnap.log"
        self.containerd.proxy_plugins = {SNAPSHOTTER: str(self.socket)}
        hosts = ", ".join(f'"{host}"' for host in plain_http)
        self.config_text = f"[registry]\nplain_http = [{hosts}]\n{config_extra}"
        self.daemon: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> LazysnapStack:
        """Start containerd, then the daemon; wait until a real prepare + rm succeeds."""
        try:
            self.containerd.start()
            self.config_path.write_text(self.config_text)
            self.start_daemon()
        except BaseException:
            self.stop()
            raise
        return self

    def start_daemon(self, timeout: float = 30.0) -> None:
        """Start ``lazysnap serve`` in the namespace (same root and socket) and wait until it serves."""
        argv = [
            *LAZYSNAP_SERVE,
            "--root",
            str(self.root),
            "--address",
            str(self.socket),
            "--config",
            str(self.config_path),
        ]
        with open(self.log_path, "ab") as log:
            self.daemon = self.containerd.popen_in_namespace(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        """Poll with a real prepare + rm through containerd (``ls`` is answered from its own DB)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.daemon is not None and self.daemon.poll() is not None:
                raise RuntimeError(f"lazysnap serve exited with {self.daemon.returncode}:\n{self.log()}")
            key = f"probe-{next(_probe_counter)}"
            prepared = self.snapshots("prepare", key, check=False, timeout=10)
            if prepared.returncode == 0:
                self.snapshots("rm", key, timeout=10)
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"lazysnap not ready after {timeout} s: {prepared.stderr}\n{self.log()}")
            time.sleep(0.2)

    def kill_daemon(self) -> None:
        """SIGKILL the daemon (its FUSE mount is left dead, as after a crash) and reap it."""
        if self.daemon is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.daemon.send_signal(signal.SIGKILL)
        self.daemon.wait(timeout=10)
        self.daemon = None

    def stop(self) -> None:
        """Delete tasks, kill containerd, the daemon and containers, unmount everything, remove the files."""
        try:
            self.containerd.stop()  # the daemon is in the namespace: killed and unmounted with it
        finally:
            if self.daemon is not None:
                with contextlib.suppress(ProcessLookupError):
                    self.daemon.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.daemon.wait(timeout=10)
                self.daemon = None

    def __enter__(self) -> LazysnapStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- commands ------------------------------------------------------------------------------

    def log(self) -> str:
        """The daemon's log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def ctr(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``ctr ARGS`` against this containerd; raises CalledProcessError unless ``check=False``."""
        return self.containerd.ctr(*args, check=check, timeout=timeout)

    def ctr_remote(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """``ctr-remote ARGS`` against this containerd."""
        return self.containerd.ctr_remote(*args, check=check, timeout=timeout)

    def snapshots(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """``ctr snapshots --snapshotter lazysnap ARGS``."""
        return self.ctr("snapshots", "--snapshotter", SNAPSHOTTER, *args, check=check, timeout=timeout)

    def rpull(self, ref: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """``ctr-remote image rpull --plain-http --snapshotter lazysnap REF``."""
        return self.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", SNAPSHOTTER, ref, **kwargs)

    def pull(self, ref: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """``ctr image pull --plain-http --snapshotter lazysnap REF`` (no remote-snapshot labels)."""
        return self.ctr("image", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, ref, **kwargs)

    def run(self, ref: str, container: str, *command: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """``ctr run --rm --snapshotter lazysnap REF ID COMMAND...``."""
        return self.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, ref, container, *command, **kwargs)

    def snapshot_keys(self) -> list[str]:
        """Keys of every snapshot containerd lists for lazysnap."""
        lines = self.snapshots("ls").stdout.splitlines()[1:]
        return [line.split()[0] for line in lines if line.strip()]


def fuse_root(stack: LazysnapStack) -> Path:
    """Where the daemon mounts its FUSE forest (inside the namespace)."""
    return stack.root / "fuse"
