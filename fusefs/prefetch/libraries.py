"""Fetch a program's shared libraries while it is still being loaded.

Starting a dynamically linked program reads its binary, then the dynamic loader, then each
library in turn: on a lazy mount each of those is a cold read paying a full round trip, one
after the other (`python3` on Debian: the binary, ld.so, libm, libz, libexpat, libc). The
first read of an ELF file at offset 0 tells us the program is about to run, and its dynamic
section names everything the loader will open next. So that read starts a background task
which resolves the interpreter and DT_NEEDED libraries in the merged tree (following
symlinks such as merged-/usr's ``/lib``) and asks the content source to fetch them, and
their own libraries, concurrently: the loader then finds them cached.

The task only fetches compressed bytes into the cache; a failure is logged and forgotten,
since the loader's own reads will fetch (or fail) as usual.
"""

from __future__ import annotations

import logging
import posixpath
from typing import Protocol, runtime_checkable

import trio

from fusefs.merged_tree import MergedTree, Node
from fusefs.prefetch import TreeTasks
from fusefs.prefetch.elf_deps import ELF_MAGIC, ElfDeps, ReadAt, read_elf_deps
from index.model import Entry, EntryType

log = logging.getLogger(__name__)

# glibc's loader reads this first, to look the libraries up, before it opens any of them.
LOADER_CACHE = "etc/ld.so.cache"
# Every program glibc's loader runs needs the C library: it is fetched as soon as the
# interpreter is known, before the dynamic segment (often a fetch of its own) confirms it.
GLIBC_LOADER = "ld-linux"
GLIBC = "libc.so.6"
# The first read of an executable file larger than this fetches the whole file at once.
WHOLE_FILE_THRESHOLD = 256 << 10
# Libraries of libraries are followed this deep (libpython -> libz...); the set of
# libraries already handled stops cycles.
MAX_DEPTH = 2


@runtime_checkable
class PrefetchingSource(Protocol):
    """A content source that can fetch a file's bytes ahead of reads."""

    async def read(self, layer: int, entry: Entry, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes at ``offset``; raises LazysnapError."""
        ...

    async def prefetch(self, layer: int, entry: Entry) -> None:
        """Fetch a file's bytes into the cache without returning them; raises LazysnapError."""
        ...


class LibraryPrefetcher:
    """Per merged tree: on the first read of each ELF file, prefetch the libraries it will load."""

    def __init__(self, tree: MergedTree, source: PrefetchingSource, tasks: TreeTasks) -> None:
        self._tasks = tasks
        self._tree = tree
        self._source = source
        self._handled: set[int] = set()  # node indexes inspected or prefetched already
        self._whole: set[int] = set()  # executable files fetched whole at their first read

    def note_open(self, node: Node, pid: int) -> None:
        """Nothing to do when a file is opened: libraries are found from the program's bytes."""

    def before_read(self, node: Node, offset: int) -> None:
        """A read is starting: the first read at offset 0 of a large executable file fetches all of it.

        A program's loader needs its dynamic segment (often at the far end of the file, in a
        chunk of its own) before the libraries can be named, and maps the rest soon after:
        requesting every chunk now keeps the link busy instead of one round trip per chunk.
        """
        entry = node.entry
        if offset != 0 or not entry.mode & 0o111 or entry.size <= WHOLE_FILE_THRESHOLD:
            return
        if node.index in self._whole or node.index in self._handled:
            return
        self._whole.add(node.index)
        self._tasks.start_soon(self._prefetch_whole, node, name=f"prefetch {entry.path}")

    async def _prefetch_whole(self, node: Node) -> None:
        try:
            await self._source.prefetch(node.layer, node.entry)
        except Exception as error:  # a hint only: the read itself fetches what it needs
            log.debug("prefetch path=%s: %s", node.entry.path, error)

    def note_read(self, node: Node, offset: int, data: bytes) -> None:
        """Look at a read that just succeeded; start prefetching if it is the head of an ELF file."""
        if offset != 0 or not data.startswith(ELF_MAGIC) or node.index in self._handled:
            return
        self._handled.add(node.index)
        # In the tree's task group: the prefetch must not delay the read that revealed it, and
        # it ends when the tree is removed or the mount ends.
        self._tasks.start_soon(self._run, node, name=f"library-prefetch {node.entry.path}")

    async def _run(self, node: Node) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await self._follow(node, 0, nursery)
        except Exception as error:  # a hint only: never let it reach the trio run
            log.debug("library-prefetch path=%s: %s", node.entry.path, error)

    async def _follow(self, node: Node, depth: int, nursery: trio.Nursery) -> None:
        """Read ``node``'s ELF dependencies; prefetch each new one and follow it in turn."""

        def start(libraries: list[Node]) -> None:
            for library in libraries:
                if library.index in self._handled:
                    continue
                self._handled.add(library.index)
                nursery.start_soon(self._source.prefetch, library.layer, library.entry)
                if depth + 1 < MAX_DEPTH:
                    nursery.start_soon(self._follow, library, depth + 1, nursery)

        def on_interpreter(early: ElfDeps) -> None:
            if GLIBC_LOADER in early.interpreter:
                early = ElfDeps(early.machine, early.interpreter, [GLIBC])
            start(self._resolve(node, early))

        deps = await read_elf_deps(self._reader(node), node.entry.size, on_interpreter)
        if deps is not None:
            start(self._resolve(node, deps))

    def _reader(self, node: Node) -> ReadAt:
        async def read_at(offset: int, length: int) -> bytes:
            length = max(0, min(length, node.entry.size - offset))
            if length == 0:
                return b""
            return await self._source.read(node.layer, node.entry, offset, length)

        return read_at

    def _resolve(self, node: Node, deps: ElfDeps) -> list[Node]:
        """The regular-file nodes of ``deps``' interpreter and libraries that exist in the tree."""
        found: list[Node] = []
        if deps.interpreter.startswith("/"):
            found += self._files(deps.interpreter)
            if deps.needed and "ld-linux" in deps.interpreter:
                found += self._files(LOADER_CACHE)
        dirs = deps.library_dirs(posixpath.dirname(node.entry.path))
        for name in deps.needed:
            for directory in dirs:
                hits = self._files(f"{directory}/{name}")
                if hits:
                    found += hits
                    break
        return found

    def _files(self, path: str) -> list[Node]:
        target = self._tree.resolve(path)
        if target is None or target.entry.type is not EntryType.FILE or target.entry.size == 0:
            return []
        return [target]
