"""The Python client plugins use: writes with publisher confirms, reads over AMQP RPC.

    async with StateClient("amqp://guest:guest@localhost:5672/", PLUGIN_ID) as state:
        await state.set(Scope.issue("ISS-42"), "cursor", {"page": 3})
        entry = await state.get(Scope.issue("ISS-42"), "cursor")  # sees {"page": 3}

**Writes** (``set``, ``delete``, ``batch``) get a fresh UUIDv7 (strictly increasing within
the client) and are published persistent and ``mandatory`` on a channel with publisher
confirms; a call returns the write's id once the broker has confirmed it, i.e. the write
is safely in the commands queue. ``wait=True`` also waits for the worker's ``applied``
reply. Writes carry no AMQP ``expiration``: a write the caller stopped waiting for must
still be applied, never silently dropped by the broker.

**Reads** (``get``, ``get_many``, ``list``) are RPC over RabbitMQ direct reply-to, on the
same channel. They carry ``expiration`` equal to the time the caller still waits (less a
small margin for the answer to travel back), so a worker drops requests nobody waits for.
``get`` and ``get_many`` read your own writes: the client remembers the id of its last
write per entry (a bounded LRU) and sends it as ``after``. When the worker answers
``write_pending``, the read raises ``WritePending`` and the client keeps the id: the next
read waits for that write again rather than silently return an older value. A write that
was rejected (it is in the dead-letter queue) is never applied: ``forget_write`` drops its
id, so that reads answer what is stored. ``list`` has no such guarantee; write with
``wait=True`` first. Reads carry the caller's deadline (the ``x-deadline`` header), so a
worker never waits for a write longer than the caller waits for the answer, however long
the request queued.

**Replies** come through RabbitMQ's direct reply-to, or, with ``reply_queue=NAME``, through
a queue of the client's own, ``<prefix>.reply.<plugin_id>.NAME`` (exclusive to the
connection, deleted with it): the only other place a worker answers (protocol §3). The
plugin's RabbitMQ user then needs configure and read permissions on it
(``deploy/rabbitmq/grant-plugin-user.sh`` gives them).

**Failures.** Every call has a deadline (the client's ``timeout`` unless given). When the
connection or channel is lost, a call is sent again once the channel is back, until its
deadline: reads are idempotent, and a write is re-sent with the *same* id, which the
contract makes harmless. So a call either completes or raises ``RequestTimeout``; it never
hangs. Exceptions:

- ``schemas.errors.StateError`` subclasses: the worker answered ``error`` with that code
  (``InvalidRequest``, ``UnknownPlugin``, ``WritePending``...). ``Forbidden`` is also raised
  when the broker refuses the publish for lack of permission.
- ``ClientError`` subclasses: ``RequestTimeout`` (also a ``TimeoutError``), ``PublishRefused``
  (the broker refused to take the write, e.g. the commands queue is full), ``Unroutable``
  (no exchange or no queue for the routing key: no worker declared the topology),
  ``UnexpectedReply``, ``NotConnected``.
"""

from __future__ import annotations

import asyncio
import builtins  # ``StateClient.list`` hides ``list`` in the class's annotations
import math
import os
import random
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final, Self, TypeAlias, TypeVar, cast

import aio_pika
import aiormq
import structlog
import uuid_utils
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from msgspec import UNSET, Struct, UnsetType
from yarl import URL

from schemas.codec import JSON, codec_for
from schemas.errors import (
    Forbidden,
    StateError,
    UnsupportedValue,
    WritePending,
    error_from_code,
)
from schemas.messages import (
    DEFAULT_NAMESPACE,
    SCOPE_KINDS,
    AppliedReply,
    BatchCommand,
    BatchDelete,
    BatchSet,
    DeleteCommand,
    EntryRef,
    ErrorReply,
    GetManyRequest,
    GetRequest,
    ListRequest,
    PageReply,
    Reply,
    ScopeKind,
    SetCommand,
    ValueReply,
    ValuesReply,
)
from schemas.topology import DEADLINE_HEADER, DIRECT_REPLY_TO, Names

log = structlog.get_logger(__name__)

