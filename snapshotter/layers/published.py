"""Layer indexes published next to an image in its registry, so every node mounts it lazily at once.

Like SOCI's index manifests, this leaves the image untouched. ``lazysnap index push REF`` uploads
one blob per layer (the stored-index format of ``index.serialize``) and an OCI manifest listing
them, each annotated with the layer digest it describes, with the image manifest as its
``subject``. docker-registry 2.8 has no referrers API, so the manifest is found the way the OCI
distribution spec's fallback does it: under the tag ``sha256-<image manifest hex>.lazysnap``.

Trust: a published index is only used for the layer digest and DiffID it names, which must
match the image's own manifest and config, and every span it pins is checked as it is fetched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import trio

from index.errors import LayerFormatError
from index.model import LayerIndex
from index.serialize import dump_index, load_index
from snapshotter.errors import NotFound
from snapshotter.remote.client import Descriptor, RegistryClient, ResolvedImage, digest_of

log = logging.getLogger(__name__)

ARTIFACT_TYPE = "application/vnd.lazysnap.index.v1"
INDEX_BLOB_TYPE = "application/vnd.lazysnap.layer-index.v1"
CONFIG_TYPE = "application/vnd.lazysnap.index.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYER_ANNOTATION = "dev.lazysnap.layer.digest"
TAG_SUFFIX = ".lazysnap"


def artifact_tag(manifest_digest: str) -> str:
    """The tag under which the indexes of the image with this manifest digest are published."""
    return manifest_digest.replace(":", "-") + TAG_SUFFIX


async def publish_indexes(client: RegistryClient, image: ResolvedImage, indexes: Sequence[LayerIndex]) -> str:
    """Upload ``indexes`` of ``image``'s layers and the manifest that lists them; return its digest.

    Raises:
        RegistryError, FetchError: the upload failed.
    """
    ref = image.reference
    config = await client.push_blob(ref, b"{}", media_type=CONFIG_TYPE)
    layers: list[dict[str, object]] = []
    for index in indexes:
        blob = await client.push_blob(ref, dump_index(index), media_type=INDEX_BLOB_TYPE)
        layers.append(
            {
                "mediaType": INDEX_BLOB_TYPE,
                "digest": blob.digest,
                "size": blob.size,
                "annotations": {LAYER_ANNOTATION: index.digest},
            }
        )
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config.digest, "size": config.size},
        "layers": layers,
        "subject": {
            "mediaType": image.manifest_media_type,
            "digest": image.manifest_digest,
            "size": 0,
        },
    }
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return await client.push_manifest(ref, body, OCI_MANIFEST, tag=artifact_tag(image.manifest_digest))


class PublishedIndexes:
    """The indexes published for one image, fetched on first use."""

    def __init__(self, client: RegistryClient, image: ResolvedImage) -> None:
        self._client = client
        self._image = image
        self._blobs: dict[str, Descriptor] | None = None
        #: Registry bytes read per layer digest for its index (the listing manifest is not counted).
        self.bytes_fetched: dict[str, int] = {}
        self._lock = trio.Lock()  # layers are opened concurrently: fetch the listing once

    async def _listing(self) -> dict[str, Descriptor]:
        async with self._lock:
            if self._blobs is None:
                self._blobs = await self._fetch_listing()
            return self._blobs

    async def _fetch_listing(self) -> dict[str, Descriptor]:
        self._blobs = {}
        try:
            body, _, _ = await self._client.fetch_manifest(
                self._image.reference, artifact_tag(self._image.manifest_digest)
            )
        except NotFound:
            return self._blobs
        try:
            manifest = json.loads(body)
            for layer in manifest.get("layers", []):
                if layer.get("mediaType") == INDEX_BLOB_TYPE:
                    described = layer["annotations"][LAYER_ANNOTATION]
                    self._blobs[described] = Descriptor(
                        INDEX_BLOB_TYPE, layer["digest"], int(layer["size"]), {}
                    )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            log.warning(
                "published-index-ignored image=%s reason=malformed manifest: %s", self._image.reference, error
            )
            self._blobs = {}
        return self._blobs

    async def get(self, layer: Descriptor, diff_id: str) -> LayerIndex | None:
        """Return the published index of ``layer`` if there is one that matches it, else None.

        Raises:
            RegistryError, FetchError: the registry failed while reading a listed index.
        """
        descriptor = (await self._listing()).get(layer.digest)
        if descriptor is None:
            return None
        data = await self._client.fetch_blob(self._image.reference, descriptor.digest)
        self.bytes_fetched[layer.digest] = len(data)
        try:
            index = load_index(data)
        except LayerFormatError as error:
            log.warning("published-index-ignored layer=%s reason=%s", layer.digest, error)
            return None
        if (
            index.digest != layer.digest
            or index.compressed_size != layer.size
            or (diff_id and index.diff_id != diff_id)
        ):
            log.warning("published-index-ignored layer=%s reason=it describes another blob", layer.digest)
            return None
        log.debug("published index %s for %s (%d bytes)", digest_of(data), layer.digest, len(data))
        return index
