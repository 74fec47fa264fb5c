"""Exchanges, queues, bindings and partitions of protocol §2, declared in one place.

Every name shares the configured prefix. Declaring is idempotent: each worker declares
the topology at start-up, and RabbitMQ refuses (PRECONDITION_FAILED) a queue that exists
with other arguments, which then surfaces as a clear start-up error; but for the arguments
that only matter when a queue is created (its replica count, where its leader goes), with
which an existing queue is used as it is.

**Partitions.** With ``command_partitions`` = 1, commands go to the one quorum queue
``<prefix>.commands``, bound to the exchange by ``cmd.*``. With N > 1 they go, through an
exchange-to-exchange binding by ``cmd.*``, to a consistent-hash exchange that spreads them by
``message_id`` over the quorum queues ``<prefix>.commands.0`` … ``.N-1`` (leaders placed on
the least loaded nodes); a command without ``message_id`` is hashed as one value (all such
go to one partition), and the hash exchange's alternate exchange takes to partition 0 what
it cannot route (while no partition is bound to it): nothing is dropped. Publishers see no
difference.

Changing N loses nothing: the new routes are bound before the old ones are unbound (a
command meanwhile may be routed twice: a harmless duplicate), and the queues of a former N
stay, unbound, for the workers to drain. The durable record of every partition ever
declared is the queues themselves: a worker consumes ``<prefix>.commands`` if it exists and
``<prefix>.commands.<i>`` for every ``i`` from 0 up to the first that does not exist.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Final, cast

import aio_pika
import aiormq
import aiormq.abc
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
from aiormq.abc import AbstractConnection
from pamqp.common import FieldTable

from schemas import topology
from schemas.topology import Names
from worker.config import MAX_COMMAND_PARTITIONS, Settings

__all__ = [
    "Names",
    "PartitionsUnavailable",
    "Topology",
    "command_queues",
    "commands_queue_arguments",
    "consistent_hash_available",
    "declare",
    "declare_again",
    "rpc_queue_name",
]

log = structlog.get_logger(__name__)

PARTITION_WEIGHT: Final = "1"
"""The binding key of a partition to the consistent-hash exchange: its weight, all equal."""
_INEQUIVALENT: Final = re.compile(r"inequivalent arg '([^']+)'")

_Step = Callable[[aiormq.abc.AbstractChannel], Awaitable[object]]


class PartitionsUnavailable(RuntimeError):
    """Several command partitions need the broker's consistent-hash exchange (the
    rabbitmq_consistent_hash_exchange plugin, on every node); this broker has none."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"{' '.join((self.__doc__ or '').split())} ({detail})")


async def consistent_hash_available(amqp_url: str) -> bool:
    """Whether the broker has the consistent-hash exchange, asked on a connection of its
    own (a broker closes the connection that declares an unknown exchange type)."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        probe = f"plugin_state.probe.{uuid.uuid4().hex}"
        await channel.declare_exchange(
            probe, topology.CONSISTENT_HASH_EXCHANGE_TYPE, auto_delete=True
        )
        await channel.exchange_delete(probe)
    except aiormq.exceptions.ConnectionCommandInvalid:
        return False
    finally:
        await connection.close()
    return True


def commands_queue_arguments(settings: Settings) -> FieldTable:
    """The commands queue's arguments for these settings (``schemas.topology``)."""
    arguments = topology.commands_queue_arguments(
        Names(settings.prefix), settings.delivery_limit, settings.commands_max_length
    )
    return cast(FieldTable, arguments)


def partition_arguments(settings: Settings, *, balanced: bool) -> FieldTable:
    """A commands queue's arguments with its replica count; ``balanced`` places its leader
    on the node that leads the fewest queues (the partitions)."""
    return cast(
        FieldTable,
        {
            **topology.commands_queue_arguments(
                Names(settings.prefix), settings.delivery_limit, settings.commands_max_length
            ),
            **topology.quorum_arguments(settings.quorum_group_size, balanced=balanced),
        },
    )


def rpc_queue_name(settings: Settings) -> str:
    """The queue the read path consumes: ``<prefix>.rpc`` (classic) or ``.rpc.quorum``."""
    names = Names(settings.prefix)
    if settings.rpc_queue_type == topology.RPC_QUORUM_QUEUE_TYPE:
        return names.rpc_quorum_queue
    return names.rpc_queue


@dataclass(frozen=True, slots=True)
class Topology:
    exchange: AbstractExchange
    commands: AbstractQueue
    """The single commands queue, or partition 0."""
    rpc: AbstractQueue
    dead_exchange: AbstractExchange
    dead: AbstractQueue
    command_queues: tuple[str, ...]
    """Every commands queue to consume: the partitions of this N, then those left from
    another N (unbound, to drain)."""


