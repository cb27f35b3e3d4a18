"""The chain-serving core shared by ``lazysnap mount`` and ``lazysnap serve``.

It opens the layers of a chain (concurrently, each blob once however many chains share it),
merges them into one tree, serves their bytes with one read timeout, runs each layer's landmark
prefetch, background fill and verification as tasks in a nursery it owns, and forgets a layer
(its tasks cancelled, its files closed) once no chain uses it. Error handling, timeouts and
concurrency are defined here once; the mount daemon and the snapshot service only decide which
chains to show and where.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from fusefs.merged_tree import MergedTree
from index.completion_check import verify_index
from index.errors import IntegrityError, LayerFormatError, LazysnapError
from index.model import Entry
from snapshotter.cache.blob_cache import BlobCache
from snapshotter.cache.index_store import IndexStore
from snapshotter.config import Config
from snapshotter.errors import FetchTimeout, unwrap_groups
from snapshotter.layers.layer import IndexSource, Layer
from snapshotter.layers.published import PublishedIndexes
from snapshotter.layers.sources import (
    LayerResolver,
    Progress,
    SourceSettings,
    declared_toc_digest,
    source_settings,
)
from snapshotter.layers.verify import verify_layer
from snapshotter.remote.client import Descriptor, RegistryClient
from snapshotter.remote.reference import Reference

log = logging.getLogger(__name__)

DiffId = Callable[[], Awaitable[str]]
# The deadline of a read of a layer whose last read timed out (see ChainSource.read), at most a
# quarter of the read timeout: long enough for a recovered registry to answer a span, and the
# first attempt gets the read timeout minus this, so a failed read and the kernel's retry of it
# together stay within fuse.read_timeout_seconds.
DEGRADED_READ_SECONDS = 5.0


def retry_budget(read_timeout: float) -> float:
    """The deadline of a read of a layer whose last read timed out."""
    return min(DEGRADED_READ_SECONDS, read_timeout / 4)


def first_attempt_budget(read_timeout: float) -> float:
    """The deadline of a read of a healthy layer: the timeout less the retry and the kernel's round trips."""
    # Measured: a failed read and its retry cost ~30 ms beyond the two deadlines (FUSE round trips).
    return read_timeout - retry_budget(read_timeout) - min(0.5, read_timeout / 20)


@dataclass(frozen=True)
class ServeSettings:
    """How chains are served (from ``[fuse]``, ``[background_fetch]`` and ``[layers]`` in the config)."""

    # A read that needs the registry fails with EIO after this, however retries go (None: never).
    read_timeout: float | None = 60.0
    # Fetch the rest of every layer after it is shown, so containers survive a registry outage.
    background_fetch: bool = True
    # Wait this long after a layer is shown before its background fill starts.
    background_delay: float = 0.0
    # Layers opened at once: each may be a whole-blob download, so a few in parallel fill the
    # link without starving the first layers the merge needs.
    parallel_layer_opens: int = 3
    sources: SourceSettings = field(default_factory=SourceSettings)


def serve_settings(config: Config, *, background_delay: float | None = None) -> ServeSettings:
    """The core's settings from ``config`` (``background_delay``: overrides ``background_fetch.delay_seconds``)."""
    fill = config.background_fetch
    return ServeSettings(
        read_timeout=config.fuse.read_timeout_seconds,
        background_fetch=fill.enabled,
        background_delay=fill.delay_seconds if background_delay is None else background_delay,
        parallel_layer_opens=config.layers.parallel_layer_opens,
        sources=source_settings(config),
    )


@dataclass(frozen=True)
class LayerRequest:
    """One layer to open: its descriptor, the image it was found in, and how to get its DiffID."""

    descriptor: Descriptor
    reference: Reference
    # The DiffID from the image config, awaited only when needed (the config may still be loading).
    diff_id: DiffId
    published: PublishedIndexes | None = None
    pulled_by_digest: bool = False


def _pieces(path: Path, size: int = 4 << 20) -> Iterator[bytes]:
    """The bytes of a local file, in pieces (a layer may be many GB)."""
    with open(path, "rb") as file:
        while piece := file.read(size):
            yield piece


def known_diff_id(diff_id: str) -> DiffId:
    """A DiffId for a value already known."""

    async def get() -> str:
        return diff_id

    return get


