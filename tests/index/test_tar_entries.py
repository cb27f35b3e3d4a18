"""Tar headers as they occur in the wild, turned into entries the way containerd would apply them."""

from __future__ import annotations

import tarfile

import pytest

from index.errors import LayerFormatError, TruncatedLayer, UnsafePath
from index.model import EntryType
from index.tar_entries import TarEntryParser, normalize_path
from tests.index.conftest import file_info, make_tar, other_info


def parse(tar: bytes, piece: int = 0) -> TarEntryParser:
    """Feed ``tar`` whole or in pieces of ``piece`` bytes and finish."""
    parser = TarEntryParser("sha256:test")
    step = piece or max(len(tar), 1)
    for i in range(0, len(tar), step):
        parser.feed(tar[i : i + step])
    parser.finish()
    return parser


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a/b", "a/b"),
        ("/etc/passwd", "etc/passwd"),
        ("//etc//passwd/", "etc/passwd"),
        ("./a/./b", "a/b"),
        ("../../etc/shadow", "etc/shadow"),
        ("a/../../b", "b"),
        ("a/b/..", "a"),
        ("./", ""),
        ("/", ""),
        ("..", ""),
    ],
)
def test_paths_never_escape_the_root(name: str, expected: str) -> None:
    """Absolute paths become relative and `..` stops at the layer root, as containerd's RootPath does."""
    assert normalize_path(name) == expected


def test_entry_kinds_and_attributes_are_kept() -> None:
    """Every entry type maps to its EntryType with mode bits, owners, device numbers and link targets."""
    tar = make_tar(
        [
            other_info("./", tarfile.DIRTYPE, mode=0o755),
            other_info("bin", tarfile.DIRTYPE, mode=0o1777),
            file_info("bin/su", b"#!", mode=0o4755, uid=1, gid=2, uname="u", gname="g"),
            other_info("bin/sh", tarfile.SYMTYPE, linkname="../usr/bin/dash"),
            other_info("bin/su2", tarfile.LNKTYPE, linkname="./bin/su"),
            other_info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3),
            other_info("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0),
            other_info("run/fifo", tarfile.FIFOTYPE),
            file_info("etc/.wh.gone"),
            file_info("etc/.wh..wh..opq"),
        ]
    )
    entries = {e.path: e for e in parse(tar).entries}
    assert entries[""].type is EntryType.DIR
    assert entries["bin"].mode == 0o1777
    su = entries["bin/su"]
    assert (su.type, su.mode, su.uid, su.gid, su.uname, su.gname, su.size) == (
        EntryType.FILE,
        0o4755,
        1,
        2,
        "u",
        "g",
        2,
    )
    assert tar[su.data_offset : su.data_offset + 2] == b"#!"
    assert entries["bin/sh"].link_target == "../usr/bin/dash"
    assert (entries["bin/su2"].type, entries["bin/su2"].link_target) == (EntryType.HARDLINK, "bin/su")
    assert (entries["dev/null"].type, entries["dev/null"].devmajor, entries["dev/null"].devminor) == (
        EntryType.CHAR,
        1,
        3,
    )
    assert entries["dev/sda"].type is EntryType.BLOCK
    assert entries["run/fifo"].type is EntryType.FIFO
    assert {"etc/.wh.gone", "etc/.wh..wh..opq"} <= entries.keys()


def test_pax_xattrs_mtime_and_long_names() -> None:
    """PAX records give raw xattr bytes (security.capability), nanosecond mtimes, long paths and big ids."""
    cap = "\x01\x00\x00\x02\x00\x20\x00\x00\udcff\udc80"  # not UTF-8: tarfile writes it as raw bytes
    info, data = file_info("d/" + "ü" * 120, b"x", uid=3_000_000)
    info.pax_headers = {
        "SCHILY.xattr.security.capability": cap,
        "SCHILY.xattr.user.a": "b",
        "mtime": "1700000000.123456789",
    }
    entry = parse(make_tar([(info, data)], tarfile.PAX_FORMAT)).entries[0]
    assert entry.path == "d/" + "ü" * 120
    assert entry.xattrs == {
        "security.capability": b"\x01\x00\x00\x02\x00\x20\x00\x00\xff\x80",
        "user.a": b"b",
    }
    assert entry.mtime_ns == 1_700_000_000_123_456_789
    assert entry.uid == 3_000_000


