"""Getting each layer's index the cheapest way, and serving its file bytes through the cache.

For every layer descriptor, in this order:

1. ``lazy: stored index``      an index of this blob is in the local index store, or was
                               published next to the image (``lazysnap index push``; not looked
                               for when the layer's toc.digest annotation declares a TOC);
2. ``lazy: estargz toc``       the blob carries its own table of contents (eStargz footer);
3. ``indexed during download`` stream the blob once: the index is built from the stream while
                               the same bytes fill the cache, so nothing is fetched twice.

A layer whose index does not allow random access (a single-frame zstd blob) is still served:
its blob is then complete in the cache after the download, and ``how`` says so.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import trio

from index.errors import DigestMismatch, IntegrityError, LayerFormatError, LazysnapError
from index.estargz import EstargzLayer, read_estargz
from index.model import Entry, EntryType, LayerFormat, LayerIndex
from index.readahead import SiblingReadahead
from index.reader import LayerReader, is_randomly_accessible, plan_read
from index.uncompressed import open_tar_stream
from snapshotter.cache.blob_cache import MIN_FETCH_BYTES, BlobCache, CachedBlob
from snapshotter.cache.index_store import IndexStore
from snapshotter.errors import FetchTimeout
from snapshotter.errors import NotServedLazily as NotServedLazily  # re-exported: it was defined here
from snapshotter.layers.published import PublishedIndexes
from snapshotter.remote.client import Descriptor, RegistryClient
from snapshotter.remote.media_types import layer_format
from snapshotter.remote.reference import Reference

log = logging.getLogger(__name__)

HOW_STORED = "lazy: stored index"
HOW_ESTARGZ = "lazy: estargz toc"
HOW_DOWNLOADED = "indexed during download"
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
# Bytes of a gzip blob's tail read to look for an eStargz footer when no annotation declares
# one: enough for the footer (and a small TOC); a larger TOC then costs one more request.
UNDECLARED_TAIL_PROBE = 4 << 10
# The cache's chunk size equals the index's span size, so each fetched chunk can be verified alone.
SPAN_SIZE = 64 << 10
# Blobs without span digests (eStargz: each chunk carries the digest of its uncompressed bytes)
# are cached in small chunks, so a cold read fetches its gzip members and little else: 64 KiB
# alignment cost `import json` on the eStargz python image 6.4 MB where its files take 4.7 MB.
FINE_CHUNK_SIZE = 4 << 10
# The largest prefetch region (an optimized eStargz blob's files before its landmark) honoured:
# beyond this it would compete with on-demand reads for longer than it saves them.
PREFETCH_MAX_BYTES = 32 << 20
# The prefetch region is requested in pieces of this size, one after the other.
PREFETCH_PIECE = 512 << 10
# A file asked for ahead of its reads (a program's libraries) is fetched whole only up to this
# many compressed bytes; larger ones are left to the reads themselves.
PREFETCH_FILE_MAX_BYTES = 16 << 20

Progress = Callable[[str, int, int], None]


@dataclass
class Layer:
    """One layer of a chain: its index, how it was obtained, and its cached blob."""

    descriptor: Descriptor
    index: LayerIndex
    how: str
    reason: str
    blob: CachedBlob
    reader: LayerReader
    downloaded_bytes: int = 0
    diff_id_verified: bool = False
    unpacked: bool = False  # reads come from a verified local copy of the uncompressed tar
    readahead: SiblingReadahead | None = None
    prefetch_end: int = 0  # an optimized eStargz blob's files before its landmark end here

    async def read(self, entry: Entry, offset: int, length: int) -> bytes:
        """Return ``length`` bytes of a regular file at ``offset`` (fewer at EOF).

        Raises:
            IntegrityError: fetched bytes failed their digest.
            FetchError: the registry could not be read after retries.
        """
        try:
            if self.readahead is not None and not self.unpacked:
                await self._read_ahead(entry)
            return await self.reader.read(entry, offset, length)
        except (IntegrityError, LayerFormatError) as error:
            if entry.chunks:
                self._forget_chunks(entry, offset, length, error)
            raise

    async def prefetch_landmark(self) -> None:
        """Fetch the files an optimized eStargz blob puts before its prefetch landmark, in order.

        ``ctr-remote image optimize`` records what the image's entrypoint reads and moves those
        files to the front, in reading order. Run beside the mount rather than before it: the
        mount is ready sooner, and since the region comes in PREFETCH_PIECE requests one after
        the other, a start-up read waits only for the piece holding its file, which is usually
        among the first. Failures are logged: reads then fetch what they need themselves.
        """
        try:
            for offset in range(0, self.prefetch_end, PREFETCH_PIECE):
                length = min(PREFETCH_PIECE, self.prefetch_end - offset)
                await self.blob.ensure(offset, length)
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
        if self.unpacked or entry.type is not EntryType.FILE:
            return
        ranges = plan_read(self.index, entry, 0, entry.size)
        if sum(r.length for r in ranges) > PREFETCH_FILE_MAX_BYTES:
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
        chunks = [
            c for c in entry.chunks if c.file_offset < offset + length and c.file_offset + c.size > offset
        ]
        for chunk in chunks:
            self.blob.forget(chunk.blob_offset, chunk.blob_end - chunk.blob_offset)
        self.blob.stats.integrity_failures += 1
        log.warning(
            "chunk-integrity-failure layer=%s path=%s blob_bytes=%d-%d: %s",
            self.descriptor.digest,
            entry.path,
            min((c.blob_offset for c in chunks), default=-1),
            max((c.blob_end for c in chunks), default=-1),
            error,
        )

    def stats(self) -> dict[str, object]:
        """This layer's serving mode and counters, for ``lazysnap stats``."""
        blob_stats = self.blob.stats
        return {
            "digest": self.descriptor.digest,
            "media_type": self.descriptor.media_type,
            "how": self.how,
            "reason": self.reason,
            "size": self.descriptor.size,
            "bytes_fetched": blob_stats.bytes_fetched + self.downloaded_bytes,
            "bytes_present": self.blob.present_bytes,
            "fetch_requests": blob_stats.fetch_requests,
            "background_bytes": blob_stats.background_bytes,
            "cache_hits": blob_stats.hits,
            "cache_misses": blob_stats.misses,
            "integrity_failures": blob_stats.integrity_failures,
            "verified": self.blob.verified,
            "diff_id_verified": self.diff_id_verified,
            "unpacked": self.unpacked,
            "entries": len(self.index.entries),
        }