# How soon the robust connection tries again after losing the broker (aio-pika's default,
# 5 s, is as long as a whole default call).
_RECONNECT_INTERVAL: Final = 1.0
# Reads expire this much (at most 10 % of the remaining time) before the caller gives up,
# so that an answer the worker sends at the expiration (``write_pending``) still arrives.
_REPLY_MARGIN: Final = 0.5
_RETRY_INITIAL: Final = 0.05
_RETRY_MAX: Final = 1.0
# update()'s pauses between a conflict and the next try (full jitter up to these).
_UPDATE_PAUSE: Final = 0.01
_UPDATE_PAUSE_MAX: Final = 0.5

R = TypeVar("R", bound=Struct)

# --------------------------------------------------------------------------- errors


class ClientError(Exception):
    """A failure on the client's side of the wire: the broker, the connection, the clock."""


class NotConnected(ClientError):
    """The client is not connected: ``connect()`` was not called, or it was closed."""


class RequestTimeout(ClientError, TimeoutError):
    """No confirm or no reply before the call's deadline."""


class PublishRefused(ClientError):
    """The broker refused the message: a nack (e.g. the commands queue is full), or a
    channel error such as a ``user_id`` that is not the connection's user."""


class Unroutable(ClientError):
    """The broker could not route the message: no such exchange, or no queue bound."""


class Conflict(ClientError):
    """A conditional write's condition did not hold (protocol §7): nothing changed.
    ``failed_op`` is the index of the first failing op of a batch."""

    def __init__(self, write_id: uuid.UUID, failed_op: int | None = None) -> None:
        where = "" if failed_op is None else f" (op {failed_op} failed)"
        super().__init__(f"the condition of write {write_id} did not hold{where}")
        self.write_id = write_id
        self.failed_op = failed_op


class UnexpectedReply(ClientError):
    """The reply does not answer the request (another type, another write id)."""


class _Retry(Exception):
    """Internal: the channel was lost while a call was in flight; send it again."""


# ------------------------------------------------------------------- scope and entries


