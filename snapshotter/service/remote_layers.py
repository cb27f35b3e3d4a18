"""Remote snapshots for ``lazysnap serve``: layer chains shown lazily as directories of one FUSE mount.

containerd asks for a layer with ``Prepare(key, parent, labels)``; the labels name the image and
the layer (``containerd.io/snapshot/cri.*``, or the ``containerd.io/snapshot/remote/stargz.*``
labels that ``ctr-remote image rpull`` sets). If the layer has an index that needs no download
(stored, published, or an eStargz TOC), its chain is merged with its parent chain and shown at
``<fuse dir>/<chain id hex>``, which the snapshot service gives containerd as an overlay
lowerdir. Each chain is recorded under ``<root>/remote/`` so a restarted daemon re-exposes it from
the stored indexes and the blob cache alone; the registry is only needed for bytes not cached yet.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

from fusefs.merged_tree import MergedTree
from fusefs.mount import is_mounted, run_filesystem, unmount
from fusefs.operations import ReadOnlyOperations
from index.errors import LazysnapError
from snapshotter.cache.blob_cache import BlobCache
from snapshotter.cache.index_store import IndexStore
from snapshotter.config import Config
from snapshotter.layers.published import PublishedIndexes
from snapshotter.layers.sources import ChainSource, Layer, LayerResolver, verify_layer
from snapshotter.remote.client import Descriptor, RegistryClient, ResolvedImage
from snapshotter.remote.reference import parse_reference, sha256_hex
from snapshotter.remote.request import RetryPolicy
from snapshotter.service.chain_ids import chain_ids
from snapshotter.service.snapshot_service import RemoteLayers

log = logging.getLogger(__name__)

IMAGE_REF_LABELS = ("containerd.io/snapshot/cri.image-ref", "containerd.io/snapshot/remote/stargz.reference")
LAYER_DIGEST_LABELS = (
    "containerd.io/snapshot/cri.layer-digest",
    "containerd.io/snapshot/remote/stargz.digest",
)
MANIFEST_DIGEST_LABEL = "containerd.io/snapshot/cri.manifest-digest"


@dataclass(frozen=True)
class ChainRecord:
    """What is needed to re-expose one remote chain without the registry."""

    chain_id: str
    parent: str
    reference: str
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str]
    diff_id: str

    def descriptor(self) -> Descriptor:
        """The layer's manifest descriptor."""
        return Descriptor(self.media_type, self.digest, self.size, dict(self.annotations))


def _first_label(labels: Mapping[str, str], keys: Sequence[str]) -> str:
    return next((labels[key] for key in keys if labels.get(key)), "")


