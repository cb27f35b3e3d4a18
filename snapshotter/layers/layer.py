"""A served layer: its index, where that index came from, and its file bytes read through the cache."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from index.errors import IntegrityError, LayerFormatError, LazysnapError, MappingMismatch
from index.model import Entry, EntryType, LayerIndex
from index.readahead import SiblingReadahead
from index.reader import LayerReader, plan_read
from snapshotter.cache.blob_cache import CachedBlob
from snapshotter.remote.client import Descriptor

log = logging.getLogger(__name__)

HOW_STORED = "lazy: stored index"
HOW_ESTARGZ = "lazy: estargz toc"
HOW_DOWNLOADED = "indexed during download"


class IndexSource(enum.Enum):
    """Where a layer's index came from: decides trust and behaviour (``how`` is only for display)."""

    STORED = "stored"  # the local index store
    PUBLISHED = "published"  # an index published next to the image in its registry
    ESTARGZ = "estargz"  # the blob's own eStargz TOC
    DOWNLOADED = "downloaded"  # built here while the whole blob streamed in

    @property
    def how(self) -> str:
        """The display string ``lazysnap stats`` and ``mount`` show for layers from this source."""
        return {
            IndexSource.STORED: HOW_STORED,
            IndexSource.PUBLISHED: HOW_STORED,
            IndexSource.ESTARGZ: HOW_ESTARGZ,
            IndexSource.DOWNLOADED: HOW_DOWNLOADED,
        }[self]


@dataclass(frozen=True)
class PrefetchLimits:
    """How much a layer fetches ahead of its reads (from ``[layers]`` in the config)."""

    # An optimized eStargz blob's landmark region is honoured up to this many bytes: beyond, it
    # would compete with on-demand reads for longer than it saves them.
    landmark_max_bytes: int = 32 << 20
    # The landmark region is requested in pieces of this size, one after the other, so a start-up
    # read waits only for the piece holding its file.
    landmark_piece_bytes: int = 512 << 10
    # A file asked for ahead of its reads (a program's libraries) is fetched whole only up to this
    # many compressed bytes; larger ones are left to the reads themselves.
    file_max_bytes: int = 16 << 20


