"""Writes: ``set``, ``delete``, ``batch``.

Each write gets a fresh UUIDv7 (strictly increasing within the client) and is published
persistent and ``mandatory`` with publisher confirms; a call returns the write's id once
the broker has confirmed it, i.e. the write is safely in the commands queue. ``wait=True``
also waits for the worker's ``applied`` reply (conditional writes wait by default). Writes
carry no AMQP ``expiration``: a write the caller stopped waiting for must still be applied,
never silently dropped by the broker. The id of each confirmed write is remembered per
entry, so that reads see it (read-your-writes, ``worker.client.reads``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import msgspec
from msgspec import UnsetType

from schemas import rules
from schemas.codec import JSON
from schemas.messages import (
    DEFAULT_NAMESPACE,
    AppliedReply,
    BatchCommand,
    BatchSet,
    DeleteCommand,
    SetCommand,
)

from .connection import expect
from .core import ClientCore
from .errors import Conflict, UnexpectedReply
from .models import BatchOp, EntryKey, Scope, Ttl, entry_key, ttl_ms


class Writes(ClientCore):
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
        permanent again. A conditional write waits for its outcome unless ``wait=False``.

        An unconditional write without ``ttl`` that does not wait is coalesced (unless the
        client was made with ``coalesce=False``): it is sent in a ``batch`` with the writes
        made about the same time, and the id returned is that batch's (``coalesce``)."""
        if (
            self._coalescer is not None
            and if_version is None
            and not if_absent
            and ttl is None
            and not wait
        ):
            entry = self._coalescer.check(scope, namespace, key)
            encoded = self._coalescer.encode(value)
            if encoded is not None:
                return await self._coalesced(scope, namespace, key, entry, encoded, timeout)
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
            command, [entry_key(scope, namespace, key)], [value], wait, timeout
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
        outcome unless ``wait=False``). Coalesced like ``set``."""
        if self._coalescer is not None and if_version is None and not wait:
            entry = self._coalescer.check(scope, namespace, key)
            return await self._coalesced(scope, namespace, key, entry, None, timeout)
        command = DeleteCommand(
            id=self._new_id(),
            plugin_id=self.plugin_id,
            scope_kind=scope.kind,
            scope_id=scope.id,
            namespace=namespace,
            key=key,
            if_version=if_version,
        )
        return await self._write(command, [entry_key(scope, namespace, key)], [], wait, timeout)

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

    async def _coalesced(
        self,
        scope: Scope,
        namespace: str,
        key: str,
        entry: EntryKey,
        encoded: tuple[msgspec.Raw, int] | None,
        timeout: float | None,
    ) -> uuid.UUID:
        assert self._coalescer is not None
        return await self._coalescer.write(
            scope, namespace, key, encoded, entry, self.timeout if timeout is None else timeout
        )

    async def _send_coalesced(
        self, command: SetCommand | DeleteCommand | BatchCommand, timeout: float
    ) -> None:
        """Publish a batch the coalescer gathered (``Coalescer``'s ``send``)."""
        await self._wire.call(
            self._names.command_key(self.plugin_id),
            self._codec.encode(command),
            reply=False,
            timeout=timeout,
            write_id=command.id,
        )

    async def _write(
        self,
        command: SetCommand | DeleteCommand | BatchCommand,
        entries: Iterable[EntryKey],
        values: list[Any],
        wait: bool | None,
        timeout: float | None,
    ) -> uuid.UUID:
        if wait is None:
            ops = command.ops if isinstance(command, BatchCommand) else [command]
            wait = any(op.if_version is not None or op.if_absent for op in ops)
        body = self._codec.encode(command)
        if self._codec.content_type == JSON and b"null" in body:
            # msgspec writes NaN and Infinity as null: refuse rather than store another value.
            rules.check_finite(values)
        reply = await self._wire.call(
            self._names.command_key(self.plugin_id),
            body,
            reply=wait,
            timeout=timeout,
            write_id=command.id,
        )
        if wait:
            applied = expect(reply, AppliedReply)
            if applied.id != command.id:
                raise UnexpectedReply(f"reply applies {applied.id}, not {command.id}")
            if applied.outcome == "conflict":
                failed = None if isinstance(applied.failed_op, UnsetType) else applied.failed_op
                raise Conflict(command.id, failed)
        for entry in entries:
            self._last_writes.record(entry, command.id)
        return command.id
