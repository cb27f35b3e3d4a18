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
import itertools
import json
import operator
import os
import struct
import tempfile
import zlib
from typing import Any

import zstandard

from index.consistency import entry_ranges_problem
from index.entry_limits import MAX_SIZE, chunks_problem, columns_plainly_fine, entry_problem, shown
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
        index = _parse_body(body)
    except _Invalid as exc:
        raise LayerFormatError(f"stored layer index {exc}; discard it and rebuild the index") from None
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
    return index


def _no_float(text: str) -> Any:
    raise _Invalid(f"holds a number that is not an integer: {text[:40]!r}")


class _Invalid(Exception):
    """A field of a stored index that parsed but holds what no index can (message: what and where)."""


# The metadata's scalar fields and their JSON types; sizes must also be 0..MAX_SIZE.
_SCALARS: dict[str, type] = {
    **dict.fromkeys(("media_type", "format", "digest", "diff_id", "toc_digest"), str),
    **dict.fromkeys(("compressed_size", "uncompressed_size", "span_size"), int),
}

_KIND_NAMES = {str: "a string", int: "an integer from 0 to 2**63 - 1"}


def _check_meta(meta: Any) -> None:
    """Check the types and ranges of the metadata's scalar fields, seek points and span digests; raises _Invalid."""
    if type(meta) is not dict:
        raise _Invalid("is malformed: its metadata is not an object")
    for key, kind in _SCALARS.items():
        value = meta.get(key)
        fits = type(value) is str if kind is str else type(value) is int and 0 <= value <= MAX_SIZE
        if not fits:
            raise _Invalid(f"field {key} is {repr(value)[:80]}, not {_KIND_NAMES[kind]}")
    points, digests = meta.get("points"), meta.get("span_digests")
    if type(points) is not list or type(digests) is not list:
        raise _Invalid("is malformed: points or span_digests is not a list")
    for i, point in enumerate(points):
        if type(point) is not list or len(point) != 4 or {type(v) for v in point} != {int}:
            raise _Invalid(f"seek point {i} is not four integers")
        coff, uoff, bits, wlen = point
        if not (0 <= coff <= MAX_SIZE and 0 <= uoff <= MAX_SIZE and 0 <= bits <= 7 and wlen >= 0):
            raise _Invalid(f"seek point {i} {point} is out of range")
    if not all(type(d) is str for d in digests):
        raise _Invalid("is malformed: a span digest is not a string")


def _parse_body(body: memoryview) -> LayerIndex:
    (meta_len,) = _U32.unpack_from(body)
    pos = _U32.size + meta_len
    inflater = zlib.decompressobj()
    raw = inflater.decompress(body[_U32.size : pos], _MAX_META)
    if inflater.unconsumed_tail or not inflater.eof:
        raise ValueError("metadata is larger than any real index or truncated")
    # No float or NaN anywhere: the writer never writes one, and the checks count on integers.
    meta = json.loads(raw, parse_float=_no_float, parse_constant=_no_float)
    _check_meta(meta)
    points = []
    decompress = zstandard.ZstdDecompressor().decompress
    for coff, uoff, bits, wlen in meta["points"]:
        window = _window(decompress, body[pos : pos + wlen]) if wlen else b""
        pos += wlen
        points.append(SeekPoint(coff, uoff, bits, window))
    if pos != len(body):
        raise ValueError("trailing bytes after the windows")
    index = LayerIndex(
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
    problem = entry_ranges_problem(index, _entries_to_place(index, meta["entries"]))
    if problem is not None:
        raise _Invalid(f"of {index.digest}: {problem}")
    return index


def _entries_to_place(index: LayerIndex, cols: dict[str, Any]) -> list[Entry] | None:
    """The entries whose data ``entry_ranges_problem`` must place: those with chunks when the columns
    show at C speed that every other file's data lies inside the stream, else None (all of them)."""
    chunked = sorted(map(int, cols["chunks"]))
    offsets, sizes = cols["data_offset"], list(cols["size"])
    for i in chunked:
        sizes[i] = 0  # their data is in their chunks
    # Files (and, in a hostile index, anything else with a size) must start at 0 or later and end
    # within the stream; a column that says otherwise sends every entry to the exact check.
    inside = (
        min(itertools.compress(offsets, sizes), default=0) >= 0
        and max(map(operator.add, offsets, sizes), default=0) <= index.uncompressed_size
    )
    return [index.entries[i] for i in chunked] if inside else None


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
        xattrs[int(i)] = {str(k): base64.b64decode(v, validate=True) for k, v in x.items()}
    chunks: list[tuple[Chunk, ...]] = [()] * n
    for i, cs in cols["chunks"].items():
        chunks[int(i)] = tuple(
            Chunk(*c) if tuple(map(type, c)) == _CHUNK_TYPES else _bad_chunk(c) for c in cs
        )
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
    entries = list(map(Entry, *columns))
    # The whole columns at C speed first; one entry at a time only when something needs a look.
    if not columns_plainly_fine(cols):
        for entry in entries:
            _check_entry(entry)
        return entries
    # The screen does not look into xattrs and chunks, which few entries have (but every file of
    # an eStargz index): those are checked on their own, without the rest of the entry again.
    for i in map(int, cols["xattrs"]):
        _refuse(entries[i], entry_problem(entries[i]))
    for i in map(int, cols["chunks"]):
        _refuse(entries[i], chunks_problem(entries[i].chunks))
    return entries


def _refuse(entry: Entry, problem: str | None) -> None:
    """Raise _Invalid naming ``entry`` when there is a ``problem``."""
    if problem is not None:
        raise _Invalid(f"entry {shown(entry.path)} {problem}")


_CHUNK_TYPES = (int, int, int, int, int, str)
_INT_FIELDS = ("mode", "uid", "gid", "size", "mtime_ns", "devmajor", "devminor", "data_offset")
_STR_FIELDS = ("path", "uname", "gname", "link_target")


def _bad_chunk(chunk: Any) -> Chunk:
    raise _Invalid(f"chunk {shown(repr(chunk))} is not five integers and a digest")


def _check_entry(entry: Entry) -> None:
    """Check one loaded entry's types, path and fields (``index.entry_limits``); raises _Invalid."""
    # Imported here: the tar parser (tarfile, decimal) is needed only when the screen of a whole
    # index found something, not on a mount's start-up from stored indexes.
    from index.tar_entries import normalize_path

    where = f"entry {shown(entry.path) if type(entry.path) is str else repr(entry.path)[:80]}"
    for field in _INT_FIELDS:
        if type(getattr(entry, field)) is not int:
            raise _Invalid(f"{where} has {field} {getattr(entry, field)!r}, not an integer")
    for field in _STR_FIELDS:
        if type(getattr(entry, field)) is not str:
            raise _Invalid(f"{where} has {field} {getattr(entry, field)!r}, not a string")
    if "\x00" not in entry.path and normalize_path(entry.path) != entry.path:
        raise _Invalid(f"{where} has a path that is not normalized")
    if entry.type is EntryType.HARDLINK and normalize_path(entry.link_target) != entry.link_target:
        raise _Invalid(f"{where} has a hardlink target that is not a normalized path")
    _refuse(entry, entry_problem(entry) or chunks_problem(entry.chunks))


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
