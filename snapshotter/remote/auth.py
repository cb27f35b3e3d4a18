"""Registry authentication: anonymous, basic, and Bearer tokens from the ``WWW-Authenticate`` challenge.

Credentials come from the caller (``credentials={"host": (user, password)}``) or from a docker
``config.json`` (``auths`` entries with a base64 ``auth`` or ``username``/``password``). Tokens are
cached per (registry, scope) until they expire; a 401 with a cached token drops it and asks again.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from snapshotter.errors import AuthError, FetchError, RegistryError
from snapshotter.remote.reference import DOCKER_HUB, Reference

# Docker Hub's config.json key is historically "https://index.docker.io/v1/".
_HUB_KEYS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"})
_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')
# Tokens without expires_in live 60 s per the distribution token spec; renew a little early.
_DEFAULT_TOKEN_LIFETIME = 60.0
_EXPIRY_MARGIN = 5.0


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: ``scheme`` (lowercase) and its parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value such as ``Bearer realm="...",service="...",scope="..."``."""
    challenges: list[Challenge] = []
    rest = header
    while rest := rest.lstrip(" \t,"):
        scheme_match = re.match(r"([A-Za-z][A-Za-z0-9_-]*)\s*", rest)
        if scheme_match is None:
            break
        rest = rest[scheme_match.end() :]
        params: dict[str, str] = {}
        while True:
            param = _PARAM.match(rest)
            # A token followed by something other than "=" starts the next challenge.
            if param is None:
                break
            quoted, bare = param.group(2), param.group(3)
            params[param.group(1).lower()] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
            rest = rest[param.end() :]
        challenges.append(Challenge(scheme_match.group(1).lower(), params))
    return challenges


def normalize_registry_host(key: str) -> str:
    """Turn a config.json ``auths`` key (``https://host:port/v1/``, ``host``) into the host of a Reference."""
    host = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", key.strip()).split("/", 1)[0]
    return DOCKER_HUB if host.lower() in _HUB_KEYS else host


def default_docker_config_path() -> Path:
    """Return ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``."""
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return Path(base) / "config.json"


def load_docker_config(path: str | os.PathLike[str]) -> dict[str, tuple[str, str]]:
    """Read ``auths`` from a docker config.json as {host: (user, password)}; raises AuthError if malformed."""
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise AuthError(f"cannot read docker config {path}: {error}; fix or remove the file") from error
    auths = document.get("auths", {}) if isinstance(document, dict) else {}
    if not isinstance(auths, dict):
        raise AuthError(f"docker config {path}: 'auths' is not an object; fix the file")
    result: dict[str, tuple[str, str]] = {}
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            continue
        credentials = _entry_credentials(entry, key, path)
        if credentials is not None:
            result[normalize_registry_host(key)] = credentials
    return result


def _entry_credentials(
    entry: dict[str, object], key: str, path: str | os.PathLike[str]
) -> tuple[str, str] | None:
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError) as error:
            raise AuthError(f"docker config {path}: auth of {key!r} is not base64 'user:password'") from error
        if not sep:
            raise AuthError(
                f"docker config {path}: auth of {key!r} decodes without a ':' between user and password"
            )
        return user, password
    name, secret = entry.get("username"), entry.get("password")
    if isinstance(name, str) and isinstance(secret, str) and name:
        return name, secret
    return None  # identitytoken and credential helpers are not supported yet: anonymous it is


def basic_header(user: str, password: str) -> str:
    """Return the ``Authorization`` value for HTTP basic auth."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def repository_scope(ref: Reference, push: bool = False) -> str:
    """Return the token scope for pulling (or pushing to) ``ref``'s repository."""
    return f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"


@dataclass
class _Token:
    value: str
    expires_at: float


