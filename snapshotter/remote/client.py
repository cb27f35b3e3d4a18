"""An OCI distribution client on httpx under trio: resolve images, read blob ranges, stream and push blobs.

``RegistryClient`` owns one ``httpx.AsyncClient`` (a bounded pool of HTTP/1.1 connections reused
across requests). Auth, retries and deadlines live in ``registry_http``; this module knows the
distribution API: manifests, indexes, platforms, blobs, ranges and uploads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import httpx
import trio

from index.errors import DigestMismatch, IntegrityError
from snapshotter.errors import RangeIgnored, RangeNotSupported, RegistryError, UnsupportedMediaType
from snapshotter.remote import media_types as mt
from snapshotter.remote.auth import Authenticator, default_docker_config_path, load_docker_config
from snapshotter.remote.image_manifest import (
    MAX_MANIFEST_SIZE,
    Descriptor,
    Platform,
    ResolvedImage,
    diff_ids_from_config,
    digest_of,
    manifest_media_type,
    parse_descriptor,
    parse_json_object,
    select_platform,
)
from snapshotter.remote.reference import Reference, parse_reference
from snapshotter.remote.request import RegistrySession, RetryPolicy, give_up

if TYPE_CHECKING:
    from snapshotter.config import Config

_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

# Takes the body of a 200 answered to a range read: the whole blob, from its first byte, checked
# against its digest (and size) as it is iterated.
WholeBody = Callable[[AsyncGenerator[bytes, None]], Awaitable[None]]


def _hasher(digest: str, context: str) -> Any:
    algorithm = digest.partition(":")[0]
    if algorithm not in ("sha256", "sha384", "sha512"):
        raise UnsupportedMediaType(
            f"{context}: digest algorithm {algorithm!r} is not supported (sha256/384/512 are)"
        )
    return hashlib.new(algorithm)


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[1 : host.find("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@dataclass
class _Span:
    """An open blob response positioned at the range's start; ``expected`` is how many bytes it owes (None: unknown)."""

    response: httpx.Response | None
    skip: int
    expected: int | None
    more_follows: bool = False  # a 200 body goes on past what we want (the registry ignored Range)


class _SchemeTransports(httpx.AsyncBaseTransport):
    """httpx's own transport, one pool per scheme; the TLS pool is made on the first https request.

    Its SSL context loads certifi's CA bundle (~20 ms), which a plain-HTTP registry never needs
    and which would otherwise be paid before a mount's first request.
    """

    def __init__(self, limits: httpx.Limits) -> None:
        self._limits = limits
        # Only http:// URLs reach this pool: it never speaks TLS, so it needs no CA bundle.
        self._plain = httpx.AsyncHTTPTransport(limits=limits, verify=False)
        self._tls: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme == "http":
            return await self._plain.handle_async_request(request)
        if self._tls is None:
            self._tls = httpx.AsyncHTTPTransport(limits=self._limits)
        return await self._tls.handle_async_request(request)

    async def aclose(self) -> None:
        await self._plain.aclose()
        if self._tls is not None:
            await self._tls.aclose()


def open_registry_client(config: Config) -> RegistryClient:
    """A client as ``config`` says: [registry] hosts and credentials, [fetch] timeouts, retries, pool; raises AuthError.

    AuthError: the credentials file is unreadable or malformed.

    ``"*"`` in ``registry.plain_http`` (what ``--plain-http`` sets) means plain HTTP to every host.
    """
    hosts = config.registry.plain_http
    return RegistryClient(
        plain_http="*" in hosts,
        plain_http_hosts=[host for host in hosts if host != "*"],
        docker_config_path=config.registry.credentials_file or None,
        timeout=config.fetch.timeout_seconds,
        connect_timeout=config.fetch.connect_timeout_seconds,
        max_connections=config.fetch.max_connections_per_host,
        retry_policy=RetryPolicy(max_retries=config.fetch.retries, base_delay=config.fetch.backoff_seconds),
    )


