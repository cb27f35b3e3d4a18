"""A hostile entry that reached a served tree costs only itself: its requests get an errno, and the same mount
keeps serving every other entry and every other tree."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pyfuse3
import pytest

from fusefs.merged_tree import MergedTree
from fusefs.operations import ReadOnlyOperations
from index.model import Entry
from index.model import EntryType as T
from tests.fusefs.fuse_harness import MemorySource, serve

LONG_NAME = "n" * 65536  # the 64 KiB PAX name that once made a whole listing come back empty

# Entries no parser lets through any more (index.entry_limits), as a buggy or foreign tree could hold them.
HOSTILE = {
    "huge-uid": Entry("d/huge-uid", T.FILE, uid=1 << 40, size=1),
    "negative-gid": Entry("d/negative-gid", T.FILE, gid=-1, size=1),
    "huge-size": Entry("d/huge-size", T.FILE, size=1 << 64),
    "huge-device": Entry("d/huge-device", T.CHAR, devmajor=1 << 40),
}
BROKEN = Entry("d/broken-xattrs", T.FILE, xattrs=None)  # type: ignore[arg-type]  # what a bug could leave


def _trees() -> tuple[MergedTree, MergedTree, MemorySource]:
    good = [Entry("", T.DIR, 0o755), Entry("d", T.DIR, 0o755), Entry("d/ok", T.FILE, 0o644, size=5)]
    bad = [
        *good,
        *HOSTILE.values(),
        Entry("d/" + LONG_NAME, T.FILE, size=1),
        BROKEN,
        Entry("d/zz-last", T.FILE, size=4),
    ]
    data = {(0, "d/ok"): b"hello", (0, "d/zz-last"): b"last"}
    return MergedTree.build([bad]), MergedTree.build([good]), MemorySource(data)


def test_a_hostile_entry_answers_an_errno_and_the_rest_is_served(
    mountpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """stat of each hostile entry fails with EOVERFLOW, the others of its directory are listed and read, and a
    second tree of the same mount is untouched."""
    bad, good, source = _trees()
    ops = ReadOnlyOperations()
    ops.add_tree("bad", bad, source)
    ops.add_tree("good", good, source)
    with caplog.at_level(logging.ERROR, logger="fusefs.operations"), serve(ops, mountpoint):
        listed = set(os.listdir(mountpoint / "bad/d"))
        assert {"ok", "zz-last"} <= listed  # listed past the entries that cannot be
        assert LONG_NAME not in listed
        for name in HOSTILE:
            with pytest.raises(OSError) as caught:
                os.stat(mountpoint / "bad/d" / name)
            assert caught.value.errno == errno.EOVERFLOW, name
        assert (mountpoint / "bad/d/ok").read_bytes() == b"hello"
        assert (mountpoint / "bad/d/zz-last").read_bytes() == b"last"
        assert (mountpoint / "good/d/ok").read_bytes() == b"hello"
        assert sorted(os.listdir(mountpoint)) == ["bad", "good"]
    assert "fuse-op-failed op=lookup" in caplog.text and "errno=EOVERFLOW" in caplog.text
    assert "entry-unservable tree=bad path=d/" + "n" * 10 in caplog.text


async def test_every_handler_turns_an_unexpected_exception_into_an_errno() -> None:
    """Handlers called directly: an attribute the kernel cannot hold is EOVERFLOW, an over-long name ENAMETOOLONG,
    a bug EIO, and each is a FUSEError, never the exception itself."""
    bad, _, source = _trees()
    ops = ReadOnlyOperations(bad, source)
    ctx = pyfuse3.RequestContext()
    assert bad.root.children is not None
    d = bad.root.children["d"]
    assert d.children is not None
    inode = {name: pyfuse3.ROOT_INODE + node.index for name, node in d.children.items()}
    for name in HOSTILE:
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await ops.getattr(inode[name], ctx)
        assert caught.value.errno == errno.EOVERFLOW, name
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await ops.lookup(pyfuse3.ROOT_INODE + d.index, os.fsencode(LONG_NAME), ctx)
    assert caught.value.errno == errno.ENAMETOOLONG
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await ops.readdir(12345, 0, None)  # type: ignore[arg-type]  # an unknown handle: its own errno, untouched
    assert caught.value.errno == errno.EBADF
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await ops.listxattr(inode["broken-xattrs"], ctx)  # AttributeError inside: a bug, not a crash
    assert caught.value.errno == errno.EIO
    assert (await ops.getattr(inode["ok"], ctx)).st_size == 5