def test_gnu_long_names_and_links() -> None:
    """GNU `L`/`K` headers supply long names and long link targets, in any piece size."""
    long = "/".join(["directory"] * 30)
    tar = make_tar(
        [file_info(long, b"abc"), other_info(long + "2", tarfile.SYMTYPE, linkname="t" * 300)],
        tarfile.GNU_FORMAT,
    )
    for piece in (0, 1, 100, 512):
        entries = parse(tar, piece).entries
        assert [e.path for e in entries] == [long, long + "2"]
        assert entries[1].link_target == "t" * 300
        assert tar[entries[0].data_offset : entries[0].data_offset + 3] == b"abc"


def test_pax_global_headers_apply_to_later_entries() -> None:
    """A global PAX header sets defaults that a local header overrides."""
    info, data = file_info("a", b"1")
    info.pax_headers = {"uname": "local"}
    g = tarfile.TarInfo("global")
    g.type = tarfile.XGLTYPE
    payload = b"17 uname=globalu\n"
    g.size = len(payload)
    tar = make_tar([(g, payload), (info, data), file_info("b", b"2")])
    entries = parse(tar).entries
    assert [(e.path, e.uname) for e in entries] == [("a", "local"), ("b", "globalu")]


def test_layer_without_end_blocks_is_accepted() -> None:
    """A stream that stops right after a complete entry (umoci 0.4 layers) is a valid layer."""
    tar = make_tar([file_info("a", b"x" * 700), other_info("d", tarfile.DIRTYPE)])
    assert [e.path for e in parse(tar[: 512 * 4]).entries] == ["a", "d"]
    assert parse(b"").entries == []


@pytest.mark.parametrize("cut", [100, 512, 512 + 300, 512 + 700])
def test_stream_ending_inside_an_entry_is_truncated(cut: int) -> None:
    """A stream that stops inside a header, data or padding raises TruncatedLayer naming the layer."""
    tar = make_tar([file_info("a", b"x" * 700)])
    with pytest.raises(TruncatedLayer, match="sha256:test"):
        parse(tar[:cut])


def test_hardlink_must_point_to_an_earlier_entry() -> None:
    """A hardlink to a later, missing, or directory entry is an UnsafePath naming the link."""
    later = make_tar([other_info("link", tarfile.LNKTYPE, linkname="target"), file_info("target", b"x")])
    with pytest.raises(UnsafePath, match="'link'"):
        parse(later)
    to_dir = make_tar([other_info("d", tarfile.DIRTYPE), other_info("link", tarfile.LNKTYPE, linkname="d")])
    with pytest.raises(UnsafePath):
        parse(to_dir)
    escaping = make_tar(
        [file_info("etc/passwd", b"x"), other_info("l", tarfile.LNKTYPE, linkname="../../etc/passwd")]
    )
    assert parse(escaping).entries[1].link_target == "etc/passwd"


def test_non_directory_at_the_root_is_rejected() -> None:
    """A file whose name resolves to the layer root would replace it: UnsafePath."""
    with pytest.raises(UnsafePath, match="root"):
        parse(make_tar([file_info("a/..", b"x")]))


def _header(name: bytes, size_field: bytes, kind: bytes = b"0") -> bytes:
    block = bytearray(512)
    block[0 : len(name)] = name
    block[100:108] = b"0000644\x00"
    block[124:136] = size_field
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


def test_negative_and_absurd_sizes_are_rejected() -> None:
    """A base-256 negative size or a PAX size of petabytes is a LayerFormatError naming the entry."""
    negative = _header(b"neg", b"\xff" * 12)
    with pytest.raises(LayerFormatError, match="neg"):
        parse(negative)
    info, data = file_info("huge", b"")
    info.pax_headers = {"size": str(1 << 50)}
    with pytest.raises(LayerFormatError, match="absurd"):
        parse(make_tar([(info, data)]))


def test_sparse_and_unknown_types_are_rejected() -> None:
    """GNU sparse files (type S or PAX GNU.sparse.*) and unknown type flags raise LayerFormatError."""
    with pytest.raises(LayerFormatError, match="sparse"):
        parse(_header(b"sp", b"00000000000\x00", b"S"))
    info, data = file_info("sp2", b"")
    info.pax_headers = {"GNU.sparse.major": "1"}
    with pytest.raises(LayerFormatError, match="sparse"):
        parse(make_tar([(info, data)]))
    with pytest.raises(LayerFormatError, match="unsupported type"):
        parse(_header(b"vol", b"00000000000\x00", b"V"))


def test_corrupt_header_and_oversized_extension_are_rejected() -> None:
    """A header with a bad checksum, or a PAX header larger than 1 MiB, is a LayerFormatError."""
    bad = bytearray(make_tar([file_info("a", b"x")]))
    bad[0] ^= 1
    with pytest.raises(LayerFormatError, match="invalid header"):
        parse(bytes(bad))
    with pytest.raises(LayerFormatError, match="extension header"):
        parse(_header(b"pax", b"%011o\x00" % (2 << 20), b"x"))


