"""One-pass layer index builders, fed the compressed blob as it downloads.

``LayerIndexBuilder.feed`` decompresses each piece in the calling thread (libz via
``gzip_seek``, libzstd via ``zstd_frames``, nothing for tar) and hands everything else to one
worker thread: the blob digest and span digests, the DiffID, the tar parser and the trimming
of gzip checkpoint windows. libz and hashlib release the GIL, so on two free cores the two
threads overlap; on one core the pass costs about 2.1x the CPU of plain decompression. Memory
is bounded by the worker's queue and the index itself, never by the blob.

``feed`` blocks (decompression, and back-pressure when the worker is behind): call it from a
thread (``trio.to_thread.run_sync``), not from an event loop.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import queue
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from index.errors import DigestMismatch, LayerFormatError
from index.gzip_seek import GzipScanner, WindowTrimmer, minimize_window
from index.model import LayerFormat, LayerIndex, SeekPoint
from index.tar_entries import TarEntryParser
from index.zstd_frames import ZstdScanner

_TrimJob = tuple[int, SeekPoint, bytes]
_BATCH = 256 << 10  # small fed pieces are batched to this size before they cross to the hasher
_QUEUE_DEPTH = 32  # batches in flight: bounds memory at about 8 MiB (more for large feeds)
# Tar bytes are hashed and parsed in slices of this size: hashing releases the GIL between the
# parser's stretches, so the feeding thread, back from libz, never waits long to take it.
_SLICE = 64 << 10


class _Scanner:
    """The interface of GzipScanner and ZstdScanner, and the identity scanner for plain tar."""

    points: list[SeekPoint]

    def feed(self, data: bytes) -> None:
        """Consume the next piece of the blob."""

    def finish(self) -> None:
        """Check that the blob ended cleanly."""


class _PlainTar(_Scanner):
    """Plain tar needs no decoding: the worker parses the fed bytes themselves."""

    def __init__(self) -> None:
        self.points = []


class _Worker:
    """Blob digest, span digests, DiffID and tar parsing, on a worker thread fed through a bounded queue.

    The feeding thread spends its time in libz (GIL released); this thread runs the tar
    parser (pure Python) and hashlib (GIL released), so the two overlap on two cores. An
    error of the parser is re-raised by the next ``add`` or by ``close``.
    """

    def __init__(self, span_size: int, hash_tar: bool, parse: Callable[[bytes | memoryview], None]) -> None:
        self._parse = parse
        self._plain_tar = not hash_tar  # compressed bytes are the tar itself
        self.blob = hashlib.sha256()
        self.tar = hashlib.sha256() if hash_tar else None
        self.spans: list[str] = []
        self._span_size = span_size
        self._span = hashlib.sha256()
        self._span_fill = 0
        self._queue: queue.Queue[tuple[bool, list[bytes]] | _TrimJob | None] = queue.Queue(_QUEUE_DEPTH)
        self.windows: dict[int, bytes] = {}  # trimmed windows by seek point index
        self._pending: dict[bool, list[bytes]] = {True: [], False: []}
        self._pending_size = {True: 0, False: 0}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="index-hasher", daemon=True)
        self._thread.start()
        self._closed = False

    def stop_signal(self) -> Callable[[], None]:
        """Return a callable that stops the thread and holds no reference to anything but the queue."""
        return functools.partial(self._queue.put, None)

    def add(self, compressed: bool, data: bytes) -> None:
        """Queue ``data`` as compressed blob bytes or as tar bytes; re-raises an error of the worker."""
        if self._error is not None:
            raise self._error
        self._pending[compressed].append(data)
        self._pending_size[compressed] += len(data)
        if self._pending_size[compressed] >= _BATCH:
            self._flush(compressed)

    def trim(self, job: _TrimJob) -> None:
        """Queue the trimming of one checkpoint's window (see ``minimize_window``)."""
        self._queue.put(job)

    def close(self) -> None:
        """Hash what is queued and stop the thread; re-raises an error of the thread."""
        if not self._closed:
            self._closed = True
            self._flush(True)
            self._flush(False)
            self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._span_fill:
            self.spans.append("sha256:" + self._span.hexdigest())
            self._span_fill = 0

    def _flush(self, compressed: bool) -> None:
        parts = self._pending[compressed]
        if parts:  # as a list: joining would copy every byte once more in the feeding thread
            self._queue.put((compressed, parts))
            self._pending[compressed] = []
            self._pending_size[compressed] = 0

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so producers never block
            try:
                if len(item) == 3:
                    index, point, following = item
                    self.windows[index] = minimize_window(point, following)
                    continue
                compressed, parts = item
                for data in parts:
                    if compressed:
                        self._hash_compressed(data)
                        if self._plain_tar:
                            self._parse(data)
                    elif self.tar is not None:
                        self._hash_and_parse(data)
            except BaseException as exc:  # reported by close()
                self._error = exc

    def _hash_and_parse(self, data: bytes) -> None:
        assert self.tar is not None
        view = memoryview(data)
        for pos in range(0, len(data), _SLICE):
            piece = view[pos : pos + _SLICE]
            self.tar.update(piece)
            self._parse(piece)

    def _hash_compressed(self, data: bytes) -> None:
        self.blob.update(data)
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            step = min(self._span_size - self._span_fill, len(view) - pos)
            self._span.update(view[pos : pos + step])
            self._span_fill += step
            pos += step
            if self._span_fill == self._span_size:
                self.spans.append("sha256:" + self._span.hexdigest())
                self._span = hashlib.sha256()
                self._span_fill = 0


