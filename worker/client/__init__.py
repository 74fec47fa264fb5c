"""The Python client plugins use: writes with publisher confirms, reads over AMQP RPC,
``watch`` over the change log, and an optional near cache.

    async with StateClient("amqp://guest:guest@localhost:5672/", PLUGIN_ID) as state:
        await state.set(Scope.issue("ISS-42"), "cursor", {"page": 3})
        entry = await state.get(Scope.issue("ISS-42"), "cursor")  # sees {"page": 3}
        async for event in state.watch(Scope.issue("ISS-42")):
            ...

Read it top to bottom: ``models`` (what calls take and give), ``writes``, ``reads``,
``watch``, ``cache``, over ``connection`` (the wire: confirms, replies, retries until the
deadline) and ``ids`` (write ids, read-your-writes). It imports nothing of the worker: only
the contract (``schemas``).

**Failures.** Every call has a deadline (the client's ``timeout`` unless given); a lost
connection or channel means sending again once it is back, until the deadline. So a call
either completes or raises ``RequestTimeout``; it never hangs. Exceptions:

- ``schemas.errors.StateError`` subclasses: the worker answered ``error`` with that code
  (``InvalidRequest``, ``UnknownPlugin``, ``WritePending``...). ``Forbidden`` is also raised
  when the broker refuses the publish for lack of permission.
- ``ClientError`` subclasses: ``RequestTimeout`` (also a ``TimeoutError``), ``PublishRefused``
  (the broker refused to take the write: nacked it on fresh channels, with back-off, as
  many times as ``nacks.ATTEMPTS``, e.g. the commands queue is full), ``BrokerUnreachable``
  (no node of the broker's answered ``connect``: each was tried once), ``Unroutable``
  (no exchange or no queue for the routing key: no worker declared the topology),
  ``Conflict`` (a conditional write's condition did not hold), ``UnexpectedReply``,
  ``NotConnected``.

**Replies** come through RabbitMQ's direct reply-to, or, with ``reply_queue=NAME``, through
a queue of the client's own, ``<prefix>.reply.<plugin_id>.NAME`` (exclusive to the
connection, deleted with it): the only other place a worker answers (protocol §3). The
plugin's RabbitMQ user then needs configure and read permissions on it
(``deploy/rabbitmq/grant-plugin-user.sh`` gives them).
"""

from schemas.topology import DIRECT_REPLY_TO

from . import failover
from .cache import CacheLimits, CacheStats
from .coalesce import Coalescing
from .errors import (
    BrokerUnreachable,
    ClientError,
    Conflict,
    NotConnected,
    PublishRefused,
    RequestTimeout,
    UnexpectedReply,
    Unroutable,
)
from .ids import LastWrites, MonotonicUuid7, next_uuid7
from .models import (
    BatchOp,
    Change,
    ChangeKind,
    Entry,
    EntryName,
    Scope,
    Ttl,
    op_delete,
    op_set,
    ttl_ms,
)
from .reads import ChangesPage
from .state import StateClient
from .watch import Reset, Synced, WatchEvent

__all__ = [
    "DIRECT_REPLY_TO",
    "BatchOp",
    "BrokerUnreachable",
    "CacheLimits",
    "CacheStats",
    "Change",
    "ChangeKind",
    "ChangesPage",
    "ClientError",
    "Coalescing",
    "Conflict",
    "Entry",
    "EntryName",
    "LastWrites",
    "MonotonicUuid7",
    "NotConnected",
    "PublishRefused",
    "RequestTimeout",
    "Reset",
    "Scope",
    "StateClient",
    "Synced",
    "Ttl",
    "UnexpectedReply",
    "Unroutable",
    "WatchEvent",
    "failover",
    "next_uuid7",
    "op_delete",
    "op_set",
    "ttl_ms",
]
