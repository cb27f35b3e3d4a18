"""Random access to a file's bytes through a layer index, fetching only the compressed ranges needed.

The uncompressed stream of a gzip or zstd layer is cut into *spans* at its seek points; span
``i`` runs from seek point ``i`` to seek point ``i + 1`` (or the end). A read decodes the
spans it touches from their seek points, a span only as far as the read needs (fetching just
those compressed bytes), and keeps the result in a bounded LRU, so the many small files of one
span are inflated once; concurrent readers of a span share one decode. Plain tar
is sliced directly; eStargz files are read chunk by chunk, each chunk verified against its
digest. Bytes from ``read_range`` are trusted to be verified already (the blob cache checks
them against ``LayerIndex.span_digests``). Before the first bytes of a file are returned, the
tar header before them must name the file (``index.header_check``): an index that maps a file
to another's bytes fails there with ``MappingMismatch``.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
import zstandard

from index.errors import DigestMismatch, LayerFormatError, MappingMismatch, TruncatedLayer
from index.header_check import (
    check_estargz_header,
    check_header_run,
    estargz_header_range,
    header_range,
)
from index.model import Chunk, Entry, EntryType, LayerFormat, LayerIndex, SeekPoint
from index.zstd_frames import ZstdScanner

if TYPE_CHECKING:
    from index.gzip_seek import GzipScanner

# Decoding more compressed bytes than this runs in a worker thread, so the trio loop (which
# also serves FUSE and HTTP) never stalls for more than a fraction of a millisecond.
THREAD_THRESHOLD = 64 << 10
# Spans larger than this are "not randomly accessible": a cold read would have to decode them.
DEFAULT_MAX_SPAN = 16 << 20
_STREAM_PIECE = 4 << 20  # fetch size when a span is too large to cache and is streamed instead
# A cold read decodes a span only up to the bytes it wants. Its first fetch is the span's
# compressed size times the share wanted, times this margin, plus PREFIX_SLACK bytes (more are
# fetched, PREFIX_SLACK or more at a time, if that was not enough); at PREFIX_WHOLE_SHARE of the
# span or more, the whole span is fetched in one go.
PREFIX_MARGIN = 1.15
PREFIX_SLACK = 32 << 10
PREFIX_WHOLE_SHARE = 0.8
# A file's first read also reads its header run (see LayerReader.read): in the same fetch when
# the read starts within this many bytes of it, which the usual first read (at 0) does, or
# (gzip, zstd) in the span where the run ends. A first read further on reads the run apart:
# merged, it would decode whole spans between the two.
HEADER_MERGE_GAP = 64 << 10


@dataclass(frozen=True)
class ByteRange:
    """A range of the compressed blob: ``length`` bytes from ``offset``."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        """The offset just past the range."""
        return self.offset + self.length


@dataclass(frozen=True)
class _Span:
    index: int
    ustart: int
    uend: int
    cstart: int
    cend: int


def _span(index: LayerIndex, i: int) -> _Span:
    p = index.seek_points[i]
    if i + 1 < len(index.seek_points):
        q = index.seek_points[i + 1]
        # A checkpoint that starts inside a byte needs that byte to finish the span before it.
        return _Span(
            i,
            p.uncompressed_offset,
            q.uncompressed_offset,
            p.compressed_offset,
            q.compressed_offset + (1 if q.bits else 0),
        )
    return _Span(
        i, p.uncompressed_offset, index.uncompressed_size, p.compressed_offset, index.compressed_size
    )


def _wanted(entry: Entry, offset: int, length: int) -> int:
    if entry.type is not EntryType.FILE:
        raise LayerFormatError(
            f"entry {entry.path!r} is a {entry.type.value}, not a regular file; it has no data to read"
        )
    if offset < 0 or length < 0:
        raise ValueError("offset and length must not be negative")
    return max(0, min(length, entry.size - offset))


def _spans_for(index: LayerIndex, start: int, end: int) -> list[_Span]:
    starts = [p.uncompressed_offset for p in index.seek_points]
    i = max(0, bisect.bisect_right(starts, start) - 1)
    spans = []
    while i < len(starts) and starts[i] < end:
        spans.append(_span(index, i))
        i += 1
    return spans


def _chunks_for(entry: Entry, offset: int, end: int) -> list[Chunk]:
    return [c for c in entry.chunks if c.file_offset < end and c.file_offset + c.size > offset]


def _merge(ranges: list[ByteRange]) -> list[ByteRange]:
    merged: list[ByteRange] = []
    for r in sorted(ranges, key=lambda r: r.offset):
        if merged and r.offset <= merged[-1].end:
            last = merged[-1]
            merged[-1] = ByteRange(last.offset, max(last.end, r.end) - last.offset)
        else:
            merged.append(r)
    return merged


def plan_read(
    index: LayerIndex, entry: Entry, offset: int, length: int, *, with_header: bool = True
) -> list[ByteRange]:
    """Return the compressed blob ranges needed to read ``length`` bytes of ``entry`` at ``offset``; raises LayerFormatError for non-files.

    ``with_header``: with those of the header run the file's first read checks (none when the
    index records no valid one: that read fails before fetching), so that a file prefetched by
    its plan reads without fetching; False: the file's own bytes alone.
    """
    n = _wanted(entry, offset, length)
    if n == 0:
        return []
    ranges = _header_plan(index, entry) if with_header else []
    if entry.chunks:
        chunks = _chunks_for(entry, offset, offset + n)
        return _merge([*ranges, *(ByteRange(c.blob_offset, c.blob_end - c.blob_offset) for c in chunks)])
    return _merge([*ranges, *_stream_plan(index, entry.data_offset + offset, n)])


def _stream_plan(index: LayerIndex, start: int, n: int) -> list[ByteRange]:
    """The blob ranges holding ``n`` bytes of the uncompressed tar stream from ``start``."""
    if index.format is LayerFormat.TAR:
        return [ByteRange(start, n)]
    return [ByteRange(s.cstart, s.cend - s.cstart) for s in _spans_for(index, start, start + n)]


def _header_plan(index: LayerIndex, entry: Entry) -> list[ByteRange]:
    """The blob ranges a first read fetches to check ``entry``'s header run, beside its data."""
    try:
        if entry.chunks:
            start, end = estargz_header_range(index.digest, entry)
            return [ByteRange(start, end - start)]
        head, data = header_range(index.digest, entry)
    except MappingMismatch:
        return []
    return _stream_plan(index, head, data - head)


