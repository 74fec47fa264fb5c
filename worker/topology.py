"""Exchanges, queues and bindings of protocol §2, declared in one place.

Every name shares the configured prefix. Declaring is idempotent: each worker declares
the topology at start-up, and RabbitMQ refuses (PRECONDITION_FAILED) a queue that exists
with other arguments, which then surfaces as a clear start-up error.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
from pamqp.common import FieldTable

from worker.config import Settings


@dataclass(frozen=True, slots=True)
class Names:
    """The names of the topology for one prefix."""

    prefix: str

    @property
    def exchange(self) -> str:
        return self.prefix

    @property
    def commands_queue(self) -> str:
        return f"{self.prefix}.commands"

    @property
    def rpc_queue(self) -> str:
        return f"{self.prefix}.rpc"

    @property
    def dead(self) -> str:
        """The dead-letter exchange and its queue share this name."""
        return f"{self.prefix}.dead"

    @staticmethod
    def command_key(plugin_id: uuid.UUID | str) -> str:
        return f"cmd.{plugin_id}"

    @staticmethod
    def rpc_key(plugin_id: uuid.UUID | str) -> str:
        return f"rpc.{plugin_id}"


def commands_queue_arguments(settings: Settings) -> FieldTable:
    names = Names(settings.prefix)
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": names.dead,
        # A command that keeps crashing its consumer is dead-lettered by RabbitMQ itself
        # after this many deliveries, instead of looping forever.
        "x-delivery-limit": settings.delivery_limit,
        # A flood pushes back on publishers (their confirms are nacked) instead of
        # exhausting the broker.
        "x-max-length": settings.commands_max_length,
        "x-overflow": "reject-publish",
    }


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
        names.dead, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead.bind(dead_exchange)
    commands = await channel.declare_queue(
        names.commands_queue, durable=True, arguments=commands_queue_arguments(settings)
    )
    await commands.bind(exchange, routing_key=names.command_key("*"))
    rpc = await channel.declare_queue(names.rpc_queue, durable=True)
    await rpc.bind(exchange, routing_key=names.rpc_key("*"))
    return Topology(exchange, commands, rpc, dead_exchange, dead)
