"""Partitioned commands queues and a quorum rpc queue on the test-owned 3-node cluster
(``tests/cluster.py``): the partitions' leaders spread over the nodes, publishers see one
exchange, a command without ``message_id`` still arrives, changing the number of partitions
loses nothing, writes and reads go on while the node leading a partition is killed, and a
node cut off by a network partition under writes heals without loss.

Each test prints what it did and what it found (``pytest -s``). The number of writes is
``PLUGIN_STATE_CLUSTER_MESSAGES`` (200 in CI; ``make cluster-test`` runs more).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import aio_pika
import aiormq
import asyncpg
import pytest

from worker.app import Worker
from worker.client import Scope, StateClient
from worker.config import Settings
from worker.topology import PARTITION_WEIGHT, Names, declare

from .cluster import RabbitCluster
from .conftest import delete_topology, unique
from .helpers import PUBLISHER, encode, set_cmd, state_of, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

MESSAGES = int(os.environ.get("PLUGIN_STATE_CLUSTER_MESSAGES", "200"))
PARTITIONS = 3
FAILOVER_TIMEOUT = 60.0
CONFIRM_TIMEOUT = 5.0
READ_GAP_BOUND = 30.0
"""Longest a reader may go unanswered around a kill: the quorum rpc queue elects a leader
within seconds; the rest is the reader finding a live node."""
PUBLISH_FAILURES = (
    aio_pika.exceptions.AMQPException,
    aiormq.exceptions.AMQPError,
    OSError,
    TimeoutError,
    RuntimeError,  # a closed channel
)


@pytest.fixture
async def cluster(rabbit_cluster: RabbitCluster) -> AsyncIterator[RabbitCluster]:
    yield rabbit_cluster
    await rabbit_cluster.mend()


@pytest.fixture
async def on_cluster(cluster: RabbitCluster, settings: Settings) -> AsyncIterator[Settings]:
    """The test's settings on the cluster's first node, a prefix of their own, N partitions
    and a quorum rpc queue; the topology is deleted afterwards."""
    prefix = unique("psp")
    yield settings.with_changes(
        amqp_url=cluster.urls[0],
        prefix=prefix,
        command_partitions=PARTITIONS,
        rpc_queue_type="quorum",
    )
    await cluster.mend()
    await delete_topology(cluster.urls[0], prefix)
    connection = await aio_pika.connect(cluster.urls[0])
    async with connection:
        channel = await connection.channel()
        for exchange in (f"{prefix}.commits", Names(prefix).changes):
            await channel.exchange_delete(exchange)


async def queue_depths(channel: aio_pika.abc.AbstractChannel, names: list[str]) -> list[int]:
    depths = []
    for name in names:
        queue = await channel.declare_queue(name, passive=True)
        depths.append(queue.declaration_result.message_count or 0)
    return depths


async def dead_letters(url: str, names: Names) -> int:
    connection = await aio_pika.connect(url)
    async with connection:
        [dead] = await queue_depths(await connection.channel(), [names.dead])
    return dead


async def publish_commands(
    channel: aio_pika.abc.AbstractChannel,
    prefix: str,
    bodies: list[dict[str, object]],
    *,
    message_id: bool = True,
) -> None:
    exchange = await channel.get_exchange(prefix, ensure=False)
    await asyncio.gather(
        *(
            exchange.publish(
                aio_pika.Message(
                    encode(body),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    user_id=PUBLISHER,
                    message_id=str(body["id"]) if message_id else None,
                ),
                routing_key=f"cmd.{body['plugin_id']}",
                mandatory=True,
                timeout=CONFIRM_TIMEOUT,
            )
            for body in bodies
        )
    )


async def test_partitions_are_led_by_every_node_and_take_every_command(
    cluster: RabbitCluster, on_cluster: Settings, plugin_id: uuid.UUID
) -> None:
    settings = on_cluster
    names = Names(settings.prefix)
    partitions = [names.commands_partition(i) for i in range(PARTITIONS)]
    connection = await aio_pika.connect(cluster.urls[0])
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare(channel, settings)
        leaders = [await cluster.leader_of(name) for name in partitions]
        members = [sorted((await cluster.queue_info(name))["members"]) for name in partitions]
        print(f"partitions {list(topology.command_queues)}, leaders {leaders}")
        assert topology.command_queues == tuple(partitions)
        assert sorted(leaders) == sorted(cluster.nodes), "one leader per node"
        assert all(m == sorted(cluster.nodes) for m in members), "a replica on every node"

        # Without message_id, the plugin hashes the missing property as one value: every
        # such command goes to the same partition (published mandatory: a drop would raise).
        await publish_commands(
            channel, settings.prefix, [set_cmd(plugin_id, "no-id", 1)], message_id=False
        )
        without_id = await queue_depths(channel, partitions)
        print(f"a command without message_id: partition depths {without_id}")
        assert sum(without_id) == 1
        # With no partition bound to the hash exchange (an operator's mistake, a rebinding),
        # its alternate exchange takes commands to partition 0.
        for name in partitions:
            await channel.declare_queue(name, passive=True)
            await (await channel.get_queue(name, ensure=False)).unbind(
                names.commands_hash, PARTITION_WEIGHT
            )
        await publish_commands(channel, settings.prefix, [set_cmd(plugin_id, "unhashed", 1)])
        unhashed = await queue_depths(channel, partitions)
        print(f"with no partition bound to the hash exchange: depths {unhashed}")
        assert [a - b for a, b in zip(unhashed, without_id, strict=True)] == [1, 0, 0]
        await declare(channel, settings)  # binds them again

        await publish_commands(
            channel, settings.prefix, [set_cmd(plugin_id, f"k{i}", i) for i in range(MESSAGES)]
        )
        depths = await queue_depths(channel, partitions)
        print(f"{MESSAGES} commands with message_id: partition depths {depths}")
        assert sum(depths) == MESSAGES + 2
        assert all(depth >= MESSAGES // (PARTITIONS * 3) for depth in depths), "spread out"


async def test_changing_the_number_of_partitions_loses_nothing(
    cluster: RabbitCluster, on_cluster: Settings, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    """1 → 3 → 2 partitions with writes left in each former queue, then workers of the
    last count: every write applied, the former queues drained."""
    settings = on_cluster
    names = Names(settings.prefix)
    third = max(1, MESSAGES // 3)
    connection = await aio_pika.connect(cluster.urls[0])
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        written = 0
        for count in (1, 3, 2):
            await declare(channel, settings.with_changes(command_partitions=count))
            await publish_commands(
                channel,
                settings.prefix,
                [set_cmd(plugin_id, f"k{i}", i) for i in range(written, written + third)],
            )
            written += third
        former = [names.commands_queue, names.commands_partition(2)]
        held = await queue_depths(channel, former)
        print(f"{written} writes published over 1, 3 then 2 partitions; left in {former}: {held}")
        assert all(held), "each former queue holds writes"

        workers = [Worker(settings.with_changes(command_partitions=2)) for _ in range(2)]
        for worker in workers:
            await worker.start()
        serving = [asyncio.create_task(worker.serve()) for worker in workers]
        try:
            assert workers[0].consumer is not None
            consumed = workers[0].consumer.subscription
            print(f"a worker of 2 partitions consumes {getattr(consumed, 'queues', None)}")

            async def all_applied() -> bool:
                return len(await state_of(db, plugin_id)) == written

            await wait_until(all_applied, FAILOVER_TIMEOUT, f"{written} writes applied")
            assert await queue_depths(channel, former) == [0, 0]
            print("all applied; the former queues are empty")
        finally:
            for worker in workers:
                worker.request_stop()
            await asyncio.gather(*serving)


# ---------------------------------------------------------------------------- chaos


@dataclass
class Failover:
    """A connection that moves to the next node when its node fails."""

    cluster: RabbitCluster
    start: int
    moves: int = 0

    def url(self) -> str:
        return self.cluster.urls[(self.start + self.moves) % len(self.cluster.urls)]


@dataclass
class Publisher:
    """Publishes writes with confirms through one node, moving to another node and
    publishing again (the same write) until each is confirmed."""

    failover: Failover
    prefix: str
    confirmed: dict[str, tuple[uuid.UUID, int]] = field(default_factory=dict)
    published: int = 0
    retries: int = 0
    _connection: aio_pika.abc.AbstractConnection | None = None
    _channel: aio_pika.abc.AbstractChannel | None = None

    async def write(self, body: dict[str, object]) -> None:
        while True:
            try:
                if self._channel is None:
                    self._connection = await aio_pika.connect(self.failover.url(), timeout=5)
                    self._channel = await self._connection.channel(publisher_confirms=True)
                await publish_commands(self._channel, self.prefix, [body])
            except PUBLISH_FAILURES:
                self.retries += 1
                await self.close()
                self.failover.moves += 1
                await asyncio.sleep(0.2)  # back-off before the next node, not a wait for an effect
                continue
            self.published += 1
            key = str(body["key"])
            version = uuid.UUID(str(body["id"]))
            if key not in self.confirmed or self.confirmed[key][0] < version:
                self.confirmed[key] = (version, int(str(body["value"])))
            return

    async def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):  # a dead node's connection
                await asyncio.wait_for(connection.close(), 5)


@dataclass
class Reader:
    """Reads all along through a quorum rpc queue, moving nodes when one fails; records
    when each read was answered."""

    failover: Failover
    prefix: str
    plugin_id: uuid.UUID
    answered: list[float] = field(default_factory=list)
    failed: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            client = StateClient(self.failover.url(), self.plugin_id, prefix=self.prefix, timeout=2)
            try:
                await client.connect()
                while not stop.is_set():
                    await client.get(Scope.instance(), "k0")
                    self.answered.append(time.monotonic())
                    await asyncio.sleep(0.05)  # a reader's pace
            except Exception:  # noqa: BLE001 - any failure: count it, move on
                self.failed += 1
                self.failover.moves += 1
            finally:
                with contextlib.suppress(Exception):  # a dead node's connection
                    await asyncio.wait_for(client.close(), 5)

    def longest_gap(self, since: float) -> float:
        times = [since, *self.answered, time.monotonic()]
        return max(b - a for a, b in itertools.pairwise(times))


@dataclass
class Writes:
    """Two publishers writing ``MESSAGES`` sets over a few keys, both to every key."""

    publishers: list[Publisher]
    plugin_id: uuid.UUID
    keys: int = max(10, MESSAGES // 10)
    sequence: Iterator[int] = field(default_factory=lambda: iter(range(MESSAGES)))

    async def publish(self, count: int) -> None:
        async def one(publisher: Publisher) -> None:
            for _ in range(count // 2):
                if (i := next(self.sequence, None)) is None:
                    return
                write = set_cmd(
                    self.plugin_id, f"k{i % self.keys}", i, scope_kind="instance", scope_id=None
                )
                await publisher.write(write)

        await asyncio.gather(*(one(p) for p in self.publishers))

    def model(self) -> dict[str, int]:
        """Every key's value by the newest confirmed write of either publisher."""
        versions: dict[str, tuple[uuid.UUID, int]] = {}
        for publisher in self.publishers:
            for key, (version, value) in publisher.confirmed.items():
                if key not in versions or versions[key][0] < version:
                    versions[key] = (version, value)
        return {key: value for key, (_, value) in versions.items()}


