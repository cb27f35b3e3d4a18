"""One benchmark run per (image, mode, repeat): cold start, time to ready, bytes fetched.

Time to ready is measured from nothing cached to the workload's first successful exit inside
the image: ``lazysnap mount`` (the CLI, as a user runs it), a writable overlay over the mount,
and ``chroot MERGED WORKLOAD``; for the containerd rows ``ctr image pull``/``ctr-remote image
rpull`` and ``ctr run``. Bytes are the registry's response bytes counted by the link's relay.

What "cold" means per mode (a fair start is what a node that never ran the image would have):

- ``eager``, ``lazy``, ``lazy+no-background-fetch``: the whole lazysnap root is removed (blob
  cache, stored indexes, mounts). An index published in the registry (``lazysnap index push``)
  is part of the image and is still used: fetching it is inside the timed window.
- ``lazy+stored-index``: as ``lazy`` but the local index store is kept from an untimed first
  mount: the node pulled another tag sharing these layers before, or got the index out of band.
  Its blob cache is removed.
- ``containerd-*``: a fresh containerd (empty content store, snapshots and images) per run, and
  for ``containerd-lazysnap`` a fresh ``lazysnap serve`` (empty root) in its mount namespace.
  Their start-up is not timed: on a node both daemons run before any pull. The lazysnap CLI
  modes do pay for starting a mount daemon (``lazysnap mount``), as a user of that command does.

Before every run the page cache is dropped (``echo 3 > /proc/sys/vm/drop_caches``), then
lazysnap's Python modules and the helper tools are read back, untimed: a node running the
snapshotter has its code resident (containerd's is: it runs), while the image is cold.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fusefs.mount import is_mounted
from snapshotter.devtools.bench.network import Link
from snapshotter.devtools.containerd_env import Containerd, containerd_available
from snapshotter.devtools.containerd_stack import SNAPSHOTTER, LazysnapStack
from snapshotter.errors import BenchRunError as BenchRunError  # re-exported: it was defined here

LAZYSNAP = [sys.executable, "-m", "snapshotter.cli"]
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
PYTHON_WORKLOAD = "python3 -c 'import json'"
SHELL_WORKLOAD = "sh -c true"
# Background fetch is done when the relay was idle this long after the workload (or every
# layer is verified): a cap keeps a stalled fill from hanging the benchmark.
IDLE_SECONDS = 3.0
TOTAL_TIMEOUT_SECONDS = 300.0
# A pull that takes longer is a failed run (see the pull below).
PULL_TIMEOUT_SECONDS = 300.0

LAZY_MODES = ("eager", "lazy", "lazy+no-background-fetch", "lazy+stored-index")
CONTAINERD_MODES = ("containerd-overlayfs", "containerd-lazysnap")
ALL_MODES = LAZY_MODES + CONTAINERD_MODES
DEFAULT_MODES = ("eager", "lazy", "lazy+no-background-fetch", "containerd-overlayfs", "containerd-lazysnap")
_MOUNT_FLAGS: dict[str, list[str]] = {
    "eager": ["--eager"],
    "lazy": [],
    "lazy+no-background-fetch": ["--no-background-fetch"],
    "lazy+stored-index": [],
}


@dataclass
class RunResult:
    """One measured run."""

    image: str
    mode: str
    repeat: int
    workload: str
    time_to_ready_s: float
    bytes_before_ready: int
    bytes_total: int
    image_size: int
    mount_s: float = 0.0  # mount (or pull) alone
    workload_s: float = 0.0  # the workload alone
    connections: int = 0  # TCP connections opened through the relay
    daemon_ready_s: float = 0.0  # the mount daemon's own time to ready (no CLI start-up)
    fetch_requests: int = 0  # Range requests of the lazy layers before ready (``lazysnap stats``)
    layers: list[dict[str, Any]] = field(default_factory=list)  # how each layer was served
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        """The run as a JSON-able dict."""
        return asdict(self)


# The modules a mount imports. After dropping caches they are read back (untimed): lazysnap's
# own code being resident is what a node running the snapshotter daemon has; the image is not.
WARM_IMPORTS = (
    "import snapshotter.cli, snapshotter.mount.command, snapshotter.mount.daemon, "
    "snapshotter.mount.eager, snapshotter.layers.sources, fusefs.operations, fusefs.mount"
)


def drop_caches() -> None:
    """Write dirty pages and drop the page, dentry and inode caches (needs root)."""
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def warm_tools() -> None:
    """Read lazysnap's code and the tools a run uses back into the page cache."""
    subprocess.run([sys.executable, "-c", WARM_IMPORTS], capture_output=True, check=False)
    for tool in ("chroot", "mount", "umount"):
        subprocess.run([tool, "--version"], capture_output=True, check=False)


