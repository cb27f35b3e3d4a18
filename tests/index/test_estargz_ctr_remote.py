"""A real eStargz layer, converted by ``ctr-remote image convert --estargz --oci``, indexes correctly.

Pipeline: push a small gzip image to a local docker-registry, pull it into a private
containerd, convert it with ctr-remote, push the result, then read the converted layer's
footer and TOC over HTTP Range requests and check every file against the original.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from index.estargz import TOC_DIGEST_ANNOTATION, read_estargz
from index.model import EntryType, LayerFormat
from snapshotter.local_registry import LocalRegistry

if TYPE_CHECKING:
    from tests.support.containerd import Containerd

# Imported as a plugin (not directly) so pytest can rewrite its asserts.
pytest_plugins = ["tests.support.containerd"]
pytestmark = [pytest.mark.containerd, pytest.mark.slow]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

BIG = random.Random(7).randbytes(5 << 20)  # over ctr-remote's 4 MiB chunk size: two chunks
FILES: dict[str, bytes] = {
    "etc/hostname": b"lazysnap\n",
    "app/big.bin": BIG,
    "app/empty": b"",
    "app/text.txt": b"the quick brown fox\n" * 5000,
    "app/nested/deep/file": b"deep\n",
}


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer_tar() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name in ("app", "app/nested", "app/nested/deep", "etc"):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            archive.addfile(info)
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("app/link")
        link.type, link.linkname, link.mtime = tarfile.SYMTYPE, "text.txt", 1_700_000_000
        archive.addfile(link)
    return out.getvalue()


@pytest.fixture
def registry_url(tmp_path: Path) -> Iterator[str]:
    """A docker-registry on 127.0.0.1 with filesystem storage."""
    if shutil.which("docker-registry") is None:
        pytest.skip("needs docker-registry")
    with LocalRegistry(tmp_path / "registry") as registry:
        yield registry.url


def _push_blob(client: httpx.Client, url: str, repo: str, data: bytes) -> str:
    digest = _digest(data)
    start = client.post(f"{url}/v2/{repo}/blobs/uploads/")
    start.raise_for_status()
    # The upload URL carries its own query (_state); add the digest to it, don't replace it.
    location = httpx.URL(url).join(start.headers["location"]).copy_merge_params({"digest": digest})
    done = client.put(location, content=data)
    done.raise_for_status()
    return digest


def push_gzip_image(url: str, repo: str, tag: str) -> None:
    """Push a one-layer linux/amd64 OCI image with FILES as a plain gzip layer."""
    tar = _layer_tar()
    layer = gzip.compress(tar, mtime=0)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [_digest(tar)]},
        }
    ).encode()
    with httpx.Client() as client:
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": _push_blob(client, url, repo, config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": OCI_LAYER_GZIP,
                    "digest": _push_blob(client, url, repo, layer),
                    "size": len(layer),
                }
            ],
        }
        body = json.dumps(manifest).encode()
        client.put(
            f"{url}/v2/{repo}/manifests/{tag}", content=body, headers={"content-type": OCI_MANIFEST}
        ).raise_for_status()


def fetch_manifest(url: str, repo: str, tag: str) -> dict[str, Any]:
    """The linux/amd64 image manifest of ``repo:tag`` (following an index if there is one)."""
    accept = {"accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}
    with httpx.Client() as client:
        doc: dict[str, Any] = (
            client.get(f"{url}/v2/{repo}/manifests/{tag}", headers=accept).raise_for_status().json()
        )
        if doc.get("mediaType") == OCI_INDEX or "manifests" in doc:
            chosen = next(m for m in doc["manifests"] if m.get("platform", {}).get("architecture") == "amd64")
            doc = (
                client.get(f"{url}/v2/{repo}/manifests/{chosen['digest']}", headers=accept)
                .raise_for_status()
                .json()
            )
    return doc


class RangeSource:
    """read_range over HTTP Range requests to the registry, counting requests."""

    def __init__(self, client: httpx.AsyncClient, blob_url: str) -> None:
        self.client = client
        self.blob_url = blob_url
        self.calls = 0

    async def __call__(self, offset: int, length: int) -> bytes:
        self.calls += 1
        headers = {"range": f"bytes={offset}-{offset + length - 1}"}
        response = await self.client.get(self.blob_url, headers=headers)
        assert response.status_code == 206, response.status_code
        return response.content


async def test_ctr_remote_converted_layer(containerd: Containerd, registry_url: str) -> None:
    """Every regular file of a ctr-remote eStargz layer reads back equal to the original, the TOC verifies."""
    if shutil.which("ctr-remote") is None:
        pytest.skip("needs ctr-remote (Debian stargz-snapshotter)")
    host = registry_url.removeprefix("http://")
    push_gzip_image(registry_url, "src", "v1")
    containerd.ctr("image", "pull", "--plain-http", f"{host}/src:v1")
    containerd.ctr_remote("image", "convert", "--estargz", "--oci", f"{host}/src:v1", f"{host}/dst:v1")
    containerd.ctr("image", "push", "--plain-http", f"{host}/dst:v1")

    manifest = fetch_manifest(registry_url, "dst", "v1")
    [layer] = manifest["layers"]
    toc_digest = layer["annotations"][TOC_DIGEST_ANNOTATION]
    blob_url = f"{registry_url}/v2/dst/blobs/{layer['digest']}"
    async with httpx.AsyncClient() as client:
        blob = (await client.get(blob_url)).raise_for_status().content
        assert _digest(blob) == layer["digest"]
        source = RangeSource(client, blob_url)
        result = await read_estargz(
            source,
            layer["size"],
            digest=layer["digest"],
            media_type=layer["mediaType"],
            toc_digest=toc_digest,
        )
    assert source.calls <= 2
    index = result.index
    assert index.format is LayerFormat.ESTARGZ and index.toc_digest == toc_digest

    by_path = {e.path: e for e in index.entries}
    # ctr-remote convert (without optimize) marks the layer "prefetch nothing".
    assert result.prefetch_count == 0 and ".no.prefetch.landmark" not in by_path
    assert by_path["app/link"].type is EntryType.SYMLINK and by_path["app/link"].link_target == "text.txt"
    assert by_path["app/nested/deep"].type is EntryType.DIR and by_path["app/nested/deep"].mode == 0o755
    assert len(by_path["app/big.bin"].chunks) >= 2, "ctr-remote chunks files over 4 MiB"
    regular = {e.path: e for e in index.entries if e.type is EntryType.FILE}
    assert set(regular) == set(FILES)
    for path, data in FILES.items():
        entry = regular[path]
        assert entry.size == len(data) and entry.mtime_ns == 1_700_000_000 * 10**9
        got = b""
        for chunk in entry.chunks:
            member = gzip.decompress(blob[chunk.blob_offset : chunk.blob_end])
            piece = member[chunk.inner_offset : chunk.inner_offset + chunk.size]
            assert _digest(piece) == chunk.digest
            got += piece
        assert got == data, path
