"""The snapshot service: containerd's semantics, real mounts, and the remote-layer seam."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, SnapshotNotFound
from snapshotter.service.local_snapshots import LocalSnapshots, Mount
from snapshotter.service.metadata_store import MetadataStore
from snapshotter.service.snapshot_service import REMOTE_LABEL, TARGET_REF_LABEL, Info, SnapshotService

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


@contextmanager
def mounted(mounts: Sequence[Mount], target: Path) -> Iterator[Path]:
    """Mount what a snapshot call returned on target (as containerd's mount.All would), then unmount."""
    target.mkdir(parents=True, exist_ok=True)
    for m in mounts:
        subprocess.run(["mount", "-t", m.type, "-o", ",".join(m.options), m.source, str(target)], check=True)
    try:
        yield target
    finally:
        for _ in mounts:
            subprocess.run(["umount", str(target)], check=True)


class FakeRemoteLayers:
    """RemoteLayers backed by plain directories: each chain's merged tree is a directory copy."""

    def __init__(self, base: Path, layers: Mapping[str, Mapping[str, bytes]]) -> None:
        self.base = base
        self.layers = layers
        self.released: list[str] = []
        self.restored: list[str] = []

    def _dir(self, chain_id: str) -> Path:
        return self.base / chain_id.replace(":", "_")

    async def prepare_remote(
        self, chain_id: str, parent_chain_id: str | None, labels: Mapping[str, str]
    ) -> str | None:
        if chain_id not in self.layers:
            return "no index for this layer"
        merged = self._dir(chain_id)
        if parent_chain_id is not None:
            shutil.copytree(self._dir(parent_chain_id), merged, dirs_exist_ok=True)
        merged.mkdir(parents=True, exist_ok=True)
        for name, data in self.layers[chain_id].items():
            (merged / name).write_bytes(data)
        return None

    def lower_dir(self, chain_id: str) -> str:
        return str(self._dir(chain_id))

    async def release(self, chain_id: str) -> None:
        self.released.append(chain_id)

    async def restore(self, chain_ids: Sequence[str]) -> None:
        self.restored.extend(chain_ids)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetadataStore]:
    s = MetadataStore(tmp_path / "metadata.db")
    yield s
    s.close()


@pytest.fixture
def service(tmp_path: Path, store: MetadataStore) -> SnapshotService:
    return SnapshotService(store, LocalSnapshots(tmp_path / "snapshots"))


async def commit_layer(
    service: SnapshotService, name: str, parent: str, files: Mapping[str, bytes], mnt: Path
) -> None:
    """Prepare on parent, write files through the real mount, commit as name."""
    mounts = await service.prepare(f"extract-{name}", parent, {})
    with mounted(mounts, mnt):
        for path, data in files.items():
            (mnt / path).write_bytes(data)
    await service.commit(name, f"extract-{name}", {})


