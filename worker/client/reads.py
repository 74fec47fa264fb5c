"""Reads: ``get``, ``get_many``, ``list`` and ``changes``, RPC over AMQP.

Reads carry ``expiration`` equal to the time the caller still waits (less a small margin
for the answer to travel back), so a worker drops requests nobody waits for, and the
caller's deadline (the ``x-deadline`` header), so a worker never waits for a write longer
than the caller waits for the answer, however long the request queued.

**Read-your-writes.** ``get`` and ``get_many`` send the id of this client's last write to
each entry as ``after`` (``worker.client.ids.LastWrites``). When the worker answers
``write_pending``, the read raises ``WritePending`` and the client keeps the id: the next
read waits for that write again rather than silently return an older value. A write that
was rejected (it is in the dead-letter queue) is never applied: ``forget_write`` drops its
id, so that reads answer what is stored. ``list`` has no such guarantee; write with
``wait=True`` first.

**The near cache.** With one (``StateClient(cache=...)``), ``get`` and ``get_many``
answer from memory what the cache may answer (``worker.client.cache``) and ask the worker
for the rest; ``fresh=True`` always asks the worker.
"""

from __future__ import annotations

import builtins  # ``Reads.list`` hides ``list`` in the class's annotations
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from msgspec import Struct

from schemas.errors import WritePending
from schemas.messages import (
    DEFAULT_NAMESPACE,
    ChangesReply,
    ChangesRequest,
    EntryRef,
    GetManyRequest,
    GetRequest,
    ListRequest,
    PageReply,
    ScopeKind,
    ValueReply,
    ValuesReply,
)

from .connection import expect
from .core import ClientCore
from .errors import UnexpectedReply
from .models import (
    Change,
    Entry,
    EntryKey,
    EntryName,
    Scope,
    change_from_item,
    entry_from_item,
    entry_from_value,
    entry_key,
)

R = TypeVar("R", bound=Struct)


@dataclass(frozen=True, slots=True)
class ChangesPage:
    """A page of the change log: its changes, and ``next``, where to read on from."""

    changes: builtins.list[Change]
    next: str


