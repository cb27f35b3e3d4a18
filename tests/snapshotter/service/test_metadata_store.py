"""The SQLite metadata store: rows, transactions, persistence."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.service.metadata_store import MetadataStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetadataStore]:
    s = MetadataStore(tmp_path / "metadata.db")
    yield s
    s.close()


def test_insert_and_get(store: MetadataStore) -> None:
    """A snapshot reads back with its kind, parent key, times and labels."""
    with store.transaction():
        parent = store.insert("p", "committed", None, 10, {})
        child = store.insert("/abs/key", "active", parent.id, 20, {"a": "1"})
    got = store.get("/abs/key")
    assert got == child
    assert (got.parent_key, got.created_ns, got.updated_ns, got.labels) == ("p", 20, 20, {"a": "1"})
    assert store.get("missing") is None


def test_changes_need_a_transaction(store: MetadataStore) -> None:
    """Writing outside transaction() is a programming error."""
    with pytest.raises(RuntimeError):
        store.insert("k", "active", None, 1, {})


def test_transaction_rolls_back_on_error(store: MetadataStore) -> None:
    """An exception inside a transaction leaves no trace of its changes."""
    with pytest.raises(ValueError), store.transaction():
        store.insert("k", "active", None, 1, {})
        raise ValueError("boom")
    assert store.get("k") is None


def test_duplicate_key_is_refused(store: MetadataStore) -> None:
    """Keys are unique."""
    with store.transaction():
        store.insert("k", "active", None, 1, {})
    with pytest.raises(sqlite3.IntegrityError), store.transaction():
        store.insert("k", "view", None, 1, {})


def test_commit_keeps_the_id_and_parent(store: MetadataStore) -> None:
    """Commit renames in place: same id (so same directory), new times and labels."""
    with store.transaction():
        p = store.insert("p", "committed", None, 1, {})
        a = store.insert("a", "active", p.id, 2, {"old": "x"})
        c = store.commit(a.id, "c", 3, {"new": "y"})
    assert (c.id, c.key, c.kind, c.parent_key, c.created_ns, c.updated_ns) == (
        a.id,
        "c",
        "committed",
        "p",
        3,
        3,
    )
    assert c.labels == {"new": "y"}
    assert store.get("a") is None


def test_ancestors_nearest_first(store: MetadataStore) -> None:
    """ancestors() walks parent links up to the root."""
    with store.transaction():
        ids = []
        parent = None
        for i in range(5):
            rec = store.insert(f"l{i}", "committed", parent, i, {})
            ids.append(rec.id)
            parent = rec.id
    assert [r.key for r in store.ancestors(ids[-1])] == ["l3", "l2", "l1", "l0"]
    assert store.ancestors(ids[0]) == []


def test_parent_with_children_cannot_be_deleted(store: MetadataStore) -> None:
    """The foreign key keeps the tree consistent even if the service forgot to check."""
    with store.transaction():
        p = store.insert("p", "committed", None, 1, {})
        store.insert("c", "active", p.id, 1, {})
    assert store.has_children(p.id)
    with pytest.raises(sqlite3.IntegrityError), store.transaction():
        store.delete(p.id)


def test_data_survives_reopen_and_ids_are_not_reused(tmp_path: Path) -> None:
    """Committed rows persist; a deleted id is never handed out again."""
    path = tmp_path / "m.db"
    first = MetadataStore(path)
    with first.transaction():
        a = first.insert("a", "committed", None, 1, {"k": "v"})
        b = first.insert("b", "active", None, 1, {})
        first.set_labels(a.id, {"k": "w"}, 5)
        first.delete(b.id)
    first.close()
    second = MetadataStore(path)
    try:
        got = second.get("a")
        assert got is not None and got.labels == {"k": "w"} and got.updated_ns == 5
        with second.transaction():
            c = second.insert("c", "active", None, 1, {})
        assert c.id > b.id
        assert second.ids() == {a.id, c.id}
        assert second.db_mode() == "wal"
    finally:
        second.close()
