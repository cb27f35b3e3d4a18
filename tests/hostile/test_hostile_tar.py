"""Hostile tar headers and PAX records: each is refused with a LayerFormatError naming the layer, the entry and
the field, or taken exactly as the eager unpack (containerd's behaviour) takes it."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest

from index.errors import LayerFormatError, UnsafePath
from snapshotter.mount.eager_unpack import apply_layer
from tests.hostile.conftest import LAYER, base256, gnu_long_name, header, parse_tar, pax, tar_layer

TOO_LONG = 1 << 16  # the 64 KiB name that once emptied a directory listing

# (case id, tar bytes, error class, pattern the message must contain after the layer and entry offset)
REFUSED: list[tuple[str, bytes, type[LayerFormatError], str]] = [
    (
        "uid-base256-2^40",
        header(b"f", uid=base256(1 << 40, 8)),
        LayerFormatError,
        r"'f' has owner 1099511627776:0",
    ),
    ("uid-base256--1", header(b"f", uid=base256(-1, 8)), LayerFormatError, r"'f' has owner -1:0"),
    (
        "gid-base256-2^32",
        header(b"f", gid=base256(1 << 32, 8)),
        LayerFormatError,
        r"'f' has owner 0:4294967296",
    ),
    (
        "size-base256-2^64",
        header(b"f", size=base256(1 << 64, 12)),
        LayerFormatError,
        r"'f' claims an absurd size",
    ),
    (
        "size-base256--1",
        header(b"f", size=base256(-1, 12)),
        LayerFormatError,
        r"'f' claims an absurd size of -1",
    ),
    (
        "mtime-base256-2^70",
        header(b"f", mtime=base256(1 << 70, 12)),
        LayerFormatError,
        r"'f' has mtime \d+, beyond 64-bit seconds",
    ),
    (
        "mtime-base256-beyond-ns",
        header(b"f", mtime=base256(1 << 62, 12)),
        LayerFormatError,
        r"'f' has mtime \d+ ns, beyond 64-bit nanoseconds",
    ),
    (
        "char-major-base256-2^40",
        header(b"dev/c", kind=b"3", devmajor=base256(1 << 40, 8)),
        LayerFormatError,
        r"'dev/c' has device major 1099511627776",
    ),
    (
        "block-major-octal-2^21-1",
        header(b"dev/b", kind=b"4", devmajor=b"7777777\0"),
        LayerFormatError,
        r"'dev/b' has device major 2097151",
    ),
    (
        "char-major-4096",
        header(b"dev/c", kind=b"3", devmajor=b"0010000\0"),
        LayerFormatError,
        r"'dev/c' has device major 4096",
    ),
    (
        "char-minor-2^20",
        header(b"dev/c", kind=b"3", devminor=base256(1 << 20, 8)),
        LayerFormatError,
        r"'dev/c' has device minor 1048576",
    ),
    (
        "char-minor--1",
        header(b"dev/c", kind=b"3", devminor=base256(-1, 8)),
        LayerFormatError,
        r"'dev/c' has device minor -1",
    ),
    # Found by the fuzzer: a device's numbers, decoded late on the fast path, raised a bare ValueError.
    (
        "char-major-not-octal",
        header(b"dev/c", kind=b"3", devmajor=b"00x0000\0"),
        LayerFormatError,
        r"invalid header",
    ),
    ("uid-not-octal", header(b"f", uid=b"00009x9\0"), LayerFormatError, r"invalid header"),
    ("mode-not-octal", header(b"f", mode=b"0000999\0"), LayerFormatError, r"invalid header"),
    ("size-not-octal", header(b"f", size=b"0000000z000\0"), LayerFormatError, r"invalid header"),
    (
        "bad-checksum",
        header(b"f")[:148] + b"0000000\0" + header(b"f")[156:],
        LayerFormatError,
        r"invalid header",
    ),
    ("pax-uid--1", pax({"uid": b"-1"}) + header(b"f"), LayerFormatError, r"'f' has owner -1:0"),
    (
        "pax-uid-2^40",
        pax({"uid": b"1099511627776"}) + header(b"f"),
        LayerFormatError,
        r"'f' has owner 1099511627776:0",
    ),
    ("pax-gid--5", pax({"gid": b"-5"}) + header(b"f"), LayerFormatError, r"'f' has owner 0:-5"),
    (
        "pax-uid-not-int",
        pax({"uid": b"0x10"}) + header(b"f"),
        LayerFormatError,
        r"PAX record uid=b'0x10' is not an integer",
    ),
    (
        "pax-size-2^64",
        pax({"size": b"18446744073709551616"}) + header(b"f"),
        LayerFormatError,
        r"'f' claims an absurd size",
    ),
    (
        "pax-size--1",
        pax({"size": b"-1"}) + header(b"f"),
        LayerFormatError,
        r"'f' claims an absurd size of -1",
    ),
    (
        "pax-mtime-1e20",
        pax({"mtime": b"1e20"}) + header(b"f"),
        LayerFormatError,
        r"PAX record mtime=b'1e20' is out of range",
    ),
    (
        "pax-mtime-beyond-ns",
        pax({"mtime": b"9000000000000000000"}) + header(b"f"),
        LayerFormatError,
        r"'f' has mtime \d+ ns, beyond 64-bit nanoseconds",
    ),
    (
        "pax-mtime-before-ns",
        pax({"mtime": b"-9300000000"}) + header(b"f"),
        LayerFormatError,
        r"'f' has mtime -\d+ ns, beyond 64-bit nanoseconds",
    ),
    (
        "pax-mtime-nan",
        pax({"mtime": b"NaN"}) + header(b"f"),
        LayerFormatError,
        r"PAX record mtime=b'NaN' is not a number",
    ),
    (
        "pax-path-64KiB",
        pax({"path": b"n" * TOO_LONG}) + header(b"f"),
        LayerFormatError,
        r"'n{300}'\.\.\. \(65536 characters\) has a path of 65536 bytes, beyond PATH_MAX",
    ),
    (
        "pax-path-component-256",
        pax({"path": b"d/" + b"n" * 256}) + header(b"f"),
        LayerFormatError,
        r"has a path component of 256 bytes, beyond NAME_MAX \(255\)",
    ),
    (
        "pax-path-component-utf8",
        pax({"path": "ü".encode() * 128}) + header(b"f"),
        LayerFormatError,
        r"has a path component of 256 bytes",
    ),
    (
        "pax-path-4096-bytes",
        pax({"path": b"/".join([b"d" * 99] * 41)[:4096]}) + header(b"f"),
        LayerFormatError,
        r"has a path of 4096 bytes, beyond PATH_MAX \(4096 including its NUL\)",
    ),
    (
        "pax-path-nul",
        pax({"path": b"a\0b"}) + header(b"f"),
        UnsafePath,
        r"entry name 'a\\x00b' contains a NUL byte",
    ),
    (
        "pax-symlink-target-4096",
        pax({"linkpath": b"t" * 4096}) + header(b"s", kind=b"2"),
        LayerFormatError,
        r"'s' has a symlink target of 4096 bytes, beyond PATH_MAX",
    ),
    (
        "pax-symlink-target-nul",
        pax({"linkpath": b"t\0t"}) + header(b"s", kind=b"2"),
        LayerFormatError,
        r"'s' has a symlink target containing a NUL byte",
    ),
    ("symlink-target-empty", header(b"s", kind=b"2"), LayerFormatError, r"'s' has an empty symlink target"),
    (
        "pax-xattr-name-256",
        pax({"SCHILY.xattr.user." + "x" * 251: b"v"}) + header(b"f"),
        LayerFormatError,
        r"'f' has xattr name 'user\.x+' \(256 bytes\)",
    ),
    (
        "pax-xattr-value-64KiB+1",
        pax({"SCHILY.xattr.user.big": b"v" * 65537}) + header(b"f"),
        LayerFormatError,
        r"'f' has xattr 'user\.big' value of 65537 bytes, beyond XATTR_SIZE_MAX",
    ),
    (
        "pax-xattr-name-empty",
        pax({"SCHILY.xattr.": b"v"}) + header(b"f"),
        LayerFormatError,
        r"'f' has xattr name '' \(0 bytes\)",
    ),
    (
        "pax-xattr-list-64KiB+",
        pax({f"SCHILY.xattr.user.{i:04d}" + "x" * 240: b"" for i in range(270)}) + header(b"f"),
        LayerFormatError,
        r"'f' has xattr names of \d+ bytes in all, beyond XATTR_LIST_MAX",
    ),
    (
        "gnu-long-name-64KiB",
        gnu_long_name(b"g" * TOO_LONG) + header(b"f"),
        LayerFormatError,
        r"has a path of 65536 bytes, beyond PATH_MAX",
    ),
    (
        "gnu-long-name-component-300",
        gnu_long_name(b"d/" + b"g" * 300) + header(b"f"),
        LayerFormatError,
        r"has a path component of 300 bytes",
    ),
    (
        "pax-payload-over-1MiB",
        header(b"p", kind=b"x", size=b"%011o\0" % ((1 << 20) + 1)),
        LayerFormatError,
        r"extension header of 1048577 bytes",
    ),
    (
        "pax-record-malformed",
        pax({"a": b"b"})[:512] + b"99 a=b\n".ljust(512, b"\0") + header(b"f"),
        LayerFormatError,
        r"malformed PAX record",
    ),
    ("dotdot-file-replaces-root", header(b"..", kind=b"0"), UnsafePath, r"would replace the layer root"),
    (
        "hardlink-to-nothing",
        header(b"h", kind=b"1", link=b"missing"),
        UnsafePath,
        r"hardlink 'h' at byte 0 points to 'missing'",
    ),
    ("sparse-gnu", header(b"f", kind=b"S"), LayerFormatError, r"'f' is a sparse file"),
]


@pytest.mark.parametrize(("tar", "error", "pattern"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_a_hostile_header_is_refused_naming_the_layer_entry_and_field(
    tar: bytes, error: type[LayerFormatError], pattern: str
) -> None:
    """The layer is refused with exactly this error class, the layer named, and the field's complaint, in any piece size."""
    for piece in (0, 1, 512):
        with pytest.raises(LayerFormatError) as caught:
            parse_tar(tar_layer(tar), piece)
        assert type(caught.value) is error
        assert str(caught.value).startswith(f"layer {LAYER}")
        assert re.search(pattern, str(caught.value)), str(caught.value)[:500]