def node_of(cluster: RabbitCluster, worker: Worker) -> str:
    """The node a running worker's connection is on."""
    assert worker.connection is not None
    address = worker.connection.node  # type: ignore[attr-defined]
    return next(n for n in cluster.nodes if cluster.url(n).endswith(f"{address}/"))


@dataclass
class Chaos:
    """Workers (one per settings), two publishers and a reader, all running until closed;
    ``check_end`` settles the run and checks what every chaos test must find."""

    cluster: RabbitCluster
    workers: list[Worker]
    writes: Writes
    reader: Reader
    started: float = field(default_factory=time.monotonic)
    _serving: list[asyncio.Task[None]] = field(default_factory=list)
    _stop_reading: asyncio.Event = field(default_factory=asyncio.Event)
    _reading: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        cluster: RabbitCluster,
        worker_settings: list[Settings],
        plugin_id: uuid.UUID,
        *,
        publishers_at: int | None = 0,
        reader_at: int | None = 2,
        home: Callable[[list[Worker]], Awaitable[str]] | None = None,
    ) -> Chaos:
        """Publishers on nodes ``publishers_at`` and the next, the reader on ``reader_at``
        (``None``: the node ``home`` picks once the workers run)."""
        workers = [Worker(settings) for settings in worker_settings]
        for worker in workers:
            await worker.start()
        first = 0 if home is None else cluster.nodes.index(await home(workers))
        prefix = worker_settings[0].prefix
        publishers = [
            Publisher(
                Failover(cluster, (first if publishers_at is None else publishers_at) + i), prefix
            )
            for i in range(2)
        ]
        reader = Reader(
            Failover(cluster, first if reader_at is None else reader_at), prefix, plugin_id
        )
        chaos = cls(cluster, workers, Writes(publishers, plugin_id), reader)
        chaos._serving = [asyncio.create_task(worker.serve()) for worker in workers]
        chaos._reading = asyncio.create_task(chaos.reader.run(chaos._stop_reading))
        return chaos

    async def check_end(self, db: asyncpg.Pool, names: Names) -> None:
        """The rest of the writes; then the state equals the model of every confirmed write,
        every worker consumes again, the reads' longest gap is bounded, nothing is dead."""
        publishers = self.writes.publishers
        await self.writes.publish(MESSAGES)
        model = self.writes.model()
        print(
            f"{sum(p.published for p in publishers)} writes confirmed by 2 publishers "
            f"({sum(p.retries for p in publishers)} publishes retried on another node)"
        )

        async def converged() -> bool:
            state = await state_of(db, self.writes.plugin_id)
            return {k[3]: v for k, v in state.items()} == model

        await wait_until(converged, FAILOVER_TIMEOUT, "the state to equal the model")
        print(f"final state equals the model: {len(model)} entries, each its newest write")

        async def all_consuming() -> bool:
            return all(w.consumer is not None and w.consumer.consuming for w in self.workers)

        await wait_until(all_consuming, FAILOVER_TIMEOUT, "every worker consuming again")
        self._stop_reading.set()
        assert self._reading is not None
        await asyncio.wait_for(self._reading, 10)
        gap = self.reader.longest_gap(self.started)
        print(
            f"reads answered: {len(self.reader.answered)}, failed and retried: "
            f"{self.reader.failed}, longest gap {gap:.1f}s; every worker consuming again"
        )
        assert gap < READ_GAP_BOUND
        dead = await dead_letters(self.cluster.urls[0], names)
        print(f"dead letters: {dead}")
        assert dead == 0

    async def close(self) -> None:
        self._stop_reading.set()
        for worker in self.workers:
            worker.request_stop()
        await asyncio.wait_for(asyncio.gather(*self._serving, return_exceptions=True), 60)
        for publisher in self.writes.publishers:
            await publisher.close()
        if self._reading is not None and not self._reading.done():
            self._reading.cancel()