def max_span_size(index: LayerIndex) -> int:
    """Return the largest number of uncompressed bytes a cold read may have to decode (0 for plain tar)."""
    if index.format is LayerFormat.TAR:
        return 0
    if index.format is LayerFormat.ESTARGZ:
        return max((c.inner_offset + c.size for e in index.entries for c in e.chunks), default=0)
    return max(
        (s.uend - s.ustart for s in map(lambda i: _span(index, i), range(len(index.seek_points)))), default=0
    )


def is_randomly_accessible(index: LayerIndex, max_span: int = DEFAULT_MAX_SPAN) -> bool:
    """Tell whether a LayerReader can serve the layer in place: tar, eStargz, and gzip/zstd whose spans decode to at most ``max_span`` bytes."""
    # eStargz always: each chunk is its own gzip member, decoded on its own whatever its size
    # (a 20 MiB file in one chunk is legal and common), and its entries keep their bytes in
    # chunks, not at tar offsets, so the fallback for an unseekable layer (decompress the blob
    # to a local tar, read files at their data offsets) could not serve them: it read chunk
    # offsets of the compressed blob from the uncompressed tar ("incorrect header check").
    if index.format is LayerFormat.ESTARGZ:
        return True
    return max_span_size(index) <= max_span


def _decode(index: LayerIndex, span: _Span, data: bytes, upto: int) -> bytes:
    """Decode blob bytes starting at ``span``'s seek point; return uncompressed bytes from ``span.ustart`` to ``upto``."""
    out: list[bytes] = []
    scanner = _scanner(index.format, index.seek_points[span.index], out.append)
    scanner.feed(data)
    result = b"".join(out)
    if len(result) < upto - span.ustart:
        raise TruncatedLayer(
            f"layer {index.digest}: span {span.index} decodes to {len(result)} bytes, the index expects {span.uend - span.ustart}"
        )
    return result[: upto - span.ustart]


def _scanner(fmt: LayerFormat, point: SeekPoint, sink: Callable[[bytes], None]) -> GzipScanner | ZstdScanner:
    """A decoder of a gzip or zstd layer from ``point`` on, passing what it decodes to ``sink``."""
    if fmt is LayerFormat.GZIP:
        # Imported here: loading libz through ctypes costs ~10 ms that a mount of an eStargz or
        # plain tar image, which never decodes a span, would otherwise pay before it is ready.
        from index.gzip_seek import GzipScanner

        return GzipScanner(sink, start=point)
    return ZstdScanner(sink, start=point)


def _feed(scanner: GzipScanner | ZstdScanner, data: bytes) -> bytes:
    scanner.feed(data)
    return b""