class FuseRemoteLayers(RemoteLayers):
    """Remote layer chains served from one FUSE forest mounted at ``mount_dir``."""

    def __init__(
        self,
        root: Path,
        mount_dir: Path,
        client: RegistryClient,
        cache: BlobCache,
        store: IndexStore,
        operations: ReadOnlyOperations,
        nursery: trio.Nursery,
        *,
        background_fetch: bool = True,
        background_delay: float = 0.0,
        read_timeout: float | None = None,
    ) -> None:
        self._records_dir = root / "remote"
        self._records_dir.mkdir(parents=True, exist_ok=True)
        self._mount_dir = mount_dir
        self._client = client
        self._cache = cache
        self._store = store
        self._operations = operations
        self._nursery = nursery
        self._background_fetch = background_fetch
        self._background_delay = background_delay
        self._read_timeout = read_timeout
        self._chains: dict[str, list[Layer]] = {}
        self._layers: dict[str, Layer] = {}
        self._images: dict[str, ResolvedImage] = {}  # by the reference containerd named
        self._published: dict[str, PublishedIndexes] = {}  # by manifest digest: one listing per image
        self._lock = trio.Lock()  # one prepare at a time: chains build on each other

    async def prepare_remote(
        self, chain_id: str, parent_chain_id: str | None, labels: Mapping[str, str]
    ) -> str | None:
        """Expose ``chain_id`` lazily; return None, or why it can't be served lazily."""
        async with self._lock:
            if chain_id in self._chains:
                return None
            reference = _first_label(labels, IMAGE_REF_LABELS)
            layer_digest = _first_label(labels, LAYER_DIGEST_LABELS)
            if not reference or not layer_digest:
                return "no image reference or layer digest label (containerd.io/snapshot/cri.*)"
            if parent_chain_id and parent_chain_id not in self._chains:
                return f"parent {parent_chain_id} is not a lazysnap remote chain"
            try:
                image = await self._resolve(reference, labels.get(MANIFEST_DIGEST_LABEL, ""), layer_digest)
                record = self._record_for(image, chain_id, parent_chain_id or "", layer_digest)
                if isinstance(record, str):
                    return record
                await self._expose(record, allow_download=False, published=self._published_for(image))
            except LazysnapError as error:
                return str(error)
            self._write_record(record)
            return None

    def lower_dir(self, chain_id: str) -> str:
        """The directory showing the merged chain up to ``chain_id``.

        Raises:
            LazysnapError: the chain is not exposed (its layers could not be restored).
        """
        if chain_id not in self._chains:
            raise LazysnapError(f"remote chain {chain_id} is not available; its layers could not be restored")
        return str(self._mount_dir / _hex(chain_id))

    async def release(self, chain_id: str) -> None:
        """Stop showing a chain whose snapshot was removed, and forget layers no other chain uses."""
        async with self._lock:
            if self._chains.pop(chain_id, None) is not None:
                self._operations.remove_tree(_hex(chain_id))
            self._record_path(chain_id).unlink(missing_ok=True)
            # A layer's index and decoded-span cache can take tens of MB: a long-running daemon must
            # not keep those of every image it ever served. Files still open in the removed tree
            # keep their layer alive through its content source until they are closed; the cached
            # blob stays on disk for the next image that shares it.
            used = {id(layer) for chain in self._chains.values() for layer in chain}
            for digest, layer in list(self._layers.items()):
                if id(layer) not in used:
                    del self._layers[digest]

    async def restore(self, chain_ids: Sequence[str]) -> None:
        """Re-expose recorded chains after a restart (parents first), from stored indexes and the cache."""
        async with self._lock:
            for chain_id in chain_ids:
                try:
                    record = ChainRecord(**json.loads(self._record_path(chain_id).read_text()))
                    await self._expose(record, allow_download=False, published=None)
                except (OSError, ValueError, TypeError, LazysnapError) as error:
                    log.error("remote-snapshot-restored=false chain=%s reason=%s", chain_id, error)
                else:
                    log.info("remote-snapshot-restored=true chain=%s", chain_id)

    def stats(self) -> list[dict[str, object]]:
        """Per-layer statistics of every exposed layer."""
        return [layer.stats() for layer in self._layers.values()]

    async def _resolve(self, reference: str, manifest_digest: str, layer_digest: str) -> ResolvedImage:
        """The image containerd is unpacking, resolved once per reference.

        A tag can move to another image between two pulls: when the cached image lacks the layer
        asked for, the reference is resolved again rather than falling back to a full download.
        """
        ref = parse_reference(reference)
        if manifest_digest and ref.digest is None:
            ref = parse_reference(f"{reference}@{manifest_digest}") if "@" not in reference else ref
        key = str(ref)
        cached = self._images.get(key)
        if cached is not None and any(layer.digest == layer_digest for layer in cached.layers):
            return cached
        self._images[key] = await self._client.resolve(ref)
        return self._images[key]

    def _published_for(self, image: ResolvedImage) -> PublishedIndexes:
        """The published-index listing of ``image``, shared by its layers (fetched once, not per layer)."""
        if image.manifest_digest not in self._published:
            self._published[image.manifest_digest] = PublishedIndexes(self._client, image)
        return self._published[image.manifest_digest]

    def _record_for(
        self, image: ResolvedImage, chain_id: str, parent: str, layer_digest: str
    ) -> ChainRecord | str:
        """The chain record of ``layer_digest`` in ``image``, or why it does not fit ``chain_id``."""
        digests = [layer.digest for layer in image.layers]
        if layer_digest not in digests:
            return f"layer {layer_digest} is not in image {image.reference}"
        # The same blob may sit at several positions (identical layers); the chain id tells which.
        chains = chain_ids(image.diff_ids)
        matching = [i for i, digest in enumerate(digests) if digest == layer_digest and chains[i] == chain_id]
        if not matching:
            return f"chain id {chain_id} does not match layer {layer_digest} of image {image.reference}"
        position = matching[0]
        if len(self._chains.get(parent, [])) != position:
            return f"parent {parent or '(none)'} is not the chain below layer {position}"
        descriptor = image.layers[position]
        return ChainRecord(
            chain_id,
            parent,
            str(image.reference),
            descriptor.media_type,
            descriptor.digest,
            descriptor.size,
            dict(descriptor.annotations),
            image.diff_ids[position],
        )

    async def _expose(
        self, record: ChainRecord, *, allow_download: bool, published: PublishedIndexes | None
    ) -> None:
        """Open the record's layer and show its chain; raises LazysnapError (and exposes nothing)."""
        if record.parent and record.parent not in self._chains:
            # Never show a chain without its lower layers: containers would see a partial rootfs.
            raise LazysnapError(f"chain {record.chain_id}: its parent chain {record.parent} is not available")
        layer = self._layers.get(record.digest)
        if layer is None:
            ref = parse_reference(record.reference)
            resolver = LayerResolver(
                self._client,
                ref,
                self._cache,
                self._store,
                published=published,
            )
            layer = await resolver.open_layer(
                record.descriptor(), record.diff_id, allow_download=allow_download
            )
            self._layers[record.digest] = layer
            if layer.prefetch_end:
                self._nursery.start_soon(layer.prefetch_landmark)
            if self._background_fetch:
                self._nursery.start_soon(self._fill, layer, record.diff_id)
        chain = [*self._chains.get(record.parent, []), layer]
        tree = await trio.to_thread.run_sync(MergedTree.build, [member.index.entries for member in chain])
        self._operations.add_tree(
            _hex(record.chain_id), tree, ChainSource(chain, read_timeout=self._read_timeout)
        )
        self._chains[record.chain_id] = chain

    async def _fill(self, layer: Layer, diff_id: str) -> None:
        """Fetch the rest of a layer in the background and verify it; failures are logged, not raised."""
        digest = layer.descriptor.digest
        try:
            # Let the container's start-up reads go first.
            await trio.sleep(self._background_delay)
            await layer.blob.fill()
            await verify_layer(layer, diff_id)
        except Exception as error:
            # Anything, not only LazysnapError: this task shares the nursery of the FUSE main
            # loop, so an escaping exception would take the whole daemon down. On-demand reads
            # still work (or fail alone) after a failed fill.
            log.warning("background-fetch-failed layer=%s error=%s: %s", digest, type(error).__name__, error)
        else:
            log.info("background-fetch-complete layer=%s", digest)

    def _record_path(self, chain_id: str) -> Path:
        return self._records_dir / f"{_hex(chain_id)}.json"

    def _write_record(self, record: ChainRecord) -> None:
        path = self._record_path(record.chain_id)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(record)))
        temporary.replace(path)