class LayerResolver:
    """Obtains layer indexes for one image and opens their blobs in the shared cache."""

    def __init__(
        self,
        client: RegistryClient,
        reference: Reference,
        cache: BlobCache,
        store: IndexStore,
        *,
        published: PublishedIndexes | None = None,
        gzip_spacing: int = 1 << 20,
    ) -> None:
        self._client = client
        self._reference = reference
        self._cache = cache
        self._store = store
        self._gzip_spacing = gzip_spacing
        self._published = published

    def _fetcher(self, digest: str) -> Callable[[int, int], Awaitable[bytes]]:
        async def fetch(offset: int, length: int) -> bytes:
            return await self._client.read_range(self._reference, digest, offset, length)

        return fetch

    def _open_blob(self, descriptor: Descriptor, index: LayerIndex | None) -> CachedBlob:
        """Open the blob in the cache: in span-sized chunks, or in small ones for an index without span digests."""
        fine = index is not None and not index.span_digests
        blob = self._cache.open(
            descriptor.digest,
            descriptor.size,
            self._fetcher(descriptor.digest),
            chunk_size=FINE_CHUNK_SIZE if fine else SPAN_SIZE,
            # Small chunks are widened by the layer's directory-aware read-ahead, not blindly.
            min_fetch=0 if fine else MIN_FETCH_BYTES,
        )
        if index is not None and index.span_size == SPAN_SIZE and index.span_digests:
            blob.set_span_digests(index.span_digests)
        return blob

    async def open_layer(
        self,
        descriptor: Descriptor,
        diff_id: str = "",
        progress: Progress | None = None,
        *,
        allow_download: bool = True,
    ) -> Layer:
        """Return a served layer for ``descriptor``, obtaining its index the cheapest way.

        With ``allow_download=False`` a layer that would have to be streamed whole to be indexed
        raises NotServedLazily instead (containerd then pulls it itself).

        Raises:
            NotServedLazily: no index without a download, and downloads were not allowed.
            LayerFormatError, IntegrityError: the blob is malformed or does not match its digest.
            RegistryError, FetchError: the registry could not serve what was needed.
        """
        # Loading and saving indexes is CPU work (thousands of entries, compressed windows): keep it
        # off the trio loop, where other layers are being opened at the same time.
        stored = await trio.to_thread.run_sync(self._store.get, descriptor.digest)
        if stored is not None:
            return await self._layer(
                descriptor, stored, HOW_STORED, "an index of this blob was stored earlier"
            )
        fmt = layer_format(descriptor.media_type)
        # A layer that declares its TOC (the annotation ctr-remote writes) is served from it: looking
        # for a published index first would only cost a round trip to the registry.
        declared_estargz = declares_estargz_toc(descriptor)
        published = None
        if self._published is not None and not declared_estargz:
            published = await self._published.get(descriptor, diff_id)
        if published is not None:
            await trio.to_thread.run_sync(self._store.put, published)
            layer = await self._layer(descriptor, published, HOW_STORED, "an index published in the registry")
            assert self._published is not None
            layer.downloaded_bytes = self._published.bytes_fetched.get(descriptor.digest, 0)
            return layer
        if fmt is LayerFormat.GZIP:
            estargz = await self._try_estargz(descriptor)
            if estargz is not None:
                await trio.to_thread.run_sync(self._store.put, estargz.index)
                layer = await self._layer(descriptor, estargz.index, HOW_ESTARGZ, _estargz_reason(descriptor))
                if estargz.prefetch_end <= PREFETCH_MAX_BYTES:
                    layer.prefetch_end = estargz.prefetch_end  # fetched by prefetch_landmark()
                return layer
        if not allow_download:
            raise NotServedLazily(
                f"layer {descriptor.digest}: no stored or published index and no eStargz TOC "
                "(publish one with `lazysnap index push`)"
            )
        return await self._download_and_index(descriptor, fmt, diff_id, progress)

    async def _layer(self, descriptor: Descriptor, index: LayerIndex, how: str, reason: str) -> Layer:
        blob = self._open_blob(descriptor, index)
        if is_randomly_accessible(index):
            reader = LayerReader(index, blob.read)
            return Layer(descriptor, index, how, reason, blob, reader, readahead=SiblingReadahead(index))
        # No seek points (a single zstd frame): every read would inflate from the blob's start.
        # Fetch it whole once, decompress it once to local disk, and read files straight from that.
        reader = await _local_tar_reader(blob, index)
        reason = (
            "the blob has no seek points (single zstd frame): fetched whole, decompressed once to local disk"
        )
        layer = Layer(descriptor, index, HOW_DOWNLOADED, reason, blob, reader)
        layer.diff_id_verified = layer.unpacked = True  # _local_tar_reader checked the tar's DiffID
        return layer

    async def _try_estargz(self, descriptor: Descriptor) -> EstargzLayer | None:
        """Read the eStargz footer and TOC if the blob has them; None when it is a plain gzip blob."""
        # The blob's chunk size in the cache depends on what the probe finds: its reads go to the
        # registry directly and are handed to the cache afterwards (the tail holds file data too).
        toc_digest = descriptor.annotations.get(TOC_DIGEST_ANNOTATION)
        fetch = self._fetcher(descriptor.digest)
        probed: list[tuple[int, bytes]] = []

        async def probe(offset: int, length: int) -> bytes:
            data = await fetch(offset, length)
            probed.append((offset, data))
            return data

        try:
            found = await read_estargz(
                probe,
                descriptor.size,
                digest=descriptor.digest,
                media_type=descriptor.media_type,
                toc_digest=toc_digest,
                # Without the annotation the blob is most likely plain gzip, about to be downloaded
                # whole: a large speculative tail would be fetched for nothing.
                speculative_tail=None if toc_digest else UNDECLARED_TAIL_PROBE,
            )
        except DigestMismatch:
            raise
        except LayerFormatError as error:
            if toc_digest:
                raise  # the annotation says this is eStargz: a broken TOC is an error, not a plain gzip
            log.debug("not eStargz: %s: %s", descriptor.digest, error)
            return None
        blob = self._open_blob(descriptor, found.index)
        for offset, data in probed:
            blob.store(offset, data)
        return found

    async def _download_and_index(
        self, descriptor: Descriptor, fmt: LayerFormat, diff_id: str, progress: Progress | None
    ) -> Layer:
        """Stream the whole blob once: build its index and fill the cache from the same bytes."""
        # Imported here: the builder loads libz through ctypes (~10 ms), which a mount whose layers
        # all have a TOC or an index would otherwise pay before it is ready.
        from index.builder import LayerIndexBuilder

        blob = self._open_blob(descriptor, None)
        builder = LayerIndexBuilder(
            descriptor.media_type,
            fmt,
            digest=descriptor.digest,
            gzip_spacing=self._gzip_spacing,
            span_size=SPAN_SIZE,
        )
        offset = 0
        try:
            async for piece in self._client.stream_blob(self._reference, descriptor.digest):
                blob.store_stream(offset, piece)
                # feed() inflates and may wait for its worker thread: keep it off the trio loop.
                await trio.to_thread.run_sync(builder.feed, piece)
                offset += len(piece)
                if progress is not None:
                    progress(descriptor.digest, offset, descriptor.size)
            index = await trio.to_thread.run_sync(builder.finish)
        except LazysnapError:
            blob.reset()
            raise
        if diff_id and index.diff_id != diff_id:
            blob.reset()
            raise DigestMismatch(f"layer {descriptor.digest} (uncompressed tar)", diff_id, index.diff_id)
        blob.set_span_digests(index.span_digests)
        blob.mark_verified()
        await trio.to_thread.run_sync(self._store.put, index)
        layer = await self._layer(descriptor, index, HOW_DOWNLOADED, "no stored index and no TOC in the blob")
        layer.downloaded_bytes = offset
        layer.diff_id_verified = bool(diff_id)
        return layer


