"""The process behind ``lazysnap mount``: resolve the image, index its layers, serve them over FUSE.

One trio loop runs everything: the registry client, the layer resolver, pyfuse3's main loop, the
background fill of each layer and a small control socket answering ``lazysnap stats``. SIGTERM
and SIGINT unmount the filesystem, which ends the loop; a dead mount is never left behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from fusefs.merged_tree import MergedTree
from fusefs.mount import run_filesystem, unmount
from fusefs.operations import ReadOnlyOperations
from index.errors import LazysnapError
from snapshotter.cache.blob_cache import BlobCache
from snapshotter.cache.index_store import WriteBehindIndexStore
from snapshotter.layers.published import PublishedIndexes
from snapshotter.layers.sources import ChainSource, Layer, LayerResolver, declares_estargz_toc, verify_layer
from snapshotter.mount.state import MountRecord, control_socket_path, remove_record, write_record
from snapshotter.remote.client import RegistryClient, ResolvedImage

log = logging.getLogger(__name__)

# Layers resolved at once: each may be a whole-blob download, so a few in parallel fill the link
# without starving the first layers the merge needs.
PARALLEL_LAYER_OPENS = 3


@dataclass(frozen=True)
class MountOptions:
    """Everything a mount daemon needs to know."""

    reference: str
    mountpoint: str
    root: str
    plain_http: bool = False
    background_fetch: bool = True
    docker_config_path: str | None = None


class StatusPipe:
    """JSON events for the command that started this daemon (one per line), or nothing."""

    def __init__(self, fd: int | None) -> None:
        self._file = os.fdopen(fd, "w", buffering=1) if fd is not None else None

    def send(self, event: str, **fields: Any) -> None:
        """Send one event; a reader that went away is ignored."""
        if self._file is None:
            return
        try:
            self._file.write(json.dumps({"event": event, **fields}) + "\n")
        except (BrokenPipeError, OSError):
            self._file = None

    def close(self) -> None:
        """Close the pipe, so the starting command sees EOF."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None


