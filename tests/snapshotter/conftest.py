"""Fixtures shared by the snapshotter tests that drive the `lazysnap` command line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.lazysnap_cli import CliSession


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[CliSession]:
    """A lazysnap CLI session with its own root; everything it mounted is gone afterwards."""
    session = CliSession(tmp_path / "root")
    try:
        yield session
    finally:
        session.cleanup()
