"""Fixtures every test package may use: real registries (session scope) and a RegistryClient.

- ``registry``: an open docker-registry on 127.0.0.1 (plain HTTP), shared by the whole session;
  use ``registry.ref("name")`` for a fresh repository and ``registry.bytes_sent_since(mark)``
  to count bytes served.
- ``auth_registry``: the same, requiring basic auth; ``.credentials`` is ready for RegistryClient.
- ``token_registry``: the same, requiring Bearer tokens from ``.token_server``.
- ``cli``: a CliSession (real ``lazysnap`` subprocesses) with a root of its own, cleaned up after.
- ``registry_client``: a RegistryClient (function scope, closed after the test) that ignores
  ~/.docker/config.json; build your own with ``credentials=auth_registry.credentials`` for the others.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from snapshotter.remote.client import RegistryClient
from tests.support.lazysnap_cli import CliSession
from tests.support.registry import TestRegistry, basic_auth_registry, bearer_registry, plain_registry

# The containerd fixtures (``containerd``, ``containerd_factory``) for every package.
pytest_plugins = ["tests.support.containerd"]


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestRegistry]:
    """An open registry for the whole session."""
    with plain_registry(tmp_path_factory.mktemp("registry")) as running:
        yield running


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestRegistry]:
    """A registry requiring HTTP basic auth (``.username``/``.password``/``.credentials``)."""
    with basic_auth_registry(tmp_path_factory.mktemp("auth-registry")) as running:
        yield running


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestRegistry]:
    """A registry requiring Bearer tokens from our token server (``.token_server``, ``.credentials``)."""
    with bearer_registry(tmp_path_factory.mktemp("token-registry")) as running:
        yield running


@pytest.fixture
def empty_docker_config(tmp_path: Path) -> str:
    """Path of a docker config.json that does not exist, so tests never read the machine's credentials."""
    return str(tmp_path / "no-docker-config.json")


@pytest.fixture
async def registry_client(registry: TestRegistry, empty_docker_config: str) -> AsyncIterator[RegistryClient]:
    """A RegistryClient for the open registry, closed after the test."""
    async with RegistryClient(docker_config_path=empty_docker_config) as client:
        yield client


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[CliSession]:
    """A lazysnap CLI session with its own root; everything it mounted is gone afterwards."""
    session = CliSession(tmp_path / "root")
    try:
        yield session
    finally:
        session.cleanup()
