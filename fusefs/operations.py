"""pyfuse3 operations serving merged trees read-only.

Two layouts: a single tree at the mount root (``ReadOnlyOperations(tree, source)``), or a
*forest* (``ReadOnlyOperations()``) whose root lists named trees added and removed at runtime
with ``add_tree``/``remove_tree``; the snapshotter daemon uses one forest mount and gives each
layer chain's directory to overlayfs as a lowerdir.

Inode numbers: a tree's node ``i`` is ``base + i``. In the single layout the base is
``ROOT_INODE`` so the tree root is the mount root; in a forest each tree gets a fresh base that
is never reused, so a removed tree's inodes can't be confused with a newer tree's.

Layers never change, so entries and attributes are cached by the kernel for long and open
files keep their page cache. Handlers never block: file bytes come from an async
``ContentSource``.

No request can take the daemon down: every handler runs under ``_errno_on_failure``, which turns
an unexpected exception into an errno for that request (EOVERFLOW for a value the kernel's
attributes cannot hold, EIO otherwise) and logs it with the stable key ``fuse-op-failed``; one
daemon serves every container's root filesystem, and one bad entry must cost only itself.
"""

from __future__ import annotations

import bisect
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Concatenate, ParamSpec, Protocol, TypeVar, runtime_checkable

import pyfuse3
import trio

from fusefs.merged_tree import MergedTree, Node
from fusefs.prefetch import Prefetcher, TreeTasks
from fusefs.prefetch.imports import ImportPrefetcher
from fusefs.prefetch.libraries import LibraryPrefetcher, PrefetchingSource
from index.errors import LazysnapError
from index.model import Entry, EntryType

log = logging.getLogger(__name__)

# Layers are immutable: let the kernel keep dentries and attributes for an hour (measured:
# `ls -lR` of 20k files takes 9 s with zero timeouts and 0.14 s with long ones).
DEFAULT_TIMEOUT = 3600.0
# The forest root changes when trees come and go; its attributes are kept only briefly.
FOREST_ROOT_TIMEOUT = 1.0
BLOCK_SIZE = 4096
NAME_MAX = 255  # bytes of one name: the kernel's limit, and what fits a readdir reply

P = ParamSpec("P")
R = TypeVar("R")

_TYPE_BITS = {
    EntryType.FILE: stat.S_IFREG,
    EntryType.DIR: stat.S_IFDIR,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
}