class LayerIndexBuilder:
    """Builds a ``LayerIndex`` from a layer blob fed in order, in one pass.

    Args:
        media_type: the layer descriptor's media type, recorded in the index.
        fmt: how the blob is encoded; ESTARGZ blobs are indexed as the gzip streams they are.
        digest: the expected ``sha256:...`` of the blob; checked by ``finish``.
        gzip_spacing: uncompressed bytes between gzip checkpoints (each costs a 32 KiB window).
        max_uncompressed: the largest tar a compressed blob may inflate to (None: no bound);
            beyond it ``feed`` raises LayerFormatError.
        span_size: compressed bytes per verified span.
    """

    def __init__(
        self,
        media_type: str,
        fmt: LayerFormat,
        *,
        digest: str | None = None,
        gzip_spacing: int = 1 << 20,
        span_size: int = 64 << 10,
        max_uncompressed: int | None = None,
    ) -> None:
        if gzip_spacing <= 0 or span_size <= 0:
            raise ValueError("gzip_spacing and span_size must be positive")
        # A gzip or zstd bomb (a small blob inflating to terabytes) stops here, not on a full disk.
        self._max_uncompressed = max_uncompressed
        self._uncompressed = 0
        self._media_type = media_type
        self._format = LayerFormat.GZIP if fmt is LayerFormat.ESTARGZ else fmt
        self._expected = digest
        self._span_size = span_size
        self._name = digest or f"(undigested {media_type})"
        self._tar = TarEntryParser(self._name)
        self._hasher = _Worker(span_size, self._format is not LayerFormat.TAR, self._tar.feed)
        # A builder dropped without finish() (a download that failed) must not leave the
        # hashing thread blocked forever; the thread itself holds no reference to the builder.
        weakref.finalize(self, self._hasher.stop_signal())
        self._scanner = self._make_scanner(gzip_spacing)
        # gzip windows are trimmed to the bytes the stream really references, so a stored
        # index is a few times smaller (each window otherwise costs ~10 KB compressed).
        self._trimmer = WindowTrimmer() if self._format is LayerFormat.GZIP else None
        self._fed = 0
        self._error: BaseException | None = None
        self._done = False

    def _make_scanner(self, spacing: int) -> _Scanner | GzipScanner | ZstdScanner:
        if self._format is LayerFormat.GZIP:
            # With the blob's digest known, its check covers every byte: the CRC would only cost time.
            return GzipScanner(self._on_output, spacing=spacing, check_crc=self._expected is None)
        if self._format is LayerFormat.ZSTD:
            return ZstdScanner(self._on_output)
        return _PlainTar()

    def _on_output(self, data: bytes) -> None:
        self._uncompressed += len(data)
        if self._max_uncompressed is not None and self._uncompressed > self._max_uncompressed:
            raise LayerFormatError(
                f"layer {self._name}: its tar grows past {self._max_uncompressed} bytes uncompressed "
                "(a decompression bomb?); raise [layers] max_uncompressed_bytes if the layer is genuine"
            )
        self._hasher.add(False, data)

    def feed(self, data: bytes) -> None:
        """Consume the next bytes of the compressed blob; raises LayerFormatError (naming the layer) on bad data."""
        if self._error is not None:
            raise self._error
        if self._done:
            raise RuntimeError("feed() after finish()")
        if not data:
            return
        data = bytes(data)
        start = self._fed
        self._fed += len(data)
        self._guard(self._hasher.add, True, data)
        self._guard(self._scanner.feed, data)
        if self._trimmer is not None:
            scanner = self._scanner
            assert isinstance(scanner, GzipScanner)
            for job in self._trimmer.observe(scanner.points, data, start, scanner.uncompressed_pos):
                self._hasher.trim(job)

    def finish(self) -> LayerIndex:
        """Return the index; raises DigestMismatch, TruncatedLayer, LayerFormatError or UnsafePath naming the layer."""
        if self._error is not None:
            raise self._error
        self._done = True
        for job in self._trimmer.flush() if self._trimmer is not None else ():
            self._hasher.trim(job)
        try:
            self._hasher.close()
        except LayerFormatError as exc:
            parse_error: LayerFormatError | None = exc
        else:
            parse_error = None
        actual = "sha256:" + self._hasher.blob.hexdigest()
        if self._expected is not None and actual != self._expected:
            # A wrong blob explains any format error too: report the mismatch first.
            self._error = DigestMismatch(
                f"layer {self._expected} ({self._fed} bytes downloaded)", self._expected, actual
            )
            raise self._error
        if parse_error is not None:
            self._guard(_reraise, parse_error)
        self._name = self._tar.layer = actual
        self._guard(self._scanner.finish)
        entries = self._guard(self._tar.finish)
        points = self._scanner.points
        for i, window in self._hasher.windows.items():
            points[i] = dataclasses.replace(points[i], window=window)
        diff_id = actual if self._hasher.tar is None else "sha256:" + self._hasher.tar.hexdigest()
        return LayerIndex(
            media_type=self._media_type,
            format=self._format,
            digest=actual,
            compressed_size=self._fed,
            diff_id=diff_id,
            uncompressed_size=self._tar_size(),
            entries=entries,
            seek_points=self._scanner.points,
            span_size=self._span_size,
            span_digests=self._hasher.spans,
        )

    def _tar_size(self) -> int:
        scanner = self._scanner
        return scanner.uncompressed_pos if isinstance(scanner, GzipScanner | ZstdScanner) else self._fed

    def _guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn``; on a format error, remember it (the builder is dead) and name the layer in it."""
        try:
            return fn(*args)
        except LayerFormatError as exc:
            msg = str(exc)
            if self._name not in msg:
                msg = f"layer {self._name}: {msg}"
            self._error = type(exc)(msg)
            self._abort()
            raise self._error from None

    def _abort(self) -> None:
        """Stop the hasher after an error; its own errors no longer matter."""
        try:
            self._hasher.close()
        except Exception:
            pass


def _reraise(exc: BaseException) -> None:
    raise exc


def build_index(media_type: str, fmt: LayerFormat, chunks: Iterable[bytes], **kwargs: Any) -> LayerIndex:
    """Build the index of a blob given as an iterable of byte pieces; raises what ``LayerIndexBuilder`` raises."""
    builder = LayerIndexBuilder(media_type, fmt, **kwargs)
    for chunk in chunks:
        builder.feed(chunk)
    return builder.finish()
