"""RegistryClient under faults a real registry won't produce on demand (httpx.MockTransport + trio's MockClock)."""

from __future__ import annotations

import json
import random
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from index.errors import DigestMismatch, IntegrityError
from snapshotter.errors import (
    FetchError,
    FetchTimeout,
    RangeIgnored,
    RangeNotSupported,
    TruncatedResponse,
    UnsupportedMediaType,
)
from snapshotter.remote import media_types as mt
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.reference import Reference
from snapshotter.remote.request import RetryPolicy, parse_retry_after
from tests.support.fake_registry import FakeRegistry, serve_bytes, sha256

BLOB = random.Random(3).randbytes(200_000)


@pytest.fixture
def fake() -> FakeRegistry:
    """A fake registry holding BLOB."""
    registry = FakeRegistry()
    registry.add_blob(BLOB)
    return registry


def failing(times: int, answer: Any) -> Any:
    """A hook that answers ``answer`` (a Response factory or an exception) to the first ``times`` requests."""
    count = {"n": 0}

    async def hook(request: httpx.Request) -> httpx.Response | None:
        if count["n"] >= times:
            return None
        count["n"] += 1
        if isinstance(answer, BaseException):
            raise answer
        response: httpx.Response = answer() if callable(answer) else answer
        return response

    return hook


class TestRegistryIgnoresRange:
    async def test_200_to_range_raises_range_ignored(self, fake: FakeRegistry) -> None:
        """A 200 with the whole blob to a Range request raises RangeIgnored naming the registry, and the client remembers it."""
        fake.ignore_range = True
        async with fake.client() as client:
            with pytest.raises(RangeIgnored, match=r"registry registry\.test ignores Range"):
                await client.read_range(fake.ref(), sha256(BLOB), 50_000, 10_000)
            assert client.ignores_range(fake.ref())

    async def test_a_known_range_ignoring_registry_gets_no_more_range_requests(
        self, fake: FakeRegistry
    ) -> None:
        """Once a registry was seen ignoring Range, range reads of any of its blobs raise RangeIgnored without a request."""
        fake.ignore_range = True
        other = fake.add_blob(b"another blob" * 1000)
        async with fake.client() as client:
            with pytest.raises(RangeIgnored):
                await client.read_range(fake.ref(), sha256(BLOB), 0, 10)
            sent = len(fake.requests)
            for digest in (sha256(BLOB), other):
                with pytest.raises(RangeIgnored):
                    await client.read_range(fake.ref(), digest, 100, 10)
            assert len(fake.requests) == sent

    async def test_a_whole_blob_stream_still_works_where_range_is_ignored(self, fake: FakeRegistry) -> None:
        """stream_blob of a registry that ignores Range yields the whole blob."""
        fake.ignore_range = True
        async with fake.client() as client:
            with pytest.raises(RangeIgnored):
                await client.read_range(fake.ref(), sha256(BLOB), 1, 10)
            assert await client.fetch_blob(fake.ref(), sha256(BLOB), size=len(BLOB)) == BLOB

    async def test_200_real_socket_detection_costs_little(self) -> None:
        """Over a real socket, detecting a server that ignores Range moves a small part of the blob, not all of it."""
        blob = random.Random(5).randbytes(64 << 20)
        with _range_ignoring_server(blob) as (host, sent):
            ref = Reference(host, "app", "latest", None)
            async with RegistryClient(docker_config_path="/nonexistent/config.json") as client:
                with pytest.raises(RangeIgnored):
                    await client.read_range(ref, sha256(blob), 1000, 4096)
            await trio.sleep(0.2)
        assert sum(sent) < len(blob) // 4, f"server wrote {sum(sent)} of {len(blob)} bytes"


