"""One registry request, done properly: auth, retries with backoff, deadlines, and errors that name the image.

``RegistrySession`` sits between ``RegistryClient`` (what to ask) and httpx (how to send it). A
request is retried on connection errors, timeouts, 5xx and 429 (honouring ``Retry-After``), at
most ``max_retries`` times with exponential backoff and jitter; a 401 is answered once through
the ``Authenticator``. Any other status is returned for the caller to judge with ``check``.
"""

from __future__ import annotations

import datetime
import email.utils
import random
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import cast

import httpx
import trio

from snapshotter.errors import AuthError, FetchError, FetchTimeout, NotFound, RegistryError, TruncatedResponse
from snapshotter.remote.auth import Authenticator, refused_message, repository_scope
from snapshotter.remote.reference import Reference

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_ERROR_BODY_LIMIT = 4096


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry; delays are in seconds of trio's clock."""

    max_retries: int = 5  # attempts after the first; 5 spans about 6 s of backoff in total
    base_delay: float = 0.2  # first backoff; doubles each retry
    max_delay: float = 10.0  # cap of one backoff step
    max_retry_after: float = 60.0  # cap on a server's Retry-After, so a bad header cannot stall a pull

    def backoff(self, attempt: int) -> float:
        """Return the delay before retry number ``attempt`` (0-based): exponential, with jitter in [d/2, d]."""
        delay = min(self.max_delay, self.base_delay * (2**attempt))
        # Jitter spreads the retries of many concurrent readers hit by the same outage.
        return random.uniform(delay / 2, delay)

    def delay_for(self, response: httpx.Response, attempt: int) -> float:
        """Return how long to wait before retrying after ``response``: its Retry-After, else the backoff."""
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if retry_after is None:
            return self.backoff(attempt)
        return min(retry_after, self.max_retry_after)


def parse_retry_after(value: str | None) -> float | None:
    """Parse ``Retry-After`` (seconds or an HTTP date) into seconds from now; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


def is_timeout(error: BaseException) -> bool:
    """True for the errors that mean "ran over a deadline"."""
    return isinstance(error, httpx.TimeoutException | trio.TooSlowError)


def give_up(ref: Reference, what: str, attempts: int, error: BaseException | str) -> FetchError:
    """Return the FetchError to raise after the last attempt at ``what`` (FetchTimeout, TruncatedResponse if apt)."""
    reason = error if isinstance(error, str) else (str(error) or type(error).__name__)
    cls: type[FetchError] = FetchError
    if isinstance(error, BaseException) and is_timeout(error):
        cls = FetchTimeout
    elif isinstance(error, httpx.RemoteProtocolError) or (
        isinstance(error, str) and error.startswith("body ended")
    ):
        cls = TruncatedResponse  # the connection or body broke off before the announced length
    return cls(
        f"image {ref}: {what} failed after {attempts} attempt(s): {reason}; "
        f"check that registry {ref.registry} is up and reachable, then retry"
    )


class RegistrySession:
    """Sends requests for a RegistryClient with auth, retries and per-request deadlines."""

    def __init__(
        self, http: httpx.AsyncClient, auth: Authenticator, policy: RetryPolicy, timeout: float
    ) -> None:
        self.http = http
        self.auth = auth
        self.policy = policy
        self.timeout = timeout

    async def request(
        self,
        ref: Reference,
        method: str,
        url: str,
        *,
        what: str,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        push: bool = False,
    ) -> httpx.Response:
        """Send a request and read its whole body; raises FetchError/FetchTimeout after the retries, AuthError."""
        response = await self._send(
            ref, method, url, what=what, headers=headers, content=content, push=push, read=True
        )
        return response

    @asynccontextmanager
    async def stream(
        self, ref: Reference, method: str, url: str, *, what: str, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[httpx.Response]:
        """Open a request whose body the caller streams; the response is closed on exit."""
        response = await self._send(
            ref, method, url, what=what, headers=headers, content=None, push=False, read=False
        )
        try:
            yield response
        finally:
            await response.aclose()

    async def _send(
        self,
        ref: Reference,
        method: str,
        url: str,
        *,
        what: str,
        headers: Mapping[str, str] | None,
        content: bytes | None,
        push: bool,
        read: bool,
    ) -> httpx.Response:
        scope = repository_scope(ref, push)
        authorization = await self.auth.header(ref, scope)
        answered_challenge = False
        attempt = 0
        while True:
            request_headers = dict(headers or {})
            if authorization is not None:
                request_headers["Authorization"] = authorization
            request = self.http.build_request(method, url, headers=request_headers, content=content)
            try:
                response = await self._send_once(request, read)
            except (httpx.TransportError, trio.TooSlowError) as error:
                if attempt >= self.policy.max_retries:
                    raise give_up(ref, what, attempt + 1, error) from error
                await trio.sleep(self.policy.backoff(attempt))
                attempt += 1
                continue
            if response.status_code == 401:
                await response.aclose()
                if answered_challenge:
                    had = self.auth.credentials_for(ref.registry) is not None
                    raise AuthError(refused_message(ref, ref.registry, had))
                authorization = await self.auth.on_unauthorized(ref, scope, response, authorization)
                answered_challenge = True
                continue
            if response.status_code in RETRYABLE_STATUS:
                await response.aclose()
                if attempt >= self.policy.max_retries:
                    raise give_up(ref, what, attempt + 1, f"registry answered {response.status_code}")
                await trio.sleep(self.policy.delay_for(response, attempt))
                attempt += 1
                continue
            return response

    async def _send_once(self, request: httpx.Request, read: bool) -> httpx.Response:
        # The deadline covers connecting and the headers (and the body when we buffer it); a streamed
        # body is guarded by httpx's read timeout instead, since a whole blob may take minutes.
        with trio.fail_after(self.timeout):
            response = await self.http.send(request, stream=True)
            if read:
                try:
                    await response.aread()
                finally:
                    await response.aclose()
        return response

    async def check(self, ref: Reference, response: httpx.Response, what: str) -> None:
        """Raise the error a non-2xx ``response`` means (NotFound, AuthError, RegistryError); else return."""
        status = response.status_code
        if 200 <= status < 300:
            return
        detail = await _error_detail(response)
        if status == 404:
            raise NotFound(
                f"image {ref}: {what} not found on registry {ref.registry}{detail}; check the name, tag or digest"
            )
        if status in (401, 403):
            had = self.auth.credentials_for(ref.registry) is not None
            raise AuthError(refused_message(ref, ref.registry, had) + detail)
        raise RegistryError(f"image {ref}: {what}: registry {ref.registry} answered {status}{detail}")


async def _error_detail(response: httpx.Response) -> str:
    # Registries explain errors in a JSON body {"errors": [{"code", "message"}]}: pass it on.
    try:
        if not response.is_stream_consumed:
            body = b""
            raw = cast(AsyncGenerator[bytes, None], response.aiter_raw())
            async with aclosing(raw):
                async for chunk in raw:
                    body += chunk
                    if len(body) > _ERROR_BODY_LIMIT:
                        break
        else:
            body = response.content
        errors = httpx.Response(200, content=body[:_ERROR_BODY_LIMIT]).json().get("errors", [])
        parts = [
            f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors if isinstance(e, dict)
        ]
    except (ValueError, AttributeError, httpx.HTTPError):
        return ""
    return f" ({'; '.join(parts)})" if parts else ""