class ChainSource:
    """File bytes of a chain of layers, bottom first, for the FUSE operations."""

    def __init__(
        self,
        layers: Sequence[Layer],
        *,
        read_timeout: float | None = None,
        on_close: Callable[[ChainSource], None] | None = None,
    ) -> None:
        self.layers = list(layers)
        self.read_timeout = read_timeout
        self._on_close = on_close

    async def prefetch(self, layer: int, entry: Entry) -> None:
        """Fetch a file's compressed bytes into the cache ahead of its reads; raises as ``read``."""
        await self.layers[layer].prefetch(entry)

    async def read(self, layer: int, entry: Entry, offset: int, length: int) -> bytes:
        """Read a file's bytes from the layer that holds them.

        Raises:
            IntegrityError, FetchError: as the layer's reader raises them (FUSE answers EIO).
            FetchTimeout: the read needed longer than its deadline however retries went.
        """
        served = self.layers[layer]
        if self.read_timeout is None:
            return await served.read(entry, offset, length)
        # After a read of a layer timed out, the kernel retries it at once (a failed read-ahead is
        # followed by the synchronous read of the same pages): until a read of that layer succeeds
        # again its reads get a short deadline, so one outage costs one timeout, not one per retry.
        if served.degraded:
            timeout = retry_budget(self.read_timeout)
        else:
            timeout = first_attempt_budget(self.read_timeout)
        with trio.move_on_after(timeout):
            data = await served.read(entry, offset, length)
            served.degraded = False
            return data
        served.degraded = True
        raise FetchTimeout(
            f"{entry.path} in layer {served.descriptor.digest}: bytes {offset}-{offset + length} "
            f"not read within {timeout} s; the registry may be unreachable"
        )

    def close(self) -> None:
        """The tree this source serves is gone and none of its files is open: its layers may be forgotten."""
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close(self)