class ContentSource(Protocol):
    """Where file bytes come from: the entry's data in the given layer."""

    async def read(self, layer: int, entry: Entry, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes at ``offset``; raises LazysnapError (IntegrityError, FetchError...)."""
        ...


@runtime_checkable
class ClosableSource(Protocol):
    """A content source that wants to know when its tree is gone and none of its files is open."""

    def close(self) -> None:
        """Release what the source holds; no read of it comes after this."""
        ...


@dataclass(slots=True, eq=False)
class _Tree:
    name: str
    tree: MergedTree
    source: ContentSource
    base: int
    # Read-ahead driven by what files say they need next: a program's libraries, a module's imports.
    prefetchers: tuple[Prefetcher, ...] = ()
    tasks: TreeTasks = field(default_factory=TreeTasks)
    open_files: int = 0
    removed: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.source, PrefetchingSource):
            self.prefetchers = (
                LibraryPrefetcher(self.tree, self.source, self.tasks),
                ImportPrefetcher(self.tree, self.source, self.tasks),
            )

    def retire_if_unused(self) -> None:
        """Once removed and with no open file, stop its tasks and close its source."""
        if self.removed and self.open_files == 0:
            self.tasks.cancel()
            if isinstance(self.source, ClosableSource):
                self.source.close()


def _size(entry: Entry) -> int:
    if entry.type is EntryType.FILE:
        return entry.size
    if entry.type is EntryType.SYMLINK:
        return len(os.fsencode(entry.link_target))
    if entry.type is EntryType.DIR:
        return BLOCK_SIZE
    return 0


def _errno_on_failure(
    handler: Callable[Concatenate[ReadOnlyOperations, P], Awaitable[R]],
) -> Callable[Concatenate[ReadOnlyOperations, P], Awaitable[R]]:
    """Wrap a FUSE handler so that any exception but FUSEError becomes FUSEError for this request, logged."""

    @functools.wraps(handler)
    async def guarded(self: ReadOnlyOperations, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OverflowError:
            # A value the kernel's attributes cannot hold (a loaded index is checked, but a tree
            # may come from elsewhere): this request fails, the daemon goes on.
            log.exception("fuse-op-failed op=%s args=%.200r errno=EOVERFLOW", handler.__name__, args)
            raise pyfuse3.FUSEError(errno.EOVERFLOW) from None
        except Exception:
            log.exception("fuse-op-failed op=%s args=%.200r errno=EIO", handler.__name__, args)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return guarded


def _hint(owner: _Tree, call: Callable[[Prefetcher], None]) -> None:
    """Tell each prefetcher of ``owner`` about a request; a prefetcher's failure never reaches the request."""
    for prefetcher in owner.prefetchers:
        try:
            call(prefetcher)
        except Exception:  # a hint only: the request itself fetches what it needs
            log.exception("prefetch-hint-failed tree=%s prefetcher=%s", owner.name, type(prefetcher).__name__)


class ReadOnlyOperations(pyfuse3.Operations):  # type: ignore[misc]  # pyfuse3 is untyped here
    """Read-only FUSE operations over one merged tree or a forest of named trees."""

    def __init__(
        self,
        tree: MergedTree | None = None,
        source: ContentSource | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """Serve ``tree`` at the root, or an empty forest when no tree is given; raises ValueError without a source."""
        super().__init__()
        if (tree is None) != (source is None):
            raise ValueError("give both a tree and its content source, or neither for a forest")
        self._timeout = timeout
        self._forest = tree is None
        self._by_name: dict[str, _Tree] = {}
        self._bases: list[int] = []  # sorted bases of live trees
        self._by_base: dict[int, _Tree] = {}
        self._next_base = pyfuse3.ROOT_INODE + 1
        self._forest_mtime_ns = time.time_ns()
        self._files: dict[int, tuple[_Tree, Node]] = {}
        self._dirs: dict[int, list[tuple[bytes, _Tree | None, Node | None]]] = {}
        self._next_fh = 1
        self._live = False
        self._task_nursery: trio.Nursery | None = None
        # A single tree without any xattr answers getxattr with ENOSYS: the kernel then stops asking
        # for the rest of the mount (it never caches "no such attribute"), which made `ls -lR` send
        # one getxattr per file to this daemon. A forest can't: a tree added later may have xattrs.
        self._xattrs_unsupported = False
        if tree is not None and source is not None:
            self._insert(_Tree("", tree, source, pyfuse3.ROOT_INODE))
            self._xattrs_unsupported = not any(node.entry.xattrs for _, node in tree.walk())

    # -- forest management -------------------------------------------------------------

    def add_tree(self, name: str, tree: MergedTree, source: ContentSource) -> None:
        """Show ``tree`` as directory ``name`` under the forest root; raises ValueError on a bad or taken name."""
        if not self._forest:
            raise ValueError("add_tree needs a forest (ReadOnlyOperations() without a tree)")
        if name in ("", ".", "..") or "/" in name or "\x00" in name:
            raise ValueError(f"tree name {name!r} is not a valid directory name")
        if name in self._by_name:
            raise ValueError(f"tree name {name!r} is already in use; remove it first")
        self._insert(_Tree(name, tree, source, self._next_base))
        self._next_base += len(tree)
        self._forest_mtime_ns = time.time_ns()

    def bind_task_nursery(self, nursery: trio.Nursery) -> None:
        """Run the trees' background tasks (prefetches) in ``nursery``, the filesystem's own."""
        self._task_nursery = nursery
        for owner in self._by_name.values():
            owner.tasks.bind(nursery)

    def remove_tree(self, name: str) -> None:
        """Stop showing the tree ``name``; open files of it keep working; raises KeyError if unknown.

        Its prefetch tasks are cancelled now; its source is closed once no file of it is open.
        """
        entry = self._by_name.pop(name)
        del self._by_base[entry.base]
        self._bases.remove(entry.base)
        self._forest_mtime_ns = time.time_ns()
        entry.removed = True
        entry.tasks.cancel()
        entry.retire_if_unused()
        if self._live:
            # The kernel holds the name for DEFAULT_TIMEOUT otherwise. The async variant is the
            # one that can't deadlock when called from the loop that serves requests.
            pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, os.fsencode(name), ignore_enoent=True)

    def tree_names(self) -> list[str]:
        """The names of the trees shown, sorted."""
        return sorted(self._by_name)

    def _insert(self, entry: _Tree) -> None:
        if self._task_nursery is not None:
            entry.tasks.bind(self._task_nursery)
        self._by_name[entry.name] = entry
        self._by_base[entry.base] = entry
        bisect.insort(self._bases, entry.base)

    # -- inode mapping -------------------------------------------------------------------

    def _resolve(self, inode: int) -> tuple[_Tree, Node]:
        position = bisect.bisect_right(self._bases, inode) - 1
        if position >= 0:
            owner = self._by_base[self._bases[position]]
            offset = inode - owner.base
            if offset < len(owner.tree):
                return owner, owner.tree.node(offset)
        raise pyfuse3.FUSEError(errno.ENOENT)

    def _is_forest_root(self, inode: int) -> bool:
        return self._forest and inode == pyfuse3.ROOT_INODE

    def _attrs(self, owner: _Tree, node: Node) -> pyfuse3.EntryAttributes:
        entry = node.entry
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = owner.base + node.index
        attrs.entry_timeout = self._timeout
        attrs.attr_timeout = self._timeout
        attrs.st_mode = _TYPE_BITS[entry.type] | (entry.mode & 0o7777)
        attrs.st_nlink = node.nlink
        attrs.st_uid = entry.uid
        attrs.st_gid = entry.gid
        if entry.type in (EntryType.CHAR, EntryType.BLOCK):
            attrs.st_rdev = os.makedev(entry.devmajor, entry.devminor)
        size = _size(entry)
        attrs.st_size = size
        attrs.st_blksize = BLOCK_SIZE
        attrs.st_blocks = (size + 511) // 512
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = entry.mtime_ns
        return attrs

    def _forest_root_attrs(self) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = pyfuse3.ROOT_INODE
        attrs.entry_timeout = FOREST_ROOT_TIMEOUT
        attrs.attr_timeout = FOREST_ROOT_TIMEOUT
        attrs.st_mode = stat.S_IFDIR | 0o755
        attrs.st_nlink = 2 + len(self._by_name)
        attrs.st_size = BLOCK_SIZE
        attrs.st_blksize = BLOCK_SIZE
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self._forest_mtime_ns
        return attrs

    # -- metadata ------------------------------------------------------------------------

    def init(self) -> None:
        """Note that the kernel is connected, so entries may be invalidated from now on."""
        self._live = True

    @_errno_on_failure
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Find ``name`` in a directory; raises FUSEError(ENOENT/ENOTDIR/ENAMETOOLONG)."""
        if len(name) > NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        if self._is_forest_root(parent_inode):
            if name in (b".", b".."):
                return self._forest_root_attrs()
            owner = self._by_name.get(os.fsdecode(name))
            if owner is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attrs(owner, owner.tree.root)
        owner, node = self._resolve(parent_inode)
        if node.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._attrs(owner, node)
        if name == b"..":
            if node is owner.tree.root and self._forest:
                return self._forest_root_attrs()
            assert node.parent is not None
            return self._attrs(owner, node.parent)
        child = node.children.get(os.fsdecode(name))
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(owner, child)

    @_errno_on_failure
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """Attributes of an inode; raises FUSEError(ENOENT) for an unknown one."""
        if self._is_forest_root(inode):
            return self._forest_root_attrs()
        return self._attrs(*self._resolve(inode))

    @_errno_on_failure
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Nothing to do: trees are immutable and live as long as they are shown."""

    @_errno_on_failure
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        """The target of a symlink; raises FUSEError(EINVAL) for anything else."""
        if self._is_forest_root(inode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        _, node = self._resolve(inode)
        if node.entry.type is not EntryType.SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(node.entry.link_target)

    @_errno_on_failure
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        """One extended attribute; raises FUSEError(ENOATTR) when absent, ENOSYS when no file has any."""
        if self._xattrs_unsupported:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if not self._is_forest_root(inode):
            _, node = self._resolve(inode)
            value = node.entry.xattrs.get(os.fsdecode(name))
            if value is not None:
                return value
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @_errno_on_failure
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        """The names of an inode's extended attributes; raises FUSEError(ENOENT) for an unknown inode."""
        if self._is_forest_root(inode):
            return []
        _, node = self._resolve(inode)
        return [os.fsencode(key) for key in node.entry.xattrs]

    @_errno_on_failure
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """Totals over every tree shown: nothing free, since nothing can be written."""
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = BLOCK_SIZE
        data.f_blocks = sum(-(-t.tree.file_bytes // BLOCK_SIZE) for t in self._by_name.values())
        data.f_files = sum(len(t.tree) for t in self._by_name.values()) + int(self._forest)
        data.f_bfree = data.f_bavail = data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    # -- directories ---------------------------------------------------------------------

    @_errno_on_failure
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        """Snapshot a directory's listing for readdir; raises FUSEError(ENOTDIR/ENOENT)."""
        listing: list[tuple[bytes, _Tree | None, Node | None]]
        if self._is_forest_root(inode):
            listing = [(os.fsencode(name), t, t.tree.root) for name, t in sorted(self._by_name.items())]
        else:
            owner, node = self._resolve(inode)
            if node.children is None:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            listing = [(os.fsencode(name), owner, child) for name, child in node.children.items()]
        fh = self._new_fh()
        self._dirs[fh] = listing
        return fh

    @_errno_on_failure
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """List entries from position ``start_id`` on; next_id is the position after each entry."""
        listing = self._dirs.get(fh)
        if listing is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        for position in range(start_id, len(listing)):
            name, owner, node = listing[position]
            assert owner is not None and node is not None
            attrs = self._listed_attrs(name, owner, node)
            if attrs is not None and not pyfuse3.readdir_reply(token, name, attrs, position + 1):
                return

    def _listed_attrs(self, name: bytes, owner: _Tree, node: Node) -> pyfuse3.EntryAttributes | None:
        """The attributes of one listed entry, or None (logged) to leave it out of the listing."""
        # A name too long for any reply would stop the listing right there: the kernel takes a
        # reply without entries for the end of the directory, and every later entry would vanish.
        if len(name) > NAME_MAX:
            log.error(
                "entry-unservable tree=%s path=%s: name of %d bytes", owner.name, node.entry.path, len(name)
            )
            return None
        try:
            return self._attrs(owner, node)
        except Exception:  # its own lookup answers the errno; the rest of the directory is listed
            log.exception("entry-unservable tree=%s path=%s", owner.name, node.entry.path)
            return None

    @_errno_on_failure
    async def releasedir(self, fh: int) -> None:
        """Drop a directory handle's listing."""
        self._dirs.pop(fh, None)

    # -- files -----------------------------------------------------------------------------

    @_errno_on_failure
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        """Open a file for reading with the page cache kept; raises FUSEError(EROFS) for any write access."""
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
        if self._is_forest_root(inode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        owner, node = self._resolve(inode)
        if node.children is not None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        fh = self._new_fh()
        self._files[fh] = (owner, node)
        owner.open_files += 1
        _hint(owner, lambda prefetcher: prefetcher.note_open(node, ctx.pid))
        # keep_cache: the bytes of an immutable layer never go stale, so reopening a file must
        # not throw its pages away.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_errno_on_failure
    async def read(self, fh: int, off: int, size: int) -> bytes:
        """Read from an open file via its content source; raises FUSEError(EIO) when the source fails."""
        found = self._files.get(fh)
        if found is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        owner, node = found
        entry = node.entry
        length = min(size, entry.size - off)
        if length <= 0 or entry.type is not EntryType.FILE:
            return b""
        _hint(owner, lambda prefetcher: prefetcher.before_read(node, off))
        try:
            data = await owner.source.read(node.layer, entry, off, length)
        except LazysnapError as error:
            log.error(
                "read-failed layer=%d path=%s offset=%d length=%d: %s",
                node.layer,
                entry.path,
                off,
                length,
                error,
            )
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            # A bug in a source must fail this read, not take down every mount of the daemon.
            log.exception(
                "read-failed layer=%d path=%s offset=%d length=%d: unexpected error",
                node.layer,
                entry.path,
                off,
                length,
            )
            raise pyfuse3.FUSEError(errno.EIO) from None
        if len(data) != length:
            # A short answer would be cached by the kernel as the end of the file: never.
            log.error(
                "read-failed layer=%d path=%s offset=%d: source returned %d of %d bytes",
                node.layer,
                entry.path,
                off,
                len(data),
                length,
            )
            raise pyfuse3.FUSEError(errno.EIO)
        _hint(owner, lambda prefetcher: prefetcher.note_read(node, off, data))
        return data

    @_errno_on_failure
    async def release(self, fh: int) -> None:
        """Forget an open file handle (the last one of a removed tree retires it)."""
        found = self._files.pop(fh, None)
        if found is not None:
            owner = found[0]
            owner.open_files -= 1
            owner.retire_if_unused()

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh
