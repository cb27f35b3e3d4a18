"""A blob whose registry ignores Range: fetched whole, once, into the cache, while reads wait for their bytes.

A registry that answers a Range request with ``200`` and the whole blob would move the whole
blob for every read. ``WholeBlobFill.fetch`` is the cache's fetcher of one blob: a Range read,
and when the registry answers it with the whole blob, that answer's body (or, once the client
knows the registry, one GET of the blob) is streamed from its start into the cache. Every piece
is checked as a download is (span digests when the index has them, the whole blob's digest and
size at the end; eStargz chunks are checked by the reader), and each read returns as soon as
the chunks it needs are present. Concurrent reads share the one stream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing

import trio

from index.errors import IntegrityError
from snapshotter.cache.blob_cache import CachedBlob
from snapshotter.errors import RangeIgnored
from snapshotter.remote.client import Descriptor, RegistryClient
from snapshotter.remote.reference import Reference

log = logging.getLogger(__name__)


class WholeBlobFill:
    """One blob streamed whole into its cached blob on demand; reads wait for the chunks they need."""

    def __init__(
        self,
        client: RegistryClient,
        reference: Reference,
        descriptor: Descriptor,
        nursery: trio.Nursery | None = None,
    ) -> None:
        """Fill ``descriptor``'s blob from ``reference``'s registry.

        Args:
            nursery: where the stream runs, so that a read's timeout does not cancel the stream
                other reads wait for; None runs it inside the read that starts it.
        """
        self._client = client
        self._reference = reference
        self._descriptor = descriptor
        self._nursery = nursery
        self._blob: CachedBlob | None = None
        self._running = False
        self._failures = 0  # streams that failed: a read that saw one start or run fails with it
        self._error: Exception | None = None
        self._progress = trio.Event()
        self._scope = trio.CancelScope()
        self.streams = 0  # whole-blob GETs started, for tests and logs

    @property
    def attached(self) -> bool:
        """Whether a cached blob is attached (reads can be served)."""
        return self._blob is not None

    def attach(self, blob: CachedBlob) -> None:
        """Fill ``blob`` (the cache's blob of this descriptor) from now on."""
        self._blob = blob

    def cancel(self) -> None:
        """Stop a stream under way (the layer is closing); a later read starts another."""
        self._scope.cancel()

    async def fetch(self, offset: int, length: int) -> bytes:
        """Return blob bytes [offset, offset+length): a Range read, or from the one whole-blob stream where Range is ignored.

        Raises:
            RangeIgnored: the registry ignores Range and no cached blob is attached yet (a probe
                read before the blob is opened in the cache: the caller downloads it instead).
            IntegrityError: the streamed blob did not match its digest, size or span digests.
            FetchError, RegistryError: the registry could not serve the bytes.
        """
        failures = self._failures
        try:
            return await self._client.read_range(
                self._reference,
                self._descriptor.digest,
                offset,
                length,
                kind="layer",
                size=self._descriptor.size,
                on_whole=self._take if self._blob is not None else None,
            )
        except RangeIgnored:
            if self._blob is None:
                raise
        return await self._read(offset, length, failures)

    async def _read(self, offset: int, length: int, failures: int) -> bytes:
        """Blob bytes [offset, offset+length) once a stream stored them; raises what a stream failed with since ``failures``."""
        blob = self._blob
        assert blob is not None
        while not blob.is_present(offset, length):
            if self._failures != failures:
                assert self._error is not None
                raise self._error
            if not self._running:
                await self._start(blob)
                continue
            await self._progress.wait()
        return await blob.read(offset, length)

    async def _take(self, body: AsyncGenerator[bytes, None]) -> None:
        """Store the whole-blob body a range read got, unless a stream is already under way (then it is dropped)."""
        if self._running or self._blob is None:
            return
        self._begin()
        await self._consume(self._blob, body)

    async def _start(self, blob: CachedBlob) -> None:
        """Start one GET of the whole blob: in the nursery, or in this read when there is none."""
        self._begin()
        if self._nursery is None:
            await self._stream(blob)
        else:
            self._nursery.start_soon(self._stream, blob)

    def _begin(self) -> None:
        self._running = True
        self.streams += 1
        self._scope = trio.CancelScope()
        log.info(
            "range-ignored layer=%s registry=%s fetching=whole-blob",
            self._descriptor.digest,
            self._reference.registry,
        )

    async def _stream(self, blob: CachedBlob) -> None:
        descriptor = self._descriptor
        stream = self._client.stream_blob(
            self._reference, descriptor.digest, size=descriptor.size, kind="layer"
        )
        await self._consume(blob, stream)

    async def _consume(self, blob: CachedBlob, body: AsyncGenerator[bytes, None]) -> None:
        """Store a whole-blob body into the cache; errors go to the waiting reads, never to the caller."""
        descriptor = self._descriptor
        offset = 0
        try:
            with self._scope:
                async with aclosing(body) as pieces:
                    async for piece in pieces:
                        blob.store_stream(offset, piece)
                        offset += len(piece)
                        blob.stats.bytes_fetched += len(piece)
                        self._wake()
                blob.stats.fetch_requests += 1
                blob.mark_verified()
        except Exception as error:
            if isinstance(error, IntegrityError):
                # Chunks without span digests were kept on the stream's word: forget them all.
                blob.reset()
            self._error = error
            self._failures += 1
            log.warning("whole-blob-fetch-failed layer=%s error=%s", descriptor.digest, error)
        finally:
            self._running = False
            self._wake()

    def _wake(self) -> None:
        self._progress.set()
        self._progress = trio.Event()
