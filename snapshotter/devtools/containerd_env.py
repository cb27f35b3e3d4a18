"""A real containerd 1.6 + runc in a private mount namespace: for tests and ``lazysnap bench``.

containerd 1.6 hard-codes ``/run/containerd`` for shim sockets, runc state and ctr's FIFOs,
so each instance gets its own mount namespace in which a scratch directory is bind-mounted
over ``/run`` (see ``shared/notes/stack.md``). The namespace is pinned to a file, so any
number of processes can join it with ``nsenter --mount=PIN``: containerd, ctr, ctr-remote
and whatever must see the same mounts (our snapshotter daemon: mounts are private here, so a
FUSE mount made elsewhere is invisible to containerd).

Tests use the fixtures in ``tests/support/containerd.py``; other code uses the class directly::

    with Containerd(proxy_plugins={"lazysnap": "/tmp/x/lazysnap.sock"}) as ctrd:
        ctrd.ctr("image", "ls")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CONTAINERD = shutil.which("containerd") or "/usr/bin/containerd"
CTR = shutil.which("ctr") or "/usr/bin/ctr"
CTR_REMOTE = shutil.which("ctr-remote") or "/usr/bin/ctr-remote"
DEFAULT_NAMESPACE = "default"


def containerd_available() -> bool:
    """Tell whether containerd, ctr, runc, unshare and nsenter exist and we are root."""
    tools = ("containerd", "ctr", "runc", "unshare", "nsenter")
    return os.geteuid() == 0 and all(shutil.which(t) for t in tools)


class Containerd:
    """One containerd daemon in its own mount namespace, with its own root, state and socket.

    Everything lives under ``base`` (a short path, so unix socket paths stay under 108 bytes):
    ``run/`` (bound over ``/run`` inside the namespace), ``root/``, ``state/``,
    ``containerd.sock``, ``config.toml``, ``containerd.log`` and ``ns.pin``.
    """

    def __init__(
        self,
        base: Path | None = None,
        *,
        proxy_plugins: Mapping[str, str | os.PathLike[str]] | None = None,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> None:
        self.base = Path(base) if base is not None else Path(tempfile.mkdtemp(prefix="ctrd-", dir="/tmp"))
        self.proxy_plugins = {k: str(v) for k, v in (proxy_plugins or {}).items()}
        self.namespace = namespace
        self.address = self.base / "containerd.sock"
        self.pin = self.base / "ns.pin"
        self.config = self.base / "config.toml"
        self.log_path = self.base / "containerd.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._pinned = False
        self._ns_inode = 0  # the mount namespace's inode number, kept to find its processes

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Containerd:
        """Create the namespace, write the config, start containerd and wait until ``ctr version`` answers."""
        for sub in ("run", "root", "state"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        self.config.write_text(self.config_text())
        self.pin.touch()
        subprocess.run(
            [
                "unshare",
                f"--mount={self.pin}",
                "--propagation",
                "private",
                "mount",
                "--bind",
                str(self.base / "run"),
                "/run",
            ],
            check=True,
            capture_output=True,
        )
        self._pinned = True
        self._ns_inode = os.stat(self.pin).st_ino
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self.nsenter([CONTAINERD, "--config", str(self.config)]),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_ready(timeout)
        return self

    def config_text(self) -> str:
        """containerd's config: private root/state/socket, CRI off, the proxy snapshotters."""
        lines = [
            "version = 2",
            f'root = "{self.base / "root"}"',
            f'state = "{self.base / "state"}"',
            # CRI would want a CNI setup and listen on its own; the remote-snapshot tests
            # drive containerd through ctr. The block-device snapshotters only add noise.
            'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",',
            '  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",',
            '  "io.containerd.snapshotter.v1.aufs"]',
            "[grpc]",
            f'  address = "{self.address}"',
            "[ttrpc]",
            f'  address = "{self.address}.ttrpc"',
            "[debug]",
            '  level = "info"',
        ]
        for name, socket in self.proxy_plugins.items():
            lines += [f"[proxy_plugins.{name}]", '  type = "snapshot"', f'  address = "{socket}"']
        return "\n".join(lines) + "\n"

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"containerd exited with {self._process.returncode}:\n{self.log()}")
            result = self.ctr("version", check=False, timeout=10)
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd not ready after {timeout} s: {result.stderr}\n{self.log()}")
            time.sleep(0.1)

    @property
    def pid(self) -> int | None:
        """containerd's process id while it runs (nsenter execs it, so it is the Popen's pid)."""
        return self._process.pid if self._process is not None else None

    def log(self) -> str:
        """containerd's log so far (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Kill every process in the namespace (containerd, shims, containers), unmount, remove all."""
        if self._pinned:
            self._delete_tasks()
            self._kill_namespace_processes()
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=10)
            self._process = None
        if self._pinned:
            self._unmount_inside()
            subprocess.run(["umount", "--lazy", str(self.pin)], check=False, capture_output=True)
            self._pinned = False
        self._unmount_outside()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def namespace_pids(self) -> list[int]:
        """Our processes: those in this instance's mount namespace and all their descendants.

        Descendants count because runc gives each container its own mount namespace; the
        container still descends from its shim, which lives in ours.
        """
        if not self._ns_inode:
            return []
        children: dict[int, list[int]] = {}
        found: list[int] = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
                if os.stat(f"/proc/{entry}/ns/mnt").st_ino == self._ns_inode:
                    found.append(int(entry))
        result: set[int] = set()
        while found:
            pid = found.pop()
            if pid not in result:
                result.add(pid)
                found.extend(children.get(pid, ()))
        return sorted(result)

    def _delete_tasks(self) -> None:
        """Ask containerd to kill and delete every task, so runc also removes their cgroups."""
        if self._process is None or self._process.poll() is not None:
            return
        with contextlib.suppress(subprocess.SubprocessError):
            listed = self.ctr("namespaces", "ls", "-q", check=False, timeout=10).stdout.split()
            for namespace in listed:
                prefix = [CTR, "--address", str(self.address), "--namespace", namespace]
                tasks = self.run_in_namespace([*prefix, "task", "ls", "-q"], check=False, timeout=10).stdout
                for task in tasks.split():
                    self.run_in_namespace(
                        [*prefix, "task", "delete", "--force", task], check=False, timeout=20
                    )

    def _kill_namespace_processes(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
        for _ in range(50):
            pids = [p for p in self.namespace_pids() if p != os.getpid()]
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if self._process is not None:
                self._process.poll()  # reap containerd if it was among them
            time.sleep(0.1)

    def _unmount_inside(self) -> None:
        # Deepest first; --lazy because a dying shim may still hold a mount busy.
        script = (
            f"awk '{{print $5}}' /proc/self/mountinfo | grep -E '^({self.base}|/run)(/|$)' | sort -r | "
            'while read m; do umount --lazy "$m" 2>/dev/null; done; true'
        )
        subprocess.run(self.nsenter(["sh", "-c", script]), check=False, capture_output=True, timeout=30)

    def _unmount_outside(self) -> None:
        with open("/proc/self/mountinfo") as info:
            points = [line.split()[4] for line in info]
        for point in sorted(
            (p for p in points if p == str(self.base) or p.startswith(f"{self.base}/")), reverse=True
        ):
            subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)

    # -- running things inside ---------------------------------------------------------------

    def nsenter(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs in this instance's mount namespace."""
        return ["nsenter", f"--mount={self.pin}", "--", *argv]

    def run_in_namespace(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 120, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespace and wait; raises CalledProcessError (with output) unless ``check=False``."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        result: subprocess.CompletedProcess[str] = subprocess.run(
            self.nsenter(argv), check=False, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs
        )
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, list(argv), result.stdout, result.stderr)
        return result

    def popen_in_namespace(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in the namespace (e.g. a snapshotter daemon); the caller waits for it."""
        return subprocess.Popen(self.nsenter(argv), **kwargs)

    def ctr(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address SOCK --namespace NS ARGS...`` in the namespace."""
        argv = [CTR, "--address", str(self.address), "--namespace", self.namespace, *args]
        return self.run_in_namespace(argv, check=check, timeout=timeout)

    def ctr_remote(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr-remote --address SOCK --namespace NS ARGS...`` in the namespace."""
        argv = [CTR_REMOTE, "--address", str(self.address), "--namespace", self.namespace, *args]
        return self.run_in_namespace(argv, check=check, timeout=timeout)