class TestMounts:
    async def test_parentless_prepare_is_rw_bind_with_0755_root(
        self, service: SnapshotService, tmp_path: Path
    ) -> None:
        """A new parentless snapshot is an rw bind whose root is 0755 whatever the umask."""
        old = os.umask(0o077)
        try:
            mounts = await service.prepare("/abs/key/one", "", {})
        finally:
            os.umask(old)
        assert mounts[0].type == "bind" and set(mounts[0].options) == {"rw", "rbind"}
        with mounted(mounts, tmp_path / "mnt") as mnt:
            assert (mnt.stat().st_mode & 0o7777) == 0o755
            (mnt / "f").write_text("hello")
        assert (await service.mounts("/abs/key/one")) == mounts

    async def test_overlay_child_sees_parent_and_hides_deletions(
        self, service: SnapshotService, tmp_path: Path
    ) -> None:
        """An active child is an overlay: parent files visible, writes and deletions stay in the child."""
        await commit_layer(service, "base", "", {"a": b"A", "b": b"B"}, tmp_path / "m1")
        mounts = await service.prepare("child", "base", {})
        assert mounts[0].type == "overlay"
        with mounted(mounts, tmp_path / "m2") as mnt:
            assert (mnt / "a").read_bytes() == b"A"
            (mnt / "b").unlink()
            (mnt / "c").write_bytes(b"C")
        await service.commit("child-c", "child", {})
        with mounted(await service.view("v-base", "base", {}), tmp_path / "m3") as mnt:
            assert sorted(os.listdir(mnt)) == ["a", "b"]
        with mounted(await service.view("v-child", "child-c", {}), tmp_path / "m4") as mnt:
            assert sorted(os.listdir(mnt)) == ["a", "c"]

    async def test_views_are_read_only(self, service: SnapshotService, tmp_path: Path) -> None:
        """A view of one parent (bind ro) or of a chain (lowerdir-only overlay) refuses writes."""
        await commit_layer(service, "l1", "", {"x": b"1"}, tmp_path / "m1")
        await commit_layer(service, "l2", "l1", {"y": b"2"}, tmp_path / "m2")
        one = await service.view("view-one", "l1", {})
        two = await service.view("view-two", "l2", {})
        assert one[0].type == "bind" and "ro" in one[0].options
        assert two[0].type == "overlay" and not any(o.startswith("upperdir") for o in two[0].options)
        for mounts, name in ((one, "v1"), (two, "v2")):
            with mounted(mounts, tmp_path / name) as mnt:
                assert (mnt / "x").read_bytes() == b"1"
                with pytest.raises(OSError) as caught:
                    (mnt / "new").write_text("no")
                assert caught.value.errno == errno.EROFS

    async def test_committed_snapshot_mounts_read_only(
        self, service: SnapshotService, tmp_path: Path
    ) -> None:
        """Mounts of a committed snapshot show its content read-only."""
        await commit_layer(service, "l1", "", {"x": b"1"}, tmp_path / "m1")
        await commit_layer(service, "l2", "l1", {"y": b"2"}, tmp_path / "m2")
        with mounted(await service.mounts("l2"), tmp_path / "m3") as mnt:
            assert sorted(os.listdir(mnt)) == ["x", "y"]
            with pytest.raises(OSError):
                (mnt / "z").write_text("no")


class TestInfo:
    async def test_stat_and_walk_agree_and_times_are_real(self, service: SnapshotService) -> None:
        """created == updated at creation, from the real clock; Stat equals the Walk entry."""
        before = time.time_ns()
        await service.prepare("k", "", {"a": "1"})
        after = time.time_ns()
        info = await service.stat("k")
        assert info.created_ns == info.updated_ns and before <= info.created_ns <= after
        assert (info.kind, info.parent, dict(info.labels)) == ("active", "", {"a": "1"})
        assert await service.walk([]) == [info]

    async def test_commit_replaces_key_and_labels(self, service: SnapshotService) -> None:
        """Commit removes the active key; the committed snapshot has Commit's labels and new times."""
        await service.prepare("k", "", {"a": "1"})
        await service.commit("c", "k", {"b": "2"})
        with pytest.raises(SnapshotNotFound):
            await service.stat("k")
        info = await service.stat("c")
        assert (info.kind, dict(info.labels)) == ("committed", {"b": "2"})

    async def test_walk_filters(self, service: SnapshotService) -> None:
        """Walk applies containerd filters over kind, name, parent and labels."""
        await service.prepare("p", "", {"l": "1"})
        await service.commit("pc", "p", {"l": "1"})
        await service.prepare("a", "pc", {"l": "2"})
        await service.view("v", "pc", {})
        names = [i.name for i in await service.walk(['parent!=""'])]
        assert names == ["a", "v"]
        assert [i.name for i in await service.walk(["kind==view", "labels.l==2"])] == ["a", "v"]
        assert [i.name for i in await service.walk(["labels.l,kind==committed"])] == ["pc"]
        with pytest.raises(InvalidArgument):
            await service.walk(["kind=="])


