"""The benchmark relay survives clients that reset mid-transfer and keeps serving new connections."""

from __future__ import annotations

import socket
import struct
import threading
import time

from snapshotter.devtools.bench.network import DelayProxy


def streaming_server() -> tuple[socket.socket, threading.Event]:
    """A TCP server that sends an endless stream to every client; returns the listener and a stop flag."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while not stop.is_set():
                    conn.sendall(b"x" * 65536)
            except OSError:
                pass

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener, stop


def reset(conn: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER 0), as a killed client would."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def test_relay_keeps_serving_after_clients_reset_mid_transfer() -> None:
    """Clients that vanish while delayed data is in flight do not stop the relay."""
    upstream, stop = streaming_server()
    proxy = DelayProxy(socket.create_server(("127.0.0.1", 0)), upstream.getsockname()[:2], 0.02).start()
    try:
        for _ in range(5):
            conn = socket.create_connection(proxy.address, timeout=5)
            conn.recv(65536)
            time.sleep(0.05)  # let delayed chunks queue up for a client about to disappear
            reset(conn)
        time.sleep(0.2)
        with socket.create_connection(proxy.address, timeout=5) as conn:
            conn.settimeout(5)
            assert conn.recv(65536), "the relay stopped answering"
    finally:
        stop.set()
        proxy.stop()
        upstream.close()
