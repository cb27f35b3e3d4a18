"""Generated hostile inputs for the three parsers, and the property each must hold, shared by the default
suite (tests/hostile/test_fuzz.py, a few hundred examples) and scripts/fuzz_parsers.py (10,000 a parser).

The property: a parser either refuses its input with a ``LazysnapError`` or returns entries that
``index.entry_limits.entry_problem`` finds nothing wrong with; any other exception is a bug.
Inputs start from honest ones and are damaged where it matters: a field of a header, a record
of a TOC, a column of a stored index replaced by a value of any JSON type or size, or bytes flipped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
import zlib
from typing import Any

import trio
from hypothesis import strategies as st

from index.builder import build_index
from index.entry_limits import chunks_problem, entry_problem
from index.errors import LazysnapError
from index.model import Entry, LayerFormat
from index.serialize import dump_index, load_index
from tests.hostile.conftest import (
    BLOCK,
    base256,
    estargz_index,
    header,
    parse_tar,
    pax,
    stored_index,
    with_toc,
)
from tests.support.estargz_writer import EstargzBlob, build_estargz
from tests.support.image_builder import directory, file, symlink

_EDGES = [
    0,
    1,
    -1,
    255,
    256,
    4095,
    4096,
    (1 << 20) - 1,
    1 << 20,
    (1 << 32) - 1,
    1 << 32,
    (1 << 63) - 1,
    1 << 63,
    1 << 64,
    -(1 << 63) - 1,
]
INTEGERS = st.one_of(st.sampled_from(_EDGES), st.integers(-(1 << 70), 1 << 70), st.integers(-3, 5000))
NAMES = st.one_of(
    st.text(max_size=20),
    st.sampled_from(
        ["..", ".", "/", "a/../..", "a//b", "./x/", "\x00", "a\x00b", "n" * 256, "d/" * 2100, "n" * 65536]
    ),
)
JSON_VALUES = st.one_of(
    INTEGERS, NAMES, st.none(), st.booleans(), st.floats(allow_nan=True), st.lists(INTEGERS, max_size=6),
    st.dictionaries(NAMES, INTEGERS, max_size=3),
)  # fmt: skip


def _check_entries(entries: list[Entry]) -> None:
    """Every entry a parser accepted must be one Linux can represent."""
    for entry in entries:
        problem = entry_problem(entry) or chunks_problem(entry.chunks)
        assert problem is None, f"accepted {entry.path[:80]!r} that {problem}"


def outcome(run: Any, value: Any) -> str:
    """Run a parser on ``value``: "accepted" or the LazysnapError's class name; anything else propagates."""
    try:
        entries = run(value)
    except LazysnapError as error:
        return type(error).__name__
    _check_entries(entries)
    return "accepted"


# -- tar -------------------------------------------------------------------------------------------

_NUMERIC = {"mode": 8, "uid": 8, "gid": 8, "size": 12, "mtime": 12, "devmajor": 8, "devminor": 8}
_PAX_KEYS = [
    "path",
    "linkpath",
    "size",
    "uid",
    "gid",
    "mtime",
    "uname",
    "SCHILY.xattr.user.a",
    "GNU.sparse.map",
    "atime",
]


@st.composite
def _numeric_field(draw: st.DrawFn, width: int) -> bytes:
    value = draw(INTEGERS)
    spelled = draw(st.sampled_from(["octal", "base256", "raw"]))
    if spelled == "octal" and 0 <= value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    if spelled == "base256" and -(1 << (8 * (width - 1) - 1)) <= value < (1 << (8 * (width - 1))):
        return base256(value, width)
    return draw(st.binary(min_size=width, max_size=width))


@st.composite
def tar_inputs(draw: st.DrawFn) -> bytes:
    """A tar of a few members with hostile numeric fields, names, types and PAX records, maybe bit-flipped."""
    members = []
    for _ in range(draw(st.integers(1, 4))):
        fields = {k: draw(_numeric_field(w)) for k, w in _NUMERIC.items() if draw(st.booleans())}
        fields.setdefault("size", b"00000000000\0")
        name = draw(st.binary(min_size=1, max_size=100))
        kind = draw(
            st.sampled_from([b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"S", b"x", b"g", b"L", b"Z"])
        )
        records = draw(
            st.dictionaries(
                st.sampled_from(_PAX_KEYS), st.binary(max_size=300) | NAMES.map(str.encode), max_size=3
            )
        )
        block = header(name, kind=kind, link=draw(st.binary(max_size=100)), **fields)
        members.append((pax(records) if records else b"") + block + bytes(draw(st.sampled_from([0, BLOCK]))))
    tar = bytearray(b"".join(members) + bytes(2 * BLOCK))
    for _ in range(draw(st.integers(0, 3))):
        tar[draw(st.integers(0, len(tar) - 1))] = draw(st.integers(0, 255))
    return bytes(tar)


