"""Local snapshots on disk, overlayfs style: ``<root>/<id>/fs`` (the layer's files) and ``<root>/<id>/work``.

Directories are named by the numeric snapshot id, never by the key: keys are arbitrary strings
(absolute paths included). A removed snapshot's directory is first renamed into ``<root>/.trash``
so it vanishes at once, then deleted in the background; ``orphans`` finds what a crash left.
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_TRASH = ".trash"


@dataclass(frozen=True)
class Mount:
    """One mount for containerd's ``mount.All``: type, source and options (target is the caller's)."""

    type: str
    source: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class DiskUsage:
    """Bytes allocated on disk and distinct inodes under a snapshot's fs directory."""

    size: int
    inodes: int


class LocalSnapshots:
    """The directory tree of local snapshots under ``root``."""

    def __init__(self, root: Path | str) -> None:
        """Use (and create, mode 0700) ``root``; raises OSError if it can't be created."""
        self.root = Path(root)
        # 0700: layer contents may include files that only root should see (setuid binaries, keys).
        (self.root / _TRASH).mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def fs_dir(self, snapshot_id: int) -> str:
        """Return the directory holding a snapshot's files (its overlay upperdir); raises nothing."""
        return str(self.root / str(snapshot_id) / "fs")

    def work_dir(self, snapshot_id: int) -> str:
        """Return a snapshot's overlay workdir; raises nothing."""
        return str(self.root / str(snapshot_id) / "work")

    def create(self, snapshot_id: int) -> None:
        """Create the fs/ and work/ directories of a new snapshot; raises OSError (incl. FileExistsError)."""
        base = self.root / str(snapshot_id)
        base.mkdir(mode=0o700)
        try:
            os.mkdir(self.fs_dir(snapshot_id))
            # The root of a new snapshot is the container's "/": 0755 whatever our umask is.
            os.chmod(self.fs_dir(snapshot_id), 0o755)
            os.mkdir(self.work_dir(snapshot_id), 0o700)
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            raise

    def discard(self, snapshot_id: int) -> Path | None:
        """Move a snapshot's directory into the trash and return its new path (None if absent); raises OSError."""
        base = self.root / str(snapshot_id)
        target = self.root / _TRASH / f"{snapshot_id}-{uuid.uuid4().hex}"
        try:
            base.rename(target)
        except FileNotFoundError:
            return None
        return target

    def orphans(self, known_ids: Iterable[int]) -> list[Path]:
        """List directories that belong to no known snapshot, plus everything in the trash; raises OSError."""
        known = {str(i) for i in known_ids}
        found = [entry for entry in (self.root / _TRASH).iterdir()]
        for entry in self.root.iterdir():
            if entry.name != _TRASH and entry.name not in known:
                found.append(entry)
        return found

    def mounts(self, snapshot_id: int, writable: bool, lowers: Sequence[str]) -> list[Mount]:
        """Build the mounts of a snapshot given its lower directories, nearest first; raises nothing.

        Writable: ``bind`` rw of its own fs when there is no parent, else an overlay with it as upper.
        Read-only: ``bind`` ro of the only lower, else an overlay of lowers alone (overlayfs is then
        read-only by construction, and needs at least two lowers).
        """
        if writable and not lowers:
            return [Mount("bind", self.fs_dir(snapshot_id), ("rw", "rbind"))]
        if writable:
            options = (
                # index=off: the same lower may sit under many overlays at once.
                "index=off",
                f"workdir={self.work_dir(snapshot_id)}",
                f"upperdir={self.fs_dir(snapshot_id)}",
                "lowerdir=" + ":".join(lowers),
            )
            return [Mount("overlay", "overlay", options)]
        if not lowers:
            return [Mount("bind", self.fs_dir(snapshot_id), ("ro", "rbind"))]
        if len(lowers) == 1:
            return [Mount("bind", lowers[0], ("ro", "rbind"))]
        return [Mount("overlay", "overlay", ("index=off", "lowerdir=" + ":".join(lowers)))]


def disk_usage(path: str) -> DiskUsage:
    """Sum allocated bytes (st_blocks * 512) and count distinct inodes under path; raises nothing.

    Hard links count once, as containerd does. Files that vanish during the walk (a concurrent
    Remove) are skipped rather than failing the call.
    """
    seen: set[tuple[int, int]] = set()
    size = 0
    pending = [path]
    while pending:
        current = pending.pop()
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            continue
        identity = (info.st_dev, info.st_ino)
        if identity not in seen:
            seen.add(identity)
            size += info.st_blocks * 512
        if stat.S_ISDIR(info.st_mode):
            try:
                pending.extend(os.path.join(current, name) for name in os.listdir(current))
            except (FileNotFoundError, NotADirectoryError):
                continue
    return DiskUsage(size, len(seen))


def remove_tree(path: Path) -> None:
    """Delete a directory tree that no snapshot uses any more; raises OSError if some of it stays."""
    # ignore_errors: a file that a concurrent walk or cleanup already removed is not a failure;
    # what matters is whether anything is left afterwards.
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        raise OSError(f"could not delete {path}; remove it by hand (is something mounted inside it?)")
