"""Running a program from a mount prefetches its dynamic loader and libraries, resolved through symlinks."""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

from fusefs.merged_tree import MergedTree
from fusefs.operations import ReadOnlyOperations
from fusefs.prefetch import TreeTasks
from fusefs.prefetch.elf_deps import ElfDeps, read_elf_deps
from fusefs.prefetch.libraries import WHOLE_FILE_THRESHOLD, LibraryPrefetcher
from index.model import Entry
from index.model import EntryType as T
from tests.fusefs.fuse_harness import MemorySource, serve

MULTIARCH = "usr/lib/x86_64-linux-gnu"
HOST_FILES = {
    "usr/bin/true": "/usr/bin/true",
    f"{MULTIARCH}/libc.so.6": "/usr/lib/x86_64-linux-gnu/libc.so.6",
    f"{MULTIARCH}/ld-linux-x86-64.so.2": "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    f"{MULTIARCH}/libm.so.6": "/usr/lib/x86_64-linux-gnu/libm.so.6",  # present, but `true` does not need it
    "etc/ld.so.cache": "/etc/ld.so.cache",
}


class PrefetchRecordingSource(MemorySource):
    """MemorySource that also records what was asked for ahead of reads."""

    def __init__(self, data: dict[tuple[int, str], bytes]) -> None:
        super().__init__(data)
        self.prefetched: list[str] = []

    async def prefetch(self, layer: int, entry: Entry) -> None:
        """Record the prefetch; the bytes are in memory already."""
        await trio.sleep(0)
        self.prefetched.append(entry.path)


@asynccontextmanager
async def tree_tasks() -> AsyncIterator[TreeTasks]:
    """A tree's task group bound to a nursery that ends with the block, cancelling what is left."""
    async with trio.open_nursery() as nursery:
        tasks = TreeTasks()
        tasks.bind(nursery)
        yield tasks
        nursery.cancel_scope.cancel()


def merged_usr_image() -> tuple[MergedTree, PrefetchRecordingSource]:
    """A Debian-like merged-/usr tree: /lib and /lib64 are symlinks, ld.so is reached through two of them."""
    entries = [
        Entry("", T.DIR, 0o755),
        Entry("usr", T.DIR, 0o755),
        Entry("usr/bin", T.DIR, 0o755),
        Entry("usr/lib", T.DIR, 0o755),
        Entry(MULTIARCH, T.DIR, 0o755),
        Entry("usr/lib64", T.DIR, 0o755),
        Entry("etc", T.DIR, 0o755),
        Entry("lib", T.SYMLINK, 0o777, link_target="usr/lib"),
        Entry("lib64", T.SYMLINK, 0o777, link_target="usr/lib64"),
        Entry(
            "usr/lib64/ld-linux-x86-64.so.2",
            T.SYMLINK,
            0o777,
            link_target="/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        ),
    ]
    data = {}
    for path, host in HOST_FILES.items():
        content = Path(host).read_bytes()
        entries.append(Entry(path, T.FILE, 0o755, size=len(content)))
        data[0, path] = content
    return MergedTree.build([entries]), PrefetchRecordingSource(data)


def test_resolve_follows_symlinks_in_every_component() -> None:
    """/lib64/ld-linux... resolves through lib64 -> usr/lib64 and an absolute link through lib -> usr/lib."""
    tree, _ = merged_usr_image()
    node = tree.resolve("lib64/ld-linux-x86-64.so.2")
    assert node is not None and node.entry.path == f"{MULTIARCH}/ld-linux-x86-64.so.2"
    assert tree.resolve("/lib/x86_64-linux-gnu/libc.so.6") is tree.lookup(f"{MULTIARCH}/libc.so.6")
    assert tree.resolve("lib/../../../usr/bin/true") is tree.lookup("usr/bin/true")  # .. stops at the root
    assert tree.resolve("lib/missing.so") is None


def test_resolve_gives_up_on_symlink_loops() -> None:
    """A cycle of symlinks resolves to None instead of looping."""
    tree = MergedTree.build(
        [[Entry("a", T.SYMLINK, link_target="b"), Entry("b", T.SYMLINK, link_target="/a")]]
    )
    assert tree.resolve("a") is None


def test_running_a_program_prefetches_its_loader_and_libraries(mountpoint: Path) -> None:
    """chroot + exec of /usr/bin/true prefetches ld.so, its cache and libc (not libm), and the program runs."""
    tree, source = merged_usr_image()
    with serve(ReadOnlyOperations(tree, source), mountpoint):
        result = subprocess.run(["chroot", str(mountpoint), "/usr/bin/true"], capture_output=True, timeout=30)
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 10
        want = {f"{MULTIARCH}/ld-linux-x86-64.so.2", f"{MULTIARCH}/libc.so.6", "etc/ld.so.cache"}
        while not want <= set(source.prefetched) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert want <= set(source.prefetched)
    assert f"{MULTIARCH}/libm.so.6" not in source.prefetched
    assert len(source.prefetched) == len(set(source.prefetched)), "a library was prefetched twice"


def test_sources_without_prefetch_are_served_as_before(mountpoint: Path) -> None:
    """A content source without ``prefetch`` still runs programs (no prefetcher is attached)."""
    tree, recording = merged_usr_image()
    source = MemorySource(recording.data)
    with serve(ReadOnlyOperations(tree, source), mountpoint):
        result = subprocess.run(["chroot", str(mountpoint), "/usr/bin/true"], capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_the_first_read_of_a_large_executable_fetches_all_of_it_at_once() -> None:
    """An executable over the threshold is prefetched whole when its first read starts; small or plain files are not."""
    big = WHOLE_FILE_THRESHOLD + 1
    entries = [
        Entry("", T.DIR, 0o755),
        Entry("prog", T.FILE, 0o755, size=big),
        Entry("tiny", T.FILE, 0o755, size=100),
        Entry("data", T.FILE, 0o644, size=big),
    ]
    tree = MergedTree.build([entries])
    source = PrefetchRecordingSource({})

    async def main() -> None:
        async with tree_tasks() as tasks:
            prefetcher = LibraryPrefetcher(tree, source, tasks)
            for path in ("prog", "tiny", "data"):
                node = tree.resolve(path)
                assert node is not None
                prefetcher.before_read(node, 0)
                prefetcher.before_read(node, 0)  # a second first read: nothing more
            prog = tree.resolve("prog")
            assert prog is not None
            prefetcher.before_read(prog, 4096)
            await trio.testing.wait_all_tasks_blocked()

    trio.run(main)
    assert source.prefetched == ["prog"]


def test_the_interpreter_is_reported_before_the_dynamic_segment_is_read() -> None:
    """read_elf_deps names the interpreter as soon as the program headers are read (its callback runs first)."""
    content = Path("/usr/bin/true").read_bytes()
    events: list[str] = []

    async def read_at(offset: int, length: int) -> bytes:
        events.append(f"read {offset}")
        return content[offset : offset + length]

    def on_interpreter(deps: ElfDeps) -> None:
        events.append(f"interpreter {deps.interpreter}")

    deps = trio.run(read_elf_deps, read_at, len(content), on_interpreter)
    assert deps is not None and "libc.so.6" in deps.needed
    reported = next(i for i, e in enumerate(events) if e.startswith("interpreter /lib64/ld-linux"))
    assert reported < len(events) - 1, "the dynamic segment and its strings are read after the report"
