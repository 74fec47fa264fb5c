"""``StateClient``: a plugin's handle on its state, assembled from the parts of this
package (``writes``, ``reads``, ``watch``, over ``connection`` and, optionally, ``cache``).
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import uuid
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Final, Self

from yarl import URL

from schemas.brokers import split_urls
from schemas.codec import JSON, codec_for
from schemas.errors import StateError
from schemas.messages import DEFAULT_NAMESPACE
from schemas.topology import DEFAULT_PREFIX, DIRECT_REPLY_TO, Names

from .cache import FOLLOW_WAIT, CacheLimits, CacheStats, NearCache
from .coalesce import Coalescer, Coalescing
from .connection import Connection
from .errors import Conflict
from .ids import LastWrites, MonotonicUuid7
from .models import Entry, Scope, Ttl, entry_key
from .reads import ChangesPage
from .watch import Watching
from .writes import Writes

_UPDATE_PAUSE: Final = 0.01
_UPDATE_PAUSE_MAX: Final = 0.5
"""update()'s pauses between a conflict and the next try (full jitter up to these)."""


class StateClient(Writes, Watching):
    """A plugin's handle on its state. Use ``async with``, or ``connect()`` and ``close()``.

    ``amqp_url`` is the broker's URL, or the URLs of a cluster's nodes (a sequence, or one
    comma-separated string): the client connects to any live node and moves to another when
    its node goes down (``worker.client.failover``).

    ``cache=CacheLimits(...)`` (or ``True`` for the defaults) keeps a near cache of the
    entries read, kept current from the change log (``worker.client.cache``).

    Fire-and-forget writes are coalesced into batches (``worker.client.coalesce``);
    ``coalesce=Coalescing(...)`` tunes it, ``coalesce=False`` sends one message per write."""

    def __init__(
        self,
        amqp_url: str | Sequence[str],
        plugin_id: uuid.UUID | str,
        *,
        prefix: str = DEFAULT_PREFIX,
        content_type: str = JSON,
        timeout: float = 5.0,
        remember: int = 10_000,
        connection_name: str | None = None,
        reply_queue: str | None = None,
        cache: CacheLimits | bool | None = None,
        coalesce: Coalescing | bool = True,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if reply_queue is not None and not reply_queue:
            raise ValueError("reply_queue needs a name")
        self.plugin_id = uuid.UUID(str(plugin_id))
        self.timeout = timeout
        self._names = Names(prefix)
        try:
            self._codec = codec_for(content_type)
        except StateError as exc:
            raise ValueError(exc.message) from None
        urls = split_urls(amqp_url)
        self._wire = Connection(
            urls,
            self._names,
            self._codec,
            # RabbitMQ checks user_id against the connection's user; the worker checks that
            # this user may act for the plugin (protocol §6). aio-pika logs in as guest by
            # default.
            user_id=URL(urls[0]).user or "guest",
            reply_to=DIRECT_REPLY_TO
            if reply_queue is None
            else self._names.reply_queue_prefix(self.plugin_id) + reply_queue,
            timeout=timeout,
            connection_name=connection_name
            or (
                f"plugin-state-client {self.plugin_id} "
                f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
            ),
        )
        self._new_id = MonotonicUuid7()
        self._last_writes = LastWrites(remember)
        self._coalescer = None
        if coalesce:
            self._coalescer = Coalescer(
                coalesce if isinstance(coalesce, Coalescing) else Coalescing(),
                self.plugin_id,
                self._codec,
                self._new_id,
                self._send_coalesced,
                self._last_writes.record,
            )
        self._cache = None
        if cache:
            self._cache = NearCache(
                cache if isinstance(cache, CacheLimits) else CacheLimits(),
                self._follow_log,
                connected=lambda: self._wire.connected,
            )
            self._wire.on_lost.append(self._cache.lost)

    @property
    def connection_name(self) -> str:
        """Shown by RabbitMQ, so an operator can find this client's connection."""
        return self._wire.connection_name

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        """Connect (and start following the log, with a cache)."""
        await self._wire.open()
        if self._cache is not None:
            self._cache.start()

    async def close(self) -> None:
        """Send the writes still gathered for a batch, then close the connection; calls
        still in flight raise ``NotConnected``."""
        if self._coalescer is not None:
            await self._coalescer.flush()
        if self._cache is not None:
            await self._cache.stop()
        await self._wire.close()

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

    # ------------------------------------------------------------------ what it holds

    @property
    def pending_requests(self) -> int:
        """Calls waiting for a reply right now."""
        return self._wire.pending

    @property
    def remembered_writes(self) -> int:
        """Entries whose last write id the client remembers for read-your-writes."""
        return len(self._last_writes)

    def last_write(
        self, scope: Scope, key: str, *, namespace: str = DEFAULT_NAMESPACE
    ) -> uuid.UUID | None:
        """The id of this client's last confirmed write to the entry, if it remembers one."""
        return self._last_writes.get(entry_key(scope, namespace, key))

    def cache_stats(self) -> CacheStats | None:
        """The near cache's hits, misses, size, liveness and lag (None: no cache)."""
        return None if self._cache is None else self._cache.stats()

    # ------------------------------------------------------------------ composed

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
            # Read from the cache: a stale version only costs a conflict and a fresh retry.
            entry = await self.get(
                scope, key, namespace=namespace, fresh=tried > 1, timeout=timeout
            )
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

    async def _follow_log(self, since: str | None, wait: float) -> ChangesPage:
        """The near cache's read of the log: the whole plugin's, a large page."""
        return await self.changes(since, limit=1000, wait=wait if since is not None else 0.0)


__all__ = ["FOLLOW_WAIT", "StateClient"]