def _check(argv: list[str], step: str, *, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL, check=False
    )
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()[-1500:]
        raise BenchRunError(f"{step}: `{shlex.join(argv)}` exited {result.returncode}: {output}")
    return result.stdout


def _umount(path: Path) -> None:
    # mountinfo, not os.path.ismount: a bind mount (the eager tree) is on the same device as its parent.
    if is_mounted(str(path)):
        subprocess.run(["umount", str(path)], capture_output=True, check=False)
    if is_mounted(str(path)):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def remove_tree(path: Path) -> None:
    """Remove a scratch directory, first unmounting anything still mounted below it (deepest first)."""
    prefix = str(path.resolve())
    with open("/proc/self/mountinfo") as info:
        points = [line.split()[4] for line in info]
    for point in sorted((p for p in points if p.startswith(prefix + "/")), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def overlay_over(lower: Path, scratch: Path) -> Iterator[Path]:
    """A writable overlay over ``lower`` (upper and work dirs in ``scratch``), unmounted on exit."""
    upper, work, merged = scratch / "upper", scratch / "work", scratch / "merged"
    for path in (upper, work, merged):
        path.mkdir(parents=True, exist_ok=True)
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    _check(["mount", "-t", "overlay", "-o", options, "overlay", str(merged)], "overlay mount")
    try:
        yield merged
    finally:
        _umount(merged)


def default_workload(rootfs: Path) -> str:
    """``python3 -c 'import json'`` when the image has python3, else ``sh -c true``."""
    for directory in ("usr/bin", "bin", "usr/local/bin"):
        if os.path.lexists(rootfs / directory / "python3"):
            return PYTHON_WORKLOAD
    return SHELL_WORKLOAD


def run_chroot(rootfs: Path, workload: str) -> None:
    """Run the workload in ``rootfs`` with chroot; raises BenchRunError unless it exits 0."""
    _check(["chroot", str(rootfs), *shlex.split(workload)], "workload", env=CHROOT_ENV)


@dataclass
class BenchContext:
    """What every run shares: the link, where to keep state, options."""

    link: Link
    workdir: Path
    plain_http: bool = True
    workload: str | None = None
    verbose: bool = False
    # Set by prepare_stored_index for lazy+stored-index: images whose indexes are in the store.
    indexed_images: set[str] = field(default_factory=set)
    # The default workload found for each image by a lazysnap run, for the containerd rows.
    workloads: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        """lazysnap's --root for the lazysnap modes."""
        return self.workdir / "root"

    def mount_argv(self, ref: str, mountpoint: Path, flags: list[str]) -> list[str]:
        """``lazysnap mount`` as a user would type it."""
        argv = [*LAZYSNAP, "mount", "--root", str(self.root), *flags]
        if self.plain_http:
            argv.append("--plain-http")
        return [*argv, ref, str(mountpoint)]


class Runner:
    """Runs the modes; each run leaves nothing mounted or running, whatever happens."""

    def __init__(self, context: BenchContext) -> None:
        self.context = context

    def run(self, image: str, mode: str, repeat: int) -> RunResult:
        """Measure one run of ``mode`` on ``image`` (a reference through the link)."""
        if mode in LAZY_MODES:
            return self._run_lazysnap(image, mode, repeat)
        if mode in CONTAINERD_MODES:
            return self._run_containerd(image, mode, repeat)
        raise BenchRunError(f"mode {mode} is not available yet")

    # -- cold start -------------------------------------------------------------------------

    def cold_start(self, mode: str) -> None:
        """Remove what earlier runs left (keeping stored indexes for lazy+stored-index), drop caches."""
        root = self.context.root
        if mode == "lazy+stored-index":
            for name in ("cache", "eager", "mounts"):
                remove_tree(root / name)
        else:
            remove_tree(root)
        drop_caches()
        warm_tools()

    def prepare_stored_index(self, image: str) -> None:
        """Mount ``image`` once, untimed, so its layer indexes land in the local index store."""
        remove_tree(self.context.root)
        mountpoint = Path(tempfile.mkdtemp(prefix="prep-", dir=self.context.workdir))
        try:
            _check(self.context.mount_argv(image, mountpoint, ["--no-background-fetch"]), "index preparation")
        finally:
            self._lazysnap_umount(mountpoint)
            remove_tree(mountpoint)
        self.context.indexed_images.add(image)

    # -- lazysnap modes ----------------------------------------------------------------------

    def _run_lazysnap(self, image: str, mode: str, repeat: int) -> RunResult:
        if mode == "lazy+stored-index" and image not in self.context.indexed_images:
            self.prepare_stored_index(image)
        self.cold_start(mode)
        counter = self.context.link.counter
        scratch = Path(tempfile.mkdtemp(prefix="run-", dir=self.context.workdir))
        mountpoint = scratch / "image"
        mountpoint.mkdir()
        try:
            mark, connections = counter.downstream, counter.connections
            started = time.monotonic()
            _check(self.context.mount_argv(image, mountpoint, _MOUNT_FLAGS[mode]), "lazysnap mount")
            mounted = time.monotonic()
            with overlay_over(mountpoint, scratch / "overlay") as merged:
                workload = self.context.workload or default_workload(merged)
                self.context.workloads[image] = workload
                run_chroot(merged, workload)
            ready = time.monotonic()
            before = counter.downstream - mark
            stats = self._stats(mountpoint) if mode != "eager" else {}
            at_ready = stats
            if mode in ("lazy", "lazy+stored-index"):
                stats = self._wait_background(mountpoint, stats)
            else:
                self._wait_idle(IDLE_SECONDS / 3)
            total = counter.downstream - mark
            layers = [
                {
                    k: layer.get(k)
                    for k in ("digest", "how", "reason", "size", "bytes_fetched", "fetch_requests")
                }
                for layer in stats.get("layers", [])
            ]
            return RunResult(
                image=image,
                mode=mode,
                repeat=repeat,
                workload=workload,
                time_to_ready_s=ready - started,
                bytes_before_ready=before,
                bytes_total=total,
                image_size=int(stats.get("image_size", 0)),
                mount_s=mounted - started,
                workload_s=ready - mounted,
                connections=counter.connections - connections,
                daemon_ready_s=float(stats.get("ready_seconds", 0.0)),
                fetch_requests=sum(
                    int(layer.get("fetch_requests", 0)) for layer in at_ready.get("layers", [])
                ),
                layers=layers,
            )
        finally:
            self._lazysnap_umount(mountpoint)
            remove_tree(scratch)

    def _lazysnap_umount(self, mountpoint: Path) -> None:
        if is_mounted(str(mountpoint)):
            subprocess.run(
                [*LAZYSNAP, "umount", "--root", str(self.context.root), str(mountpoint)],
                capture_output=True,
                check=False,
                timeout=60,
            )
        _umount(mountpoint)

    def _stats(self, mountpoint: Path) -> dict[str, Any]:
        out = _check(
            [*LAZYSNAP, "stats", "--json", "--root", str(self.context.root), str(mountpoint)],
            "lazysnap stats",
        )
        document: dict[str, Any] = json.loads(out)
        return document

    def _wait_background(self, mountpoint: Path, stats: dict[str, Any]) -> dict[str, Any]:
        """Wait until every layer is fetched (or the relay is idle), for ``bytes_total``."""
        deadline = time.monotonic() + TOTAL_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if all(layer.get("verified") for layer in stats.get("layers", [])):
                break
            if time.monotonic() - self.context.link.counter.last_activity > IDLE_SECONDS * 3:
                break  # nothing moves: the fill is off, stalled or finished without marking
            time.sleep(0.25)
            stats = self._stats(mountpoint)
        self._wait_idle(IDLE_SECONDS / 3)
        return stats

    def _wait_idle(self, quiet: float, timeout: float = 30) -> None:
        """Let in-flight responses finish so the relay's count is complete."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if time.monotonic() - self.context.link.counter.last_activity >= quiet:
                return
            time.sleep(quiet / 4)

    # -- containerd modes --------------------------------------------------------------------

    def _run_containerd(self, image: str, mode: str, repeat: int) -> RunResult:
        """``ctr image pull`` + ``ctr run`` (overlayfs), or ``ctr-remote image rpull`` + ``ctr run`` through lazysnap."""
        if not containerd_available():
            raise BenchRunError("containerd modes need root, containerd, ctr, runc, unshare and nsenter")
        counter = self.context.link.counter
        workload = self.context.workload or self.context.workloads.get(image, PYTHON_WORKLOAD)
        lazy = mode == "containerd-lazysnap"
        # A fresh containerd (and lazysnap daemon) per run is the cold start; their start-up is
        # not timed: on a node both are running before any pull.
        stack = LazysnapStack(plain_http=[self.context.link.host]) if lazy else None
        ctrd = stack.containerd if stack is not None else Containerd()
        try:
            if stack is not None:
                stack.start()
            else:
                ctrd.start()
            drop_caches()
            warm_tools()
            mark, connections = counter.downstream, counter.connections
            started = time.monotonic()
            plain = ["--plain-http"] if self.context.plain_http else []
            # Seen once: a `ctr image pull` through the shaped relay stalled for 10+ minutes. A pull
            # that takes this long is a failed run, reported as such, not a benchmark figure.
            if stack is not None:
                ctrd.ctr_remote(
                    "image",
                    "rpull",
                    *plain,
                    "--snapshotter",
                    SNAPSHOTTER,
                    image,
                    timeout=PULL_TIMEOUT_SECONDS,
                )
            else:
                ctrd.ctr("image", "pull", *plain, image, timeout=PULL_TIMEOUT_SECONDS)
            pulled = time.monotonic()
            snapshotter = ["--snapshotter", SNAPSHOTTER] if lazy else []
            # ctr run wants argv after the container id; shlex keeps quoted arguments whole.
            command = shlex.split(workload)
            ctrd.ctr("run", "--rm", *snapshotter, image, f"bench-{repeat}", *command, timeout=600)
            ready = time.monotonic()
            self._wait_idle(IDLE_SECONDS / 3)
            before = counter.downstream - mark
            if lazy:
                self._wait_idle(IDLE_SECONDS, timeout=TOTAL_TIMEOUT_SECONDS)  # the background fill
            total = counter.downstream - mark
        except subprocess.CalledProcessError as error:
            log = stack.log()[-1500:] if stack is not None else ""
            raise BenchRunError(
                f"{mode}: {shlex.join(error.cmd)}: {error.stderr.strip()[-1500:]}\n{log}"
            ) from None
        finally:
            if stack is not None:
                stack.stop()
            else:
                ctrd.stop()
        return RunResult(
            image=image,
            mode=mode,
            repeat=repeat,
            workload=workload,
            time_to_ready_s=ready - started,
            bytes_before_ready=before,
            bytes_total=total,
            image_size=0,
            mount_s=pulled - started,
            workload_s=ready - pulled,
            connections=counter.connections - connections,
        )


def available_modes(requested: tuple[str, ...], warn: Callable[[str], None]) -> list[str]:
    """The requested modes this machine can run, warning about the others."""
    modes = []
    for mode in requested:
        if mode in CONTAINERD_MODES and not containerd_available():
            warn(f"skipping {mode}: needs root, containerd, ctr, runc, unshare and nsenter")
        elif mode == "containerd-lazysnap" and shutil.which("ctr-remote") is None:
            warn("skipping containerd-lazysnap: needs ctr-remote (Debian's stargz-snapshotter package)")
        else:
            modes.append(mode)
    return modes