class TestErrors:
    async def test_duplicates_missing_and_uncommitted_parents(self, service: SnapshotService) -> None:
        """Keys are unique; parents must exist and be committed; only active snapshots commit."""
        await service.prepare("k", "", {})
        with pytest.raises(AlreadyExists):
            await service.view("k", "", {})
        with pytest.raises(SnapshotNotFound):
            await service.prepare("k2", "nope", {})
        with pytest.raises(InvalidArgument, match="not a committed"):
            await service.prepare("k2", "k", {})
        await service.view("v", "", {})
        with pytest.raises(FailedPrecondition):
            await service.commit("c", "v", {})
        with pytest.raises(SnapshotNotFound):
            await service.commit("c", "nope", {})
        await service.prepare("k3", "", {})
        await service.commit("c", "k3", {})
        with pytest.raises(AlreadyExists):
            await service.commit("c", "k", {})

    async def test_label_size_limit(self, service: SnapshotService) -> None:
        """Key plus value may be 4096 bytes, not one more, counted in UTF-8."""
        await service.prepare("ok", "", {"k": "v" * 4095})
        with pytest.raises(InvalidArgument, match="'big'"):
            await service.prepare("big", "", {"k": "é" * 2048})
        with pytest.raises(InvalidArgument):
            await service.update(Info("ok", "", "", 0, 0, {"k": "v" * 4096}), [])

    async def test_remove_refused_with_children(self, service: SnapshotService, tmp_path: Path) -> None:
        """A snapshot with children can't be removed; once they are gone it can, with its files."""
        await service.prepare("p", "", {})
        await service.commit("pc", "p", {})
        await service.prepare("child", "pc", {})
        with pytest.raises(FailedPrecondition, match="remove"):
            await service.remove("pc")
        await service.remove("child")
        await service.remove("pc")
        with pytest.raises(SnapshotNotFound):
            await service.remove("pc")
        assert os.listdir(tmp_path / "snapshots") == [".trash"]
        assert os.listdir(tmp_path / "snapshots" / ".trash") == []


class TestUpdate:
    async def test_update_semantics(self, service: SnapshotService) -> None:
        """No paths replace labels; labels.<k> sets or deletes one; labels replaces all; others fail."""
        await service.prepare("k", "", {"a": "1", "b": "2"})
        created = (await service.stat("k")).created_ns
        new = await service.update(Info("k", "ignored-parent", "", 0, 0, {"c": "3"}), [])
        assert dict(new.labels) == {"c": "3"} and new.parent == ""
        assert new.created_ns == created and new.updated_ns > created
        new = await service.update(Info("k", "", "", 0, 0, {"d": "4"}), ["labels.d", "labels.c"])
        assert dict(new.labels) == {"d": "4"}
        new = await service.update(Info("k", "", "", 0, 0, {"e": "5"}), ["labels"])
        assert dict(new.labels) == {"e": "5"}
        with pytest.raises(InvalidArgument, match="cannot update 'parent' field"):
            await service.update(Info("k", "x", "", 0, 0, {}), ["parent"])
        with pytest.raises(SnapshotNotFound):
            await service.update(Info("nope", "", "", 0, 0, {}), [])
        assert await service.stat("k") == new


class TestUsageCleanupConcurrency:
    async def test_usage_counts_blocks_and_inodes_once(
        self, service: SnapshotService, tmp_path: Path
    ) -> None:
        """Usage walks the snapshot's own layer; a hard link is one inode."""
        mounts = await service.prepare("k", "", {})
        with mounted(mounts, tmp_path / "m") as mnt:
            (mnt / "f").write_bytes(os.urandom(100_000))
            os.link(mnt / "f", mnt / "g")
            (mnt / "d").mkdir()
        usage = await service.usage("k")
        assert usage.inodes == 3 and usage.size >= 100_000

    async def test_cleanup_removes_orphans(self, service: SnapshotService, tmp_path: Path) -> None:
        """Directories without a snapshot (left by a crash) go; live ones stay."""
        await service.prepare("k", "", {})
        (tmp_path / "snapshots" / "999" / "fs").mkdir(parents=True)
        (tmp_path / "snapshots" / ".trash" / "5-x").mkdir()
        await service.cleanup()
        assert sorted(os.listdir(tmp_path / "snapshots")) == [".trash", "1"]
        assert os.listdir(tmp_path / "snapshots" / ".trash") == []

    async def test_concurrent_calls(self, service: SnapshotService) -> None:
        """Many Prepares, Commits and Walks at once all take effect exactly once."""
        await service.prepare("base", "", {})
        await service.commit("b", "base", {})

        async def one(i: int) -> None:
            await service.prepare(f"a{i}", "b", {})
            await service.usage(f"a{i}")
            await service.commit(f"c{i}", f"a{i}", {})
            await service.walk(["kind==committed"])

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(one, i)
        assert len(await service.walk(["kind==committed", 'parent=="b"'])) == 41


CHAIN1, CHAIN2 = "sha256:1111", "sha256:2222"


@pytest.fixture
def remote(tmp_path: Path) -> FakeRemoteLayers:
    return FakeRemoteLayers(tmp_path / "remote", {CHAIN1: {"one": b"1"}, CHAIN2: {"two": b"2"}})


