"""kill -9 and restart: committed snapshots survive whole, and a Commit is all or nothing."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from snapshotter.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.service.local_snapshots import Mount
from tests.snapshotter.service.test_conformance import lazysnap_serve
from tests.snapshotter.service.test_snapshot_service import mounted

# The generated stub module is untyped; one typed name keeps the tests strict.
make_stub: Callable[[grpc.Channel], Any] = pb_grpc.SnapshotsStub


pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")]


@contextmanager
def snapshots_client(address: Path) -> Iterator[Any]:
    """A Snapshots stub on a fresh channel, closed afterwards."""
    channel = grpc.insecure_channel(f"unix://{address}")
    try:
        yield make_stub(channel)
    finally:
        channel.close()


def as_mounts(response_mounts: Any) -> list[Mount]:
    return [Mount(m.type, m.source, tuple(m.options)) for m in response_mounts]


def write_layer(stub: Any, key: str, parent: str, name: str, data: bytes, target: Path) -> None:
    """Prepare key on parent and write one file into it through its real mount."""
    response = stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent))
    with mounted(as_mounts(response.mounts), target) as mnt:
        (mnt / name).write_bytes(data)


def kill_and_restart(process: Any) -> None:
    process.kill()
    process.wait()


def test_committed_and_active_snapshots_survive_kill_9(tmp_path: Path) -> None:
    """After kill -9 and a restart, committed layers and the active one are listed and mountable."""
    root, address = tmp_path / "root", tmp_path / "sock"
    with lazysnap_serve(root, address) as process, snapshots_client(address) as stub:
        write_layer(stub, "/abs/extract-1", "", "one", b"1", tmp_path / "m1")
        stub.Commit(pb.CommitSnapshotRequest(name="layer-1", key="/abs/extract-1", labels={"l": "1"}))
        write_layer(stub, "/abs/extract-2", "layer-1", "two", b"2", tmp_path / "m2")
        stub.Commit(pb.CommitSnapshotRequest(name="layer-2", key="/abs/extract-2"))
        write_layer(stub, "container", "layer-2", "scratch", b"s", tmp_path / "m3")
        before = {i.name: i for page in stub.List(pb.ListSnapshotsRequest()) for i in page.info}
        kill_and_restart(process)
    with lazysnap_serve(root, address), snapshots_client(address) as stub:
        after = {i.name: i for page in stub.List(pb.ListSnapshotsRequest()) for i in page.info}
        assert after == before
        view = stub.View(pb.ViewSnapshotRequest(key="check", parent="layer-2"))
        with mounted(as_mounts(view.mounts), tmp_path / "v") as mnt:
            assert (mnt / "one").read_bytes() == b"1" and (mnt / "two").read_bytes() == b"2"
        active = stub.Mounts(pb.MountsRequest(key="container"))
        with mounted(as_mounts(active.mounts), tmp_path / "a") as mnt:
            assert sorted(os.listdir(mnt)) == ["one", "scratch", "two"]


def commit_until_killed(stub: Any, acknowledged: list[str], stop: threading.Event) -> None:
    """Prepare and commit layers in a loop; record each Commit the server confirmed."""
    parent = ""
    i = 0
    while not stop.is_set():
        key, name = f"active-{os.getpid()}-{i}-{random.random()}", f"c-{i}-{random.random()}"
        try:
            stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent, labels={"pair": name}))
            stub.Commit(pb.CommitSnapshotRequest(name=name, key=key, labels={"pair": key}))
        except grpc.RpcError:
            return
        acknowledged.append(name)
        parent, i = name, i + 1


@pytest.mark.parametrize("round_", range(4))
def test_kill_during_commits_leaves_no_half_commit(tmp_path: Path, round_: int) -> None:
    """Killed at a random point of a commit loop: every confirmed Commit is there, none is half done."""
    root, address = tmp_path / "root", tmp_path / "sock"
    acknowledged: list[str] = []
    stop = threading.Event()
    with lazysnap_serve(root, address) as process, snapshots_client(address) as stub:
        worker = threading.Thread(target=commit_until_killed, args=(stub, acknowledged, stop))
        worker.start()
        threading.Event().wait(random.uniform(0.2, 1.0))
        kill_and_restart(process)
        stop.set()
        worker.join(timeout=30)
    assert acknowledged, "the server was killed before the first commit finished; raise the delay"
    with lazysnap_serve(root, address), snapshots_client(address) as stub:
        infos = [i for page in stub.List(pb.ListSnapshotsRequest()) for i in page.info]
        names = {i.name for i in infos}
        assert set(acknowledged) <= names
        for info in infos:
            partner = info.labels["pair"]
            # Committed: carries Commit's label, and its active key is gone. Active: its name is unused.
            assert partner not in names, f"{info.name} and {partner} both exist"
            expected = pb.COMMITTED if info.name.startswith("c-") else pb.ACTIVE
            assert info.kind == expected
        last = next(i for i in infos if i.name == acknowledged[-1])
        stub.View(pb.ViewSnapshotRequest(key="check", parent=last.name))
        usage = stub.Usage(pb.UsageRequest(key=last.name))
        assert usage.inodes >= 1
        assert sorted(os.listdir(root / "snapshots" / ".trash")) == []
