"""containerd's ``containerd.services.snapshots.v1.Snapshots`` gRPC service on a unix socket.

grpcio runs handlers in its thread pool; each one hops into the daemon's trio loop with
``trio.from_thread.run`` where the SnapshotService (and its single SQLite connection) lives, and
maps every error of lazysnap's tree to a gRPC status code in one table, ``STATUS_CODES`` (the
reasons are in ``snapshotter.errors``).
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import trio
from google.protobuf import empty_pb2, timestamp_pb2

from index.errors import (
    DigestMismatch,
    IndexMismatch,
    IndexVersionError,
    IntegrityError,
    LayerFormatError,
    LazysnapError,
    MappingMismatch,
    TruncatedLayer,
    UnsafePath,
)
from index.estargz import EstargzError
from snapshotter.errors import (
    AlreadyExists,
    AuthError,
    BenchRunError,
    ConfigError,
    FailedPrecondition,
    FetchError,
    FetchTimeout,
    InvalidArgument,
    InvalidReference,
    LinkError,
    MountNotFound,
    MountPointError,
    NoMatchingPlatform,
    NotFound,
    NotServedLazily,
    RangeIgnored,
    RangeNotSupported,
    RegistryError,
    SnapshotError,
    SnapshotNotFound,
    TruncatedResponse,
    UnsupportedMediaType,
    UsageError,
)
from snapshotter.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.proto.containerd.types import mount_pb2
from snapshotter.service.local_snapshots import Mount
from snapshotter.service.snapshot_service import KIND_ACTIVE, KIND_COMMITTED, KIND_VIEW, Info, SnapshotService

log = logging.getLogger(__name__)

T = TypeVar("T")

#: containerd dials proxy plugins with 16 MiB limits; match them so a large List page fits.
MAX_MESSAGE_BYTES = 16 << 20
#: Infos per List response message, as containerd's own snapshot service batches them.
LIST_BATCH = 100

_S = grpc.StatusCode
#: The gRPC status of every class of the exception tree (drawn in snapshotter.errors, with why).
#: Every class has its own entry, so a new class needs a decision here (a test checks it).
STATUS_CODES: dict[type[LazysnapError], grpc.StatusCode] = {
    LazysnapError: _S.INTERNAL,
    IntegrityError: _S.DATA_LOSS,
    DigestMismatch: _S.DATA_LOSS,
    MappingMismatch: _S.DATA_LOSS,
    IndexMismatch: _S.DATA_LOSS,
    # The call was well formed; the layer it names can't be served: a precondition, not an argument.
    LayerFormatError: _S.FAILED_PRECONDITION,
    UnsafePath: _S.FAILED_PRECONDITION,
    TruncatedLayer: _S.FAILED_PRECONDITION,
    IndexVersionError: _S.FAILED_PRECONDITION,
    EstargzError: _S.FAILED_PRECONDITION,
    RegistryError: _S.FAILED_PRECONDITION,
    InvalidReference: _S.INVALID_ARGUMENT,
    # containerd is trusted (0600 socket); it is the registry that refused our credentials.
    AuthError: _S.PERMISSION_DENIED,
    NotFound: _S.NOT_FOUND,
    UnsupportedMediaType: _S.FAILED_PRECONDITION,
    NoMatchingPlatform: _S.NOT_FOUND,
    RangeNotSupported: _S.FAILED_PRECONDITION,
    RangeIgnored: _S.FAILED_PRECONDITION,
    FetchError: _S.UNAVAILABLE,
    FetchTimeout: _S.DEADLINE_EXCEEDED,
    TruncatedResponse: _S.UNAVAILABLE,
    ConfigError: _S.FAILED_PRECONDITION,
    NotServedLazily: _S.FAILED_PRECONDITION,
    UsageError: _S.INVALID_ARGUMENT,
    MountPointError: _S.INVALID_ARGUMENT,
    MountNotFound: _S.NOT_FOUND,
    LinkError: _S.INVALID_ARGUMENT,
    BenchRunError: _S.INTERNAL,
    SnapshotError: _S.INTERNAL,
    SnapshotNotFound: _S.NOT_FOUND,
    AlreadyExists: _S.ALREADY_EXISTS,
    FailedPrecondition: _S.FAILED_PRECONDITION,
    InvalidArgument: _S.INVALID_ARGUMENT,
}
_KIND_TO_PB = {KIND_VIEW: pb.VIEW, KIND_ACTIVE: pb.ACTIVE, KIND_COMMITTED: pb.COMMITTED}
_KIND_FROM_PB = {value: key for key, value in _KIND_TO_PB.items()}


def status_code(error: BaseException) -> grpc.StatusCode:
    """Return the gRPC status for an error: its nearest class in STATUS_CODES, else INTERNAL; raises nothing."""
    for cls in type(error).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def info_to_pb(info: Info) -> pb.Info:
    """Convert an Info to its protobuf message; raises nothing."""
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=_KIND_TO_PB[info.kind],
        created_at=_timestamp(info.created_ns),
        updated_at=_timestamp(info.updated_ns),
        labels=dict(info.labels),
    )


def info_from_pb(message: pb.Info) -> Info:
    """Convert an Info message (as sent to Update) to an Info; raises nothing."""
    created = message.created_at.seconds * 1_000_000_000 + message.created_at.nanos
    updated = message.updated_at.seconds * 1_000_000_000 + message.updated_at.nanos
    kind = _KIND_FROM_PB.get(message.kind, "")
    return Info(message.name, message.parent, kind, created, updated, dict(message.labels))


def _mounts_pb(mounts: Sequence[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


class SnapshotsServicer:
    """The gRPC handlers: decode, call the service in the trio loop, encode or abort with a status."""

    def __init__(self, service: SnapshotService, trio_token: trio.lowlevel.TrioToken) -> None:
        """Serve ``service``, whose trio loop is identified by ``trio_token``; raises nothing."""
        self._service = service
        self._token = trio_token

    def _run(self, context: grpc.ServicerContext, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except (trio.RunFinishedError, trio.Cancelled):
            context.abort(grpc.StatusCode.UNAVAILABLE, "lazysnap is shutting down")
        except (LazysnapError, OSError) as error:
            code = status_code(error)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("snapshot call %s failed", getattr(fn, "__name__", fn))
                context.abort(code, f"{type(error).__name__}: {error}")
            context.abort(code, str(error))
        raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises

    def Prepare(
        self, request: pb.PrepareSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.PrepareSnapshotResponse:
        """Create an active snapshot."""
        mounts = self._run(context, self._service.prepare, request.key, request.parent, dict(request.labels))
        return pb.PrepareSnapshotResponse(mounts=_mounts_pb(mounts))

    def View(self, request: pb.ViewSnapshotRequest, context: grpc.ServicerContext) -> pb.ViewSnapshotResponse:
        """Create a read-only view."""
        mounts = self._run(context, self._service.view, request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=_mounts_pb(mounts))

    def Mounts(self, request: pb.MountsRequest, context: grpc.ServicerContext) -> pb.MountsResponse:
        """Return a snapshot's mounts."""
        mounts = self._run(context, self._service.mounts, request.key)
        return pb.MountsResponse(mounts=_mounts_pb(mounts))

    def Commit(self, request: pb.CommitSnapshotRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        """Commit an active snapshot."""
        self._run(context, self._service.commit, request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    def Remove(self, request: pb.RemoveSnapshotRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        """Remove a snapshot."""
        self._run(context, self._service.remove, request.key)
        return empty_pb2.Empty()

    def Stat(self, request: pb.StatSnapshotRequest, context: grpc.ServicerContext) -> pb.StatSnapshotResponse:
        """Return a snapshot's Info."""
        info = self._run(context, self._service.stat, request.key)
        return pb.StatSnapshotResponse(info=info_to_pb(info))

    def Update(
        self, request: pb.UpdateSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.UpdateSnapshotResponse:
        """Update a snapshot's labels."""
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = self._run(context, self._service.update, info_from_pb(request.info), paths)
        return pb.UpdateSnapshotResponse(info=info_to_pb(info))

    def List(
        self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ListSnapshotsResponse]:
        """Stream the Infos of the snapshots matching the filters, in batches."""
        infos = self._run(context, self._service.walk, list(request.filters))
        for start in range(0, len(infos), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info_to_pb(i) for i in infos[start : start + LIST_BATCH]])

    def Usage(self, request: pb.UsageRequest, context: grpc.ServicerContext) -> pb.UsageResponse:
        """Return a snapshot's disk usage."""
        usage = self._run(context, self._service.usage, request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    def Cleanup(self, request: pb.CleanupRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        """Delete leftover directories."""
        self._run(context, self._service.cleanup)
        return empty_pb2.Empty()


def remove_stale_socket(address: str) -> None:
    """Delete a socket file no server answers on; raises FileExistsError if one does or it is no socket."""
    try:
        mode = os.lstat(address).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{address} exists and is not a socket; remove it or pick another --address")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(address)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(address)  # left by a daemon that died (kill -9): nobody listens on it
        return
    finally:
        probe.close()
    raise FileExistsError(f"another server is listening on {address}; stop it or pick another --address")


class GrpcServer:
    """A grpcio server for one SnapshotService on one unix socket (mode 0600)."""

    def __init__(
        self, service: SnapshotService, address: str, trio_token: trio.lowlevel.TrioToken, workers: int
    ) -> None:
        """Prepare (not start) a server on ``address`` with ``workers`` handler threads; raises nothing."""
        self.address = os.path.abspath(address)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lazysnap-grpc")
        self._server = grpc.server(
            self._executor,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        # Bound to a typed name first: the generated grpc module has no annotations.
        register: Callable[[SnapshotsServicer, grpc.Server], None] = pb_grpc.add_SnapshotsServicer_to_server
        register(SnapshotsServicer(service, trio_token), self._server)

    def start(self) -> None:
        """Bind the socket (removing a stale one) and start serving; raises FileExistsError, RuntimeError."""
        remove_stale_socket(self.address)
        # The socket must never be reachable by other users, not even for the instant between
        # bind and chmod: create it under a restrictive umask (only grpc threads run now).
        old_umask = os.umask(0o177)
        try:
            if self._server.add_insecure_port("unix:" + self.address) == 0:
                raise RuntimeError(f"could not listen on unix:{self.address}")
            self._server.start()
        finally:
            os.umask(old_umask)
        os.chmod(self.address, 0o600)

    def stop(self, grace: float) -> None:
        """Stop accepting calls, let running ones finish for up to ``grace`` seconds; raises nothing.

        Call from a worker thread while the trio loop still runs: in-flight handlers need it.
        """
        self._server.stop(grace).wait()
        self._executor.shutdown(wait=True)
        try:
            os.unlink(self.address)
        except FileNotFoundError:
            pass
