"""``watch``: the plugin's changes as they happen, resumable from any position.

    async for event in state.watch(Scope.issue("ISS-42"), namespace="default"):
        match event:
            case Change(kind="set"): ...      # a value (first the current ones)
            case Change(): ...                # a delete or an expiry
            case Synced(): ...                # caught up: what follows is live
            case Reset(): ...                 # forget what you built: it is told again

Without ``since``, a watch first tells the current entries (as ``set`` changes at the
position the watch started from), then every change after that position: the log is read
from a position taken *before* the listing, so nothing that changes during it is missed (an
entry may then be told twice with the same version; never an older one after a newer).
With ``since`` (a ``position`` of a change, or a ``Synced``'s), it goes on after it.

A watch survives lost connections and restarted workers: it reads the log again from the
last position it told, so nothing is lost and nothing repeated. When the log was compacted
past that position (protocol §8: deletions older than the tombstone retention are gone), it
tells ``Reset``, then the current entries again, then ``Synced``, and goes on: it does not
fail. It ends only when the caller stops iterating, or on an error that retrying cannot cure
(``Forbidden``, ``UnknownPlugin``, an invalid filter).
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeAlias, TypeVar

from schemas.errors import Compacted, Internal
from schemas.messages import ListRequest, PageReply, ScopeKind

from .errors import ClientError
from .log import get_logger
from .models import Change, EntryKey, Scope, entry_from_item, entry_key
from .reads import Reads

T = TypeVar("T")

log = get_logger(__name__)

WAIT: Final = 20.0
"""How long each read of the log waits for a change (seconds)."""
_RETRY_INITIAL: Final = 0.05
_RETRY_MAX: Final = 2.0


@dataclass(frozen=True, slots=True)
class Synced:
    """Everything up to ``position`` has been told (the current entries included): what
    follows is live. ``watch(since=position)`` goes on from here."""

    position: str


@dataclass(frozen=True, slots=True)
class Reset:
    """The log no longer reaches back to the watch's position: the current entries follow
    again, then ``Synced``. Whatever was built from earlier events should be dropped."""

    reason: str


WatchEvent: TypeAlias = Change | Synced | Reset


class Watching(Reads):
    async def watch(
        self,
        scope: Scope | ScopeKind | None = None,
        *,
        namespace: str | None = None,
        prefix: str = "",
        since: str | None = None,
        initial: bool = True,
        page_size: int = 100,
        wait: float = WAIT,
    ) -> AsyncIterator[WatchEvent]:
        """The changes of the entries the filters select (those of ``list``), in log
        order: from ``since``, or, without it, from now, first telling the current entries
        (unless ``initial=False``). See ``worker.client.watch``."""
        position = since
        listed: dict[EntryKey, object] = {}
        synced = False
        if position is None:
            position = await self._end()
            if initial:
                async for event in self._listing(scope, namespace, prefix, position, listed):
                    yield event
        while True:
            try:
                page = await _retrying(
                    functools.partial(
                        self.changes,
                        position,
                        scope,
                        namespace=namespace,
                        prefix=prefix,
                        limit=page_size,
                        # Caught up, wait for the next change; catching up, read on at once.
                        wait=wait if synced else 0.0,
                    )
                )
            except Compacted as exc:
                yield Reset(exc.message)
                listed.clear()
                synced = False
                position = await self._end()
                async for event in self._listing(scope, namespace, prefix, position, listed):
                    yield event
                continue
            for change in page.changes:
                key = entry_key(change.scope, change.namespace, change.key)
                if listed.pop(key, None) == (change.kind, change.version):
                    continue  # the listing told this one already
                yield change
            position = page.next
            if not synced and not page.changes:
                synced = True
                listed.clear()
                yield Synced(position)

    async def _end(self) -> str:
        """The log's current end."""
        return (await _retrying(lambda: self.changes(None))).next

    async def _listing(
        self,
        scope: Scope | ScopeKind | None,
        namespace: str | None,
        prefix: str,
        position: str,
        listed: dict[EntryKey, object],
    ) -> AsyncIterator[Change]:
        """The current entries, as ``set`` changes at ``position`` (taken before); a page
        that fails is asked again, so no entry is told twice."""
        kind, scope_id = (scope.kind, scope.id) if isinstance(scope, Scope) else (scope, None)
        cursor: str | None = None
        while True:
            request = ListRequest(
                plugin_id=self.plugin_id,
                scope_kind=kind,
                scope_id=scope_id,
                namespace=namespace,
                prefix=prefix,
                cursor=cursor,
            )
            page = await _retrying(functools.partial(self._read, request, PageReply, None))
            for item in page.items:
                entry = entry_from_item(item)
                self._new_id.observe(entry.version)
                listed[entry_key(entry.scope, entry.namespace, entry.key)] = ("set", entry.version)
                yield Change(
                    position=position,
                    kind="set",
                    scope=entry.scope,
                    namespace=entry.namespace,
                    key=entry.key,
                    version=entry.version,
                    updated_at=entry.updated_at,
                    value=entry.value,
                    expires_at=entry.expires_at,
                )
            if page.next_cursor is None:
                return
            cursor = page.next_cursor


async def _retrying(call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` until it succeeds or fails for good: lost connections, timeouts and
    ``internal`` answers (the worker's database away) are tried again, with back-off."""
    delay = _RETRY_INITIAL
    while True:
        try:
            return await call()
        except (ClientError, Internal, TimeoutError) as exc:
            log.info("state_watch_retry", error=repr(exc), retry_in=delay)
        await asyncio.sleep(random.uniform(0, delay))
        delay = min(delay * 2, _RETRY_MAX)