@pytest.mark.parametrize(
    ("tar", "field", "value"),
    [
        (header(b"f", uid=base256((1 << 32) - 1, 8)), "uid", (1 << 32) - 1),
        (header(b"dev/c", kind=b"3", devmajor=b"0007777\0"), "devmajor", 4095),
        (header(b"dev/c", kind=b"3", devminor=base256((1 << 20) - 1, 8)), "devminor", (1 << 20) - 1),
        (pax({"path": b"d/" + b"n" * 255}) + header(b"f"), "path", "d/" + "n" * 255),
        (pax({"linkpath": b"t" * 4095}) + header(b"s", kind=b"2"), "link_target", "t" * 4095),
        (pax({"SCHILY.xattr.user.v": b"v" * 65536}) + header(b"f"), "xattrs", {"user.v": b"v" * 65536}),
        (pax({"mtime": b"9223372036.854775807"}) + header(b"f"), "mtime_ns", (1 << 63) - 1),
        (
            header(b"f", mode=base256(0o170755, 8)),
            "mode",
            0o755,
        ),  # type bits dropped, as chmod(mode & 0o7777)
        (header(b"d/", kind=b"5", devmajor=base256(1 << 40, 8)), "devmajor", 0),  # not a device: never read
    ],
    ids=[
        "uid-2^32-1",
        "major-4095",
        "minor-2^20-1",
        "component-255",
        "target-4095",
        "xattr-64KiB",
        "mtime-max-ns",
        "mode-type-bits",
        "dir-device-ignored",
    ],
)
def test_values_at_the_edge_of_what_linux_allows_are_kept(tar: bytes, field: str, value: object) -> None:
    """A field exactly at Linux's limit is accepted with its value (the limits are not off by one)."""
    (entry,) = parse_tar(tar_layer(tar))
    assert getattr(entry, field) == value


