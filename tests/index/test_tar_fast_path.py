"""The tar parser's fast path (headers decoded where they lie in a fed piece) changes nothing.

Fed one byte at a time, ``TarEntryParser`` never sees a whole header inside a piece, so every
header takes the general path (``parse_header``, the buffering state machine). Fed whole, or
in pieces of any other size, it must give the same entries, or fail with the same error.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from index.errors import LayerFormatError
from index.model import Entry, EntryType
from index.tar_entries import TarEntryParser
from index.tar_header import BLOCK, padded

Outcome = tuple[list[Entry], type[Exception] | None, str]


def outcome(tar: bytes, piece: int) -> Outcome:
    """Feed ``tar`` in pieces of ``piece`` bytes and finish: the entries so far, and the error if any."""
    parser = TarEntryParser("sha256:test")
    try:
        for i in range(0, len(tar), piece):
            parser.feed(tar[i : i + piece])
        parser.finish()
    except LayerFormatError as exc:
        return parser.entries, type(exc), str(exc)
    return parser.entries, None, ""


def general(tar: bytes) -> Outcome:
    """The outcome of the general path alone."""
    return outcome(tar, 1)


def member(info: tarfile.TarInfo, data: bytes = b"", fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """``info`` as Python's tarfile writes it in format ``fmt`` (with extension headers), then ``data``."""
    info.size = len(data)
    return info.tobuf(fmt, "utf-8", "surrogateescape") + data.ljust(padded(len(data)), b"\0")


def info(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    """A member ``name`` of type ``kind`` with extra TarInfo attributes."""
    result = tarfile.TarInfo(name)
    result.type = kind
    result.mtime = 1_700_000_000
    for key, value in attrs.items():
        setattr(result, key, value)
    return result


def raw_header(
    name: bytes,
    *,
    kind: bytes = b"0",
    size: bytes = b"00000000000\0",
    mode: bytes = b"0000644\0",
    magic: bytes = b"ustar\x0000",
    prefix: bytes = b"",
    signed: bool = False,
) -> bytes:
    """A header block spelled as ``tarfile`` would not write it; ``signed``: summed as signed chars."""
    block = bytearray(BLOCK)
    block[0 : len(name)] = name
    block[100:108] = mode
    block[108:124] = b"0001750\x000001750\x00"
    block[124:136] = size
    block[136:148] = b"14540100000\0"
    block[156:157] = kind
    block[257:265] = magic
    block[345 : 345 + len(prefix)] = prefix
    block[148:156] = b" " * 8
    total = sum(struct.unpack("512b", block)) if signed else sum(block)
    block[148:156] = b"%06o\0 " % total
    return bytes(block)


def rich_tar() -> bytes:
    """A layer of every kind of header the parser knows, as writers spell them and as they rarely do."""
    pax_file = info("p/" + "ü" * 120, uid=3_000_000)
    pax_file.pax_headers = {"SCHILY.xattr.security.capability": "\x01\x00\udcff", "mtime": "1700000000.5"}
    timed = info("p/timed")
    timed.pax_headers = {"mtime": "1700000001.123456789", "atime": "1700000002"}
    global_header = info("global", tarfile.XGLTYPE)
    records = b"20 uname=globaluser\n"
    return b"".join(
        [
            member(info("./", tarfile.DIRTYPE, mode=0o755)),
            member(info("a/" + "x" * 150), b"y" * 700),  # GNU long name
            member(info("s", tarfile.SYMTYPE, linkname="t" * 300)),  # GNU long link
            member(info("h", tarfile.LNKTYPE, linkname="a/" + "x" * 150)),
            member(info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3)),
            member(info("run/fifo", tarfile.FIFOTYPE)),
            *(member(info(f"sizes/{n}"), b"z" * n) for n in (0, 1, 511, 512, 513)),
            member(pax_file, b"0123456789", tarfile.PAX_FORMAT),
            member(timed, b"t", tarfile.PAX_FORMAT),
            member(
                info("p/" + "/".join(["long" * 50] * 4)), b"", tarfile.PAX_FORMAT
            ),  # a payload of two blocks (components within NAME_MAX)
            member(info("u/" + "d" * 120 + "/file"), b"u", tarfile.USTAR_FORMAT),  # a name prefix
            raw_header(b"v7file", magic=bytes(8), size=b"00000000003\0") + b"v7!".ljust(BLOCK, b"\0"),
            raw_header(b"olddir/", kind=b"\0"),
            raw_header(b"spaced", mode=b" 000755 ", size=b"          2 ") + b"sp".ljust(BLOCK, b"\0"),
            raw_header(b"big", size=b"\x80" + bytes(10) + b"\x05") + b"12345".ljust(BLOCK, b"\0"),
            raw_header(b"caf\xe9", signed=True),
            raw_header(b"contiguous", kind=b"7"),
            raw_header(b"name", prefix=b"prefixed/dir"),
            member(global_header, records, tarfile.PAX_FORMAT),
            member(info("after/global"), b"g"),
            bytes(2 * BLOCK),
        ]
    )


