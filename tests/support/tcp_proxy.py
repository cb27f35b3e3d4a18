"""A TCP forwarder a test controls: put it in front of a registry and ``cut()`` it to make the registry vanish.

``cut()`` drops every open connection at once (mid-transfer if a response is under way) and
refuses new ones until ``restore()``; a client sees exactly what it would see if the registry
host went away and came back.
"""

from __future__ import annotations

import contextlib
import socket
import threading

ACCEPT_POLL = 0.1


class TcpProxy:
    """Forward 127.0.0.1:``port`` to ``target``; use as a context manager."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(ACCEPT_POLL)
        self.port: int = self._listener.getsockname()[1]
        self._up = True
        self._stopping = False
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.connections = 0

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: the registry part of a reference that goes through this proxy."""
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> TcpProxy:
        self._spawn(self._accept_loop)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping = True
        self.cut()
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until ``restore``."""
        self._up = False
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        """Accept and forward connections again."""
        self._up = True

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            self.connections += 1
            with self._lock:
                self._sockets.update((client, upstream))
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(1 << 16):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._sockets.discard(source)
                if sink not in self._sockets:
                    source.close()
                    sink.close()
