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
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

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

# Default 64 KiB: covers the footer and the whole TOC of a layer with a few hundred
# files, so small layers cost one request; a larger TOC costs exactly one more.
DEFAULT_SPECULATIVE_TAIL = 64 << 10
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
    speculative_tail: int = DEFAULT_SPECULATIVE_TAIL,
    max_toc_size: int = DEFAULT_MAX_TOC_SIZE,
) -> EstargzLayer:
    """Read an eStargz blob's footer and TOC (at most two range reads) into an EstargzLayer.

    Args:
        read_range: ``await read_range(offset, length)`` returns exactly those blob bytes.
        blob_size: the blob's size from its descriptor.
        digest: the blob's digest, to name the layer in errors and in the index.
        toc_digest: the ``containerd.io/snapshot/stargz/toc.digest`` annotation, if any.
        speculative_tail: how many bytes to read from the end in the first request.
        max_toc_size: the largest TOC accepted, compressed or uncompressed.

    Raises:
        EstargzError: no footer, a TOC outside the blob or too large, a malformed TOC.
        DigestMismatch: the TOC does not hash to ``toc_digest``.
    """
    if blob_size < LEGACY_FOOTER_SIZE:
        raise EstargzError(f"layer {digest}: {blob_size} bytes is too small for an eStargz blob")
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


def _int(record: Mapping[str, Any], key: str) -> int:
    value = record.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key} is not a non-negative integer: {value!r}")
    return value


def _str(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{key} is not a string: {value!r}")
    return value


def _xattrs(record: Mapping[str, Any]) -> dict[str, bytes]:
    raw = record.get("xattrs") or {}
    if not isinstance(raw, dict):
        raise ValueError("xattrs is not an object")
    try:
        return {str(k): base64.b64decode(v, validate=True) for k, v in raw.items()}
    except (binascii.Error, TypeError) as exc:
        raise ValueError(f"xattr value is not base64: {exc}") from None


def _records(toc: Any) -> Iterator[Mapping[str, Any]]:
    if not isinstance(toc, dict) or toc.get("version") != 1 or not isinstance(toc.get("entries"), list):
        raise ValueError("not a version 1 TOC with an entries list")
    for record in toc["entries"]:
        if not isinstance(record, dict) or not isinstance(record.get("name"), str):
            raise ValueError(f"not a TOC entry: {record!r}")
        yield record


def _member_ends(records: list[Mapping[str, Any]], toc_offset: int) -> dict[int, int]:
    """Map each gzip member start that holds file data to the next member start (or the TOC)."""
    starts = sorted({_int(r, "offset") for r in records if r.get("type") == "chunk" or _int(r, "size") > 0})
    if starts and starts[-1] >= toc_offset:
        raise ValueError(f"chunk offset {starts[-1]} lies at or after the TOC ({toc_offset})")
    return dict(zip(starts, [*starts[1:], toc_offset], strict=False))


class _FileBuilder:
    """Collects a regular file's ``reg`` entry and its ``chunk`` continuation entries."""

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self.chunks: list[Chunk] = []

    def add(self, record: Mapping[str, Any], ends: Mapping[int, int]) -> None:
        start = _int(record, "chunkOffset")
        expected = self.chunks[-1].file_offset + self.chunks[-1].size if self.chunks else 0
        if start != expected:
            raise ValueError(f"chunk of {self.entry.path!r} starts at {start}, expected {expected}")
        # chunkSize 0 means "to the end of the file" (the last or only chunk).
        size = _int(record, "chunkSize") or self.entry.size - start
        if size <= 0 or start + size > self.entry.size:
            raise ValueError(f"chunk of {self.entry.path!r} at {start} size {size} exceeds the file")
        offset = _int(record, "offset")
        digest = _str(record, "chunkDigest")
        self.chunks.append(Chunk(start, size, offset, ends[offset], _int(record, "innerOffset"), digest))

    def finish(self) -> Entry:
        if self.entry.size and (
            not self.chunks or self.chunks[-1].file_offset + self.chunks[-1].size != self.entry.size
        ):
            raise ValueError(f"the chunks of {self.entry.path!r} do not cover its {self.entry.size} bytes")
        return replace(self.entry, chunks=tuple(self.chunks))


def _entry(record: Mapping[str, Any]) -> Entry:
    kind = _TYPES.get(_str(record, "type"))
    if kind is None:
        raise ValueError(f"unknown entry type {record.get('type')!r}")
    link = _str(record, "linkName")
    modtime = _str(record, "modtime")
    path = normalize_path(_str(record, "name"))
    if not path and kind is not EntryType.DIR:
        raise UnsafePath(f"entry {record['name']!r} of type {kind.value} would replace the layer root")
    return Entry(
        path=path,
        type=kind,
        mode=_int(record, "mode") & 0o7777,
        uid=_int(record, "uid"),
        gid=_int(record, "gid"),
        uname=_str(record, "userName"),
        gname=_str(record, "groupName"),
        size=_int(record, "size") if kind is EntryType.FILE else 0,
        mtime_ns=parse_modtime(modtime) if modtime else 0,
        link_target=normalize_path(link) if kind is EntryType.HARDLINK else link,
        xattrs=_xattrs(record),
        devmajor=_int(record, "devMajor"),
        devminor=_int(record, "devMinor"),
    )


def _build(
    toc_json: bytes, toc_offset: int, blob_size: int, digest: str, media_type: str, actual: str
) -> EstargzLayer:
    try:
        records = list(_records(json.loads(toc_json)))
        entries, prefetch_count, prefetch_end = _entries(records, toc_offset)
    except UnsafePath as exc:
        raise UnsafePath(f"layer {digest}: {exc}") from None
    except (ValueError, UnicodeDecodeError, KeyError) as exc:
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
    ends = _member_ends(records, toc_offset)
    entries: list[Entry] = []
    building: _FileBuilder | None = None
    prefetch_count: int | None = None
    prefetch_end = 0
    seen: dict[str, EntryType] = {}
    for record in records:
        kind = _str(record, "type")
        if kind == "chunk":
            if building is None or normalize_path(_str(record, "name")) != building.entry.path:
                raise ValueError(f"chunk entry {record['name']!r} does not follow its file")
            building.add(record, ends)
            continue
        if building is not None:
            entries.append(building.finish())
            building = None
        path = normalize_path(_str(record, "name"))
        if path in _BOOKKEEPING:
            if path == PREFETCH_LANDMARK:
                prefetch_count, prefetch_end = len(entries), _int(record, "offset")
            elif path == NO_PREFETCH_LANDMARK:
                prefetch_count = 0
            continue
        entry = _entry(record)
        if entry.type is EntryType.HARDLINK and seen.get(entry.link_target, EntryType.DIR) is EntryType.DIR:
            # As for tar layers: a hardlink may only name an earlier non-directory of this layer.
            raise UnsafePath(f"hardlink {entry.path!r} points to {entry.link_target!r}, not an earlier file")
        seen[entry.path] = entry.type
        if entry.type is EntryType.FILE and entry.size > 0:
            building = _FileBuilder(entry)
            building.add(record, ends)
        else:
            entries.append(entry)
    if building is not None:
        entries.append(building.finish())
    return entries, prefetch_count, prefetch_end