RICH = rich_tar()


def test_the_rich_tar_covers_what_it_should() -> None:
    """The rich tar decodes to the entries its writers meant (so the comparisons below test something)."""
    entries, error, _ = outcome(RICH, len(RICH))
    assert error is None
    by_path = {e.path: e for e in entries}
    assert by_path[""].type is EntryType.DIR
    assert by_path["a/" + "x" * 150].size == 700
    assert by_path["s"].link_target == "t" * 300
    assert by_path["h"].link_target == "a/" + "x" * 150
    assert (by_path["dev/null"].devmajor, by_path["dev/null"].devminor) == (1, 3)
    pax = by_path["p/" + "ü" * 120]
    assert (pax.uid, pax.mtime_ns, pax.xattrs) == (
        3_000_000,
        1_700_000_000_500_000_000,
        {"security.capability": b"\x01\x00\xff"},
    )
    assert by_path["p/timed"].mtime_ns == 1_700_000_001_123_456_789
    assert "p/" + "/".join(["long" * 50] * 4) in by_path
    assert by_path["u/" + "d" * 120 + "/file"].size == 1
    assert by_path["v7file"].size == 3
    assert by_path["olddir"].type is EntryType.DIR
    assert (by_path["spaced"].mode, by_path["spaced"].size) == (0o755, 2)
    assert by_path["big"].size == 5
    assert "caf\udce9" in by_path
    assert by_path["contiguous"].type is EntryType.FILE
    assert "prefixed/dir/name" in by_path
    assert by_path["after/global"].uname == "globaluser"


@pytest.mark.parametrize("piece", [2, 7, 100, 511, 512, 513, 1023, 1024, 4096, 64 << 10])
def test_any_piece_size_gives_what_the_general_path_gives(piece: int) -> None:
    """Pieces of any size, cutting headers, payloads and data anywhere, give the general path's entries."""
    assert outcome(RICH, piece) == general(RICH)


