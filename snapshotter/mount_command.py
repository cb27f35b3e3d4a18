"""``lazysnap mount``/``umount``/``stats``: start a mount daemon in the background and talk to it.

The command checks the mount point, starts ``lazysnap mount --foreground`` as a detached daemon
and follows its progress over a pipe: one JSON event per line (``layer``, ``ready``, ``error``).
It returns once the image is visible at the mount point, or with the daemon's error and nothing
left mounted.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn
from rich.table import Table

from fusefs.mount import is_mounted, unmount
from snapshotter.errors import UsageError
from snapshotter.mount_daemon import MountOptions, run_mount_daemon
from snapshotter.mount_state import (
    MountNotFound,
    pid_alive,
    query_stats,
    read_record,
    remove_record,
    state_dir,
)


class MountPointError(UsageError):
    """The mount point can't be used: not a directory, not empty, or already mounted."""


def check_mountpoint(mountpoint: str) -> None:
    """Accept only an existing, empty directory that is not already a mount point.

    Raises:
        MountPointError: with what is wrong and what to do.
    """
    path = Path(mountpoint)
    if not path.is_dir():
        raise MountPointError(f"{mountpoint}: not a directory; create an empty directory to mount on")
    if is_mounted(str(path)):
        raise MountPointError(
            f"{mountpoint}: something is already mounted there; `lazysnap umount {mountpoint}` first"
        )
    if any(path.iterdir()):
        raise MountPointError(f"{mountpoint}: directory is not empty; mount on an empty directory")


def spawn_daemon(options: MountOptions, console: Console) -> int:
    """Fork a mount daemon for ``options``, show its progress, return once the image is mounted.

    The daemon is forked rather than started as a new interpreter: the imports it needs are
    already loaded here, which saves about half a second before the mount is ready.
    Returns the exit code for the CLI: 0 when the image is mounted, 1 when the daemon failed.
    """
    log_path = state_dir(options.root) / f"{Path(options.mountpoint).name or 'root'}-{os.getpid()}.log"
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _become_daemon(log_path)
        code = 1
        try:
            code = run_mount_daemon(options, write_fd)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    mountpoint = options.mountpoint
    os.close(write_fd)
    with os.fdopen(read_fd, "r") as events, _progress(console) as progress:
        downloads: dict[str, TaskID] = {}
        for line in events:
            event = json.loads(line)
            kind = event.get("event")
            if kind == "layer":
                progress.console.print(f"  layer {event['index']}: {event['digest'][:19]}  {event['how']}")
            elif kind == "progress":
                # Only layers indexed during download report progress: a bar per blob being streamed.
                digest = event["digest"]
                if digest not in downloads:
                    downloads[digest] = progress.add_task(f"indexing {digest[7:19]}", total=event["total"])
                progress.update(downloads[digest], completed=event["done"])
            elif kind == "ready":
                progress.stop()
                console.print(
                    f"mounted {event['reference']} at {mountpoint} in {event['seconds']:.2f} s "
                    f"({event['bytes_fetched'] / 1e6:.2f} MB fetched of {event['image_size'] / 1e6:.2f} MB)"
                )
                return 0
            elif kind == "error":
                progress.stop()
                console.print(f"[red]lazysnap: {event['message']}[/red]")
                os.waitpid(pid, 0)
                return 1
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    console.print(
        f"[red]lazysnap: the mount daemon exited ({code}) before the image was mounted; log {log_path}:[/red]"
    )
    for line in tail:
        console.print(f"  {line}", markup=False)
    return 1


def _become_daemon(log_path: Path) -> None:
    """Detach the forked child: own session (it outlives the terminal), stdio to the log file."""
    os.setsid()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(null_fd)
    os.close(log_fd)


def _progress(console: Console) -> Progress:
    """Download bars for layers that are indexed while they stream in; silent without a terminal."""
    return Progress(
        TextColumn("  {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def umount_command(root: str, mountpoint: str, timeout: float = 20.0) -> int:
    """Unmount a lazysnap mount and wait for its daemon to stop; return the CLI exit code.

    Raises:
        MountPointError: nothing is mounted there.
    """
    try:
        record = read_record(root, mountpoint)
    except MountNotFound:
        record = None
    if not is_mounted(mountpoint):
        if record is not None:
            remove_record(root, mountpoint)
        raise MountPointError(f"{mountpoint}: not mounted")
    unmount(mountpoint)
    if record is not None:
        deadline = time.monotonic() + timeout
        while pid_alive(record.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        remove_record(root, mountpoint)
    return 0


def stats_command(root: str, mountpoint: str, as_json: bool, console: Console) -> int:
    """Print a running mount's per-layer statistics.

    Raises:
        MountNotFound: no daemon serves that directory.
    """
    record = read_record(root, mountpoint)
    stats = query_stats(record)
    if as_json:
        sys.stdout.write(json.dumps(stats, indent=2) + "\n")
        return 0
    console.print(f"{stats['reference']} at {stats['mountpoint']} ({stats['mode']}, pid {record.pid})")
    console.print(render_layer_table(stats["layers"]))
    console.print(
        f"total: {stats['bytes_fetched'] / 1e6:.2f} MB fetched of {stats['image_size'] / 1e6:.2f} MB "
        f"({100 * stats['bytes_fetched'] / max(1, stats['image_size']):.1f}%)"
    )
    return 0


def render_layer_table(layers: list[dict[str, Any]]) -> Table:
    """A table of per-layer statistics."""
    table = Table()
    for column in ("layer", "how", "why", "fetched / size", "verified", "hits", "misses"):
        table.add_column(column)
    for number, layer in enumerate(layers):
        table.add_row(
            f"{number} {layer['digest'][7:19]}",
            layer["how"],
            layer["reason"],
            f"{layer['bytes_fetched'] / 1e6:.2f} / {layer['size'] / 1e6:.2f} MB",
            "yes" if layer["verified"] else "no",
            str(layer["cache_hits"]),
            str(layer["cache_misses"]),
        )
    return table
