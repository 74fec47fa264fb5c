"""The names of protocol §2: exchanges, queues and routing keys, all under one prefix.

Part of the contract (a publisher in any language needs them), so it lives here, free of the
service: ``worker.topology`` declares these objects, ``schemas.export`` describes them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Final

DEFAULT_PREFIX: Final = "plugin_state"
DEFAULT_AMQP_URL: Final = "amqp://guest:guest@localhost:5672/"
"""The broker a worker or client uses when told none (protocol §5)."""
COMMANDS_QUEUE_TYPE: Final = "quorum"
DEAD_QUEUE_TYPE: Final = "quorum"
RPC_QUEUE_TYPE: Final = "classic"
"""The read path's queue by default: replies are transient and a lost request is retried by
its caller, so it needs no replication log (the broker's default type, declared without
arguments). A classic queue lives on one node, though: while that node is down, reads are
not answered. ``RPC_QUORUM_QUEUE_TYPE`` keeps answering through the loss of any one node of
three, at a cost in latency (docs/cluster.md)."""
RPC_QUORUM_QUEUE_TYPE: Final = "quorum"
RPC_QUEUE_TYPES: Final = (RPC_QUEUE_TYPE, RPC_QUORUM_QUEUE_TYPE)
QUORUM_GROUP_SIZE: Final = 3
"""Replicas of each quorum queue when it is created (``x-quorum-initial-group-size``): one
on each node of a three-node cluster; a smaller cluster gets one per node."""
CONSISTENT_HASH_EXCHANGE_TYPE: Final = "x-consistent-hash"
"""The exchange type of the ``rabbitmq_consistent_hash_exchange`` plugin, which spreads
commands over the partitions."""
HASH_PROPERTY: Final = "message_id"
"""What the partitions are chosen by: the AMQP ``message_id``, which a publisher sets to the
write's id (any value is routed, and none: see ``Names.commands_unhashed``)."""
CREATION_ONLY_ARGUMENTS: Final = frozenset(
    {"x-quorum-initial-group-size", "x-queue-leader-locator"}
)
"""Queue arguments that matter only when a queue is created: an existing queue declared
without them (or with other values) is used as it is."""
DIRECT_REPLY_TO: Final = "amq.rabbitmq.reply-to"
"""RabbitMQ's direct reply-to pseudo-queue, the recommended ``reply_to``."""
DEADLINE_HEADER: Final = "x-deadline"
"""An optional header of a read: the Unix time in milliseconds after which its caller no
longer waits for the answer (an extension of protocol §3; it bounds a read's wait however
long the request queued)."""


@dataclass(frozen=True, slots=True)
class Names:
    """The names of the topology for one prefix."""

    prefix: str = DEFAULT_PREFIX

    @property
    def exchange(self) -> str:
        """The topic exchange every plugin publishes to."""
        return self.prefix

    @property
    def commands_queue(self) -> str:
        return f"{self.prefix}.commands"

    def commands_partition(self, index: int) -> str:
        """The commands queue of partition ``index`` when there are several."""
        return f"{self.prefix}.commands.{index}"

    @property
    def commands_hash(self) -> str:
        """The consistent-hash exchange, bound to ``exchange`` by ``cmd.*``, that spreads
        commands over the partitions by their ``message_id``."""
        return f"{self.prefix}.commands.hash"

    @property
    def commands_unhashed(self) -> str:
        """The fanout exchange, alternate exchange of ``commands_hash``, that takes what
        the hash exchange does not route to partition 0 (while no partition is bound to
        it), so that nothing is dropped. (A command without ``message_id`` is hashed as
        one value by the plugin: all such go to one partition.)"""
        return f"{self.prefix}.commands.unhashed"

    @property
    def rpc_queue(self) -> str:
        return f"{self.prefix}.rpc"

    @property
    def rpc_quorum_queue(self) -> str:
        """The read path's queue when it is a quorum queue: a name of its own, since a
        queue cannot change its type (the classic one is left to drain)."""
        return f"{self.prefix}.rpc.quorum"

    @property
    def dead(self) -> str:
        """The dead-letter exchange and its queue share this name."""
        return f"{self.prefix}.dead"

    @property
    def changes(self) -> str:
        """The topic exchange of change events (protocol §8)."""
        return f"{self.prefix}.changes"

    @staticmethod
    def command_key(plugin_id: uuid.UUID | str) -> str:
        return f"cmd.{plugin_id}"

    @staticmethod
    def rpc_key(plugin_id: uuid.UUID | str) -> str:
        return f"rpc.{plugin_id}"

    @staticmethod
    def change_key(plugin_id: uuid.UUID | str) -> str:
        return f"chg.{plugin_id}"

    def reply_queue_prefix(self, plugin_id: uuid.UUID | str) -> str:
        """A caller's own reply queues are named this, then a name of its choosing."""
        return f"{self.prefix}.reply.{plugin_id}."


def commands_queue_arguments(
    names: Names, delivery_limit: int, max_length: int
) -> dict[str, object]:
    """The arguments the commands queue is declared with."""
    return {
        "x-queue-type": COMMANDS_QUEUE_TYPE,
        "x-dead-letter-exchange": names.dead,
        # A command that keeps crashing its consumer is dead-lettered by RabbitMQ itself
        # after this many deliveries, instead of looping forever.
        "x-delivery-limit": delivery_limit,
        # A flood pushes back on publishers (their confirms are nacked) instead of
        # exhausting the broker.
        "x-max-length": max_length,
        "x-overflow": "reject-publish",
    }


def quorum_arguments(group_size: int, *, balanced: bool = False) -> dict[str, object]:
    """What makes a queue a quorum queue of ``group_size`` replicas; ``balanced`` places
    its leader on the node that leads the fewest queues (partitions spread over the nodes)."""
    arguments: dict[str, object] = {
        "x-queue-type": "quorum",
        "x-quorum-initial-group-size": group_size,
    }
    if balanced:
        arguments["x-queue-leader-locator"] = "balanced"
    return arguments
