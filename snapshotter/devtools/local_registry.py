"""Run Debian's ``docker-registry`` (distribution 2.8) on a free 127.0.0.1 port: for tests, the demo, benchmarks.

One implementation serves all three (``tests/support/registry.py`` wraps it in pytest fixtures).
The registry speaks plain HTTP, stores blobs under a directory of ours, and writes its log to a
file; every request adds a ``response completed`` line with ``http.response.written=N``, which
``LocalRegistry.requests_since`` parses so a test can count the bytes the registry sent.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from snapshotter.errors import FetchError

REGISTRY_BINARY = "docker-registry"

_LINE = re.compile(r'msg="response completed"')
_FIELD = re.compile(
    r'(http\.request\.method|http\.request\.uri|http\.response\.status|http\.response\.written)=("[^"]*"|\S+)'
)


@dataclass(frozen=True)
class HtpasswdAuth:
    """Basic auth from an htpasswd file (bcrypt entries, as distribution requires)."""

    htpasswd_path: str
    realm: str = "lazysnap-test"


@dataclass(frozen=True)
class TokenAuth:
    """Bearer token auth: the registry sends clients to ``realm`` and trusts tokens signed by ``rootcertbundle``."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: str


@dataclass(frozen=True)
class LoggedRequest:
    """One request as the registry logged it when the response completed."""

    method: str
    uri: str
    status: int
    written: int


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config_yaml(root: Path, port: int, auth: HtpasswdAuth | TokenAuth | None) -> str:
    # JSON strings are valid YAML scalars, which spares us a YAML dependency and quoting bugs.
    def q(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [
        "version: 0.1",
        "log:",
        "  level: info",
        "  formatter: text",
        "  accesslog:",
        "    disabled: true",  # the "response completed" lines already carry method, uri, status, bytes
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {q(str(root / 'storage'))}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: {q(f'127.0.0.1:{port}')}",
        "  secret: lazysnap-local-registry",  # a fixed secret avoids a startup warning and keeps upload state valid
    ]
    if isinstance(auth, HtpasswdAuth):
        lines += ["auth:", "  htpasswd:", f"    realm: {q(auth.realm)}", f"    path: {q(auth.htpasswd_path)}"]
    elif isinstance(auth, TokenAuth):
        lines += [
            "auth:",
            "  token:",
            f"    realm: {q(auth.realm)}",
            f"    service: {q(auth.service)}",
            f"    issuer: {q(auth.issuer)}",
            f"    rootcertbundle: {q(auth.rootcertbundle)}",
        ]
    return "\n".join(lines) + "\n"


class LocalRegistry:
    """A ``docker-registry serve`` process on 127.0.0.1; ``start()`` waits until it answers, ``stop()`` ends it.

    Use it as a context manager. ``root`` holds the config, the storage and ``registry.log``;
    without one a temporary directory is made and removed on stop.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        auth: HtpasswdAuth | TokenAuth | None = None,
        port: int | None = None,
        binary: str = REGISTRY_BINARY,
    ) -> None:
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="lazysnap-registry-"))
        self.auth = auth
        self.port = port or free_port()
        self.binary = binary
        self.log_path = self.root / "registry.log"
        self.config_path = self.root / "config.yml"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: the registry part of an image reference."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: the base URL of the registry."""
        return f"http://{self.host}"

    @property
    def pid(self) -> int | None:
        """The registry process id while it runs (for CPU accounting in benchmarks)."""
        return self._process.pid if self._process is not None else None

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the registry process has used so far (0 when not running)."""
        if self.pid is None:
            return 0.0
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def start(self, timeout: float = 15.0) -> LocalRegistry:
        """Write the config, start the process and wait for ``/v2/``; raises FetchError if it never answers."""
        if shutil.which(self.binary) is None:
            raise FetchError(
                f"{self.binary} not found: install Debian's docker-registry package (scripts/setup.sh)"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(_config_yaml(self.root, self.port, self.auth))
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [self.binary, "serve", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log = self.log_path.read_text(errors="replace")[-2000:]
                self.stop()
                raise FetchError(
                    f"docker-registry exited with {self._process.returncode} at startup; log:\n{log}"
                )
            try:
                with urllib.request.urlopen(self.url + "/v2/", timeout=1.0):
                    return
            except urllib.error.HTTPError:
                return  # 401 from an auth registry still means it is serving
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise FetchError(
            f"docker-registry on {self.host} did not answer within {timeout} s; see {self.log_path}"
        )

    def stop(self) -> None:
        """Terminate the process (kill it after 5 s) and remove a temporary root."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalRegistry:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def mark(self) -> int:
        """Return a position in the log; pass it to ``requests_since`` or ``bytes_sent_since``."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def settle(self, quiet: float = 0.05, timeout: float = 2.0) -> None:
        """Wait until the log has not grown for ``quiet`` seconds: lines are written as responses complete."""
        deadline = time.monotonic() + timeout
        size = self.mark()
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = self.mark()
            if now == size:
                return
            size = now

    def requests_since(self, mark: int = 0, *, settle: bool = True) -> list[LoggedRequest]:
        """Parse the requests logged after ``mark`` (waiting for the log to settle first)."""
        if settle:
            self.settle()
        with open(self.log_path, "rb") as log:
            log.seek(mark)
            text = log.read().decode(errors="replace")
        return [r for line in text.splitlines() if (r := _parse_line(line)) is not None]

    def bytes_sent_since(self, mark: int = 0, *, method: str | None = None) -> int:
        """Sum ``http.response.written`` over requests logged after ``mark`` (optionally one method)."""
        return sum(r.written for r in self.requests_since(mark) if method is None or r.method == method)


def _parse_line(line: str) -> LoggedRequest | None:
    if not _LINE.search(line):
        return None
    fields = {key: value.strip('"') for key, value in _FIELD.findall(line)}
    with contextlib.suppress(KeyError, ValueError):
        return LoggedRequest(
            method=fields["http.request.method"],
            uri=fields["http.request.uri"],
            status=int(fields["http.response.status"]),
            written=int(fields.get("http.response.written", "0")),
        )
    return None


@contextlib.contextmanager
def running_registry(auth: HtpasswdAuth | TokenAuth | None = None) -> Iterator[LocalRegistry]:
    """Run a throwaway registry for the duration of a ``with`` block."""
    registry = LocalRegistry(auth=auth)
    registry.start()
    try:
        yield registry
    finally:
        registry.stop()