def test_malformed_pax_record_is_rejected() -> None:
    """A PAX record whose length does not match its text is a LayerFormatError naming the layer and header."""
    payload = b"99 path=x\n"
    block = _header(b"pax", b"%011o\x00" % len(payload), b"x")
    tar = (
        _header(b"f", b"00000000000\x00")
        + block
        + payload.ljust(512, b"\x00")
        + _header(b"g", b"00000000000\x00")
    )
    for piece in (0, 1, 700):
        with pytest.raises(LayerFormatError) as caught:
            parse(tar, piece)
        assert str(caught.value) == (
            "layer sha256:test: tar entry at byte 512: malformed PAX record at byte 0 of an extended header"
        )


def _pax_member(records: dict[str, str]) -> tuple[bytes, int]:
    """A tar of one directory, then a file ``victim`` with PAX ``records``; and the offset of its header."""
    info, data = file_info("victim", b"")
    info.pax_headers = records
    tar = make_tar([other_info("d", tarfile.DIRTYPE), (info, data)])
    return tar, next(at for at in range(0, len(tar), 512) if tar[at : at + 7] == b"victim\x00")


@pytest.mark.parametrize(
    "mtime",
    [
        "Infinity",
        "-Infinity",
        "NaN",
        "sNaN",
        "1e999999",
        "1e99999999999",
        "-1e30",
        "99999999999999999999",
        "x",
    ],
)
def test_pax_mtime_that_is_no_time_is_rejected(mtime: str) -> None:
    """An mtime that is no number, or whose seconds pass 64 bits, is a LayerFormatError naming layer, entry offset and record."""
    tar, offset = _pax_member({"mtime": mtime})
    for piece in (0, 1, 512, 700):
        with pytest.raises(LayerFormatError) as caught:
            parse(tar, piece)
        assert type(caught.value) is LayerFormatError
        assert str(caught.value).startswith(
            f"layer sha256:test: tar entry at byte {offset}: PAX record mtime={mtime.encode()!r} is "
        )


@pytest.mark.parametrize(
    ("key", "value", "complaint"),
    [
        ("size", "1e5", "PAX record size=b'1e5' is not an integer"),
        ("size", "-1", "'victim' claims an absurd size of -1 bytes"),
        ("size", "99999999999999999999999999", "'victim' claims an absurd size"),
        ("uid", "1e5", "PAX record uid=b'1e5' is not an integer"),
        ("uid", "-1", "'victim' has owner -1:0, not a Linux uid:gid"),
        ("uid", "99999999999999999999999999", "'victim' has owner 99999999999999999999999999:0"),
        ("gid", "4294967296", "'victim' has owner 0:4294967296, not a Linux uid:gid"),
    ],
)
def test_pax_numbers_that_no_file_can_have_are_rejected(key: str, value: str, complaint: str) -> None:
    """A size, uid or gid record that is no integer, negative or absurdly large is a LayerFormatError naming the entry."""
    tar, offset = _pax_member({key: value})
    for piece in (0, 1, 700):
        with pytest.raises(LayerFormatError) as caught:
            parse(tar, piece)
        assert str(caught.value).startswith(f"layer sha256:test: tar entry at byte {offset}: {complaint}")


def test_largest_linux_ids_are_kept() -> None:
    """A uid or gid up to 2**32 - 1 is a valid owner."""
    tar, _ = _pax_member({"uid": "4294967295", "gid": "65534"})
    assert (parse(tar).entries[1].uid, parse(tar).entries[1].gid) == (4294967295, 65534)


def test_negative_base_256_uid_is_rejected() -> None:
    """A standard header with a negative base-256 uid is rejected like a PAX one."""
    block = bytearray(_header(b"neg", b"00000000000\x00"))
    block[108:116] = b"\xff" * 8
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    with pytest.raises(LayerFormatError, match="'neg' has owner -1:0"):
        parse(bytes(block))


def test_a_base_256_mtime_beyond_64_bit_seconds_is_rejected() -> None:
    """A standard header whose base-256 mtime no file can have is a LayerFormatError, like such a PAX mtime."""
    block = bytearray(_header(b"future", b"00000000000\x00"))
    block[136:148] = b"\x80" + (1 << 70).to_bytes(11, "big")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    with pytest.raises(LayerFormatError, match=r"'future' has mtime \d+, beyond 64-bit seconds"):
        parse(bytes(block))
