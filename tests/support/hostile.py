"""Helpers of the hostile end-to-end suite (``tests/hostile_e2e``): victim images, reads, outcome checks.

Every test states one rule of DESIGN.md's Trust section as an outcome it can check exactly: the
bytes of a file equal the original content, or the read fails with EIO (for that file only, the
others readable, the daemon alive), or ``lazysnap mount`` exits non-zero with one line naming the
cause and no traceback.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from index.builder import LayerIndexBuilder
from index.model import LayerIndex
from snapshotter.devtools.image_builder import Layer, PushedImage, TarEntry, file, make_layer
from snapshotter.layers.published import publish_indexes
from snapshotter.layers.sources import TOC_DIGEST_ANNOTATION
from snapshotter.mount.state import pid_alive
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.media_types import layer_format
from snapshotter.remote.reference import parse_reference
from tests.support.estargz_writer import build_estargz
from tests.support.lazysnap_cli import CliSession, push
from tests.support.registry import TestRegistry
from tests.support.tampering_proxy import TamperingProxy

# Files of the standard victim layer: a small one, two of the same size whose contents differ
# (so an index mapping one onto the other passes every size check), and a large incompressible
# one spanning many 64 KiB spans and several gzip checkpoints.
SMALL = "etc/app.conf"
TWIN_A = "bin/a.bin"
TWIN_B = "bin/b.bin"
BIG = "data/big.bin"
TWIN_SIZE = 200_000
BIG_SIZE = 3 << 20
ESTARGZ_CHUNK = 256 << 10


def victim_entries(seed: int = 1) -> list[TarEntry]:
    """The victim layer's entries; ``seed`` varies the contents so each test has blobs of its own."""
    rng = random.Random(seed)
    return [
        file(SMALL, f"key = value {seed}\n"),
        file(TWIN_A, rng.randbytes(TWIN_SIZE), mode=0o755),
        file(TWIN_B, rng.randbytes(TWIN_SIZE), mode=0o755),
        file(BIG, rng.randbytes(BIG_SIZE)),
    ]


def contents(entries: Sequence[TarEntry]) -> dict[str, bytes]:
    """Path to content of the regular files among ``entries``."""
    return {entry.path: entry.content for entry in entries if entry.kind == "file"}


def estargz_layer(entries: Sequence[TarEntry], *, annotated: bool = True) -> Layer:
    """An eStargz layer of ``entries``, with the toc.digest annotation unless ``annotated`` is False."""
    written = build_estargz(entries, chunk_size=ESTARGZ_CHUNK)
    annotations = {TOC_DIGEST_ANNOTATION: written.toc_digest} if annotated else {}
    return Layer(written.tar, written.blob, "gzip", annotations=annotations)


def build_layer(fmt: str, entries: Sequence[TarEntry]) -> Layer:
    """One layer of ``entries`` as gzip, multi-frame zstd, plain tar, or annotated eStargz."""
    if fmt == "estargz":
        return estargz_layer(entries)
    if fmt == "zstd":
        return make_layer(entries, "zstd", frame_size=256 << 10)
    return make_layer(entries, "gzip" if fmt == "gzip" else "tar")


@dataclass(frozen=True)
class Victim:
    """A pushed one-layer image and the content of its files."""

    image: PushedImage
    layer: Layer
    files: dict[str, bytes]

    @property
    def ref(self) -> str:
        """The image by tag on the registry itself."""
        return str(dataclasses.replace(self.image.reference, digest=None))


def push_victim(registry: TestRegistry, name: str, fmt: str, seed: int) -> Victim:
    """Push a one-layer victim image in ``fmt`` under a fresh repository ``test/NAME-N``."""
    entries = victim_entries(seed)
    layer = build_layer(fmt, entries)
    image = push(registry.ref(name), [layer])
    return Victim(image, layer, contents(entries))


def read_file(path: Path) -> bytes | int:
    """The file's bytes, or the errno its read failed with."""
    try:
        return path.read_bytes()
    except OSError as error:
        return error.errno or -1


def read_at(path: Path, offset: int, length: int) -> bytes | int:
    """``length`` bytes of ``path`` at ``offset`` with one pread, or the errno it failed with."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as error:
        return error.errno or -1
    try:
        return os.pread(fd, length, offset)
    except OSError as error:
        return error.errno or -1
    finally:
        os.close(fd)


def assert_correct_or_eio(mountpoint: Path, files: dict[str, bytes]) -> dict[str, bytes | int]:
    """Every file reads as its original content or fails with EIO, never other bytes; return the outcomes."""
    outcomes = {path: read_file(mountpoint / path) for path in files}
    for path, outcome in outcomes.items():
        assert outcome == files[path] or outcome == errno.EIO, (
            path,
            outcome if isinstance(outcome, int) else len(outcome),
        )
    return outcomes


def assert_all_correct(mountpoint: Path, files: dict[str, bytes]) -> None:
    """Every file reads as its original content."""
    for path, content in files.items():
        outcome = read_file(mountpoint / path)
        assert outcome == content, (path, outcome if isinstance(outcome, int) else len(outcome))


def assert_daemon_alive(cli: CliSession, mountpoint: Path, root: Path | None = None) -> None:
    """The daemon behind ``mountpoint`` still runs and answers ``lazysnap stats``."""
    pid = cli.daemon_pid(mountpoint, root)
    assert pid is not None and pid_alive(pid), "the daemon died"
    cli.stats(mountpoint, root)
    os.listdir(mountpoint)


def layer_stats(cli: CliSession, mountpoint: Path, root: Path | None = None) -> list[dict[str, Any]]:
    """The per-layer statistics of a running mount."""
    layers: list[dict[str, Any]] = cli.stats(mountpoint, root)["layers"]
    return layers


def assert_one_line_error(result: subprocess.CompletedProcess[str], *names: str) -> str:
    """``lazysnap mount`` failed with no traceback and one ``lazysnap:`` line naming each of ``names``."""
    assert result.returncode != 0, result.stdout
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("lazysnap: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


def through(proxy: TamperingProxy, image: PushedImage, *, by_digest: bool = False) -> str:
    """The image's reference through ``proxy``: by tag, or by manifest digest."""
    repository = image.reference.repository
    if by_digest:
        return f"{proxy.host}/{repository}@{image.manifest_digest}"
    return f"{proxy.host}/{repository}:{image.reference.tag}"


def honest_index(victim: Victim) -> LayerIndex:
    """The index lazysnap itself would build of the victim's layer."""
    descriptor = victim.image.layers[0]
    builder = LayerIndexBuilder(
        descriptor.media_type, layer_format(descriptor.media_type), digest=descriptor.digest
    )
    builder.feed(victim.layer.blob)
    return builder.finish()


def publish(ref: str, indexes: list[LayerIndex]) -> None:
    """Publish ``indexes`` next to the image at ``ref``, as ``lazysnap index push`` does."""

    async def run() -> None:
        async with RegistryClient(docker_config_path="/nonexistent/config.json") as client:
            image = await client.resolve(parse_reference(ref))
            await publish_indexes(client, image, indexes)

    trio.run(run)
