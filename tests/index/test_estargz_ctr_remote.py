"""A real eStargz layer, converted by ``ctr-remote image convert --estargz --oci``, indexes correctly.

Pipeline: push a small gzip image to a local docker-registry, pull it into a private
containerd (tests/support/containerd.py), convert it with ctr-remote, push the result, then
read the converted layer's footer and TOC with the registry client's Range reads and check
every file against the original.
The image carries /bin/sh and its libraries from the host, so containers can run it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from index.completion_check import compare_with_blob
from index.estargz import TOC_DIGEST_ANNOTATION, read_estargz
from index.model import EntryType, LayerFormat
from index.reader import LayerReader
from snapshotter.remote.client import RegistryClient
from tests.index.conftest import blob_source
from tests.support.containerd import run_shell
from tests.support.image_builder import (
    DEFAULT_MTIME,
    Layer,
    directory,
    fifo,
    file,
    make_layer,
    push_image,
    symlink,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.support.containerd import Containerd
    from tests.support.registry import TestRegistry

# Imported as a plugin (not directly) so pytest can rewrite its asserts.
pytestmark = [pytest.mark.containerd, pytest.mark.slow]

MTIME = DEFAULT_MTIME

FILES: dict[str, bytes] = {
    "etc/hostname": b"lazysnap\n",
    "app/big.bin": random.Random(7).randbytes(5 << 20),  # over ctr-remote's 4 MiB chunk size
    "app/empty": b"",
    "app/text.txt": b"the quick brown fox\n" * 5000,
    "app/nested/deep/file": b"deep\n",
}


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _runtime_files() -> dict[str, bytes]:
    """/bin/dash as bin/sh plus the libraries ldd names, so a container can run ``sh -c``."""
    files = {"bin/sh": Path("/bin/dash").read_bytes()}
    ldd = subprocess.run(["ldd", "/bin/dash"], capture_output=True, text=True, check=True).stdout
    for path in re.findall(r"(/\S+) \(0x", ldd):
        files[path.lstrip("/")] = Path(os.path.realpath(path)).read_bytes()
    return files


def _layer(files: dict[str, bytes]) -> Layer:
    """A gzip layer with ``files``, their directories, a symlink and a FIFO."""
    dirs = sorted({str(parent) for p in files for parent in Path(p).parents if str(parent) != "."})
    entries = [directory(d) for d in dirs]
    entries += [
        file(p, data, mode=0o755 if p.startswith(("bin/", "lib")) else 0o644) for p, data in files.items()
    ]
    entries += [symlink("app/link", "text.txt"), fifo("app/fifo")]
    return make_layer(entries, "gzip")


@pytest.fixture
async def source_image(registry: TestRegistry, registry_client: RegistryClient) -> str:
    """The reference of a pushed gzip image with FILES and a shell."""
    ref = registry.ref("esgz-src")
    await push_image(registry_client, ref, [_layer({**FILES, **_runtime_files()})])
    return str(ref)


async def test_ctr_remote_converted_layer(
    containerd: Containerd, registry: TestRegistry, registry_client: RegistryClient, source_image: str
) -> None:
    """Every regular file of a ctr-remote eStargz layer reads back equal to the original, the TOC verifies, and so do its mapping checks."""
    if shutil.which("ctr-remote") is None:
        pytest.skip("needs ctr-remote (Debian stargz-snapshotter)")
    target_ref = registry.ref("esgz-dst")
    target = str(target_ref)
    containerd.ctr("image", "pull", "--plain-http", source_image)
    containerd.ctr_remote("image", "convert", "--estargz", "--oci", source_image, target)
    containerd.ctr("image", "push", "--plain-http", target)

    # Through the registry client's resolve and read_range, as the snapshotter will do it.
    image = await registry_client.resolve(target_ref)
    [layer] = image.layers
    blob = await registry_client.fetch_blob(target_ref, layer.digest)
    calls = 0

    async def read_range(offset: int, length: int) -> bytes:
        nonlocal calls
        calls += 1
        return await registry_client.read_range(target_ref, layer.digest, offset, length)

    toc_digest = layer.annotations[TOC_DIGEST_ANNOTATION]
    result = await read_estargz(
        read_range, layer.size, digest=layer.digest, media_type=layer.media_type, toc_digest=toc_digest
    )
    assert calls <= 2
    index = result.index
    assert index.format is LayerFormat.ESTARGZ and index.toc_digest == toc_digest

    by_path = {e.path: e for e in index.entries}
    # ctr-remote convert (without optimize) marks the layer "prefetch nothing".
    assert result.prefetch_count == 0 and ".no.prefetch.landmark" not in by_path
    assert by_path["app/link"].type is EntryType.SYMLINK and by_path["app/link"].link_target == "text.txt"
    assert by_path["app/fifo"].type is EntryType.FIFO
    assert by_path["app/nested/deep"].type is EntryType.DIR and by_path["app/nested/deep"].mode == 0o755
    assert len(by_path["app/big.bin"].chunks) >= 2, "ctr-remote chunks files over 4 MiB"
    expected = {**FILES, **_runtime_files()}
    regular = {e.path: e for e in index.entries if e.type is EntryType.FILE}
    assert set(regular) == set(expected)
    for path, data in expected.items():
        entry = regular[path]
        assert entry.size == len(data) and entry.mtime_ns == MTIME * 10**9
        got = b""
        for chunk in entry.chunks:
            member = gzip.decompress(blob[chunk.blob_offset : chunk.blob_end])
            piece = member[chunk.inner_offset : chunk.inner_offset + chunk.size]
            assert _digest(piece) == chunk.digest
            got += piece
        assert got == data, path

    # The real writer's layout passes both trust checks: each file's headers (found at the end of
    # the member before its data) at its first read, and the whole TOC against the blob's tar.
    reader = LayerReader(index, blob_source(blob))
    for path, data in expected.items():
        assert await reader.read(regular[path], 0, len(data)) == data, path
    assert compare_with_blob(index, [blob]) == []

    # The converted image is still an ordinary image: containerd unpacks and runs it.
    output = run_shell(containerd, target, "esgz-run", "read l < /app/nested/deep/file; echo $l")
    assert output == "deep\n"


@pytest.mark.parametrize("crash", [False, True], ids=["running", "after-crash"])
async def test_launcher_cleans_up(
    containerd_factory: Callable[..., Containerd], source_image: str, crash: bool
) -> None:
    """Stopping the launcher ends containerd, shims and containers (also after containerd died), leaving nothing."""
    instance = containerd_factory()
    instance.ctr("image", "pull", "--plain-http", source_image)
    # A container blocked forever on a FIFO: only the launcher's stop() can end it.
    instance.ctr("run", "-d", source_image, "blocked", "/bin/sh", "-c", "read x < /app/fifo")
    assert "RUNNING" in instance.ctr("task", "ls").stdout
    assert len(instance.namespace_pids()) >= 3  # containerd, the shim, the container
    if crash:
        assert instance.pid is not None
        os.kill(instance.pid, signal.SIGKILL)
    instance.stop()
    assert instance.namespace_pids() == []
    assert not instance.base.exists()
    assert str(instance.base) not in Path("/proc/self/mountinfo").read_text()
