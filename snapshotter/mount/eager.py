"""``lazysnap mount --eager``: the baseline. Download every layer, unpack it, bind-mount the result.

This is what a normal pull does (containerd's overlayfs snapshotter): every layer is downloaded in
full and verified, then applied in order onto one directory with containerd's whiteout rules,
and the directory is bind-mounted read-only, nosuid and nodev at the mount point.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import trio

from index.errors import DigestMismatch
from index.uncompressed import ReadableStream, open_tar_stream
from snapshotter.config import Config
from snapshotter.mount.eager_unpack import apply_layer
from snapshotter.mount.state import MountRecord, write_record
from snapshotter.remote.client import Descriptor, RegistryClient, ResolvedImage, open_registry_client
from snapshotter.remote.media_types import layer_format


@dataclass
class EagerResult:
    """What an eager mount did."""

    rootfs: Path
    seconds: float
    bytes_downloaded: int
    image_size: int


async def eager_mount(
    client: RegistryClient, image: ResolvedImage, root: Path, mountpoint: str
) -> EagerResult:
    """Download, verify and unpack every layer of ``image`` under ``root``, then bind-mount it read-only.

    Raises:
        DigestMismatch: a layer's tar does not match its DiffID.
        RegistryError, FetchError, LayerFormatError: as the download and unpack raise them.
    """
    started = time.monotonic()
    # A directory of its own per mount: another eager mount of the same image on this root may
    # be showing its tree right now, and must not see it removed or unpacked over.
    work = root / "eager" / image.manifest_digest.replace(":", "-") / uuid.uuid4().hex
    rootfs, blobs = work / "rootfs", work / "blobs"
    rootfs.mkdir(parents=True, mode=0o755)
    blobs.mkdir(parents=True)
    downloaded = 0
    try:
        for number, layer in enumerate(image.layers):
            path = blobs / layer.digest.replace(":", "-")
            downloaded += await _download(client, image, layer, path)
            diff_id = image.diff_ids[number] if number < len(image.diff_ids) else ""
            await trio.to_thread.run_sync(_unpack, path, layer, diff_id, rootfs)
            path.unlink()
        blobs.rmdir()
        bind_mount_readonly(rootfs, mountpoint)
    except BaseException:
        remove_unpacked(str(rootfs))  # nothing shows it: a failed mount leaves no tree behind
        raise
    return EagerResult(
        rootfs, time.monotonic() - started, downloaded, sum(layer.size for layer in image.layers)
    )


# A bind mount takes its flags only from a remount of the bind. Without nosuid a setuid-root
# binary of the image would run as root for any user browsing the mount; without nodev a device
# node in the image would open the host's device.
BIND_FLAGS = "remount,bind,ro,nosuid,nodev"


def remove_unpacked(rootfs: str) -> None:
    """Remove an eager mount's unpacked tree once it is unmounted (its per-mount directory with it)."""
    shutil.rmtree(Path(rootfs).parent, ignore_errors=True)


def bind_mount_readonly(tree: Path, mountpoint: str) -> None:
    """Bind-mount ``tree`` at ``mountpoint`` read-only, nosuid and nodev.

    Raises:
        CalledProcessError: mount(8) failed (nothing is left mounted if the remount did).
    """
    subprocess.run(["mount", "--bind", str(tree), mountpoint], check=True, capture_output=True)
    try:
        subprocess.run(["mount", "-o", BIND_FLAGS, mountpoint], check=True, capture_output=True)
    except subprocess.CalledProcessError:
        # Never leave the tree writable and setuid-capable behind a failed remount.
        subprocess.run(["umount", mountpoint], check=False, capture_output=True)
        raise


async def _download(client: RegistryClient, image: ResolvedImage, layer: Descriptor, path: Path) -> int:
    """Stream a blob to a file (stream_blob verifies its digest); return the byte count."""
    size = 0
    with open(path, "wb") as out:
        async for piece in client.stream_blob(image.reference, layer.digest):
            out.write(piece)
            size += len(piece)
    return size


class _HashingReader:
    """A read-only stream that hashes what passes through it, for the DiffID check."""

    def __init__(self, inner: ReadableStream) -> None:
        self.inner = inner
        self.hasher = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.hasher.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _unpack(path: Path, layer: Descriptor, diff_id: str, rootfs: Path) -> None:
    with open(path, "rb") as raw:
        hashing = _HashingReader(open_tar_stream(raw, layer_format(layer.media_type)))
        apply_layer(hashing, str(rootfs))
        hashing.drain()
    actual = "sha256:" + hashing.hasher.hexdigest()
    if diff_id and actual != diff_id:
        raise DigestMismatch(f"layer {layer.digest} (uncompressed tar)", diff_id, actual)


def run_eager_mount(reference: str, mountpoint: str, config: Config) -> int:
    """``lazysnap mount --eager``: pull and unpack everything under ``config.root``, bind-mount it; exit code.

    Raises:
        RegistryError, FetchError, IntegrityError, LayerFormatError: as ``eager_mount``.
    """

    async def pull() -> EagerResult:
        async with open_registry_client(config) as client:
            image = await client.resolve(reference)
            return await eager_mount(client, image, Path(config.root), mountpoint)

    result = trio.run(pull)
    # Recorded so that `lazysnap umount` knows this bind mount as one of ours (no daemon behind it).
    write_record(
        config.root,
        MountRecord(
            os.path.realpath(mountpoint), os.getpid(), reference, "", "eager", rootfs=str(result.rootfs)
        ),
    )
    print(
        f"mounted {reference} at {mountpoint} eagerly in {result.seconds:.2f} s "
        f"({result.bytes_downloaded / 1e6:.2f} MB downloaded of {result.image_size / 1e6:.2f} MB)"
    )
    return 0
