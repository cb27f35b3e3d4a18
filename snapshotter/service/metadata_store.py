"""Snapshot metadata in SQLite: one row per snapshot, keyed by a numeric id that names its directory.

The database lives under the daemon root (``metadata.db``) in WAL mode with ``synchronous=FULL``, so
a committed transaction survives ``kill -9`` and power loss, and an interrupted one leaves nothing.
There is one connection, used only from the trio thread: every change runs inside ``transaction()``
with no ``await`` in between, which makes each snapshot call atomic with respect to the others.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    -- AUTOINCREMENT: ids are never reused, so a directory left behind by a crash can't be
    -- mistaken for a new snapshot's.
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    key         TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL CHECK (kind IN ('active', 'view', 'committed')),
    parent_id   INTEGER REFERENCES snapshots (id),
    created_ns  INTEGER NOT NULL,
    updated_ns  INTEGER NOT NULL,
    labels      TEXT NOT NULL,
    remote      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots (parent_id);
"""

_SELECT = """
SELECT s.id, s.key, s.kind, s.parent_id, p.key, s.created_ns, s.updated_ns, s.labels, s.remote
FROM snapshots AS s LEFT JOIN snapshots AS p ON p.id = s.parent_id
"""

_Row = tuple[int, str, str, int | None, str | None, int, int, str, int]


@dataclass(frozen=True)
class SnapshotRecord:
    """One stored snapshot: ``key`` is its name once committed; ``parent_key`` is "" for none."""

    id: int
    key: str
    kind: str
    parent_id: int | None
    parent_key: str
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)
    remote: bool = False


def _record(row: _Row) -> SnapshotRecord:
    sid, key, kind, parent_id, parent_key, created, updated, labels, remote = row
    return SnapshotRecord(
        sid, key, kind, parent_id, parent_key or "", created, updated, json.loads(labels), bool(remote)
    )


class MetadataStore:
    """The snapshot table; open with ``MetadataStore(path)``, close with ``close()``."""

    def __init__(self, path: Path | str) -> None:
        """Open (creating if needed) the database at ``path``; raises sqlite3.Error if it is unusable."""
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction spans exactly
        # the block it wraps and nothing is committed implicitly.
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._in_transaction = False
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            with self.transaction():
                # execute() per statement: executescript() would COMMIT our transaction first.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
                elif version != _SCHEMA_VERSION:
                    raise sqlite3.DatabaseError(
                        f"{path}: metadata schema version {version}, this lazysnap reads {_SCHEMA_VERSION}"
                    )
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        """Close the connection (idempotent); raises nothing."""
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the block as one write transaction, rolled back if it raises; raises RuntimeError if nested."""
        if self._in_transaction:
            raise RuntimeError("metadata transactions do not nest")
        # IMMEDIATE takes the write lock up front: we are the only writer, and a failure to
        # get it should happen before any work, not at COMMIT.
        self._db.execute("BEGIN IMMEDIATE")
        self._in_transaction = True
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")
        finally:
            self._in_transaction = False

    def _require_transaction(self) -> None:
        if not self._in_transaction:
            raise RuntimeError("metadata changes must run inside MetadataStore.transaction()")

    def db_mode(self) -> str:
        """Return SQLite's journal mode (``wal`` once opened); raises nothing."""
        return str(self._db.execute("PRAGMA journal_mode").fetchone()[0])

    def get(self, key: str) -> SnapshotRecord | None:
        """Return the snapshot with that key, or None; raises nothing else."""
        row = self._db.execute(_SELECT + " WHERE s.key = ?", (key,)).fetchone()
        return _record(row) if row else None

    def all(self) -> list[SnapshotRecord]:
        """Return every snapshot, ordered by key; raises nothing."""
        return [_record(row) for row in self._db.execute(_SELECT + " ORDER BY s.key")]

    def ids(self) -> set[int]:
        """Return the ids of all snapshots; raises nothing."""
        return {row[0] for row in self._db.execute("SELECT id FROM snapshots")}

    def ancestors(self, snapshot_id: int) -> list[SnapshotRecord]:
        """Return the parents of a snapshot, nearest first (excluding itself); raises nothing."""
        rows = self._db.execute(
            """
            WITH RECURSIVE chain(id, depth) AS (
                SELECT parent_id, 1 FROM snapshots WHERE id = ? AND parent_id IS NOT NULL
                UNION ALL
                SELECT s.parent_id, c.depth + 1 FROM snapshots AS s JOIN chain AS c ON s.id = c.id
                WHERE s.parent_id IS NOT NULL
            )
            """
            + _SELECT
            + " JOIN chain AS c ON c.id = s.id ORDER BY c.depth",
            (snapshot_id,),
        ).fetchall()
        return [_record(row) for row in rows]

    def has_children(self, snapshot_id: int) -> bool:
        """Tell whether any snapshot names this one as its parent; raises nothing."""
        row = self._db.execute(
            "SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (snapshot_id,)
        ).fetchone()
        return row is not None

    def insert(
        self,
        key: str,
        kind: str,
        parent_id: int | None,
        now_ns: int,
        labels: Mapping[str, str],
        remote: bool = False,
    ) -> SnapshotRecord:
        """Add a snapshot (created == updated == now_ns); raises sqlite3.IntegrityError on a duplicate key."""
        self._require_transaction()
        cursor = self._db.execute(
            "INSERT INTO snapshots (key, kind, parent_id, created_ns, updated_ns, labels, remote)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, kind, parent_id, now_ns, now_ns, json.dumps(dict(labels), sort_keys=True), int(remote)),
        )
        record = self._get_id(cursor.lastrowid)
        assert record is not None
        return record

    def _get_id(self, snapshot_id: int | None) -> SnapshotRecord | None:
        row = self._db.execute(_SELECT + " WHERE s.id = ?", (snapshot_id,)).fetchone()
        return _record(row) if row else None

    def commit(self, snapshot_id: int, name: str, now_ns: int, labels: Mapping[str, str]) -> SnapshotRecord:
        """Turn a snapshot into a committed one named ``name``, with new times and labels; raises nothing."""
        self._require_transaction()
        # One UPDATE: the active key disappears and the committed name appears atomically, and the
        # id (so the directory) stays, so nothing on disk has to move.
        self._db.execute(
            "UPDATE snapshots SET key = ?, kind = 'committed', created_ns = ?, updated_ns = ?, labels = ?"
            " WHERE id = ?",
            (name, now_ns, now_ns, json.dumps(dict(labels), sort_keys=True), snapshot_id),
        )
        record = self._get_id(snapshot_id)
        assert record is not None
        return record

    def set_labels(self, snapshot_id: int, labels: Mapping[str, str], now_ns: int) -> SnapshotRecord:
        """Replace a snapshot's labels and set its update time; raises nothing."""
        self._require_transaction()
        self._db.execute(
            "UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
            (json.dumps(dict(labels), sort_keys=True), now_ns, snapshot_id),
        )
        record = self._get_id(snapshot_id)
        assert record is not None
        return record

    def delete(self, snapshot_id: int) -> None:
        """Delete a snapshot row; raises sqlite3.IntegrityError if a child still points at it."""
        self._require_transaction()
        self._db.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))
