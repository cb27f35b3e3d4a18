"""An in-memory registry behind ``httpx.MockTransport``, for faults a real registry won't produce on demand.

It serves ``/v2/NAME/manifests/KEY`` and ``/v2/NAME/blobs/DIGEST`` (GET with ``Range``, HEAD) for
any repository name. Switches and hooks inject faults:

- ``ignore_range``: answer a Range request with 200 and the whole blob (counted in ``chunks_sent``);
- ``hook``: an async function called first for every request; return a Response to answer with
  it (a 503, a 307, a short body...), raise an httpx error to simulate a broken connection, or
  return None to fall through to normal serving;
- ``hosts``: handlers for other hosts (a CDN that a 307 points to).

Every request is recorded in ``requests``. Use ``client(**kw)`` for a RegistryClient wired to it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from snapshotter.remote.client import RegistryClient
from snapshotter.remote.reference import Reference

Hook = Callable[[httpx.Request], Awaitable[httpx.Response | None]]
_PATH = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<key>[^/]+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def sha256(data: bytes) -> str:
    """The ``sha256:`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class FakeRegistry:
    """A fake registry at ``host``; see the module docstring for its switches."""

    host: str = "registry.test"
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    hosts: dict[str, Callable[[httpx.Request], Awaitable[httpx.Response]]] = field(default_factory=dict)
    hook: Hook | None = None
    ignore_range: bool = False
    chunk_size: int = 4096
    chunks_sent: int = 0

    def ref(self, name: str = "app", tag: str | None = "latest") -> Reference:
        """A reference to repository ``name`` on this registry."""
        return Reference(self.host, name, tag, None)

    def add_blob(self, data: bytes, digest: str | None = None) -> str:
        """Store a blob (under a wrong ``digest`` if given, to test verification); returns its digest."""
        key = digest or sha256(data)
        self.blobs[key] = data
        return key

    def add_manifest(self, body: bytes, media_type: str, tag: str | None = None) -> str:
        """Store a manifest under its digest (and ``tag``); returns its digest."""
        digest = sha256(body)
        self.manifests[digest] = (body, media_type)
        if tag is not None:
            self.manifests[tag] = (body, media_type)
        return digest

    def transport(self) -> httpx.MockTransport:
        """The transport to give RegistryClient."""
        return httpx.MockTransport(self.handle)

    def client(self, **kw: object) -> RegistryClient:
        """A RegistryClient talking to this fake (plain HTTP to its host, no config.json)."""
        options: dict[str, object] = {"plain_http": True, "docker_config_path": "/nonexistent/config.json"}
        options.update(kw)
        return RegistryClient(transport=self.transport(), **options)  # type: ignore[arg-type]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        """Serve one request (the MockTransport handler)."""
        self.requests.append(request)
        if self.hook is not None:
            answer = await self.hook(request)
            if answer is not None:
                return answer
        if request.url.host in self.hosts:
            return await self.hosts[request.url.host](request)
        match = _PATH.match(request.url.path)
        if match is None:
            return httpx.Response(404)
        if match["kind"] == "manifests":
            return self._manifest(match["key"])
        return self._blob(request, match["key"])

    def _manifest(self, key: str) -> httpx.Response:
        if key not in self.manifests:
            return httpx.Response(
                404, json={"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}
            )
        body, media_type = self.manifests[key]
        return httpx.Response(200, content=body, headers={"Content-Type": media_type})

    def _blob(self, request: httpx.Request, digest: str) -> httpx.Response:
        data = self.blobs.get(digest)
        if data is None:
            return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown"}]})
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Content-Length": str(len(data)), "Accept-Ranges": "bytes"})
        return serve_bytes(self, request, data)


def serve_bytes(fake: FakeRegistry, request: httpx.Request, data: bytes) -> httpx.Response:
    """Answer a GET for ``data`` honouring a single ``Range`` (unless ``fake.ignore_range``), streamed in chunks."""
    wanted = _RANGE.match(request.headers.get("range", ""))
    if wanted is None or fake.ignore_range:
        return httpx.Response(200, headers={"Content-Length": str(len(data))}, content=_chunks(fake, data))
    first = int(wanted[1])
    last = min(int(wanted[2]) if wanted[2] else len(data) - 1, len(data) - 1)
    if first >= len(data):
        return httpx.Response(416, headers={"Content-Range": f"bytes */{len(data)}"})
    body = data[first : last + 1]
    headers = {"Content-Range": f"bytes {first}-{last}/{len(data)}", "Content-Length": str(len(body))}
    return httpx.Response(206, headers=headers, content=_chunks(fake, body))


async def _chunks(fake: FakeRegistry, data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), fake.chunk_size):
        fake.chunks_sent += 1
        yield data[start : start + fake.chunk_size]
