"""Fixtures of the fusefs tests: a mount point that is never left mounted."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusefs.mount import is_mounted, unmount


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    """An empty directory to mount on; any mount left there is removed afterwards."""
    path = tmp_path / "mnt"
    path.mkdir()
    try:
        yield path
    finally:
        if is_mounted(str(path)):
            unmount(str(path))
        os.rmdir(path)
