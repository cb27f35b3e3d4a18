"""The chain-serving core's read deadline: one outage costs one timeout, and recovery needs no remount."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from index.model import Entry, EntryType
from snapshotter.errors import FetchTimeout
from snapshotter.layers.chain import DEGRADED_READ_SECONDS, ChainSource
from snapshotter.remote.client import Descriptor

ENTRY = Entry("f", EntryType.FILE, size=10, data_offset=0)


@dataclass
class SwitchableLayer:
    """Stands in for a served Layer whose registry can be switched between hanging and answering."""

    hang: bool = True
    descriptor: Descriptor = field(default_factory=lambda: Descriptor("m", "sha256:" + "0" * 64, 10, {}))
    degraded: bool = False

    async def read(self, entry: Entry, offset: int, length: int) -> bytes:
        """Hang while ``hang`` is set, else answer at once."""
        if self.hang:
            await trio.sleep_forever()
        return b"x" * length


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """A clock that jumps ahead whenever every task is blocked, so deadlines pass instantly."""
    return trio.testing.MockClock(autojump_threshold=0)


async def test_a_hanging_registry_costs_one_full_timeout_then_short_ones_until_it_recovers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A failed read and the kernel's retry of it take read_timeout together; recovery restores reads."""
    layer = SwitchableLayer()
    source = ChainSource([layer], read_timeout=60.0)  # type: ignore[list-item]
    start = trio.current_time()
    with pytest.raises(FetchTimeout, match=r"not read within 54\.5 s"):
        await source.read(0, ENTRY, 0, 10)
    assert trio.current_time() - start == pytest.approx(60.0 - DEGRADED_READ_SECONDS - 0.5)
    start = trio.current_time()
    with pytest.raises(FetchTimeout, match=re.escape(f"not read within {DEGRADED_READ_SECONDS} s")):
        await source.read(0, ENTRY, 0, 10)
    assert trio.current_time() - start == pytest.approx(DEGRADED_READ_SECONDS)  # 59.5 s for both
    layer.hang = False
    assert await source.read(0, ENTRY, 0, 10) == b"x" * 10
    assert not layer.degraded