@dataclass(frozen=True, slots=True)
class Scope:
    """Where an entry lives: ``Scope.instance()``, ``Scope.issue("ISS-42")``, ..."""

    kind: ScopeKind
    id: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCOPE_KINDS:
            raise ValueError(f"unknown scope kind {self.kind!r}: one of {', '.join(SCOPE_KINDS)}")
        if (self.kind == "instance") != (self.id is None):
            raise ValueError("the instance scope has no id; every other scope kind needs one")

    @classmethod
    def parse(cls, text: str) -> Scope:
        """``instance`` or ``KIND:ID``; the id may itself contain colons."""
        kind, colon, scope_id = text.partition(":")
        return cls(cast(ScopeKind, kind), scope_id if colon else None)

    @classmethod
    def instance(cls) -> Scope:
        return cls("instance")

    @classmethod
    def company(cls, scope_id: str) -> Scope:
        return cls("company", scope_id)

    @classmethod
    def project(cls, scope_id: str) -> Scope:
        return cls("project", scope_id)

    @classmethod
    def project_workspace(cls, scope_id: str) -> Scope:
        return cls("project_workspace", scope_id)

    @classmethod
    def agent(cls, scope_id: str) -> Scope:
        return cls("agent", scope_id)

    @classmethod
    def issue(cls, scope_id: str) -> Scope:
        return cls("issue", scope_id)

    @classmethod
    def goal(cls, scope_id: str) -> Scope:
        return cls("goal", scope_id)

    @classmethod
    def run(cls, scope_id: str) -> Scope:
        return cls("run", scope_id)

    def __str__(self) -> str:
        return self.kind if self.id is None else f"{self.kind}:{self.id}"


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored entry. ``value`` is ``None`` for a stored JSON ``null``; ``version`` is the
    id of the write that stored it (what ``if_version`` names); ``expires_at`` is set for an
    entry with a time to live."""

    scope: Scope
    namespace: str
    key: str
    value: Any
    version: uuid.UUID
    updated_at: datetime
    expires_at: datetime | None = None


BatchOp: TypeAlias = BatchSet | BatchDelete
EntryName: TypeAlias = tuple[Scope, str] | tuple[Scope, str, str]
"""``(scope, key)`` or ``(scope, key, namespace)``, as ``get_many`` takes them."""
_EntryKey: TypeAlias = tuple[str, str | None, str, str]


Ttl: TypeAlias = timedelta | float
"""A time to live: a ``timedelta``, or seconds."""


def ttl_ms(ttl: Ttl | None) -> int | None:
    """A time to live in whole milliseconds (at least one), as the wire carries it."""
    if ttl is None:
        return None
    seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else float(ttl)
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"a time to live must be positive, not {ttl!r}")
    return max(1, round(seconds * 1000))


def op_set(
    scope: Scope,
    key: str,
    value: Any,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    if_version: uuid.UUID | None = None,
    if_absent: bool = False,
    ttl: Ttl | None = None,
) -> BatchSet:
    """A ``set`` for ``StateClient.batch``, conditional or expiring as ``StateClient.set``."""
    return BatchSet(
        scope_kind=scope.kind,
        scope_id=scope.id,
        namespace=namespace,
        key=key,
        value=value,
        if_version=if_version,
        if_absent=if_absent,
        ttl_ms=ttl_ms(ttl),
    )


def op_delete(
    scope: Scope,
    key: str,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    if_version: uuid.UUID | None = None,
) -> BatchDelete:
    """A ``delete`` for ``StateClient.batch``, conditional as ``StateClient.delete``."""
    return BatchDelete(
        scope_kind=scope.kind,
        scope_id=scope.id,
        namespace=namespace,
        key=key,
        if_version=if_version,
    )


def _entry_key(scope: Scope, namespace: str, key: str) -> _EntryKey:
    return (scope.kind, scope.id, namespace, key)


# ------------------------------------------------------------------------ write ids

_COUNTER_BITS: Final = 74  # rand_a (12 bits) and rand_b (62 bits) of a UUIDv7
_RAND_B_BITS: Final = 62


def next_uuid7(previous: int) -> int:
    """The smallest UUIDv7 greater than ``previous`` (as ints): its random bits plus one,
    carrying into the millisecond."""
    millis = previous >> 80
    counter = (((previous >> 64) & 0xFFF) << _RAND_B_BITS) | (previous & ((1 << _RAND_B_BITS) - 1))
    counter += 1
    if counter >> _COUNTER_BITS:
        millis, counter = millis + 1, 0
    return (
        (millis << 80)
        | (0x7 << 76)
        | ((counter >> _RAND_B_BITS) << 64)
        | (0b10 << _RAND_B_BITS)
        | (counter & ((1 << _RAND_B_BITS) - 1))
    )


class MonotonicUuid7:
    """UUIDv7s that strictly increase, even many within one millisecond or when the clock
    steps back: the contract orders one writer's writes to an entry by their ids.

    A hybrid logical clock: every version the client has read or written is ``observe``d,
    and a new id is ``max(now, the greatest seen + 1)``, so a conditional write made after
    a read always has a newer id than the version it names (``if_version`` must be older),
    even when this machine's clock is behind the writer's."""

    def __init__(self, source: Callable[[], int] = lambda: uuid_utils.uuid7().int) -> None:
        self._source = source
        self._last = 0

    def __call__(self) -> uuid.UUID:
        candidate = self._source()
        if candidate <= self._last:
            candidate = next_uuid7(self._last)
        self._last = candidate
        return uuid.UUID(int=candidate)

    def observe(self, version: uuid.UUID) -> None:
        """Never make an id older than ``version``."""
        self._last = max(self._last, version.int)


class LastWrites:
    """The id of this client's last write per entry, the least recently used forgotten
    beyond ``capacity`` entries (0 remembers nothing)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("remember must be zero or positive")
        self.capacity = capacity
        self._ids: OrderedDict[_EntryKey, uuid.UUID] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def record(self, entry: _EntryKey, write_id: uuid.UUID) -> None:
        if not self.capacity:
            return
        known = self._ids.get(entry)
        # Confirms of concurrent writes may arrive out of order: keep the newest id.
        self._ids[entry] = write_id if known is None else max(known, write_id)
        self._ids.move_to_end(entry)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def get(self, entry: _EntryKey) -> uuid.UUID | None:
        write_id = self._ids.get(entry)
        if write_id is not None:
            self._ids.move_to_end(entry)
        return write_id

    def drop(self, entry: _EntryKey) -> None:
        self._ids.pop(entry, None)


