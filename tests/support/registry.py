"""Start real registries for tests: plain, basic auth (htpasswd) and Bearer tokens (our token server).

The launcher itself is ``snapshotter.devtools.local_registry.LocalRegistry`` (shared with the demo and the
benchmark); this module adds credentials, the token server, and unique repository names so
tests sharing one session registry never see each other's tags.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter.devtools.local_registry import HtpasswdAuth, LocalRegistry, TokenAuth
from snapshotter.remote.reference import Reference
from tests.support.token_server import ISSUER, SERVICE, TokenServer

TEST_USER = "lazysnap"
TEST_PASSWORD = "correct-horse-battery"
_counter = itertools.count()


@dataclass
class TestRegistry:
    """A running registry and what a test needs to talk to it.

    ``credentials`` is ``{host: (user, password)}`` for RegistryClient (empty for an open
    registry); ``token_server`` is set for the Bearer registry. ``registry`` is the launcher:
    use ``registry.mark()`` / ``registry.requests_since(mark)`` / ``registry.bytes_sent_since(mark)``
    to count what the registry sent.
    """

    __test__ = False  # not a test class, despite the name

    registry: LocalRegistry
    username: str | None = None
    password: str | None = None
    token_server: TokenServer | None = None
    credentials: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``."""
        return self.registry.host

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return self.registry.url

    @property
    def log_path(self) -> Path:
        """The registry's log file (one ``response completed`` line per request)."""
        return self.registry.log_path

    def mark(self) -> int:
        """A position in the log; see ``bytes_sent_since``."""
        return self.registry.mark()

    def bytes_sent_since(self, mark: int = 0, *, method: str | None = None) -> int:
        """Bytes of response bodies the registry wrote after ``mark`` (waits for the log to settle)."""
        return self.registry.bytes_sent_since(mark, method=method)

    def ref(self, name: str = "image", tag: str | None = "latest") -> Reference:
        """A reference to a fresh repository ``test/NAME-N`` on this registry (unique per call)."""
        return Reference(self.host, f"test/{name}-{os.getpid()}-{next(_counter)}", tag, None)


def write_htpasswd(path: Path, user: str, password: str) -> Path:
    """Write a bcrypt htpasswd file (distribution accepts only bcrypt) with ``htpasswd`` from apache2-utils."""
    line = subprocess.run(
        ["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True
    ).stdout
    path.write_text(line.strip() + "\n")
    return path


@contextlib.contextmanager
def plain_registry(root: Path) -> Iterator[TestRegistry]:
    """Run an open registry (anonymous pull and push) under ``root``."""
    with LocalRegistry(root) as registry:
        yield TestRegistry(registry)


@contextlib.contextmanager
def basic_auth_registry(
    root: Path, user: str = TEST_USER, password: str = TEST_PASSWORD
) -> Iterator[TestRegistry]:
    """Run a registry that requires HTTP basic auth for ``user``/``password``."""
    root.mkdir(parents=True, exist_ok=True)
    htpasswd = write_htpasswd(root / "htpasswd", user, password)
    with LocalRegistry(root, auth=HtpasswdAuth(str(htpasswd))) as registry:
        yield TestRegistry(registry, user, password, credentials={registry.host: (user, password)})


@contextlib.contextmanager
def bearer_registry(
    root: Path, user: str = TEST_USER, password: str = TEST_PASSWORD
) -> Iterator[TestRegistry]:
    """Run a registry that requires Bearer tokens from a TokenServer that knows ``user``/``password``."""
    root.mkdir(parents=True, exist_ok=True)
    with TokenServer(root, {user: password}) as tokens:
        auth = TokenAuth(
            realm=tokens.realm, service=SERVICE, issuer=ISSUER, rootcertbundle=str(tokens.cert_path)
        )
        with LocalRegistry(root / "registry", auth=auth) as registry:
            yield TestRegistry(
                registry, user, password, tokens, credentials={registry.host: (user, password)}
            )
