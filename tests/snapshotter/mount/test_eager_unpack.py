"""Applying layer tars onto a directory the way containerd does, without ever leaving it."""

from __future__ import annotations

import io
import os
import stat
import struct
from pathlib import Path

import pytest

from index.errors import TruncatedLayer, UnsafePath
from snapshotter.mount.eager_unpack import apply_layer
from tests.support.image_builder import (
    TarEntry,
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

CAP = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)


def apply(root: Path, *layers: list[TarEntry]) -> None:
    for layer in layers:
        apply_layer(io.BytesIO(build_tar(layer)), str(root))


def test_whiteout_removes_lower_path(tmp_path: Path) -> None:
    """A .wh.NAME removes NAME (a whole directory too) and leaves no whiteout file behind."""
    apply(tmp_path, [file("a"), directory("d"), file("d/x"), file("keep")], [whiteout("a"), whiteout("d")])
    assert sorted(os.listdir(tmp_path)) == ["keep"]


def test_opaque_clears_lower_keeps_same_layer(tmp_path: Path) -> None:
    """An opaque marker empties the directory of lower content but keeps what its own layer wrote before it."""
    apply(
        tmp_path,
        [directory("o"), file("o/old"), directory("o/s"), file("o/s/old")],
        [file("o/s/new"), opaque_whiteout("o"), file("o/later")],
    )
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "o",
        "o/later",
        "o/s",
        "o/s/new",
    ]


def test_replacements(tmp_path: Path) -> None:
    """A directory replaces a file and a file replaces a directory with its subtree."""
    apply(
        tmp_path, [file("p"), directory("q"), file("q/inner")], [directory("p"), file("p/c"), file("q", "f")]
    )
    assert (tmp_path / "p/c").is_file() and (tmp_path / "q").read_bytes() == b"f"


def test_metadata(tmp_path: Path) -> None:
    """Owner, setuid/sticky modes, xattrs incl. security.capability, device numbers and ns mtimes (also of symlinks) are applied."""
    apply(
        tmp_path,
        [
            file(
                "ping",
                "x",
                mode=0o4755,
                uid=5,
                gid=6,
                xattrs={"security.capability": CAP, "user.a": "b"},
                mtime=1_600_000_000.25,
            ),
            directory("tmp", mode=0o1777),
            symlink("ln", "ping", mtime=1_500_000_000),
            char_device("null", 1, 3),
            fifo("fifo"),
        ],
    )
    st = os.lstat(tmp_path / "ping")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (
        0o4755,
        5,
        6,
        1_600_000_000_250_000_000,
    )
    assert os.getxattr(tmp_path / "ping", "security.capability") == CAP
    assert os.getxattr(tmp_path / "ping", "user.a") == b"b"
    assert stat.S_IMODE(os.lstat(tmp_path / "tmp").st_mode) == 0o1777
    assert os.lstat(tmp_path / "ln").st_mtime_ns == 1_500_000_000_000_000_000
    null = os.lstat(tmp_path / "null")
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)


def test_directory_times_set_after_contents(tmp_path: Path) -> None:
    """A directory keeps its own mtime although entries were created in it afterwards, and a later layer writing into it without listing it leaves its time alone."""
    apply(tmp_path, [directory("d", mtime=1_000_000_000), file("d/a"), file("d/b")], [file("d/c")])
    assert os.lstat(tmp_path / "d").st_mtime_ns == 1_000_000_000_000_000_000


def test_hardlinks_share_inode(tmp_path: Path) -> None:
    """A hardlink across directories is the same inode as its target."""
    apply(tmp_path, [file("a/f", "data"), hardlink("b/g", "a/f")])
    assert os.lstat(tmp_path / "a/f").st_ino == os.lstat(tmp_path / "b/g").st_ino
    assert os.lstat(tmp_path / "b/g").st_nlink == 2


def test_symlinked_parent_stays_inside_root(tmp_path: Path) -> None:
    """An entry under an absolute or ../ symlink lands inside the target root, never outside it."""
    root = tmp_path / "root"
    root.mkdir()
    apply(
        root,
        [
            symlink("evil", "/"),
            symlink("up", "../../.."),
            file("evil/escaped1", "x"),
            file("up/escaped2", "y"),
        ],
    )
    assert (root / "escaped1").read_bytes() == b"x" and (root / "escaped2").read_bytes() == b"y"
    assert sorted(os.listdir(tmp_path)) == ["root"]


def test_dotdot_names_are_clamped_at_root(tmp_path: Path) -> None:
    """A ../ name can't leave the root: it stops there, as containerd's RootPath does."""
    root = tmp_path / "root"
    root.mkdir()
    apply(root, [file("../../outside", "x")])
    assert (root / "outside").exists() and sorted(os.listdir(tmp_path)) == ["root"]


def test_symlink_loop_is_unsafe(tmp_path: Path) -> None:
    """A parent that is a symlink loop is rejected with UnsafePath."""
    with pytest.raises(UnsafePath):
        apply(tmp_path, [symlink("a", "b"), symlink("b", "a"), file("a/x")])


def test_truncated_tar_is_reported(tmp_path: Path) -> None:
    """A stream that ends inside an entry's data raises TruncatedLayer."""
    tar = build_tar([file("big", b"x" * 5000)])
    with pytest.raises(TruncatedLayer):
        apply_layer(io.BytesIO(tar[:3000]), str(tmp_path))
