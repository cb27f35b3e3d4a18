"""The link between lazysnap and the registry during a benchmark: a counting, delaying TCP relay.

Every profile puts a relay (``DelayProxy``, trio, in a thread of its own) between the client and
the registry, so the bytes the registry sent are counted the same way for every mode:

- loopback (no ``--rate``, no ``--rtt``): the relay listens on 127.0.0.1 and adds nothing;
- ``--rtt``: the relay holds every chunk for RTT/2 in each direction (this kernel has no netem);
- ``--rate``: the relay listens inside a network namespace reached through a veth pair with a
  ``tbf`` qdisc on both ends, so every byte to and from the registry crosses the shaped link
  once. Only the listening socket lives in the namespace (made by a short-lived thread that
  ``setns``-es into it); the relay's connections to the registry stay in the host namespace,
  so a registry that listens on 127.0.0.1 works unchanged.

``open_link`` builds the profile and tears everything down (relay, netns, veth) on exit, also on
errors and Ctrl-C. The client then uses ``link.rewrite(ref)``: the same repository, reached at the
relay's address (plain HTTP: the relay passes TCP through, so TLS would see the wrong host name).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import math
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from snapshotter.errors import LinkError as LinkError  # re-exported: it was defined here

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
# Bytes read from a socket at once; 64 KiB keeps per-chunk overhead small at 1 Gbit/s and more.
RELAY_CHUNK = 64 << 10
# tbf's bucket: must hold at least one GSO packet (64 KiB) or tbf drops it; a small bucket keeps
# the measured rate close to the configured one.
TBF_BURST_BYTES = 128 << 10
# tbf's queue, as a delay: above a bandwidth-delay product for the RTTs we emulate, so the
# queue does not drop packets of one TCP window.
TBF_LATENCY_MS = 200

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$", re.IGNORECASE)
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(us|ms|s)$", re.IGNORECASE)
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_rate(text: str) -> float:
    """``100mbit`` -> bits per second (tc's units); raises LinkError."""
    match = _RATE.match(text.strip())
    if not match:
        raise LinkError(f"--rate {text!r}: give a number and bit, kbit, mbit or gbit (e.g. 100mbit)")
    return float(match.group(1)) * _RATE_UNITS[match.group(2).lower()]


def parse_duration(text: str) -> float:
    """``20ms`` -> seconds; raises LinkError."""
    match = _DURATION.match(text.strip())
    if not match:
        raise LinkError(f"--rtt {text!r}: give a number and us, ms or s (e.g. 20ms)")
    return float(match.group(1)) * _TIME_UNITS[match.group(2).lower()]


@dataclass(frozen=True)
class LinkProfile:
    """The emulated link: rate in bit/s (None: unshaped) and round-trip time in seconds (0: none)."""

    rate_bps: float | None = None
    rtt_s: float = 0.0

    @property
    def name(self) -> str:
        """A short label: ``loopback`` or e.g. ``100mbit+20ms``."""
        if self.rate_bps is None and self.rtt_s == 0:
            return "loopback"
        parts = []
        if self.rate_bps is not None:
            parts.append(f"{self.rate_bps / 1e6:g}mbit")
        if self.rtt_s:
            parts.append(f"{self.rtt_s * 1e3:g}ms")
        return "+".join(parts)


class ByteCounter:
    """Bytes relayed from the registry and to it; read from any thread (ints under the GIL)."""

    def __init__(self) -> None:
        self.downstream = 0  # registry -> client
        self.upstream = 0  # client -> registry
        self.connections = 0
        self.last_activity = time.monotonic()


class DelayProxy:
    """A TCP relay in a trio loop: forwards each connection to ``upstream``, delaying each direction."""

    def __init__(self, listener: socket.socket, upstream: tuple[str, int], one_way_delay: float) -> None:
        self.listener = listener
        self.upstream = upstream
        self.delay = one_way_delay
        self.counter = ByteCounter()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-proxy", daemon=True)
        self._error: BaseException | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) clients connect to."""
        host, port = self.listener.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> DelayProxy:
        """Run the relay in its own thread; returns once it accepts connections."""
        self._thread.start()
        self._started.wait(10)
        if self._error is not None:
            raise LinkError(f"relay failed to start: {self._error}")
        return self

    def stop(self) -> None:
        """Cancel the relay and wait for its thread."""
        if self._token is not None and self._cancel is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self._thread.join(10)
        self.listener.close()

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as error:  # reported to start(); the thread must not die silently
            self._error = error
            self._started.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self.listener.dup()))
        with trio.CancelScope() as scope:
            self._cancel = scope
            self._started.set()
            await trio.serve_listeners(self._handle, [listener])

    async def _handle(self, client: trio.SocketStream) -> None:
        self.counter.connections += 1
        try:
            server = await trio.open_tcp_stream(*self.upstream)
        except OSError:
            await client.aclose()
            return
        try:
            async with client, server, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server, False, nursery.cancel_scope)
                nursery.start_soon(self._pump, server, client, True, nursery.cancel_scope)
        except Exception as error:  # an ExceptionGroup too: trio's nurseries wrap what their tasks raise
            # One connection's failure must never reach serve_listeners: that would end the relay's
            # trio run, and every later connection of the benchmark would hang unanswered.
            log.debug("relay connection dropped: %r", error)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, downstream: bool, scope: trio.CancelScope
    ) -> None:
        """Copy ``source`` to ``sink``; with a delay, each chunk leaves ``delay`` after it arrived."""
        send, receive = trio.open_memory_channel[tuple[float, bytes]](math.inf)

        async def deliver() -> None:
            async for due, data in receive:
                wait = due - trio.current_time()
                if wait > 0:
                    await trio.sleep(wait)
                await sink.send_all(data)
                self._count(len(data), downstream)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await sink.send_eof()

        try:
            async with trio.open_nursery() as inner:
                inner.start_soon(deliver)
                async with send:
                    while data := await source.receive_some(RELAY_CHUNK):
                        await send.send((trio.current_time() + self.delay, data))
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            # except*: a send that fails in deliver() arrives wrapped in the nursery's ExceptionGroup.
            scope.cancel()  # one side reset: drop the whole connection, like a real link would

    def _count(self, size: int, downstream: bool) -> None:
        if downstream:
            self.counter.downstream += size
        else:
            self.counter.upstream += size
        self.counter.last_activity = time.monotonic()


@dataclass
class Link:
    """A running profile: where to reach the registry and how many bytes it sent."""

    profile: LinkProfile
    proxy: DelayProxy
    upstream: str

    @property
    def host(self) -> str:
        """``HOST:PORT`` of the relay, to use in image references."""
        host, port = self.proxy.address
        return f"{host}:{port}"

    @property
    def counter(self) -> ByteCounter:
        """The relay's byte counters."""
        return self.proxy.counter

    def rewrite(self, reference: str) -> str:
        """The same image reference, with the registry host replaced by the relay's."""
        first, sep, rest = reference.partition("/")
        if not sep or first != self.upstream:
            raise LinkError(f"{reference}: all images must come from the same registry ({self.upstream})")
        return f"{self.host}/{rest}"


