"""The ladder of index sources: each layer's index obtained the cheapest way its trust rules allow.

For every layer descriptor, in this order (docs/trust.md has the rules):

1. ``stored``      a trusted index of this blob in the local store: built here from a blob whose
                   digest was verified; usable for any image holding the blob;
2. ``estargz``     the layer declares its eStargz TOC with the ``toc.digest`` annotation: the TOC
                   (stored earlier for that TOC digest, or read from the blob's tail) is pinned by
                   the manifest through the annotation;
3. ``published``   an index published next to the image (``lazysnap index push``), found through
                   a tag: trusted only for the repository it was published in, and not at all for
                   a pull by digest unless the configuration says so;
4. an eStargz TOC *without* the annotation, only with ``allow_unpinned_toc``: nothing pins it;
5. ``downloaded``  stream the blob once: the index is built from the stream while the same bytes
                   fill the cache, so nothing is fetched twice.

Every stored or published index is checked before use (``refusal``): it must describe this blob,
in the format its media type says, with span digests at the cache's span size (eStargz: a digest
for every chunk). One that fails is refused with a logged reason and the ladder goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from index.consistency import check_index
from index.errors import DigestMismatch, LayerFormatError
from index.estargz import EstargzLayer, read_estargz
from index.model import LayerFormat, LayerIndex
from index.readahead import SiblingReadahead
from index.reader import LayerReader, is_randomly_accessible
from snapshotter.cache.blob_cache import BlobCache, CachedBlob
from snapshotter.cache.index_store import IndexStore
from snapshotter.config import Config
from snapshotter.errors import NotServedLazily, RangeIgnored
from snapshotter.layers.layer import (
    HOW_DOWNLOADED,
    HOW_ESTARGZ,
    HOW_STORED,
    IndexSource,
    Layer,
    PrefetchLimits,
)
from snapshotter.layers.published import PublishedIndexes
from snapshotter.layers.verify import local_tar_reader
from snapshotter.layers.whole_blob import WholeBlobFill
from snapshotter.remote.client import Descriptor, RegistryClient
from snapshotter.remote.media_types import layer_format
from snapshotter.remote.reference import Reference

__all__ = [
    "HOW_DOWNLOADED",
    "HOW_ESTARGZ",
    "HOW_STORED",
    "SPAN_SIZE",
    "TOC_DIGEST_ANNOTATION",
    "LayerResolver",
    "NotServedLazily",
    "SourceSettings",
]

log = logging.getLogger(__name__)

TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
# Bytes of a gzip blob's tail read to look for an eStargz footer when no annotation declares
# one: enough for the footer (and a small TOC); a larger TOC then costs one more request.
UNDECLARED_TAIL_PROBE = 4 << 10
# The cache's chunk size equals the index's span size, so each fetched chunk can be verified
# alone. Not tunable: published indexes are built with it, and an index at another span size
# can't be verified chunk by chunk (it is refused).
SPAN_SIZE = 64 << 10

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SourceSettings:
    """The ladder's tunables and trust switches (from ``[layers]`` in the config)."""

    # Uncompressed bytes between gzip checkpoints of an index built here.
    gzip_spacing: int = 1 << 20
    # Blobs without span digests (eStargz) are cached in small chunks, so a cold read fetches its
    # gzip members and little else: 64 KiB alignment cost `import json` on the eStargz python
    # image 6.4 MB where its files take 4.7 MB.
    fine_chunk_size: int = 4 << 10
    limits: PrefetchLimits = field(default_factory=PrefetchLimits)
    # An eStargz TOC nothing pins (no toc.digest annotation) is not served lazily unless set.
    allow_unpinned_toc: bool = False
    # A pull by digest uses indexes found through a tag only if set.
    trust_tag_indexes_for_digest_pulls: bool = False
    # A layer whose tar inflates past this is refused (a gzip or zstd bomb), as it streams.
    max_uncompressed_bytes: int = 64 << 30


def source_settings(config: Config) -> SourceSettings:
    """The ladder's settings from ``[layers]`` of ``config``."""
    layers = config.layers
    return SourceSettings(
        gzip_spacing=layers.gzip_spacing_bytes,
        fine_chunk_size=layers.fine_chunk_bytes,
        limits=PrefetchLimits(
            landmark_max_bytes=layers.landmark_prefetch_max_bytes,
            landmark_piece_bytes=layers.landmark_prefetch_piece_bytes,
            file_max_bytes=layers.file_prefetch_max_bytes,
        ),
        allow_unpinned_toc=layers.allow_unpinned_toc,
        trust_tag_indexes_for_digest_pulls=layers.trust_tag_indexes_for_digest_pulls,
        max_uncompressed_bytes=layers.max_uncompressed_bytes,
    )


