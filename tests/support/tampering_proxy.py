"""An HTTP-aware proxy in front of a registry that lies the ways a hostile or broken registry can.

``TcpProxy`` forwards bytes blindly; this one understands the registry API's requests and
answers, so a test can choose what ``lazysnap`` receives:

- ``fault = Fault("flip")``: invert the bytes of 206 (Range) answers for blobs;
- ``Fault("truncate")``: announce the whole body, send half of it, close the connection;
- ``Fault("full200")``: answer a Range request with ``200`` and the whole blob;
- ``Fault("hang")``: never answer (until ``release()`` or the proxy stops);
- ``Fault("reset")``: close the connection with a TCP RST;
- ``Fault("503")``: answer ``503 Service Unavailable``;
- ``Fault("trickle")``: send the right answer at ``trickle_rate`` bytes a second (20 KB/s), the
  rest at full speed once the fault is lifted;

each only for blob GETs, only for ``Fault.digest`` if given. ``Fault("down")`` is the registry
gone: the proxy stops listening (connections are refused) and drops the connections it has; any
other fault, ``"none"`` included, listens again on the same port. ``substitute[digest] = data`` serves
``data`` (Range requests included) whenever that blob is asked for, and ``manifests[(repository,
key)] = (content_type, body)`` serves a manifest the real registry would refuse to store. Pushes
go to the registry directly; only reads go through here. ``blob_bytes_sent[digest]`` counts the
blob body bytes the proxy handed to the network for each blob (what a client made it move).
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

FaultKind = Literal["none", "flip", "truncate", "full200", "hang", "reset", "503", "trickle", "down"]
HANG_LIMIT = 120.0  # seconds: a hung answer never outlives a test
_BLOB = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>[^/]+)$")
_MANIFEST = re.compile(r"^/v2/(?P<repo>.+)/manifests/(?P<key>[^/]+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}
TRICKLE_RATE = 20_000  # bytes a second of a "trickle" answer
TRICKLE_PIECE = 2_000  # bytes written at a time by a "trickle" answer


class _QuietServer(ThreadingHTTPServer):
    """A threading HTTP server that does not print the connections its clients reset or time out."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """Quiet: a client dropping a connection (lazysnap giving up on a hung answer) is expected."""


@dataclass(frozen=True)
class Fault:
    """What to do to blob GETs (those of ``digest`` only, if given)."""

    kind: FaultKind = "none"
    digest: str | None = None


NO_FAULT = Fault()


class TamperingProxy:
    """Serve 127.0.0.1:``port``, forwarding to the registry at ``target`` with ``fault`` applied."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.fault: Fault = NO_FAULT
        self.substitute: dict[str, bytes] = {}
        self.manifests: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.tampered = 0  # blob answers the fault changed
        self.blob_requests = 0
        self.blob_bytes_sent: dict[str, int] = {}  # by digest: body bytes written to clients
        self.trickle_rate = TRICKLE_RATE
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server = _QuietServer(("127.0.0.1", 0), _handler_class(self))
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._down = False

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: the registry part of a reference that goes through this proxy."""
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> TamperingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._release.set()
        if not self._down:
            self._stop_listening()

    def _stop_listening(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _go_down(self) -> None:
        """Stop listening and drop every open connection: the registry host is gone."""
        self._down = True
        self._stop_listening()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def _come_up(self) -> None:
        """Listen again on the same port."""
        self._server = _QuietServer(("127.0.0.1", self.port), _handler_class(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self._down = False

    def track(self, connection: socket.socket, opened: bool) -> None:
        """Remember (or forget) a client connection, so that going down can drop it."""
        with self._lock:
            if opened:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    @property
    def down(self) -> bool:
        """Whether the proxy is down (not listening)."""
        return self._down

    def set_fault(self, kind: FaultKind, digest: str | None = None) -> None:
        """Apply ``kind`` to later blob GETs (of ``digest`` only, if given); ``"none"`` stops tampering."""
        if kind == "hang":
            self._release.clear()
        else:
            self._release.set()
        self.fault = Fault(kind, digest)
        if kind == "down" and not self._down:
            self._go_down()
        elif kind != "down" and self._down:
            self._come_up()

    def release(self) -> None:
        """Let hung answers end (their connections close without an answer) and stop tampering."""
        self.set_fault("none")

    def count(self, tampered: bool = False) -> None:
        """Count one blob request (and one tampered answer if ``tampered``)."""
        with self._lock:
            self.blob_requests += 1
            self.tampered += tampered

    def sent(self, digest: str, count: int) -> None:
        """Count ``count`` body bytes of blob ``digest`` written to a client."""
        with self._lock:
            self.blob_bytes_sent[digest] = self.blob_bytes_sent.get(digest, 0) + count

    def wait_released(self) -> None:
        """Block a hung answer until ``release()`` or HANG_LIMIT."""
        self._release.wait(HANG_LIMIT)

    def upstream(
        self, method: str, path: str, headers: dict[str, str]
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send one request to the registry; return its status, headers and whole body."""
        connection = http.client.HTTPConnection(*self.target, timeout=60)
        try:
            connection.request(method, path, headers=headers)
            response = connection.getresponse()
            body = response.read()
            return response.status, response.getheaders(), body
        finally:
            connection.close()


