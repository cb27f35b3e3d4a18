"""A valid eStargz layer whose file is one 20 MiB chunk is served lazily, every file of it readable."""

from __future__ import annotations

import random
from pathlib import Path

from index.estargz import TOC_DIGEST_ANNOTATION
from index.model import EntryType
from index.reader import is_randomly_accessible, max_span_size
from snapshotter.cache.blob_cache import BlobCache
from snapshotter.cache.index_store import IndexStore
from snapshotter.devtools.image_builder import Layer, push_image
from snapshotter.layers.sources import HOW_ESTARGZ, LayerResolver
from snapshotter.remote.client import RegistryClient
from tests.hostile.conftest import estargz_index
from tests.support.estargz_writer import build_estargz
from tests.support.image_builder import directory, file
from tests.support.registry import TestRegistry

BIG = random.Random(20).randbytes(20 << 20)
CONTENT = {"app/big.bin": BIG, "app/small.txt": b"small", "zz/after.txt": b"after the big chunk"}
WRITTEN = build_estargz(
    [directory("app/"), directory("zz/"), *(file(p, c) for p, c in CONTENT.items())], chunk_size=32 << 20
)


async def test_a_single_20_mib_chunk_keeps_the_layer_randomly_accessible() -> None:
    """The chunk's member is decoded on its own, so the layer is served in place, not by the unseekable fallback."""
    index = await estargz_index(WRITTEN)
    big = next(e for e in index.entries if e.path == "app/big.bin")
    assert len(big.chunks) == 1 and big.chunks[0].size == 20 << 20
    assert max_span_size(index) == 20 << 20
    assert is_randomly_accessible(index)


async def test_every_file_of_a_layer_with_a_20_mib_chunk_reads_back(
    registry: TestRegistry, registry_client: RegistryClient, tmp_path: Path
) -> None:
    """Through the real resolver and blob cache, every file reads back exactly (it was EIO, 'incorrect header check')."""
    layer = Layer(WRITTEN.tar, WRITTEN.blob, "gzip", annotations={TOC_DIGEST_ANNOTATION: WRITTEN.toc_digest})
    pushed = await push_image(registry_client, registry.ref("bigchunk"), [layer])
    cache = BlobCache(tmp_path / "cache")
    try:
        resolver = LayerResolver(registry_client, pushed.reference, cache, IndexStore(tmp_path / "idx"))
        opened = await resolver.open_layer(pushed.layers[0], pushed.diff_ids[0])
        assert opened.how == HOW_ESTARGZ
        files = [e for e in opened.index.entries if e.type is EntryType.FILE]
        assert {e.path for e in files} == set(CONTENT)
        for entry in files:
            assert await opened.read(entry, 0, entry.size) == CONTENT[entry.path], entry.path
        big = next(e for e in files if e.path == "app/big.bin")
        assert await opened.read(big, 15 << 20, 4096) == BIG[15 << 20 : (15 << 20) + 4096]
    finally:
        cache.close()
