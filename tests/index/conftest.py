"""Helpers for the index tests: build tar layers in memory and compress them every way we read."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import zstandard

from index.builder import build_index
from index.estargz import TOC_NAME, read_estargz_index
from index.model import Entry, LayerFormat, LayerIndex
from tests.support.estargz_writer import EstargzBlob, build_estargz, footer, gzip_member
from tests.support.image_builder import (
    TarEntry,
    char_device,
    directory,
    file,
    hardlink,
    make_layer,
    symlink,
    whiteout,
)


def make_tar(members: Iterable[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """Return a tar archive of ``members`` written by Python's tarfile in format ``fmt``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def file_info(name: str, data: bytes = b"", **attrs: object) -> tuple[tarfile.TarInfo, bytes]:
    """Return a regular-file member ``name`` holding ``data``, with extra TarInfo attributes."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def other_info(name: str, kind: bytes, **attrs: object) -> tuple[tarfile.TarInfo, None]:
    """Return a data-less member (dir, symlink, hardlink, device, fifo) of tar type ``kind``."""
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, None


def gzip_members(data: bytes, member_size: int) -> bytes:
    """Compress ``data`` as consecutive gzip members of ``member_size`` input bytes each."""
    return b"".join(
        gzip.compress(data[i : i + member_size], 6) for i in range(0, max(len(data), 1), member_size)
    )


def zstd_frames(data: bytes, frame_size: int) -> bytes:
    """Compress ``data`` as consecutive zstd frames of ``frame_size`` input bytes each."""
    comp = zstandard.ZstdCompressor(level=3, write_checksum=True)
    return b"".join(comp.compress(data[i : i + frame_size]) for i in range(0, max(len(data), 1), frame_size))


COMPRESSORS: dict[str, tuple[LayerFormat, Callable[[bytes], bytes]]] = {
    "tar": (LayerFormat.TAR, lambda t: t),
    "gzip": (LayerFormat.GZIP, lambda t: gzip.compress(t, 6)),
    "gzip-members": (LayerFormat.GZIP, lambda t: gzip_members(t, 50_000)),
    "zstd": (LayerFormat.ZSTD, lambda t: zstandard.ZstdCompressor(level=3).compress(t)),
    "zstd-frames": (LayerFormat.ZSTD, lambda t: zstd_frames(t, 64 << 10)),
}


def blob_source(
    blob: bytes, log: list[tuple[int, int]] | None = None
) -> Callable[[int, int], Awaitable[bytes]]:
    """Return an async read_range over ``blob`` that records each call in ``log``."""

    async def read_range(offset: int, length: int) -> bytes:
        if log is not None:
            log.append((offset, length))
        return blob[offset : offset + length]

    return read_range


def files_of(index: LayerIndex) -> dict[str, Entry]:
    """Return the last regular-file entry of each path in ``index``."""
    return {e.path: e for e in index.entries if e.data_offset >= 0}


# A layer for the trust checks: adjacent small files, PAX records (a long path, xattrs), every
# entry type, a whiteout, an empty file, and a path given twice (the later copy wins).
TRUST_ENTRIES = [
    directory("etc"),
    file("etc/hostname", "box\n"),
    file("etc/shadow", "root:*:19000::::::\n", mode=0o600),
    file("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
    file("bin/tool", bytes(range(256)) * 40, mode=0o755, xattrs={"user.origin": "build"}),
    symlink("bin/sh", "tool"),
    hardlink("bin/alias", "bin/tool"),
    file("usr/share/" + "long-name-" * 14 + "/data", "deep\n", uid=1000, gid=1000),
    char_device("dev/null", 1, 3),
    whiteout("var/old"),
    file("etc/empty"),
    file("etc/passwd", "root:x:0:0::/root:/bin/bash\n"),
]
TAR_KINDS = ("tar", "gzip", "zstd-frames")
ESTARGZ_KINDS = {  # build_estargz options: a member per file, small files grouped, files cut in chunks
    "estargz": {},
    "estargz-grouped": {"min_chunk_size": 4096, "prefetch_count": 3},
    "estargz-chunked": {"chunk_size": 1000, "prefetch_count": 0},
}
LAYER_KINDS = (*TAR_KINDS, *ESTARGZ_KINDS)


async def trust_layer(kind: str, entries: list[TarEntry] = TRUST_ENTRIES) -> tuple[LayerIndex, bytes]:
    """The index and blob of ``entries`` as a layer of ``kind`` (``LAYER_KINDS``), indexed as lazysnap does."""
    if kind in ESTARGZ_KINDS:
        written = build_estargz(entries, **ESTARGZ_KINDS[kind])
        return await estargz_index(written.blob), written.blob
    layer = (
        make_layer(entries, "zstd", frame_size=2048) if kind == "zstd-frames" else make_layer(entries, kind)
    )
    fmt = {"tar": LayerFormat.TAR, "gzip": LayerFormat.GZIP, "zstd-frames": LayerFormat.ZSTD}[kind]
    return build_index("m", fmt, [layer.blob]), layer.blob


async def estargz_index(blob: bytes) -> LayerIndex:
    """The index read from an eStargz blob's TOC."""
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    return await read_estargz_index(blob_source(blob), len(blob), digest=digest, media_type="m")


def with_toc(written: EstargzBlob, toc: dict[str, Any]) -> bytes:
    """``written``'s blob with its TOC replaced by ``toc``: the same file members, another table."""
    toc_json = json.dumps(toc).encode()
    return (
        written.blob[: written.toc_offset]
        + gzip_member(make_tar([file_info(TOC_NAME, toc_json)]))
        + footer(written.toc_offset)
    )


def entry_named(index: LayerIndex, path: str) -> Entry:
    """The last entry of ``index`` at ``path``."""
    return [e for e in index.entries if e.path == path][-1]


async def overlapping_chunks_layer() -> tuple[LayerIndex, bytes, EstargzBlob]:
    """Files a and b (100 bytes each) in an eStargz blob whose TOC gives b a's chunk; the index, blob, and the genuine writing."""
    written = build_estargz([file("a", "A" * 100), file("b", "B" * 100)])
    toc = written.toc
    a, b = toc["entries"]
    b.update(offset=a["offset"], chunkDigest=a["chunkDigest"])
    blob = with_toc(written, toc)
    return await estargz_index(blob), blob, written
