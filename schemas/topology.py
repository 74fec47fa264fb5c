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
"""The read path's queue: replies are transient and a lost request is retried by its caller,
so it needs no replication log (the broker's default type, declared without arguments)."""
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

    @property
    def rpc_queue(self) -> str:
        return f"{self.prefix}.rpc"

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
