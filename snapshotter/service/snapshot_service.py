"""containerd's snapshot semantics over the metadata store, local directories and remote layers.

Every method is a coroutine run in the daemon's trio loop. Each change to the metadata happens in
one synchronous ``store.transaction()`` block (no ``await`` inside), so concurrent calls are
serialised at that point and see each other's effects whole.

Remote snapshots: when ``Prepare`` carries ``containerd.io/snapshot.ref`` (the layer's chain ID) and a
``RemoteLayers`` backend can serve that layer lazily, the service commits a snapshot named by the
chain ID, labelled ``containerd.io/snapshot/remote``, and answers ALREADY_EXISTS so containerd skips
the download. Mounts above remote snapshots use the backend's merged directory of the whole remote
chain as one lowerdir.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, SnapshotNotFound
from snapshotter.service import filters
from snapshotter.service.local_snapshots import DiskUsage, LocalSnapshots, Mount, disk_usage, remove_tree
from snapshotter.service.metadata_store import MetadataStore, SnapshotRecord

log = logging.getLogger(__name__)

KIND_ACTIVE = "active"
KIND_VIEW = "view"
KIND_COMMITTED = "committed"

#: Prepare label naming the chain ID the snapshot will be committed as (containerd's unpacker sets it).
TARGET_REF_LABEL = "containerd.io/snapshot.ref"
#: Label marking a snapshot served by the remote backend (same key and value as stargz-snapshotter).
REMOTE_LABEL = "containerd.io/snapshot/remote"
REMOTE_LABEL_VALUE = "remote snapshot"
#: containerd's labels.Validate: key and value together at most this many bytes.
MAX_LABEL_BYTES = 4096


class RemoteLayers(Protocol):
    """The lazy backend: exposes a remote chain of layers as one merged directory (FUSE)."""

    async def prepare_remote(
        self, chain_id: str, parent_chain_id: str | None, labels: Mapping[str, str]
    ) -> str | None:
        """Make chain_id servable; return None on success or the reason it can't be served lazily.

        Must be idempotent: two concurrent Prepares of one chain may both call it.
        """

    def lower_dir(self, chain_id: str) -> str:
        """Return the directory showing the merged chain up to chain_id; raises LazysnapError."""

    async def release(self, chain_id: str) -> None:
        """Forget chain_id (its snapshot was removed); raises nothing it can't recover from."""

    async def restore(self, chain_ids: Sequence[str]) -> None:
        """Re-expose these chains after a restart, parents before children, without the registry."""


@dataclass(frozen=True)
class Info:
    """containerd's snapshots.Info: parent is "" for none; times in ns since the epoch (UTC)."""

    name: str
    parent: str
    kind: str
    created_ns: int
    updated_ns: int
    labels: Mapping[str, str]


def _info(record: SnapshotRecord) -> Info:
    return Info(
        record.key, record.parent_key, record.kind, record.created_ns, record.updated_ns, record.labels
    )


def validate_labels(key: str, labels: Mapping[str, str]) -> None:
    """Check every label against containerd's size limit; raises InvalidArgument naming the snapshot key."""
    for name, value in labels.items():
        size = len(name.encode()) + len(value.encode())
        if size > MAX_LABEL_BYTES:
            raise InvalidArgument(
                f"snapshot {key!r}: label {name[:64]!r} is {size} bytes, key and value may be at most "
                f"{MAX_LABEL_BYTES} bytes: invalid argument"
            )


