"""Build eStargz blobs in Python, for tests that need eStargz layers without containerd.

Entries are the shared ``tests.support.image_builder.TarEntry`` (``file(...)``,
``directory(...)``, ``symlink(...)`` ...), so one entry list can become a gzip layer with
``make_layer`` or an eStargz blob with ``build_estargz``.

Written from the format description (stargz-snapshotter's docs/estargz.md, "TOC, TOCEntries
and Footer"), not from ``index/estargz.py``, so a reader test
that uses this writer checks the reader against the format rather than against itself.

Layout written::

    [gzip member: tar headers ... ][gzip member: chunk data + padding + next headers] ...
    [gzip member: tar header of stargz.index.json + TOC JSON + end of archive][footer]

Every non-empty regular file's data starts a new gzip member (unless ``min_chunk_size``
groups small files into one member, which exercises ``innerOffset``); files larger than
``chunk_size`` are split into ``reg`` + ``chunk`` TOC entries, each chunk in its own member.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import struct
import tarfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tests.support.image_builder import TarEntry, file

TOC_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENT = b"\x0f"
DEFAULT_CHUNK_SIZE = 4 << 20

# The TOC's type names for the shared entry kinds of tests.support.image_builder.
_TOC_TYPES = {"file": "reg", "dir": "dir", "symlink": "symlink", "hardlink": "hardlink"}
_TOC_TYPES |= {"char": "char", "block": "block", "fifo": "fifo"}
_TAR_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


@dataclass
class EstargzBlob:
    """A written blob with what a test needs to check a reader against it."""

    blob: bytes
    toc_json: bytes
    toc_offset: int
    tar: bytes  # the uncompressed tar stream (all members decompressed, TOC entry included)

    @property
    def toc_digest(self) -> str:
        """The value of the ``containerd.io/snapshot/stargz/toc.digest`` annotation."""
        return "sha256:" + hashlib.sha256(self.toc_json).hexdigest()

    @property
    def digest(self) -> str:
        """The blob's own digest."""
        return "sha256:" + hashlib.sha256(self.blob).hexdigest()

    @property
    def toc(self) -> dict[str, Any]:
        """The TOC as parsed JSON."""
        result: dict[str, Any] = json.loads(self.toc_json)
        return result


def gzip_member(data: bytes, level: int = 6) -> bytes:
    """One complete gzip member holding ``data``."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def footer(toc_offset: int, *, legacy: bool = False) -> bytes:
    """The footer: an empty gzip member whose Extra field carries the TOC offset (51 or 47 bytes)."""
    payload = f"{toc_offset:016x}STARGZ".encode()
    # The current form wraps the payload in an RFC 1952 subfield 'SG'; legacy CRFS did not.
    extra = payload if legacy else b"SG" + struct.pack("<H", len(payload)) + payload
    header = b"\x1f\x8b\x08\x04" + b"\x00\x00\x00\x00" + b"\x00\xff" + struct.pack("<H", len(extra))
    empty_final_stored_block = b"\x01\x00\x00\xff\xff"
    trailer = struct.pack("<II", 0, 0)  # CRC32 and ISIZE of no data
    return header + extra + empty_final_stored_block + trailer


def _xattr_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def _tar_header(entry: TarEntry) -> bytes:
    info = tarfile.TarInfo(entry.path)
    info.type = _TAR_TYPES[entry.kind]
    info.mode = _mode(entry)
    info.uid, info.gid = entry.uid, entry.gid
    info.uname, info.gname = entry.uname, entry.gname
    info.mtime = entry.mtime
    info.linkname = entry.link
    info.devmajor, info.devminor = entry.devmajor, entry.devminor
    info.size = len(entry.content) if entry.kind == "file" else 0
    pax = dict(entry.pax)
    for key, value in entry.xattrs.items():
        pax["SCHILY.xattr." + key] = _xattr_bytes(value).decode("utf-8", "surrogateescape")
    info.pax_headers = pax
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")


def _mode(entry: TarEntry) -> int:
    if entry.mode is not None:
        return entry.mode
    return 0o777 if entry.kind == "symlink" else 0o755 if entry.kind == "dir" else 0o644


def _modtime(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _toc_entry(entry: TarEntry) -> dict[str, Any]:
    kind = _TOC_TYPES[entry.kind]
    record: dict[str, Any] = {"name": entry.path, "type": kind}
    if kind == "reg":
        record["size"] = len(entry.content)
    record["modtime"] = _modtime(int(entry.mtime))
    if entry.link:
        record["linkName"] = entry.link
    record["mode"] = _mode(entry)
    record["uid"], record["gid"] = entry.uid, entry.gid
    if entry.uname:
        record["userName"] = entry.uname
    if entry.gname:
        record["groupName"] = entry.gname
    if kind in ("char", "block"):
        record["devMajor"], record["devMinor"] = entry.devmajor, entry.devminor
    if entry.xattrs:
        record["xattrs"] = {k: base64.b64encode(_xattr_bytes(v)).decode() for k, v in entry.xattrs.items()}
    if kind == "reg" and entry.content:
        record["digest"] = "sha256:" + hashlib.sha256(entry.content).hexdigest()
    return record


class _BlobWriter:
    """Accumulates gzip members; ``pending`` is the open member's uncompressed content."""

    def __init__(self) -> None:
        self.blob = bytearray()
        self.tar = bytearray()
        self.pending = bytearray()
        self.member_start = 0

    def add(self, data: bytes) -> None:
        self.pending += data
        self.tar += data

    def close_member(self) -> None:
        if self.pending:
            self.blob += gzip_member(bytes(self.pending))
        self.pending = bytearray()
        self.member_start = len(self.blob)


