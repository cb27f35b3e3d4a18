"""Mounting and unmounting a lazysnap FUSE filesystem.

pyfuse3 allows one FUSE session per process, so ``run_filesystem`` is called once at a time.
It runs pyfuse3's main loop inside the caller's trio loop; it returns when the filesystem is
unmounted from outside (``unmount``, ``fusermount3 -u``) and unmounts itself when cancelled.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import pyfuse3
import trio

log = logging.getLogger(__name__)

# Handlers that await run concurrently, up to this many; a reader beyond it waits for a free task
# (measured: 64 concurrent 10 ms reads need max_tasks >= 64 to overlap).
DEFAULT_MAX_TASKS = 128
# The bdi default of 128 KiB makes the kernel ask for 128 KiB per read; 1 MiB requests cut the
# per-request Python cost (about 50 us) eightfold. 1 MiB is the cap (max_pages = 256).
DEFAULT_READ_AHEAD_KB = 1024

Ready = trio.Event | Callable[[], object] | None


def mount_options(fsname: str, *, allow_other: bool = True, extra: Iterable[str] = ()) -> set[str]:
    """The pyfuse3 mount options of a read-only lazysnap mount."""
    options = set(pyfuse3.default_options) | {
        f"fsname={fsname}",
        "subtype=lazysnap",
        "ro",
        "default_permissions",
    }
    if allow_other:
        # overlayfs and containers read the mount as other users than the daemon's.
        options.add("allow_other")
    options.update(extra)
    return options


async def run_filesystem(
    ops: pyfuse3.Operations,
    mountpoint: str,
    *,
    fsname: str = "lazysnap",
    ready: Ready = None,
    allow_other: bool = True,
    extra_options: Iterable[str] = (),
    max_tasks: int = DEFAULT_MAX_TASKS,
    read_ahead_kb: int = DEFAULT_READ_AHEAD_KB,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount ``ops`` at ``mountpoint`` and serve until unmounted; raises RuntimeError if the mount fails.

    ``ready`` (an Event to set or a function to call) and ``task_status`` (for
    ``nursery.start``) are signalled once the mount answers requests and its read-ahead is
    raised. Cancellation unmounts.
    """
    pyfuse3.init(ops, mountpoint, mount_options(fsname, allow_other=allow_other, extra=extra_options))
    try:
        async with trio.open_nursery() as nursery:
            if isinstance(ops, TaskOwner):
                ops.bind_task_nursery(nursery)  # background tasks end with the mount
            nursery.start_soon(_serve, max_tasks, nursery)
            await _wait_answering(mountpoint, read_ahead_kb)
            if isinstance(ready, trio.Event):
                ready.set()
            elif ready is not None:
                ready()
            task_status.started()
    finally:
        # After an outside unmount this only frees the session; libfuse sees the dead fd and
        # does not unmount again.
        pyfuse3.close(unmount=True)


async def _serve(max_tasks: int, nursery: trio.Nursery) -> None:
    # pyfuse3.main is a Cython coroutine; trio wants a Python one as a task.
    await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
    nursery.cancel_scope.cancel()  # unmounted: the background tasks beside it end too


@runtime_checkable
class TaskOwner(Protocol):
    """Operations that run background tasks in the filesystem's nursery."""

    def bind_task_nursery(self, nursery: trio.Nursery) -> None:
        """Start background tasks in ``nursery`` from now on."""
        ...


async def _wait_answering(mountpoint: str, read_ahead_kb: int) -> None:
    """Wait until the kernel has finished INIT with us, then raise the bdi read-ahead."""
    # The stat runs in a thread while this loop serves it: a stat from the loop itself would
    # deadlock. It returns only after INIT, whose reply would otherwise clamp read_ahead_kb
    # back to the default had we written it earlier. abandon_on_cancel: if we are cancelled
    # the loop stops serving and the stat returns only at unmount.
    st = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
    if read_ahead_kb > 0:
        await trio.to_thread.run_sync(set_read_ahead, st.st_dev, read_ahead_kb)


def set_read_ahead(st_dev: int, kilobytes: int) -> bool:
    """Set the read-ahead of the bdi of device ``st_dev``; returns False (and logs) if that is impossible."""
    path = f"/sys/class/bdi/{os.major(st_dev)}:{os.minor(st_dev)}/read_ahead_kb"
    try:
        with open(path, "w") as file:
            file.write(str(kilobytes))
    except OSError as error:
        log.warning("read-ahead not raised: %s: %s (reads stay at 128 KiB requests)", path, error)
        return False
    return True


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out = []
    i = 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _canonical(path: str) -> str:
    # Only the parent is resolved: resolving the mount point itself would stat a FUSE mount,
    # which deadlocks when called from the loop that serves it, or fails on a dead one.
    path = os.path.abspath(path)
    return (
        os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path)) if path != "/" else path
    )


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo: what is mounted where, from what, with which options."""

    fstype: str  # "fuse.lazysnap" for our FUSE mounts (subtype=lazysnap)
    source: str  # the fsname for FUSE ("lazysnap"), the device otherwise
    root: str  # the directory of the source filesystem shown here ("/" unless a bind mount of a subtree)
    options: frozenset[str]  # per-mount options (ro, nosuid, nodev, ...), not the superblock's

    @property
    def is_lazysnap_fuse(self) -> bool:
        """Whether this is a FUSE mount made by lazysnap (its fsname and subtype say so)."""
        return self.fstype == "fuse.lazysnap" and self.source.startswith("lazysnap")


def mount_info(path: str) -> MountInfo | None:
    """What is mounted exactly at ``path``, topmost, or None; never stats ``path``."""
    target = _canonical(path)
    found: MountInfo | None = None
    with open("/proc/self/mountinfo") as file:
        for line in file:
            fields = line.split()
            if len(fields) < 10 or _unescape(fields[4]) != target:
                continue
            rest = fields[fields.index("-") + 1 :]
            found = MountInfo(
                rest[0], _unescape(rest[1]), _unescape(fields[3]), frozenset(fields[5].split(","))
            )
    return found


def mount_entry(path: str) -> tuple[str, str] | None:
    """The (fstype, source) of what is mounted exactly at ``path``, topmost, or None; never stats ``path``."""
    info = mount_info(path)
    return None if info is None else (info.fstype, info.source)


def is_mounted(path: str) -> bool:
    """Whether something is mounted exactly at ``path`` (from /proc/self/mountinfo)."""
    return mount_info(path) is not None


def unmount(mountpoint: str, *, lazy_fallback: bool = True) -> None:
    """Unmount ``mountpoint`` (fusermount3 -u, umount, then lazily); blocks, so call from a thread in trio; raises OSError if it stays mounted."""
    attempts = [["fusermount3", "-u", "-q", mountpoint], ["umount", mountpoint]]
    if lazy_fallback:
        # A busy mount (an open file, a cwd inside) refuses a plain unmount; detach it instead
        # so no dead mount outlives the daemon.
        attempts.append(["umount", "-l", mountpoint])
    for argv in attempts:
        if not is_mounted(mountpoint):
            return
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            log.debug("%s failed: %s", " ".join(argv), result.stderr.strip())
    if is_mounted(mountpoint):
        raise OSError(f"{mountpoint}: still mounted after fusermount3 -u and umount; is it busy?")
