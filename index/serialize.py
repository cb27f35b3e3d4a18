"""The stored form of a ``LayerIndex``: compact, versioned, checksummed, and safe to load from anywhere.

Layout (little-endian)::

    magic  b"LZSNAPIX"  (8 bytes)
    u16    format version (FORMAT_VERSION)
    u16    flags (0)
    u64    body length
    32s    sha256 of the body
    body:  u32 length + zlib(JSON metadata, entries stored column by column)
           the gzip checkpoint windows, each zstd-compressed, lengths in the metadata

No pickle: indexes may come from a registry, so loading must never run code. Entries are
stored as columns (one JSON list per field) because decoding a few long lists is much faster
than decoding thousands of small objects; windows are compressed (32 KiB raw each) because
they dominate the size; zstd because it decompresses them three times faster than zlib.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import tempfile
import zlib
from typing import Any

import zstandard

from index.errors import IndexVersionError, LayerFormatError
from index.model import Chunk, Entry, EntryType, LayerFormat, LayerIndex, SeekPoint

MAGIC = b"LZSNAPIX"
FORMAT_VERSION = (
    3  # 2: windows compressed with zstd instead of zlib; 3: entries record header_offset/header_member
)
_HEADER = struct.Struct("<8sHHQ32s")
_U32 = struct.Struct("<I")
_MAX_WINDOW = 32768
_MAX_META = 1 << 30  # uncompressed metadata; a million entries need about 200 MB
_TYPES = {t.value: t for t in EntryType}
_COLUMNS = (
    *("path", "mode", "uid", "gid", "uname", "gname", "size", "mtime_ns", "link_target"),
    *("devmajor", "devminor", "data_offset", "header_member"),
)


def _meta(index: LayerIndex, window_sizes: list[int]) -> dict[str, Any]:
    entries = index.entries
    columns: dict[str, Any] = {name: [getattr(e, name) for e in entries] for name in _COLUMNS}
    # A file's header run ends where its data starts, mostly 512 or 1536 bytes before: stored as
    # that gap, the column compresses to almost nothing, where absolute offsets would add a third.
    columns["header_gap"] = [
        e.data_offset - e.header_offset if e.data_offset >= 0 else e.header_offset for e in entries
    ]
    columns["type"] = [e.type.value for e in entries]
    columns["xattrs"] = {
        str(i): {k: base64.b64encode(v).decode("ascii") for k, v in e.xattrs.items()}
        for i, e in enumerate(entries)
        if e.xattrs
    }
    columns["chunks"] = {
        str(i): [
            [c.file_offset, c.size, c.blob_offset, c.blob_end, c.inner_offset, c.digest] for c in e.chunks
        ]
        for i, e in enumerate(entries)
        if e.chunks
    }
    return {
        "media_type": index.media_type,
        "format": index.format.value,
        "digest": index.digest,
        "compressed_size": index.compressed_size,
        "diff_id": index.diff_id,
        "uncompressed_size": index.uncompressed_size,
        "span_size": index.span_size,
        "span_digests": [d.removeprefix("sha256:") for d in index.span_digests],
        "toc_digest": index.toc_digest,
        "points": [
            [p.compressed_offset, p.uncompressed_offset, p.bits, n]
            for p, n in zip(index.seek_points, window_sizes, strict=True)
        ],
        "entries": columns,
    }


def dump_index(index: LayerIndex) -> bytes:
    """Serialize ``index`` to bytes (see the module docstring for the layout); raises nothing."""
    compressor = zstandard.ZstdCompressor(level=9)
    windows = [compressor.compress(p.window) if p.window else b"" for p in index.seek_points]
    meta = zlib.compress(
        json.dumps(_meta(index, [len(w) for w in windows]), separators=(",", ":")).encode(), 6
    )
    body = b"".join([_U32.pack(len(meta)), meta, *windows])
    return _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(body), hashlib.sha256(body).digest()) + body


def load_index(data: bytes) -> LayerIndex:
    """Parse bytes written by ``dump_index``; raises IndexVersionError (other version) or LayerFormatError (corrupt)."""
    if len(data) < _HEADER.size or data[:8] != MAGIC:
        raise LayerFormatError("not a lazysnap layer index (bad magic); rebuild the index")
    _, version, _, length, checksum = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise IndexVersionError(
            f"stored layer index has format version {version}, this lazysnap reads version {FORMAT_VERSION}; "
            "discard it and rebuild the index"
        )
    body = memoryview(data)[_HEADER.size :]
    if len(body) != length or hashlib.sha256(body).digest() != checksum:
        raise LayerFormatError(
            "stored layer index is corrupt (checksum mismatch); discard it and rebuild the index"
        )
    try:
        return _parse_body(body)
    except (
        ValueError,
        KeyError,
        TypeError,
        IndexError,
        zlib.error,
        struct.error,
        zstandard.ZstdError,
    ) as exc:
        # A checksummed body that still does not parse was written by a buggy or hostile producer.
        raise LayerFormatError(f"stored layer index is malformed ({exc!r}); rebuild the index") from None


def _parse_body(body: memoryview) -> LayerIndex:
    (meta_len,) = _U32.unpack_from(body)
    pos = _U32.size + meta_len
    inflater = zlib.decompressobj()
    raw = inflater.decompress(body[_U32.size : pos], _MAX_META)
    if inflater.unconsumed_tail or not inflater.eof:
        raise ValueError("metadata is larger than any real index or truncated")
    meta = json.loads(raw)
    points = []
    decompress = zstandard.ZstdDecompressor().decompress
    for coff, uoff, bits, wlen in meta["points"]:
        window = _window(decompress, body[pos : pos + wlen]) if wlen else b""
        pos += wlen
        points.append(SeekPoint(coff, uoff, bits, window))
    if pos != len(body):
        raise ValueError("trailing bytes after the windows")
    return LayerIndex(
        media_type=meta["media_type"],
        format=LayerFormat(meta["format"]),
        digest=meta["digest"],
        compressed_size=meta["compressed_size"],
        diff_id=meta["diff_id"],
        uncompressed_size=meta["uncompressed_size"],
        entries=_entries(meta["entries"]),
        seek_points=points,
        span_size=meta["span_size"],
        span_digests=["sha256:" + d for d in meta["span_digests"]],
        toc_digest=meta["toc_digest"],
    )


def _window(decompress: Any, data: memoryview) -> bytes:
    # Checked before decompressing: a hostile index must not make us allocate gigabytes.
    if not 0 < zstandard.frame_content_size(data) <= _MAX_WINDOW:
        raise ValueError("a checkpoint window is not 1..32768 bytes")
    window: bytes = decompress(data)
    return window


def _entries(cols: dict[str, Any]) -> list[Entry]:
    n = len(cols["path"])
    xattrs: list[dict[str, bytes]] = [{} for _ in range(n)]
    for i, x in cols["xattrs"].items():
        xattrs[int(i)] = {k: base64.b64decode(v) for k, v in x.items()}
    chunks: list[tuple[Chunk, ...]] = [()] * n
    for i, cs in cols["chunks"].items():
        chunks[int(i)] = tuple(Chunk(*c) for c in cs)
    types = [_TYPES[t] for t in cols["type"]]
    c = cols
    # map() over the columns calls Entry in a C loop: loading 10,000 entries is dominated by
    # dataclass construction, so avoid any per-entry Python code around it.
    columns = (
        *(c["path"], types, c["mode"], c["uid"], c["gid"], c["uname"], c["gname"], c["size"], c["mtime_ns"]),
        *(c["link_target"], xattrs, c["devmajor"], c["devminor"], c["data_offset"], chunks),
        *(_header_offsets(c["data_offset"], c["header_gap"]), c["header_member"]),
    )
    if any(len(col) != n for col in columns):
        raise ValueError("entry columns of different lengths")
    return list(map(Entry, *columns))


def _header_offsets(data_offsets: list[int], gaps: list[int]) -> list[int]:
    """Undo ``_meta``'s ``header_gap``: the offsets of the entries' header runs; raises ValueError on columns of different lengths."""
    return [data - gap if data >= 0 else gap for data, gap in zip(data_offsets, gaps, strict=True)]


def save_index(path: str | os.PathLike[str], index: LayerIndex) -> None:
    """Write ``index`` to ``path`` atomically (temp file, fsync, rename, fsync of the directory); raises OSError."""
    data = dump_index(index)
    directory = os.path.dirname(os.fspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=".index-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_index_file(path: str | os.PathLike[str]) -> LayerIndex:
    """Read and parse an index written by ``save_index``; raises OSError, IndexVersionError or LayerFormatError."""
    with open(path, "rb") as f:
        return load_index(f.read())