async def test_writes_and_reads_go_on_while_partition_leaders_are_killed(
    cluster: RabbitCluster, on_cluster: Settings, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    settings = on_cluster
    names = Names(settings.prefix)
    chaos = await Chaos.start(
        cluster, [settings.with_changes(amqp_url=url) for url in cluster.urls], plugin_id
    )
    writes = chaos.writes

    async def kill_and_restart(node: str) -> float:
        began = time.monotonic()
        await asyncio.gather(cluster.kill(node), writes.publish(MESSAGES // 4))
        await asyncio.gather(cluster.start(node), writes.publish(MESSAGES // 8))
        return time.monotonic() - began

    try:
        await writes.publish(MESSAGES // 4)
        first = await cluster.leader_of(names.commands_partition(0))
        rpc_leader = await cluster.leader_of(names.rpc_quorum_queue)
        took = await kill_and_restart(first)
        print(f"killed {first} (leader of partition 0) under writes; back after {took:.1f}s")
        # The second: the rpc queue's leader if the first was not, else another partition's.
        leaders = {await cluster.leader_of(names.commands_partition(i)) for i in range(PARTITIONS)}
        second = rpc_leader if rpc_leader != first else min(leaders - {first})
        took = await kill_and_restart(second)
        print(
            f"killed {second} (leading a partition; the rpc queue's leader was {rpc_leader}) "
            f"under writes; back after {took:.1f}s"
        )
        await chaos.check_end(db, names)
    finally:
        await chaos.close()


async def test_a_node_cut_off_by_a_network_partition_under_writes_heals_without_loss(
    cluster: RabbitCluster, on_cluster: Settings, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    """Three workers, each given every node; the node leading the most partitions (with a
    worker on it, when there is a choice) is cut off from its peers and from every client by
    the test's proxies while two publishers and a reader (both starting on that node) go on,
    then healed."""
    settings = on_cluster.with_changes(amqp_url=",".join(cluster.urls))
    names = Names(settings.prefix)
    leaders: dict[str, list[int]] = {}

    async def to_cut(workers: list[Worker]) -> str:
        """The node leading the most partitions, of those the one with most workers."""
        for i in range(PARTITIONS):
            leaders.setdefault(await cluster.leader_of(names.commands_partition(i)), []).append(i)
        homes = [node_of(cluster, worker) for worker in workers]
        return max(cluster.nodes, key=lambda node: (len(leaders.get(node, [])), homes.count(node)))

    chaos = await Chaos.start(
        cluster, [settings] * 3, plugin_id, publishers_at=None, reader_at=None, home=to_cut
    )
    writes = chaos.writes
    try:
        cut = cluster.nodes[chaos.writes.publishers[0].failover.start % len(cluster.nodes)]
        on_cut = [w for w in chaos.workers if node_of(cluster, w) == cut]
        led = leaders.get(cut, [])
        await writes.publish(MESSAGES // 4)
        began = time.monotonic()
        await cluster.partition(cut)
        await asyncio.gather(
            cluster.wait_paused(cut, timeout=FAILOVER_TIMEOUT), writes.publish(MESSAGES // 4)
        )
        print(
            f"cut {cut} off ({len(on_cut)} of 3 workers on it, leading partitions {led}): it "
            f"paused after {time.monotonic() - began:.1f}s while writes went on"
        )
        await writes.publish(MESSAGES // 8)  # with the node away
        began = time.monotonic()
        await cluster.heal(cut)
        await asyncio.gather(
            cluster.wait_running(timeout=FAILOVER_TIMEOUT), writes.publish(MESSAGES // 8)
        )
        statuses = [await cluster.cluster_status(node) for node in cluster.nodes]
        print(f"healed: 3 nodes running together after {time.monotonic() - began:.1f}s")
        assert all(not status["partitions"] for status in statuses)
        await chaos.check_end(db, names)
        moved = [node_of(cluster, w) for w in on_cut]
        print(f"the workers that were on {cut} are on {moved}")
        assert cut not in moved
    finally:
        await chaos.close()


async def read_latencies(settings: Settings, plugin_id: uuid.UUID, count: int) -> list[float]:
    """``count`` sequential gets through one worker of ``settings``, in milliseconds."""
    worker = Worker(settings)
    await worker.start()
    serving = asyncio.create_task(worker.serve())
    try:
        async with StateClient(settings.amqp_url, plugin_id, prefix=settings.prefix) as client:
            await client.set(Scope.instance(), "read", 1, wait=True)
            for _ in range(20):  # warm-up
                await client.get(Scope.instance(), "read")
            latencies = []
            for _ in range(count):
                began = time.perf_counter()
                await client.get(Scope.instance(), "read")
                latencies.append((time.perf_counter() - began) * 1000)
    finally:
        worker.request_stop()
        await serving
    return sorted(latencies)


async def test_read_latency_of_a_classic_and_a_quorum_rpc_queue(
    cluster: RabbitCluster, on_cluster: Settings, plugin_id: uuid.UUID
) -> None:
    """The cost of reads that survive a node: the same worker and client (on node 1) reading
    through the classic rpc queue, then, after switching the same prefix over, through the
    quorum one (replicated on 3 nodes)."""
    count = max(200, MESSAGES)
    classic = await read_latencies(
        on_cluster.with_changes(rpc_queue_type="classic"), plugin_id, count
    )
    quorum = await read_latencies(on_cluster, plugin_id, count)
    for name, figures in (("classic", classic), ("quorum", quorum)):
        p50, p99 = figures[len(figures) // 2], figures[int(len(figures) * 0.99) - 1]
        print(f"{name} rpc queue: {count} gets, p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    assert quorum[len(quorum) // 2] < 50, "a quorum rpc queue answers within milliseconds"