def run_tar(tar: bytes) -> list[Entry]:
    """The tar parser, fed in two pieces to cross the fast and the general path."""
    return parse_tar(tar, BLOCK * 3 + 1)


# -- eStargz TOC -------------------------------------------------------------------------------------

_TOC_BASE = build_estargz(
    [directory("d/"), file("d/f", b"abc" * 3000), file("d/g", b"g"), symlink("s", "d/f")], chunk_size=4096
)
_TOC_FIELDS = ["name", "type", "mode", "uid", "gid", "size", "devMajor", "devMinor", "linkName", "modtime",
               "xattrs", "offset", "chunkOffset", "chunkSize", "innerOffset", "chunkDigest"]  # fmt: skip


@st.composite
def toc_inputs(draw: st.DrawFn) -> EstargzBlob:
    """An honest eStargz blob whose TOC records have had fields replaced by values of any type or size."""
    toc = copy.deepcopy(_TOC_BASE.toc)
    records = toc["entries"]
    for _ in range(draw(st.integers(1, 4))):
        record = records[draw(st.integers(0, len(records) - 1))]
        record[draw(st.sampled_from(_TOC_FIELDS))] = draw(JSON_VALUES)
    if draw(st.booleans()):
        records.insert(
            draw(st.integers(0, len(records))),
            draw(st.dictionaries(st.sampled_from(_TOC_FIELDS), JSON_VALUES, max_size=5)),
        )
    return with_toc(_TOC_BASE, toc)


def run_toc(blob: EstargzBlob) -> list[Entry]:
    """The eStargz footer and TOC reader on ``blob``."""
    return trio.run(estargz_index, blob).entries


# -- stored index -------------------------------------------------------------------------------------

_TAR = b"".join(
    [header(b"d/", kind=b"5"), header(b"d/a", size=b"00000001000\0") + bytes(BLOCK * 2), header(b"s", kind=b"2", link=b"d/a")]
) + bytes(2 * BLOCK)  # fmt: skip
_HONEST = dump_index(build_index("m", LayerFormat.TAR, [_TAR], span_size=512))
_BODY_AT = 52  # the fixed header of a stored index


def _honest_meta() -> dict[str, Any]:
    (length,) = struct.unpack_from("<I", _HONEST, _BODY_AT)
    meta: dict[str, Any] = json.loads(zlib.decompress(_HONEST[_BODY_AT + 4 : _BODY_AT + 4 + length]))
    meta["entries"]["chunks"] = {"1": [[0, 512, 0, 600, 0, "sha256:" + "0" * 64]]}
    meta["entries"]["xattrs"] = {"1": {"user.a": "dmFsdWU="}}
    return meta


_META = _honest_meta()


@st.composite
def stored_index_inputs(draw: st.DrawFn) -> bytes:
    """A checksummed stored index whose metadata fields or entry columns hold values of any type or size."""
    meta = copy.deepcopy(_META)
    entries, chunk, points = meta["entries"], meta["entries"]["chunks"]["1"][0], meta["points"]
    for _ in range(
        draw(st.integers(0, 4))
    ):  # damage inside first: a scalar drawn later may replace a whole part
        where = draw(st.sampled_from(["column", "point", "chunk", "xattr"]))
        if where == "column":
            column = entries[draw(st.sampled_from(sorted(entries)))]
            if isinstance(column, list) and column:
                column[draw(st.integers(0, len(column) - 1))] = draw(JSON_VALUES)
        elif where == "point":
            points[:] = draw(st.lists(st.lists(INTEGERS, min_size=3, max_size=5), max_size=3))
        elif where == "chunk":
            chunk[draw(st.integers(0, 5))] = draw(JSON_VALUES)
        else:
            entries["xattrs"]["1"] = draw(st.dictionaries(NAMES, st.text(max_size=10) | NAMES, max_size=2))
    for _ in range(draw(st.integers(0, 2))):
        meta[draw(st.sampled_from(sorted(meta)))] = draw(JSON_VALUES)
    data = bytearray(stored_index(meta))
    if draw(st.booleans()):  # damage the checksummed body itself, and sign it again
        body = bytearray(data[_BODY_AT:])
        body[draw(st.integers(0, len(body) - 1))] ^= draw(st.integers(1, 255))
        raw = bytes(body)
        data = bytearray(data[: _BODY_AT - 32] + hashlib.sha256(raw).digest() + raw)
    return bytes(data)


def run_load_index(data: bytes) -> list[Entry]:
    """The stored index loader on ``data``."""
    return load_index(data).entries