class Reads(ClientCore):
    def forget_write(self, scope: Scope, key: str, *, namespace: str = DEFAULT_NAMESPACE) -> None:
        """Stop reading the entry as of this client's last write to it: for a write that was
        rejected (``get`` raised ``WritePending`` and the write is in the dead-letter queue),
        so that reads answer what is stored."""
        self._last_writes.drop(entry_key(scope, namespace, key))

    async def get(
        self,
        scope: Scope,
        key: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        fresh: bool = False,
        timeout: float | None = None,
    ) -> Entry | None:
        """The entry, or ``None`` when it has no value; reflects this client's writes.
        From the near cache when there is one and it may answer, unless ``fresh``."""
        entry = entry_key(scope, namespace, key)
        (found,) = await self._lookup([(scope, namespace, key)], [entry], fresh, timeout)
        return found

    async def get_many(
        self,
        names: Sequence[EntryName],
        *,
        fresh: bool = False,
        timeout: float | None = None,
    ) -> builtins.list[Entry | None]:
        """One ``Entry | None`` per ``(scope, key[, namespace])``, in order."""
        if not names:
            return []
        wanted = [(n[0], n[2] if len(n) == 3 else DEFAULT_NAMESPACE, n[1]) for n in names]
        entries = [entry_key(scope, ns, key) for scope, ns, key in wanted]
        return await self._lookup(wanted, entries, fresh, timeout)

    async def _lookup(
        self,
        wanted: builtins.list[tuple[Scope, str, str]],
        entries: builtins.list[EntryKey],
        fresh: bool,
        timeout: float | None,
    ) -> builtins.list[Entry | None]:
        """Answer what the cache may, ask the worker for the rest (in one request), and let
        the cache keep what the worker answered."""
        cache = self._cache
        found: builtins.list[Entry | None] = [None] * len(wanted)
        ask = []
        for i, entry in enumerate(entries):
            hit = None if cache is None or fresh else cache.lookup(entry, self._last_writes)
            if hit is None:
                ask.append(i)
            else:
                found[i] = hit.entry
        if not ask:
            return found
        filling = None if cache is None else cache.filling([entries[i] for i in ask])
        try:
            answers = await self._ask([wanted[i] for i in ask], [entries[i] for i in ask], timeout)
            for i, answer in zip(ask, answers, strict=True):
                if answer is not None:
                    self._new_id.observe(answer.version)
                if cache is not None and filling is not None:
                    found[i] = cache.keep(entries[i], answer, filling)
                else:
                    found[i] = answer
        finally:
            if cache is not None and filling is not None:
                cache.filled(filling)
        return found

    async def _ask(
        self,
        wanted: builtins.list[tuple[Scope, str, str]],
        entries: builtins.list[EntryKey],
        timeout: float | None,
    ) -> builtins.list[Entry | None]:
        afters = [self._last_writes.get(entry) for entry in entries]
        if len(wanted) == 1:
            (scope, namespace, key), after = wanted[0], afters[0]
            request = GetRequest(
                plugin_id=self.plugin_id,
                scope_kind=scope.kind,
                scope_id=scope.id,
                namespace=namespace,
                key=key,
                after=after,
            )
            reply = await self._read(request, ValueReply, timeout)
            return [entry_from_value(scope, namespace, key, reply)]
        many = GetManyRequest(
            plugin_id=self.plugin_id,
            entries=[
                EntryRef(
                    scope_kind=scope.kind, scope_id=scope.id, namespace=ns, key=key, after=after
                )
                for (scope, ns, key), after in zip(wanted, afters, strict=True)
            ],
        )
        values = await self._read(many, ValuesReply, timeout)
        if len(values.items) != len(wanted):
            raise UnexpectedReply(f"{len(values.items)} values for {len(wanted)} entries")
        return [
            entry_from_value(scope, ns, key, item)
            for (scope, ns, key), item in zip(wanted, values.items, strict=True)
        ]

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
        kind, scope_id = _filter(scope)
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
                yield entry_from_item(item)
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def changes(
        self,
        since: str | None = None,
        scope: Scope | ScopeKind | None = None,
        *,
        namespace: str | None = None,
        prefix: str = "",
        limit: int = 100,
        wait: float = 0.0,
        timeout: float | None = None,
    ) -> ChangesPage:
        """One page of the change log after ``since`` (None: its current end, with no
        changes), with the filters of ``list``; waits up to ``wait`` seconds (at most 30)
        for a change when there is none yet. ``watch`` follows the log for you."""
        kind, scope_id = _filter(scope)
        request = ChangesRequest(
            plugin_id=self.plugin_id,
            since=since,
            limit=limit,
            wait_ms=round(wait * 1000),
            scope_kind=kind,
            scope_id=scope_id,
            namespace=namespace,
            prefix=prefix,
        )
        seconds = (self.timeout if timeout is None else timeout) + wait
        reply = await self._read(request, ChangesReply, seconds)
        changes = [change_from_item(item) for item in reply.items]
        for change in changes:
            self._new_id.observe(change.version)
        return ChangesPage(changes, reply.next)

    async def _read(
        self,
        request: GetRequest | GetManyRequest | ListRequest | ChangesRequest,
        kind: type[R],
        timeout: float | None,
    ) -> R:
        reply = await self._wire.call(
            self._names.rpc_key(self.plugin_id),
            self._codec.encode(request),
            reply=True,
            timeout=timeout,
        )
        try:
            return expect(reply, kind)
        except WritePending as exc:
            raise WritePending(
                f"{exc.message}; the next read waits for it again. If the write was "
                "rejected (see the dead-letter queue), forget_write() reads what is stored"
            ) from None


def _filter(scope: Scope | ScopeKind | None) -> tuple[ScopeKind | None, str | None]:
    return (scope.kind, scope.id) if isinstance(scope, Scope) else (scope, None)
