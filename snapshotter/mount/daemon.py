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

from fusefs.mount import run_filesystem, unmount
from fusefs.operations import ReadOnlyOperations
from index.errors import LazysnapError
from snapshotter.cache.blob_cache import open_blob_cache
from snapshotter.cache.index_store import WriteBehindIndexStore
from snapshotter.config import Config, command_line_overrides, load_config
from snapshotter.errors import single_error
from snapshotter.layers.chain import ChainCore, DiffId, LayerRequest, serve_settings
from snapshotter.layers.layer import Layer
from snapshotter.layers.published import PublishedIndexes
from snapshotter.mount.state import MountRecord, control_socket_path, remove_record, write_record
from snapshotter.remote.client import RegistryClient, ResolvedImage, open_registry_client

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MountOptions:
    """Everything a mount daemon needs to know."""

    reference: str
    mountpoint: str
    root: str
    plain_http: bool = False
    background_fetch: bool = True
    docker_config_path: str | None = None
    # The config file the command read (None: defaults); the daemon re-loads it with the same flags.
    config_path: str | None = None

    def config(self) -> Config:
        """The configuration this mount runs with: the file, then the command's flags; raises ConfigError."""
        overrides = command_line_overrides(
            root=self.root,
            plain_http=self.plain_http,
            docker_config=self.docker_config_path,
            no_background_fetch=not self.background_fetch,
        )
        return load_config(self.config_path, **overrides)


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

    def __init__(self, options: MountOptions, status: StatusPipe, config: Config) -> None:
        self.options = options
        self.status = status
        self.config = config
        # A mount fills its layers as soon as it is ready (the fill yields to on-demand reads by
        # itself); background_fetch.delay_seconds is for serve, where containers start later.
        self.settings = serve_settings(config, background_delay=0.0)
        self.image: ResolvedImage | None = None
        self.layers: list[Layer] = []
        self.started = time.monotonic()
        self.ready_seconds = 0.0
        # Indexes obtained while mounting are written once the mount is ready, not before.
        self.store = WriteBehindIndexStore(config.index_store_path())
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
            "background_errors": [
                f"layer {number}: {layer.background_error or layer.failed}"
                for number, layer in enumerate(self.layers)
                if layer.background_error or layer.failed
            ],
            "image_size": sum(layer["size"] for layer in layers),
            "bytes_fetched": sum(layer["bytes_fetched"] for layer in layers),
            "layers": layers,
        }

    async def run(self) -> int:
        """Mount, serve until unmounted or signalled, clean up; return the process exit code."""
        options = self.options
        cache = open_blob_cache(self.config)
        try:
            async with open_registry_client(self.config) as client:
                image = self.image = await client.resolve_manifest(options.reference)
                async with trio.open_nursery() as nursery:
                    core = ChainCore(client, cache, self.store, nursery, self.settings)
                    try:
                        await self._mount(core, client, image, nursery)
                    finally:
                        nursery.cancel_scope.cancel()  # the mount is gone: stop fills and prefetches
                        core.close()
        except BaseException as caught:
            # An error of a task in the nursery (the config's DiffIDs, a layer) or of its body
            # arrives wrapped in an ExceptionGroup: report its one leaf, as any other error.
            error = single_error(caught, (LazysnapError, OSError))
            if error is None:
                raise
            message = str(error) if isinstance(error, LazysnapError) else f"{type(error).__name__}: {error}"
            self.status.send("error", message=message)
            log.error("mount failed: %s", message)
            return 1
        finally:
            cache.close()
            self._flush_indexes()  # a mount that failed still keeps the indexes it obtained
            remove_record(options.root, options.mountpoint)
            self.status.close()
        return 0

    async def _mount(
        self, core: ChainCore, client: RegistryClient, image: ResolvedImage, nursery: trio.Nursery
    ) -> None:
        """Open the image's layers, mount their merged tree, and serve until it is unmounted."""
        # The config (for the DiffIDs) comes while the layers open: a layer that declares its
        # eStargz TOC does not need its DiffID until it is verified.
        nursery.start_soon(self._load_diff_ids, client, image)
        published = PublishedIndexes(client, image)
        by_digest = "@sha256:" in self.options.reference
        requests = [
            LayerRequest(descriptor, image.reference, self._diff_id_getter(number), published, by_digest)
            for number, descriptor in enumerate(image.layers)
        ]

        def progress(digest: str, done: int, total: int) -> None:
            self.status.send("progress", digest=digest, done=done, total=total)

        def opened(number: int, layer: Layer) -> None:
            digest = image.layers[number].digest
            self.status.send("layer", index=number, digest=digest, how=layer.how, reason=layer.reason)

        self.layers = await core.open_layers(requests, progress=progress, on_opened=opened)
        tree, source = await core.chain(self.layers)
        await self._serve(ReadOnlyOperations(tree, source), core)

    async def _load_diff_ids(self, client: RegistryClient, image: ResolvedImage) -> None:
        self.image = dataclasses.replace(image, diff_ids=await client.load_diff_ids(image))
        self._diff_ids_loaded.set()

    def _diff_id_getter(self, number: int) -> DiffId:
        """Layer ``number``'s DiffID from the config, awaited once it is loaded."""

        async def diff_id() -> str:
            await self._diff_ids_loaded.wait()
            assert self.image is not None
            return self.image.diff_ids[number] if number < len(self.image.diff_ids) else ""

        return diff_id

    async def _serve(self, operations: ReadOnlyOperations, core: ChainCore) -> None:
        options = self.options
        async with trio.open_nursery() as nursery:
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
            core.allow_fills()

    async def _filesystem(
        self,
        operations: ReadOnlyOperations,
        nursery: trio.Nursery,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the mount until the kernel unmounts it, then cancel the helpers beside it."""
        await run_filesystem(
            operations,
            self.options.mountpoint,
            max_tasks=self.config.fuse.max_tasks,
            read_ahead_kb=self.config.fuse.read_ahead_kb,
            task_status=task_status,
        )
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
    status = StatusPipe(status_fd)
    try:
        config = options.config()
    except LazysnapError as error:
        status.send("error", message=str(error))
        status.close()
        return 1
    daemon = MountDaemon(options, status, config)
    return trio.run(daemon.run)
