"""The cluster's per-node figures of a write run (``--partitions``), from RabbitMQ's
management API.

A commands queue is served by its Raft leader: the writes of a run go through the nodes
that lead the queues they were routed to. For each node the figures say which of the run's
queues it led, how many of the run's writes were routed to those (the queues' depths once
the stream was published, before any worker started), what that is per second of the run,
how many worker connections it held while the workers ran, and its memory afterwards.

AMQP says none of this (a queue's leader, a connection's node), so it comes from the
management API (``rabbitmq_management``, which production clusters run for monitoring):
``--management-url``, by default port 15672 on the host of the first broker URL, with the
AMQP URL's user, who needs the ``monitoring`` tag. Without it the report says why there are
no per-node figures; the throughput figures do not depend on them.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aiohttp

from worker.bench.harness import APPLICATION_NAME as BENCH_CONNECTION
from worker.bench.report import NodeShare
from worker.store import APPLICATION_NAME

MANAGEMENT_PORT: Final = 15672
_TIMEOUT: Final = aiohttp.ClientTimeout(total=10)
_STATISTICS_WAIT: Final = 12.0
_WORKER_CONNECTION: Final = f"{APPLICATION_NAME} "
"""How a worker names its connections (``plugin-state-worker <host>:<pid>:<id>``); the
bench's own connection is named ``plugin-state-worker bench``."""


class ManagementUnavailable(RuntimeError):
    """No per-node figures: the management API cannot be reached or refuses the user."""


def default_management_url(amqp_url: str) -> str:
    """Port 15672 of the first broker URL's host, over TLS when AMQP is."""
    parts = urlsplit(amqp_url)
    scheme = "https" if parts.scheme.lower() == "amqps" else "http"
    return f"{scheme}://{parts.hostname}:{MANAGEMENT_PORT}/"


class Management:
    """The few management API calls the bench makes, as the AMQP URL's user."""

    def __init__(self, base_url: str, amqp_url: str) -> None:
        parts = urlsplit(amqp_url)
        self.base_url = base_url.rstrip("/")
        self.vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        self._user = unquote(parts.username or "guest")
        credentials = f"{self._user}:{unquote(parts.password or 'guest')}".encode()
        self._headers = {"Authorization": f"Basic {base64.b64encode(credentials).decode()}"}

    @property
    def shown_url(self) -> str:
        """The API's address without credentials (none are in it, but a user may add them)."""
        parts = urlsplit(self.base_url)
        return urlunsplit(parts._replace(netloc=parts.hostname or ""))

    async def _get(self, path: str) -> Any:
        url = f"{self.base_url}/api/{path}"
        try:
            async with (
                aiohttp.ClientSession(headers=self._headers, timeout=_TIMEOUT) as session,
                session.get(url) as response,
            ):
                if response.status in (401, 403):
                    raise ManagementUnavailable(
                        f"the management API at {self.shown_url} refuses {self._user} "
                        "(it needs the monitoring tag)"
                    )
                response.raise_for_status()
                return await response.json()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ManagementUnavailable(
                f"no management API at {self.shown_url} ({exc or type(exc).__name__}): enable "
                "rabbitmq_management or pass --management-url"
            ) from None

    async def check(self) -> None:
        await self._get("overview")

    async def leaders(self, queues: Sequence[str]) -> dict[str, str]:
        """Each queue's leader (a quorum queue's ``leader``, else the node it lives on)."""
        vhost = quote(self.vhost, safe="")
        found = {}
        for name in queues:
            info = await self._get(f"queues/{vhost}/{quote(name, safe='')}")
            found[name] = str(info.get("leader") or info["node"])
        return found

    async def node_memory(self) -> dict[str, int]:
        return {
            str(node["name"]): int(node.get("mem_used") or 0) for node in await self._get("nodes")
        }

    async def worker_connections(self) -> Counter[str]:
        """Worker connections per node (not the bench's own, nor anyone else's)."""
        counts: Counter[str] = Counter()
        for connection in await self._get("connections"):
            properties = connection.get("client_properties") or {}
            name = str(properties.get("connection_name", ""))
            if name.startswith(_WORKER_CONNECTION) and name != BENCH_CONNECTION:
                counts[str(connection["node"])] += 1
        return counts

    async def settled_worker_connections(self, workers: int) -> Counter[str]:
        """Worker connections per node once the API lists at least one for each of
        ``workers`` processes: it learns of a connection only at its next statistics
        interval (``collect_statistics_interval``, 5 s by default)."""
        deadline = time.monotonic() + _STATISTICS_WAIT
        while True:
            connections = await self.worker_connections()
            if connections.total() >= workers or time.monotonic() > deadline:
                return connections
            await asyncio.sleep(0.5)

    async def shares(
        self, depths: Mapping[str, int], seconds: float, workers: int
    ) -> list[NodeShare]:
        """Every node's share of a run of ``workers`` processes whose stream was routed as
        ``depths`` (queue: writes) and applied in ``seconds``; call while the run's workers
        are still connected."""
        leaders = await self.leaders(list(depths))
        memory = await self.node_memory()
        connections = await self.settled_worker_connections(workers)
        shares = []
        for node in sorted(memory):
            led = tuple(name for name, leader in leaders.items() if leader == node)
            writes = sum(depths[name] for name in led)
            shares.append(
                NodeShare(
                    node,
                    led,
                    writes,
                    writes / seconds if seconds > 0 else 0.0,
                    connections[node],
                    memory[node],
                )
            )
        return shares
