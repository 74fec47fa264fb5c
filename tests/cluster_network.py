"""The network of a test-owned RabbitMQ cluster: a name server and a proxy in front of
every port of every node, so that a test can cut one node off from the others.

Erlang nodes find each other's distribution port through a name server (epmd). This one
answers with the port of the node's *proxy*, so every node-to-node connection, and every
CLI tool's connection to a node, goes through a proxy of the test's own; AMQP clients get
the URL of a proxy too. A distribution proxy reads the first handshake packet of each
connection, which names the node that opened it, so a partition refuses and drops only the
connections between the cut-off node and its peers: the CLI tools still reach that node
(tests can watch it pause) and nothing else on the machine is touched.

Everything here runs on an event loop of its own, in a thread: the nodes' heartbeats must
pass while a test blocks its own loop, and between tests, when no loop runs at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from .proxy import TcpProxy

# The machine's own broker (AMQP, distribution, management), its epmd and the port range
# of its CLI tools: never handed to a test node, even where free.
MACHINE_PORTS = frozenset({4369, 5672, 15672, 25672, *range(35672, 35683)})
# Below Linux's ephemeral range, so that no outgoing connection takes a reserved port
# while its node is down for a restart.
RESERVED_RANGE = range(20000, 32768)
HANDSHAKE_TIMEOUT = 10.0
CONTROL_TIMEOUT = 10.0  # for the network's own loop to start, stop or cut a node off

# epmd requests and replies (erts "Distribution Protocol").
ALIVE2_REQ, ALIVE2_X_RESP = 120, 118
PORT_PLEASE2_REQ, PORT2_RESP = 122, 119
NAMES_REQ = 110


class PortReservations:
    """Ports reserved for this run's nodes, locked in a directory every run shares, so
    parallel runs never pick the same port even before a node binds it."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.gettempdir()) / "pstest-cluster-ports"
        self.directory.mkdir(mode=0o700, exist_ok=True)
        self._held: dict[int, int] = {}

    def reserve(self) -> int:
        for _ in range(200):
            port = random.choice(RESERVED_RANGE)
            if port in MACHINE_PORTS or port in self._held or not _bindable(port):
                continue
            path = self.directory / f"{port}.lock"
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Another run may have unlinked the file between our open and our lock.
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    self._held[port] = fd
                    return port
            except (BlockingIOError, FileNotFoundError):
                pass
            os.close(fd)
        raise RuntimeError(f"no free port to reserve in {RESERVED_RANGE}")

    def release_all(self) -> None:
        for port, fd in self._held.items():
            with contextlib.suppress(FileNotFoundError):
                (self.directory / f"{port}.lock").unlink()
            os.close(fd)
        self._held.clear()


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def initiator(packet: bytes) -> str | None:
    """The node name in a distribution handshake's first packet (``send_name``)."""
    if packet[:1] == b"N":  # version 6: flags (8), creation (4), name length (2), name
        (length,) = struct.unpack_from(">H", packet, 13)
        return packet[15 : 15 + length].decode("latin-1")
    if packet[:1] == b"n":  # version 5: version (2), flags (4), name
        return packet[7:].decode("latin-1")
    return None


class DistributionProxy(TcpProxy):
    """A node's distribution port; it knows which node opened each connection."""

    def __init__(
        self, node: str, target_port: int, refuses: Callable[[str, str | None], bool]
    ) -> None:
        super().__init__("127.0.0.1", target_port)
        self.node = node
        self._refuses = refuses
        self._links: list[tuple[str | None, asyncio.StreamWriter, asyncio.StreamWriter]] = []

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            header = await asyncio.wait_for(reader.readexactly(2), HANDSHAKE_TIMEOUT)
            packet = await asyncio.wait_for(
                reader.readexactly(int.from_bytes(header, "big")), HANDSHAKE_TIMEOUT
            )
        except (asyncio.IncompleteReadError, TimeoutError, OSError):
            writer.transport.abort()
            return
        peer = initiator(packet)
        if self._refuses(self.node, peer):
            writer.transport.abort()
            return
        upstream = await self._forward(reader, writer, header + packet)
        if upstream is not None:
            self._links = [link for link in self._links if not link[1].transport.is_closing()]
            self._links.append((peer, writer, upstream))

    def drop(self) -> None:
        """Close every connection this proxy would now refuse."""
        for peer, writer, upstream in self._links:
            if self._refuses(self.node, peer):
                writer.transport.abort()
                upstream.transport.abort()