def _decode_member(data: bytes) -> bytes:
    """Decompress one gzip member or zstd frame (an eStargz or zstd:chunked chunk)."""
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(data))
    d = zlib.decompressobj(31)
    out = d.decompress(data)
    if not d.eof:
        raise zlib.error("member is truncated")
    return out


class LayerReader:
    """Reads file bytes of one layer through its index, fetching compressed ranges via ``read_range``.

    Args:
        index: the layer's index.
        read_range: async ``(offset, length) -> bytes`` of the compressed blob (verified bytes).
        decoded_cache_bytes: budget of the LRU of decoded spans and chunks.
    """

    def __init__(
        self,
        index: LayerIndex,
        read_range: Callable[[int, int], Awaitable[bytes]],
        *,
        decoded_cache_bytes: int = 64 << 20,
    ) -> None:
        self.index = index
        self._read_range = read_range
        self._budget = decoded_cache_bytes
        self._cache: OrderedDict[Hashable, bytes] = OrderedDict()
        self._cached_bytes = 0
        self._inflight: dict[Hashable, trio.Event] = {}
        self._checked: dict[int, Entry] = {}  # files whose header was checked, by id (see read)

    async def read(self, entry: Entry, offset: int, length: int) -> bytes:
        """Return ``min(length, entry.size - offset)`` bytes of ``entry`` from ``offset`` (b"" past EOF).

        The first read of each file checks, before returning anything, that the tar header before
        its bytes names it (``index.header_check``); later reads of it skip the check.

        Raises:
            MappingMismatch: the index maps the file to bytes under another file's header.
            IntegrityError: fetched bytes failed their digest.
            LayerFormatError: not a regular file, or the layer's bytes are malformed.
        """
        n = _wanted(entry, offset, length)
        if n == 0:
            return b""
        # By id, holding the entry: it stays alive, so its id cannot be reused by another.
        if self._checked.get(id(entry)) is not entry:
            data = await (self._first_chunk_read if entry.chunks else self._first_stream_read)(
                entry, offset, n
            )
            self._checked[id(entry)] = entry
            return data
        if entry.chunks:
            return await self._read_chunks(entry, offset, n)
        return await self._read_stream(entry, entry.data_offset + offset, n)

    async def _first_stream_read(self, entry: Entry, offset: int, n: int) -> bytes:
        """Read a tar/gzip/zstd file's bytes with its header run, checked first; one fetch when they are close."""
        layer = self.index.digest
        head, data_offset = header_range(layer, entry)
        start = data_offset + offset

        async def check_alone() -> None:
            run = await self._read_stream(entry, head, data_offset - head)
            check_header_run(layer, entry, run, head, data_offset, exact=True)

        if not self._near(head, data_offset, start):
            await check_alone()
            return await self._read_stream(entry, start, n)
        try:  # the usual first read, at or near the file's start: one fetch
            both = await self._read_stream(entry, head, start + n - head)
        except LayerFormatError:
            # A lying size or offset can put the data past the stream's end: say so if the header does.
            await check_alone()
            raise
        check_header_run(layer, entry, both[: data_offset - head], head, data_offset, exact=True)
        return both[start - head :]

    def _near(self, head: int, data_offset: int, start: int) -> bool:
        """Whether the header run ``[head, data_offset)`` is read with the data at ``start`` in one go, at no extra cost."""
        if start - head <= HEADER_MERGE_GAP or self.index.format is LayerFormat.TAR:
            return start - head <= HEADER_MERGE_GAP
        # The data starts in the span the run ends in: decoding it reaches the run on the way.
        return (
            _spans_for(self.index, start, start + 1)[0].index
            <= _spans_for(self.index, data_offset - 1, data_offset)[0].index
        )

    async def _first_chunk_read(self, entry: Entry, offset: int, n: int) -> bytes:
        """Read an eStargz file's bytes after checking its headers, fetched in one range with its first chunk."""
        start, end = estargz_header_range(self.index.digest, entry)
        blob = await self._fetch(start, end - start)
        member = await self._cpu(len(blob), check_estargz_header, self.index.digest, entry, blob)
        first = entry.chunks[0]
        self._remember(("chunk", first), self._chunk_data(entry, first, member))
        return await self._read_chunks(entry, offset, n)

    async def _read_stream(self, entry: Entry, start: int, n: int) -> bytes:
        """Return ``n`` bytes of the uncompressed tar stream from ``start`` (bytes of ``entry`` or its headers)."""
        if self.index.format is LayerFormat.TAR:
            return await self._fetch(start, n)
        pieces = []
        spans = _spans_for(self.index, start, start + n)
        await self._decode_runs([s for s in spans if s.uend - s.ustart <= self._budget // 2])
        for span in spans:
            lo, hi = max(start, span.ustart), min(start + n, span.uend)
            if span.uend - span.ustart > self._budget // 2:
                pieces.append(await self._stream_span(span, lo, hi))
                continue
            data = await self._span_prefix(span, hi)
            pieces.append(data[lo - span.ustart : hi - span.ustart])
        result = b"".join(pieces)
        if len(result) != n:
            raise LayerFormatError(
                f"layer {self.index.digest}: seek points do not cover tar bytes {start}..{start + n} (of {entry.path!r})"
            )
        return result

    async def _decode_runs(self, spans: list[_Span]) -> None:
        """Decode adjacent uncached spans from one fetch each, so a read makes one call per contiguous range."""
        runs: list[list[_Span]] = []
        for span in spans:
            if span.index in self._cache or span.index in self._inflight:
                continue
            if runs and span.index == runs[-1][-1].index + 1:
                runs[-1].append(span)
            else:
                runs.append([span])
        for run in runs:
            # Another task may have started on some of these spans while this one awaited.
            run = [s for s in run if s.index not in self._cache and s.index not in self._inflight]
            contiguous = all(b.index == a.index + 1 for a, b in itertools.pairwise(run))
            if len(run) > 1 and contiguous:  # a single span goes through _span_prefix
                await self._decode_run(run)

    async def _decode_run(self, run: list[_Span]) -> None:
        events: dict[Hashable, trio.Event] = {s.index: trio.Event() for s in run}
        self._inflight.update(events)
        try:
            base = run[0].cstart
            data = await self._fetch(base, run[-1].cend - base)
            for s in run:
                piece = data[s.cstart - base : s.cend - base]
                self._remember(s.index, await self._cpu(len(piece), _decode, self.index, s, piece, s.uend))
        finally:
            for key, event in events.items():
                del self._inflight[key]
                event.set()

    async def _fetch(self, offset: int, length: int) -> bytes:
        data = await self._read_range(offset, length)
        if len(data) != length:
            raise TruncatedLayer(
                f"layer {self.index.digest}: asked for {length} bytes at {offset}, got {len(data)}"
            )
        return data

    async def _span_prefix(self, span: _Span, upto: int) -> bytes:
        """Return a span's decoded bytes from its start to at least ``upto``, decoding once for concurrent readers."""
        while True:
            data = self._cache.get(span.index)
            if data is not None and span.ustart + len(data) >= upto:
                self._cache.move_to_end(span.index)
                return data
            event = self._inflight.get(span.index)
            if event is None:
                break
            await event.wait()  # then look again: it may have decoded less than this read needs
        event = self._inflight[span.index] = trio.Event()
        try:
            data = await self._decode_prefix(span, upto)
            self._forget(span.index)
            self._remember(span.index, data)
            return data
        finally:
            del self._inflight[span.index]
            event.set()

    async def _decode_prefix(self, span: _Span, upto: int) -> bytes:
        """Decode a span from its seek point until ``upto`` at least, fetching only the compressed bytes that takes.

        A small file early in a 1 MiB span needs only the compressed bytes up to its end, not the
        whole span: the first request asks for the share of the span the wanted bytes are (plus a
        margin for uneven compression), later ones for more until the output reaches ``upto``.
        """
        clen, ulen = span.cend - span.cstart, span.uend - span.ustart
        want = upto - span.ustart
        first = int(clen * want / ulen * PREFIX_MARGIN) + PREFIX_SLACK if ulen else clen
        if first >= clen * PREFIX_WHOLE_SHARE:
            data = await self._fetch(span.cstart, clen)
            return await self._cpu(len(data), _decode, self.index, span, data, span.uend)
        out: list[bytes] = []
        await self._decode_until(span, upto, lambda _, data: out.append(data), first, PREFIX_SLACK)
        return b"".join(out)[:ulen]

    async def _cpu(self, size: int, fn: Callable[..., bytes], *args: object) -> bytes:
        """Run a decode inline when small, in a worker thread when large; name the layer in errors."""
        try:
            if size <= THREAD_THRESHOLD:
                return fn(*args)
            return await trio.to_thread.run_sync(fn, *args)
        except zlib.error as exc:
            raise LayerFormatError(f"layer {self.index.digest}: corrupt compressed data: {exc}") from None
        except LayerFormatError as exc:
            if self.index.digest in str(exc):
                raise
            raise type(exc)(f"layer {self.index.digest}: {exc}") from None

    async def _stream_span(self, span: _Span, lo: int, hi: int) -> bytes:
        """Decode a span too large to cache from its seek point up to ``hi``, fetching it piece by piece."""
        out: list[bytes] = []

        def keep(pos: int, data: bytes) -> None:
            """Keep the part of ``data`` (starting at uncompressed ``pos``) that falls inside [lo, hi)."""
            if pos + len(data) > lo and pos < hi:
                out.append(data[max(0, lo - pos) : hi - pos])

        await self._decode_until(span, hi, keep, _STREAM_PIECE, _STREAM_PIECE)
        return b"".join(out)

    async def _decode_until(
        self, span: _Span, upto: int, keep: Callable[[int, bytes], None], first: int, step: int
    ) -> None:
        """Decode a span from its seek point until its output reaches uncompressed offset ``upto``.

        Compressed bytes are fetched ``first`` at first, then at least ``step`` at a time; each
        decoded piece goes to ``keep`` with the uncompressed offset it starts at.

        Raises:
            TruncatedLayer: the span ends before ``upto``.
        """
        pos = span.ustart  # uncompressed offset of the next output byte

        def sink(data: bytes) -> None:
            nonlocal pos
            keep(pos, data)
            pos += len(data)

        scanner = _scanner(self.index.format, self.index.seek_points[span.index], sink)
        coff, size = span.cstart, first
        while pos < upto and coff < span.cend:
            piece = await self._fetch(coff, min(size, span.cend - coff))
            coff += len(piece)
            await self._cpu(len(piece), _feed, scanner, piece)
            size = max(size, step)
        if pos < upto:
            raise TruncatedLayer(
                f"layer {self.index.digest}: span {span.index} ends before uncompressed byte {upto}"
            )

    async def _read_chunks(self, entry: Entry, offset: int, n: int) -> bytes:
        pieces = []
        for chunk in _chunks_for(entry, offset, offset + n):
            data = await self._shared(("chunk", chunk), self._load_chunk, entry, chunk)
            lo = max(offset, chunk.file_offset) - chunk.file_offset
            hi = min(offset + n, chunk.file_offset + chunk.size) - chunk.file_offset
            pieces.append(data[lo:hi])
        result = b"".join(pieces)
        if len(result) != n:
            raise LayerFormatError(
                f"layer {self.index.digest}: chunks of {entry.path!r} do not cover bytes {offset}..{offset + n}"
            )
        return result

    async def _load_chunk(self, entry: Entry, chunk: Chunk) -> bytes:
        compressed = await self._fetch(chunk.blob_offset, chunk.blob_end - chunk.blob_offset)
        member = await self._cpu(len(compressed), _decode_member, compressed)
        return self._chunk_data(entry, chunk, member)

    def _chunk_data(self, entry: Entry, chunk: Chunk, member: bytes) -> bytes:
        """Return ``chunk``'s bytes out of its decompressed ``member``; raises LayerFormatError, DigestMismatch."""
        data = member[chunk.inner_offset : chunk.inner_offset + chunk.size]
        if len(data) != chunk.size:
            raise LayerFormatError(
                f"layer {self.index.digest}: chunk at {chunk.file_offset} of {entry.path!r} is short"
            )
        if chunk.digest:
            actual = "sha256:" + hashlib.sha256(data).hexdigest()
            if actual != chunk.digest:
                raise DigestMismatch(
                    f"layer {self.index.digest}: chunk at {chunk.file_offset} of {entry.path!r}",
                    chunk.digest,
                    actual,
                )
        return data

    async def _shared(self, key: Hashable, produce: Callable[..., Awaitable[bytes]], *args: object) -> bytes:
        """Return the cached value of ``key``, or produce it once however many tasks ask at the same time."""
        while True:
            data = self._cache.get(key)
            if data is not None:
                self._cache.move_to_end(key)
                return data
            event = self._inflight.get(key)
            if event is None:
                break
            await event.wait()  # if its producer failed, the loop makes this task try itself
        event = self._inflight[key] = trio.Event()
        try:
            data = await produce(*args)
            self._remember(key, data)
            return data
        finally:
            del self._inflight[key]
            event.set()

    def _forget(self, key: Hashable) -> None:
        old = self._cache.pop(key, None)
        if old is not None:
            self._cached_bytes -= len(old)

    def _remember(self, key: Hashable, data: bytes) -> None:
        if len(data) > self._budget or key in self._cache:
            return
        self._cache[key] = data
        self._cached_bytes += len(data)
        while self._cached_bytes > self._budget:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= len(old)
