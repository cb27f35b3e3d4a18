"""``lazysnap index push REF``: build the index of every layer and publish them next to the image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from index.model import LayerFormat
from index.reader import is_randomly_accessible
from snapshotter.cache.blob_cache import BlobCache
from snapshotter.cache.index_store import IndexStore
from snapshotter.layers.published import artifact_tag, publish_indexes
from snapshotter.layers.sources import LayerResolver, SourceSettings
from snapshotter.remote.client import RegistryClient


@dataclass(frozen=True)
class PushedIndexes:
    """What ``index push`` published."""

    artifact_digest: str
    tag: str
    published: list[str]
    skipped: dict[str, str]


async def push_image_indexes(
    reference: str,
    root: str,
    *,
    plain_http: bool = False,
    docker_config_path: str | None = None,
    gzip_spacing: int = 1 << 20,
) -> PushedIndexes:
    """Index every layer of ``reference`` (streaming each blob once unless indexed before) and publish them.

    Raises:
        RegistryError, FetchError: the registry failed.
        LayerFormatError, IntegrityError: a layer is malformed or does not match its digests.
    """
    cache = BlobCache(Path(root) / "cache")
    try:
        async with RegistryClient(plain_http=plain_http, docker_config_path=docker_config_path) as client:
            image = await client.resolve(reference)
            resolver = LayerResolver(
                client,
                image.reference,
                cache,
                IndexStore(Path(root) / "indexes"),
                settings=SourceSettings(gzip_spacing=gzip_spacing),
            )
            indexes = []
            skipped: dict[str, str] = {}
            for number, descriptor in enumerate(image.layers):
                diff_id = image.diff_ids[number] if number < len(image.diff_ids) else ""
                layer = await resolver.open_layer(descriptor, diff_id)
                if layer.index.format is LayerFormat.ESTARGZ:
                    skipped[descriptor.digest] = "eStargz: the blob carries its own TOC"
                elif not is_randomly_accessible(layer.index):
                    skipped[descriptor.digest] = "no seek points (single zstd frame): an index would not help"
                else:
                    indexes.append(layer.index)
            digest = await publish_indexes(client, image, indexes)
            return PushedIndexes(
                digest, artifact_tag(image.manifest_digest), [i.digest for i in indexes], skipped
            )
    finally:
        cache.close()
