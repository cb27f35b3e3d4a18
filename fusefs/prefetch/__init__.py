"""Read-ahead driven by what files say they need next: a program's libraries, a module's imports.

Every prefetch policy is a ``Prefetcher``: the FUSE operations tell it about opens and reads and
it starts fetches through the ``TreeTasks`` of its tree. Those tasks run in the filesystem's
nursery and are cancelled together when the tree is removed or the mount ends.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from fusefs.merged_tree import Node

log = logging.getLogger(__name__)


class Prefetcher(Protocol):
    """A prefetch policy of one merged tree: it hears of opens and reads, and may start fetches."""

    def note_open(self, node: Node, pid: int) -> None:
        """A file was opened by process ``pid``."""
        ...

    def before_read(self, node: Node, offset: int) -> None:
        """A read of ``node`` at ``offset`` is about to be served."""
        ...

    def note_read(self, node: Node, offset: int, data: bytes) -> None:
        """A read of ``node`` at ``offset`` returned ``data``."""
        ...


class TreeTasks:
    """The background tasks of one tree: run in the filesystem's nursery, cancelled together.

    FUSE handlers have no nursery of their own, and a prefetch must not delay the read that
    revealed it; so tasks are started in a nursery the filesystem owns (``bind``), each inside a
    cancel scope of this group, which ``cancel`` cancels when the tree goes away.
    """

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None
        self._scopes: set[trio.CancelScope] = set()
        self._cancelled = False

    def bind(self, nursery: trio.Nursery) -> None:
        """Start tasks in ``nursery`` from now on (the filesystem's, alive while it is mounted)."""
        self._nursery = nursery

    @property
    def running(self) -> int:
        """How many tasks of this group are running."""
        return len(self._scopes)

    def start_soon(self, function: Callable[..., Awaitable[object]], *args: object, name: str = "") -> None:
        """Run ``function(*args)`` in the background; nothing happens once cancelled or before ``bind``."""
        if self._cancelled or self._nursery is None:
            return
        self._nursery.start_soon(self._run, function, args, name=name or None)

    async def _run(self, function: Callable[..., Awaitable[object]], args: tuple[object, ...]) -> None:
        with trio.CancelScope() as scope:
            if self._cancelled:
                return
            self._scopes.add(scope)
            try:
                await function(*args)
            except Exception as error:  # a hint only: never let it reach the filesystem's nursery
                log.debug("prefetch task failed: %s", error)
            finally:
                self._scopes.discard(scope)

    def cancel(self) -> None:
        """Cancel every running task and refuse new ones."""
        self._cancelled = True
        for scope in list(self._scopes):
            scope.cancel()