class ChainCore:
    """Opens, shares, serves, fills, verifies and forgets the layers of every chain of one process."""

    def __init__(
        self,
        client: RegistryClient,
        cache: BlobCache,
        store: IndexStore,
        nursery: trio.Nursery,
        settings: ServeSettings | None = None,
    ) -> None:
        """Serve chains with ``client``, ``cache`` and ``store``; background tasks run in ``nursery``."""
        self.settings = settings or ServeSettings()
        self._client = client
        self._cache = cache
        self._store = store
        self._nursery = nursery
        self._layers: dict[str, Layer] = {}  # by blob digest
        self._opening: dict[str, trio.Event] = {}
        self._users: dict[str, int] = {}  # chain sources using each layer
        self._tasks: dict[str, trio.CancelScope] = {}  # each running layer's background work
        # Fills wait for this: a mount opens its layers first and starts filling once it is ready,
        # so background requests never compete with the downloads that make it ready.
        self._fills_allowed = trio.Event()

    def allow_fills(self) -> None:
        """Let background fills start (they wait for this; landmark prefetches do not)."""
        self._fills_allowed.set()

    @property
    def layers(self) -> list[Layer]:
        """Every layer currently open."""
        return list(self._layers.values())

    async def open_layer(
        self, request: LayerRequest, *, allow_download: bool = True, progress: Progress | None = None
    ) -> Layer:
        """The served layer of ``request``'s blob, opened once however many chains ask for it.

        Raises:
            NotServedLazily: no index without a download, and downloads were not allowed.
            LazysnapError: the layer could not be opened (its registry, format or digests failed).
        """
        digest = request.descriptor.digest
        while digest in self._opening:
            await self._opening[digest].wait()
        if digest in self._layers:
            return self._layers[digest]
        self._opening[digest] = trio.Event()
        try:
            # A nursery inside the resolver (a cache fetch, a prefetch) wraps what it raises: the
            # callers report one line, so they get the error itself.
            with unwrap_groups(LazysnapError, OSError):
                layer = await self._open(request, allow_download, progress)
        finally:
            self._opening.pop(digest).set()
        self._layers[digest] = layer
        self._users.setdefault(digest, 0)
        scope = self._tasks[digest] = trio.CancelScope()
        self._nursery.start_soon(self._background, layer, request.diff_id, scope)
        return layer

    async def _open(self, request: LayerRequest, allow_download: bool, progress: Progress | None) -> Layer:
        resolver = LayerResolver(
            self._client,
            request.reference,
            self._cache,
            self._store,
            published=request.published,
            settings=self.settings.sources,
            pulled_by_digest=request.pulled_by_digest,
            # A blob streamed whole (its registry ignores Range) outlives the read that started it.
            nursery=self._nursery,
        )
        # A layer that declares its TOC is served from it without its DiffID: don't wait for the config.
        declared = bool(declared_toc_digest(request.descriptor))
        diff_id = "" if declared else await request.diff_id()
        return await resolver.open_layer(request.descriptor, diff_id, progress, allow_download=allow_download)

    async def open_layers(
        self,
        requests: Sequence[LayerRequest],
        *,
        allow_download: bool = True,
        progress: Progress | None = None,
        on_opened: Callable[[int, Layer], None] | None = None,
    ) -> list[Layer]:
        """Open ``requests`` concurrently (at most ``parallel_layer_opens`` at once), in order.

        The first failure cancels the other opens and is raised alone, as the one-line error it
        is, never wrapped in an exception group.

        Raises:
            LazysnapError, OSError: as ``open_layer`` raises them, for the lowest failed layer.
        """
        opened: list[Layer | None] = [None] * len(requests)
        failures: dict[int, Exception] = {}
        limiter = trio.CapacityLimiter(max(1, self.settings.parallel_layer_opens))

        async def open_one(number: int, nursery: trio.Nursery) -> None:
            try:
                async with limiter:
                    layer = await self.open_layer(
                        requests[number], allow_download=allow_download, progress=progress
                    )
            except (LazysnapError, OSError) as error:
                failures[number] = error
                nursery.cancel_scope.cancel()
                return
            opened[number] = layer
            if on_opened is not None:
                on_opened(number, layer)

        async with trio.open_nursery() as nursery:
            for number in range(len(requests)):
                nursery.start_soon(open_one, number, nursery)
        if failures:
            raise failures[min(failures)]
        return [layer for layer in opened if layer is not None]

    async def chain(self, layers: Sequence[Layer]) -> tuple[MergedTree, ChainSource]:
        """The merged tree of ``layers`` (bottom first) and the source of its bytes, holding the layers until it closes.

        Raises:
            LayerFormatError: the layers can't be merged (e.g. a hardlink to nothing).
        """
        # Merging thousands of entries is CPU work: off the trio loop, where other chains are served.
        tree = await trio.to_thread.run_sync(MergedTree.build, [layer.index.entries for layer in layers])
        for layer in layers:
            self._users[layer.descriptor.digest] = self._users.get(layer.descriptor.digest, 0) + 1
        source = ChainSource(layers, read_timeout=self.settings.read_timeout, on_close=self._release)
        return tree, source

    def _release(self, source: ChainSource) -> None:
        """A chain's tree is gone: forget the layers no other chain uses (tasks cancelled, files closed)."""
        for layer in source.layers:
            digest = layer.descriptor.digest
            self._users[digest] = self._users.get(digest, 1) - 1
            if self._users[digest] <= 0 and self._layers.get(digest) is layer:
                self.forget(digest)

    def forget(self, digest: str) -> None:
        """Stop a layer's background work and close what it holds; its cached blob stays on disk for later."""
        layer = self._layers.pop(digest, None)
        self._users.pop(digest, None)
        scope = self._tasks.get(digest)
        if scope is not None:
            # Its task closes the layer once it has stopped: a thread it waits for (hashing,
            # decompressing) may still be reading the blob's files.
            scope.cancel()
        elif layer is not None:
            self._close(layer)

    def _close(self, layer: Layer) -> None:
        layer.close()
        if layer.descriptor.digest not in self._layers:  # not reopened meanwhile
            self._cache.release(layer.descriptor.digest)

    def close(self) -> None:
        """Forget every layer (the process is ending)."""
        for digest in list(self._layers):
            self.forget(digest)

    async def _background(self, layer: Layer, diff_id: DiffId, scope: trio.CancelScope) -> None:
        """A layer's work after it is shown: landmark prefetch, then fill, verification; never raises."""
        digest = layer.descriptor.digest
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    if layer.prefetch_end:  # under way while the mount comes up, not before it
                        nursery.start_soon(layer.prefetch_landmark)
                    nursery.start_soon(self._fill_and_verify, layer, diff_id)
        finally:
            if self._tasks.get(digest) is scope:
                del self._tasks[digest]
            if self._layers.get(digest) is not layer:  # forgotten while it ran
                self._close(layer)

    async def _check_index(self, layer: Layer) -> None:
        """The completion check: the served listing against the verified blob, entry by entry.

        An index built here from the same verified stream needs none. One that passes is
        trusted from now on for any image holding the blob (kept in the trusted store).

        Raises:
            IndexMismatch: the index (or TOC) differs from the tar it claims to describe.
        """
        if layer.source is IndexSource.DOWNLOADED:
            return
        path = layer.blob.data_path
        await trio.to_thread.run_sync(verify_index, layer.index, _pieces(path))
        if layer.store_scope != "":
            await trio.to_thread.run_sync(self._store.put, layer.index)
            layer.store_scope = ""

    async def _fill_and_verify(self, layer: Layer, diff_id: DiffId) -> None:
        digest = layer.descriptor.digest
        try:
            await self._fills_allowed.wait()
            if self.settings.background_fetch:
                # Let the container's start-up reads go first.
                await trio.sleep(self.settings.background_delay)
                await layer.blob.fill()
            elif not layer.blob.complete:
                return  # nothing to verify without fetching; reads stay verified span by span
            await verify_layer(layer, await diff_id())
            await self._check_index(layer)
        except (IntegrityError, LayerFormatError) as error:
            # The bytes or the mapping served so far can't be trusted: stop serving the layer,
            # and never serve its index again.
            layer.failed = str(error)
            layer.blob.stats.integrity_failures += 1
            if layer.store_scope is not None:
                await trio.to_thread.run_sync(self._store.drop, digest, layer.store_scope)
            log.error("layer-verified=false layer=%s reason=%s", digest, error)
        except Exception as error:
            # Anything else (the registry, ENOSPC, a bug): this task shares the nursery of the FUSE
            # main loop, so an escaping exception would take every chain down. On-demand reads
            # still work (or fail alone) after a failed fill.
            layer.background_error = f"{type(error).__name__}: {error}"
            log.warning("background-fetch-failed layer=%s error=%s", digest, layer.background_error)
        else:
            log.info("background-fetch-complete layer=%s layer-verified=true", digest)