class RegistryClient:
    """An async OCI distribution client for trio; use as ``async with RegistryClient() as client``.

    Commands build it with ``open_registry_client(config)``; the constructor's own defaults are
    for tests and scripts, and follow the config's defaults.
    """

    def __init__(
        self,
        *,
        plain_http: bool = False,
        plain_http_hosts: Iterable[str] = (),
        docker_config_path: str | None = None,
        credentials: Mapping[str, tuple[str, str]] | None = None,
        timeout: float = 30.0,
        connect_timeout: float | None = None,
        max_retries: int = 5,
        max_connections: int = 16,
        transport: httpx.AsyncBaseTransport | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        self.plain_http = plain_http
        self.plain_http_hosts = frozenset(plain_http_hosts)
        config_path = docker_config_path or str(default_docker_config_path())
        merged = load_docker_config(config_path)
        merged.update(credentials or {})  # explicit credentials win over config.json
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(
            transport=transport or _SchemeTransports(limits),
            limits=limits,
            # A registry that does not accept a connection is down: fail fast rather than wait `timeout`.
            timeout=httpx.Timeout(timeout, connect=connect_timeout or timeout),
            # httpx drops Authorization when a redirect leaves the origin (e.g. a 307 to a CDN).
            follow_redirects=True,
            max_redirects=10,
            headers={"User-Agent": "lazysnap/0.1"},
        )
        policy = retry_policy or RetryPolicy(max_retries=max_retries)
        self._session = RegistrySession(
            self._http, Authenticator(self._http, merged, timeout), policy, timeout
        )
        # Blob body bytes received from the network (incl. bytes skipped when a registry ignored Range).
        self.bytes_fetched = 0
        # Registries seen answering a Range request with the whole blob (200). Each range read of
        # theirs would move the whole blob again (or what the kernel buffered of it), so their
        # reads raise RangeIgnored at once, without a request: the caller fetches the blob whole.
        self._range_ignored: set[str] = set()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._http.aclose()

    def scheme_for(self, host: str) -> str:
        """Return ``http`` for local hosts, listed hosts or with plain_http=True, else ``https``."""
        if self.plain_http or host in self.plain_http_hosts or _host_name(host) in _LOCAL_HOSTS:
            return "http"
        return "https"

    def _repo_url(self, ref: Reference) -> str:
        return f"{self.scheme_for(ref.registry)}://{ref.registry}/v2/{ref.repository}"

    def _blob_url(self, ref: Reference, digest: str) -> str:
        return f"{self._repo_url(ref)}/blobs/{digest}"

    # -- manifests -------------------------------------------------------------------------------

    async def fetch_manifest(self, ref: Reference, key: str | None = None) -> tuple[bytes, str, str]:
        """Fetch a manifest or index by tag or digest: (body, media type, digest); raises NotFound, DigestMismatch."""
        key = key or ref.manifest_key
        what = f"manifest {key}"
        url = f"{self._repo_url(ref)}/manifests/{key}"
        response = await self._session.request(
            ref, "GET", url, what=what, headers={"Accept": mt.MANIFEST_ACCEPT}
        )
        await self._session.check(ref, response, what)
        body = response.content
        if len(body) > MAX_MANIFEST_SIZE:
            raise RegistryError(
                f"image {ref}: {what} is {len(body)} bytes, over the {MAX_MANIFEST_SIZE} limit"
            )
        digest = digest_of(body)
        if key.startswith("sha") and ":" in key and digest != key:
            raise DigestMismatch(f"image {ref}: {what}", key, digest)
        return body, manifest_media_type(ref, response, body), digest

    async def resolve(self, ref: Reference | str, platform: Platform | None = None) -> ResolvedImage:
        """Resolve a reference to one platform's manifest, config and layers; raises RegistryError subclasses."""
        image = await self.resolve_manifest(ref, platform)
        return dataclasses.replace(image, diff_ids=await self.load_diff_ids(image))

    async def resolve_manifest(self, ref: Reference | str, platform: Platform | None = None) -> ResolvedImage:
        """Resolve a reference to one platform's manifest and layers, without fetching the config.

        The result's ``diff_ids`` is empty: ``load_diff_ids`` fetches them, for example while the
        layers are being opened. Raises RegistryError subclasses.
        """
        ref = parse_reference(ref) if isinstance(ref, str) else ref
        platform = platform or Platform()
        body, media_type, digest = await self.fetch_manifest(ref)
        if media_type in mt.INDEX_TYPES:
            chosen = select_platform(ref, parse_json_object(ref, body, "index"), platform)
            body, media_type, digest = await self.fetch_manifest(ref, chosen.digest)
        if media_type in mt.SCHEMA1_TYPES:
            raise UnsupportedMediaType(
                f"image {ref}: Docker schema 1 manifests are not supported; re-push the image with a current tool"
            )
        if media_type not in mt.MANIFEST_TYPES:
            raise UnsupportedMediaType(f"image {ref}: unsupported manifest media type {media_type!r}")
        manifest = parse_json_object(ref, body, "manifest")
        config = parse_descriptor(manifest.get("config"), f"image {ref}: config")
        if config.media_type not in mt.CONFIG_TYPES:
            raise UnsupportedMediaType(
                f"image {ref}: config media type {config.media_type!r} is not a container image config "
                "(an artifact, not a runnable image?)"
            )
        raw_layers = manifest.get("layers")
        if not isinstance(raw_layers, list):
            raise RegistryError(f"image {ref}: manifest {digest} has no layers list")
        layers = [parse_descriptor(layer, f"image {ref}: layer {i}") for i, layer in enumerate(raw_layers)]
        for i, layer in enumerate(layers):
            mt.layer_compression(layer.media_type, f"image {ref}: layer {i} ({layer.digest})")
        return ResolvedImage(ref, digest, media_type, config, layers, [])

    async def load_diff_ids(self, image: ResolvedImage) -> list[str]:
        """Fetch the image config and return its DiffIDs, one per layer; raises RegistryError subclasses."""
        ref = image.reference
        body = await self.fetch_blob(ref, image.config.digest, size=image.config.size, kind="config")
        config = parse_json_object(ref, body, "config")
        return diff_ids_from_config(ref, config, len(image.layers))

    # -- blobs -----------------------------------------------------------------------------------

    def ignores_range(self, ref: Reference) -> bool:
        """Whether ``ref``'s registry was seen answering a Range request with the whole blob."""
        return ref.registry in self._range_ignored

    async def read_range(
        self,
        ref: Reference,
        digest: str,
        offset: int,
        length: int,
        *,
        kind: str = "blob",
        size: int | None = None,
        on_whole: WholeBody | None = None,
    ) -> bytes:
        """Return blob bytes [offset, offset+length), clipped at the blob's end.

        Args:
            kind: names the blob in errors ("layer", "config").
            size: the blob's size, as its descriptor says; the whole body handed to ``on_whole``
                is checked against it.
            on_whole: when the registry answers with the whole blob, it is given that body (so
                the blob moves once) before RangeIgnored is raised; without it the body is dropped.

        Raises:
            RangeIgnored: the registry answers Range requests with the whole blob (now, or before:
                then no request is sent); fetch the blob whole with ``stream_blob`` instead.
            RangeNotSupported: the registry answered with another range.
            FetchError: the registry could not be read after its retries.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"read_range: negative offset {offset} or length {length}")
        if length == 0:
            return b""
        if self.ignores_range(ref):
            raise RangeIgnored(_range_ignored_message(ref, f"{kind} {digest}"))
        parts: list[bytes] = []
        what = f"{kind} {digest}"
        whole = _WholeAnswer(size, on_whole)
        span = self._span_chunks(ref, what, digest, offset, offset + length, 1 << 20, whole)
        async with aclosing(span) as chunks:
            async for chunk in chunks:
                parts.append(chunk)
        return b"".join(parts)

    async def stream_blob(
        self,
        ref: Reference,
        digest: str,
        *,
        chunk_size: int = 1 << 20,
        size: int | None = None,
        kind: str = "blob",
    ) -> AsyncGenerator[bytes, None]:
        """Yield a whole blob in chunks, checked against its digest and (when given) the size its descriptor says.

        ``kind`` names the blob in errors ("layer", "config").

        Raises:
            IntegrityError: the blob is longer than ``size`` (raised as soon as it is) or ends short of it.
            DigestMismatch: at the end, the blob does not hash to ``digest``.
            FetchError, RegistryError: the registry could not serve it.
        """
        what = f"{kind} {digest}"
        chunks = self._span_chunks(ref, what, digest, 0, None, chunk_size, None)
        async with aclosing(_verified(ref, what, digest, size, chunks)) as verified:
            async for chunk in verified:
                yield chunk

    async def fetch_blob(
        self, ref: Reference, digest: str, *, size: int | None = None, kind: str = "blob"
    ) -> bytes:
        """Return a whole (small) blob, verified against its digest and size; raises IntegrityError, FetchError."""
        parts: list[bytes] = []
        async with aclosing(self.stream_blob(ref, digest, size=size, kind=kind)) as chunks:
            async for chunk in chunks:
                parts.append(chunk)
        return b"".join(parts)

    async def blob_size(self, ref: Reference, digest: str) -> int:
        """Return a blob's size from a HEAD request; raises NotFound, FetchError."""
        what = f"blob {digest}"
        response = await self._session.request(ref, "HEAD", self._blob_url(ref, digest), what=what)
        await self._session.check(ref, response, what)
        length = response.headers.get("content-length")
        if length is None or not length.isdigit():
            raise RegistryError(f"image {ref}: registry {ref.registry} gave no Content-Length for {what}")
        return int(length)

    async def _span_chunks(
        self,
        ref: Reference,
        what: str,
        digest: str,
        start: int,
        end: int | None,
        chunk_size: int,
        whole: _WholeAnswer | None,
    ) -> AsyncGenerator[bytes, None]:
        # Yields blob bytes [start, end) and resumes from where it stopped when a body breaks off.
        # ``whole`` None: the caller wants the whole blob, so a 200 to a resuming Range request is
        # skipped into; for a range read it says what to do with a 200 before raising RangeIgnored.
        position = start
        failures = 0
        while True:
            error: BaseException | str
            try:
                async with self._open_span(ref, what, digest, position, end, whole) as span:
                    span_start = position
                    async with aclosing(self._span_body(span, chunk_size)) as body:
                        async for chunk in body:
                            position += len(chunk)
                            yield chunk
                    if span.expected is None or position - span_start >= span.expected:
                        return
                    error = f"body ended after {position - span_start} of {span.expected} bytes"
            except httpx.TransportError as exc:
                error = exc
            if failures >= self._session.policy.max_retries:
                raise give_up(ref, f"reading {what} at {position}", failures + 1, error) from (
                    error if isinstance(error, BaseException) else None
                )
            await trio.sleep(self._session.policy.backoff(failures))
            failures += 1

    async def _span_body(self, span: _Span, chunk_size: int) -> AsyncGenerator[bytes, None]:
        if span.response is None or span.expected == 0:
            return
        skip, remaining = span.skip, span.expected
        # aiter_raw: blobs are served as-is; a Content-Encoding must not make us decompress a layer.
        raw = _raw_body(span.response, chunk_size)
        async with aclosing(raw):
            async for chunk in raw:
                self.bytes_fetched += len(chunk)
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                if remaining is not None:
                    chunk = chunk[:remaining]
                    remaining -= len(chunk)
                if chunk:
                    yield chunk
                if remaining == 0:
                    await self._stop_reading(span, raw)
                    return

    async def _stop_reading(self, span: _Span, raw: AsyncGenerator[bytes, None]) -> None:
        # httpx's body iterators are nested async generators; abandoning them mid-way leaves them to
        # the garbage collector (and trio warns). So they always run to their end: a 206 body is
        # complete by now. For a 200 that ignored Range, shutting down the socket's read side ends the
        # body (after what the kernel already buffered) instead of downloading the rest of the blob;
        # h11 then reports a short body and the pool drops the connection, which can't be reused anyway.
        assert span.response is not None
        network_stream = span.response.extensions.get("network_stream")
        sock = network_stream.get_extra_info("socket") if network_stream is not None else None
        if span.more_follows and sock is not None:
            sock.shutdown(socket.SHUT_RD)
        try:
            async for chunk in raw:
                self.bytes_fetched += len(chunk)
        except httpx.TransportError:
            if not span.more_follows:
                raise

    @asynccontextmanager
    async def _open_span(
        self, ref: Reference, what: str, digest: str, start: int, end: int | None, whole: _WholeAnswer | None
    ) -> AsyncIterator[_Span]:
        headers = {}
        if start > 0 or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        async with self._session.stream(
            ref, "GET", self._blob_url(ref, digest), what=what, headers=headers
        ) as resp:
            if resp.status_code == 416:
                total = _content_range(resp.headers.get("content-range"))[2]
                if total is not None and start >= total:
                    yield _Span(None, 0, 0)  # asked past the end: nothing to return
                    return
                raise RangeNotSupported(f"image {ref}: {what}: registry refused range {headers.get('Range')}")
            await self._session.check(ref, resp, what)
            if resp.status_code == 200 and "Range" in headers and whole is not None:
                self._range_ignored.add(ref.registry)
                if whole.on_whole is not None:
                    # The body is the whole blob: whoever asked for it takes it, so it moves once.
                    body = self._span_body(_Span(resp, 0, None), 1 << 20)
                    await whole.on_whole(_verified(ref, what, digest, whole.size, body))
                # Else leaving the body unread closes the connection: what the kernel buffered
                # of it is all this costs, once per registry.
                raise RangeIgnored(_range_ignored_message(ref, what))
            yield _range_span(ref, what, resp, start, end)

    # -- uploads ---------------------------------------------------------------------------------

    async def push_blob(
        self,
        ref: Reference,
        data: bytes,
        *,
        chunked: bool = False,
        media_type: str = "application/octet-stream",
        chunk_size: int = 1 << 20,
    ) -> Descriptor:
        """Upload a blob (POST then PUT, or POST, PATCHes and PUT); raises AuthError, RegistryError, FetchError."""
        digest = digest_of(data)
        descriptor = Descriptor(media_type, digest, len(data), {})
        what = f"upload of blob {digest}"
        head = await self._session.request(ref, "HEAD", self._blob_url(ref, digest), what=what, push=True)
        if head.status_code == 200:
            return descriptor  # already there: uploads are content-addressed
        start = await self._session.request(
            ref, "POST", f"{self._repo_url(ref)}/blobs/uploads/", what=what, push=True
        )
        await self._session.check(ref, start, what)
        location = _location(ref, start, what)
        if chunked:
            for offset in range(0, len(data), chunk_size):
                piece = data[offset : offset + chunk_size]
                headers = {
                    "Content-Type": "application/octet-stream",
                    # distribution expects "first-last" without a unit here.
                    "Content-Range": f"{offset}-{offset + len(piece) - 1}",
                }
                patch = await self._session.request(
                    ref, "PATCH", location, what=what, headers=headers, content=piece, push=True
                )
                await self._session.check(ref, patch, what)
                location = _location(ref, patch, what)
            body = b""
        else:
            body = data
        url = str(httpx.URL(location).copy_merge_params({"digest": digest}))
        headers = {"Content-Type": "application/octet-stream"}
        done = await self._session.request(
            ref, "PUT", url, what=what, headers=headers, content=body, push=True
        )
        await self._session.check(ref, done, what)
        return descriptor

    async def push_manifest(
        self, ref: Reference, body: bytes, media_type: str, tag: str | None = None
    ) -> str:
        """Upload a manifest or index under ``tag`` (else ref's tag, else its digest); returns its digest."""
        digest = digest_of(body)
        key = tag or ref.tag or digest
        what = f"upload of manifest {key}"
        url = f"{self._repo_url(ref)}/manifests/{key}"
        headers = {"Content-Type": media_type}
        response = await self._session.request(
            ref, "PUT", url, what=what, headers=headers, content=body, push=True
        )
        await self._session.check(ref, response, what)
        return digest


@dataclass(frozen=True)
class _WholeAnswer:
    """What a range read does with a 200 (the whole blob): hand it to ``on_whole``, checked against ``size``."""

    size: int | None
    on_whole: WholeBody | None


async def _verified(
    ref: Reference, what: str, digest: str, size: int | None, chunks: AsyncGenerator[bytes, None]
) -> AsyncGenerator[bytes, None]:
    """Yield ``chunks`` (a whole blob); raise IntegrityError past ``size`` or short of it, DigestMismatch at the end."""
    hasher = _hasher(digest, f"image {ref}: {what}")
    total = 0
    async with aclosing(chunks):
        async for chunk in chunks:
            total += len(chunk)
            if size is not None and total > size:
                # A descriptor pins the size too: stop before moving more than it allows.
                raise _size_mismatch(ref, what, size, f"more than {size}")
            hasher.update(chunk)
            yield chunk
    if size is not None and total != size:
        raise _size_mismatch(ref, what, size, str(total))
    actual = f"{digest.partition(':')[0]}:{hasher.hexdigest()}"
    if actual != digest:
        raise DigestMismatch(f"image {ref}: {what}", digest, actual)


async def _preloaded(content: bytes, chunk_size: int) -> AsyncGenerator[bytes, None]:
    for start in range(0, len(content), chunk_size):
        yield content[start : start + chunk_size]


def _raw_body(response: httpx.Response, chunk_size: int) -> AsyncGenerator[bytes, None]:
    # A response built from bytes (a MockTransport handler, typically) arrives already read.
    if response.is_stream_consumed:
        return _preloaded(response.content, chunk_size)
    return cast(AsyncGenerator[bytes, None], response.aiter_raw(chunk_size))


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    # "bytes FIRST-LAST/TOTAL" or "bytes */TOTAL"; TOTAL may be "*".
    if not value or not value.startswith("bytes "):
        return None, None, None
    span, _, total = value[6:].partition("/")
    first = last = None
    if span != "*":
        a, _, b = span.partition("-")
        first, last = (int(a), int(b)) if a.isdigit() and b.isdigit() else (None, None)
    return first, last, int(total) if total.isdigit() else None


def _range_span(ref: Reference, what: str, response: httpx.Response, start: int, end: int | None) -> _Span:
    if response.status_code == 206:
        if response.headers.get("content-type", "").startswith("multipart/"):
            raise RangeNotSupported(f"image {ref}: {what}: registry answered one range with a multipart body")
        first, last, _total = _content_range(response.headers.get("content-range"))
        if first is None or last is None or first != start:
            raise RangeNotSupported(
                f"image {ref}: {what}: asked for bytes from {start}, registry sent "
                f"{response.headers.get('content-range')!r}"
            )
        served = last + 1 - first
        return _Span(response, 0, served if end is None else min(served, end - start))
    # 200: the registry ignored Range (or none was sent): skip to start, stop at end.
    length = response.headers.get("content-length")
    total = int(length) if length is not None and length.isdigit() else None
    stop: int | None = end if total is None else (total if end is None else min(end, total))
    expected = None if stop is None else max(0, stop - start)
    return _Span(response, start, expected, more_follows=total is None or (stop is not None and stop < total))


def _range_ignored_message(ref: Reference, what: str) -> str:
    return (
        f"image {ref}: {what}: registry {ref.registry} ignores Range requests (answers 200 with the "
        "whole blob); fetch the blob whole"
    )


def _size_mismatch(ref: Reference, what: str, size: int, sent: str) -> IntegrityError:
    return IntegrityError(
        f"image {ref}: {what}: its descriptor's size is {size} bytes but the registry sent {sent} bytes"
    )


def _location(ref: Reference, response: httpx.Response, what: str) -> str:
    location = response.headers.get("location")
    if not location:
        raise RegistryError(f"image {ref}: {what}: registry sent no upload Location")
    return str(response.request.url.join(location))  # Location may be relative


# The image types live in image_manifest; they are re-exported here, where callers met them first.
__all__ = [
    "MAX_MANIFEST_SIZE",
    "Descriptor",
    "Platform",
    "RegistryClient",
    "ResolvedImage",
    "RetryPolicy",
    "digest_of",
    "parse_descriptor",
    "select_platform",
]
