"""The test-owned RabbitMQ cluster (``tests/cluster.py``) behaves like a production one:
three nodes in one cluster, quorum queues on all three, a killed leader replaced while its
node comes back, a cut-off node paused and back without losing a confirmed message.

Each test prints what it did and what it found (``pytest -s``). The number of messages is
``PLUGIN_STATE_CLUSTER_MESSAGES`` (``make cluster-test`` runs more than CI does).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from .cluster import RabbitCluster
from .conftest import unique
from .helpers import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

MESSAGES = int(os.environ.get("PLUGIN_STATE_CLUSTER_MESSAGES", "200"))
CONFIRM_TIMEOUT = 10.0
FAILOVER_TIMEOUT = 60.0
PUBLISH_BATCH = 100


@pytest.fixture
async def cluster(rabbit_cluster: RabbitCluster) -> AsyncIterator[RabbitCluster]:
    """The session's cluster, mended after the test: every node back and running."""
    yield rabbit_cluster
    await rabbit_cluster.mend()


@pytest.fixture
async def quorum_queue(cluster: RabbitCluster) -> AsyncIterator[str]:
    """A quorum queue of the test's own with a member on every node."""
    name = unique("qq")
    connection = await aio_pika.connect(cluster.urls[0])
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(
            name,
            durable=True,
            arguments={"x-queue-type": "quorum", "x-quorum-initial-group-size": len(cluster.nodes)},
        )
    yield name
    await cluster.mend()
    connection = await aio_pika.connect(cluster.urls[0])
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name)


async def confirmed_channel(url: str) -> tuple[aio_pika.abc.AbstractConnection, AbstractChannel]:
    connection = await aio_pika.connect(url)
    return connection, await connection.channel(publisher_confirms=True)


async def publish(channel: AbstractChannel, queue: str, bodies: list[bytes]) -> None:
    """Publish persistent messages, each confirmed by the broker (raises otherwise)."""
    for start in range(0, len(bodies), PUBLISH_BATCH):
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=queue,
                    timeout=CONFIRM_TIMEOUT,
                )
                for body in bodies[start : start + PUBLISH_BATCH]
            )
        )


async def publish_once_possible(url: str, queue: str, body: bytes) -> float:
    """Publish ``body`` through ``url`` until the broker confirms it; the seconds it took."""
    started = time.monotonic()

    async def confirmed() -> bool:
        try:
            connection, channel = await confirmed_channel(url)
            async with connection:
                await publish(channel, queue, [body])
        except (
            aio_pika.exceptions.AMQPException,
            aio_pika.exceptions.ChannelInvalidStateError,
            TimeoutError,
            OSError,
        ):
            return False  # no leader yet, or the node we publish through lost it
        return True

    await wait_until(confirmed, FAILOVER_TIMEOUT, f"a confirmed publish to {queue}")
    return time.monotonic() - started


async def consume_all(url: str, queue: str, expected: int) -> list[bytes]:
    """Consume and ack until ``expected`` messages arrived; their bodies."""
    bodies: list[bytes] = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=500)
        source = await channel.get_queue(queue, ensure=False)

        async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            bodies.append(message.body)
            await message.ack()

        tag = await source.consume(take)

        async def all_arrived() -> bool:
            return len(bodies) >= expected

        await wait_until(all_arrived, 60, f"{expected} messages from {queue}")
        await source.cancel(tag)
    return bodies


def messages(label: str, count: int) -> list[bytes]:
    return [f"{label}-{index}".encode() for index in range(count)]


async def test_three_nodes_form_one_cluster(cluster: RabbitCluster) -> None:
    for node in cluster.nodes:
        status = await cluster.cluster_status(node)
        print(
            f"{node}: running {sorted(status['running_nodes'])}, partitions {status['partitions']}"
        )
        assert set(status["running_nodes"]) == set(cluster.nodes)
        assert set(status["disk_nodes"]) == set(cluster.nodes)
        assert not status["partitions"]
    # The consistent-hash exchange plugin is enabled on every node.
    for url in cluster.urls:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(unique("chx"), "x-consistent-hash")
            await exchange.delete()
    print(f"an x-consistent-hash exchange declared through each of {cluster.urls}")


