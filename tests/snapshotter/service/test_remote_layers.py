"""Remote chains in the FUSE forest: exposed from an eStargz image, and forgotten when released."""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import pytest
import trio

from index.estargz import TOC_DIGEST_ANNOTATION
from snapshotter.config import BackgroundFetchConfig, Config, FuseConfig, RegistryConfig
from snapshotter.devtools.image_builder import Layer, file, push_image
from snapshotter.remote.client import RegistryClient
from snapshotter.service.chain_ids import chain_ids
from snapshotter.service.remote_layers import FuseRemoteLayers, fuse_remote_layers
from tests.support.estargz_writer import build_estargz
from tests.support.registry import TestRegistry


def estargz_layer(name: str, size: int, seed: int) -> Layer:
    written = build_estargz([file(name, random.Random(seed).randbytes(size))])
    return Layer(written.tar, written.blob, "gzip", annotations={TOC_DIGEST_ANNOTATION: written.toc_digest})


async def exists(directory: str, name: str) -> bool:
    """os.path.exists from a worker thread: this trio loop is the one serving the FUSE mount."""
    return await trio.to_thread.run_sync(os.path.exists, os.path.join(directory, name))


def labels(reference: str, digest: str) -> dict[str, str]:
    return {
        "containerd.io/snapshot/cri.image-ref": reference,
        "containerd.io/snapshot/cri.layer-digest": digest,
    }


@pytest.mark.slow
async def test_released_chains_drop_the_layers_only_they_used(
    registry: TestRegistry, registry_client: RegistryClient, tmp_path: Path
) -> None:
    """Two images sharing a base layer: releasing one keeps the shared layer; releasing both forgets all."""
    base = estargz_layer("base.bin", 50_000, 1)
    images = []
    for name, seed in (("one", 2), ("two", 3)):
        pushed = await push_image(
            registry_client, registry.ref(name), [base, estargz_layer(f"{name}.bin", 50_000, seed)]
        )
        images.append((str(pushed.reference), pushed.layers, chain_ids(pushed.diff_ids)))
    config = dataclasses.replace(
        Config(root=str(tmp_path / "root")),
        registry=RegistryConfig(plain_http=[registry.host]),
        background_fetch=BackgroundFetchConfig(enabled=False),
        fuse=dataclasses.replace(FuseConfig(), mount_directory=str(tmp_path / "fuse")),
    )
    async with fuse_remote_layers(config) as remote:
        assert isinstance(remote, FuseRemoteLayers)
        for reference, layers, chains in images:
            assert await remote.prepare_remote(chains[0], None, labels(reference, layers[0].digest)) is None
            assert (
                await remote.prepare_remote(chains[1], chains[0], labels(reference, layers[1].digest)) is None
            )
        assert len(remote.stats()) == 3  # the shared base once, and each image's own layer
        (_, _, chains_one), (_, layers_two, chains_two) = images
        assert await exists(remote.lower_dir(chains_one[1]), "one.bin")

        await remote.release(chains_one[1])
        assert {layer["digest"] for layer in remote.stats()} == {layers_two[0].digest, layers_two[1].digest}
        assert await exists(remote.lower_dir(chains_two[1]), "two.bin")

        await remote.release(chains_two[1])
        await remote.release(chains_two[0])
        assert remote.stats() == []
