"""The gRPC proxy plugin over a real unix socket and a real grpc channel: codes, streaming, socket."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from google.protobuf import field_mask_pb2

from snapshotter.config import Config
from snapshotter.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.service.daemon import no_remote_layers, run_daemon
from snapshotter.service.grpc_server import remove_stale_socket

# The generated stub module is untyped; one typed name keeps the tests strict.
make_stub: Callable[[grpc.Channel], Any] = pb_grpc.SnapshotsStub


@dataclass
class Client:
    stub: Any
    address: str

    async def call(self, method: str, request: Any) -> Any:
        """Run one blocking grpc call off the trio thread (the server needs that thread); List is drained."""
        fn: Callable[[Any], Any] = getattr(self.stub, method)
        if method == "List":
            return await trio.to_thread.run_sync(lambda: list(fn(request)))
        return await trio.to_thread.run_sync(fn, request)

    async def code(self, method: str, request: Any) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as caught:
            await self.call(method, request)
        error: Any = caught.value
        return error.code(), error.details()


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    config = Config(
        root=str(tmp_path / "root"), address=str(tmp_path / "run" / "snap.sock"), shutdown_grace_seconds=1
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(run_daemon, config, no_remote_layers)
        channel = grpc.insecure_channel("unix://" + config.address)
        try:
            yield Client(make_stub(channel), config.address)
        finally:
            channel.close()
            nursery.cancel_scope.cancel()


def prepare(key: str, parent: str = "", **labels: str) -> pb.PrepareSnapshotRequest:
    return pb.PrepareSnapshotRequest(snapshotter="proxy", key=key, parent=parent, labels=labels)


class TestErrorCodes:
    async def test_not_found(self, client: Client) -> None:
        """An unknown key is NOT_FOUND, naming the key."""
        code, message = await client.code("Stat", pb.StatSnapshotRequest(key="/no/such"))
        assert code is grpc.StatusCode.NOT_FOUND and "/no/such" in message
        code, _ = await client.code("Remove", pb.RemoveSnapshotRequest(key="x"))
        assert code is grpc.StatusCode.NOT_FOUND

    async def test_already_exists(self, client: Client) -> None:
        """A duplicate key is ALREADY_EXISTS."""
        await client.call("Prepare", prepare("k"))
        code, _ = await client.code("Prepare", prepare("k"))
        assert code is grpc.StatusCode.ALREADY_EXISTS

    async def test_parent_problems(self, client: Client) -> None:
        """A missing parent is NOT_FOUND; an uncommitted one INVALID_ARGUMENT (as containerd's storage)."""
        await client.call("Prepare", prepare("active"))
        assert (await client.code("Prepare", prepare("k", "missing")))[0] is grpc.StatusCode.NOT_FOUND
        assert (await client.code("Prepare", prepare("k", "active")))[0] is grpc.StatusCode.INVALID_ARGUMENT

    async def test_remove_with_child(self, client: Client) -> None:
        """Removing a parent is FAILED_PRECONDITION with "remove" in the message."""
        await client.call("Prepare", prepare("p"))
        await client.call("Commit", pb.CommitSnapshotRequest(name="pc", key="p"))
        await client.call("View", pb.ViewSnapshotRequest(key="v", parent="pc"))
        code, message = await client.code("Remove", pb.RemoveSnapshotRequest(key="pc"))
        assert code is grpc.StatusCode.FAILED_PRECONDITION and "remove" in message

    async def test_update_parent_is_invalid(self, client: Client) -> None:
        """Update of the parent field is INVALID_ARGUMENT, in containerd's wording."""
        await client.call("Prepare", prepare("k1"))
        request = pb.UpdateSnapshotRequest(
            info=pb.Info(name="k1", parent="x"), update_mask=field_mask_pb2.FieldMask(paths=["parent"])
        )
        code, message = await client.code("Update", request)
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "cannot update 'parent' field" in message

    async def test_invalid_filter(self, client: Client) -> None:
        """A malformed filter is INVALID_ARGUMENT."""
        code, _ = await client.code("List", pb.ListSnapshotsRequest(filters=["kind=="]))
        assert code is grpc.StatusCode.INVALID_ARGUMENT

    async def test_label_over_limit(self, client: Client) -> None:
        """A label over 4096 bytes is INVALID_ARGUMENT naming the snapshot key."""
        code, message = await client.code("Prepare", prepare("big", l="x" * 4096))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "'big'" in message


class TestCalls:
    async def test_round_trip_and_list_streams_in_batches(self, client: Client) -> None:
        """Info survives the wire to the nanosecond; List streams every match across messages."""
        response = await client.call("Prepare", prepare("k", a="1"))
        assert [(m.type, list(m.options)) for m in response.mounts] == [("bind", ["rw", "rbind"])]
        info = (await client.call("Stat", pb.StatSnapshotRequest(key="k"))).info
        assert (
            info.kind == pb.ACTIVE and info.created_at == info.updated_at and dict(info.labels) == {"a": "1"}
        )
        for i in range(250):
            await client.call("View", pb.ViewSnapshotRequest(key=f"v{i:03}"))
        pages = await client.call("List", pb.ListSnapshotsRequest(filters=["kind==view"]))
        sizes = [len(page.info) for page in pages]
        assert sizes == [100, 100, 50]
        listed = await client.call("List", pb.ListSnapshotsRequest(filters=["name==k"]))
        assert listed[0].info[0] == info

    async def test_update_usage_cleanup(self, client: Client) -> None:
        """Update with no mask replaces labels; Usage and Cleanup answer."""
        await client.call("Prepare", prepare("k", a="1"))
        updated = await client.call(
            "Update", pb.UpdateSnapshotRequest(info=pb.Info(name="k", labels={"b": "2"}))
        )
        assert dict(updated.info.labels) == {"b": "2"}
        usage = await client.call("Usage", pb.UsageRequest(key="k"))
        assert usage.inodes == 1
        await client.call("Cleanup", pb.CleanupRequest())

    async def test_socket_is_private(self, client: Client) -> None:
        """The socket is mode 0600."""
        assert stat.S_IMODE(os.stat(client.address).st_mode) == 0o600


class TestStaleSocket:
    def test_stale_socket_is_removed(self, tmp_path: Path) -> None:
        """A socket nobody listens on (left by kill -9) is deleted."""
        path = str(tmp_path / "s.sock")
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path)
        sock.close()
        remove_stale_socket(path)
        assert not os.path.exists(path)

    def test_live_socket_or_regular_file_is_kept(self, tmp_path: Path) -> None:
        """A socket someone listens on, or a non-socket, is an error and stays."""
        path = str(tmp_path / "s.sock")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(path)
            sock.listen()
            with pytest.raises(FileExistsError, match="another server"):
                remove_stale_socket(path)
        other = tmp_path / "file"
        other.write_text("x")
        with pytest.raises(FileExistsError, match="not a socket"):
            remove_stale_socket(str(other))