class TestBlobSize:
    @pytest.mark.parametrize("delta", [-1, 1])
    async def test_a_blob_of_another_size_than_its_descriptor_is_refused(
        self, fake: FakeRegistry, delta: int
    ) -> None:
        """A blob whose length differs from the size its descriptor says raises IntegrityError naming both sizes."""
        async with fake.client() as client:
            with pytest.raises(IntegrityError, match=rf"size is {len(BLOB) + delta} bytes.*sent"):
                await client.fetch_blob(fake.ref(), sha256(BLOB), size=len(BLOB) + delta, kind="layer")

    async def test_wrong_content_range(self, fake: FakeRegistry) -> None:
        """A 206 for another range than asked raises RangeNotSupported naming the image."""

        async def hook(request: httpx.Request) -> httpx.Response:
            return httpx.Response(206, headers={"Content-Range": f"bytes 0-9/{len(BLOB)}"}, content=BLOB[:10])

        fake.hook = hook
        async with fake.client() as client:
            with pytest.raises(RangeNotSupported, match=r"registry\.test/app"):
                await client.read_range(fake.ref(), sha256(BLOB), 100, 10)


class TestRedirects:
    async def test_cross_host_redirect_drops_authorization(self, fake: FakeRegistry) -> None:
        """A 307 to another host is followed with the Range but without our Authorization header."""
        cdn_requests: list[httpx.Request] = []

        async def cdn(request: httpx.Request) -> httpx.Response:
            cdn_requests.append(request)
            return serve_bytes(fake, request, BLOB)

        async def auth_then_redirect(request: httpx.Request) -> httpx.Response | None:
            if request.url.host != fake.host or "/blobs/" not in request.url.path:
                return None
            if "authorization" not in request.headers:
                return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="test"'})
            return httpx.Response(307, headers={"Location": "https://cdn.test/blob?sig=abc"})

        fake.hosts["cdn.test"] = cdn
        fake.hook = auth_then_redirect
        async with fake.client(credentials={fake.host: ("user", "pw")}) as client:
            data = await client.read_range(fake.ref(), sha256(BLOB), 10, 20)
        assert data == BLOB[10:30]
        assert len(cdn_requests) == 1
        assert "authorization" not in cdn_requests[0].headers
        assert cdn_requests[0].headers["range"] == "bytes=10-29"
        registry_requests = [r for r in fake.requests if r.url.host == fake.host]
        assert registry_requests[-1].headers["authorization"].startswith("Basic ")

    async def test_same_host_redirect(self, fake: FakeRegistry) -> None:
        """A redirect on the same host is followed and the whole blob still verifies."""

        async def hook(request: httpx.Request) -> httpx.Response | None:
            if request.url.path.startswith("/v2/app/blobs/"):
                return httpx.Response(302, headers={"Location": f"/v2/mirror/blobs/{sha256(BLOB)}"})
            return None

        fake.hook = hook
        async with fake.client() as client:
            assert await client.fetch_blob(fake.ref(), sha256(BLOB)) == BLOB


class TestRetries:
    async def test_503_then_success(self, fake: FakeRegistry, autojump_clock: trio.testing.MockClock) -> None:
        """Two 503s, then the range: the read succeeds after backing off."""
        fake.hook = failing(2, lambda: httpx.Response(503))
        async with fake.client() as client:
            start = trio.current_time()
            assert await client.read_range(fake.ref(), sha256(BLOB), 0, 100) == BLOB[:100]
        assert len(fake.requests) == 3
        assert (
            trio.current_time() - start >= 0.1 + 0.2
        )  # jittered backoff is at least half of 0.2 s, then 0.4 s

    @pytest.mark.parametrize("status", [429, 503])
    async def test_retry_after_is_honoured(
        self, fake: FakeRegistry, autojump_clock: trio.testing.MockClock, status: int
    ) -> None:
        """A 429 or 503 with Retry-After: 7 makes the client wait 7 s (mock clock) before retrying."""
        fake.hook = failing(1, lambda: httpx.Response(status, headers={"Retry-After": "7"}))
        async with fake.client() as client:
            start = trio.current_time()
            await client.read_range(fake.ref(), sha256(BLOB), 0, 10)
            assert 7 <= trio.current_time() - start < 8

    async def test_gives_up_after_max_retries(
        self, fake: FakeRegistry, autojump_clock: trio.testing.MockClock
    ) -> None:
        """A registry that always answers 503 gets 1 + max_retries requests, then FetchError naming the image."""
        fake.hook = failing(100, lambda: httpx.Response(503))
        async with fake.client(max_retries=3) as client:
            with pytest.raises(FetchError, match=r"registry\.test/app:latest.*4 attempt.*503"):
                await client.read_range(fake.ref(), sha256(BLOB), 0, 10)
        assert len(fake.requests) == 4

    async def test_connection_errors_are_retried(
        self, fake: FakeRegistry, autojump_clock: trio.testing.MockClock
    ) -> None:
        """Refused connections are retried like 5xx."""
        fake.hook = failing(2, httpx.ConnectError("connection refused"))
        async with fake.client() as client:
            assert await client.fetch_blob(fake.ref(), sha256(BLOB)) == BLOB

    async def test_timeout(self, fake: FakeRegistry, autojump_clock: trio.testing.MockClock) -> None:
        """A registry that never answers gives FetchTimeout after the per-request deadline and the retries."""

        async def hang(request: httpx.Request) -> httpx.Response:
            await trio.sleep(3600)
            raise AssertionError("unreachable")

        fake.hook = hang
        async with fake.client(timeout=5, max_retries=2) as client:
            start = trio.current_time()
            with pytest.raises(FetchTimeout, match=r"registry\.test/app"):
                await client.blob_size(fake.ref(), sha256(BLOB))
            assert 15 <= trio.current_time() - start < 30


