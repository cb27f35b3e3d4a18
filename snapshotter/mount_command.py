"""``lazysnap mount``/``umount``/``stats``: start a mount daemon in the background and talk to it.

The command checks the mount point, starts ``lazysnap mount --foreground`` as a detached daemon
and follows its progress over a pipe: one JSON event per line (``layer``, ``ready``, ``error``).
It returns once the image is visible at the mount point, or with the daemon's error and nothing
left mounted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn
from rich.table import Table

from fusefs.mount import is_mounted, unmount
from snapshotter.errors import UsageError
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


def spawn_daemon(argv: Sequence[str], root: str, mountpoint: str, console: Console) -> int:
    """Start ``argv`` (a foreground mount) detached, show its progress, return once it is ready.

    Returns the exit code for the CLI: 0 when the image is mounted, 1 when the daemon failed.
    """
    log_path = state_dir(root) / f"{Path(mountpoint).name or 'root'}-{os.getpid()}.log"
    read_fd, write_fd = os.pipe()
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [*argv, "--status-fd", str(write_fd)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            pass_fds=(write_fd,),
            start_new_session=True,  # the daemon outlives this command and its terminal
        )
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
                process.wait(timeout=30)
                return 1
    code = process.wait(timeout=30)
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    console.print(
        f"[red]lazysnap: the mount daemon exited ({code}) before the image was mounted; log {log_path}:[/red]"
    )
    for line in tail:
        console.print(f"  {line}", markup=False)
    return 1


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
