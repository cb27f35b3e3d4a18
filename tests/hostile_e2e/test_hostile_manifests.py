"""Hostile manifests, configs and indexes: ``lazysnap mount`` refuses each with one line naming the field.

Each case pushes a real layer and config to the session registry, then a manifest (or index)
spoiled one way. docker-registry validates manifests when they are pushed and parses them again
when they are pulled, so what it refuses to store is served instead by the tampering proxy, as
a hostile registry would serve it. The mount always goes through the proxy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from snapshotter.devtools.image_builder import file, image_config, make_layer
from snapshotter.remote import media_types as mt
from snapshotter.remote.client import Platform, RegistryClient, digest_of
from snapshotter.remote.reference import Reference
from tests.support.hostile import assert_all_correct, assert_one_line_error
from tests.support.lazysnap_cli import CliSession
from tests.support.registry import TestRegistry
from tests.support.tampering_proxy import TamperingProxy

Document = dict[str, Any]
Mutation = Callable[[Document], None]
FILES = {"etc/app.conf": b"key = value\n", "bin/tool": bytes(range(256)) * 400}
BOGUS_SHA256 = "sha256:" + "ab" * 32


def canonical(document: Any) -> bytes:
    """``document`` as compact JSON bytes."""
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def keep(_: Document) -> None:
    """Leave the document as it is."""


def setting(*path_and_value: Any) -> Mutation:
    """Set ``document[k1][k2]...[kn] = value``; the last argument is the value."""
    *path, key, value = path_and_value

    def mutate(document: Document) -> None:
        target: Any = document
        for step in path:
            target = target[step]
        target[key] = value

    return mutate


def deleting(*path: Any) -> Mutation:
    """Delete ``document[k1]...[kn]``."""
    *parents, key = path

    def mutate(document: Document) -> None:
        target: Any = document
        for step in parents:
            target = target[step]
        del target[key]

    return mutate


def layer_size_shift(delta: int) -> Mutation:
    """Change the first layer's size by ``delta`` bytes."""

    def mutate(document: Document) -> None:
        document["layers"][0]["size"] += delta

    return mutate


def diff_id_of_other_tar(document: Document) -> None:
    """Replace the first DiffID with the digest of some other tar."""
    document["rootfs"]["diff_ids"][0] = digest_of(b"another tar")


@dataclass(frozen=True)
class Case:
    """A spoiled manifest or config, and the words the one error line must hold (none: it must mount)."""

    names: tuple[str, ...]
    manifest: Mutation = keep
    config: Mutation = keep
    content_type: str = mt.OCI_MANIFEST
    raw_manifest: bytes | None = None  # replaces the manifest's bytes entirely
    layer_annotations: dict[str, str] = field(default_factory=dict)


