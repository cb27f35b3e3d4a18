"""Opening eStargz layers: the landmark prefetch of optimized blobs, and the round trips before a layer is served."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

from index.estargz import TOC_DIGEST_ANNOTATION
from index.model import LayerIndex
from snapshotter.cache.blob_cache import BlobCache
from snapshotter.cache.index_store import IndexStore
from snapshotter.devtools.image_builder import Layer, file, push_image
from snapshotter.layers.published import PublishedIndexes
from snapshotter.layers.sources import (
    HOW_DOWNLOADED,
    HOW_ESTARGZ,
    UNDECLARED_TAIL_PROBE,
    LayerResolver,
    SourceSettings,
)
from snapshotter.remote.client import Descriptor, RegistryClient
from tests.support.estargz_writer import build_estargz
from tests.support.registry import TestRegistry

HOT = [file(f"app/hot{i}.py", random.Random(i).randbytes(100_000)) for i in range(3)]
COLD = [file("data/cold.bin", random.Random(9).randbytes(2 << 20))]


async def _open_first_layer(
    registry: TestRegistry, client: RegistryClient, tmp_path: Path, prefetch_count: int | None
) -> tuple[int, int, int]:
    """Push a hot-then-cold eStargz image, open its layer, run its prefetch; return (fetched at open, after prefetch, blob size)."""
    written = build_estargz([*HOT, *COLD], prefetch_count=prefetch_count)
    layer = Layer(written.tar, written.blob, "gzip", annotations={TOC_DIGEST_ANNOTATION: written.toc_digest})
    pushed = await push_image(client, registry.ref("prefetch"), [layer])
    resolver = LayerResolver(
        client, pushed.reference, BlobCache(tmp_path / "cache"), IndexStore(tmp_path / "idx")
    )
    opened = await resolver.open_layer(pushed.layers[0], pushed.diff_ids[0])
    assert opened.how == HOW_ESTARGZ
    at_open = opened.blob.stats.bytes_fetched
    await opened.prefetch_landmark()
    return at_open, opened.blob.stats.bytes_fetched, len(written.blob)


async def test_prefetch_landmark_fetches_the_hot_files(
    registry: TestRegistry, registry_client: RegistryClient, tmp_path: Path
) -> None:
    """With a landmark after the hot files, the prefetch fetches them, and not the cold file; opening does not wait for it."""
    at_open, fetched, size = await _open_first_layer(
        registry, registry_client, tmp_path / "a", prefetch_count=3
    )
    _, without, _ = await _open_first_layer(registry, registry_client, tmp_path / "b", prefetch_count=0)
    assert fetched >= without + 300_000  # the three hot files (incompressible)
    assert at_open < fetched - 300_000  # the mount does not wait for them
    assert fetched < size - (1 << 20)  # the 2 MiB cold file stays remote


class CountingPublishedIndexes(PublishedIndexes):
    """PublishedIndexes that counts lookups (a lookup costs a registry round trip)."""

    lookups = 0

    async def get(self, layer: Descriptor, diff_id: str) -> LayerIndex | None:
        """Count, then look up as usual."""
        self.lookups += 1
        return await super().get(layer, diff_id)


async def test_a_layer_declaring_its_toc_is_opened_without_looking_for_published_indexes(
    registry: TestRegistry, registry_client: RegistryClient, tmp_path: Path
) -> None:
    """With the toc.digest annotation: no published-index lookup, and one registry request (the tail).

    Without it the TOC is pinned by nothing: by default the layer is downloaded and indexed (after
    looking for a published index), and served from its TOC only with ``allow_unpinned_toc``.
    """
    written = build_estargz([*HOT, *COLD], prefetch_count=None)
    declared = Layer(
        written.tar, written.blob, "gzip", annotations={TOC_DIGEST_ANNOTATION: written.toc_digest}
    )
    undeclared = Layer(written.tar, written.blob, "gzip")
    cases = (
        ("declared", declared, 0, SourceSettings(), HOW_ESTARGZ),
        ("undeclared", undeclared, 1, SourceSettings(), HOW_DOWNLOADED),
        ("allowed", undeclared, 1, SourceSettings(allow_unpinned_toc=True), HOW_ESTARGZ),
    )
    for name, layer, lookups, settings, how in cases:
        pushed = await push_image(registry_client, registry.ref(name), [layer])
        image = await registry_client.resolve(pushed.reference)
        published = CountingPublishedIndexes(registry_client, image)
        resolver = LayerResolver(
            registry_client,
            pushed.reference,
            BlobCache(tmp_path / name / "cache"),
            IndexStore(tmp_path / name / "idx"),
            published=published,
            settings=settings,
        )
        mark = registry.registry.mark()
        opened = await resolver.open_layer(image.layers[0], image.diff_ids[0])
        assert opened.how == how, name
        assert published.lookups == lookups, name
        if lookups == 0:
            assert [r.method for r in registry.registry.requests_since(mark)] == ["GET"]


async def test_a_cold_read_brings_its_directory_neighbours_and_a_warm_read_waits_for_none(
    registry: TestRegistry, registry_client: RegistryClient, tmp_path: Path
) -> None:
    """Sibling read-ahead comes with a cold read only: a file already cached is served without fetching its neighbours."""
    small = [
        file(f"lib/mod{i}.pyc", random.Random(i).randbytes(20_000)) for i in range(6)
    ]  # 3 fit the budget
    written = build_estargz([*small, *COLD], prefetch_count=None)  # the tail probe stays in COLD
    layer = Layer(written.tar, written.blob, "gzip", annotations={TOC_DIGEST_ANNOTATION: written.toc_digest})
    pushed = await push_image(registry_client, registry.ref("neighbours"), [layer])
    resolver = LayerResolver(
        registry_client, pushed.reference, BlobCache(tmp_path / "cache"), IndexStore(tmp_path / "idx")
    )
    opened = await resolver.open_layer(pushed.layers[0], pushed.diff_ids[0])
    entries = {e.path: e for e in opened.index.entries}
    stats = opened.blob.stats

    # A file fetched ahead of its read (as the import and library prefetchers do): its read fetches nothing.
    await opened.prefetch(entries["lib/mod4.pyc"])
    requests = stats.fetch_requests
    assert await opened.read(entries["lib/mod4.pyc"], 0, 20_000) == small[4].content
    assert stats.fetch_requests == requests

    # A cold read: one request, which also brings the next files of the directory.
    assert await opened.read(entries["lib/mod0.pyc"], 0, 20_000) == small[0].content
    assert stats.fetch_requests == requests + 1
    requests = stats.fetch_requests
    assert await opened.read(entries["lib/mod1.pyc"], 0, 20_000) == small[1].content
    assert stats.fetch_requests == requests


async def test_a_plain_gzip_layer_costs_only_a_small_footer_probe_before_its_download(
    registry: TestRegistry, registry_client: RegistryClient, tmp_path: Path
) -> None:
    """Without the TOC annotation, the look for an eStargz footer (only with allow_unpinned_toc) reads a few KiB, not a speculative 1/128 of the blob."""
    written = build_estargz([*HOT, *COLD], prefetch_count=None)
    plain = Layer(written.tar, gzip.compress(written.tar, 6), "gzip")
    pushed = await push_image(registry_client, registry.ref("plain-gzip"), [plain])
    size = len(plain.blob)
    for name, settings, probe in (
        ("default", SourceSettings(), 0),
        ("allowed", SourceSettings(allow_unpinned_toc=True), UNDECLARED_TAIL_PROBE),
    ):
        resolver = LayerResolver(
            registry_client,
            pushed.reference,
            BlobCache(tmp_path / name / "cache"),
            IndexStore(tmp_path / name / "idx"),
            settings=settings,
        )
        before = registry_client.bytes_fetched
        opened = await resolver.open_layer(pushed.layers[0], pushed.diff_ids[0])
        assert opened.how == HOW_DOWNLOADED
        assert registry_client.bytes_fetched - before <= size + probe  # the download (+ the probe)
