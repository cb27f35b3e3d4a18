"""``lazysnap serve``: open the state under the root, restore it, serve gRPC until SIGINT/SIGTERM.

Layout of the root::

    <root>/metadata.db        snapshot metadata (SQLite, WAL)
    <root>/snapshots/<id>/    local snapshot directories (fs/, work/)

The remote-layer backend is injected as a factory returning an async context manager, so it can
own a nursery (FUSE main loop, background fetches) that lives exactly as long as the server.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import trio

from snapshotter.config import Config
from snapshotter.service.grpc_server import GrpcServer
from snapshotter.service.local_snapshots import LocalSnapshots
from snapshotter.service.metadata_store import MetadataStore
from snapshotter.service.snapshot_service import RemoteLayers, SnapshotService

log = logging.getLogger(__name__)

#: Builds the remote backend for a config; entered before serving, exited after the server stops.
RemoteLayersFactory = Callable[[Config], AbstractAsyncContextManager[RemoteLayers | None]]


@asynccontextmanager
async def no_remote_layers(config: Config) -> AsyncIterator[RemoteLayers | None]:
    """The default factory: no lazy layers, every layer is extracted by containerd; raises nothing."""
    yield None


def serve_forever(config: Config, remote_layers: RemoteLayersFactory | None = None) -> int:
    """Serve the Snapshots API until SIGINT/SIGTERM and return the exit code; raises OSError."""
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    trio.run(run_daemon, config, remote_layers or no_remote_layers)
    return 0


async def run_daemon(
    config: Config,
    remote_layers: RemoteLayersFactory,
    task_status: trio.TaskStatus[GrpcServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon in the current trio loop until SIGINT/SIGTERM or cancellation; raises OSError."""
    root = Path(config.root)
    # 0700: the metadata names every image layer on the host.
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(config.address)), mode=0o700, exist_ok=True)
    store = MetadataStore(root / "metadata.db")
    try:
        async with remote_layers(config) as remote:
            service = SnapshotService(store, LocalSnapshots(root / "snapshots"), remote)
            await service.restore()
            server = GrpcServer(
                service, config.address, trio.lowlevel.current_trio_token(), config.grpc_workers
            )
            server.start()
            log.info("lazysnap serving on %s, root %s", server.address, root)
            try:
                task_status.started(server)
                await _wait_for_signal()
            finally:
                # Shielded: even when cancelled we must stop grpc's threads, and they need this
                # loop alive to finish the calls already in flight.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(server.stop, config.shutdown_grace_seconds)
                log.info("lazysnap stopped")
    finally:
        store.close()


async def _wait_for_signal() -> None:
    # open_signal_receiver, not KeyboardInterrupt: with grpc's threads running, a plain
    # KeyboardInterrupt does not reliably interrupt trio.sleep_forever().
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            return
