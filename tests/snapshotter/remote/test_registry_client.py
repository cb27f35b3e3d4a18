"""RegistryClient against a real docker-registry: resolve, platforms, ranges, streams, uploads, bad input."""

from __future__ import annotations

import json
import random

import pytest

from index.errors import DigestMismatch
from snapshotter.errors import (
    FetchError,
    InvalidReference,
    NoMatchingPlatform,
    NotFound,
    UnsupportedMediaType,
)
from snapshotter.remote import media_types as mt
from snapshotter.remote.client import Descriptor, Platform, RegistryClient, digest_of
from snapshotter.remote.reference import Reference
from tests.support.image_builder import (
    Layer,
    PushedIndex,
    build_manifest,
    directory,
    file,
    make_layer,
    push_image,
    push_index,
    symlink,
    whiteout,
)
from tests.support.registry import TestRegistry

BlobFixture = tuple[Reference, Descriptor]
BIG = random.Random(7).randbytes(3 << 20)  # 3 MiB: several 1 MiB chunks, and a layer blob of its own


def sample_layers() -> list[Layer]:
    """Three small layers: gzip, zstd and plain tar."""
    return [
        make_layer(
            [directory("etc"), file("etc/os-release", "ID=test\n"), symlink("bin", "usr/bin")], "gzip"
        ),
        make_layer([file("data/a", b"a" * 5000), whiteout("etc/old")], "zstd"),
        make_layer([file("data/b", "b")], "tar"),
    ]


class TestResolve:
    async def test_by_tag(self, registry: TestRegistry, registry_client: RegistryClient) -> None:
        """Resolving a tag gives the pushed manifest digest, layers (types, sizes) and diff_ids."""
        ref = registry.ref("by-tag")
        pushed = await push_image(registry_client, ref, sample_layers())
        image = await registry_client.resolve(ref)
        assert image.manifest_digest == pushed.manifest_digest
        assert image.manifest_media_type == mt.OCI_MANIFEST
        assert image.layers == pushed.layers
        assert [mt.layer_compression(d.media_type) for d in image.layers] == ["gzip", "zstd", "tar"]
        assert image.diff_ids == pushed.diff_ids == [digest_of(t) for t in pushed.tars]
        assert image.config == pushed.config

    async def test_by_digest(self, registry: TestRegistry, registry_client: RegistryClient) -> None:
        """Resolving name@digest (and a string reference) gives the same image as the tag."""
        ref = registry.ref("by-digest")
        pushed = await push_image(registry_client, ref, sample_layers()[:1])
        by_digest = await registry_client.resolve(
            f"{registry.host}/{ref.repository}@{pushed.manifest_digest}"
        )
        assert by_digest.manifest_digest == pushed.manifest_digest
        assert by_digest.layers == pushed.layers

    async def test_docker_schema2(self, registry: TestRegistry, registry_client: RegistryClient) -> None:
        """Docker schema2 manifests, configs and layer types resolve like OCI ones."""
        ref = registry.ref("docker")
        pushed = await push_image(registry_client, ref, sample_layers()[:2], docker=True)
        image = await registry_client.resolve(ref)
        assert image.manifest_media_type == mt.DOCKER_MANIFEST
        assert image.config.media_type == mt.DOCKER_CONFIG
        assert [d.media_type for d in image.layers] == [mt.DOCKER_LAYER_GZIP, mt.DOCKER_LAYER_ZSTD]
        assert image.diff_ids == pushed.diff_ids

    async def test_missing_tag(self, registry: TestRegistry, registry_client: RegistryClient) -> None:
        """An unknown tag raises NotFound naming the image."""
        ref = registry.ref("missing")
        with pytest.raises(NotFound, match=ref.repository):
            await registry_client.resolve(ref)

    async def test_unknown_layer_media_type(
        self, registry: TestRegistry, registry_client: RegistryClient
    ) -> None:
        """A manifest with a layer type lazysnap can't read raises UnsupportedMediaType naming image and layer."""
        ref = registry.ref("odd-layer")
        layer = make_layer([file("x", "x")], "gzip", media_type="application/vnd.example.layer.v1+squashfs")
        await push_image(registry_client, ref, [layer])
        with pytest.raises(UnsupportedMediaType, match=r"squashfs.*|layer 0"):
            await registry_client.resolve(ref)

    async def test_artifact_config(self, registry: TestRegistry, registry_client: RegistryClient) -> None:
        """A manifest whose config is not an image config (an artifact) raises UnsupportedMediaType."""
        ref = registry.ref("artifact")
        config = await registry_client.push_blob(ref, b"{}", media_type="application/vnd.example.config+json")
        layer = make_layer([file("x", "x")], "gzip")
        await registry_client.push_blob(ref, layer.blob)
        body = build_manifest(config, [layer.descriptor()])
        await registry_client.push_manifest(ref, body, mt.OCI_MANIFEST)
        with pytest.raises(UnsupportedMediaType, match="not a container image config"):
            await registry_client.resolve(ref)

    async def test_malformed_reference(self, registry_client: RegistryClient) -> None:
        """A malformed string reference raises InvalidReference before any request."""
        with pytest.raises(InvalidReference):
            await registry_client.resolve("127.0.0.1:1/UPPER")