def _eager_paths(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (b"../../etc/passwd", {"etc", "etc/passwd"}),
        (b"a/../../b", {"b"}),
        (b"/abs/x", {"abs", "abs/x"}),
        (b"./c/./d/../e", {"c", "c/e"}),
        (b"x/../../../../..//y", {"y"}),
    ],
)
def test_dot_dot_paths_land_where_the_eager_unpack_puts_them(
    name: bytes, expected: set[str], eager_root: Path
) -> None:
    """A name climbing above the root stops at it, giving the same path in the index as on disk after the eager unpack."""
    tar = tar_layer(header(name, size=b"00000000001\0") + b"x".ljust(512, b"\0"))
    (entry,) = parse_tar(tar)
    apply_layer(io.BytesIO(tar), str(eager_root))
    assert _eager_paths(eager_root) == expected
    assert entry.path in expected and (eager_root / entry.path).read_bytes() == b"x"


def test_the_eager_unpack_fails_on_what_the_index_refuses(eager_root: Path) -> None:
    """A path component Linux cannot create fails the eager unpack too: refusing it is containerd's behaviour."""
    tar = tar_layer(pax({"path": b"n" * 256}) + header(b"f"))
    with pytest.raises(LayerFormatError):
        apply_layer(io.BytesIO(tar), str(eager_root))
    with pytest.raises(OSError, match="File name too long"):
        os.open(eager_root / ("n" * 256), os.O_CREAT | os.O_WRONLY, 0o600)
