"""Wakes what waits for a plugin's state to change: reads waiting for their ``after`` write
or for a change (``changes`` with ``wait_ms``), and the relay of the change feed.

Commits of this worker are signalled directly by its consumer. Commits of other workers
arrive as *commit notices*: after each transaction, the committing worker publishes the ids
of the plugins it changed to the fanout exchange ``<prefix>.commits``, and every worker
listens on a queue of its own bound to it. Waiters of those plugins are then re-checked,
together, in one query; nothing else is. A notice may be lost (a broker restart, a worker
that reconnects): waiters also re-check on a slow poll, so a lost notice costs latency,
never correctness.

Why not Postgres' ``LISTEN``/``NOTIFY``, which this replaced: ``NOTIFY`` takes a lock on the
whole database's notification queue at commit, so every notifying transaction commits one
after another (``docs/performance.md`` measures it); ``LISTEN`` needs a session of its own,
which a transaction pooler such as PgBouncer does not give. Notices cost one small,
transient message per transaction of each worker, coalesced while one is in flight.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from typing import Final

import aio_pika
import structlog
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractRobustChannel

from worker.broker import BROKER_FAILURES

log = structlog.get_logger(__name__)

_ID_BYTES: Final = 16
_NOTICE_TTL_MS: Final = 5000
"""A notice older than this wakes nobody who is still waiting: the poll has seen it."""
_QUEUE_LENGTH: Final = 10_000


def commits_exchange(prefix: str) -> str:
    """The fanout exchange of commit notices (the worker's own, not part of the contract)."""
    return f"{prefix}.commits"


class Listener:
    """One waiter's view of the commits: which plugins changed since it last looked."""

    def __init__(self) -> None:
        self._changed: set[uuid.UUID] = set()
        self._everything = False
        self._event = asyncio.Event()

    def _committed(self, plugins: set[uuid.UUID]) -> None:
        self._changed |= plugins
        self._event.set()

    def _missed(self) -> None:
        self._everything = True
        self._event.set()

    async def wait(self, timeout: float) -> set[uuid.UUID] | None:
        """The plugins that changed, once some did, or after ``timeout`` seconds (an empty
        set); None means any plugin may have."""
        if not self._event.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self._event.wait()
            except TimeoutError:
                return set()
        self._event.clear()
        changed, self._changed = self._changed, set()
        if self._everything:
            self._everything = False
            return None
        return changed


class Wakeups:
    """Hands every commit (this worker's and, through notices, the others') to each
    listener: the reads that wait, the relay."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def listener(self) -> Listener:
        listener = Listener()
        self._listeners.append(listener)
        return listener

    def committed(self, plugins: Iterable[uuid.UUID]) -> None:
        changed = set(plugins)
        for listener in self._listeners:
            listener._committed(changed)

    def missed(self) -> None:
        """Notices may have been lost: every listener should look again."""
        for listener in self._listeners:
            listener._missed()


class CommitNotices:
    """Publishes this worker's commits and hands other workers' to ``wakeups``."""

    def __init__(
        self, channel: AbstractRobustChannel, prefix: str, instance: str, wakeups: Wakeups
    ) -> None:
        self.channel = channel
        self.exchange_name = commits_exchange(prefix)
        self.instance = instance
        self.wakeups = wakeups
        self._pending: set[uuid.UUID] = set()
        self._sending: asyncio.Task[None] | None = None
        self._exchange: AbstractExchange | None = None

    async def start(self) -> None:
        """Declare the exchange and this worker's queue (server-named, exclusive: it goes
        with the connection; restored by the robust channel after a reconnect)."""
        exchange = await self.channel.declare_exchange(
            self.exchange_name, aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await self.channel.declare_queue(
            "",
            exclusive=True,
            auto_delete=True,
            arguments={
                "x-message-ttl": _NOTICE_TTL_MS,
                "x-max-length": _QUEUE_LENGTH,
                "x-overflow": "drop-head",
            },
        )
        await queue.bind(exchange)
        self._exchange = exchange
        await queue.consume(self._on_notice, no_ack=True)
        self.channel.reopen_callbacks.add(lambda *_: self.wakeups.missed())

    def committed(self, plugins: Iterable[uuid.UUID]) -> None:
        """Tell local waiters now and other workers soon (one publish in flight at a time;
        what commits meanwhile goes in the next)."""
        plugins = set(plugins)
        self.wakeups.committed(plugins)
        self._pending |= plugins
        if self._exchange is not None and (self._sending is None or self._sending.done()):
            self._sending = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        assert self._exchange is not None
        while self._pending:
            plugins, self._pending = self._pending, set()
            body = b"".join(p.bytes for p in plugins)
            try:
                await self._exchange.publish(
                    aio_pika.Message(body, app_id=self.instance), routing_key="", timeout=5
                )
            except BROKER_FAILURES as exc:
                # Other workers' waiters fall back on their poll.
                log.info("commit_notice_lost", error=repr(exc))

    async def _on_notice(self, message: AbstractIncomingMessage) -> None:
        if message.app_id == self.instance:
            return
        body = message.body
        self.wakeups.committed(
            uuid.UUID(bytes=body[i : i + _ID_BYTES])
            for i in range(0, len(body) - len(body) % _ID_BYTES, _ID_BYTES)
        )

    async def stop(self) -> None:
        if self._sending is not None:
            self._sending.cancel()