def registry_host(reference: str) -> str:
    """The ``host[:port]`` part of a fully qualified reference; raises LinkError for shorthand names."""
    first, sep, _ = reference.partition("/")
    if not sep or not ("." in first or ":" in first or first == "localhost"):
        raise LinkError(
            f"{reference}: give a full reference with the registry host (e.g. 127.0.0.1:5000/img:tag)"
        )
    return first


def _upstream_address(host: str) -> tuple[str, int]:
    name, _, port = host.rpartition(":")
    if not name:
        return host, 80
    return name.strip("[]"), int(port)


@contextlib.contextmanager
def open_link(profile: LinkProfile, upstream_host: str) -> Iterator[Link]:
    """Set up the profile's relay (and netns, veth, tbf if shaped); remove everything on exit.

    Raises:
        LinkError: a namespace, veth or qdisc could not be created (needs root).
    """
    upstream = _upstream_address(upstream_host)
    delay = profile.rtt_s / 2
    with contextlib.ExitStack() as stack:
        if profile.rate_bps is None:
            listener = socket.create_server(("127.0.0.1", 0))
        else:
            shaped = stack.enter_context(_shaped_namespace(profile.rate_bps))
            listener = _listen_in_namespace(shaped, (shaped.inner_address, 0))
        proxy = DelayProxy(listener, upstream, delay).start()
        stack.callback(proxy.stop)
        yield Link(profile, proxy, upstream_host)


@dataclass(frozen=True)
class _Namespace:
    name: str
    host_device: str
    inner_address: str


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LinkError(f"`{' '.join(argv)}` failed: {result.stderr.strip() or result.returncode}")


@contextlib.contextmanager
def _shaped_namespace(rate_bps: float) -> Iterator[_Namespace]:
    """A netns joined to the host by a veth pair, both ends shaped by tbf at ``rate_bps``."""
    if os.geteuid() != 0:
        raise LinkError("--rate needs root: it creates a network namespace, a veth pair and a tbf qdisc")
    tag = f"{os.getpid() % 100000}{threading.get_ident() % 100}"
    name, host_dev, inner_dev = f"lzbench{tag}", f"lzb{tag}h", f"lzb{tag}n"
    octet = os.getpid() % 250 + 1
    host_ip, inner_ip = f"10.231.{octet}.1", f"10.231.{octet}.2"
    rate = f"{int(rate_bps)}bit"
    tbf = ["tbf", "rate", rate, "burst", str(TBF_BURST_BYTES), "latency", f"{TBF_LATENCY_MS}ms"]
    try:
        _run("ip", "netns", "add", name)
        _run("ip", "link", "add", host_dev, "type", "veth", "peer", "name", inner_dev)
        _run("ip", "link", "set", inner_dev, "netns", name)
        _run("ip", "addr", "add", f"{host_ip}/30", "dev", host_dev)
        _run("ip", "link", "set", host_dev, "up")
        _run("ip", "netns", "exec", name, "ip", "addr", "add", f"{inner_ip}/30", "dev", inner_dev)
        _run("ip", "netns", "exec", name, "ip", "link", "set", inner_dev, "up")
        _run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        _run("tc", "qdisc", "replace", "dev", host_dev, "root", *tbf)
        _run("ip", "netns", "exec", name, "tc", "qdisc", "replace", "dev", inner_dev, "root", *tbf)
        yield _Namespace(name, host_dev, inner_ip)
    finally:
        # Deleting the namespace destroys its veth end, and with it the peer; delete the host end
        # too in case the move into the namespace never happened.
        subprocess.run(["ip", "link", "del", host_dev], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _listen_in_namespace(namespace: _Namespace, address: tuple[str, int]) -> socket.socket:
    """Create a listening TCP socket inside ``namespace`` from a thread that joins it and ends.

    A socket belongs to the namespace it was created in for its whole life, whichever thread
    uses it later; the network namespace is per thread, so the rest of the process is untouched.
    """
    result: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{namespace.name}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns: {errno.errorcode.get(code, code)}")
            finally:
                os.close(fd)
            result.append(socket.create_server(address))
        except BaseException as error:
            result.append(error)

    thread = threading.Thread(target=make, name="bench-netns")
    thread.start()
    thread.join()
    made = result[0]
    if isinstance(made, BaseException):
        raise LinkError(f"cannot listen in network namespace {namespace.name}: {made}")
    return made
