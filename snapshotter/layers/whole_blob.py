"""A blob whose registry ignores Range: fetched whole, once, into the cache, while reads wait for their bytes.

A registry that answers a Range request with ``200`` and the whole blob would move the whole
blob for every read (or what the kernel buffered of it before the connection was dropped). The
registry client raises ``RangeIgnored`` instead; the layer's fetcher then hands the read to the
blob's ``WholeBlobFill``: one GET streams the blob from its start into the cache, every piece
checked as a download is (span digests when the index has them, the whole blob's digest and size
at the end; eStargz chunks are checked by the reader), and each read returns as soon as the
chunks it needs are present. Concurrent reads share the one stream.
"""

from __future__ import annotations

import logging
from contextlib import aclosing

import trio

from index.errors import IntegrityError
from snapshotter.cache.blob_cache import CachedBlob
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

    async def read(self, offset: int, length: int) -> bytes:
        """Return blob bytes [offset, offset+length) once the stream has stored them.

        Raises:
            IntegrityError: the streamed blob did not match its digest, size or span digests.
            FetchError, RegistryError: the stream failed.
        """
        blob = self._blob
        assert blob is not None, "attach() the cached blob before reading through it"
        failures = self._failures
        while not blob.is_present(offset, length):
            if self._failures != failures:
                assert self._error is not None
                raise self._error
            if not self._running:
                await self._start(blob)
                continue
            await self._progress.wait()
        return await blob.read(offset, length)

    async def _start(self, blob: CachedBlob) -> None:
        self._running = True
        self.streams += 1
        self._scope = trio.CancelScope()
        log.info(
            "range-ignored layer=%s registry=%s fetching=whole-blob",
            self._descriptor.digest,
            self._reference.registry,
        )
        if self._nursery is None:
            await self._stream(blob)
        else:
            self._nursery.start_soon(self._stream, blob)

    async def _stream(self, blob: CachedBlob) -> None:
        """One GET of the whole blob into the cache; errors go to the waiting reads, never to the nursery."""
        descriptor = self._descriptor
        offset = 0
        try:
            with self._scope:
                stream = self._client.stream_blob(
                    self._reference, descriptor.digest, size=descriptor.size, kind="layer"
                )
                async with aclosing(stream) as pieces:
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