class NameServer:
    """The epmd requests Erlang/OTP 23+ makes: register (ALIVE2), look up (PORT_PLEASE2)
    and list (NAMES). A proxied node is answered with its proxy's port."""

    def __init__(self) -> None:
        self.proxied: dict[str, int] = {}  # alive name (before the @) -> proxy port
        self.port = 0
        self.registered: dict[str, bytes] = {}  # alive name -> its ALIVE2 request
        self._server: asyncio.Server | None = None
        self._registrations: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._registrations:
                writer.transport.abort()
            await self._server.wait_closed()

    def _port_of(self, name: str, request: bytes) -> int:
        return self.proxied.get(name) or int.from_bytes(request[1:3], "big")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            length = int.from_bytes(await reader.readexactly(2), "big")
            request = await reader.readexactly(length)
            if request[0] == ALIVE2_REQ:
                await self._register(request, reader, writer)
            elif request[0] == PORT_PLEASE2_REQ:
                writer.write(self._port_reply(request[1:].decode("latin-1")))
            elif request[0] == NAMES_REQ:
                lines = "".join(
                    f"name {name} at port {self._port_of(name, alive)}\n"
                    for name, alive in self.registered.items()
                )
                writer.write(self.port.to_bytes(4, "big") + lines.encode("latin-1"))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _register(
        self, request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # PortNo (2), NodeType, Protocol, HighestVersion (2), LowestVersion (2), Nlen (2), Name
        (length,) = struct.unpack_from(">H", request, 9)
        name = request[11 : 11 + length].decode("latin-1")
        if name in self.registered:
            writer.write(bytes([ALIVE2_X_RESP, 1]) + bytes(4))
            return
        self.registered[name] = request
        self._registrations.add(writer)
        writer.write(bytes([ALIVE2_X_RESP, 0]) + random.randrange(1, 2**32).to_bytes(4, "big"))
        try:
            await writer.drain()
            await reader.read()  # registered for as long as the node keeps this open
        finally:
            self._registrations.discard(writer)
            if self.registered.get(name) is request:
                del self.registered[name]

    def _port_reply(self, name: str) -> bytes:
        request = self.registered.get(name)
        if request is None:
            return bytes([PORT2_RESP, 1])
        port = self._port_of(name, request)
        # Everything after the port, as the node registered it, then an empty "extra".
        (length,) = struct.unpack_from(">H", request, 9)
        return bytes([PORT2_RESP, 0]) + port.to_bytes(2, "big") + request[3 : 11 + length] + b"\0\0"


class ClusterNetwork:
    """The name server and the proxies of ``nodes``: ``{node name: (the AMQP port, the
    distribution port)}`` that the node itself listens on."""

    def __init__(self, nodes: dict[str, tuple[int, int]]) -> None:
        self._nodes = nodes
        self._cut: set[str] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="cluster-network", daemon=True
        )
        self._proxies = contextlib.AsyncExitStack()
        self.amqp: dict[str, TcpProxy] = {}
        self.distribution: dict[str, DistributionProxy] = {}
        self.names = NameServer()

    @property
    def epmd_port(self) -> int:
        return self.names.port

    def amqp_port(self, node: str) -> int:
        return self.amqp[node].port

    def is_cut(self, node: str) -> bool:
        return node in self._cut

    def registered(self, node: str) -> bool:
        """Whether the node's Erlang distribution is up (it registered its name)."""
        return node.partition("@")[0] in self.names.registered

    async def start(self) -> None:
        self._thread.start()
        await self._run(self._start())

    async def close(self) -> None:
        if self._thread.is_alive():
            await self._run(self._close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            await asyncio.to_thread(self._thread.join, CONTROL_TIMEOUT)
        self._loop.close()

    async def partition(self, node: str) -> None:
        """Refuse and drop every connection between ``node`` and the other nodes, and every
        AMQP connection to it; the CLI tools still reach it."""
        await self._run(self._set_cut(node, cut=True))

    async def heal(self, node: str) -> None:
        await self._run(self._set_cut(node, cut=False))

    def refuses(self, target: str, peer: str | None) -> bool:
        """Whether a distribution connection from ``peer`` to ``target`` is cut."""
        if peer not in self._nodes or peer == target:
            return False  # a CLI tool, or a node's connection to itself
        return target in self._cut or peer in self._cut

    async def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        future: Future[None] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        await asyncio.wait_for(asyncio.wrap_future(future), CONTROL_TIMEOUT)

    async def _start(self) -> None:
        for node, (amqp_port, distribution_port) in self._nodes.items():
            self.amqp[node] = await self._proxies.enter_async_context(
                TcpProxy("127.0.0.1", amqp_port)
            )
            self.distribution[node] = await self._proxies.enter_async_context(
                DistributionProxy(node, distribution_port, self.refuses)
            )
            self.names.proxied[node.partition("@")[0]] = self.distribution[node].port
        await self.names.start()

    async def _close(self) -> None:
        await self.names.close()
        await self._proxies.aclose()

    async def _set_cut(self, node: str, *, cut: bool) -> None:
        if cut:
            self._cut.add(node)
            self.amqp[node].cut()
            for proxy in self.distribution.values():
                proxy.drop()
        else:
            self._cut.discard(node)
            self.amqp[node].restore()
