"""A worker and clients on the test-owned 3-node cluster, given every node's URL: when the
node the worker is connected to (and where it declared the classic rpc queue) is killed,
writes go on through the other nodes, the worker moves to another node, reads fail fast
while the rpc queue's node is down, and once it is back the worker consumes the rpc queue
again (the trial's finding: 0 consumers after the node rejoined). Writes published while
the commands queue elects a new leader are confirmed, none refused.

Bounded: ``PLUGIN_STATE_CLUSTER_MESSAGES`` writes (200 in CI), one kill, one restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator

import aio_pika
import asyncpg
import pytest

from worker.app import Worker
from worker.client import Scope, StateClient, Unroutable
from worker.config import Settings
from worker.topology import Names

from .cluster import RabbitCluster
from .conftest import unique
from .helpers import state_of, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

MESSAGES = int(os.environ.get("PLUGIN_STATE_CLUSTER_MESSAGES", "200"))
FAILOVER_TIMEOUT = 60.0


@pytest.fixture
async def cluster(rabbit_cluster: RabbitCluster) -> AsyncIterator[RabbitCluster]:
    yield rabbit_cluster
    await rabbit_cluster.mend()


@pytest.fixture
async def on_cluster(cluster: RabbitCluster, settings: Settings) -> AsyncIterator[Settings]:
    """The test's settings with every node's URL and a prefix of its own; its queues and
    exchanges are deleted afterwards."""
    prefix = unique("psc")
    yield settings.with_changes(amqp_url=",".join(cluster.urls), prefix=prefix)
    await cluster.mend()
    names = Names(prefix)
    connection = await aio_pika.connect(cluster.urls[0])
    async with connection:
        channel = await connection.channel()
        for queue in (names.commands_queue, names.rpc_queue, names.dead):
            await channel.queue_delete(queue)
        for exchange in (names.exchange, names.dead, f"{prefix}.commits", names.changes):
            await channel.exchange_delete(exchange)


async def rpc_consumers(cluster: RabbitCluster, queue: str) -> int:
    listing = await cluster.rabbitmqctl(
        cluster._reachable(), "list_queues", "name", "consumers", "--formatter", "json"
    )
    return next((int(row["consumers"]) for row in json.loads(listing) if row["name"] == queue), 0)


async def test_killing_the_workers_node_moves_it_and_its_reads_come_back(
    cluster: RabbitCluster, on_cluster: Settings, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    settings = on_cluster
    names = Names(settings.prefix)
    worker = Worker(settings)
    await worker.start()
    serving = asyncio.create_task(worker.serve())
    try:
        assert worker.connection is not None
        home = worker.connection.node  # type: ignore[attr-defined]
        node = next(n for n in cluster.nodes if cluster.url(n).endswith(f"{home}/"))
        leader = await cluster.leader_of(names.commands_queue)
        print(f"worker on {node} (where it declared the rpc queue); commands leader {leader}")

        clients = [
            StateClient(settings.amqp_urls, plugin_id, prefix=settings.prefix, timeout=30)
            for _ in range(3)
        ]
        for client in clients:
            await client.connect()
        try:
            half = MESSAGES // 2
            for i in range(half):
                await clients[i % 3].set(Scope.instance(), f"k{i}", i)
            started = time.monotonic()
            kill = asyncio.create_task(cluster.kill(node))
            # Writes while the node dies and, if it led the commands queue, a new leader is
            # elected: each is confirmed (retried through nacks and reconnects), none refused.
            await asyncio.gather(
                *(clients[i % 3].set(Scope.instance(), f"k{i}", i) for i in range(half, MESSAGES))
            )
            await kill
            print(
                f"{MESSAGES - half} writes confirmed across the kill in "
                f"{time.monotonic() - started:.1f}s"
            )

            async def all_applied() -> bool:
                return len(await state_of(db, plugin_id)) == MESSAGES

            await wait_until(all_applied, FAILOVER_TIMEOUT, f"{MESSAGES} writes applied")
            moved = worker.connection.node  # type: ignore[attr-defined]
            print(f"all {MESSAGES} applied; worker now on {moved}")
            assert moved != home

            # The rpc queue's node is down: a read fails fast (the broker returns it), never
            # hangs.
            reader = StateClient(settings.amqp_urls, plugin_id, prefix=settings.prefix, timeout=5)
            async with reader:
                with pytest.raises(Unroutable, match="node is down"):
                    await reader.get(Scope.instance(), "k0")
            assert not worker.readiness()["consuming_reads"]

            started = time.monotonic()
            await cluster.start(node)

            async def consuming_reads_again() -> bool:
                return worker.readiness()["consuming_reads"] and (
                    await rpc_consumers(cluster, names.rpc_queue) == 1
                )

            await wait_until(consuming_reads_again, FAILOVER_TIMEOUT, "the rpc consumer back")
            print(f"{node} back; rpc consumed again after {time.monotonic() - started:.1f}s")
            entry = await clients[0].get(Scope.instance(), f"k{MESSAGES - 1}")
            assert entry is not None and entry.value == MESSAGES - 1
        finally:
            for client in clients:
                await client.close()
    finally:
        worker.request_stop()
        await asyncio.wait_for(serving, 60)
        await worker.stop()