# --------------------------------------------------------------------------- client


class StateClient:
    """A plugin's handle on its state. Use ``async with``, or ``connect()`` and ``close()``."""

    def __init__(
        self,
        amqp_url: str,
        plugin_id: uuid.UUID | str,
        *,
        prefix: str = "plugin_state",
        content_type: str = JSON,
        timeout: float = 5.0,
        remember: int = 10_000,
        connection_name: str | None = None,
        reply_queue: str | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if reply_queue is not None and not reply_queue:
            raise ValueError("reply_queue needs a name")
        self.plugin_id = uuid.UUID(str(plugin_id))
        self.timeout = timeout
        self.connection_name = connection_name or (
            f"plugin-state-client {self.plugin_id} "
            f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        )
        """Shown by RabbitMQ, so an operator can find this client's connection."""
        self._url = amqp_url
        # RabbitMQ checks user_id against the connection's user; the worker checks that this
        # user may act for the plugin (protocol §6). aio-pika logs in as guest by default.
        self._user_id = URL(amqp_url).user or "guest"
        self._names = Names(prefix)
        self._reply_to = (
            DIRECT_REPLY_TO
            if reply_queue is None
            else self._names.reply_queue_prefix(self.plugin_id) + reply_queue
        )
        try:
            self._codec = codec_for(content_type)
        except StateError as exc:
            raise ValueError(exc.message) from None
        self._new_id = MonotonicUuid7()
        self._last_writes = LastWrites(remember)
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchange: AbstractExchange | None = None

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        """Connect, open the confirm channel and consume direct reply-to on it."""
        if self._connection is not None:
            raise RuntimeError("the client is already connected")
        connection = await aio_pika.connect_robust(
            self._url,
            client_properties={"connection_name": self.connection_name},
            timeout=self.timeout,
            reconnect_interval=_RECONNECT_INTERVAL,
        )
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            channel.close_callbacks.add(self._on_channel_closed)
            # Declared robust, the reply consumer is restored with the channel after a
            # reconnect, before the channel counts as ready again.
            if self._reply_to == DIRECT_REPLY_TO:
                replies = await channel.declare_queue(DIRECT_REPLY_TO, passive=True)
            else:
                replies = await channel.declare_queue(
                    self._reply_to, exclusive=True, auto_delete=True
                )
            await replies.consume(self._on_reply, no_ack=True)
        except BaseException:
            await connection.close()
            raise
        connection.reconnect_callbacks.add(self._on_reconnected)
        self._connection = connection
        self._channel = channel
        self._exchange = await channel.get_exchange(self._names.exchange, ensure=False)
        log.info("state_client_connected", connection_name=self.connection_name)

    async def close(self) -> None:
        """Close the connection; calls still in flight raise ``NotConnected``."""
        connection = self._connection
        if connection is None:
            return
        self._connection = self._channel = self._exchange = None
        self._fail_pending(NotConnected("the client was closed"))
        await connection.close()
        log.info("state_client_closed", connection_name=self.connection_name)

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def pending_requests(self) -> int:
        """Calls waiting for a reply right now."""
        return len(self._pending)

    @property
    def remembered_writes(self) -> int:
        """Entries whose last write id the client remembers for read-your-writes."""
        return len(self._last_writes)

    def last_write(
        self, scope: Scope, key: str, *, namespace: str = DEFAULT_NAMESPACE
    ) -> uuid.UUID | None:
        """The id of this client's last confirmed write to the entry, if it remembers one."""
        return self._last_writes.get(_entry_key(scope, namespace, key))

    def forget_write(self, scope: Scope, key: str, *, namespace: str = DEFAULT_NAMESPACE) -> None:
        """Stop reading the entry as of this client's last write to it: for a write that was
        rejected (``get`` raised ``WritePending`` and the write is in the dead-letter queue),
        so that reads answer what is stored."""
        self._last_writes.drop(_entry_key(scope, namespace, key))

    # --------------------------------------------------------------------- writes

    async def set(
        self,
        scope: Scope,
        key: str,
        value: Any,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        if_version: uuid.UUID | None = None,
        if_absent: bool = False,
        ttl: Ttl | None = None,
        wait: bool | None = None,
        timeout: float | None = None,
    ) -> uuid.UUID:
        """Store ``value`` (any JSON value, ``None`` included); returns the write's id.

        ``if_version``: only if the entry's value is still the one that write stored;
        ``if_absent``: only if the entry has no value (a claim, a marker); either raises
        ``Conflict`` when it does not hold. ``ttl``: the entry expires that long after the
        write was made (a ``timedelta`` or seconds); a set without it makes the entry
        permanent again. A conditional write waits for its outcome unless ``wait=False``."""
        command = SetCommand(
            id=self._new_id(),
            plugin_id=self.plugin_id,
            scope_kind=scope.kind,
            scope_id=scope.id,
            namespace=namespace,
            key=key,
            value=value,
            if_version=if_version,
            if_absent=if_absent,
            ttl_ms=ttl_ms(ttl),
        )
        return await self._write(
            command, [_entry_key(scope, namespace, key)], [value], wait, timeout
        )

    async def delete(
        self,
        scope: Scope,
        key: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        if_version: uuid.UUID | None = None,
        wait: bool | None = None,
        timeout: float | None = None,
    ) -> uuid.UUID:
        """Remove the entry; returns the write's id. With ``if_version``, only if its value
        is still the one that write stored (``Conflict`` otherwise; it then waits for its
        outcome unless ``wait=False``)."""
        command = DeleteCommand(
            id=self._new_id(),
            plugin_id=self.plugin_id,
            scope_kind=scope.kind,
            scope_id=scope.id,
            namespace=namespace,
            key=key,
            if_version=if_version,
        )
        return await self._write(command, [_entry_key(scope, namespace, key)], [], wait, timeout)

    async def batch(
        self, ops: Iterable[BatchOp], *, wait: bool | None = None, timeout: float | None = None
    ) -> uuid.UUID:
        """Apply ``op_set`` / ``op_delete`` ops all or nothing; returns the batch's id. A
        batch with a conditional op applies only if every condition holds (``Conflict``
        names the first failing op otherwise) and waits for its outcome unless
        ``wait=False``."""
        ops = list(ops)
        if not ops:
            raise ValueError("a batch needs at least one op")
        command = BatchCommand(id=self._new_id(), plugin_id=self.plugin_id, ops=ops)
        entries = [(op.scope_kind, op.scope_id, op.namespace, op.key) for op in ops]
        values = [op.value for op in ops if isinstance(op, BatchSet)]
        return await self._write(command, entries, values, wait, timeout)

    async def _write(
        self,
        command: SetCommand | DeleteCommand | BatchCommand,
        entries: Iterable[_EntryKey],
        values: builtins.list[Any],
        wait: bool | None,
        timeout: float | None,
    ) -> uuid.UUID:
        if wait is None:
            ops = command.ops if isinstance(command, BatchCommand) else [command]
            wait = any(op.if_version is not None or op.if_absent for op in ops)
        body = self._codec.encode(command)
        if self._codec.content_type == JSON and b"null" in body:
            # msgspec writes NaN and Infinity as null: refuse rather than store another value.
            _require_finite(values)
        reply = await self._call(
            self._names.command_key(self.plugin_id),
            body,
            reply=wait,
            timeout=timeout,
            write_id=command.id,
        )
        if wait:
            applied = _expect(reply, AppliedReply)
            if applied.id != command.id:
                raise UnexpectedReply(f"reply applies {applied.id}, not {command.id}")
            if applied.outcome == "conflict":
                failed = None if isinstance(applied.failed_op, UnsetType) else applied.failed_op
                raise Conflict(command.id, failed)
        for entry in entries:
            self._last_writes.record(entry, command.id)
        return command.id

    # ---------------------------------------------------------------------- reads

    async def get(
        self,
        scope: Scope,
        key: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        timeout: float | None = None,
    ) -> Entry | None:
        """The entry, or ``None`` when it has no value; reflects this client's writes."""
        entry = _entry_key(scope, namespace, key)
        after = self._last_writes.get(entry)
        request = GetRequest(
            plugin_id=self.plugin_id,
            scope_kind=scope.kind,
            scope_id=scope.id,
            namespace=namespace,
            key=key,
            after=after,
        )
        reply = await self._read(request, ValueReply, timeout)
        return self._seen(_entry(scope, namespace, key, reply))

    async def get_many(
        self, names: Sequence[EntryName], *, timeout: float | None = None
    ) -> builtins.list[Entry | None]:
        """One ``Entry | None`` per ``(scope, key[, namespace])``, in order."""
        if not names:
            return []
        wanted = [(n[0], n[1], n[2] if len(n) == 3 else DEFAULT_NAMESPACE) for n in names]
        entries = [_entry_key(scope, ns, key) for scope, key, ns in wanted]
        afters = [self._last_writes.get(entry) for entry in entries]
        request = GetManyRequest(
            plugin_id=self.plugin_id,
            entries=[
                EntryRef(
                    scope_kind=scope.kind, scope_id=scope.id, namespace=ns, key=key, after=after
                )
                for (scope, key, ns), after in zip(wanted, afters, strict=True)
            ],
        )
        reply = await self._read(request, ValuesReply, timeout)
        if len(reply.items) != len(wanted):
            raise UnexpectedReply(f"{len(reply.items)} values for {len(wanted)} entries")
        return [
            self._seen(_entry(scope, ns, key, item))
            for (scope, key, ns), item in zip(wanted, reply.items, strict=True)
        ]

    def _seen(self, entry: Entry | None) -> Entry | None:
        """Every version read moves the id clock past it (``MonotonicUuid7.observe``)."""
        if entry is not None:
            self._new_id.observe(entry.version)
        return entry

    async def update(
        self,
        scope: Scope,
        key: str,
        change: Callable[[Entry | None], Any],
        *,
        namespace: str = DEFAULT_NAMESPACE,
        ttl: Ttl | None = None,
        attempts: int = 10,
        timeout: float | None = None,
    ) -> Any:
        """Read the entry, compute its new value with ``change(entry or None)``, and write it
        only if nobody wrote the entry in between (``if_version``, or ``if_absent`` for an
        entry without a value); on ``Conflict``, read again and retry after a short, jittered,
        growing pause, at most ``attempts`` times. Returns the value written.

        The pattern for a counter, a list that grows, any read-modify-write:
        ``await state.update(scope, "count", lambda e: (e.value if e else 0) + 1)``."""
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        pause = _UPDATE_PAUSE
        tried = 0
        while True:
            tried += 1
            entry = await self.get(scope, key, namespace=namespace, timeout=timeout)
            value = change(entry)
            try:
                await self.set(
                    scope,
                    key,
                    value,
                    namespace=namespace,
                    if_version=None if entry is None else entry.version,
                    if_absent=entry is None,
                    ttl=ttl,
                    wait=True,
                    timeout=timeout,
                )
            except Conflict:
                if tried == attempts:
                    raise
                await asyncio.sleep(random.uniform(0, pause))
                pause = min(pause * 2, _UPDATE_PAUSE_MAX)
                continue
            return value

    async def list(
        self,
        scope: Scope | ScopeKind | None = None,
        *,
        namespace: str | None = None,
        prefix: str = "",
        page_size: int = 100,
        timeout: float | None = None,
    ) -> AsyncIterator[Entry]:
        """Every entry (of a scope, or of a scope kind; of a namespace; whose key starts
        with ``prefix``), in (scope kind, scope id, namespace, key) order, fetched in pages
        of ``page_size``. ``timeout`` applies to each page."""
        kind, scope_id = (scope.kind, scope.id) if isinstance(scope, Scope) else (scope, None)
        cursor: str | None = None
        while True:
            request = ListRequest(
                plugin_id=self.plugin_id,
                scope_kind=kind,
                scope_id=scope_id,
                namespace=namespace,
                prefix=prefix,
                limit=page_size,
                cursor=cursor,
            )
            page = await self._read(request, PageReply, timeout)
            for item in page.items:
                self._new_id.observe(item.version)
                yield Entry(
                    scope=Scope(item.scope_kind, item.scope_id),
                    namespace=item.namespace,
                    key=item.key,
                    value=item.value,
                    version=item.version,
                    updated_at=_timestamp(item.updated_at),
                    expires_at=None
                    if isinstance(item.expires_at, UnsetType)
                    else _timestamp(item.expires_at),
                )
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def _read(
        self,
        request: GetRequest | GetManyRequest | ListRequest,
        kind: type[R],
        timeout: float | None,
    ) -> R:
        reply = await self._call(
            self._names.rpc_key(self.plugin_id),
            self._codec.encode(request),
            reply=True,
            timeout=timeout,
        )
        try:
            return _expect(reply, kind)
        except WritePending as exc:
            raise WritePending(
                f"{exc.message}; the next read waits for it again. If the write was "
                "rejected (see the dead-letter queue), forget_write() reads what is stored"
            ) from None

    # ------------------------------------------------------------------- the wire

    async def _call(
        self,
        routing_key: str,
        body: bytes,
        *,
        reply: bool,
        timeout: float | None,
        write_id: uuid.UUID | None = None,
    ) -> Reply | None:
        """Publish (and, with ``reply``, wait for the answer) until done or the deadline;
        a channel lost on the way means sending again. A write (``write_id``) is
        persistent and never expires: the worker must apply it even if nobody waits."""
        seconds = self.timeout if timeout is None else timeout
        deadline = asyncio.timeout(seconds)
        delay = _RETRY_INITIAL
        try:
            async with deadline:
                while True:
                    try:
                        return await self._attempt(
                            routing_key,
                            body,
                            reply=reply,
                            expires_at=None if write_id else deadline.when(),
                            write_id=write_id,
                        )
                    except _Retry as exc:
                        log.info("state_client_retry", reason=str(exc), retry_in=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RETRY_MAX)
        except TimeoutError:
            if not deadline.expired():
                raise
            what = "reply" if reply else "publisher confirm"
            raise RequestTimeout(
                f"no {what} within {seconds}s for {routing_key} on {self._names.exchange}"
            ) from None

    async def _attempt(
        self,
        routing_key: str,
        body: bytes,
        *,
        reply: bool,
        expires_at: float | None,
        write_id: uuid.UUID | None,
    ) -> Reply | None:
        if self._channel is None or self._exchange is None:
            raise NotConnected("the client is not connected: call connect() first")
        channel, exchange = self._channel, self._exchange
        await channel.ready()
        loop = asyncio.get_running_loop()
        correlation_id = uuid.uuid4().hex
        waiter: asyncio.Future[Reply] | None = None
        if reply:
            waiter = loop.create_future()
            self._pending[correlation_id] = waiter
        message = aio_pika.Message(
            body,
            content_type=self._codec.content_type,
            delivery_mode=(
                aio_pika.DeliveryMode.NOT_PERSISTENT
                if write_id is None
                else aio_pika.DeliveryMode.PERSISTENT
            ),
            timestamp=datetime.now(UTC),
            expiration=None if expires_at is None else _expiration(expires_at - loop.time()),
            headers=None if expires_at is None else {DEADLINE_HEADER: _deadline_ms(expires_at)},
            message_id=None if write_id is None else str(write_id),
            user_id=self._user_id,
            reply_to=self._reply_to if reply else None,
            correlation_id=correlation_id if reply else None,
        )
        try:
            await _publish(exchange, message, routing_key)
            return None if waiter is None else await waiter
        finally:
            self._pending.pop(correlation_id, None)
            if waiter is not None and waiter.done() and not waiter.cancelled():
                # A channel loss may have failed it while the publish failed too: that
                # failure is moot, and asyncio would log it as never retrieved.
                waiter.exception()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        waiter = self._pending.get(message.correlation_id or "")
        if waiter is None or waiter.done():
            # Its caller gave up (timed out) or was answered already.
            log.debug("state_client_reply_unclaimed", correlation_id=message.correlation_id)
            return
        try:
            waiter.set_result(codec_for(message.content_type).decode_reply(message.body))
        except StateError as exc:
            waiter.set_exception(exc)

    def _on_channel_closed(self, _channel: object, exc: BaseException | None) -> None:
        if self._connection is None:
            return  # closed by close(), which failed the pending calls itself
        # Replies addressed to the lost channel will never arrive: send again.
        log.warning("state_client_channel_lost", error=repr(exc), pending=len(self._pending))
        self._fail_pending(_Retry(f"channel lost: {exc!r}"))

    def _on_reconnected(self, _connection: object) -> None:
        log.info("state_client_reconnected", connection_name=self.connection_name)

    def _fail_pending(self, exc: Exception) -> None:
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(exc)


async def _publish(exchange: AbstractExchange, message: aio_pika.Message, routing_key: str) -> None:
    """Publish, mandatory, and wait for the confirm; broker answers become typed errors,
    a lost channel becomes ``_Retry``."""
    where = f"exchange {exchange.name!r}, routing key {routing_key!r}"
    try:
        await exchange.publish(message, routing_key, mandatory=True)
    except aiormq.exceptions.PublishError:
        raise Unroutable(f"no queue is bound for {where}: is a worker running?") from None
    except aiormq.exceptions.DeliveryError as exc:
        raise PublishRefused(f"the broker nacked the message ({where}): {exc}") from None
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise PublishRefused(f"the broker refused the message ({where}): {exc}") from None
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise Unroutable(f"no exchange {exchange.name!r}: is a worker running?") from None
    except aiormq.exceptions.ChannelAccessRefused as exc:
        raise Forbidden(f"the broker refused the publish ({where}): {exc}") from None
    except (
        aiormq.exceptions.AMQPConnectionError,
        aiormq.exceptions.ChannelClosed,
        aiormq.exceptions.ChannelInvalidStateError,
        ConnectionError,
    ) as exc:
        raise _Retry(f"publish failed: {exc!r}") from None


def _require_finite(values: list[Any]) -> None:
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise UnsupportedValue(f"value holds {value}, which JSON and jsonb cannot hold")
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)


