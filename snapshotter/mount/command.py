"""``lazysnap mount``/``umount``/``stats``: start a mount daemon in the background and talk to it.

The command checks the mount point, starts ``lazysnap mount --foreground`` as a detached daemon
and follows its progress over a pipe: one JSON event per line (``layer``, ``ready``, ``error``).
It returns once the image is visible at the mount point, or with the daemon's error and nothing
left mounted. Progress goes to stderr: rich bars and colours on a terminal, plain lines otherwise
(rich is then never imported: ~30 ms of a mount's start-up).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fusefs.mount import MountInfo, is_mounted, mount_info, unmount
from snapshotter.config import ALL_HOSTS, Config, check_socket_path
from snapshotter.errors import MountNotFound
from snapshotter.errors import MountPointError as MountPointError  # re-exported: it was defined here
from snapshotter.mount.daemon import MountOptions, run_mount_daemon
from snapshotter.mount.state import (
    MountRecord,
    control_socket_path,
    pid_alive,
    query_stats,
    read_record,
    remove_record,
    state_dir,
)

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID
    from rich.table import Table


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


def check_root_for_mount(config: Config, mountpoint: str) -> None:
    """Refuse a root whose control socket path for ``mountpoint`` would not fit a unix socket address.

    Raises:
        ConfigError: the path is over the 108-byte limit (call after ``prepare_root``).
    """
    check_socket_path(control_socket_path(config.root, mountpoint), f"root {config.root}")


def build_mount_options(
    reference: str, mountpoint: str, config: Config, config_path: str | None, *, plain_http: bool
) -> MountOptions:
    """The daemon's options: the config values it reads as fields, and the file it re-loads; raises nothing.

    The daemon re-loads ``config_path`` and applies the same flags through
    ``command_line_overrides(root=..., plain_http=..., docker_config=..., no_background_fetch=...)``
    from these fields, so it sees the config this command saw.
    """
    values: dict[str, Any] = {
        "reference": reference,
        "mountpoint": os.path.realpath(mountpoint),
        "root": config.root,
        "plain_http": plain_http or ALL_HOSTS in config.registry.plain_http,
        "background_fetch": config.background_fetch.enabled,
        "docker_config_path": config.registry.credentials_file or None,
    }
    return MountOptions(**values, config_path=config_path)


def spawn_daemon(options: MountOptions, report: Report | None = None) -> int:
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
    report = report or stderr_report()
    with os.fdopen(read_fd, "r") as events, report:
        for line in events:
            event = json.loads(line)
            kind = event.get("event")
            if kind == "layer":
                report.line(f"  layer {event['index']}: {event['digest'][:19]}  {event['how']}")
            elif kind == "progress":
                # Only layers indexed during download report progress: a bar per blob being streamed.
                report.download(event["digest"], event["done"], event["total"])
            elif kind == "ready":
                report.done()
                report.line(
                    f"mounted {event['reference']} at {mountpoint} in {event['seconds']:.2f} s "
                    f"({event['bytes_fetched'] / 1e6:.2f} MB fetched of {event['image_size'] / 1e6:.2f} MB)"
                )
                return 0
            elif kind == "error":
                report.done()
                report.line(f"lazysnap: {event['message']}", error=True)
                os.waitpid(pid, 0)
                return 1
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    report.line(
        f"lazysnap: the mount daemon exited ({code}) before the image was mounted; log {log_path}:",
        error=True,
    )
    for line in tail:
        report.line(f"  {line}")
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


class Report:
    """What ``lazysnap mount`` shows while its daemon works: plain lines, for a pipe or a log."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __enter__(self) -> Report:
        return self

    def __exit__(self, *exc: object) -> None:
        self.done()

    def line(self, text: str, *, error: bool = False) -> None:
        """Show one line of text as it is (no markup); ``error`` lines stand out where that is possible."""
        self.stream.write(text + "\n")
        self.stream.flush()

    def download(self, digest: str, done: int, total: int) -> None:
        """A layer being indexed while it downloads has ``done`` of ``total`` bytes (not shown here)."""

    def done(self) -> None:
        """No more downloads to show."""


class RichReport(Report):
    """On a terminal: red errors and a download bar per layer that is indexed while it streams in."""

    def __init__(self, console: Console) -> None:
        super().__init__(console.file)
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        self.console = console
        self._bars: dict[str, TaskID] = {}
        self._progress: Progress | None = Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console,
            transient=True,
        )
        self._progress.start()

    def line(self, text: str, *, error: bool = False) -> None:
        self.console.print(text, markup=False, highlight=False, style="red" if error else None)

    def download(self, digest: str, done: int, total: int) -> None:
        if self._progress is None:
            return
        if digest not in self._bars:
            self._bars[digest] = self._progress.add_task(f"indexing {digest[7:19]}", total=total)
        self._progress.update(self._bars[digest], completed=done)

    def done(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def stderr_report() -> Report:
    """A RichReport when stderr is a terminal, else plain lines (rich is imported only for a terminal)."""
    if not sys.stderr.isatty():
        return Report(sys.stderr)
    from rich.console import Console

    return RichReport(Console(stderr=True))


def umount_command(root: str, mountpoint: str, timeout: float = 20.0) -> int:
    """Unmount a lazysnap mount and wait for its daemon to stop; return the CLI exit code.

    Raises:
        MountPointError: nothing is mounted there, or what is mounted there is not lazysnap's
            (it is left mounted).
    """
    try:
        record: MountRecord | None = read_record(root, mountpoint)
    except MountNotFound:
        record = None
    info = mount_info(mountpoint)
    if info is None:
        if record is not None:
            remove_record(root, mountpoint)
        raise MountPointError(f"{mountpoint}: not mounted")
    if not made_by_lazysnap(info, mountpoint, record):
        raise MountPointError(
            f"{mountpoint}: not a lazysnap mount (found {info.fstype} from {info.source}); "
            "left mounted: use umount(8) if you mean to remove it"
        )
    unmount(mountpoint)
    if record is not None and record.mode == "eager":
        from snapshotter.mount.eager import remove_unpacked  # not loaded for lazy mounts

        remove_unpacked(record.rootfs)
    if record is not None:
        deadline = time.monotonic() + timeout
        # An eager mount has no daemon; its recorded pid is the command that made it.
        while record.mode != "eager" and pid_alive(record.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        remove_record(root, mountpoint)
    return 0


def made_by_lazysnap(info: MountInfo, mountpoint: str, record: MountRecord | None) -> bool:
    """Whether the mount ``info`` at ``mountpoint`` is one lazysnap made: its FUSE mount, or a recorded eager bind mount."""
    if info.is_lazysnap_fuse:
        return True
    if record is None or record.mode != "eager" or not record.rootfs:
        return False
    if info.fstype.startswith("fuse"):
        return False  # an eager mount is a bind mount; and a stat of someone's FUSE mount may hang
    # A bind mount shows the very directory it binds: the same device and inode as the tree the
    # record names. Anything mounted over it since shows another.
    try:
        shown, tree = os.stat(mountpoint), os.stat(record.rootfs)
    except OSError:
        return False
    return (shown.st_dev, shown.st_ino) == (tree.st_dev, tree.st_ino)


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
    from rich.table import Table

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
