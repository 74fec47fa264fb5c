"""Coalescing: fire-and-forget writes gathered into ``batch`` messages.

A plugin that writes in bursts would pay one AMQP message per write at both ends. Instead,
an unconditional write that does not wait (``set``/``delete`` without ``if_version``,
``if_absent``, ``ttl`` or ``wait=True``) joins the client's open batch, Nagle-like: when no
publish is in flight the batch goes at once (after ``linger``, 0 by default), and the
writes made while its confirm is outstanding gather into the next one. A batch holds at
most ``max_ops`` ops and about ``max_bytes`` bytes; a write larger than that goes alone.

The contract is unchanged for each caller:

- A write is checked against the contract's rules (``schemas.rules``) before it joins a
  batch, and a write that breaks one raises its typed error to its own caller at once, so
  a batch can fail only for what would fail each of its writes alone (authorization,
  quotas, a worker's limit tighter than the defaults in ``Coalescing``).
- A batch has one id, a UUIDv7 from the client's clock, made when the batch opens; it is
  the id (and version) of every write in it, and what each call returns. The batch is
  closed as soon as the clock makes or observes any other id (a write that is not
  coalesced, a read of a newer version), so the client's writes keep their order: a later
  write never gets an older id than an earlier one. Two writes of one entry in a batch:
  the later wins (protocol §3), as it would as two messages.
- A call's ``timeout`` bounds its batch's publish, which starts once the batch before it
  is confirmed (or refused).
- Each call returns once its batch is confirmed, and only then is the batch's id recorded
  for read-your-writes. A refused publish (nacked, unroutable, a lost client) raises for
  every caller of that batch; a crash loses only writes whose calls had not returned.
- Closing the client sends what is still gathered first.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from schemas import rules
from schemas.codec import JSON, MSGPACK, Codec
from schemas.errors import StateError
from schemas.messages import (
    MAX_BATCH_OPS,
    BatchCommand,
    BatchDelete,
    BatchSet,
    DeleteCommand,
    SetCommand,
)

from .errors import ClientError, NotConnected, RequestTimeout
from .ids import MonotonicUuid7
from .models import EntryKey, Scope, entry_key

_OP_OVERHEAD: Final = 96
"""Bytes an op takes in a batch besides its names and value (field names, punctuation)."""

_SAFETY_MARGIN: Final = 1.0
_CHECKED_NAMES: Final = 16384
"""Entry names remembered as checked: a plugin writes the same few entries again and
again, and checking their names was a tenth of a coalesced write's cost."""

