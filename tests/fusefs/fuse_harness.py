"""Helpers for real FUSE mounts: an in-memory content source and a mount served from a thread.

The filesystem runs its own trio loop in a background thread so that test code can use plain
blocking ``os`` calls on the mount; the fixture always unmounts, even when a test fails.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import trio

from fusefs.merged_tree import MergedTree
from fusefs.mount import is_mounted, run_filesystem, unmount
from fusefs.operations import ReadOnlyOperations
from index.errors import LazysnapError
from index.model import Entry


class MemorySource:
    """File bytes from a dict keyed by (layer, path); can sleep or fail on demand."""

    def __init__(self, data: dict[tuple[int, str], bytes], *, delay: float = 0.0) -> None:
        self.data = data
        self.delay = delay
        self.fail: LazysnapError | None = None
        self.reads: list[tuple[int, str, int, int]] = []

    async def read(self, layer: int, entry: Entry, offset: int, length: int) -> bytes:
        """Return the bytes of the entry's data in its layer; raises ``fail`` when set."""
        self.reads.append((layer, entry.path, offset, length))
        if self.delay:
            await trio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return self.data[layer, entry.path][offset : offset + length]


class Served:
    """A running mount: its path, operations, and a way to call into its trio loop."""

    def __init__(self, path: Path, ops: ReadOnlyOperations, token: trio.lowlevel.TrioToken) -> None:
        self.path = path
        self.ops = ops
        self._token = token

    def call(self, fn: Callable[..., object], *args: object) -> object:
        """Run a synchronous function in the filesystem's trio thread."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)


@contextmanager
def serve(ops: ReadOnlyOperations, mountpoint: Path) -> Iterator[Served]:
    """Mount ``ops`` at ``mountpoint`` from a thread; unmount and join on the way out."""
    ready = threading.Event()
    tokens: list[trio.lowlevel.TrioToken] = []
    errors: list[BaseException] = []

    async def main() -> None:
        tokens.append(trio.lowlevel.current_trio_token())
        await run_filesystem(ops, str(mountpoint), fsname="lazysnap-test", ready=ready.set)

    def thread() -> None:
        try:
            trio.run(main)
        except BaseException as error:  # handed to the test thread below
            errors.append(error)
        finally:
            ready.set()

    worker = threading.Thread(target=thread, name="fuse-test", daemon=True)
    worker.start()
    try:
        ready.wait(20)
        if errors:
            raise errors[0]
        assert is_mounted(str(mountpoint)), "filesystem did not come up"
        yield Served(mountpoint, ops, tokens[0])
    finally:
        if is_mounted(str(mountpoint)):
            unmount(str(mountpoint))
        worker.join(20)
        assert not worker.is_alive(), "filesystem thread did not stop after unmount"
    if errors:
        raise errors[0]


def build(layers: Sequence[Sequence[Entry]]) -> MergedTree:
    """Merge entry lists (bottom first) into a tree."""
    return MergedTree.build(layers)