@pytest.fixture
def remote_service(tmp_path: Path, store: MetadataStore, remote: FakeRemoteLayers) -> SnapshotService:
    return SnapshotService(store, LocalSnapshots(tmp_path / "snapshots"), remote)


class TestRemoteSeam:
    async def pull(self, service: SnapshotService, chain: str, parent: str) -> None:
        with pytest.raises(AlreadyExists):
            await service.prepare(f"extract-{chain}", parent, {TARGET_REF_LABEL: chain})

    async def test_remote_prepare_commits_chain_and_answers_already_exists(
        self, remote_service: SnapshotService, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A servable layer becomes a committed, labelled snapshot; the active key is never created."""
        caplog.set_level(logging.INFO)
        await self.pull(remote_service, CHAIN1, "")
        await self.pull(remote_service, CHAIN2, CHAIN1)
        info = await remote_service.stat(CHAIN2)
        assert (info.kind, info.parent, info.labels[REMOTE_LABEL]) == ("committed", CHAIN1, "remote snapshot")
        with pytest.raises(SnapshotNotFound):
            await remote_service.stat(f"extract-{CHAIN1}")
        assert "remote-snapshot-prepared=true" in caplog.text
        assert (await remote_service.usage(CHAIN2)).size == 0

    async def test_mounts_over_remote_chain(
        self, remote_service: SnapshotService, remote: FakeRemoteLayers, tmp_path: Path
    ) -> None:
        """The remote chain is one lowerdir; local layers above it stack on top."""
        await self.pull(remote_service, CHAIN1, "")
        await self.pull(remote_service, CHAIN2, CHAIN1)
        view = await remote_service.view("v", CHAIN2, {})
        assert view == [Mount("bind", remote.lower_dir(CHAIN2), ("ro", "rbind"))]
        await commit_layer(remote_service, "local3", CHAIN2, {"three": b"3"}, tmp_path / "m1")
        mounts = await remote_service.prepare("rootfs", "local3", {})
        lower = next(o for o in mounts[0].options if o.startswith("lowerdir="))
        assert lower.endswith(":" + remote.lower_dir(CHAIN2)) and lower.count(":") == 1
        with mounted(mounts, tmp_path / "m2") as mnt:
            assert sorted(os.listdir(mnt)) == ["one", "three", "two"]

    async def test_fallback_when_remote_cannot_serve(
        self, remote_service: SnapshotService, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An unservable layer, or one above a local parent, is prepared locally and the reason logged."""
        caplog.set_level(logging.INFO)
        mounts = await remote_service.prepare("x", "", {TARGET_REF_LABEL: "sha256:unknown"})
        assert mounts[0].type == "bind"
        assert "remote-snapshot-prepared=false" in caplog.text and "no index for this layer" in caplog.text
        await remote_service.commit("sha256:unknown", "x", {})
        mounts = await remote_service.prepare("y", "sha256:unknown", {TARGET_REF_LABEL: CHAIN1})
        assert mounts[0].type == "overlay"
        assert "is a local snapshot" in caplog.text

    async def test_remove_releases_and_restore_lists_parents_first(
        self, tmp_path: Path, remote_service: SnapshotService, remote: FakeRemoteLayers, store: MetadataStore
    ) -> None:
        """Removing a remote snapshot releases it; restore() re-exposes chains parents first."""
        await self.pull(remote_service, CHAIN1, "")
        await self.pull(remote_service, CHAIN2, CHAIN1)
        again = SnapshotService(store, LocalSnapshots(tmp_path / "snapshots"), remote)
        await again.restore()
        assert remote.restored == [CHAIN1, CHAIN2]
        await again.remove(CHAIN2)
        assert remote.released == [CHAIN2]

    async def test_remote_snapshot_without_backend_fails_clearly(
        self, tmp_path: Path, remote_service: SnapshotService, store: MetadataStore
    ) -> None:
        """After a restart without the remote backend, Mounts above a remote chain says why it can't."""
        await self.pull(remote_service, CHAIN1, "")
        plain = SnapshotService(store, LocalSnapshots(tmp_path / "snapshots"))
        await plain.restore()
        with pytest.raises(FailedPrecondition, match="no remote layer backend"):
            await plain.view("v", CHAIN1, {})
        with pytest.raises(SnapshotNotFound):
            await plain.stat("v")
