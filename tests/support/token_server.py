"""A small Bearer token server for docker-registry's ``auth: token`` mode, so the token flow is tested for real.

It answers ``GET /token?service=S&scope=repository:NAME:pull,push`` with a JWT signed by a
throwaway RSA key (``openssl`` CLI makes the key and a self-signed certificate; the registry
trusts that certificate through ``rootcertbundle`` and finds it in the token's ``x5c`` header).
Clients with valid basic credentials get the actions they ask for; anonymous clients get the
actions in ``anonymous_actions`` (none by default), so the registry answers them 401 again.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SERVICE = "lazysnap-test-registry"
ISSUER = "lazysnap-test-token-server"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_signing_key(directory: Path) -> tuple[Path, Path]:
    """Create an RSA key and a self-signed certificate in ``directory``; returns (key path, cert path)."""
    key, cert = directory / "token.key", directory / "token.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=lazysnap-test-token-issuer"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return key, cert


class TokenServer:
    """Issue registry tokens on 127.0.0.1 from a thread; ``start()``/``stop()`` or use as a context manager."""

    def __init__(
        self,
        directory: Path,
        users: Mapping[str, str],
        *,
        lifetime: int = 300,
        anonymous_actions: tuple[str, ...] = (),
    ) -> None:
        self.directory = directory
        self.users = dict(users)
        self.lifetime = lifetime
        self.anonymous_actions = anonymous_actions
        self.key_path, self.cert_path = make_signing_key(directory)
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert_path), "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        self._x5c = base64.b64encode(der).decode()
        self.issued: list[dict[str, Any]] = []  # claims of every token issued, for tests to inspect
        self.requests = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, name="token-server", daemon=True)

    @property
    def realm(self) -> str:
        """The URL the registry sends clients to."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def start(self) -> TokenServer:
        """Start serving in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def sign(self, claims: Mapping[str, Any]) -> str:
        """Return a compact RS256 JWT of ``claims`` carrying our certificate in ``x5c``."""
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key_path)],
            input=signing_input.encode(),
            check=True,
            capture_output=True,
        ).stdout
        return f"{signing_input}.{_b64url(signature)}"

    def _grant(self, authorization: str | None, query: Mapping[str, list[str]]) -> tuple[int, dict[str, Any]]:
        subject = ""
        actions_allowed: tuple[str, ...] = self.anonymous_actions
        if authorization:
            scheme, _, encoded = authorization.partition(" ")
            try:
                user, _, password = base64.b64decode(encoded).decode().partition(":")
            except ValueError:
                return 400, {"errors": [{"code": "BAD_REQUEST", "message": "malformed Authorization"}]}
            if scheme.lower() != "basic" or self.users.get(user) != password:
                return 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}
            subject, actions_allowed = user, ("pull", "push")
        access = []
        for scope in query.get("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = [a for a in actions.split(",") if a in actions_allowed]
            access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": query.get("service", [SERVICE])[0],
            "exp": now + self.lifetime,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        token = self.sign(claims)
        with self._lock:
            self.issued.append(claims)
        return 200, {"token": token, "access_token": token, "expires_in": self.lifetime}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                with server._lock:
                    server.requests += 1
                if url.path != "/token":
                    self._reply(404, {"errors": [{"code": "NOT_FOUND"}]})
                    return
                status, body = server._grant(
                    self.headers.get("Authorization"), urllib.parse.parse_qs(url.query)
                )
                self._reply(status, body)

            def _reply(self, status: int, body: Mapping[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep pytest output clean

        return Handler
