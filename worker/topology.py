"""Exchanges, queues and bindings of protocol §2, declared in one place.

Every name shares the configured prefix. Declaring is idempotent: each worker declares
the topology at start-up, and RabbitMQ refuses (PRECONDITION_FAILED) a queue that exists
with other arguments, which then surfaces as a clear start-up error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
from pamqp.common import FieldTable

from schemas import topology
from schemas.topology import Names
from worker.config import Settings

__all__ = ["Names", "Topology", "commands_queue_arguments", "declare", "declare_again"]


def commands_queue_arguments(settings: Settings) -> FieldTable:
    """The commands queue's arguments for these settings (``schemas.topology``)."""
    arguments = topology.commands_queue_arguments(
        Names(settings.prefix), settings.delivery_limit, settings.commands_max_length
    )
    return cast(FieldTable, arguments)


@dataclass(frozen=True, slots=True)
class Topology:
    exchange: AbstractExchange
    commands: AbstractQueue
    rpc: AbstractQueue
    dead_exchange: AbstractExchange
    dead: AbstractQueue


async def declare(channel: AbstractChannel, settings: Settings) -> Topology:
    """Declare (idempotently) every exchange, queue and binding of the protocol."""
    names = Names(settings.prefix)
    exchange = await channel.declare_exchange(
        names.exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dead_exchange = await channel.declare_exchange(
        names.dead, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead = await channel.declare_queue(
        names.dead, durable=True, arguments={"x-queue-type": topology.DEAD_QUEUE_TYPE}
    )
    await dead.bind(dead_exchange)
    commands = await channel.declare_queue(
        names.commands_queue, durable=True, arguments=commands_queue_arguments(settings)
    )
    await commands.bind(exchange, routing_key=names.command_key("*"))
    rpc = await channel.declare_queue(names.rpc_queue, durable=True)
    await rpc.bind(exchange, routing_key=names.rpc_key("*"))
    return Topology(exchange, commands, rpc, dead_exchange, dead)


async def declare_again(
    channel: aiormq.abc.AbstractChannel, settings: Settings, queue: str
) -> None:
    """Declare a consumed queue (the commands or the rpc queue), its exchange and its binding
    again, as ``declare`` does: after the broker cancelled its consumer because it was
    deleted, or lost with its node. On the raw channel, so that no robust channel keeps
    the declaration to replay (and fail) when it reopens."""
    names = Names(settings.prefix)
    arguments, key = {
        names.commands_queue: (commands_queue_arguments(settings), names.command_key("*")),
        names.rpc_queue: (None, names.rpc_key("*")),
    }[queue]
    await channel.exchange_declare(names.exchange, exchange_type="topic", durable=True)
    await channel.queue_declare(queue, durable=True, arguments=arguments)
    await channel.queue_bind(queue, names.exchange, routing_key=key)