def _expiration(remaining: float) -> float:
    return max(remaining - min(_REPLY_MARGIN, remaining / 10), 0.001)


def _deadline_ms(expires_at: float) -> int:
    """The Unix time in ms at which a read expires, from its loop-time deadline."""
    remaining = _expiration(expires_at - asyncio.get_running_loop().time())
    return int((time.time() + remaining) * 1000)


def _expect(reply: Reply | None, kind: type[R]) -> R:
    if isinstance(reply, ErrorReply):
        raise error_from_code(reply.code, reply.message)
    if not isinstance(reply, kind):
        raise UnexpectedReply(f"expected a {kind.__name__}, got {type(reply).__name__}")
    return reply


def _entry(scope: Scope, namespace: str, key: str, reply: ValueReply) -> Entry | None:
    if not reply.found:
        return None
    if (
        reply.value is UNSET
        or isinstance(reply.version, UnsetType)
        or isinstance(reply.updated_at, UnsetType)
    ):
        raise UnexpectedReply("a found value without its value, version or updated_at")
    return Entry(
        scope=scope,
        namespace=namespace,
        key=key,
        value=reply.value,
        version=reply.version,
        updated_at=_timestamp(reply.updated_at),
        expires_at=None
        if isinstance(reply.expires_at, UnsetType)
        else _timestamp(reply.expires_at),
    )


def _timestamp(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise UnexpectedReply(f"updated_at is not an RFC 3339 date-time: {text!r}") from None


__all__ = [
    "DIRECT_REPLY_TO",
    "BatchOp",
    "ClientError",
    "Conflict",
    "Entry",
    "EntryName",
    "LastWrites",
    "MonotonicUuid7",
    "NotConnected",
    "PublishRefused",
    "RequestTimeout",
    "Scope",
    "StateClient",
    "Ttl",
    "UnexpectedReply",
    "Unroutable",
    "next_uuid7",
    "op_delete",
    "op_set",
]
