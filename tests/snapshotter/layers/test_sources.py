"""The layer resolver: which index source each layer gets, and reads through it, against a real registry."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import pytest

from index.model import EntryType
from snapshotter.cache.blob_cache import BlobCache
from snapshotter.cache.index_store import IndexStore
from snapshotter.layers.sources import (
    HOW_DOWNLOADED,
    HOW_STORED,
    LayerResolver,
    NotServedLazily,
)
from snapshotter.layers.verify import verify_layer
from snapshotter.remote.client import RegistryClient
from tests.support.image_builder import directory, file, make_layer, push_image
from tests.support.registry import TestRegistry


def _files() -> dict[str, bytes]:
    rng = random.Random(5)
    files = {f"data/f{i}.bin": rng.randbytes(rng.randrange(1, 700_000)) for i in range(12)}
    # Past index.reader's 16 MiB random-access limit: a single frame this large is not served lazily.
    files["data/big.bin"] = rng.randbytes(17 << 20)
    return files


def _tar_members(tar: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive if m.isreg()}  # type: ignore[union-attr]


@pytest.mark.parametrize("frame_size", [None, 128 << 10], ids=["single-frame", "multi-frame"])
async def test_zstd_layers_read_correctly_with_or_without_seek_points(
    registry: TestRegistry, registry_client: RegistryClient, tmp_path: Path, frame_size: int | None
) -> None:
    """A single-frame zstd layer is fetched whole and decompressed once; a multi-frame one stays lazy."""
    layer = make_layer(
        [directory("data"), *(file(p, c) for p, c in _files().items())], "zstd", frame_size=frame_size
    )
    pushed = await push_image(registry_client, registry.ref("zstd"), [layer])
    cache, store = BlobCache(tmp_path / "cache"), IndexStore(tmp_path / "indexes")
    resolver = LayerResolver(registry_client, pushed.reference, cache, store)
    try:
        first = await resolver.open_layer(pushed.layers[0], pushed.diff_ids[0])
        again = await LayerResolver(registry_client, pushed.reference, cache, store).open_layer(
            pushed.layers[0]
        )
        expected = _tar_members(layer.tar)
        for served in (first, again):
            for entry in served.index.entries:
                if entry.type is EntryType.FILE:
                    assert await served.read(entry, 0, entry.size) == expected[entry.path], entry.path
                    tail = max(0, entry.size - 1000)
                    assert await served.read(entry, tail, 5000) == expected[entry.path][tail:]
        assert first.how == HOW_DOWNLOADED
        if frame_size is None:
            assert again.how == HOW_DOWNLOADED and "decompressed once" in again.reason
            assert (cache.blob_dir(pushed.layers[0].digest) / "uncompressed.tar").stat().st_size == len(
                layer.tar
            )
        else:
            assert again.how == HOW_STORED
    finally:
        cache.close()


async def test_a_layer_without_an_index_is_not_downloaded_when_downloads_are_off(
    registry: TestRegistry, registry_client: RegistryClient, tmp_path: Path
) -> None:
    """With allow_download=False a plain gzip layer never seen raises NotServedLazily and fetches nothing."""
    pushed = await push_image(
        registry_client, registry.ref("plain"), [make_layer([file("a", b"x" * 10)], "gzip")]
    )
    cache = BlobCache(tmp_path / "cache")
    resolver = LayerResolver(registry_client, pushed.reference, cache, IndexStore(tmp_path / "indexes"))
    try:
        with pytest.raises(NotServedLazily, match="lazysnap index push"):
            await resolver.open_layer(pushed.layers[0], allow_download=False)
        assert IndexStore(tmp_path / "indexes").get(pushed.layers[0].digest) is None
    finally:
        cache.close()


async def test_verifying_a_complete_gzip_layer_keeps_its_tar_for_reads(
    registry: TestRegistry, registry_client: RegistryClient, tmp_path: Path
) -> None:
    """Once a gzip layer is verified whole, reads come from the kept tar and still return the same bytes."""
    files = {f"d/{i}": bytes([i]) * (300_000 + i) for i in range(8)}
    layer = make_layer([directory("d"), *(file(p, c) for p, c in files.items())], "gzip")
    pushed = await push_image(registry_client, registry.ref("unpack"), [layer])
    cache = BlobCache(tmp_path / "cache")
    resolver = LayerResolver(registry_client, pushed.reference, cache, IndexStore(tmp_path / "indexes"))
    try:
        served = await resolver.open_layer(pushed.layers[0], pushed.diff_ids[0])
        assert not served.unpacked
        await verify_layer(served, pushed.diff_ids[0])
        assert served.unpacked and served.diff_id_verified and served.blob.verified
        for entry in served.index.entries:
            if entry.type is EntryType.FILE:
                assert await served.read(entry, 7, 250_000) == files[entry.path][7:250_007]
    finally:
        cache.close()
