"""The change feed's relay: publishes every committed change to ``<prefix>.changes``
(routing key ``chg.<plugin_id>``), at least once, in log order per plugin (protocol §8).

Each write transaction puts its changes' items into an outbox, ``plugin_state_feed``
(``worker.changes``), so nothing is published that did not commit and nothing committed is
forgotten. A relay *round* is one transaction: take the advisory lock of the relay, read the
next items of each plugin, publish them on a channel with publisher confirms, wait until
the broker has confirmed every one, delete them, commit. So:

- **One relay at a time.** The lock is the transaction's, held until it ends: two rounds
  never overlap, and each begins after the previous one committed, with a snapshot that sees
  what it deleted. Any worker may run the next round; a worker that finds the lock taken
  tries again a little later, so when the relay's worker dies, another takes over within
  ``_TAKE_OVER_SECONDS``.
- **Resumes where it left off.** What the outbox still holds is exactly what was not
  confirmed in a committed round: a relay killed mid-round loses its transaction, and the
  next round publishes those items again (subscribers dedupe by ``position``).
- **In log order.** Items of a plugin join the outbox in commit order (positions are given
  under the plugin's lock, see ``worker.changes``), each round publishes a prefix of them in
  position order on one channel, and the next round starts only after the broker confirmed
  the previous one's: a queue receives each plugin's changes in order, with at most a
  repeated run after a failover.

A change is published within a round trip or two of its commit: the relay is woken by the
same commit notices as the waiting reads (``worker.wakeups``).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Final

import aio_pika
import aio_pika.exceptions
import structlog
from aio_pika.abc import AbstractExchange, AbstractRobustChannel

from schemas.topology import Names
from worker.broker import BROKER_FAILURES
from worker.changes import split_items
from worker.metrics import Metrics
from worker.priority import ReadsFirst
from worker.publish import Confirmations, Outgoing, publish_in_order
from worker.store import DATABASE_FAILURES, RELAY_LOCK, FeedRow, Store
from worker.wakeups import Listener


class FeedRefused(aio_pika.exceptions.AMQPError):
    """The broker nacked changes the relay published: the round is done again."""


log = structlog.get_logger(__name__)

ROUND_PLUGINS: Final = 64
"""Most plugins one round publishes for."""
ROUND_ROWS: Final = 16
"""Most outbox rows (a plugin's changes of one transaction each) of one plugin in a round."""
ROUND_BYTES: Final = 4 * 1024 * 1024
"""Most bytes of items one round publishes (the first item always goes)."""
_POLL_SECONDS: Final = 1.0
"""How often the relay looks at the outbox with no notice (a lost notice costs this)."""
_TAKE_OVER_SECONDS: Final = 1.0
"""How often a worker that found the relay busy elsewhere tries again."""
_CONFIRM_TIMEOUT: Final = 10.0
_SLICE: Final = 256
"""Publishes written at once, between two yields to the event loop (about 1 ms of
encoding)."""


class Relay:
    """Publishes the outbox, one round at a time, while it runs."""

    def __init__(
        self,
        store: Store,
        channel: AbstractRobustChannel,
        names: Names,
        listener: Listener,
        metrics: Metrics,
        *,
        retry_initial: float = 0.5,
        retry_max: float = 10.0,
        priority: ReadsFirst | None = None,
    ) -> None:
        self.store = store
        self.channel = channel
        self.names = names
        self.listener = listener
        self.metrics = metrics
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.priority = priority or ReadsFirst()
        self._exchange: AbstractExchange | None = None
        self._after: uuid.UUID | None = None
        """Where the next round starts in plugin order (None: from the first)."""

    async def start(self) -> None:
        self._exchange = await self.channel.declare_exchange(
            self.names.changes, aio_pika.ExchangeType.TOPIC, durable=True
        )

    async def run(self) -> None:
        """Rounds until cancelled: at once while there is more, on a commit notice or the
        poll when the outbox is empty, every ``_TAKE_OVER_SECONDS`` while another worker
        relays, with back-off while Postgres or RabbitMQ fail."""
        delay = self.retry_initial
        while True:
            try:
                published = await self.round()
            except (*DATABASE_FAILURES, *BROKER_FAILURES) as exc:
                log.warning("relay_round_failed", error=repr(exc), retry_in=delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.retry_max)
                continue
            except Exception:
                # A bug, not a fault of the services: the round is rolled back and tried
                # again later; the worker's other work goes on.
                log.exception("relay_round_crashed", retry_in=self.retry_max)
                await asyncio.sleep(self.retry_max)
                continue
            delay = self.retry_initial
            if published is None:
                await asyncio.sleep(_TAKE_OVER_SECONDS * random.uniform(0.8, 1.2))
            elif published == 0:
                await self.listener.wait(_POLL_SECONDS)

    async def round(self) -> int | None:
        """Publish the next items and remove them from the outbox; how many, or None when
        another worker holds the relay."""
        assert self._exchange is not None, "start() first"
        async with self.store.write_transaction() as tx:
            if not await tx.try_lock(RELAY_LOCK):
                return None
            rows = await tx.feed_next(ROUND_PLUGINS, ROUND_ROWS, ROUND_BYTES, self._after)
            if not rows:
                self._after = None
                return 0
            published = await self._publish(rows)
            await tx.feed_published({row.plugin_id: row.position for row in rows})
        # A full round of plugins: the next starts after the last, so every plugin's turn
        # comes however busy the first ones are.
        plugins = {row.plugin_id: row.last_position for row in rows}
        self._after = rows[-1].plugin_id if len(plugins) >= ROUND_PLUGINS else None
        self.metrics.changes_published.inc(published)
        for row in rows:
            self.metrics.relay_lag.observe(row.waited)
        for plugin, position in plugins.items():
            self.metrics.log_head.labels(plugin_id=str(plugin)).set(position)
        return published

    async def _publish(self, rows: list[FeedRow]) -> int:
        """Publish in order and wait for every confirm; any nack fails the round (it is
        rolled back and published again).

        The publishes are pipelined, not one confirm at a time: a slice of them at a time
        is written to the socket in one block (``worker.publish.publish_in_order``), in
        order, and the confirms are awaited once all are written."""
        items = [
            Outgoing(self.names.change_key(row.plugin_id), f"{row.plugin_id}:{position}", body)
            for row in rows
            for position, body in split_items(row)
        ]
        channel = await self.channel.get_underlay_channel()
        assert self._exchange is not None
        exchange = self._exchange.name
        bursts: list[Confirmations] = []
        try:
            async with asyncio.timeout(_CONFIRM_TIMEOUT):
                # A slice at a time, giving way to reads between slices: a round of
                # thousands of changes at once would hold the event loop for milliseconds.
                for start in range(0, len(items), _SLICE):
                    bursts.append(
                        await publish_in_order(
                            channel,
                            exchange,
                            items[start : start + _SLICE],
                            content_type="application/json",
                            message_type="change",
                        )
                    )
                    await self.priority.writes_turn()
                refused = sum([await burst.refused() for burst in bursts])
        except BaseException:
            for burst in bursts:
                burst.abandon()
            raise
        if refused:
            raise FeedRefused(f"the broker refused {refused} of {len(items)} changes")
        return len(items)
