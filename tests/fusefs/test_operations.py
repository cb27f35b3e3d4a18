"""Real FUSE mounts of merged trees: metadata, listing, reads, errors, concurrency, forests."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import struct
import threading
from pathlib import Path

import pytest
import trio

from fusefs.merged_tree import MergedTree
from fusefs.mount import is_mounted, run_filesystem
from fusefs.operations import ReadOnlyOperations
from index.errors import DigestMismatch
from index.model import Entry
from index.model import EntryType as T
from tests.fusefs.fuse_harness import MemorySource, serve

# A valid VFS_CAP_REVISION_2 value (cap_net_bind_service, effective): the kernel checks the format.
CAP = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)
BIG = bytes(range(256)) * (5 * 4096 + 7)  # about 5 MiB, not a multiple of any page size


def image() -> tuple[MergedTree, MemorySource]:
    lower = [
        Entry("", T.DIR, 0o755),
        Entry("etc", T.DIR, 0o755, mtime_ns=1_600_000_000_123_456_789),
        Entry("etc/hosts", T.FILE, 0o644, uid=12, gid=34, size=5, mtime_ns=1_500_000_000_000_000_001),
        Entry("etc/gone", T.FILE, 0o600, size=3),
        Entry("bin", T.DIR, 0o755),
        Entry(
            "bin/tool",
            T.FILE,
            0o4755,
            size=4,
            xattrs={"security.capability": CAP, "user.k": b"v"},
        ),
        Entry("bin/alias", T.HARDLINK, link_target="bin/tool"),
        Entry("link", T.SYMLINK, 0o777, link_target="/etc/hosts"),
        Entry("null", T.CHAR, 0o666, devmajor=1, devminor=3),
        Entry("pipe", T.FIFO, 0o644),
        Entry("big", T.FILE, 0o644, size=len(BIG)),
    ]
    upper = [Entry("etc/.wh.gone", T.FILE), Entry("tmp", T.DIR, 0o1777)]
    data = {(0, "etc/hosts"): b"hosts", (0, "etc/gone"): b"old", (0, "bin/tool"): b"tool", (0, "big"): BIG}
    return MergedTree.build([lower, upper]), MemorySource(data)


def test_stat_fields(mountpoint: Path) -> None:
    """Type, mode (with setuid and sticky), owner, size, mtime in ns, rdev and nlink come from the entries."""
    tree, source = image()
    with serve(ReadOnlyOperations(tree, source), mountpoint):
        hosts = os.lstat(mountpoint / "etc/hosts")
        assert stat.S_ISREG(hosts.st_mode) and stat.S_IMODE(hosts.st_mode) == 0o644
        assert (hosts.st_uid, hosts.st_gid, hosts.st_size, hosts.st_mtime_ns) == (
            12,
            34,
            5,
            1_500_000_000_000_000_001,
        )
        assert os.lstat(mountpoint / "etc").st_mtime_ns == 1_600_000_000_123_456_789
        assert stat.S_IMODE(os.lstat(mountpoint / "bin/tool").st_mode) == 0o4755
        assert stat.S_IMODE(os.lstat(mountpoint / "tmp").st_mode) == 0o1777
        null = os.lstat(mountpoint / "null")
        assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
        assert stat.S_ISFIFO(os.lstat(mountpoint / "pipe").st_mode)
        link = os.lstat(mountpoint / "link")
        assert stat.S_ISLNK(link.st_mode) and link.st_size == len("/etc/hosts")
        assert os.lstat(mountpoint).st_nlink == 2 + 3  # etc, bin, tmp


def test_readdir_lists_merged_entries(mountpoint: Path) -> None:
    """Listings show the merged view without whiteouts, and a large directory lists completely across readdir calls."""
    tree, source = image()
    many = [Entry("many", T.DIR)] + [
        Entry(f"many/file-with-a-long-name-{i:05d}", T.FILE) for i in range(3000)
    ]
    big_tree = MergedTree.build([many])
    with serve(ReadOnlyOperations(tree, source), mountpoint):
        assert sorted(os.listdir(mountpoint)) == ["big", "bin", "etc", "link", "null", "pipe", "tmp"]
        assert os.listdir(mountpoint / "etc") == ["hosts"]
    with serve(ReadOnlyOperations(big_tree, MemorySource({})), mountpoint):
        names = os.listdir(mountpoint / "many")
        assert len(names) == 3000 and len(set(names)) == 3000


def test_readlink_and_xattrs(mountpoint: Path) -> None:
    """Symlink targets, xattr values (incl. security.capability) and xattr lists are served; a missing xattr is ENODATA."""
    tree, source = image()
    with serve(ReadOnlyOperations(tree, source), mountpoint):
        assert os.readlink(mountpoint / "link") == "/etc/hosts"
        tool = mountpoint / "bin/tool"
        assert os.getxattr(tool, "security.capability") == CAP
        assert os.getxattr(tool, "user.k") == b"v"
        assert sorted(os.listxattr(tool)) == ["security.capability", "user.k"]
        with pytest.raises(OSError) as info:
            os.getxattr(tool, "user.none")
        assert info.value.errno == errno.ENODATA


def test_a_tree_without_xattrs_tells_the_kernel_once(mountpoint: Path) -> None:
    """With no xattr anywhere, getxattr is unsupported for the whole mount, so the kernel stops asking."""
    tree = MergedTree.build([[Entry("", T.DIR, 0o755), Entry("f", T.FILE, 0o644, size=2)]])
    with serve(ReadOnlyOperations(tree, MemorySource({(0, "f"): b"hi"})), mountpoint):
        for _ in range(2):
            with pytest.raises(OSError) as info:
                os.getxattr(mountpoint / "f", "security.selinux")
            assert info.value.errno == errno.EOPNOTSUPP
        assert os.listxattr(mountpoint / "f") == []
        assert (mountpoint / "f").read_bytes() == b"hi"


def test_hardlinks_share_inode(mountpoint: Path) -> None:
    """Two names of a hardlink have the same st_ino, nlink 2 and the same content."""
    tree, source = image()
    with serve(ReadOnlyOperations(tree, source), mountpoint):
        a, b = os.stat(mountpoint / "bin/tool"), os.stat(mountpoint / "bin/alias")
        assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
        assert (mountpoint / "bin/alias").read_bytes() == b"tool"


def test_read_large_file(mountpoint: Path) -> None:
    """A multi-MiB file reads back byte for byte, also at odd offsets."""
    tree, source = image()
    with serve(ReadOnlyOperations(tree, source), mountpoint):
        assert hashlib.sha256((mountpoint / "big").read_bytes()).digest() == hashlib.sha256(BIG).digest()
        with open(mountpoint / "big", "rb") as file:
            file.seek(len(BIG) - 1000)
            assert file.read(5000) == BIG[-1000:]


def test_writes_are_refused(mountpoint: Path) -> None:
    """Opening for write, creating and removing fail with EROFS."""
    tree, source = image()
    with serve(ReadOnlyOperations(tree, source), mountpoint):
        for action in (
            lambda: os.open(mountpoint / "etc/hosts", os.O_RDWR),
            lambda: os.open(mountpoint / "new", os.O_WRONLY | os.O_CREAT),
            lambda: os.unlink(mountpoint / "etc/hosts"),
            lambda: os.mkdir(mountpoint / "d"),
        ):
            with pytest.raises(OSError) as info:
                action()
            assert info.value.errno == errno.EROFS


def test_source_failure_is_eio_and_logged(mountpoint: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A source error reaches the reader as EIO and is logged once with layer, path and offset."""
    tree, source = image()
    source.fail = DigestMismatch("span 3", "sha256:aa", "sha256:bb")
    with (
        caplog.at_level(logging.ERROR, logger="fusefs.operations"),
        serve(ReadOnlyOperations(tree, source), mountpoint),
    ):
        with pytest.raises(OSError) as info:
            (mountpoint / "etc/hosts").read_bytes()
        assert info.value.errno == errno.EIO
    lines = [r.getMessage() for r in caplog.records if "read-failed" in r.getMessage()]
    assert lines and "layer=0 path=etc/hosts offset=0" in lines[0]


