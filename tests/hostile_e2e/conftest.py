"""Fixtures of the hostile end-to-end suite: a lazysnap CLI session, a tampering proxy, a mount point.

Every test states one rule of DESIGN.md's Trust section as an outcome it can check exactly: the
bytes of a file equal the original content, or the read fails with EIO (for that file only, the
others readable, the daemon alive), or ``lazysnap mount`` exits non-zero with one line naming the
cause and no traceback. Helpers live in ``tests/support/hostile.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.registry import TestRegistry
from tests.support.tampering_proxy import TamperingProxy


@pytest.fixture
def proxy(registry: TestRegistry) -> Iterator[TamperingProxy]:
    """A tampering proxy in front of the session registry (honest until a test sets a fault)."""
    with TamperingProxy("127.0.0.1", registry.registry.port) as running:
        yield running


@pytest.fixture
def mountpoint(tmp_path: Path) -> Path:
    """An empty directory to mount on."""
    path = tmp_path / "mnt"
    path.mkdir()
    return path