CASES: dict[str, Case] = {
    "manifest-content-type-and-body-mediaType-a-config": Case(
        ("unsupported manifest media type", mt.OCI_CONFIG),
        setting("mediaType", mt.OCI_CONFIG),
        content_type="application/json",
    ),
    "manifest-mediaType-missing-shape-is-a-manifest": Case(
        (), deleting("mediaType"), content_type="application/json"
    ),
    "manifest-schema1": Case(("schema 1",), content_type=mt.DOCKER_MANIFEST_V1_SIGNED),
    "manifest-not-json": Case(("manifest", "not valid JSON"), raw_manifest=b"{not json"),
    "manifest-a-json-array": Case(("manifest", "not a JSON object"), raw_manifest=b"[1, 2]"),
    "layer-mediaType-missing": Case(("layer 0", "mediaType"), deleting("layers", 0, "mediaType")),
    "layer-mediaType-bzip2": Case(
        ("layer 0", "unsupported layer media type"),
        setting("layers", 0, "mediaType", "application/vnd.oci.image.layer.v1.tar+bzip2"),
    ),
    "layer-mediaType-a-number": Case(("layer 0", "mediaType"), setting("layers", 0, "mediaType", 7)),
    "config-mediaType-artifact": Case(
        ("config media type", "application/vnd.example.artifact"),
        setting("config", "mediaType", "application/vnd.example.artifact"),
    ),
    "config-missing": Case(("config", "descriptor is not a JSON object"), deleting("config")),
    "layers-missing": Case(("no layers list",), deleting("layers")),
    "layers-an-object": Case(("no layers list",), setting("layers", {"0": {}})),
    "layers-a-string": Case(("no layers list",), setting("layers", "sha256:abc")),
    "layer-a-string": Case(("layer 0", "not a JSON object"), setting("layers", 0, "sha256:abc")),
    "layer-size-minus-one": Case(("layer 0", "size"), setting("layers", 0, "size", -1)),
    "layer-size-2-pow-64": Case(("layer 0", "size"), setting("layers", 0, "size", 2**64)),
    "layer-size-2-pow-63": Case(("layer 0", "size"), setting("layers", 0, "size", 2**63)),
    "layer-size-a-string": Case(("layer 0", "size"), setting("layers", 0, "size", "1234")),
    "layer-size-a-float": Case(("layer 0", "size"), setting("layers", 0, "size", 1234.5)),
    "layer-size-true": Case(("layer 0", "size"), setting("layers", 0, "size", True)),
    "layer-size-one-short": Case(("layer", "size"), layer_size_shift(-1)),
    "layer-size-one-over": Case(("layer", "size"), layer_size_shift(+1)),
    "layer-digest-sha512": Case(
        ("layer 0", "only sha256"), setting("layers", 0, "digest", "sha512:" + "cd" * 64)
    ),
    "layer-digest-unknown-algorithm": Case(
        ("layer 0", "only sha256"), setting("layers", 0, "digest", "md5:" + "0123456789abcdef" * 2)
    ),
    "layer-digest-short-hex": Case(
        ("layer 0", "invalid digest"), setting("layers", 0, "digest", "sha256:" + "ab" * 31)
    ),
    "layer-digest-uppercase-hex": Case(
        ("layer 0", "invalid digest"), setting("layers", 0, "digest", "sha256:" + "AB" * 32)
    ),
    "layer-digest-path-traversal": Case(
        ("layer 0", "invalid digest"), setting("layers", 0, "digest", "sha256:../../../../etc/passwd/x/y/z/w")
    ),
    "layer-digest-no-algorithm": Case(
        ("layer 0", "invalid digest"), setting("layers", 0, "digest", "ab" * 32)
    ),
    "layer-digest-absent-blob": Case(("layer", BOGUS_SHA256), setting("layers", 0, "digest", BOGUS_SHA256)),
    "layer-annotations-a-list": Case(("layer 0", "annotations"), setting("layers", 0, "annotations", ["a"])),
    "layer-urls-a-string": Case(("layer 0", "urls"), setting("layers", 0, "urls", "http://example.com/x")),
    "layer-huge-annotation-value": Case((), layer_annotations={"org.example.note": "x" * (1 << 20)}),
    "manifest-over-4-MiB-annotation": Case(
        ("over the", "limit"), setting("annotations", {"org.example.note": "x" * (5 << 20)})
    ),
    "layer-toc-digest-annotation-garbage": Case(
        ("layer",),
        layer_annotations={"containerd.io/snapshot/stargz/toc.digest": "sha256:" + "x" * 4000},
    ),
    "config-diff-ids-one-too-many": Case(
        ("diff_ids", "2", "1 layers"),
        config=setting("rootfs", "diff_ids", [BOGUS_SHA256, BOGUS_SHA256]),
    ),
    "config-diff-ids-empty": Case(("diff_ids", "0", "1 layers"), config=setting("rootfs", "diff_ids", [])),
    "config-diff-ids-missing": Case(("rootfs.diff_ids",), config=deleting("rootfs", "diff_ids")),
    "config-diff-ids-a-string": Case(
        ("rootfs.diff_ids",), config=setting("rootfs", "diff_ids", BOGUS_SHA256)
    ),
    "config-diff-id-malformed": Case(
        ("diff_id", "invalid digest"), config=setting("rootfs", "diff_ids", ["x"])
    ),
    "config-diff-id-of-another-tar": Case(("uncompressed tar",), config=diff_id_of_other_tar),
    "config-rootfs-a-list": Case(("rootfs.diff_ids",), config=setting("rootfs", [])),
}


def put_manifest(registry: TestRegistry, repository: str, key: str, body: bytes, content_type: str) -> bool:
    """PUT a manifest straight to the registry; True if it stored it."""
    url = f"{registry.url}/v2/{repository}/manifests/{key}"
    return httpx.put(url, content=body, headers={"Content-Type": content_type}).is_success


def put_blob(registry: TestRegistry, repository: str, data: bytes) -> str:
    """Upload a blob with the registry client; return its digest."""
    reference = Reference(registry.host, repository, None, None)

    async def upload() -> str:
        async with RegistryClient(docker_config_path="/nonexistent/config.json") as client:
            return (await client.push_blob(reference, data)).digest

    return trio.run(upload)


def serve_manifest(
    registry: TestRegistry, proxy: TamperingProxy, repository: str, key: str, body: bytes, content_type: str
) -> None:
    """Publish ``body`` under ``key``: pushed to the registry, or served by the proxy if the registry refuses it."""
    if not put_manifest(registry, repository, key, body, content_type):
        proxy.manifests[(repository, key)] = (content_type, body)


@dataclass(frozen=True)
class Pushed:
    """A good layer and config in a repository, and the manifest document that would describe them."""

    repository: str
    manifest: Document
    config: Document