WriteCommand = SetCommand | DeleteCommand | BatchCommand
Send = Callable[[WriteCommand, float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Coalescing:
    """How fire-and-forget writes are gathered into batches (``StateClient(coalesce=...)``;
    ``coalesce=False`` sends each write as a message of its own)."""

    linger: float = 0.0
    """Seconds a batch waits for more writes when no publish is in flight (0: it goes at
    once, and writes gather only while the previous batch's confirm is outstanding)."""
    max_ops: int = MAX_BATCH_OPS
    """Most writes in one batch (the contract allows 1000)."""
    max_bytes: int = 256 * 1024
    """About the most bytes of one batch message; a larger write goes alone."""
    value_max_bytes: int = rules.VALUE_MAX_BYTES
    """The workers' value limit, checked before a write joins a batch."""
    value_max_depth: int = rules.VALUE_MAX_DEPTH
    """The workers' nesting limit, likewise."""

    def __post_init__(self) -> None:
        if not 0 <= self.linger <= 1:
            raise ValueError("linger is between 0 and 1 second")
        if not 1 <= self.max_ops <= MAX_BATCH_OPS:
            raise ValueError(f"max_ops is between 1 and {MAX_BATCH_OPS}")
        if self.max_bytes < 1024:
            raise ValueError("max_bytes is at least 1024")


@dataclass(slots=True)
class _Batch:
    id: uuid.UUID
    ops: list[BatchSet | BatchDelete] = field(default_factory=list)
    entries: list[EntryKey] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    """One per caller: a caller that stops waiting cancels its own, not the others'
    (``asyncio.shield`` over one shared future did the same for twice the callbacks)."""
    settled: bool = False
    size: int = 0
    timeout: float = 0.0
    """The longest of its callers' timeouts: the publish's deadline."""
    expiry: asyncio.TimerHandle | None = None
    """Fails the batch's callers if, against every bound, it was neither confirmed nor
    refused in time."""

    def expire(self, bound: float) -> None:
        self.settle(RequestTimeout(f"no publisher confirm within {bound}s for batch {self.id}"))

    def settle(self, failure: BaseException | None = None) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
        if self.settled:
            return
        self.settled = True
        for waiter in self.waiters:
            if waiter.done():
                continue  # its caller stopped waiting
            if failure is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(failure)

    def command(self, plugin_id: uuid.UUID) -> WriteCommand:
        """One op goes as the plain write it is; more as a ``batch``."""
        if len(self.ops) > 1:
            return BatchCommand(id=self.id, plugin_id=plugin_id, ops=self.ops)
        op = self.ops[0]
        if isinstance(op, BatchSet):
            return SetCommand(
                id=self.id,
                plugin_id=plugin_id,
                scope_kind=op.scope_kind,
                scope_id=op.scope_id,
                namespace=op.namespace,
                key=op.key,
                value=op.value,
            )
        return DeleteCommand(
            id=self.id,
            plugin_id=plugin_id,
            scope_kind=op.scope_kind,
            scope_id=op.scope_id,
            namespace=op.namespace,
            key=op.key,
        )


class Coalescer:
    """The client's open batch, the batches waiting to be sent, and the task sending them,
    one publish in flight at a time."""

    def __init__(
        self,
        settings: Coalescing,
        plugin_id: uuid.UUID,
        codec: Codec,
        new_id: MonotonicUuid7,
        send: Send,
        confirmed: Callable[[EntryKey, uuid.UUID], None],
    ) -> None:
        self.settings = settings
        self._plugin_id = plugin_id
        self._codec = codec
        self._new_id = new_id
        self._send = send
        self._confirmed = confirmed
        self._open: _Batch | None = None
        self._sealed: deque[_Batch] = deque()
        self._sender: asyncio.Task[None] | None = None
        self._checked: set[EntryKey] = set()
        self.batches_sent = 0
        """Messages this coalescer published (each one batch, or one write alone)."""

    def check(self, scope: Scope, namespace: str, key: str) -> EntryKey:
        """The contract's rules of an entry's names: the entry, or its typed error."""
        entry = entry_key(scope, namespace, key)
        if entry in self._checked:
            return entry
        rules.check_names(scope.id, namespace, key)
        rules.check_entry(scope.kind, scope.id, namespace, key)
        if len(self._checked) >= _CHECKED_NAMES:
            self._checked.clear()
        self._checked.add(entry)
        return entry

    def encode(self, value: Any) -> tuple[msgspec.Raw, int] | None:
        """``value`` encoded once, in the client's encoding, after the contract's value
        rules (its typed error otherwise), with its size; None when it is too large to
        share a batch."""
        raw = self._codec.encode(value)
        if self._codec.content_type == JSON and b"null" in raw:
            rules.check_finite(value)
        rules.encode_value(
            msgspec.Raw(raw),
            self.settings.value_max_bytes,
            self.settings.value_max_depth,
            msgpack=self._codec.content_type == MSGPACK,
        )
        if len(raw) + _OP_OVERHEAD > self.settings.max_bytes:
            return None
        return msgspec.Raw(raw), len(raw)

    async def write(
        self,
        scope: Scope,
        namespace: str,
        key: str,
        encoded: tuple[msgspec.Raw, int] | None,
        entry: EntryKey,
        timeout: float,
    ) -> uuid.UUID:
        """Add a set (its value ``encoded``) or a delete (None) to the open batch; returns
        the batch's id once it is confirmed."""
        size = _OP_OVERHEAD + len(key) + len(namespace) + len(scope.id or "")
        op: BatchSet | BatchDelete
        if encoded is None:
            op = BatchDelete(scope_kind=scope.kind, scope_id=scope.id, namespace=namespace, key=key)
        else:
            op = BatchSet(
                scope_kind=scope.kind,
                scope_id=scope.id,
                namespace=namespace,
                key=key,
                value=encoded[0],
            )
            size += encoded[1]
        batch = self._batch_for(size)
        batch.ops.append(op)
        batch.entries.append(entry)
        batch.size += size
        batch.timeout = max(batch.timeout, timeout)
        if len(batch.ops) >= self.settings.max_ops:
            self._seal()
        if self._sender is None:
            self._sender = asyncio.create_task(self._run(), name="state-client-coalesce")
        loop = asyncio.get_running_loop()
        if batch.expiry is None:
            # The batch's publish has the caller's deadline, counted from when it is sent
            # (after the batch in flight, itself bounded likewise) and ends in a confirm or
            # an error: this bound is only a safety net, one timer for the whole batch (a
            # timer per caller was a sixth of a coalesced write's cost).
            bound = 2 * timeout + _SAFETY_MARGIN
            batch.expiry = loop.call_later(bound, batch.expire, bound)
        waiter = loop.create_future()
        batch.waiters.append(waiter)
        await waiter
        return batch.id

    async def flush(self) -> None:
        """Send what is gathered, and wait until every batch has been confirmed or refused."""
        self._seal()
        sender = self._sender
        if sender is not None:
            await asyncio.shield(sender)

    def _batch_for(self, size: int) -> _Batch:
        batch = self._open
        if batch is not None and (
            # Any id made or observed since the batch opened is newer than the batch's own:
            # a write made now must not be older than it.
            not self._new_id.is_latest(batch.id)
            or len(batch.ops) >= self.settings.max_ops
            or batch.size + size > self.settings.max_bytes
        ):
            self._seal()
            batch = None
        if batch is None:
            batch = self._open = _Batch(self._new_id())
        return batch

    def _seal(self) -> None:
        if self._open is not None:
            self._sealed.append(self._open)
            self._open = None

    async def _run(self) -> None:
        try:
            while self._sealed or self._open is not None:
                if not self._sealed:
                    if self.settings.linger:
                        await asyncio.sleep(self.settings.linger)
                    self._seal()
                await self._publish(self._sealed.popleft())
        finally:
            self._sender = None
            self._fail_rest()

    async def _publish(self, batch: _Batch) -> None:
        try:
            await self._send(batch.command(self._plugin_id), batch.timeout)
        except (ClientError, StateError) as exc:
            # Every caller of the batch learns that its write was refused.
            batch.settle(exc)
            return
        except BaseException as exc:
            batch.settle(NotConnected(f"the batch was not sent: {exc!r}"))
            raise
        self.batches_sent += 1
        for entry in batch.entries:
            self._confirmed(entry, batch.id)
        batch.settle()

    def _fail_rest(self) -> None:
        """The sender was cancelled (the loop is closing): nothing left will be sent."""
        self._seal()
        while self._sealed:
            self._sealed.popleft().settle(NotConnected("the client stopped before sending"))
