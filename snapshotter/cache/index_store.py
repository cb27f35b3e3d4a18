"""Layer indexes kept on local disk, one file per compressed blob digest and provenance, shared by all mounts.

Where an index came from decides who may use it (docs/trust.md):

- ``ROOT/sha256/<hex>.idx``: *trusted* indexes, built here from a blob whose digest was verified
  (or checked against the complete, verified blob): used for any image holding that blob;
- ``ROOT/scoped/<scope hash>/sha256/<hex>.idx``: indexes nothing here has checked yet, usable
  only where they were found: an index published in a repository (scope ``repo:host/name``),
  a TOC pinned by one image's annotation (scope ``toc:<toc digest>``). Another image sharing the
  blob never sees them, so one repository's lie can't reach another's mounts.

Several processes may share the store (two ``lazysnap mount``s, ``serve``). Each index is written
to a temporary file of its own and renamed into place (``save_index``), so a reader, which takes
no lock, sees the old file or the new one, never half of one. Changes take the index's lock
(``fcntl.flock`` on ``<index>.lock`` beside it), and a store removes a file it found bad only if
it is still the one it read: a process dropping a refused index never deletes the fresh one
another process put there meanwhile.

``IndexStore`` writes each index as it is put; ``WriteBehindIndexStore`` queues them until
``flush``, so a mount daemon can write them once its mount is ready.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from index.errors import LayerFormatError
from index.model import LayerIndex
from index.serialize import load_index_file, save_index
from snapshotter.remote.reference import sha256_hex

log = logging.getLogger(__name__)


class IndexStore:
    """A directory of stored indexes: ``ROOT/sha256/<hex>.idx``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # The file each (digest, scope) was read from or written to, as (st_dev, st_ino): what
        # ``drop`` may remove.
        self._seen: dict[tuple[str, str], tuple[int, int]] = {}

    def path(self, digest: str, scope: str = "") -> Path:
        """Where the index of ``digest`` is stored for ``scope`` ("" = trusted); the digest is validated so it can't name another path.

        Raises:
            ValueError: ``digest`` is not a sha256 digest.
        """
        name = f"{sha256_hex(digest)}.idx"
        if not scope:
            return self.root / "sha256" / name
        return self.root / "scoped" / hashlib.sha256(scope.encode()).hexdigest() / "sha256" / name

    def get(self, digest: str, scope: str = "") -> LayerIndex | None:
        """Return the stored index of a blob for ``scope`` ("" = trusted), or None; a corrupt or old-version file is dropped and logged."""
        path = self.path(digest, scope)
        identity = _identity(path)
        if identity is None:
            return None
        try:
            index = load_index_file(path)
        except FileNotFoundError:
            return None  # dropped by another process since
        except LayerFormatError as error:
            log.warning("index-store-drop digest=%s reason=%s", digest, error)
            self._unlink_if(path, identity)
            return None
        if index.digest != digest:
            log.warning("index-store-drop digest=%s reason=stored index is for %s", digest, index.digest)
            self._unlink_if(path, identity)
            return None
        self._seen[(digest, scope)] = identity
        return index

    def put(self, index: LayerIndex, scope: str = "") -> None:
        """Store an index atomically under its blob digest, for ``scope`` ("" = trusted); raises OSError."""
        path = self.path(index.digest, scope)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            save_index(path, index)
            identity = _identity(path)
        if identity is not None:
            self._seen[(index.digest, scope)] = identity

    def drop(self, digest: str, scope: str = "") -> None:
        """Forget the stored index of ``digest`` for ``scope`` (one that proved false), unless another process replaced it since this store read it."""
        path = self.path(digest, scope)
        seen = self._seen.pop((digest, scope), None)
        if seen is None:
            with _locked(path):
                path.unlink(missing_ok=True)
            return
        self._unlink_if(path, seen)

    def _unlink_if(self, path: Path, identity: tuple[int, int]) -> None:
        """Remove ``path`` if it is still the file ``identity`` names."""
        if not path.parent.exists():
            return
        with _locked(path):
            current = _identity(path)
            if current == identity:
                path.unlink()
            elif current is not None:
                log.info(
                    "index-store-kept path=%s reason=replaced by another process since it was read", path
                )


def _identity(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of ``path``, or None if it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the lock of the index at ``path`` (a ``.lock`` file beside it, kept: removing it would race)."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class WriteBehindIndexStore(IndexStore):
    """An IndexStore whose ``put`` only queues the index (``get`` sees it); ``flush`` writes the queue.

    Writing a large layer's index (serializing, two fsyncs) takes ~0.1 s that a mount need not
    wait for. Each write is still atomic, so a crash before the flush loses the index (it is
    made again next time) but never leaves a bad one. ``put`` and ``flush`` may run on any thread.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(root)
        self._queued: dict[tuple[str, str], LayerIndex] = {}
        self._lock = threading.Lock()

    def get(self, digest: str, scope: str = "") -> LayerIndex | None:
        """The queued index of ``digest`` for ``scope`` if there is one, else the stored one (see IndexStore.get)."""
        with self._lock:
            queued = self._queued.get((digest, scope))
        return queued if queued is not None else super().get(digest, scope)

    def put(self, index: LayerIndex, scope: str = "") -> None:
        """Queue ``index`` for the next flush."""
        with self._lock:
            self._queued[(index.digest, scope)] = index

    def drop(self, digest: str, scope: str = "") -> None:
        """Forget a queued or stored index (see IndexStore.drop)."""
        with self._lock:
            self._queued.pop((digest, scope), None)
        super().drop(digest, scope)

    def flush(self) -> None:
        """Write every queued index (each atomically); raises OSError, the failed index staying queued."""
        while True:
            with self._lock:
                if not self._queued:
                    return
                key, index = next(iter(self._queued.items()))
            super().put(index, key[1])
            with self._lock:
                if self._queued.get(key) is index:
                    del self._queued[key]