def _hex(chain_id: str) -> str:
    try:
        return sha256_hex(chain_id)
    except ValueError:
        raise LazysnapError(f"not a sha256 chain id: {chain_id!r}") from None


@asynccontextmanager
async def fuse_remote_layers(config: Config) -> AsyncIterator[RemoteLayers | None]:
    """Mount the FUSE forest and yield the remote backend; unmount when the daemon stops.

    Raises:
        OSError: the FUSE filesystem could not be mounted.
    """
    root = Path(config.root)
    mount_dir = Path(config.fuse.mount_directory or root / "fuse")
    if is_mounted(str(mount_dir)):
        # Left by a daemon that was killed: a dead FUSE mount ("transport endpoint is not connected").
        await trio.to_thread.run_sync(unmount, str(mount_dir))
    mount_dir.mkdir(parents=True, exist_ok=True)
    cache = BlobCache(Path(config.cache.directory or root / "cache"))
    store = IndexStore(root / "indexes")
    try:
        async with RegistryClient(
            plain_http_hosts=config.registry.plain_http,
            docker_config_path=config.registry.credentials_file or None,
            timeout=config.fetch.timeout_seconds,
            connect_timeout=config.fetch.connect_timeout_seconds,
            max_connections=config.fetch.max_connections_per_host,
            retry_policy=RetryPolicy(
                max_retries=config.fetch.retries, base_delay=config.fetch.backoff_seconds
            ),
        ) as client:
            operations = ReadOnlyOperations(timeout=config.fuse.entry_timeout_seconds)
            async with trio.open_nursery() as nursery:
                await nursery.start(run_filesystem, operations, str(mount_dir))
                try:
                    yield FuseRemoteLayers(
                        root,
                        mount_dir,
                        client,
                        cache,
                        store,
                        operations,
                        nursery,
                        background_fetch=config.background_fetch.enabled,
                        background_delay=config.background_fetch.delay_seconds,
                        read_timeout=config.fuse.read_timeout_seconds,
                    )
                finally:
                    nursery.cancel_scope.cancel()  # unmounts the forest and stops background fills
    finally:
        cache.close()
