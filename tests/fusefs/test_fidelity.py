"""The lazy view (FUSE mount of the merged tree) and the eager view (layers applied on disk) agree."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fusefs.merged_tree import MergedTree
from fusefs.operations import ReadOnlyOperations
from index.builder import build_index
from index.model import Entry, LayerFormat
from snapshotter.eager_unpack import apply_layer
from tests.fusefs.fuse_harness import serve
from tests.support.image_builder import (
    block_device,
    build_tar,
    char_device,
    directory,
    fifo,
    file,
    hardlink,
    opaque_whiteout,
    symlink,
    whiteout,
)

TAR = "application/vnd.oci.image.layer.v1.tar"
CAP = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)  # a valid v2 security.capability
LONG = "long/" + "a" * 120 + "/" + "b" * 120 + "/" + "c" * 53  # a 300-byte path
assert len(LONG) == 300


def layers() -> list[bytes]:
    base = [
        directory("etc"),
        file("etc/passwd", "root:x:0:0\n"),
        file("etc/shadow", "secret", mode=0o600, gid=42),
        directory("usr"),
        directory("usr/bin"),
        file("usr/bin/ping", b"\x7fELF" * 1000, mode=0o4755, xattrs={"security.capability": CAP}),
        file("usr/lib/libz.so", b"z" * 70_000, mode=0o2755, uid=1000, gid=1000),  # implicit usr/lib
        hardlink("etc/libz-link", "usr/lib/libz.so"),  # across directories
        symlink("abs", "/etc/passwd"),
        symlink("rel", "etc/passwd"),
        symlink("dangling", "../nowhere"),
        directory("tmp", mode=0o1777),
        fifo("run/initctl"),
        char_device("dev/null", 1, 3),
        block_device("dev/sda", 8, 0),
        file(LONG, "deep"),
        file("données/日本語.txt", "ünïcödé"),
        file("x/attrs", "a", xattrs={"user.note": "hello", "user.bin": b"\xff\x00\x01"}),
        directory("opq"),
        file("opq/old"),
        directory("opq/sub"),
        file("opq/sub/old2"),
        file("becomes_dir", "f"),
        directory("becomes_file"),
        file("becomes_file/inner", "i"),
        file("gone"),
        directory("gonedir"),
        file("gonedir/f"),
        file("t", "target to hide"),
        hardlink("tl", "t"),
        file("r", "target to replace"),
        hardlink("rl", "r"),
    ]
    middle = [
        whiteout("gone"),
        whiteout("gonedir"),
        whiteout("t"),
        directory("opq", mode=0o700),
        opaque_whiteout("opq"),
        file("opq/new", "new"),
        directory("becomes_dir", mode=0o750),
        file("becomes_dir/child", "c"),
        file("becomes_file", "now a file"),
        file("r", "replaced"),
        file("etc/passwd", "root:x:0:0:new\n", mtime=1_700_000_000.5),  # etc/ itself not in this layer
        directory("usr", mode=0o711, uid=7),
    ]
    top = [
        whiteout("tmp/nothing"),
        symlink("becomes_dir/child", "/abs/target"),
        file("etc/new/implicit", "x"),
    ]
    return [build_tar(layer) for layer in (base, middle, top)]


class TarSource:
    """File bytes read straight out of the layer tars at the offsets the index recorded."""

    def __init__(self, tars: Sequence[bytes]) -> None:
        self.tars = tars

    async def read(self, layer: int, entry: Entry, offset: int, length: int) -> bytes:
        """Return the entry's bytes from its layer's tar."""
        start = entry.data_offset + offset
        return self.tars[layer][start : start + length]


def snapshot(root: Path) -> dict[str, dict[str, Any]]:
    """Everything the two views must agree on, for every path under ``root`` (not the root itself)."""
    result: dict[str, dict[str, Any]] = {}
    inode_groups: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            info: dict[str, Any] = {
                "type": stat.S_IFMT(st.st_mode),
                "mode": stat.S_IMODE(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "mtime_ns": st.st_mtime_ns,
                "nlink": st.st_nlink,
                "xattrs": {
                    k: os.getxattr(path, k, follow_symlinks=False)
                    for k in sorted(os.listxattr(path, follow_symlinks=False))
                },
            }
            if not stat.S_ISDIR(st.st_mode):
                info["size"] = st.st_size  # a directory's size is the filesystem's business
                inode_groups.setdefault(st.st_ino, []).append(rel)
            if stat.S_ISLNK(st.st_mode):
                info["link"] = os.readlink(path)
            if stat.S_ISREG(st.st_mode):
                info["sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            result[rel] = info
    for group in inode_groups.values():
        for rel in group:
            result[rel]["same_inode_as"] = sorted(group)
    return result


def test_lazy_mount_equals_eager_unpack(tmp_path: Path, mountpoint: Path) -> None:
    """Every path has the same type, mode, owner, size, mtime, link target, xattrs, nlink, inode sharing and sha256 in both views."""
    tars = layers()
    eager = tmp_path / "eager"
    eager.mkdir()
    for tar in tars:
        apply_layer(io.BytesIO(tar), str(eager))
    tree = MergedTree.build([build_index(TAR, LayerFormat.TAR, [tar]).entries for tar in tars])
    with serve(ReadOnlyOperations(tree, TarSource(tars)), mountpoint):
        lazy_view = snapshot(mountpoint)
    eager_view = snapshot(eager)
    assert sorted(lazy_view) == sorted(eager_view)
    for path in sorted(eager_view):
        assert lazy_view[path] == eager_view[path], path
    # The interesting cases really are in the image.
    assert eager_view["rl"]["sha256"] == hashlib.sha256(b"target to replace").hexdigest()
    assert eager_view["tl"]["nlink"] == 1 and "t" not in eager_view
    assert eager_view["etc/libz-link"]["nlink"] == 2
    assert eager_view["becomes_dir/child"]["link"] == "/abs/target"
    assert sorted(p for p in eager_view if p.startswith("opq/")) == ["opq/new"]
    assert eager_view["etc/passwd"]["mtime_ns"] == 1_700_000_000_500_000_000
    assert eager_view["usr/bin/ping"]["xattrs"] == {"security.capability": CAP}
    assert LONG in eager_view and "données/日本語.txt" in eager_view
