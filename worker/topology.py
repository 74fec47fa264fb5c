"""Exchanges, queues and bindings of protocol §2, declared in one place.

Every name shares the configured prefix. Declaring is idempotent: each worker declares
the topology at start-up, and RabbitMQ refuses (PRECONDITION_FAILED) a queue that exists
with other arguments, which then surfaces as a clear start-up error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
from pamqp.common import FieldTable

from schemas import topology
from schemas.topology import Names
from worker.config import Settings

__all__ = ["Names", "Topology", "commands_queue_arguments", "declare"]


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