async def _local_tar_reader(blob: CachedBlob, index: LayerIndex) -> LayerReader:
    """A reader of ``index``'s files from the blob's uncompressed tar, made once under the blob's cache dir.

    Raises:
        DigestMismatch: the blob or its tar does not match its digest or DiffID (nothing is kept).
        FetchError: the blob could not be fetched.
    """
    if not blob.complete:
        await blob.fill(yield_to_foreground=False)
    if not blob.verified:
        await blob.verify_whole()
    tar_path = blob.directory / "uncompressed.tar"
    if not tar_path.exists():
        await trio.to_thread.run_sync(_decompress_once, blob.directory / "data", index, tar_path)
    tar_fd = os.open(tar_path, os.O_RDONLY)  # held for the process's life, like the blob's own files

    async def read_tar(offset: int, length: int) -> bytes:
        return os.pread(tar_fd, length, offset)

    plain = LayerIndex(
        index.media_type,
        LayerFormat.TAR,
        index.digest,
        index.uncompressed_size,
        index.diff_id,
        index.uncompressed_size,
        index.entries,
    )
    return LayerReader(plain, read_tar)


def _decompress_once(blob_path: os.PathLike[str], index: LayerIndex, tar_path: os.PathLike[str]) -> None:
    """Write the uncompressed tar of a local blob, checked against the DiffID before it is kept."""
    temporary = f"{os.fspath(tar_path)}.partial"
    with open(temporary, "wb") as out:
        actual = _diff_id_of(blob_path, index.format, copy_to=out)
    if index.diff_id and actual != index.diff_id:
        os.unlink(temporary)
        raise DigestMismatch(f"layer {index.digest} (uncompressed tar)", index.diff_id, actual)
    os.replace(temporary, tar_path)


