"""The topology of protocol §2, declared idempotently under the configured prefix."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import aiormq
import pytest

from worker.config import Settings
from worker.topology import (
    Names,
    PartitionsUnavailable,
    commands_queue_arguments,
    consistent_hash_available,
    declare,
)

from .broker import rabbitmqctl, require_rabbitmqctl
from .helpers import publish, queue_messages, set_cmd, wait_until


async def test_declaring_twice_is_idempotent_and_routes_by_kind(
    amqp: aio_pika.abc.AbstractChannel, settings: Settings, plugin_id: uuid.UUID
) -> None:
    await declare(amqp, settings)
    topology = await declare(amqp, settings)
    names = Names(settings.prefix)
    await publish(amqp, settings.prefix, plugin_id, set_cmd(plugin_id, "k", 1))
    await publish(amqp, settings.prefix, plugin_id, b"{}", kind="rpc")

    async def routed() -> bool:
        commands = await amqp.declare_queue(names.commands_queue, passive=True)
        rpc = await amqp.declare_queue(names.rpc_queue, passive=True)
        return (
            commands.declaration_result.message_count,
            rpc.declaration_result.message_count,
        ) == (1, 1)

    await wait_until(routed, what="one message in each queue")
    assert topology.commands.name == f"{settings.prefix}.commands"


async def test_queues_have_the_declared_types_and_dead_lettering(
    amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    require_rabbitmqctl()
    await declare(amqp, settings)
    listing = await rabbitmqctl("list_queues", "--no-table-headers", "name", "type", "arguments")
    rows = {line.split("\t")[0]: line for line in listing.splitlines()}
    names = Names(settings.prefix)
    commands = rows[names.commands_queue]
    assert "quorum" in commands
    assert names.dead in commands and "x-delivery-limit" in commands
    assert "reject-publish" in commands
    assert "quorum" in rows[names.dead]


async def test_a_command_redelivered_past_the_delivery_limit_is_dead_lettered_by_rabbitmq(
    amqp: aio_pika.abc.AbstractChannel, settings: Settings, plugin_id: uuid.UUID
) -> None:
    """The crash-loop guard: a message that keeps coming back ends in the dead queue."""
    settings = settings.with_changes(delivery_limit=2)
    topology = await declare(amqp, settings)
    await publish(amqp, settings.prefix, plugin_id, set_cmd(plugin_id, "poison", 1))
    returned = 0
    while returned < 10:
        message = await topology.commands.get(fail=False, no_ack=False)
        if message is None:
            break
        await message.nack(requeue=True)  # as if the consumer crashed holding it
        returned += 1
        await asyncio.sleep(0)

    async def dead() -> bool:
        queue = await amqp.declare_queue(Names(settings.prefix).dead, passive=True)
        return bool(queue.declaration_result.message_count)

    await wait_until(dead, what="the message to be dead-lettered")
    [message] = await queue_messages(amqp, Names(settings.prefix).dead)
    assert "x-death" in (message.headers or {})
    assert returned <= 3


async def test_queues_declared_before_replica_counts_are_kept_but_other_arguments_checked(
    amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    """A deployment's queues made without ``x-quorum-initial-group-size`` (creation-only)
    are used as they are; a changed argument that matters still stops the start."""
    names = Names(settings.prefix)
    await amqp.declare_queue(
        names.commands_queue,
        durable=True,
        arguments=commands_queue_arguments(settings),  # what it was declared with before
    )
    await amqp.declare_queue(names.dead, durable=True, arguments={"x-queue-type": "quorum"})
    topology = await declare(amqp, settings)
    print(f"declared over the old {topology.commands.name} and {names.dead}")
    assert topology.command_queues == (names.commands_queue,)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="x-delivery-limit"):
            await declare(await connection.channel(), settings.with_changes(delivery_limit=7))
    print("a changed delivery limit is still refused")


async def test_a_quorum_rpc_queue_takes_the_reads_from_the_classic_one(
    amqp: aio_pika.abc.AbstractChannel, settings: Settings, plugin_id: uuid.UUID
) -> None:
    names = Names(settings.prefix)
    await declare(amqp, settings)
    topology = await declare(amqp, settings.with_changes(rpc_queue_type="quorum"))
    await publish(amqp, settings.prefix, plugin_id, b"{}", kind="rpc")

    async def routed() -> bool:
        quorum = await amqp.declare_queue(names.rpc_quorum_queue, passive=True)
        return quorum.declaration_result.message_count == 1

    await wait_until(routed, what="the read in the quorum rpc queue")
    classic = await amqp.declare_queue(names.rpc_queue, passive=True)
    print(f"reads go to {topology.rpc.name}; {names.rpc_queue} is unbound")
    assert topology.rpc.name == names.rpc_quorum_queue
    assert classic.declaration_result.message_count == 0


async def test_partitions_on_a_broker_without_the_consistent_hash_exchange_say_so(
    settings: Settings,
) -> None:
    if await consistent_hash_available(settings.amqp_url):
        pytest.skip("this broker has the consistent-hash exchange")
    connection = await aio_pika.connect(settings.amqp_url)
    with pytest.raises(PartitionsUnavailable, match="consistent-hash") as refused:
        await declare(await connection.channel(), settings.with_changes(command_partitions=3))
    print(f"refused: {refused.value}")
    await connection.close()
