"""``lazysnap index push REF``: build the index of every layer and publish them next to the image."""

from __future__ import annotations

from dataclasses import dataclass

from index.model import LayerFormat
from index.reader import is_randomly_accessible
from snapshotter.cache.blob_cache import open_blob_cache
from snapshotter.cache.index_store import IndexStore
from snapshotter.config import Config
from snapshotter.layers.published import artifact_tag, publish_indexes
from snapshotter.layers.sources import LayerResolver, source_settings
from snapshotter.remote.client import open_registry_client


@dataclass(frozen=True)
class PushedIndexes:
    """What ``index push`` published."""

    artifact_digest: str
    tag: str
    published: list[str]
    skipped: dict[str, str]


async def push_image_indexes(reference: str, config: Config) -> PushedIndexes:
    """Index every layer of ``reference`` (streaming each blob once unless indexed before) and publish them.

    The registry client, cache and gzip seek-point spacing (``layers.gzip_spacing_bytes``) come
    from ``config``.

    Raises:
        RegistryError, FetchError: the registry failed.
        LayerFormatError, IntegrityError: a layer is malformed or does not match its digests.
    """
    cache = open_blob_cache(config)
    try:
        async with open_registry_client(config) as client:
            image = await client.resolve(reference)
            resolver = LayerResolver(
                client,
                image.reference,
                cache,
                IndexStore(config.index_store_path()),
                settings=source_settings(config),
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