async def declare(channel: AbstractChannel, settings: Settings) -> Topology:
    """Declare (idempotently) every exchange, queue and binding of the protocol."""
    names = Names(settings.prefix)
    connection = (await channel.get_underlay_channel()).connection
    exchange = await channel.declare_exchange(
        names.exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dead_exchange = await channel.declare_exchange(
        names.dead, aio_pika.ExchangeType.FANOUT, durable=True
    )
    await _declare_queue(
        connection,
        names.dead,
        cast(FieldTable, topology.quorum_arguments(settings.quorum_group_size)),
    )
    dead = await channel.get_queue(names.dead, ensure=False)
    await dead.bind(dead_exchange)
    if settings.command_partitions == 1:
        queues = await _declare_single(channel, connection, settings)
    else:
        queues = await _declare_partitions(channel, connection, settings)
    rpc = await _declare_rpc(channel, connection, settings)
    commands = await channel.get_queue(queues[0], ensure=False)
    return Topology(exchange, commands, rpc, dead_exchange, dead, queues)


async def command_queues(channel: AbstractChannel, settings: Settings) -> tuple[str, ...]:
    """The commands queues that exist for this prefix, as ``Topology.command_queues``
    orders them (for a reader that does not declare, like the bench)."""
    connection = (await channel.get_underlay_channel()).connection
    names = Names(settings.prefix)
    partitions = await _existing_partitions(connection, names, 0)
    single = [names.commands_queue] if await _exists(connection, names.commands_queue) else []
    if settings.command_partitions == 1:
        return (*single, *partitions)
    return (*partitions, *single)


# ---------------------------------------------------------------------- commands


async def _declare_single(
    channel: AbstractChannel, connection: AbstractConnection, settings: Settings
) -> tuple[str, ...]:
    names = Names(settings.prefix)
    await _declare_queue(
        connection, names.commands_queue, partition_arguments(settings, balanced=False)
    )
    await (await channel.get_queue(names.commands_queue, ensure=False)).bind(
        names.exchange, routing_key=names.command_key("*")
    )
    # Back from N partitions: theirs is now the old route, unbound once ours is bound.
    await _quietly(
        connection,
        lambda c: c.exchange_unbind(names.commands_hash, names.exchange, names.command_key("*")),
    )
    left = await _existing_partitions(connection, names, 0)
    await _unbind_partitions(connection, names, left)
    return (names.commands_queue, *left)


async def _declare_partitions(
    channel: AbstractChannel, connection: AbstractConnection, settings: Settings
) -> tuple[str, ...]:
    names = Names(settings.prefix)
    count = settings.command_partitions
    await channel.declare_exchange(
        names.commands_unhashed, aio_pika.ExchangeType.FANOUT, durable=True
    )
    try:
        hashed = await channel.declare_exchange(
            names.commands_hash,
            topology.CONSISTENT_HASH_EXCHANGE_TYPE,
            durable=True,
            arguments={
                "hash-property": topology.HASH_PROPERTY,
                "alternate-exchange": names.commands_unhashed,
            },
        )
    except aiormq.exceptions.ConnectionCommandInvalid as exc:
        raise PartitionsUnavailable(str(exc)) from exc
    partitions = tuple(names.commands_partition(index) for index in range(count))
    for name in partitions:
        await _declare_queue(connection, name, partition_arguments(settings, balanced=True))
        await (await channel.get_queue(name, ensure=False)).bind(
            hashed, routing_key=PARTITION_WEIGHT
        )
    await (await channel.get_queue(partitions[0], ensure=False)).bind(names.commands_unhashed)
    await hashed.bind(names.exchange, routing_key=names.command_key("*"))
    # Then the routes of a former N go: the single queue's binding, smaller partitions'.
    left = await _existing_partitions(connection, names, count)
    await _unbind_partitions(connection, names, left)
    single: tuple[str, ...] = ()
    if await _exists(connection, names.commands_queue):
        single = (names.commands_queue,)
        await _quietly(
            connection,
            partial(_unbind, names.commands_queue, names.exchange, names.command_key("*")),
        )
    log.info("command_partitions", partitions=count, draining=[*left, *single])
    return (*partitions, *left, *single)


async def _existing_partitions(
    connection: AbstractConnection, names: Names, start: int
) -> tuple[str, ...]:
    found = []
    for index in range(start, MAX_COMMAND_PARTITIONS):
        if not await _exists(connection, names.commands_partition(index)):
            break
        found.append(names.commands_partition(index))
    return tuple(found)


async def _unbind_partitions(
    connection: AbstractConnection, names: Names, partitions: tuple[str, ...]
) -> None:
    for name in partitions:
        await _quietly(connection, partial(_unbind, name, names.commands_hash, PARTITION_WEIGHT))


# ---------------------------------------------------------------------- reads


async def _declare_rpc(
    channel: AbstractChannel, connection: AbstractConnection, settings: Settings
) -> AbstractQueue:
    names = Names(settings.prefix)
    name = rpc_queue_name(settings)
    if name == names.rpc_queue:
        rpc = await channel.declare_queue(name, durable=True)
    else:
        arguments = topology.quorum_arguments(settings.quorum_group_size, balanced=True)
        await _declare_queue(connection, name, cast(FieldTable, arguments))
        rpc = await channel.get_queue(name, ensure=False)
    await rpc.bind(names.exchange, routing_key=names.rpc_key("*"))
    # A queue cannot change its type: the other type's queue (if any) loses its binding, and
    # what it holds expires or is abandoned by its callers, who retry (reads are idempotent).
    other = names.rpc_queue if name != names.rpc_queue else names.rpc_quorum_queue
    if await _exists(connection, other):
        await _quietly(connection, partial(_unbind, other, names.exchange, names.rpc_key("*")))
        log.warning("rpc_queue_replaced", queue=name, unbound=other)
    return rpc


# ---------------------------------------------------------------------- one step each


async def _declare_queue(connection: AbstractConnection, name: str, arguments: FieldTable) -> None:
    """Declare a durable queue; one that exists without (or with other) creation-only
    arguments is used as it is."""
    kept = ""
    reduced = {k: v for k, v in arguments.items() if k not in topology.CREATION_ONLY_ARGUMENTS}
    for attempt in (arguments, reduced):
        try:
            await _on_own_channel(connection, partial(_declare, name, attempt))
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            match = _INEQUIVALENT.search(str(exc))
            if match is None or match.group(1) not in topology.CREATION_ONLY_ARGUMENTS:
                raise
            kept = match.group(1)
        else:
            if attempt is reduced:
                log.info("queue_kept_as_created", queue=name, argument=kept)
            return
    # It has a creation-only argument of another value: kept, other arguments unchecked.
    log.info("queue_kept_as_created", queue=name, argument=kept)
    if not await _exists(connection, name):
        raise RuntimeError(f"queue {name!r} refused and not there")


async def _declare(name: str, arguments: FieldTable, channel: aiormq.abc.AbstractChannel) -> object:
    return await channel.queue_declare(name, durable=True, arguments=arguments)


async def _unbind(
    queue: str, exchange: str, routing_key: str, channel: aiormq.abc.AbstractChannel
) -> object:
    return await channel.queue_unbind(queue, exchange, routing_key)


async def _exists(connection: AbstractConnection, name: str) -> bool:
    return await _quietly(connection, lambda c: c.queue_declare(name, passive=True))


async def _quietly(connection: AbstractConnection, step: _Step) -> bool:
    """Run ``step`` on a channel of its own; False when what it names does not exist."""
    try:
        await _on_own_channel(connection, step)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    return True


async def _on_own_channel(connection: AbstractConnection, step: _Step) -> None:
    """An error closes the channel it happened on: not the caller's."""
    channel = await connection.channel()
    try:
        await step(channel)
    finally:
        if not channel.is_closed:
            await channel.close()


async def declare_again(
    channel: aiormq.abc.AbstractChannel, settings: Settings, queue: str
) -> None:
    """Declare a consumed queue (a commands queue or the rpc queue), its exchange and its
    binding again, as ``declare`` does: after the broker cancelled its consumer because it
    was deleted, or lost with its node. On the raw channel's connection, so that no robust
    channel keeps the declaration to replay (and fail) when it reopens. A commands queue
    that is only being drained (a former partition count) comes back unbound."""
    names = Names(settings.prefix)
    connection = channel.connection
    await channel.exchange_declare(names.exchange, exchange_type="topic", durable=True)
    if queue in (names.rpc_queue, names.rpc_quorum_queue):
        arguments: FieldTable = (
            {}
            if queue == names.rpc_queue
            else cast(
                FieldTable, topology.quorum_arguments(settings.quorum_group_size, balanced=True)
            )
        )
        await _declare_queue(connection, queue, arguments)
        await channel.queue_bind(queue, names.exchange, routing_key=names.rpc_key("*"))
        return
    partitioned = settings.command_partitions > 1
    await _declare_queue(connection, queue, partition_arguments(settings, balanced=partitioned))
    if queue == names.commands_queue and not partitioned:
        await channel.queue_bind(queue, names.exchange, routing_key=names.command_key("*"))
    elif queue in {names.commands_partition(i) for i in range(settings.command_partitions)}:
        await channel.queue_bind(queue, names.commands_hash, routing_key=PARTITION_WEIGHT)
        if queue == names.commands_partition(0):
            await channel.queue_bind(queue, names.commands_unhashed)
