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

import functools
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

from fusefs.mount import is_mounted, run_filesystem, unmount
from fusefs.operations import ReadOnlyOperations
from index.errors import LazysnapError
from snapshotter.cache.blob_cache import open_blob_cache
from snapshotter.cache.index_store import IndexStore
from snapshotter.config import Config
from snapshotter.errors import FailedPrecondition, InvalidArgument, unwrap_groups
from snapshotter.layers.chain import ChainCore, LayerRequest, known_diff_id, serve_settings
from snapshotter.layers.layer import Layer
from snapshotter.layers.published import PublishedIndexes
from snapshotter.remote.client import Descriptor, RegistryClient, ResolvedImage, open_registry_client
from snapshotter.remote.reference import parse_reference, sha256_hex
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
    # Whether the image was named by digest where containerd got it (decides which indexes are trusted).
    pulled_by_digest: bool = False

    def descriptor(self) -> Descriptor:
        """The layer's manifest descriptor."""
        return Descriptor(self.media_type, self.digest, self.size, dict(self.annotations))


def _first_label(labels: Mapping[str, str], keys: Sequence[str]) -> str:
    return next((labels[key] for key in keys if labels.get(key)), "")


class FuseRemoteLayers(RemoteLayers):
    """Remote layer chains served from one FUSE forest mounted at ``mount_dir``.

    Prepares of different images proceed concurrently: only a chain waits for its parent chain
    when that one is still being prepared, and an image is resolved once however many of its
    layers ask at the same time.
    """

    def __init__(
        self,
        root: Path,
        mount_dir: Path,
        core: ChainCore,
        client: RegistryClient,
        operations: ReadOnlyOperations,
    ) -> None:
        self._records_dir = root / "remote"
        self._records_dir.mkdir(parents=True, exist_ok=True)
        self._mount_dir = mount_dir
        self._core = core
        self._client = client
        self._operations = operations
        self._chains: dict[str, list[Layer]] = {}
        self._preparing: dict[str, trio.Event] = {}  # chain ids being exposed right now
        self._images: dict[str, ResolvedImage] = {}  # by the reference containerd named
        self._resolving: dict[str, trio.Lock] = {}
        self._published: dict[str, PublishedIndexes] = {}  # by manifest digest: one listing per image

    async def prepare_remote(
        self, chain_id: str, parent_chain_id: str | None, labels: Mapping[str, str]
    ) -> str | None:
        """Expose ``chain_id`` lazily; return None, or why it can't be served lazily."""
        while chain_id in self._preparing:
            await self._preparing[chain_id].wait()
        if chain_id in self._chains:
            return None
        reference = _first_label(labels, IMAGE_REF_LABELS)
        layer_digest = _first_label(labels, LAYER_DIGEST_LABELS)
        if not reference or not layer_digest:
            return "no image reference or layer digest label (containerd.io/snapshot/cri.*)"
        self._preparing[chain_id] = trio.Event()
        try:
            if parent_chain_id:
                # Only what depends on a parent waits for it.
                while parent_chain_id in self._preparing:
                    await self._preparing[parent_chain_id].wait()
                if parent_chain_id not in self._chains:
                    return f"parent {parent_chain_id} is not a lazysnap remote chain"
            image = await self._resolve(reference, labels.get(MANIFEST_DIGEST_LABEL, ""), layer_digest)
            record = self._record_for(
                image, chain_id, parent_chain_id or "", layer_digest, "@sha256:" in reference
            )
            if isinstance(record, str):
                return record
            await self._expose(record, allow_download=False, published=self._published_for(image))
            self._write_record(record)
            return None
        except LazysnapError as error:
            return str(error)
        finally:
            self._preparing.pop(chain_id).set()

    def lower_dir(self, chain_id: str) -> str:
        """The directory showing the merged chain up to ``chain_id``.

        Raises:
            FailedPrecondition: the chain is not exposed (its layers could not be restored).
        """
        if chain_id not in self._chains:
            raise FailedPrecondition(
                f"remote chain {chain_id} is not available; its layers could not be restored"
            )
        return str(self._mount_dir / _hex(chain_id))

    async def release(self, chain_id: str) -> None:
        """Stop showing a chain whose snapshot was removed; its layers are forgotten once no chain uses them.

        Files still open in the removed tree keep their layers until they are closed (the forest
        closes the chain's source then); the cached blobs stay on disk for the next image sharing them.
        """
        if self._chains.pop(chain_id, None) is not None:
            self._operations.remove_tree(_hex(chain_id))
        self._record_path(chain_id).unlink(missing_ok=True)

    async def restore(self, chain_ids: Sequence[str]) -> None:
        """Re-expose recorded chains after a restart (parents first), from stored indexes and the cache."""
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
        return [layer.stats() for layer in self._core.layers]

    async def _resolve(self, reference: str, manifest_digest: str, layer_digest: str) -> ResolvedImage:
        """The image containerd is unpacking, resolved once per reference (concurrent asks share one resolve).

        A tag can move to another image between two pulls: when the cached image lacks the layer
        asked for, the reference is resolved again rather than falling back to a full download.
        """
        ref = parse_reference(reference)
        if manifest_digest and ref.digest is None:
            ref = parse_reference(f"{reference}@{manifest_digest}") if "@" not in reference else ref
        key = str(ref)
        async with self._resolving.setdefault(key, trio.Lock()):
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
        self, image: ResolvedImage, chain_id: str, parent: str, layer_digest: str, by_digest: bool
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
            by_digest,
        )

    async def _expose(
        self, record: ChainRecord, *, allow_download: bool, published: PublishedIndexes | None
    ) -> None:
        """Open the record's layer and show its chain; raises LazysnapError (and exposes nothing)."""
        if record.parent and record.parent not in self._chains:
            # Never show a chain without its lower layers: containers would see a partial rootfs.
            raise FailedPrecondition(
                f"chain {record.chain_id}: its parent chain {record.parent} is not available"
            )
        request = LayerRequest(
            record.descriptor(),
            parse_reference(record.reference),
            known_diff_id(record.diff_id),
            published,
            record.pulled_by_digest,
        )
        layer = await self._core.open_layer(request, allow_download=allow_download)
        chain = [*self._chains.get(record.parent, []), layer]
        tree, source = await self._core.chain(chain)
        self._operations.add_tree(_hex(record.chain_id), tree, source)
        self._chains[record.chain_id] = chain

    def _record_path(self, chain_id: str) -> Path:
        return self._records_dir / f"{_hex(chain_id)}.json"

    def _write_record(self, record: ChainRecord) -> None:
        path = self._record_path(record.chain_id)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(asdict(record)))
        temporary.replace(path)