def build_estargz(
    entries: Iterable[TarEntry],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    min_chunk_size: int = 0,
    prefetch_count: int | None = None,
    legacy_footer: bool = False,
) -> EstargzBlob:
    """Write ``entries`` as an eStargz blob.

    Args:
        chunk_size: files larger than this are split into chunks of this size.
        min_chunk_size: files start a new gzip member only once the open member holds at
            least this many uncompressed bytes (0: every non-empty file gets its own).
        prefetch_count: put ``.prefetch.landmark`` after this many entries; 0 writes
            ``.no.prefetch.landmark`` first; None writes no landmark.
        legacy_footer: write the 47-byte CRFS footer instead of the 51-byte one.
    """
    items = list(entries)
    if prefetch_count == 0:
        items.insert(0, file(NO_PREFETCH_LANDMARK, LANDMARK_CONTENT))
    elif prefetch_count is not None:
        items.insert(prefetch_count, file(PREFETCH_LANDMARK, LANDMARK_CONTENT))

    writer = _BlobWriter()
    toc_entries: list[dict[str, Any]] = []
    for entry in items:
        writer.add(_tar_header(entry))
        record = _toc_entry(entry)
        if entry.kind != "file" or not entry.content:
            toc_entries.append(record)
            continue
        toc_entries.extend(_write_chunks(writer, entry, record, chunk_size, min_chunk_size))
        writer.add(b"\0" * (-len(entry.content) % 512))

    writer.close_member()
    toc_offset = len(writer.blob)
    toc_json = json.dumps({"version": 1, "entries": toc_entries}, indent="\t").encode()
    toc_tar = _tar_header(file(TOC_NAME, toc_json, mtime=0))
    toc_tar += toc_json + b"\0" * (-len(toc_json) % 512) + b"\0" * 1024
    writer.blob += gzip_member(toc_tar)
    writer.tar += toc_tar
    writer.blob += footer(toc_offset, legacy=legacy_footer)
    return EstargzBlob(bytes(writer.blob), toc_json, toc_offset, bytes(writer.tar))


def _write_chunks(
    writer: _BlobWriter, entry: TarEntry, first: dict[str, Any], chunk_size: int, min_chunk_size: int
) -> list[dict[str, Any]]:
    records = []
    record = first
    for start in range(0, len(entry.content), chunk_size):
        piece = entry.content[start : start + chunk_size]
        if len(writer.pending) >= min_chunk_size or start > 0:
            writer.close_member()
        record["offset"] = writer.member_start
        if writer.pending:
            record["innerOffset"] = len(writer.pending)
        if start:
            record["chunkOffset"] = start
        # The format's convention: chunkSize 0 (omitted) means "up to the end of the file",
        # used for the last chunk when it is shorter than the chunk size.
        if len(entry.content) - start >= chunk_size:
            record["chunkSize"] = len(piece)
        record["chunkDigest"] = "sha256:" + hashlib.sha256(piece).hexdigest()
        writer.add(piece)
        records.append(record)
        record = {"name": entry.path, "type": "chunk"}
    return records
