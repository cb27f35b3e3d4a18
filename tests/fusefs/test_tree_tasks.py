"""Background work of a tree lives and dies with it: prefetch tasks are cancelled when the tree is removed."""

from __future__ import annotations

import os
from types import SimpleNamespace

import trio
import trio.testing

from fusefs.merged_tree import MergedTree
from fusefs.operations import ReadOnlyOperations
from fusefs.prefetch import TreeTasks
from fusefs.prefetch.libraries import WHOLE_FILE_THRESHOLD
from index.model import Entry
from index.model import EntryType as T
from tests.fusefs.fuse_harness import MemorySource

BIG = WHOLE_FILE_THRESHOLD + 1


class HangingPrefetchSource(MemorySource):
    """Reads answer from memory; a prefetch never finishes until cancelled; ``close`` is recorded."""

    def __init__(self, data: dict[tuple[int, str], bytes]) -> None:
        super().__init__(data)
        self.prefetching = 0
        self.cancelled = 0
        self.closed = False

    async def prefetch(self, layer: int, entry: Entry) -> None:
        """Hang as a prefetch from a silent registry would, counting cancellations."""
        self.prefetching += 1
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled += 1
            raise

    def close(self) -> None:
        """Record that the forest no longer needs this source."""
        self.closed = True


def forest_with_program() -> tuple[ReadOnlyOperations, HangingPrefetchSource, int]:
    """A forest showing one tree with a large executable, whose first read starts a whole-file prefetch."""
    tree = MergedTree.build([[Entry("", T.DIR, 0o755), Entry("prog", T.FILE, 0o755, size=BIG)]])
    source = HangingPrefetchSource({(0, "prog"): bytes(BIG)})
    ops = ReadOnlyOperations()
    ops.add_tree("chain", tree, source)
    root = ops._by_name["chain"]
    node = tree.resolve("prog")
    assert node is not None
    return ops, source, root.base + node.index


async def test_removing_a_tree_cancels_its_prefetch_tasks() -> None:
    """A prefetch started by a read of a tree is cancelled when the tree is removed, and no new one starts."""
    ops, source, inode = forest_with_program()
    async with trio.open_nursery() as nursery:
        ops.bind_task_nursery(nursery)
        info = await ops.open(inode, os.O_RDONLY, SimpleNamespace(pid=os.getpid()))
        await ops.read(info.fh, 0, 4096)
        await trio.testing.wait_all_tasks_blocked()
        assert source.prefetching == 1
        tasks: TreeTasks = ops._by_name["chain"].tasks
        assert tasks.running == 1
        ops.remove_tree("chain")
        await trio.testing.wait_all_tasks_blocked()
        assert source.cancelled == 1 and tasks.running == 0
        tasks.start_soon(source.prefetch, 0, Entry("prog", T.FILE))
        await trio.testing.wait_all_tasks_blocked()
        assert source.prefetching == 1  # a removed tree starts nothing new
        await ops.release(info.fh)


async def test_a_removed_trees_source_is_closed_only_after_its_last_open_file() -> None:
    """Open files of a removed tree keep reading; its source is closed when the last one is released."""
    ops, source, inode = forest_with_program()
    async with trio.open_nursery() as nursery:
        ops.bind_task_nursery(nursery)
        info = await ops.open(inode, os.O_RDONLY, SimpleNamespace(pid=os.getpid()))
        ops.remove_tree("chain")
        assert not source.closed
        assert await ops.read(info.fh, 4096, 10) == bytes(10)
        await ops.release(info.fh)
        assert source.closed
        nursery.cancel_scope.cancel()


async def test_a_tree_removed_with_no_open_file_closes_its_source_at_once() -> None:
    """Removing a tree nobody has open closes its source right away (its layers can be forgotten)."""
    ops, source, _ = forest_with_program()
    ops.remove_tree("chain")
    assert source.closed