def _hex(chain_id: str) -> str:
    try:
        return sha256_hex(chain_id)
    except ValueError:
        raise InvalidArgument(f"not a sha256 chain id: {chain_id!r}") from None


@asynccontextmanager
async def fuse_remote_layers(config: Config) -> AsyncIterator[RemoteLayers | None]:
    """Mount the FUSE forest and yield the remote backend; unmount when the daemon stops.

    Raises:
        OSError: the FUSE filesystem could not be mounted.
        LazysnapError: the registry client could not be set up; either arrives alone, never in a group.
    """
    root = Path(config.root)
    mount_dir = config.fuse_mount_path()
    if is_mounted(str(mount_dir)):
        # Left by a daemon that was killed: a dead FUSE mount ("transport endpoint is not connected").
        await trio.to_thread.run_sync(unmount, str(mount_dir))
    mount_dir.mkdir(parents=True, exist_ok=True)
    cache = open_blob_cache(config)
    store = IndexStore(config.index_store_path())
    try:
        # The daemon reports an error of the forest's nursery (or of the service running inside
        # it) in one line: the error itself, not the ExceptionGroup trio wraps it in.
        with unwrap_groups(LazysnapError, OSError):
            async with open_registry_client(config) as client:
                operations = ReadOnlyOperations(timeout=config.fuse.entry_timeout_seconds)
                async with trio.open_nursery() as nursery:
                    await nursery.start(
                        functools.partial(
                            run_filesystem,
                            max_tasks=config.fuse.max_tasks,
                            read_ahead_kb=config.fuse.read_ahead_kb,
                        ),
                        operations,
                        str(mount_dir),
                    )
                    core = ChainCore(client, cache, store, nursery, serve_settings(config))
                    core.allow_fills()  # each layer waits background_fetch.delay_seconds after it is shown instead
                    try:
                        yield FuseRemoteLayers(root, mount_dir, core, client, operations)
                    finally:
                        nursery.cancel_scope.cancel()  # unmounts the forest and stops background fills
                        core.close()
    finally:
        cache.close()
