"""Layer indexes kept on local disk, one file per compressed blob digest and provenance, shared by all mounts.

Where an index came from decides who may use it (docs/trust.md):

- ``ROOT/sha256/<hex>.idx``: *trusted* indexes, built here from a blob whose digest was verified
  (or checked against the complete, verified blob): used for any image holding that blob;
- ``ROOT/scoped/<scope hash>/sha256/<hex>.idx``: indexes nothing here has checked yet, usable
  only where they were found: an index published in a repository (scope ``repo:host/name``),
  a TOC pinned by one image's annotation (scope ``toc:<toc digest>``). Another image sharing the
  blob never sees them, so one repository's lie can't reach another's mounts.

``IndexStore`` writes each index as it is put; ``WriteBehindIndexStore`` queues them until
``flush``, so a mount daemon can write them once its mount is ready.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
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
        if not path.exists():
            return None
        try:
            index = load_index_file(path)
        except LayerFormatError as error:
            log.warning("index-store-drop digest=%s reason=%s", digest, error)
            path.unlink(missing_ok=True)
            return None
        if index.digest != digest:
            log.warning("index-store-drop digest=%s reason=stored index is for %s", digest, index.digest)
            path.unlink(missing_ok=True)
            return None
        return index

    def put(self, index: LayerIndex, scope: str = "") -> None:
        """Store an index atomically under its blob digest, for ``scope`` ("" = trusted)."""
        path = self.path(index.digest, scope)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_index(path, index)

    def drop(self, digest: str, scope: str = "") -> None:
        """Forget the stored index of ``digest`` for ``scope`` (one that proved false)."""
        self.path(digest, scope).unlink(missing_ok=True)


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