async def test_quorum_queue_has_a_leader_and_a_member_on_every_node(
    cluster: RabbitCluster, quorum_queue: str
) -> None:
    info = await cluster.queue_info(quorum_queue)
    states = {
        row["Node Name"]: row["Raft State"] for row in await cluster.quorum_status(quorum_queue)
    }
    print(f"{quorum_queue}: leader {info['leader']}, members {sorted(info['members'])}")
    print(f"quorum_status: {states}")
    assert info["type"] == "quorum"
    assert info["leader"] in cluster.nodes
    assert sorted(info["members"]) == sorted(cluster.nodes)
    assert sorted(info["online"]) == sorted(cluster.nodes)
    assert states == {
        node: "leader" if node == info["leader"] else "follower" for node in cluster.nodes
    }


async def test_publishing_through_another_node_succeeds_after_the_leaders_node_is_killed(
    cluster: RabbitCluster, quorum_queue: str
) -> None:
    before = messages("before", MESSAGES)
    connection, channel = await confirmed_channel(cluster.urls[0])
    async with connection:
        await publish(channel, quorum_queue, before)
    leader = await cluster.leader_of(quorum_queue)
    other = next(node for node in cluster.nodes if node != leader)

    await cluster.kill(leader)
    waited = await publish_once_possible(cluster.url(other), quorum_queue, b"after-kill")
    new_leader = await cluster.leader_of(quorum_queue)
    print(f"killed {leader} (leader); a publish through {other} confirmed after {waited:.1f}s")
    print(f"new leader: {new_leader}")
    assert new_leader != leader

    started = time.monotonic()
    await cluster.start(leader)

    async def all_members_online() -> bool:
        info = await cluster.queue_info(quorum_queue)
        return sorted(info["online"]) == sorted(cluster.nodes)

    await wait_until(all_members_online, FAILOVER_TIMEOUT, f"{leader}'s member back online")
    rejoined = time.monotonic() - started
    print(f"{leader} restarted, rejoined and back in {quorum_queue} in {rejoined:.1f}s")

    received = await consume_all(cluster.url(leader), quorum_queue, MESSAGES + 1)
    print(f"consumed {len(received)} messages through {leader}")
    assert set(received) == {*before, b"after-kill"}


async def test_a_cut_off_node_pauses_and_comes_back_without_losing_confirmed_messages(
    cluster: RabbitCluster, quorum_queue: str
) -> None:
    before = messages("before", MESSAGES)
    during = messages("during", MESSAGES)
    connection, channel = await confirmed_channel(cluster.urls[0])
    async with connection:
        await publish(channel, quorum_queue, before)
    cut = await cluster.leader_of(quorum_queue)  # the hardest one to lose
    majority = [node for node in cluster.nodes if node != cut]

    started = time.monotonic()
    await cluster.partition(cut)
    await cluster.wait_running(majority, timeout=FAILOVER_TIMEOUT)

    await cluster.wait_paused(cut, timeout=FAILOVER_TIMEOUT)
    print(
        f"cut {cut} (leader) off: {majority} report it down and it paused "
        f"after {time.monotonic() - started:.1f}s"
    )
    with pytest.raises(aio_pika.exceptions.AMQPConnectionError):
        await aio_pika.connect(cluster.url(cut), timeout=CONFIRM_TIMEOUT)
    connection, channel = await confirmed_channel(cluster.url(majority[0]))
    async with connection:
        await publish(channel, quorum_queue, during)
    print(f"{cut} refused AMQP; published {len(during)} more through {majority[0]}")

    started = time.monotonic()
    await cluster.heal(cut)
    await cluster.wait_running(timeout=FAILOVER_TIMEOUT)
    healed = time.monotonic() - started
    statuses = [await cluster.cluster_status(node) for node in cluster.nodes]
    info = await cluster.queue_info(quorum_queue)
    print(f"healed: 3 nodes running after {healed:.1f}s, leader {info['leader']}")
    assert all(not status["partitions"] for status in statuses)

    received = await consume_all(cluster.url(cut), quorum_queue, 2 * MESSAGES)
    print(f"consumed {len(received)} messages through {cut}: none lost")
    assert set(received) == {*before, *during}