class GatheringSource(MemorySource):
    """Holds each read until ``expected`` reads are in the source at once, and records the most seen together."""

    def __init__(self, data: dict[tuple[int, str], bytes], expected: int) -> None:
        super().__init__(data)
        self.expected = expected
        self.in_flight = 0
        self.most_in_flight = 0
        self._gathered = trio.Event()

    async def read(self, layer: int, entry: Entry, offset: int, length: int) -> bytes:
        """Wait for the others, then return the bytes; each read gives up waiting after 5 s."""
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if self.in_flight >= self.expected:
            self._gathered.set()
        try:
            # Only serialized handlers ever wait this long: then the test fails on the count, not a hang.
            with trio.move_on_after(5):
                await self._gathered.wait()
            return await super().read(layer, entry, offset, length)
        finally:
            self.in_flight -= 1


def test_concurrent_reads_overlap(mountpoint: Path) -> None:
    """Eight threads reading eight files have all eight reads in the source at once: handlers are not serialized."""
    entries = [Entry(f"f{i}", T.FILE, size=10) for i in range(8)]
    source = GatheringSource({(0, f"f{i}"): b"0123456789" for i in range(8)}, expected=8)
    with serve(ReadOnlyOperations(MergedTree.build([entries]), source), mountpoint):
        results: list[bytes] = []
        threads = [
            threading.Thread(target=lambda i=i: results.append((mountpoint / f"f{i}").read_bytes()))
            for i in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert results == [b"0123456789"] * 8
    assert source.most_in_flight == 8, (
        f"at most {source.most_in_flight} reads in flight: handlers are serialized"
    )


def test_forest_add_and_remove_trees(mountpoint: Path) -> None:
    """A forest shows each added tree as a root directory with distinct inodes, and a removed one disappears."""
    tree, source = image()
    other = MergedTree.build([[Entry("etc", T.DIR), Entry("etc/hosts", T.FILE, size=2)]])
    ops = ReadOnlyOperations()
    with serve(ops, mountpoint) as served:
        assert os.listdir(mountpoint) == []
        served.call(ops.add_tree, "one", tree, source)
        served.call(ops.add_tree, "two", other, MemorySource({(0, "etc/hosts"): b"hi"}))
        assert sorted(os.listdir(mountpoint)) == ["one", "two"]
        assert (mountpoint / "one/etc/hosts").read_bytes() == b"hosts"
        assert (mountpoint / "two/etc/hosts").read_bytes() == b"hi"
        inodes_one = {os.lstat(p).st_ino for p in (mountpoint / "one").rglob("*")}
        inodes_two = {os.lstat(p).st_ino for p in (mountpoint / "two").rglob("*")}
        assert not inodes_one & inodes_two
        with pytest.raises(ValueError):
            ops.add_tree("one", tree, source)
        served.call(ops.remove_tree, "one")
        assert os.listdir(mountpoint) == ["two"]
        assert not (mountpoint / "one").exists()


async def test_run_filesystem_unmounts_on_cancel(mountpoint: Path) -> None:
    """Cancelling run_filesystem unmounts, and the ready event fires only once the mount answers."""
    tree, source = image()
    ready = trio.Event()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: run_filesystem(ReadOnlyOperations(tree, source), str(mountpoint), ready=ready)
            )
            await ready.wait()
            assert is_mounted(str(mountpoint))
            data = await trio.to_thread.run_sync((mountpoint / "etc/hosts").read_bytes)
            assert data == b"hosts"
            nursery.cancel_scope.cancel()
    assert not is_mounted(str(mountpoint))
