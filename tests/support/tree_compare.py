"""What a lazy view and an eager view of an image must agree on: a test image's layers and a tree snapshot.

``layer_entries()`` holds every case the overlay merge must get right (whiteouts, opaque dirs,
hardlinks across directories, symlinks, a 300-byte path, unicode, xattrs, special bits, FIFOs,
devices, a file replaced by a directory and the reverse); ``snapshot(root)`` records, for every
path under a tree, everything two views of the same image must agree on.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from pathlib import Path
from typing import Any

from tests.support.image_builder import (
    TarEntry,
    block_device,
    char_device,
    directory,
    fifo,
    file,
    hardlink,
    opaque_whiteout,
    symlink,
    whiteout,
)

CAP = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)  # a valid v2 security.capability
LONG = "long/" + "a" * 120 + "/" + "b" * 120 + "/" + "c" * 53  # a 300-byte path
assert len(LONG) == 300


def layer_entries() -> list[list[TarEntry]]:
    """The three layers of the fidelity image, lowest first: every case an overlay merge must get right."""
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
    return [base, middle, top]


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
