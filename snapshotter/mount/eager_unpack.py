"""The eager path: apply a layer's uncompressed tar stream onto a directory, as containerd does.

Headers are parsed by ``index.tar_entries.TarEntryParser``, the same code the lazy index uses,
so both paths agree on names, modes, times and xattrs. What the applier adds:

- whiteouts: ``.wh.NAME`` removes NAME, ``.wh..wh..opq`` empties its directory; both act on
  what lower layers left, never on what this layer wrote (OCI image spec);
- an entry replaces what is at its path, except a directory over a directory, which merges;
- parents are resolved inside the target: a symlink is followed as if the target were the root
  (``/`` and ``..`` stop there), so nothing is ever created outside it; missing parents are
  created 0755 root, a non-directory parent is replaced by a directory;
- ownership, xattrs (incl. ``security.capability``, set after chown, which clears it), mode with
  setuid/setgid/sticky, and nanosecond mtimes, also of symlinks; directory times are set last,
  and directories this layer only wrote into keep their previous time;
- a hardlink shares the inode of its target and keeps the target's metadata.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from typing import Protocol

from index.errors import LayerFormatError, TruncatedLayer, UnsafePath
from index.model import Entry, EntryType
from index.tar_entries import TarEntryParser
from index.tar_header import BLOCK, padded

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
IMPLICIT_DIR_MODE = 0o755
COPY_CHUNK = 1 << 20
# Linux gives up after 40 symlinks in one lookup; so do we, which also stops symlink loops.
MAX_SYMLINK_HOPS = 40

_NODE_TYPES = {EntryType.CHAR: stat.S_IFCHR, EntryType.BLOCK: stat.S_IFBLK, EntryType.FIFO: stat.S_IFIFO}


class Readable(Protocol):
    """What apply_layer needs of its input: ``read(n)``."""

    def read(self, size: int = -1, /) -> bytes:
        """Return up to ``size`` bytes, or b"" at the end."""
        ...


def apply_layer(tar_stream: Readable, target_dir: str) -> None:
    """Apply an uncompressed layer tar onto ``target_dir``; raises UnsafePath, LayerFormatError, TruncatedLayer or OSError."""
    _Applier(tar_stream, target_dir).run()


class _Applier:
    def __init__(self, stream: Readable, target_dir: str) -> None:
        self.stream = stream
        self.root = os.path.realpath(target_dir)
        self.parser = TarEntryParser(f"(applied onto {target_dir})")
        self.unpacked: set[str] = set()  # absolute paths this layer wrote
        self.unpacked_dirs: set[str] = set()  # their ancestors: directories holding this layer's work
        self.dir_mtimes: dict[str, int] = {}  # directory -> mtime_ns to set once everything is in place
        self.parents: dict[str, str] = {}  # resolved parent directories; cleared on every removal

    def run(self) -> None:
        while not self.parser.ended:
            block = self._read(BLOCK)
            if not block:
                break  # ended without zero blocks: finish() tells whether inside an entry
            if len(block) < BLOCK:
                raise TruncatedLayer(f"layer applied onto {self.root}: tar stream ends inside a header block")
            count = len(self.parser.entries)
            self.parser.feed(block)
            if len(self.parser.entries) > count:
                self._apply(self.parser.entries.pop())
        self.parser.finish()
        self._set_dir_times()

    def _read(self, size: int) -> bytes:
        data = self.stream.read(size)
        while data and len(data) < size:
            more = self.stream.read(size - len(data))
            if not more:
                break
            data += more
        return data

    # -- one entry -------------------------------------------------------------------------

    def _apply(self, entry: Entry) -> None:
        if not entry.path:
            self._set_metadata(self.root, entry)
            self.dir_mtimes[self.root] = entry.mtime_ns
            return
        parent_rel, _, name = entry.path.rpartition("/")
        parent = self._directory(parent_rel)
        if name.startswith(WHITEOUT_PREFIX):
            self._whiteout(parent, name, entry)
            return
        path = os.path.join(parent, name)
        self._touch(parent)
        existing = _lstat(path)
        if existing is not None and not (stat.S_ISDIR(existing.st_mode) and entry.type is EntryType.DIR):
            self._remove(path, existing)
        if entry.type is EntryType.FILE:
            self._write_file(path, entry)
        elif entry.type is EntryType.DIR:
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                os.mkdir(path, 0o700)
        elif entry.type is EntryType.SYMLINK:
            os.symlink(entry.link_target, path)
        elif entry.type is EntryType.HARDLINK:
            self._link(path, entry)
        else:
            os.mknod(path, _NODE_TYPES[entry.type] | 0o600, os.makedev(entry.devmajor, entry.devminor))
        self._mark_unpacked(path)
        if entry.type is EntryType.HARDLINK:
            return  # one inode, one set of metadata: the target's
        self._set_metadata(path, entry)
        if entry.type is EntryType.DIR:
            self.dir_mtimes[path] = entry.mtime_ns

    def _write_file(self, path: str, entry: Entry) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as file:
            remaining, wanted = padded(entry.size), entry.size
            while remaining:
                chunk = self._read(min(COPY_CHUNK, remaining))
                if not chunk:
                    raise TruncatedLayer(
                        f"layer applied onto {self.root}: tar stream ends inside the data of {entry.path!r}"
                    )
                self.parser.feed(chunk)
                if wanted:
                    file.write(chunk[:wanted])
                    wanted -= min(wanted, len(chunk))
                remaining -= len(chunk)

    def _link(self, path: str, entry: Entry) -> None:
        target_parent, _, target_name = entry.link_target.rpartition("/")
        target = os.path.join(self._directory(target_parent), target_name)
        if _lstat(target) is None:
            raise LayerFormatError(f"hardlink {entry.path!r}: target {entry.link_target!r} does not exist")
        os.link(target, path, follow_symlinks=False)

    def _set_metadata(self, path: str, entry: Entry) -> None:
        is_link = entry.type is EntryType.SYMLINK
        os.chown(path, entry.uid, entry.gid, follow_symlinks=False)
        # After chown, which drops security.capability; before chmod, as containerd does.
        for key, value in entry.xattrs.items():
            try:
                os.setxattr(path, key, value, follow_symlinks=False)
            except OSError as error:
                if error.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
                log.warning("xattr-skipped path=%s name=%s: %s", entry.path, key, error.strerror)
        if not is_link:
            os.chmod(path, entry.mode & 0o7777)
        if entry.type is not EntryType.DIR:
            os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)

    # -- whiteouts -------------------------------------------------------------------------

    def _whiteout(self, parent: str, name: str, entry: Entry) -> None:
        if name == OPAQUE_MARKER:
            self._clear_lower(parent)
            return
        if name.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # aufs metadata (.wh..wh.plnk and the like): no meaning here
        hidden = name[len(WHITEOUT_PREFIX) :]
        if hidden in ("", ".", ".."):
            raise UnsafePath(f"whiteout {entry.path!r} names no entry of its directory")
        path = os.path.join(parent, hidden)
        st = _lstat(path)
        if st is None or path in self.unpacked:
            return
        if path in self.unpacked_dirs:  # this layer already wrote inside it: keep that part
            self._clear_lower(path)
            return
        self._touch(parent)
        self._remove(path, st)

    def _clear_lower(self, directory: str) -> None:
        """Remove everything under ``directory`` that this layer did not write."""
        with os.scandir(directory) as listing:
            children = [(child.path, child.is_dir(follow_symlinks=False)) for child in listing]
        for path, is_dir in children:
            if is_dir and path in self.unpacked_dirs:
                self._clear_lower(path)
            elif path not in self.unpacked:
                self._touch(directory)
                self._remove(path, None)

    # -- paths -----------------------------------------------------------------------------

    def _directory(self, rel: str) -> str:
        """The real directory for ``rel``: symlinks followed inside the root, missing ones created."""
        cached = self.parents.get(rel)
        if cached is not None:
            return cached
        resolved: list[str] = []
        pending = rel.split("/")[::-1] if rel else []
        hops = 0
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if resolved:
                    resolved.pop()
                continue
            path = os.path.join(self.root, *resolved, name)
            st = _lstat(path)
            if st is not None and stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise UnsafePath(f"{rel!r}: too many symlinks while resolving it inside {self.root}")
                target = os.readlink(path)
                if target.startswith("/"):
                    resolved = []  # absolute targets are relative to the layer root, never the host's
                pending.extend(target.split("/")[::-1])
                continue
            if st is None or not stat.S_ISDIR(st.st_mode):
                self._make_implicit_dir(path, st)
            resolved.append(name)
        result = os.path.join(self.root, *resolved)
        self.parents[rel] = result
        return result

    def _make_implicit_dir(self, path: str, existing: os.stat_result | None) -> None:
        self._touch(os.path.dirname(path))
        if existing is not None:
            self._remove(path, existing)
        os.mkdir(path)
        os.chmod(path, IMPLICIT_DIR_MODE)
        self.dir_mtimes[path] = 0

    def _mark_unpacked(self, path: str) -> None:
        self.unpacked.add(path)
        parent = os.path.dirname(path)
        while parent != self.root and parent not in self.unpacked_dirs:
            self.unpacked_dirs.add(parent)
            parent = os.path.dirname(parent)

    def _touch(self, directory: str) -> None:
        """Remember a directory's time before this layer changes its contents."""
        if directory not in self.dir_mtimes:
            self.dir_mtimes[directory] = os.lstat(directory).st_mtime_ns

    def _remove(self, path: str, st: os.stat_result | None) -> None:
        st = st or os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        self.dir_mtimes.pop(path, None)
        self.parents.clear()

    def _set_dir_times(self) -> None:
        # Deepest first, so setting a child's time never disturbs its parent's afterwards.
        for path in sorted(self.dir_mtimes, key=lambda p: p.count("/"), reverse=True):
            st = _lstat(path)
            if st is not None and stat.S_ISDIR(st.st_mode):
                mtime = self.dir_mtimes[path]
                os.utime(path, ns=(mtime, mtime), follow_symlinks=False)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