class TestTruncation:
    def _short_once(self, fake: FakeRegistry, times: int) -> None:
        async def hook(request: httpx.Request) -> httpx.Response | None:
            if hook.count >= times:  # type: ignore[attr-defined]
                return None
            hook.count += 1  # type: ignore[attr-defined]
            full = serve_bytes(fake, request, BLOB)
            body = b"".join([chunk async for chunk in full.aiter_raw()])
            # Announce the full length, deliver half: what a dropped connection looks like.
            return httpx.Response(
                full.status_code, headers=dict(full.headers), content=_once(body[: len(body) // 2])
            )

        hook.count = 0  # type: ignore[attr-defined]
        fake.hook = hook

    async def test_truncated_body_resumes(
        self, fake: FakeRegistry, autojump_clock: trio.testing.MockClock
    ) -> None:
        """A body cut short is resumed from where it stopped (a Range for the rest), and the bytes are right."""
        self._short_once(fake, 1)
        async with fake.client() as client:
            data = await client.read_range(fake.ref(), sha256(BLOB), 1000, 50_000)
            whole = await client.fetch_blob(fake.ref(), sha256(BLOB))
        assert data == BLOB[1000:51_000]
        assert whole == BLOB
        assert fake.requests[1].headers["range"] == "bytes=26000-50999"

    async def test_always_truncated(self, fake: FakeRegistry, autojump_clock: trio.testing.MockClock) -> None:
        """A body that is always cut short raises TruncatedResponse after the retries."""
        self._short_once(fake, 1000)
        async with fake.client(max_retries=2) as client:
            with pytest.raises(TruncatedResponse, match=r"registry\.test/app"):
                await client.read_range(fake.ref(), sha256(BLOB), 0, 100_000)


class TestIntegrity:
    async def test_blob_digest_mismatch(self, fake: FakeRegistry) -> None:
        """A blob whose bytes don't hash to its digest raises DigestMismatch (stream and fetch)."""
        wrong = sha256(b"something else")
        fake.add_blob(BLOB, digest=wrong)
        async with fake.client() as client:
            with pytest.raises(DigestMismatch, match=r"registry\.test/app"):
                await client.fetch_blob(fake.ref(), wrong)
            with pytest.raises(DigestMismatch):
                async for _ in client.stream_blob(fake.ref(), wrong):
                    pass

    async def test_manifest_digest_mismatch(self, fake: FakeRegistry) -> None:
        """A manifest fetched by digest that hashes to another digest raises DigestMismatch."""
        body = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST}).encode()
        wrong = sha256(b"other manifest")
        fake.manifests[wrong] = (body, mt.OCI_MANIFEST)
        async with fake.client() as client:
            with pytest.raises(DigestMismatch):
                await client.resolve(Reference(fake.host, "app", None, wrong))