class Authenticator:
    """Adds ``Authorization`` to registry requests and answers 401 challenges; one per RegistryClient."""

    def __init__(
        self, http: httpx.AsyncClient, credentials: Mapping[str, tuple[str, str]], timeout: float
    ) -> None:
        self._http = http
        self._credentials = dict(credentials)
        self._timeout = timeout
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._challenges: dict[str, Challenge] = {}  # the last challenge per host, to skip the 401 next time
        self._locks: dict[tuple[str, str], trio.Lock] = {}

    def credentials_for(self, host: str) -> tuple[str, str] | None:
        """Return the (user, password) we hold for ``host``, if any."""
        return self._credentials.get(host)

    async def header(self, ref: Reference, scope: str) -> str | None:
        """Return the ``Authorization`` value to send up front for ``ref`` and ``scope`` (None: anonymous)."""
        host = ref.registry
        challenge = self._challenges.get(host)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = self.credentials_for(host)
            return basic_header(*creds) if creds else None
        token = self._tokens.get((host, scope))
        if token is not None and token.expires_at > trio.current_time():
            return f"Bearer {token.value}"
        return f"Bearer {await self._fetch_token(ref, scope, challenge)}"

    async def on_unauthorized(
        self, ref: Reference, scope: str, response: httpx.Response, sent: str | None
    ) -> str:
        """Answer a 401: return a new ``Authorization`` value to retry with; raises AuthError if we have none."""
        host = ref.registry
        challenges = parse_challenges(response.headers.get("www-authenticate", ""))
        usable = [c for c in challenges if c.scheme in ("bearer", "basic")]
        if not usable:
            raise AuthError(
                f"image {ref}: registry {host} answered 401 without a Bearer or Basic challenge; "
                "lazysnap cannot authenticate to it"
            )
        challenge = next((c for c in usable if c.scheme == "bearer"), usable[0])
        # Remembered for later requests to this host, minus the scope, which belonged to this request.
        self._challenges[host] = Challenge(
            challenge.scheme, {k: v for k, v in challenge.params.items() if k != "scope"}
        )
        if challenge.scheme == "basic":
            creds = self.credentials_for(host)
            if creds is None or (sent is not None and sent.startswith("Basic ")):
                raise AuthError(refused_message(ref, host, creds is not None))
            return basic_header(*creds)
        # Whatever token we held for this scope was refused (expired, revoked): ask for a fresh one.
        self._tokens.pop((host, scope), None)
        return f"Bearer {await self._fetch_token(ref, scope, challenge, force=True)}"

    async def _fetch_token(
        self, ref: Reference, scope: str, challenge: Challenge, force: bool = False
    ) -> str:
        key = (ref.registry, scope)
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:  # concurrent requests for one scope share one token request
            cached = self._tokens.get(key)
            if cached is not None and cached.expires_at > trio.current_time() and not force:
                return cached.value
            token = await self._request_token(ref, scope, challenge)
            self._tokens[key] = token
            return token.value

    async def _request_token(self, ref: Reference, scope: str, challenge: Challenge) -> _Token:
        realm = challenge.params.get("realm")
        if not realm:
            raise AuthError(f"image {ref}: registry {ref.registry} sent a Bearer challenge without a realm")
        # Ask for our scope and, if the registry named another one, that too (the token server may
        # grant several at once): a HEAD challenged for "pull" then covers the push that follows.
        scopes = [scope]
        asked = challenge.params.get("scope")
        if asked and asked != scope:
            scopes.append(asked)
        params: dict[str, str | list[str]] = {"scope": scopes}
        if "service" in challenge.params:
            params["service"] = challenge.params["service"]
        headers = {}
        creds = self.credentials_for(ref.registry)
        if creds is not None:
            headers["Authorization"] = basic_header(*creds)
        try:
            with trio.fail_after(self._timeout):
                response = await self._http.get(realm, params=params, headers=headers)
        except (httpx.HTTPError, trio.TooSlowError) as error:
            raise FetchError(
                f"image {ref}: token server {realm} unreachable: {error!r}; check the network and the registry"
            ) from error
        if response.status_code in (401, 403):
            raise AuthError(
                refused_message(ref, ref.registry, creds is not None, f" by token server {realm}")
            )
        if response.status_code != 200:
            raise RegistryError(
                f"image {ref}: token server {realm} answered {response.status_code}; try again later"
            )
        try:
            body = response.json()
            value = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or _DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError) as error:
            raise RegistryError(f"image {ref}: token server {realm} sent an unreadable answer") from error
        if not isinstance(value, str) or not value:
            raise RegistryError(f"image {ref}: token server {realm} sent no token")
        return _Token(value, trio.current_time() + max(lifetime - _EXPIRY_MARGIN, 1.0))


def refused_message(ref: Reference, host: str, had_credentials: bool, where: str = "") -> str:
    """Return the AuthError message for ``ref``: who refused, and what the user should do."""
    if had_credentials:
        advice = "check the user name and password for this registry (credentials= or docker config.json)"
    else:
        advice = f"log in: add credentials for {host} to ~/.docker/config.json or pass credentials="
    return f"image {ref}: access denied{where} by registry {host}; {advice}"