def _slice(data: bytes, range_header: str | None) -> tuple[int, bytes, str | None]:
    """The status, body and Content-Range of a GET of ``data`` with ``range_header``."""
    match = _RANGE.match(range_header or "")
    if match is None:
        return 200, data, None
    start = int(match[1])
    end = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
    if start >= len(data):
        return 416, b"", f"bytes */{len(data)}"
    return 206, data[start : end + 1], f"bytes {start}-{end}/{len(data)}"


def _handler_class(proxy: TamperingProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the tests read lazysnap's log, not the proxy's."""

        def setup(self) -> None:
            super().setup()
            proxy.track(self.connection, True)

        def finish(self) -> None:
            proxy.track(self.connection, False)
            with contextlib.suppress(OSError):
                super().finish()

        def do_GET(self) -> None:
            self._serve("GET")

        def do_HEAD(self) -> None:
            self._serve("HEAD")

        def _serve(self, method: str) -> None:
            if proxy.down:  # a request already read when the proxy went down: no answer
                self._fail("reset")
                return
            manifest = _MANIFEST.match(self.path)
            if manifest and (manifest["repo"], manifest["key"]) in proxy.manifests:
                content_type, body = proxy.manifests[(manifest["repo"], manifest["key"])]
                self._answer(200, [("Content-Type", content_type)], body, method)
                return
            blob = _BLOB.match(self.path)
            if blob is None or method != "GET":
                self._forward(method)
                return
            self._serve_blob(blob["digest"])

        def _serve_blob(self, digest: str) -> None:
            fault = proxy.fault
            applies = fault.kind != "none" and fault.digest in (None, digest)
            proxy.count(applies)
            if applies and fault.kind in ("hang", "reset", "503"):
                self._fail(fault.kind)
                return
            range_header = self.headers.get("Range")
            if digest in proxy.substitute:
                status, body, content_range = _slice(proxy.substitute[digest], range_header)
                headers = [("Content-Type", "application/octet-stream")]
                headers += [("Content-Range", content_range)] if content_range else []
            else:
                wanted = self._request_headers()
                if applies and fault.kind == "full200":
                    wanted.pop("Range", None)
                status, headers, body = proxy.upstream("GET", self.path, wanted)
            if applies and fault.kind == "flip" and status == 206:
                body = bytes(b ^ 0xFF for b in body)
            if applies and fault.kind == "full200":
                headers = [(k, v) for k, v in headers if k.lower() != "content-range"]
            if applies and fault.kind == "truncate" and status in (200, 206):
                self._truncated(status, headers, body)
                return
            if applies and fault.kind == "trickle":
                self._trickle(status, headers, body)
                return
            self._head(status, headers, len(body))
            self._write_counted(digest, body)

        def _write_counted(self, digest: str, body: bytes) -> None:
            """Write a blob body in pieces, counting what was written until the client went away."""
            piece = 64 << 10
            try:
                for start in range(0, len(body), piece):
                    self.wfile.write(body[start : start + piece])
                    proxy.sent(digest, len(body[start : start + piece]))
            except OSError:
                self.close_connection = True

        def _request_headers(self) -> dict[str, str]:
            return {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}

        def _forward(self, method: str) -> None:
            status, headers, body = proxy.upstream(method, self.path, self._request_headers())
            self._answer(status, headers, body, method)

        def _head(self, status: int, headers: list[tuple[str, str]], length: int) -> None:
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(length))
            self.end_headers()

        def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes, method: str) -> None:
            self._head(status, headers, len(body))
            if method != "HEAD":
                self.wfile.write(body)

        def _truncated(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            self._head(status, headers, len(body))
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True

        def _trickle(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            self._head(status, headers, len(body))
            self.wfile.flush()
            sent = 0
            while sent < len(body) and proxy.fault.kind == "trickle":
                self.wfile.write(body[sent : sent + TRICKLE_PIECE])
                self.wfile.flush()
                sent += TRICKLE_PIECE
                time.sleep(TRICKLE_PIECE / proxy.trickle_rate)
            self.wfile.write(body[sent:])

        def _fail(self, kind: str) -> None:
            if kind == "503":
                self._answer(503, [("Content-Type", "text/plain")], b"service unavailable\n", "GET")
                return
            if kind == "hang":
                proxy.wait_released()
            else:  # reset: SO_LINGER 0 makes close() send RST instead of FIN
                with contextlib.suppress(OSError):
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.close()

    return Handler