class TestPlatforms:
    PLATFORMS = [
        Platform("linux", "amd64"),
        Platform("linux", "arm64", "v8"),
        Platform("linux", "arm", "v7"),
        Platform("linux", "arm", "v6"),
    ]

    async def _push(
        self, registry: TestRegistry, client: RegistryClient, docker: bool = False
    ) -> tuple[Reference, PushedIndex]:
        ref = registry.ref("multi")
        images = [(p, [make_layer([file("arch", str(p))], "gzip")]) for p in self.PLATFORMS]
        return ref, await push_index(client, ref, images, docker=docker)

    @pytest.mark.parametrize("docker", [False, True], ids=["oci-index", "docker-list"])
    async def test_selects_each_platform(
        self, registry: TestRegistry, registry_client: RegistryClient, docker: bool
    ) -> None:
        """Each platform of an index (OCI or Docker manifest list) resolves to its own manifest."""
        ref, pushed = await self._push(registry, registry_client, docker)
        for platform, image in zip(self.PLATFORMS, pushed.images, strict=True):
            resolved = await registry_client.resolve(ref, platform)
            assert resolved.manifest_digest == image.manifest_digest
            assert resolved.diff_ids == image.diff_ids

    async def test_default_is_running_platform(
        self, registry: TestRegistry, registry_client: RegistryClient
    ) -> None:
        """Without a platform, the running one (linux + this machine's GOARCH) is chosen."""
        ref, pushed = await self._push(registry, registry_client)
        running = Platform()
        expected = next(
            i
            for p, i in zip(self.PLATFORMS, pushed.images, strict=True)
            if p.architecture == running.architecture
        )
        assert (await registry_client.resolve(ref)).manifest_digest == expected.manifest_digest

    async def test_arm64_without_variant(
        self, registry: TestRegistry, registry_client: RegistryClient
    ) -> None:
        """arm64 asked without a variant matches the index's arm64/v8."""
        ref, pushed = await self._push(registry, registry_client)
        resolved = await registry_client.resolve(ref, Platform("linux", "arm64"))
        assert resolved.manifest_digest == pushed.images[1].manifest_digest

    async def test_no_matching_platform(
        self, registry: TestRegistry, registry_client: RegistryClient
    ) -> None:
        """An index without the platform raises NoMatchingPlatform naming the image and what it offers."""
        ref, _ = await self._push(registry, registry_client)
        with pytest.raises(NoMatchingPlatform, match=r"windows/amd64.*linux/arm/v7") as info:
            await registry_client.resolve(ref, Platform("windows", "amd64"))
        assert ref.repository in str(info.value)


class TestBlobs:
    @pytest.fixture
    async def big_blob(self, registry: TestRegistry, registry_client: RegistryClient) -> BlobFixture:
        ref = registry.ref("blobs")
        descriptor = await registry_client.push_blob(ref, BIG, chunked=True)
        return ref, descriptor

    @pytest.mark.parametrize(
        ("offset", "length"),
        [
            (0, 1),
            (0, 65536),
            (1_500_000, 100_000),
            (len(BIG) - 4096, 4096),
            (len(BIG) - 10, 100),
            (1 << 20, 1 << 20),
        ],
        ids=["first-byte", "start", "middle", "end", "past-end-clipped", "aligned-mib"],
    )
    async def test_read_range(
        self,
        registry: TestRegistry,
        registry_client: RegistryClient,
        big_blob: BlobFixture,
        offset: int,
        length: int,
    ) -> None:
        """A range read returns exactly those bytes (clipped at the end), and the registry sends only them."""
        ref, descriptor = big_blob
        mark = registry.mark()
        data = await registry_client.read_range(ref, descriptor.digest, offset, length)
        assert data == BIG[offset : offset + length]
        assert registry.bytes_sent_since(mark, method="GET") == len(data)

    async def test_read_past_end(self, registry_client: RegistryClient, big_blob: BlobFixture) -> None:
        """A range starting at or after the end is empty, and a zero length reads nothing."""
        ref, descriptor = big_blob
        assert await registry_client.read_range(ref, descriptor.digest, len(BIG), 10) == b""
        assert await registry_client.read_range(ref, descriptor.digest, 5, 0) == b""

    async def test_stream_whole_blob(self, registry_client: RegistryClient, big_blob: BlobFixture) -> None:
        """stream_blob yields the whole blob in chunks of at most chunk_size, verified."""
        ref, descriptor = big_blob
        before = registry_client.bytes_fetched
        chunks = [c async for c in registry_client.stream_blob(ref, descriptor.digest, chunk_size=256 << 10)]
        assert b"".join(chunks) == BIG
        assert max(map(len, chunks)) <= 256 << 10
        assert registry_client.bytes_fetched - before == len(BIG)

    async def test_blob_size_and_fetch(self, registry_client: RegistryClient, big_blob: BlobFixture) -> None:
        """blob_size reports the pushed size and fetch_blob the bytes."""
        ref, descriptor = big_blob
        assert await registry_client.blob_size(ref, descriptor.digest) == len(BIG) == descriptor.size
        assert await registry_client.fetch_blob(ref, descriptor.digest) == BIG

    async def test_missing_blob(self, registry: TestRegistry, registry_client: RegistryClient) -> None:
        """A blob the registry does not have raises NotFound naming the image and digest."""
        ref = registry.ref("no-blob")
        digest = digest_of(b"never pushed")
        with pytest.raises(NotFound, match=digest):
            await registry_client.read_range(ref, digest, 0, 10)
        with pytest.raises(NotFound):
            await registry_client.blob_size(ref, digest)

    @pytest.mark.parametrize("chunked", [False, True], ids=["monolithic", "chunked"])
    async def test_push_is_idempotent(
        self, registry: TestRegistry, registry_client: RegistryClient, chunked: bool
    ) -> None:
        """Pushing a blob twice (either upload mode) gives the same descriptor and readable bytes."""
        ref = registry.ref("push")
        data = random.Random(1).randbytes(2_500_000)
        first = await registry_client.push_blob(ref, data, chunked=chunked, chunk_size=1 << 20)
        second = await registry_client.push_blob(ref, data, chunked=chunked)
        assert first == second == Descriptor("application/octet-stream", digest_of(data), len(data), {})
        assert await registry_client.fetch_blob(ref, first.digest) == data