def test_a_cut_at_any_byte_of_headers_and_payloads_changes_nothing() -> None:
    """Two pieces, cut at any byte of a GNU long name, a two-block PAX payload or the headers around them."""
    tar = b"".join(
        [
            member(info("g/" + "n" * 200), b"data"),
            member(info("p/" + "/".join(["q" * 200] * 3)), b"", tarfile.PAX_FORMAT),
            member(info("plain"), b"x"),
        ]
    )
    expected = general(tar)
    assert len(expected[0]) == 3
    for cut in range(len(tar) + 1):
        parser = TarEntryParser("sha256:test")
        parser.feed(tar[:cut])
        parser.feed(tar[cut:])
        assert (parser.finish(), None, "") == expected, cut


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small tree of long names, a hardlink, a symlink, a fifo and odd file sizes."""
    root = tmp_path_factory.mktemp("tree")
    deep = root / ("d" * 90) / ("e" * 90)
    deep.mkdir(parents=True)
    for size in (0, 1, 511, 512, 513, 3000):
        (deep / f"{'f' * 60}-{size}").write_bytes(b"x" * size)
    os.link(deep / f"{'f' * 60}-513", root / "hard")
    (root / "sym").symlink_to("l" * 150)
    os.mkfifo(root / "fifo")
    return root


@pytest.mark.parametrize("fmt", ["gnu", "oldgnu", "posix", "ustar", "v7"])
def test_gnu_tar_in_every_format_parses_as_in_the_general_path(tree: Path, fmt: str) -> None:
    """What GNU tar writes, in each of its formats, gives the general path's entries in pieces of any size."""
    if shutil.which("tar") is None:
        pytest.skip("no tar")
    written = subprocess.run(
        ["tar", f"--format={fmt}", "-C", str(tree), "-cf", "-", "."], capture_output=True, check=False
    )
    tar = written.stdout  # ustar and v7 refuse some names (exit status 2) and write the rest
    assert len(general(tar)[0]) >= 4
    for piece in (7, 512, 513, len(tar)):
        assert outcome(tar, piece) == general(tar)


def test_no_view_of_the_fed_buffer_is_kept() -> None:
    """Entries hold their own bytes and strings: the caller may reuse its buffer after each feed."""
    parser = TarEntryParser("sha256:test")
    buffer = bytearray(64 << 10)
    for i in range(0, len(RICH), len(buffer)):
        piece = RICH[i : i + len(buffer)]
        buffer[: len(piece)] = piece
        parser.feed(memoryview(buffer)[: len(piece)])
        buffer[:] = b"\xff" * len(buffer)
    assert (parser.finish(), None, "") == general(RICH)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    damage=st.lists(st.tuples(st.integers(0, len(RICH) - 1), st.integers(1, 255)), min_size=1, max_size=3),
    piece=st.sampled_from([7, 512, 1000, len(RICH)]),
)
def test_damaged_headers_fail_as_in_the_general_path(damage: list[tuple[int, int]], piece: int) -> None:
    """With any bytes flipped, the same entries come before the same error, naming the same byte offset."""
    tar = bytearray(RICH)
    for where, xor in damage:
        tar[where] ^= xor
    assert outcome(bytes(tar), piece) == general(bytes(tar))


def test_a_corrupt_header_is_named_by_its_offset() -> None:
    """A bad checksum fails at that header, with the offset and the entries before it, in pieces or whole."""
    tar = bytearray(RICH)
    link_header = len(member(info("./", tarfile.DIRTYPE))) + len(member(info("a/" + "x" * 150), b"y" * 700))
    tar[link_header + 5] ^= 1  # in the name of the long-link header of "s", the third member
    result = outcome(bytes(tar), len(tar))
    assert result == general(bytes(tar))
    assert [e.path for e in result[0]] == ["", "a/" + "x" * 150]
    assert result[1:] == (
        LayerFormatError,
        f"layer sha256:test: tar entry at byte {link_header}: invalid header (bad checksum)",
    )


def test_entries_are_genuine_frozen_entries() -> None:
    """What the parser builds is an Entry like any other: equal, frozen, copyable, picklable."""
    for entry in outcome(RICH, len(RICH))[0]:
        assert type(entry) is Entry
        fields = {f.name: getattr(entry, f.name) for f in dataclasses.fields(Entry)}
        assert entry == Entry(**fields)
        assert pickle.loads(pickle.dumps(entry)) == entry
        assert dataclasses.replace(entry, size=7).size == 7
        with pytest.raises(dataclasses.FrozenInstanceError):
            entry.size = 1  # type: ignore[misc]
    first, second = outcome(RICH, len(RICH))[0][:2]
    assert first.xattrs is not second.xattrs  # each entry has its own dict, as Entry(...) would give
