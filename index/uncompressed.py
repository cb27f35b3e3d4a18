"""The uncompressed tar stream of a whole local layer blob, whatever its compression."""

from __future__ import annotations

import gzip
from typing import BinaryIO, Protocol

import zstandard

from index.model import LayerFormat


class ReadableStream(Protocol):
    """Anything with ``read(n) -> bytes``."""

    def read(self, size: int = -1, /) -> bytes:
        """Read up to ``size`` bytes; b"" at the end."""
        ...


def open_tar_stream(raw: BinaryIO, fmt: LayerFormat) -> ReadableStream:
    """Wrap a blob's file object so that reading it yields the layer's uncompressed tar.

    Multi-member gzip (eStargz) and multi-frame zstd are read across members and frames.
    """
    if fmt is LayerFormat.TAR:
        return raw
    if fmt is LayerFormat.ZSTD:
        reader: ReadableStream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return reader
    return gzip.GzipFile(fileobj=raw, mode="rb")
