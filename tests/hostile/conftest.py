"""Builders of hostile layer inputs: raw tar header blocks and PAX records, TOCs, stored indexes.

Each builder writes bytes exactly as given, with valid checksums where the format has them, so
a test reaches the check it means to reach instead of failing earlier on a bad checksum.
"""

from __future__ import annotations

import hashlib
import json
import struct
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from index.estargz import TOC_NAME, read_estargz_index
from index.model import Entry, LayerIndex
from index.serialize import FORMAT_VERSION, MAGIC
from index.tar_entries import TarEntryParser
from tests.fusefs.conftest import mountpoint
from tests.support.estargz_writer import EstargzBlob, footer, gzip_member

__all__ = ["mountpoint"]

LAYER = "sha256:hostile"
GZIP_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
BLOCK = 512
_DEFAULT_FIELDS = {
    "mode": b"0000644\0",
    "uid": b"0000000\0",
    "gid": b"0000000\0",
    "size": b"00000000000\0",
    "mtime": b"14540100000\0",
    "devmajor": b"0000000\0",
    "devminor": b"0000000\0",
}
_OFFSETS = {
    "mode": 100,
    "uid": 108,
    "gid": 116,
    "size": 124,
    "mtime": 136,
    "devmajor": 329,
    "devminor": 337,
}


def base256(value: int, width: int) -> bytes:
    """``value`` as a GNU base-256 numeric field of ``width`` bytes (0x80 positive, 0xff negative)."""
    body = width - 1
    if value < 0:
        return b"\xff" + (value + (1 << (8 * body))).to_bytes(body, "big")
    return b"\x80" + value.to_bytes(body, "big")


def header(name: bytes, *, kind: bytes = b"0", link: bytes = b"", **fields: bytes) -> bytes:
    """One ustar header block with ``fields`` (mode, uid, gid, size, mtime, devmajor, devminor) spelled as given."""
    block = bytearray(BLOCK)
    block[0 : len(name)] = name
    for field, value in {**_DEFAULT_FIELDS, **fields}.items():
        block[_OFFSETS[field] : _OFFSETS[field] + len(value)] = value
    block[156:157] = kind
    block[157 : 157 + len(link)] = link
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def pax(records: dict[str, bytes], kind: bytes = b"x") -> bytes:
    """A PAX extended header (``x`` local, ``g`` global) carrying ``records``, with its padded payload."""
    payload = b"".join(_record(key.encode(), value) for key, value in records.items())
    return _extension(b"././@PaxHeader", kind, payload)


def gnu_long_name(name: bytes) -> bytes:
    """A GNU ``L`` header whose payload names the next entry."""
    return _extension(b"././@LongLink", tarfile.GNUTYPE_LONGNAME, name + b"\0")


def _extension(name: bytes, kind: bytes, payload: bytes) -> bytes:
    size = b"%011o\0" % len(payload)
    return header(name, kind=kind, size=size) + payload + bytes(-len(payload) % BLOCK)


def _record(key: bytes, value: bytes) -> bytes:
    """One PAX record ``"%d %s=%s\\n"``, its length counting its own digits."""
    rest = b" " + key + b"=" + value + b"\n"
    length = len(rest) + 1
    while len(str(length)) + len(rest) != length:
        length += 1
    return str(length).encode() + rest


def tar_layer(*members: bytes) -> bytes:
    """Members followed by the end-of-archive blocks."""
    return b"".join(members) + bytes(2 * BLOCK)


def parse_tar(tar: bytes, piece: int = 0) -> list[Entry]:
    """The entries TarEntryParser gives for ``tar`` fed in pieces of ``piece`` bytes (0: at once)."""
    parser = TarEntryParser(LAYER)
    step = piece or len(tar)
    for i in range(0, len(tar), step):
        parser.feed(tar[i : i + step])
    return parser.finish()


def stored_index(meta: dict[str, Any], windows: bytes = b"") -> bytes:
    """A stored index of the current version holding ``meta`` as written, with a valid checksum."""
    raw = zlib.compress(json.dumps(meta, separators=(",", ":")).encode())
    body = struct.pack("<I", len(raw)) + raw + windows
    return struct.pack("<8sHHQ32s", MAGIC, FORMAT_VERSION, 0, len(body), hashlib.sha256(body).digest()) + body


@pytest.fixture
def eager_root(tmp_path: Path) -> Iterator[Path]:
    """An empty directory for the eager unpack to apply a layer onto."""
    root = tmp_path / "eager"
    root.mkdir()
    yield root


def with_toc(blob: EstargzBlob, toc: dict[str, Any]) -> EstargzBlob:
    """``blob`` with its TOC member replaced by one holding ``toc`` (the file data members kept)."""
    toc_json = json.dumps(toc).encode()
    info = tarfile.TarInfo(TOC_NAME)
    info.size = len(toc_json)
    member = gzip_member(info.tobuf() + toc_json + bytes(-len(toc_json) % BLOCK + 2 * BLOCK))
    data = blob.blob[: blob.toc_offset] + member + footer(blob.toc_offset)
    return EstargzBlob(data, toc_json, blob.toc_offset, b"")


async def estargz_index(blob: EstargzBlob) -> LayerIndex:
    """The index read_estargz_index gives for ``blob``, its TOC checked against its own digest."""

    async def read_range(offset: int, length: int) -> bytes:
        return blob.blob[offset : offset + length]

    return await read_estargz_index(
        read_range, len(blob.blob), digest=blob.digest, media_type=GZIP_MEDIA_TYPE, toc_digest=blob.toc_digest
    )
