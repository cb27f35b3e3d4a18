"""Which compressed bytes to fetch with a cold read: the file, and the files after it in its directory.

Programs starting up read many small files of one directory in a row (Python's imports read
``json/__pycache__/*.pyc``, ``re/__pycache__/*.pyc``; a dynamic loader reads neighbouring
libraries), and a layer stores a directory's files next to each other. On a link with 20 ms
of round trip, fetching the next few KiB of the blob with the file costs far less than asking
for each of them later. So a cold read of a small file fetches, in one range, the file and
the files that follow it in tar order in the same directory, as long as that range stays
within a budget. Entries of other directories that sit in between are fetched along (the
range is contiguous) but never extend it.
"""

from __future__ import annotations

from typing import NamedTuple

from index.model import Entry, EntryType, LayerIndex
from index.reader import ByteRange, plan_read

# Compressed bytes one cold read may fetch for its file plus the following files of its
# directory. 64 KiB cost about 5 ms at 100 Mbit/s, against a round trip of 20 ms or more.
DEFAULT_BUDGET = 64 << 10
# Files looked at after the one read: bounds the work of a cold read in a directory of tiny files.
MAX_LOOKAHEAD = 256


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _hull(ranges: list[ByteRange]) -> ByteRange | None:
    if not ranges:
        return None
    start = min(r.offset for r in ranges)
    return ByteRange(start, max(r.end for r in ranges) - start)


class ReadAhead(NamedTuple):
    """What a cold read of one file fetches: the file's own blob bytes, and the range around them."""

    file: ByteRange  # the file with the header run its first read checks: present in the cache means the read is not cold
    span: ByteRange  # the file and its following siblings, fetched together


class SiblingReadahead:
    """Read-ahead ranges for one layer: a file's bytes joined with its following siblings' bytes."""

    def __init__(self, index: LayerIndex, budget: int = DEFAULT_BUDGET) -> None:
        self._index = index
        self._budget = budget
        self._files: list[Entry] = []
        self._position: dict[int, int] | None = None  # built on the first read, not at mount time
        self._plans: dict[int, ReadAhead | None] = {}  # by id(entry): computed once per file read

    def _position_of(self, entry: Entry) -> int | None:
        if self._position is None:
            self._files = [e for e in self._index.entries if e.type is EntryType.FILE and e.size > 0]
            self._position = {id(e): i for i, e in enumerate(self._files)}
        return self._position.get(id(entry))

    def range_for(self, entry: Entry) -> ByteRange | None:
        """Return one blob range holding all of ``entry`` and as many following siblings as fit the budget.

        None when ``entry`` is not a non-empty regular file of this index or is itself larger than
        the budget (its own read is large enough; the caller then reads just what it needs).
        """
        plan = self.plan_for(entry)
        return plan.span if plan is not None else None

    def plan_for(self, entry: Entry) -> ReadAhead | None:
        """Return ``entry``'s own blob range with ``range_for``'s; None when ``range_for`` is None.

        Computed once per entry: every read of a file asks, cached or not.
        """
        key = id(entry)
        if key not in self._plans:
            self._plans[key] = self._compute(entry)
        return self._plans[key]

    def _compute(self, entry: Entry) -> ReadAhead | None:
        position = self._position_of(entry)
        if position is None:
            return None
        own = _hull(plan_read(self._index, entry, 0, entry.size))
        if own is None or own.length > self._budget:
            return None
        hull = own
        directory = _parent(entry.path)
        for following in self._files[position + 1 : position + 1 + MAX_LOOKAHEAD]:
            ranges = plan_read(self._index, following, 0, following.size)
            if not ranges or ranges[0].offset > hull.offset + self._budget:
                break  # everything after starts beyond the budget
            if _parent(following.path) != directory:
                continue
            grown = _hull([hull, *ranges])
            if grown is None or grown.length > self._budget:
                break
            hull = grown
        return ReadAhead(own, hull)
