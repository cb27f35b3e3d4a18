"""Helpers for the index tests: build tar layers in memory and compress them every way we read."""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Awaitable, Callable, Iterable

import zstandard

from index.model import Entry, LayerFormat, LayerIndex


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