class TestRegistryDown:
    async def test_connection_refused(self, empty_docker_config: str) -> None:
        """A registry that is down gives FetchError naming the image and saying to check the registry."""
        from snapshotter.devtools.local_registry import free_port
        from snapshotter.remote.reference import parse_reference

        ref = parse_reference(f"127.0.0.1:{free_port()}/app:1")
        async with RegistryClient(docker_config_path=empty_docker_config, max_retries=1, timeout=2) as client:
            with pytest.raises(FetchError, match=r"127\.0\.0\.1:\d+/app:1.*reachable"):
                await client.resolve(ref)


def test_manifest_json_is_canonical() -> None:
    """build_manifest writes the layers in order with their descriptors."""
    layer = make_layer([file("x", "1")], "gzip")
    body = json.loads(
        build_manifest(Descriptor(mt.OCI_CONFIG, digest_of(b"{}"), 2, {}), [layer.descriptor()])
    )
    assert body["layers"][0]["digest"] == layer.digest
    assert body["mediaType"] == mt.OCI_MANIFEST


async def test_digest_mismatch_manifest(registry: TestRegistry, registry_client: RegistryClient) -> None:
    """A digest reference whose manifest hashes to something else is refused (DigestMismatch or NotFound)."""
    ref = registry.ref("pinned")
    pushed = await push_image(registry_client, ref, sample_layers()[:1])
    wrong = "sha256:" + ("0" * 64)
    with pytest.raises((DigestMismatch, NotFound)):
        await registry_client.resolve(pushed.reference.with_digest(wrong))


def test_demo_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The demo starts its own registry, pushes and resolves the sample image, prints layers and chain IDs."""
    from snapshotter.devtools.demo import run_demo

    assert run_demo() == 0
    out = capsys.readouterr().out
    assert out.count("chain ID sha256:") == 3
    assert "registry stopped" in out


async def test_plain_http_loads_no_ca_bundle(registry: TestRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that only talks plain HTTP never builds a verifying TLS context (certifi's bundle)."""
    import ssl

    built: list[object] = []
    real = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: built.append(a) or real(*a, **k))
    ref = registry.ref("no-tls")
    async with RegistryClient(docker_config_path="/nonexistent") as client:
        await push_image(client, ref, sample_layers()[:1])
        image = await client.resolve(ref)
        await client.read_range(ref, image.layers[0].digest, 0, 10)
    assert built == []


async def test_resolve_manifest_leaves_the_config_for_later(
    registry: TestRegistry, registry_client: RegistryClient
) -> None:
    """resolve_manifest gives the layers without the config; load_diff_ids then gives what resolve gives."""
    ref = registry.ref("split-resolve")
    await push_image(registry_client, ref, sample_layers())
    before = registry_client.bytes_fetched
    manifest_only = await registry_client.resolve_manifest(ref)
    assert registry_client.bytes_fetched == before  # no blob (the config is one) was fetched
    full = await registry_client.resolve(ref)
    assert manifest_only.diff_ids == []
    assert manifest_only.layers == full.layers and manifest_only.config == full.config
    assert await registry_client.load_diff_ids(manifest_only) == full.diff_ids
    assert len(full.diff_ids) == len(full.layers)
