"""Read an eStargz layer's own table of contents with range reads only.

An eStargz blob is a concatenation of gzip members that is still a valid ``tar.gz``::

    [member: headers][member: file data ...] ... [member: tar(stargz.index.json)][footer]

The footer (51 bytes, or 47 in the legacy CRFS form) is an empty gzip member whose Extra
field holds the TOC member's offset. The TOC JSON lists every entry and, for each non-empty
regular file, the chunks: where each chunk's gzip member starts (``offset``), where the
chunk starts in that member's output (``innerOffset``), in the file (``chunkOffset``), its
size and ``chunkDigest``. Finding it costs one range read when the TOC lies within the
speculative tail that also holds the footer, two otherwise.

Errors: ``EstargzError`` (a ``LayerFormatError``) for anything malformed, naming the layer
digest; ``UnsafePath`` for an entry that would replace the root or a hardlink to no earlier
file (paths follow ``index.tar_entries.normalize_path``, the tar parser's rules); ``DigestMismatch`` when the TOC does not match the ``toc.digest`` annotation. Reading
file bytes (decompressing a chunk's member, checking ``chunkDigest``) is ``index.reader``'s job.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import io
import json
import re
import struct
import tarfile
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from index.entry_limits import chunks_problem, entry_problem, shown
from index.errors import DigestMismatch, LayerFormatError, UnsafePath
from index.model import Chunk, Entry, EntryType, LayerFormat, LayerIndex
from index.tar_entries import normalize_path

ReadRange = Callable[[int, int], Awaitable[bytes]]

FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
TOC_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"

# The first request reads the blob's last 1/128, at least 64 KiB (the footer and the TOC of a
# layer with a few hundred files) and at most 1 MiB: a TOC grows with the number of files, and
# so does the blob (a 70 MB Debian python layer of 8,000 files has a 0.4 MB TOC), so most
# layers cost one request; a larger TOC costs exactly one more. Over-reading costs at most
# 1/128 of the blob; a second request costs a round trip.
SPECULATIVE_TAIL_FRACTION = 128
MIN_SPECULATIVE_TAIL = 64 << 10
MAX_SPECULATIVE_TAIL = 1 << 20
# Default 64 MiB (compressed and uncompressed): a 100k-file layer's TOC is ~30 MB of JSON;
# anything far beyond that is a broken or hostile blob, not a layer we want in memory.
DEFAULT_MAX_TOC_SIZE = 64 << 20

_TYPES = {
    "reg": EntryType.FILE,
    "dir": EntryType.DIR,
    "symlink": EntryType.SYMLINK,
    "hardlink": EntryType.HARDLINK,
    "char": EntryType.CHAR,
    "block": EntryType.BLOCK,
    "fifo": EntryType.FIFO,
}
_BOOKKEEPING = {TOC_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK}
_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


class EstargzError(LayerFormatError):
    """An eStargz footer or TOC is malformed or inconsistent with its blob."""


@dataclass(frozen=True, slots=True)
class EstargzLayer:
    """A layer's index plus what only eStargz knows.

    ``prefetch_count``: the first ``prefetch_count`` entries of ``index.entries`` come before
    ``.prefetch.landmark`` (the image's prioritized files); 0 when the blob carries
    ``.no.prefetch.landmark``; None without a landmark. ``prefetch_end``: the blob offset up
    to which those files' data lies (fetch ``[0, prefetch_end)`` to prefetch them), 0 if none.
    """

    index: LayerIndex
    toc_offset: int
    prefetch_count: int | None
    prefetch_end: int


def _parse_offset(payload: bytes) -> int:
    if len(payload) != 22 or payload[16:] != b"STARGZ":
        raise ValueError("no STARGZ marker")
    digits = payload[:16].decode("ascii")
    if not re.fullmatch(r"[0-9a-fA-F]{16}", digits):
        raise ValueError("offset is not 16 hex digits")
    return int(digits, 16)


def _footer_extra(data: bytes) -> bytes:
    """The Extra field of a gzip member that must be complete and decompress to nothing."""
    if len(data) < 12 or data[:3] != b"\x1f\x8b\x08" or not data[3] & 0x04:
        raise ValueError("not a gzip header with an Extra field")
    (xlen,) = struct.unpack_from("<H", data, 10)
    extra = data[12 : 12 + xlen]
    decoder = zlib.decompressobj(31)
    try:
        out = decoder.decompress(data)
    except zlib.error as exc:
        raise ValueError(f"not a gzip member: {exc}") from exc
    if out or not decoder.eof or decoder.unused_data:
        raise ValueError("not an empty gzip member")
    return extra


def _parse_footer_sized(data: bytes) -> int:
    extra = _footer_extra(data)
    if len(data) == FOOTER_SIZE:
        if len(extra) != 26 or extra[:2] != b"SG" or struct.unpack_from("<H", extra, 2)[0] != 22:
            raise ValueError("no 'SG' subfield of 22 bytes")
        return _parse_offset(extra[4:])
    return _parse_offset(extra)


def _footer_in(tail: bytes) -> tuple[int, int]:
    """Find the footer at the end of ``tail``: (TOC offset, footer size); ValueError if none."""
    errors = []
    for size in (FOOTER_SIZE, LEGACY_FOOTER_SIZE):
        if len(tail) < size:
            continue
        try:
            return _parse_footer_sized(tail[-size:]), size
        except ValueError as exc:
            errors.append(f"{size}-byte form: {exc}")
    raise ValueError("; ".join(errors) or "too short")


def parse_footer(data: bytes) -> int:
    """Return the TOC offset from a blob's last bytes (51-byte or legacy 47-byte footer); raises EstargzError."""
    try:
        return _footer_in(data)[0]
    except ValueError as exc:
        raise EstargzError(f"no eStargz footer: {exc}") from None


def is_estargz(tail: bytes) -> bool:
    """Tell whether ``tail`` (a blob's last 51 or more bytes) ends with an eStargz footer; never raises."""
    try:
        _footer_in(tail)
    except ValueError:
        return False
    return True


async def read_estargz_index(
    read_range: ReadRange,
    blob_size: int,
    *,
    digest: str,
    media_type: str,
    toc_digest: str | None = None,
) -> LayerIndex:
    """Read the footer and TOC of an eStargz blob into a LayerIndex; raises EstargzError, DigestMismatch."""
    layer = await read_estargz(
        read_range, blob_size, digest=digest, media_type=media_type, toc_digest=toc_digest
    )
    return layer.index


async def read_estargz(
    read_range: ReadRange,
    blob_size: int,
    *,
    digest: str,
    media_type: str,
    toc_digest: str | None = None,
    speculative_tail: int | None = None,
    max_toc_size: int = DEFAULT_MAX_TOC_SIZE,
) -> EstargzLayer:
    """Read an eStargz blob's footer and TOC (at most two range reads) into an EstargzLayer.

    Args:
        read_range: ``await read_range(offset, length)`` returns exactly those blob bytes.
        blob_size: the blob's size from its descriptor.
        digest: the blob's digest, to name the layer in errors and in the index.
        toc_digest: the ``containerd.io/snapshot/stargz/toc.digest`` annotation, if any.
        speculative_tail: how many bytes to read from the end in the first request (default:
            ``speculative_tail_for(blob_size)``).
        max_toc_size: the largest TOC accepted, compressed or uncompressed.

    Raises:
        EstargzError: no footer, a TOC outside the blob or too large, a malformed TOC.
        DigestMismatch: the TOC does not hash to ``toc_digest``.
    """
    if blob_size < LEGACY_FOOTER_SIZE:
        raise EstargzError(f"layer {digest}: {blob_size} bytes is too small for an eStargz blob")
    if speculative_tail is None:
        speculative_tail = speculative_tail_for(blob_size)
    tail_start = blob_size - min(blob_size, max(speculative_tail, FOOTER_SIZE))
    tail = await _read_exact(read_range, tail_start, blob_size - tail_start, digest)
    try:
        toc_offset, footer_size = _footer_in(tail)
    except ValueError as exc:
        raise EstargzError(f"layer {digest}: no eStargz footer ({exc}); is it a plain gzip layer?") from None
    toc_end = blob_size - footer_size
    if toc_offset >= toc_end:
        raise EstargzError(
            f"layer {digest}: TOC offset {toc_offset} lies outside the blob ({blob_size} bytes)"
        )
    if toc_end - toc_offset > max_toc_size:
        raise EstargzError(
            f"layer {digest}: TOC of {toc_end - toc_offset} compressed bytes exceeds the limit of {max_toc_size}"
        )
    if toc_offset >= tail_start:
        member = tail[toc_offset - tail_start : toc_end - tail_start]
    else:
        head = await _read_exact(read_range, toc_offset, tail_start - toc_offset, digest)
        member = head + tail[: toc_end - tail_start]
    toc_json = _toc_json(member, digest, max_toc_size)
    actual = "sha256:" + hashlib.sha256(toc_json).hexdigest()
    if toc_digest is not None and actual != toc_digest:
        raise DigestMismatch(f"TOC of layer {digest}", toc_digest, actual)
    return _build(toc_json, toc_offset, blob_size, digest, media_type, actual)


def speculative_tail_for(blob_size: int) -> int:
    """How many bytes at the end of a blob of ``blob_size`` the first request reads (see the constants)."""
    return min(MAX_SPECULATIVE_TAIL, max(MIN_SPECULATIVE_TAIL, blob_size // SPECULATIVE_TAIL_FRACTION))


async def _read_exact(read_range: ReadRange, offset: int, length: int, digest: str) -> bytes:
    data = await read_range(offset, length)
    if len(data) != length:
        raise EstargzError(f"layer {digest}: asked for {length} bytes at {offset}, got {len(data)}")
    return data


def _toc_json(member: bytes, digest: str, max_toc_size: int) -> bytes:
    """Decompress the TOC's gzip member and take ``stargz.index.json`` out of its tar."""
    decoder = zlib.decompressobj(31)
    try:
        # Bounded output: a small compressed TOC must not inflate into gigabytes.
        tar = decoder.decompress(member, max_toc_size + 4096)
    except zlib.error as exc:
        raise EstargzError(f"layer {digest}: the TOC is not a gzip member: {exc}") from None
    if decoder.unconsumed_tail:
        raise EstargzError(f"layer {digest}: the TOC inflates beyond the limit of {max_toc_size} bytes")
    if not decoder.eof or decoder.unused_data:
        raise EstargzError(f"layer {digest}: the TOC's gzip member does not end where the footer starts")
    try:
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
            info = archive.next()
            if info is None or normalize_path(info.name) != TOC_NAME or not info.isreg():
                raise EstargzError(f"layer {digest}: the TOC member holds no {TOC_NAME}")
            payload = archive.extractfile(info)
            assert payload is not None  # a regular member always has a payload
            data = payload.read()
    except tarfile.TarError as exc:
        raise EstargzError(f"layer {digest}: the TOC member is not a tar: {exc}") from None
    if len(data) != info.size:
        raise EstargzError(f"layer {digest}: {TOC_NAME} is truncated")
    return data


def parse_modtime(text: str) -> int:
    """Convert an RFC 3339 timestamp to nanoseconds since the epoch; raises ValueError."""
    match = _RFC3339.match(text)
    if not match:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    base, fraction, zone = match.groups()
    stamp = datetime.datetime.fromisoformat(base + ("+00:00" if zone == "Z" else zone))
    nanos = int((fraction or "0").ljust(9, "0"))
    return (int(stamp.timestamp()) * 1_000_000_000) + nanos


# The TOC fields read here and the JSON type each must have; integers must also be >= 0. A record
# is checked once against this table, so building its entry reads values without further checks.
_FIELD_TYPES: dict[str, type] = {
    **dict.fromkeys(("name", "type", "linkName", "modtime", "userName", "groupName", "chunkDigest"), str),
    **dict.fromkeys(
        (
            "mode",
            "uid",
            "gid",
            "size",
            "devMajor",
            "devMinor",
            "offset",
            "chunkOffset",
            "chunkSize",
            "innerOffset",
        ),
        int,
    ),
}


def _checked(record: Any) -> Mapping[str, Any]:
    """Return a TOC record whose known fields have their types; raises ValueError."""
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise ValueError(f"not a TOC entry: {record!r}")
    for key, value in record.items():
        expected = _FIELD_TYPES.get(key)
        if expected is None:
            continue
        # type() rather than isinstance(): JSON true/false are bools, which isinstance counts as ints.
        if expected is int and (type(value) is not int or value < 0):
            raise ValueError(f"{key} is not a non-negative integer: {value!r}")
        if expected is str and type(value) is not str:
            raise ValueError(f"{key} is not a string: {value!r}")
    return record


def _records(toc: Any) -> list[Mapping[str, Any]]:
    """The TOC's entry records; each is a JSON object with a string name (field types are checked as they are read)."""
    if not isinstance(toc, dict) or toc.get("version") != 1 or not isinstance(toc.get("entries"), list):
        raise ValueError("not a version 1 TOC with an entries list")
    records: list[Mapping[str, Any]] = toc["entries"]
    for record in records:
        if type(record) is not dict or type(record.get("name")) is not str:
            raise ValueError(f"not a TOC entry: {record!r}")
    return records


def _bad_field(record: Mapping[str, Any]) -> ValueError:
    """The error for a record whose fields failed the quick type check: ``_checked`` names the field."""
    try:
        _checked(record)
    except ValueError as exc:
        return exc
    return ValueError(f"malformed TOC entry: {record!r}")  # not reached: the quick check is stricter


def _normalize(name: str) -> str:
    """``normalize_path(name)``, without its work for the usual TOC name (``./usr/bin/python3``)."""
    path = (name[2:] if name.startswith("./") else name).rstrip("/")
    # No empty, "." or ".." component and no NUL: normalizing would return the path unchanged.
    if path.startswith((".", "/")) or "/." in path or "//" in path or "\x00" in path:
        return normalize_path(name)
    return path


def _xattrs(record: Mapping[str, Any]) -> dict[str, bytes]:
    raw = record.get("xattrs")
    if not raw:
        return {}
    if not isinstance(raw, dict):
        raise ValueError("xattrs is not an object")
    try:
        return {str(k): base64.b64decode(v, validate=True) for k, v in raw.items()}
    except (binascii.Error, TypeError) as exc:
        raise ValueError(f"xattr value is not base64: {exc}") from None


def _member_ends(records: list[Mapping[str, Any]], toc_offset: int) -> dict[int, int]:
    """Map each gzip member start that holds file data to the next member start (or the TOC)."""
    starts = sorted({r.get("offset", 0) for r in records if r.get("type") == "chunk" or r.get("size", 0) > 0})
    if starts and starts[-1] >= toc_offset:
        raise ValueError(f"chunk offset {starts[-1]} lies at or after the TOC ({toc_offset})")
    return dict(zip(starts, [*starts[1:], toc_offset], strict=False))


def _build(
    toc_json: bytes, toc_offset: int, blob_size: int, digest: str, media_type: str, actual: str
) -> EstargzLayer:
    try:
        records = _records(json.loads(toc_json))
        entries, prefetch_count, prefetch_end = _entries(records, toc_offset)
    except UnsafePath as exc:
        raise UnsafePath(f"layer {digest}: {exc}") from None
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
        # TypeError: a field of the wrong JSON type met before its record was checked (the member map).
        raise EstargzError(f"layer {digest}: bad TOC: {exc}") from None
    index = LayerIndex(
        media_type=media_type,
        format=LayerFormat.ESTARGZ,
        digest=digest,
        compressed_size=blob_size,
        diff_id="",  # unknown until the whole blob is decompressed
        uncompressed_size=0,
        entries=entries,
        toc_digest=actual,
    )
    return EstargzLayer(index, toc_offset, prefetch_count, prefetch_end)


def _entries(records: list[Mapping[str, Any]], toc_offset: int) -> tuple[list[Entry], int | None, int]:
    """Turn TOC records into entries, checking each field's type as it is read; raises ValueError, UnsafePath."""
    ends = _member_ends(records, toc_offset)
    entries: list[Entry] = []
    prefetch_count: int | None = None
    prefetch_end = 0
    seen: dict[str, EntryType] = {}
    modtimes: dict[str, int] = {}  # a layer's files share a few hundred distinct times
    # Where the tar headers after the last file data begin: (gzip member start, offset in the
    # output from there). The writer puts a file's headers after the previous file's data, in
    # the member that holds it, and starts the file's data in a new member (or, grouping small
    # files, at innerOffset of the same one); the first headers start the blob.
    headers_at = (0, 0)
    position = 0
    while position < len(records):
        record = records[position]
        position += 1
        path = _normalize(record["name"])
        if record.get("type") == "chunk":
            raise ValueError(f"chunk entry {record['name']!r} does not follow its file")
        if path in _BOOKKEEPING:
            if path == PREFETCH_LANDMARK:
                prefetch_count, prefetch_end = len(entries), record.get("offset", 0)
            elif path == NO_PREFETCH_LANDMARK:
                prefetch_count = 0
            size = record.get("size", 0)
            if (
                record.get("type") == "reg" and type(size) is int and size > 0
            ):  # a landmark's byte moves the headers on
                landmark, position = _file_chunks(records, position - 1, path, size, ends)
                headers_at = _after_data(landmark, size)
            continue
        kind = _TYPES.get(record.get("type", ""))
        if kind is None:
            raise ValueError(f"unknown entry type {record.get('type')!r}")
        if not path and kind is not EntryType.DIR:
            raise UnsafePath(f"entry {record['name']!r} of type {kind.value} would replace the layer root")
        get = record.get
        # One read of each field, with the type check the TOC's schema requires (JSON true and
        # false are bools: type() rather than isinstance()); a failure names the field.
        mode, uid, gid, size, major, minor = (
            get("mode", 0), get("uid", 0), get("gid", 0), get("size", 0), get("devMajor", 0), get("devMinor", 0)
        )  # fmt: skip
        link, uname, gname, modtime = (
            get("linkName", ""),
            get("userName", ""),
            get("groupName", ""),
            get("modtime", ""),
        )
        if not (
            type(mode) is type(uid) is type(gid) is type(size) is type(major) is type(minor) is int
            and type(link) is type(uname) is type(gname) is type(modtime) is str
            and min(mode, uid, gid, size, major, minor) >= 0
        ):
            raise _bad_field(record)
        if kind is EntryType.HARDLINK:
            link = normalize_path(link)
            if seen.get(link, EntryType.DIR) is EntryType.DIR:
                # As for tar layers: a hardlink may only name an earlier non-directory of this layer.
                raise UnsafePath(f"hardlink {path!r} points to {link!r}, not an earlier file")
        seen[path] = kind
        if kind is not EntryType.FILE:
            size = 0
        if kind is not EntryType.CHAR and kind is not EntryType.BLOCK:
            major = minor = 0  # as a tar header's, read only for devices (and so by the eager unpack)
        chunks: tuple[Chunk, ...] = ()
        header_member = header_offset = -1
        if size:
            chunks, position = _file_chunks(records, position - 1, path, size, ends)
            (header_member, header_offset), headers_at = headers_at, _after_data(chunks, size)
        mtime_ns = modtimes.get(modtime)
        if mtime_ns is None:
            mtime_ns = modtimes[modtime] = parse_modtime(modtime) if modtime else 0
        # Positional: this runs once per entry and keyword calls cost measurably more.
        entry = Entry(
            path, kind, mode & 0o7777, uid, gid, uname, gname, size, mtime_ns, link, _xattrs(record),
            major, minor, -1, chunks, header_offset, header_member,
        )  # fmt: skip
        # Every field against what Linux allows (index.entry_limits), the same rules as for tar.
        problem = entry_problem(entry) or chunks_problem(chunks)
        if problem is not None:
            raise ValueError(f"entry {shown(path)} {problem}")
        entries.append(entry)
    return entries, prefetch_count, prefetch_end


def _after_data(chunks: tuple[Chunk, ...], size: int) -> tuple[int, int]:
    """Where the tar stream goes on after a file of ``size`` bytes in ``chunks``: its last member, and the offset in it past the padding."""
    last = chunks[-1]
    return last.blob_offset, last.inner_offset + last.size + (-size % 512)


def _file_chunks(
    records: list[Mapping[str, Any]], first: int, path: str, size: int, ends: Mapping[int, int]
) -> tuple[tuple[Chunk, ...], int]:
    """The chunks of the file whose ``reg`` record is ``records[first]`` (it and the ``chunk`` records
    after it), and the position of the next record; raises ValueError unless they cover the file."""
    chunks: list[Chunk] = []
    covered = 0
    position = first
    while True:
        record = records[position]
        get = record.get
        start, length, offset, inner, digest = (
            get("chunkOffset", 0), get("chunkSize", 0), get("offset", 0), get("innerOffset", 0), get("chunkDigest", "")
        )  # fmt: skip
        if not (
            type(start) is type(length) is type(offset) is type(inner) is int
            and type(digest) is str
            and min(start, length, offset, inner) >= 0
        ):
            raise _bad_field(record)
        if start != covered:
            raise ValueError(f"chunk of {path!r} starts at {start}, expected {covered}")
        # chunkSize 0 means "to the end of the file" (the last or only chunk).
        length = length or size - start
        if length <= 0 or start + length > size:
            raise ValueError(f"chunk of {path!r} at {start} size {length} exceeds the file")
        chunks.append(Chunk(start, length, offset, ends[offset], inner, digest))
        covered = start + length
        position += 1
        if position == len(records) or records[position].get("type") != "chunk":
            break
        if _normalize(records[position]["name"]) != path:
            raise ValueError(f"chunk entry {records[position]['name']!r} does not follow its file")
    if covered != size:
        raise ValueError(f"the chunks of {path!r} do not cover its {size} bytes")
    return tuple(chunks), position