@dataclass
class Layer:
    """One layer of a chain: its index, how it was obtained, and its cached blob."""

    descriptor: Descriptor
    index: LayerIndex
    source: IndexSource
    reason: str
    blob: CachedBlob
    reader: LayerReader
    limits: PrefetchLimits = field(default_factory=PrefetchLimits)
    downloaded_bytes: int = 0
    diff_id_verified: bool = False
    unpacked: bool = False  # reads come from a verified local copy of the uncompressed tar
    readahead: SiblingReadahead | None = None
    prefetch_end: int = 0  # an optimized eStargz blob's files before its landmark end here
    # Set when the layer failed verification: from then on every read fails (EIO), since the
    # bytes or the mapping it served can no longer be trusted.
    failed: str = ""
    background_error: str = ""
    # The last read timed out (ChainSource.read then gives this layer's reads a short deadline).
    degraded: bool = False
    # Where the index is kept in the index store ("" trusted, else its provenance scope); None:
    # not kept. A layer whose index fails the completion check has it dropped from there.
    store_scope: str | None = None
    # Closes what the layer holds open besides its blob (a local tar's descriptor).
    on_close: list[Callable[[], None]] = field(default_factory=list)

    @property
    def how(self) -> str:
        """How the layer is served, for display."""
        return self.source.how

    async def read(self, entry: Entry, offset: int, length: int) -> bytes:
        """Return ``length`` bytes of a regular file at ``offset`` (fewer at EOF).

        Raises:
            IntegrityError: fetched bytes failed their digest, or the layer failed verification.
            FetchError: the registry could not be read after retries.
        """
        if self.failed:
            raise IntegrityError(f"layer {self.descriptor.digest} is not served: {self.failed}")
        try:
            if self.readahead is not None and not self.unpacked:
                await self._read_ahead(entry)
            return await self.reader.read(entry, offset, length)
        except (IntegrityError, LayerFormatError) as error:
            if entry.chunks:
                self._forget_chunks(entry, offset, length, error)
            elif isinstance(error, MappingMismatch):
                # Span-verified bytes whose header names another file: the index lies. Nothing
                # more is served from it; the completion check would stop the layer anyway.
                self.failed = str(error)
                self.blob.stats.integrity_failures += 1
                log.error("layer-verified=false layer=%s reason=%s", self.descriptor.digest, error)
            raise

    async def prefetch_landmark(self) -> None:
        """Fetch the files an optimized eStargz blob puts before its prefetch landmark, in order.

        ``ctr-remote image optimize`` records what the image's entrypoint reads and moves those
        files to the front, in reading order. Run beside the mount rather than before it: the
        mount is ready sooner, and since the region comes in pieces one after the other, a
        start-up read waits only for the piece holding its file, which is usually among the
        first. Failures are logged: reads then fetch what they need themselves.
        """
        piece = self.limits.landmark_piece_bytes
        try:
            for offset in range(0, self.prefetch_end, piece):
                await self.blob.ensure(offset, min(piece, self.prefetch_end - offset))
        except LazysnapError as error:
            log.warning("prefetch-failed layer=%s: %s", self.descriptor.digest, error)
        else:
            log.info("prefetched layer=%s bytes=%d", self.descriptor.digest, self.prefetch_end)

    async def prefetch(self, entry: Entry) -> None:
        """Fetch a regular file's bytes into the cache ahead of its reads (nothing for an unpacked layer or a huge file).

        Raises:
            IntegrityError: fetched bytes failed their span digest.
            FetchError: the registry could not be read after retries.
        """
        if self.unpacked or self.failed or entry.type is not EntryType.FILE:
            return
        ranges = plan_read(self.index, entry, 0, entry.size)
        if sum(r.length for r in ranges) > self.limits.file_max_bytes:
            return
        if not entry.chunks:
            # Through the reader: it decodes a span only as far as the file reaches, so a small
            # library does not pull in the whole checkpoint span around it (the decoded bytes are
            # kept in its LRU, where the loader's reads find them).
            await self.reader.read(entry, 0, entry.size)
            return
        # Each chunk is its own request, all at once: a later chunk (where a program's dynamic
        # section usually is) then arrives no later than the first one.
        async with trio.open_nursery() as nursery:
            for span in ranges:
                nursery.start_soon(self.blob.ensure, span.offset, span.length)

    async def _read_ahead(self, entry: Entry) -> None:
        """On a cold read of a small file, fetch it with the next files of its directory in one request."""
        assert self.readahead is not None
        plan = self.readahead.plan_for(entry)
        # Only a cold read brings the neighbours along: a read of a file already cached
        # (prefetched, or read before) must not wait for files it did not ask for.
        if plan is None or self.blob.is_present(plan.file.offset, plan.file.length):
            return
        await self.blob.ensure(plan.span.offset, plan.span.length)

    def _forget_chunks(self, entry: Entry, offset: int, length: int, error: LazysnapError) -> None:
        """Drop the cached bytes of the chunks a failed read used, so a later read fetches them again."""
        # eStargz chunks are checked against their digests after the cache stored them (the
        # cache knows no span digests for them), so bad bytes would otherwise stay "present".
        # What the read fetched: its chunks and, at a first read, the member holding its header
        # (covered only by the gzip CRC, so bad bytes there would otherwise stay cached too).
        fetched = plan_read(self.index, entry, offset, length)
        for piece in fetched:
            self.blob.forget(piece.offset, piece.length)
        self.blob.stats.integrity_failures += 1
        log.warning(
            "chunk-integrity-failure layer=%s path=%s blob_bytes=%d-%d: %s",
            self.descriptor.digest,
            entry.path,
            min((piece.offset for piece in fetched), default=-1),
            max((piece.offset + piece.length for piece in fetched), default=-1),
            error,
        )

    def close(self) -> None:
        """Release what the layer holds open (not its cached blob, which the cache owns)."""
        while self.on_close:
            self.on_close.pop()()

    def stats(self) -> dict[str, object]:
        """This layer's serving mode and counters, for ``lazysnap stats``."""
        blob_stats = self.blob.stats
        return {
            "digest": self.descriptor.digest,
            "media_type": self.descriptor.media_type,
            "how": self.how,
            "index_source": self.source.value,
            "reason": self.reason,
            "size": self.descriptor.size,
            "bytes_fetched": blob_stats.bytes_fetched + self.downloaded_bytes,
            "bytes_present": self.blob.present_bytes,
            "fetch_requests": blob_stats.fetch_requests,
            "background_bytes": blob_stats.background_bytes,
            "cache_hits": blob_stats.hits,
            "cache_misses": blob_stats.misses,
            "integrity_failures": blob_stats.integrity_failures,
            "verified": self.blob.verified and not self.failed,
            "diff_id_verified": self.diff_id_verified and not self.failed,
            "failed": self.failed,
            "unpacked": self.unpacked,
            "entries": len(self.index.entries),
        }