class ChainSource:
    """File bytes of a chain of layers, bottom first, for the FUSE operations."""

    def __init__(self, layers: Sequence[Layer], *, read_timeout: float | None = None) -> None:
        self.layers = list(layers)
        # None: a read waits as long as the registry client's own timeouts and retries take.
        self.read_timeout = read_timeout

    async def prefetch(self, layer: int, entry: Entry) -> None:
        """Fetch a file's compressed bytes into the cache ahead of its reads; raises as ``read``."""
        await self.layers[layer].prefetch(entry)

    async def read(self, layer: int, entry: Entry, offset: int, length: int) -> bytes:
        """Read a file's bytes from the layer that holds them.

        Raises:
            IntegrityError, FetchError: as the layer's reader raises them (FUSE answers EIO).
            FetchTimeout: the read needed longer than ``read_timeout`` however retries went.
        """
        if self.read_timeout is None:
            return await self.layers[layer].read(entry, offset, length)
        with trio.move_on_after(self.read_timeout):
            return await self.layers[layer].read(entry, offset, length)
        raise FetchTimeout(
            f"{entry.path} in layer {self.layers[layer].descriptor.digest}: bytes {offset}-{offset + length} "
            f"not read within {self.read_timeout} s; the registry may be unreachable"
        )


def declares_estargz_toc(descriptor: Descriptor) -> bool:
    """Whether a gzip layer declares an eStargz TOC (the annotation ``ctr-remote`` writes): served from it."""
    return (
        layer_format(descriptor.media_type) is LayerFormat.GZIP
        and TOC_DIGEST_ANNOTATION in descriptor.annotations
    )