class SnapshotService:
    """Prepare, View, Commit, Mounts, Remove, Stat, Update, Usage, Walk and Cleanup."""

    def __init__(
        self, store: MetadataStore, local: LocalSnapshots, remote: RemoteLayers | None = None
    ) -> None:
        """Serve snapshots kept in ``store`` and ``local``; ``remote`` enables lazy layers; raises nothing."""
        self._store = store
        self._local = local
        self._remote = remote

    # -- lookups -------------------------------------------------------------------------------

    def _get(self, key: str) -> SnapshotRecord:
        record = self._store.get(key)
        if record is None:
            raise SnapshotNotFound(f"snapshot {key!r} does not exist: not found")
        return record

    def _committed_parent(self, key: str, parent: str) -> SnapshotRecord | None:
        if parent == "":
            return None
        record = self._store.get(parent)
        if record is None:
            raise SnapshotNotFound(f"parent snapshot {parent!r} of {key!r} does not exist: not found")
        if record.kind != KIND_COMMITTED:
            raise InvalidArgument(
                f"parent {parent!r} of {key!r} is not a committed snapshot: invalid argument"
            )
        return record

    # -- creation ------------------------------------------------------------------------------

    async def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """Create an active snapshot and return its mounts; raises AlreadyExists (also on remote success),
        SnapshotNotFound (parent), InvalidArgument (uncommitted parent, labels)."""
        validate_labels(key, labels)
        target = labels.get(TARGET_REF_LABEL)
        if target and self._remote is not None:
            await self._prepare_remote(key, parent, target, labels)
        return self._create(key, parent, labels, KIND_ACTIVE)

    async def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """Create a read-only view of parent and return its mounts; raises as ``prepare``."""
        validate_labels(key, labels)
        return self._create(key, parent, labels, KIND_VIEW)

    def _create(self, key: str, parent: str, labels: Mapping[str, str], kind: str) -> list[Mount]:
        with self._store.transaction():
            if self._store.get(key) is not None:
                raise AlreadyExists(f"snapshot {key!r}: already exists")
            parent_record = self._committed_parent(key, parent)
            record = self._store.insert(
                key, kind, parent_record.id if parent_record else None, time.time_ns(), labels
            )
            # Inside the transaction: if the directories can't be made, the row is rolled back;
            # if we crash after mkdir but before COMMIT, Cleanup removes the orphan directory.
            self._local.create(record.id)
            # Also inside: if no mounts can be built (remote backend missing), nothing was created.
            return self._mounts(record)

    async def _prepare_remote(self, key: str, parent: str, target: str, labels: Mapping[str, str]) -> None:
        """Commit ``target`` as a remote snapshot and raise AlreadyExists, or log why not and return."""
        if self._store.get(target) is not None:
            raise AlreadyExists(f"target snapshot {target!r}: already exists")
        reason = await self._remote_reason(parent, target, labels)
        if reason is not None:
            log.info("remote-snapshot-prepared=false key=%r chain=%s reason=%s", key, target, reason)
            return
        with self._store.transaction():
            if self._store.get(target) is not None:
                # A concurrent Prepare of the same layer won the race; prepare_remote is idempotent.
                raise AlreadyExists(f"target snapshot {target!r}: already exists")
            parent_record = self._committed_parent(key, parent)
            remote_labels = {**labels, REMOTE_LABEL: REMOTE_LABEL_VALUE}
            parent_id = parent_record.id if parent_record else None
            self._store.insert(target, KIND_COMMITTED, parent_id, time.time_ns(), remote_labels, remote=True)
        log.info("remote-snapshot-prepared=true key=%r chain=%s", key, target)
        raise AlreadyExists(f"target snapshot {target!r}: already exists")

    async def _remote_reason(self, parent: str, target: str, labels: Mapping[str, str]) -> str | None:
        assert self._remote is not None
        parent_record = self._store.get(parent) if parent else None
        if parent and parent_record is None:
            return f"parent {parent!r} does not exist"
        if parent_record is not None and not parent_record.remote:
            # The merged FUSE tree can only stack remote layers; a local parent means containerd
            # already extracted a lower layer itself.
            return f"parent {parent!r} is a local snapshot"
        try:
            return await self._remote.prepare_remote(target, parent or None, labels)
        except Exception as error:
            # Falling back is always safe: containerd then downloads the layer itself.
            log.warning("remote layer %s failed to prepare", target, exc_info=True)
            return f"{type(error).__name__}: {error}"

    async def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        """Commit active snapshot ``key`` as ``name`` with ``labels``; raises SnapshotNotFound,
        AlreadyExists, FailedPrecondition (not active), InvalidArgument (labels)."""
        validate_labels(name, labels)
        with self._store.transaction():
            if self._store.get(name) is not None:
                raise AlreadyExists(f"committed snapshot {name!r}: already exists")
            record = self._store.get(key)
            if record is None:
                raise SnapshotNotFound(f"active snapshot {key!r} does not exist: not found")
            if record.kind != KIND_ACTIVE:
                raise FailedPrecondition(
                    f"snapshot {key!r} is {record.kind}, not active: failed precondition"
                )
            self._store.commit(record.id, name, time.time_ns(), labels)

    # -- reads ---------------------------------------------------------------------------------

    async def mounts(self, key: str) -> list[Mount]:
        """Return the mounts of a snapshot (read-only for views and committed ones); raises SnapshotNotFound,
        FailedPrecondition (remote snapshot without a remote backend)."""
        return self._mounts(self._get(key))

    def _mounts(self, record: SnapshotRecord) -> list[Mount]:
        if record.remote:
            return [Mount("bind", self._remote_dir(record.key), ("ro", "rbind"))]
        lowers = [self._local.fs_dir(record.id)] if record.kind == KIND_COMMITTED else []
        for ancestor in self._store.ancestors(record.id):
            if ancestor.remote:
                # One merged directory for the whole remote chain below this point.
                lowers.append(self._remote_dir(ancestor.key))
                break
            lowers.append(self._local.fs_dir(ancestor.id))
        return self._local.mounts(record.id, record.kind == KIND_ACTIVE, lowers)

    def _remote_dir(self, chain_id: str) -> str:
        if self._remote is None:
            raise FailedPrecondition(
                f"snapshot {chain_id!r} is a remote snapshot but no remote layer backend is running: "
                "failed precondition"
            )
        return self._remote.lower_dir(chain_id)

    async def stat(self, key: str) -> Info:
        """Return a snapshot's Info; raises SnapshotNotFound."""
        return _info(self._get(key))

    async def usage(self, key: str) -> DiskUsage:
        """Return bytes and inodes a snapshot's own layer uses (0 for remote ones); raises SnapshotNotFound."""
        record = self._get(key)
        if record.remote:
            return DiskUsage(0, 0)
        return await trio.to_thread.run_sync(disk_usage, self._local.fs_dir(record.id))

    async def walk(self, filter_texts: Sequence[str]) -> list[Info]:
        """Return the Info of every snapshot matching any of the filters; raises InvalidArgument (bad filter)."""
        parsed = filters.parse_all(filter_texts)
        result = []
        for record in self._store.all():
            fields = filters.snapshot_fields(record.key, record.parent_key, record.kind, record.labels)
            if parsed.match(fields):
                result.append(_info(record))
        return result

    # -- changes -------------------------------------------------------------------------------

    async def update(self, info: Info, field_paths: Sequence[str]) -> Info:
        """Change the labels of ``info.name`` as containerd does and return the new Info; raises
        SnapshotNotFound, InvalidArgument (any field but labels, label size)."""
        with self._store.transaction():
            record = self._get(info.name)
            labels = dict(record.labels)
            if not field_paths:
                labels = dict(info.labels)
            for path in field_paths:
                if path == "labels":
                    labels = dict(info.labels)
                elif path.startswith("labels."):
                    name = path[len("labels.") :]
                    if name in info.labels:
                        labels[name] = info.labels[name]
                    else:
                        labels.pop(name, None)
                else:
                    raise InvalidArgument(
                        f"cannot update {path!r} field on snapshot {info.name!r}: invalid argument"
                    )
            validate_labels(info.name, labels)
            return _info(self._store.set_labels(record.id, labels, time.time_ns()))

    async def remove(self, key: str) -> None:
        """Remove a snapshot and its files, releasing a remote one; raises SnapshotNotFound,
        FailedPrecondition (it has children)."""
        with self._store.transaction():
            record = self._get(key)
            if self._store.has_children(record.id):
                raise FailedPrecondition(f"cannot remove snapshot {key!r} with child: failed precondition")
            self._store.delete(record.id)
        # After COMMIT: a crash from here on leaves only an orphan directory, which Cleanup removes.
        if record.remote:
            if self._remote is not None:
                await self._remote.release(record.key)
            return
        trashed = self._local.discard(record.id)
        if trashed is not None:
            await trio.to_thread.run_sync(remove_tree, trashed)

    async def cleanup(self) -> None:
        """Delete directories no snapshot owns (left by crashes or failed removes); raises OSError."""
        # Ids and directory listing are read in one synchronous step, so no Prepare can slip in
        # between; ids are never reused, so what is orphaned now stays orphaned.
        orphans = self._local.orphans(self._store.ids())
        for path in orphans:
            log.info("cleanup: removing orphaned snapshot directory %s", path)
            await trio.to_thread.run_sync(remove_tree, path)

    async def restore(self) -> None:
        """After a (re)start: re-expose remote chains and clean leftovers of a crash; raises OSError."""
        remote_keys = self._remote_chain_order()
        if remote_keys and self._remote is not None:
            await self._remote.restore(remote_keys)
        elif remote_keys:
            log.warning("%d remote snapshots stored but no remote layer backend configured", len(remote_keys))
        await self.cleanup()

    def _remote_chain_order(self) -> list[str]:
        """Keys of remote snapshots, every parent before its children."""
        records = [r for r in self._store.all() if r.remote]
        depth = {r.key: len(self._store.ancestors(r.id)) for r in records}
        return sorted(depth, key=lambda k: (depth[k], k))