class TestMediaTypes:
    @pytest.mark.parametrize(
        "media_type",
        [mt.DOCKER_MANIFEST_V1_SIGNED, "application/vnd.example.thing+json"],
        ids=["schema1", "unknown"],
    )
    async def test_unsupported_manifest(self, fake: FakeRegistry, media_type: str) -> None:
        """A manifest of a type lazysnap can't use raises UnsupportedMediaType naming the image."""
        fake.add_manifest(
            json.dumps({"schemaVersion": 1, "mediaType": media_type}).encode(), media_type, tag="latest"
        )
        async with fake.client() as client:
            with pytest.raises(UnsupportedMediaType, match=r"registry\.test/app"):
                await client.resolve(fake.ref())

    def test_layer_compression(self) -> None:
        """Every layer type maps to its compression; others raise UnsupportedMediaType."""
        assert mt.layer_compression(mt.OCI_LAYER) == "tar"
        assert mt.layer_compression(mt.DOCKER_FOREIGN_LAYER_GZIP) == "gzip"
        assert mt.layer_compression(mt.OCI_LAYER_NONDIST_ZSTD) == "zstd"
        with pytest.raises(UnsupportedMediaType, match="squashfs"):
            mt.layer_compression("application/vnd.example.squashfs")


class TestPlainHttp:
    @pytest.mark.parametrize(
        ("host", "kw", "scheme"),
        [
            ("127.0.0.1:5000", {}, "http"),
            ("localhost", {}, "http"),
            ("[::1]:5000", {}, "http"),
            ("registry.example:5000", {}, "https"),
            ("registry.example:5000", {"plain_http_hosts": ["registry.example:5000"]}, "http"),
            ("registry.example", {"plain_http": True}, "http"),
        ],
    )
    async def test_scheme(self, host: str, kw: dict[str, Any], scheme: str) -> None:
        """Local hosts, listed hosts and plain_http=True use http; everything else https."""
        async with RegistryClient(docker_config_path="/nonexistent/config.json", **kw) as client:
            assert client.scheme_for(host) == scheme


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


class _IgnoreRangeHandler(BaseHTTPRequestHandler):
    blob: bytes = b""
    sent: list[int] = []
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.blob)))
        self.end_headers()
        index = len(self.sent)
        self.sent.append(0)
        try:
            for start in range(0, len(self.blob), 65536):
                self.wfile.write(self.blob[start : start + 65536])
                self.sent[index] += 65536
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def _range_ignoring_server(blob: bytes) -> Iterator[tuple[str, list[int]]]:
    """A real HTTP server on 127.0.0.1 that answers every GET with 200 and the whole blob."""
    sent: list[int] = []
    handler = type("Handler", (_IgnoreRangeHandler,), {"blob": blob, "sent": sent})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", sent
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class TestRangeProperty:
    @given(
        offset=st.integers(0, len(BLOB) + 10),
        length=st.integers(0, 70_000),
        ignore_range=st.booleans(),
        chunk_size=st.sampled_from([1, 1000, 4096, 65536]),
    )
    @settings(max_examples=60, deadline=None)
    async def test_any_range_equals_the_slice(
        self, offset: int, length: int, ignore_range: bool, chunk_size: int
    ) -> None:
        """Any (offset, length) reads exactly BLOB[offset:offset+length], or raises RangeIgnored when the registry ignores Range."""
        fake = FakeRegistry(ignore_range=ignore_range, chunk_size=chunk_size)
        fake.add_blob(BLOB)
        async with fake.client() as client:
            try:
                data = await client.read_range(fake.ref(), sha256(BLOB), offset, length)
            except RangeIgnored:
                assert ignore_range
                return
            assert data == BLOB[offset : offset + length]


class TestRetryAfter:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [("7", 7.0), ("0", 0.0), (None, None), ("soon", None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)],
    )
    def test_parse(self, value: str | None, expected: float | None) -> None:
        """Retry-After in seconds or as a (past) HTTP date; junk is ignored."""
        assert parse_retry_after(value) == expected

    def test_cap(self) -> None:
        """A huge Retry-After is capped so a bad header cannot stall a pull."""
        policy = RetryPolicy(max_retry_after=30)
        assert policy.delay_for(httpx.Response(503, headers={"Retry-After": "86400"}), 0) == 30