async def verify_layer(layer: Layer, diff_id: str) -> None:
    """Check a complete cached blob against its digest and its DiffID, marking the layer verified.

    Raises:
        DigestMismatch: the blob or its uncompressed tar does not match (the cache entry is reset).
    """
    if not layer.blob.verified:
        await layer.blob.verify_whole()
    if layer.index.format in (LayerFormat.GZIP, LayerFormat.ZSTD) and not layer.unpacked:
        # Checking the DiffID decompresses the whole blob anyway: keep the tar it yields, so that
        # from now on a read is a pread instead of inflating a span (the decompressed-span cache
        # on disk; it costs the layer's uncompressed size, as an eager unpack would).
        if diff_id and layer.index.diff_id != diff_id:
            layer.blob.reset()
            raise DigestMismatch(
                f"layer {layer.descriptor.digest} (its index's DiffID)", diff_id, layer.index.diff_id
            )
        try:
            layer.reader = await _local_tar_reader(layer.blob, layer.index)
        except DigestMismatch:
            layer.blob.reset()
            raise
        layer.unpacked = True
        layer.diff_id_verified = bool(layer.index.diff_id)
        return
    if diff_id and not layer.diff_id_verified:
        actual = await trio.to_thread.run_sync(_diff_id_of, layer.blob.directory / "data", layer.index.format)
        if actual != diff_id:
            layer.blob.reset()
            raise DigestMismatch(f"layer {layer.descriptor.digest} (uncompressed tar)", diff_id, actual)
        layer.diff_id_verified = True


def _diff_id_of(path: os.PathLike[str], fmt: LayerFormat, copy_to: BinaryIO | None = None) -> str:
    """sha256 of the uncompressed tar of a local blob, also written to ``copy_to`` when given."""
    hasher = hashlib.sha256()
    with open(path, "rb") as raw:
        stream = open_tar_stream(raw, fmt)
        while block := stream.read(4 << 20):
            hasher.update(block)
            if copy_to is not None:
                copy_to.write(block)
    return "sha256:" + hasher.hexdigest()


def _estargz_reason(descriptor: Descriptor) -> str:
    if TOC_DIGEST_ANNOTATION in descriptor.annotations:
        return "the blob's TOC, verified against its toc.digest annotation"
    return "the blob's TOC (no toc.digest annotation: the TOC itself is not pinned)"
