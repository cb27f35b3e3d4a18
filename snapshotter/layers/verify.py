"""Whole-layer verification: a complete cached blob against its digest and DiffID, and its tar kept for reads.

When a layer's blob is complete, it is checked against the digest the manifest pins and its
uncompressed tar against the DiffID the config pins. A gzip or zstd layer's tar is then kept
next to the blob (decompressing it is what the DiffID check costs anyway), so later reads are a
``pread`` instead of inflating from a checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from typing import BinaryIO

import trio

from index.errors import DigestMismatch, LayerFormatError
from index.model import LayerFormat, LayerIndex
from index.reader import LayerReader
from index.uncompressed import open_tar_stream
from snapshotter.cache.blob_cache import CachedBlob
from snapshotter.layers.layer import Layer

UNCOMPRESSED_TAR = "uncompressed.tar"


async def verify_layer(layer: Layer, diff_id: str) -> None:
    """Check a complete cached blob against its digest and its DiffID, marking the layer verified.

    Raises:
        DigestMismatch: the blob or its uncompressed tar does not match (the cache entry is reset).
    """
    if not layer.blob.verified:
        await layer.blob.verify_whole()
    if layer.index.format in (LayerFormat.GZIP, LayerFormat.ZSTD) and not layer.unpacked:
        # Checking the DiffID decompresses the whole blob anyway: keep the tar it yields, so that
        # from now on a read is a pread instead of inflating a span (the decompressed-span cache
        # on disk; it costs the layer's uncompressed size, as an eager unpack would).
        if diff_id and layer.index.diff_id != diff_id:
            layer.blob.reset()
            raise DigestMismatch(
                f"layer {layer.descriptor.digest} (its index's DiffID)", diff_id, layer.index.diff_id
            )
        try:
            layer.reader, close = await local_tar_reader(layer.blob, layer.index)
        except DigestMismatch:
            layer.blob.reset()
            raise
        layer.on_close.append(close)
        layer.unpacked = True
        layer.diff_id_verified = bool(layer.index.diff_id)
        return
    if diff_id and not layer.diff_id_verified:
        actual = await trio.to_thread.run_sync(diff_id_of, layer.blob.data_path, layer.index.format)
        if actual != diff_id:
            layer.blob.reset()
            raise DigestMismatch(f"layer {layer.descriptor.digest} (uncompressed tar)", diff_id, actual)
        layer.diff_id_verified = True


async def local_tar_reader(blob: CachedBlob, index: LayerIndex) -> tuple[LayerReader, Callable[[], None]]:
    """A reader of ``index``'s files from the blob's uncompressed tar (made once under the blob's cache dir), and its closer.

    Raises:
        DigestMismatch: the blob or its tar does not match its digest or DiffID (nothing is kept).
        FetchError: the blob could not be fetched.
    """
    if not blob.complete:
        await blob.fill(yield_to_foreground=False)
    if not blob.verified:
        await blob.verify_whole()
    tar_path = blob.directory / UNCOMPRESSED_TAR
    if not tar_path.exists():
        await trio.to_thread.run_sync(_decompress_once, blob.data_path, index, tar_path)
    tar_fd = os.open(tar_path, os.O_RDONLY)

    async def read_tar(offset: int, length: int) -> bytes:
        return os.pread(tar_fd, length, offset)

    plain = LayerIndex(
        index.media_type,
        LayerFormat.TAR,
        index.digest,
        index.uncompressed_size,
        index.diff_id,
        index.uncompressed_size,
        index.entries,
    )
    return LayerReader(plain, read_tar), lambda: os.close(tar_fd)


def _decompress_once(blob_path: os.PathLike[str], index: LayerIndex, tar_path: os.PathLike[str]) -> None:
    """Write the uncompressed tar of a local blob, checked against the DiffID before it is kept."""
    # A name of its own per writer: two processes sharing a root (two mounts, a mount and serve)
    # may decompress the same blob at once, and must not write into or rename each other's file.
    temporary = f"{os.fspath(tar_path)}.{os.getpid()}.{uuid.uuid4().hex}.partial"
    try:
        with open(temporary, "wb") as out:
            # The index says how large the tar is: a blob inflating past that (a bomb behind a
            # lying index) stops there instead of filling the disk.
            actual = diff_id_of(blob_path, index.format, copy_to=out, limit=index.uncompressed_size or None)
        if index.diff_id and actual != index.diff_id:
            raise DigestMismatch(f"layer {index.digest} (uncompressed tar)", index.diff_id, actual)
        os.replace(temporary, tar_path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def diff_id_of(
    path: os.PathLike[str], fmt: LayerFormat, copy_to: BinaryIO | None = None, limit: int | None = None
) -> str:
    """sha256 of the uncompressed tar of a local blob, also written to ``copy_to`` when given.

    Raises:
        LayerFormatError: the tar grows past ``limit`` bytes.
    """
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as raw:
        stream = open_tar_stream(raw, fmt)
        while block := stream.read(4 << 20):
            size += len(block)
            if limit is not None and size > limit:
                raise LayerFormatError(
                    f"{os.fspath(path)}: the tar grows past the {limit} bytes its index says"
                )
            hasher.update(block)
            if copy_to is not None:
                copy_to.write(block)
    return "sha256:" + hasher.hexdigest()
