"""Where a running mount daemon can be found: a state file and a control socket per mount point.

``ROOT/mounts/<id>.json`` records the daemon's pid, the mount point, the image and its control
socket ``ROOT/mounts/<id>.sock``, which answers ``stats`` with a JSON document. ``<id>`` is a hash
of the mount point's real path, so any path spelling of the same directory finds the same daemon.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from snapshotter.errors import MountNotFound as MountNotFound  # re-exported: it was defined here


@dataclass(frozen=True)
class MountRecord:
    """What is known of one running mount daemon."""

    mountpoint: str
    pid: int
    reference: str
    control_socket: str
    mode: str  # "lazy" (a FUSE daemon) or "eager" (a bind mount of an unpacked tree, no daemon)
    rootfs: str = ""  # eager: the unpacked tree bind-mounted at ``mountpoint``


def mount_id(mountpoint: str) -> str:
    """A stable file name for a mount point."""
    return hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:24]


def state_dir(root: str) -> Path:
    """The directory holding state files of the mounts made with this root."""
    path = Path(root) / "mounts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def record_path(root: str, mountpoint: str) -> Path:
    """The state file of a mount point."""
    return state_dir(root) / f"{mount_id(mountpoint)}.json"


def control_socket_path(root: str, mountpoint: str) -> Path:
    """The control socket of a mount point's daemon."""
    return state_dir(root) / f"{mount_id(mountpoint)}.sock"


def write_record(root: str, record: MountRecord) -> None:
    """Write a mount's state file atomically."""
    path = record_path(root, record.mountpoint)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(asdict(record)))
    os.replace(temporary, path)


def read_record(root: str, mountpoint: str) -> MountRecord:
    """Return the state of the daemon serving ``mountpoint``.

    Raises:
        MountNotFound: no state file for that directory.
    """
    path = record_path(root, mountpoint)
    try:
        return MountRecord(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise MountNotFound(
            f"{mountpoint}: not a lazysnap mount made with root {root} (is --root the same as for mount?)"
        ) from None


def remove_record(root: str, mountpoint: str) -> None:
    """Remove a mount's state file and control socket."""
    record_path(root, mountpoint).unlink(missing_ok=True)
    control_socket_path(root, mountpoint).unlink(missing_ok=True)


def query_stats(record: MountRecord, timeout: float = 5.0) -> dict[str, Any]:
    """Ask a running daemon for its statistics.

    Raises:
        MountNotFound: the daemon does not answer (it is gone).
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(record.control_socket)
            conn.sendall(b"stats\n")
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
    except OSError as error:
        raise MountNotFound(
            f"{record.mountpoint}: the daemon (pid {record.pid}) does not answer: {error}"
        ) from None
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 0)
        return True
    return False