def push_parts(registry: TestRegistry, name: str, case: Case | None = None) -> Pushed:
    """Push the layer and the (possibly spoiled) config; return the manifest document, unspoiled."""
    case = case or Case(())
    layer = make_layer([file(path, data) for path, data in FILES.items()], "gzip")
    repository = registry.ref(name).repository
    put_blob(registry, repository, layer.blob)
    config: Document = json.loads(image_config([layer.diff_id]))
    case.config(config)
    config_bytes = canonical(config)
    put_blob(registry, repository, config_bytes)
    layer_descriptor: Document = {
        "mediaType": mt.OCI_LAYER_GZIP,
        "digest": layer.digest,
        "size": len(layer.blob),
    }
    if case.layer_annotations:
        layer_descriptor["annotations"] = dict(case.layer_annotations)
    manifest: Document = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": digest_of(config_bytes), "size": len(config_bytes)},
        "layers": [layer_descriptor],
    }
    return Pushed(repository, manifest, config)


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_hostile_manifest_or_config(
    case_id: str,
    registry: TestRegistry,
    proxy: TamperingProxy,
    cli: CliSession,
    mountpoint: Path,
) -> None:
    """A spoiled manifest or config makes `lazysnap mount` exit non-zero with one line naming the field, or (when the spoiling is harmless) mounts the right bytes."""
    case = CASES[case_id]
    pushed = push_parts(registry, "hostile-manifest", case)
    case.manifest(pushed.manifest)
    body = case.raw_manifest if case.raw_manifest is not None else canonical(pushed.manifest)
    serve_manifest(registry, proxy, pushed.repository, "latest", body, case.content_type)
    result = cli.mount(f"{proxy.host}/{pushed.repository}:latest", mountpoint, "--no-background-fetch")
    if not case.names:
        assert result.returncode == 0, result.stderr[-3000:]
        assert_all_correct(mountpoint, FILES)
        return
    assert_one_line_error(result, *case.names)


def test_pull_by_digest_of_other_bytes(
    registry: TestRegistry, proxy: TamperingProxy, cli: CliSession, mountpoint: Path
) -> None:
    """A manifest pulled by digest whose bytes hash to another digest is refused with a line naming both digests."""
    pushed = push_parts(registry, "digest-mismatch")
    good = canonical(pushed.manifest)
    wanted = digest_of(good)
    pushed.manifest["annotations"] = {"evil": "yes"}
    proxy.manifests[(pushed.repository, wanted)] = (mt.OCI_MANIFEST, canonical(pushed.manifest))
    result = cli.mount(f"{proxy.host}/{pushed.repository}@{wanted}", mountpoint, "--no-background-fetch")
    assert_one_line_error(result, wanted, digest_of(canonical(pushed.manifest)))


INDEX_CASES: dict[str, tuple[str, ...]] = {
    "points-at-a-missing-manifest": ("manifest", BOGUS_SHA256),
    "manifests-not-a-list": ("no manifests list",),
    "no-matching-platform": ("no manifest for platform",),
    "entry-digest-malformed": ("index entry 0", "invalid digest"),
    "entry-of-another-manifest-bytes": ("manifest", "sha256:"),
}


def lying_digest(manifest_body: bytes) -> str:
    """A digest that is not the manifest's, under which the proxy serves the manifest anyway."""
    return "sha256:" + hashlib.sha256(manifest_body + b" ").hexdigest()


def spoiled_index(case_id: str, manifest_body: bytes) -> Document:
    """An image index over the good manifest, spoiled as ``case_id`` says."""
    entry: Document = {
        "mediaType": mt.OCI_MANIFEST,
        "digest": digest_of(manifest_body),
        "size": len(manifest_body),
        "platform": Platform().to_json(),
    }
    if case_id == "points-at-a-missing-manifest":
        entry["digest"] = BOGUS_SHA256
    elif case_id == "no-matching-platform":
        entry["platform"] = {"os": "plan9", "architecture": "mips"}
    elif case_id == "entry-digest-malformed":
        entry["digest"] = "sha256:nothex"
    elif case_id == "entry-of-another-manifest-bytes":
        entry["digest"] = lying_digest(manifest_body)
    manifests: Any = {"0": entry} if case_id == "manifests-not-a-list" else [entry]
    return {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": manifests}


@pytest.mark.parametrize("case_id", sorted(INDEX_CASES))
def test_hostile_image_index(
    case_id: str,
    registry: TestRegistry,
    proxy: TamperingProxy,
    cli: CliSession,
    mountpoint: Path,
) -> None:
    """A spoiled image index (missing or mismatched manifest, malformed entry, no platform) is refused with one line naming the cause."""
    pushed = push_parts(registry, "hostile-index")
    manifest_body = canonical(pushed.manifest)
    assert put_manifest(registry, pushed.repository, digest_of(manifest_body), manifest_body, mt.OCI_MANIFEST)
    index = canonical(spoiled_index(case_id, manifest_body))
    proxy.manifests[(pushed.repository, lying_digest(manifest_body))] = (mt.OCI_MANIFEST, manifest_body)
    serve_manifest(registry, proxy, pushed.repository, "latest", index, mt.OCI_INDEX)
    result = cli.mount(f"{proxy.host}/{pushed.repository}:latest", mountpoint, "--no-background-fetch")
    assert_one_line_error(result, *INDEX_CASES[case_id])