def toc_scope(toc_digest: str) -> str:
    """The index-store scope of indexes read from a TOC with this (annotation-pinned) digest."""
    return f"toc:{toc_digest}"


def repository_scope(reference: Reference) -> str:
    """The index-store scope of indexes published in ``reference``'s repository."""
    return f"repo:{reference.name}"


def declared_toc_digest(descriptor: Descriptor) -> str:
    """The eStargz TOC digest a gzip layer declares (the annotation ``ctr-remote`` writes), or ""."""
    if layer_format(descriptor.media_type) is not LayerFormat.GZIP:
        return ""
    return descriptor.annotations.get(TOC_DIGEST_ANNOTATION, "")


def refusal(index: LayerIndex, descriptor: Descriptor, toc_digest: str = "", diff_id: str = "") -> str:
    """Why ``index`` must not serve the layer ``descriptor`` (one line), or "" when it may.

    ``toc_digest``: for an index read from an eStargz TOC, the digest that pins it; ``diff_id``:
    the layer's DiffID from the image config, when known. What the index says of itself and its
    blob (format, size, span and chunk digests, offsets, overlaps) is ``index.consistency``'s.
    """
    if index.digest != descriptor.digest:
        return f"it describes blob {index.digest}"
    if diff_id and index.format is not LayerFormat.ESTARGZ and index.diff_id != diff_id:
        return f"its DiffID {index.diff_id} is not the image's {diff_id}"
    if toc_digest and index.toc_digest != toc_digest:
        return f"its TOC digest {index.toc_digest or '(none)'} is not the annotated {toc_digest}"
    expected = layer_format(descriptor.media_type)
    try:
        check_index(index, blob_size=descriptor.size, span_size=SPAN_SIZE, expected_format=expected)
    except LayerFormatError as error:
        return str(error)
    return ""


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
        settings: SourceSettings | None = None,
        pulled_by_digest: bool = False,
        nursery: trio.Nursery | None = None,
    ) -> None:
        """Resolve layers of the image at ``reference``.

        Args:
            published: the image's published-index listing; None to never look for one.
            nursery: where a blob whose registry ignores Range is streamed whole (outliving the
                read that started it); None streams it inside that read.
            pulled_by_digest: the user named the image by digest (``@sha256:`` in the reference
                they gave): an index found through a tag is then not trusted by default.
        """
        self._client = client
        self._reference = reference
        self._cache = cache
        self._store = store
        self._settings = settings or SourceSettings()
        # A pull by tag trusts what the tag's repository publishes, as it trusts the tag; a pull
        # by digest trusts nothing found through a tag unless configured to.
        self._trust_published = not pulled_by_digest or self._settings.trust_tag_indexes_for_digest_pulls
        self._published = published
        self._nursery = nursery
        self._whole: dict[str, WholeBlobFill] = {}  # by digest: the fill of a blob opened in the cache

    def _fetcher(self, descriptor: Descriptor) -> Callable[[int, int], Awaitable[bytes]]:
        """Range reads of the blob; where its registry ignores Range, reads of its one whole-blob stream."""
        whole = self._whole.setdefault(
            descriptor.digest, WholeBlobFill(self._client, self._reference, descriptor, self._nursery)
        )
        return whole.fetch

    def _open_blob(
        self, descriptor: Descriptor, index: LayerIndex | None, *, fine: bool = False
    ) -> CachedBlob:
        """Open the blob in the cache: in span-sized chunks, or in small ones for an eStargz index (or ``fine``)."""
        fine = fine or (index is not None and index.format is LayerFormat.ESTARGZ)
        blob = self._cache.open(
            descriptor.digest,
            descriptor.size,
            self._fetcher(descriptor),
            chunk_size=self._settings.fine_chunk_size if fine else SPAN_SIZE,
            # Small chunks are widened by the layer's directory-aware read-ahead, not blindly.
            min_fetch=0 if fine else None,  # None: the cache's configured minimum
        )
        if index is not None and not fine:
            blob.set_span_digests(index.span_digests)  # refusal() made sure they fit
        self._whole[descriptor.digest].attach(blob)
        return blob

    async def _stored_layer(
        self, descriptor: Descriptor, index: LayerIndex, scope: str, source: IndexSource, reason: str
    ) -> Layer:
        """The layer served from an index kept in the store under ``scope``."""
        layer = await self._layer(descriptor, index, source, reason)
        layer.store_scope = scope
        return layer

    async def _stored(
        self, descriptor: Descriptor, scope: str, toc_digest: str = "", diff_id: str = ""
    ) -> LayerIndex | None:
        """A usable stored index of the layer for ``scope``, or None (a refused one is dropped)."""
        # Loading an index is CPU work (thousands of entries, compressed windows): keep it off
        # the trio loop, where other layers are being opened at the same time.
        stored = await trio.to_thread.run_sync(self._store.get, descriptor.digest, scope)
        if stored is None:
            return None
        reason = refusal(stored, descriptor, toc_digest, diff_id)
        if reason:
            log.warning(
                "index-refused layer=%s source=stored scope=%s reason=%s", descriptor.digest, scope, reason
            )
            await trio.to_thread.run_sync(self._store.drop, descriptor.digest, scope)
            return None
        return stored

    async def open_layer(
        self,
        descriptor: Descriptor,
        diff_id: str = "",
        progress: Progress | None = None,
        *,
        allow_download: bool = True,
    ) -> Layer:
        """Return a served layer for ``descriptor``, obtaining its index the cheapest trusted way.

        With ``allow_download=False`` a layer that would have to be streamed whole to be indexed
        raises NotServedLazily instead (containerd then pulls it itself).

        Raises:
            NotServedLazily: no index without a download, and downloads were not allowed.
            LayerFormatError, IntegrityError: the blob is malformed or does not match its digest.
            RegistryError, FetchError: the registry could not serve what was needed.
        """
        stored = await self._stored(descriptor, "", diff_id=diff_id)
        if stored is not None:
            return await self._stored_layer(
                descriptor, stored, "", IndexSource.STORED, "an index of this blob was stored earlier"
            )
        fmt = layer_format(descriptor.media_type)
        toc_digest = declared_toc_digest(descriptor)
        if toc_digest:
            # A layer that declares its TOC is served from it: looking for a published index
            # first would only cost a round trip to the registry.
            scope = toc_scope(toc_digest)
            from_toc = await self._stored(descriptor, scope, toc_digest)
            if from_toc is None:
                estargz = await self._try_estargz(descriptor, toc_digest)
                if estargz is not None:
                    return await self._estargz_layer(descriptor, estargz, scope)
            else:
                reason = "the blob's TOC, stored earlier, pinned by its toc.digest annotation"
                return await self._stored_layer(descriptor, from_toc, scope, IndexSource.STORED, reason)
        elif self._trust_published:
            published = await self._published_index(descriptor, diff_id)
            if published is not None:
                return published
        if fmt is LayerFormat.GZIP and not toc_digest and self._settings.allow_unpinned_toc:
            estargz = await self._try_estargz(descriptor, "")
            if estargz is not None:
                return await self._estargz_layer(descriptor, estargz, None)
        if not allow_download:
            raise NotServedLazily(
                f"layer {descriptor.digest}: no trusted stored or published index and no pinned eStargz TOC "
                "(publish one with `lazysnap index push`)"
            )
        return await self._download_and_index(descriptor, fmt, diff_id, progress)

    async def _published_index(self, descriptor: Descriptor, diff_id: str) -> Layer | None:
        """The layer served from an index published in this image's repository (stored earlier, or fetched now), or None."""
        scope = repository_scope(self._reference)
        index = await self._stored(descriptor, scope, diff_id=diff_id)
        fetched = 0
        if index is None:
            if self._published is None:
                return None
            index = await self._published.get(descriptor, diff_id)
            if index is None:
                return None
            reason = refusal(index, descriptor, diff_id=diff_id)
            if reason:
                log.warning("index-refused layer=%s source=published reason=%s", descriptor.digest, reason)
                return None
            await trio.to_thread.run_sync(self._store.put, index, scope)
            fetched = self._published.bytes_fetched.get(descriptor.digest, 0)
        layer = await self._stored_layer(
            descriptor, index, scope, IndexSource.PUBLISHED, "an index published in the registry"
        )
        layer.downloaded_bytes = fetched
        return layer

    async def _estargz_layer(self, descriptor: Descriptor, estargz: EstargzLayer, scope: str | None) -> Layer:
        """The layer served from its TOC; stored for ``scope`` (None: not stored, nothing pins it)."""
        if scope is not None:
            await trio.to_thread.run_sync(self._store.put, estargz.index, scope)
        reason = (
            "the blob's TOC, pinned by its toc.digest annotation"
            if scope is not None
            else "the blob's TOC (no toc.digest annotation: allowed by allow_unpinned_toc, nothing pins it)"
        )
        layer = await self._layer(descriptor, estargz.index, IndexSource.ESTARGZ, reason)
        layer.store_scope = scope
        if estargz.prefetch_end <= self._settings.limits.landmark_max_bytes:
            layer.prefetch_end = estargz.prefetch_end  # fetched by prefetch_landmark()
        return layer

    async def _layer(
        self, descriptor: Descriptor, index: LayerIndex, source: IndexSource, reason: str
    ) -> Layer:
        blob = self._open_blob(descriptor, index)
        limits = self._settings.limits
        # A whole-blob stream under way stops with its layer.
        on_close = [self._whole[descriptor.digest].cancel]
        if is_randomly_accessible(index):
            reader = LayerReader(index, blob.read)
            return Layer(
                descriptor,
                index,
                source,
                reason,
                blob,
                reader,
                limits,
                readahead=SiblingReadahead(index),
                on_close=on_close,
            )
        # No seek points (a single zstd frame): every read would inflate from the blob's start.
        # Fetch it whole once, decompress it once to local disk, and read files straight from that.
        reader, close = await local_tar_reader(blob, index)
        reason = (
            "the blob has no seek points (single zstd frame): fetched whole, decompressed once to local disk"
        )
        layer = Layer(
            descriptor,
            index,
            IndexSource.DOWNLOADED,
            reason,
            blob,
            reader,
            limits,
            on_close=[*on_close, close],
        )
        layer.diff_id_verified = layer.unpacked = True  # local_tar_reader checked the tar's DiffID
        return layer

    async def _try_estargz(self, descriptor: Descriptor, toc_digest: str) -> EstargzLayer | None:
        """Read the eStargz footer and TOC if the blob has them; None when it is a plain gzip blob.

        Raises:
            DigestMismatch: the TOC does not match ``toc_digest``.
            LayerFormatError: the layer declares a TOC (``toc_digest``) that is broken.
        """
        # The blob's chunk size in the cache depends on what the probe finds: its reads go to the
        # registry directly and are handed to the cache afterwards (the tail holds file data too).
        fetch = self._fetcher(descriptor)
        if toc_digest:
            # Declared eStargz is cached in fine chunks whatever the probe finds (a broken TOC is
            # an error, not a plain gzip blob). Open now: where the registry ignores Range, the
            # probe's answer is the whole blob, and it goes straight into the cache.
            self._open_blob(descriptor, None, fine=True)
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
                toc_digest=toc_digest or None,
                # Without the annotation the blob is most likely plain gzip, about to be downloaded
                # whole: a large speculative tail would be fetched for nothing.
                speculative_tail=None if toc_digest else UNDECLARED_TAIL_PROBE,
            )
        except DigestMismatch:
            raise
        except RangeIgnored as error:
            # Its registry can't serve the TOC alone: the blob is streamed whole once, and indexed.
            log.info("not served from its TOC: %s: %s", descriptor.digest, error)
            return None
        except LayerFormatError as error:
            if toc_digest:
                raise  # the annotation says this is eStargz: a broken TOC is an error, not a plain gzip
            log.debug("not eStargz: %s: %s", descriptor.digest, error)
            return None
        reason = refusal(found.index, descriptor, toc_digest)
        if reason:
            raise LayerFormatError(f"layer {descriptor.digest}: its eStargz TOC is refused: {reason}")
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
            gzip_spacing=self._settings.gzip_spacing,
            span_size=SPAN_SIZE,
            max_uncompressed=self._settings.max_uncompressed_bytes,
        )
        offset = 0
        try:
            pieces = self._client.stream_blob(
                self._reference, descriptor.digest, size=descriptor.size, kind="layer"
            )
            async for piece in pieces:
                blob.store_stream(offset, piece)
                # feed() inflates and may wait for its worker thread: keep it off the trio loop.
                await trio.to_thread.run_sync(builder.feed, piece)
                offset += len(piece)
                if progress is not None:
                    progress(descriptor.digest, offset, descriptor.size)
            index = await trio.to_thread.run_sync(builder.finish)
        except BaseException:
            blob.reset()
            raise
        if diff_id and index.diff_id != diff_id:
            blob.reset()
            raise DigestMismatch(f"layer {descriptor.digest} (uncompressed tar)", diff_id, index.diff_id)
        blob.set_span_digests(index.span_digests)
        blob.mark_verified()
        # Built here from a blob whose digest the stream verified: trusted for any image.
        await trio.to_thread.run_sync(self._store.put, index)
        layer = await self._layer(
            descriptor, index, IndexSource.DOWNLOADED, "no stored index and no TOC in the blob"
        )
        layer.downloaded_bytes = offset
        layer.diff_id_verified = bool(diff_id)
        return layer