class MountDaemon:
    """One mounted image: its layers, its filesystem and its statistics."""

    def __init__(self, options: MountOptions, status: StatusPipe) -> None:
        self.options = options
        self.status = status
        self.image: ResolvedImage | None = None
        self.layers: list[Layer] = []
        self.started = time.monotonic()
        self.ready_seconds = 0.0
        self.background_errors: list[str] = []
        # Indexes obtained while mounting are written once the mount is ready, not before.
        self.store = WriteBehindIndexStore(Path(options.root) / "indexes")
        self._diff_ids_loaded = trio.Event()

    def stats(self) -> dict[str, Any]:
        """The mount's statistics as one JSON-able document."""
        layers = [layer.stats() for layer in self.layers]
        return {
            "reference": self.options.reference,
            "mountpoint": self.options.mountpoint,
            "mode": "lazy",
            "pid": os.getpid(),
            "ready_seconds": self.ready_seconds,
            "background_fetch": self.options.background_fetch,
            "background_errors": self.background_errors,
            "image_size": sum(layer["size"] for layer in layers),
            "bytes_fetched": sum(layer["bytes_fetched"] for layer in layers),
            "layers": layers,
        }

    async def run(self) -> int:
        """Mount, serve until unmounted or signalled, clean up; return the process exit code."""
        options = self.options
        cache = BlobCache(Path(options.root) / "cache")
        try:
            async with RegistryClient(
                plain_http=options.plain_http, docker_config_path=options.docker_config_path
            ) as client:
                image = self.image = await client.resolve_manifest(options.reference)
                resolver = LayerResolver(
                    client, image.reference, cache, self.store, published=PublishedIndexes(client, image)
                )
                async with trio.open_nursery() as nursery:
                    # The config (for the DiffIDs) comes while the layers open: a layer that
                    # declares its eStargz TOC does not need its DiffID until it is verified.
                    nursery.start_soon(self._load_diff_ids, client, image)
                    await self._open_layers(resolver, image)
                await self._serve()
        except LazysnapError as error:
            self.status.send("error", message=str(error))
            log.error("mount failed: %s", error)
            return 1
        finally:
            cache.close()
            self._flush_indexes()  # a mount that failed still keeps the indexes it obtained
            remove_record(options.root, options.mountpoint)
            self.status.close()
        return 0

    async def _load_diff_ids(self, client: RegistryClient, image: ResolvedImage) -> None:
        self.image = dataclasses.replace(image, diff_ids=await client.load_diff_ids(image))
        self._diff_ids_loaded.set()

    async def _diff_id(self, number: int) -> str:
        """Layer ``number``'s DiffID from the config, once it is loaded."""
        await self._diff_ids_loaded.wait()
        assert self.image is not None
        return self.image.diff_ids[number] if number < len(self.image.diff_ids) else ""

    async def _open_layers(self, resolver: LayerResolver, image: ResolvedImage) -> None:
        opened: list[Layer | None] = [None] * len(image.layers)
        limiter = trio.CapacityLimiter(PARALLEL_LAYER_OPENS)

        def progress(digest: str, done: int, total: int) -> None:
            self.status.send("progress", digest=digest, done=done, total=total)

        async def open_one(number: int) -> None:
            async with limiter:
                descriptor = image.layers[number]
                diff_id = "" if declares_estargz_toc(descriptor) else await self._diff_id(number)
                layer = await resolver.open_layer(descriptor, diff_id, progress)
                opened[number] = layer
                self.status.send(
                    "layer", index=number, digest=descriptor.digest, how=layer.how, reason=layer.reason
                )

        async with trio.open_nursery() as nursery:
            for number in range(len(image.layers)):
                nursery.start_soon(open_one, number)
        self.layers = [layer for layer in opened if layer is not None]

    async def _serve(self) -> None:
        options = self.options
        async with trio.open_nursery() as nursery:
            for layer in self.layers:
                if layer.prefetch_end:  # under way while the mount comes up, not before it
                    nursery.start_soon(layer.prefetch_landmark)
            tree = MergedTree.build([layer.index.entries for layer in self.layers])
            operations = ReadOnlyOperations(tree, ChainSource(self.layers))
            await nursery.start(self._filesystem, operations, nursery)
            self.ready_seconds = time.monotonic() - self.started
            # Started, not just scheduled: a `stats` or a signal right after `ready` must be answered.
            await nursery.start(self._serve_control, control_socket_path(options.root, options.mountpoint))
            await nursery.start(self._unmount_on_signal)
            write_record(
                options.root,
                MountRecord(
                    options.mountpoint,
                    os.getpid(),
                    options.reference,
                    str(control_socket_path(options.root, options.mountpoint)),
                    "lazy",
                ),
            )
            stats = self.stats()
            self.status.send(
                "ready",
                reference=options.reference,
                seconds=self.ready_seconds,
                bytes_fetched=stats["bytes_fetched"],
                image_size=stats["image_size"],
            )
            self.status.close()
            nursery.start_soon(self._save_indexes)
            if options.background_fetch:
                nursery.start_soon(self._background_fetch)
            else:
                # Layers already complete (streamed while indexed) need no registry to be verified
                # and unpacked locally, so that is done even without background fetch.
                nursery.start_soon(self._background_fetch, True)

    async def _filesystem(
        self,
        operations: ReadOnlyOperations,
        nursery: trio.Nursery,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the mount until the kernel unmounts it, then cancel the helpers beside it."""
        await run_filesystem(operations, self.options.mountpoint, task_status=task_status)
        nursery.cancel_scope.cancel()

    async def _save_indexes(self) -> None:
        """Write the indexes queued while mounting; shielded, so an early unmount still keeps them."""
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._flush_indexes)

    def _flush_indexes(self) -> None:
        try:
            self.store.flush()
        except OSError as error:
            log.warning("index-store-write-failed root=%s error=%s", self.options.root, error)

    async def _unmount_on_signal(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                log.info("signal %s: unmounting %s", signum, self.options.mountpoint)
                await trio.to_thread.run_sync(unmount, self.options.mountpoint)
                return

    async def _background_fetch(self, complete_only: bool = False) -> None:
        """Fetch the rest of every layer at low priority (or only take complete ones), then verify it whole."""
        assert self.image is not None
        for number, layer in enumerate(self.layers):
            diff_id = self.image.diff_ids[number] if number < len(self.image.diff_ids) else ""
            if complete_only and not layer.blob.complete:
                continue
            try:
                await layer.blob.fill()
                await verify_layer(layer, diff_id)
            except LazysnapError as error:
                self.background_errors.append(f"layer {number}: {error}")
                log.warning("background-fetch-failed layer=%s error=%s", layer.descriptor.digest, error)

    async def _serve_control(
        self, path: Path, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        path.unlink(missing_ok=True)
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(16)
        task_status.started()
        with listener:
            while True:
                conn, _ = await listener.accept()
                with conn:
                    await conn.recv(64)
                    payload = json.dumps(self.stats()).encode()
                    while payload:
                        sent = await conn.send(payload)
                        payload = payload[sent:]


def run_mount_daemon(options: MountOptions, status_fd: int | None) -> int:
    """Run a mount daemon in this process until the image is unmounted; return the exit code."""
    daemon = MountDaemon(options, StatusPipe(status_fd))
    return trio.run(daemon.run)
