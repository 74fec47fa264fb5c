"""The change feed (protocol §8): every committed change published to
``<prefix>.changes`` with ``chg.<plugin_id>``, at least once and in log order per plugin, by
one relay at a time, which another worker takes over when the relay's worker is killed."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import uuid
from typing import Any

import aio_pika
import aiormq
import asyncpg
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import frame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from schemas.topology import Names
from worker.client import Scope, StateClient
from worker.config import Settings
from worker.publish import Outgoing, burst_frames, publish_in_order
from worker.store import LOCK_CLASS, RELAY_LOCK
from worker.topology import declare

from .conftest import StartWorker
from .helpers import wait_until
from .processes import spawn_worker, tree, wait_exit

FAILOVER_WRITES = int(os.environ.get("PLUGIN_STATE_FAILOVER_WRITES", "3000"))


class Subscriber:
    """A queue of its own bound to one plugin's changes; what arrived, in order."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.messages: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def bind(
        self, channel: aio_pika.abc.AbstractChannel, prefix: str, plugin_id: uuid.UUID
    ) -> None:
        names = Names(prefix)
        exchange = await channel.declare_exchange(
            names.changes, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue("", exclusive=True)
        await queue.bind(exchange, routing_key=names.change_key(plugin_id))
        await queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.messages.append(message)
        self.items.append(msgspec.json.decode(message.body))

    def positions(self) -> list[int]:
        return [int(item["position"]) for item in self.items]

    def first_seen(self) -> list[int]:
        """Positions as a subscriber that dedupes by position keeps them."""
        seen: set[int] = set()
        kept = []
        for position in self.positions():
            if position not in seen:
                seen.add(position)
                kept.append(position)
        return kept


async def head_of(db: asyncpg.Pool, plugin_id: uuid.UUID) -> int:
    return int(
        await db.fetchval("SELECT head FROM plugin_counters WHERE plugin_id = $1", plugin_id)
    )


@pytest.fixture
async def client(settings: Settings, plugin_id: uuid.UUID) -> Any:
    async with StateClient(settings.amqp_url, plugin_id, prefix=settings.prefix) as state:
        yield state


async def test_every_change_is_published_once_in_log_order_with_its_item(
    start_worker: StartWorker,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    client: StateClient,
    plugin_id: uuid.UUID,
    db: asyncpg.Pool,
) -> None:
    await start_worker()
    await start_worker()
    subscriber = Subscriber()
    await subscriber.bind(amqp, settings.prefix, plugin_id)
    start = await head_of(db, plugin_id)
    scope = Scope.issue("ISS-1")
    writes = 600
    for n in range(writes):
        # Few keys: the log compacts them, the feed must still tell every change. Each
        # write waits for the one before, so none is superseded: each is a change.
        if n % 5 == 4:
            await client.delete(scope, f"k{n % 7}", wait=True)
        else:
            await client.set(scope, f"k{n % 7}", n, wait=True)
    head = start + writes
    await wait_until(lambda: _has(subscriber, head), timeout=30, what="every change published")
    assert subscriber.first_seen() == list(range(start + 1, head + 1))
    item = subscriber.items[-1]
    assert set(item) >= {"position", "change", "scope_kind", "key", "version", "updated_at"}
    message = subscriber.messages[-1]
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.routing_key == Names.change_key(plugin_id)
    assert message.message_id == f"{plugin_id}:{item['position']}"
    assert message.type == "change"

    async def outbox_empty() -> bool:
        # The relay deletes what it published when its round commits, just after the
        # broker confirmed the last item (which the subscriber may already have).
        left = await db.fetchval(
            "SELECT count(*) FROM plugin_state_feed WHERE plugin_id = $1", plugin_id
        )
        return bool(left == 0)

    await wait_until(outbox_empty, what="the published changes to leave the outbox")


_OUTGOING = st.builds(
    Outgoing,
    st.text(max_size=60).map(lambda key: f"chg.{key}"),
    st.text(min_size=1, max_size=60),
    st.binary(max_size=3000),
)


@given(
    channel=st.integers(1, 2047),
    messages=st.lists(_OUTGOING, min_size=1, max_size=5),
    max_content=st.integers(1, 4096),
)
def test_a_burst_is_framed_exactly_as_pamqp_frames_each_message(
    channel: int, messages: list[Outgoing], max_content: int
) -> None:
    expected = b""
    for routing_key, message_id, body in messages:
        properties = Basic.Properties(
            content_type="application/json",
            delivery_mode=2,
            message_id=message_id,
            message_type="change",
        )
        expected += frame.marshal(
            Basic.Publish(exchange="plugin_state.changes", routing_key=routing_key), channel
        )
        expected += frame.marshal(ContentHeader(0, len(body), properties), channel)
        for start in range(0, len(body), max_content):
            expected += frame.marshal(ContentBody(body[start : start + max_content]), channel)
    assert expected == burst_frames(
        channel,
        "plugin_state.changes",
        messages,
        content_type="application/json",
        message_type="change",
        max_content=max_content,
    )


async def test_a_burst_fails_at_once_when_the_broker_closes_its_channel(
    settings: Settings,
) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        underlay = await channel.get_underlay_channel()
        # Publishing to an exchange that does not exist makes the broker close the channel.
        burst = await publish_in_order(
            underlay,
            f"pstest-missing-{uuid.uuid4().hex}",
            [Outgoing("chg.x", "x:1", b"{}"), Outgoing("chg.x", "x:2", b"{}")],
            content_type="application/json",
            message_type="change",
        )
        async with asyncio.timeout(5):
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                await burst.refused()


async def _has(subscriber: Subscriber, head: int) -> bool:
    return bool(subscriber.items) and max(subscriber.positions()) >= head


async def test_expiries_are_published_as_expire(
    start_worker: StartWorker,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    client: StateClient,
    plugin_id: uuid.UUID,
) -> None:
    await start_worker(expiry_interval_seconds=0.2)
    subscriber = Subscriber()
    await subscriber.bind(amqp, settings.prefix, plugin_id)
    version = await client.set(Scope.instance(), "lease", "mine", ttl=0.2)

    async def told() -> bool:
        return [i["change"] for i in subscriber.items] == ["set", "expire"]

    await wait_until(told, timeout=10, what="the set and its expiry")
    assert {i["version"] for i in subscriber.items} == {str(version)}


async def relay_holder(db: asyncpg.Pool) -> int | None:
    """The OS pid of the worker whose backend holds the relay's lock right now."""
    name = await db.fetchval(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.classid = $1 AND l.objid = $2 AND l.granted "
        "AND a.datname = current_database()",
        LOCK_CLASS,
        RELAY_LOCK,
    )
    match = re.search(r" (\d+):", name or "")
    return int(match.group(1)) if match else None


async def test_a_relay_killed_mid_stream_is_taken_over_and_nothing_is_lost_or_reordered(
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    client: StateClient,
    plugin_id: uuid.UUID,
    db: asyncpg.Pool,
) -> None:
    await declare(amqp, settings)
    workers = [spawn_worker(settings) for _ in range(2)]
    try:
        subscriber = Subscriber()
        await subscriber.bind(amqp, settings.prefix, plugin_id)
        start = await head_of(db, plugin_id)
        scope = Scope.issue("ISS-9")

        async def write() -> None:
            # Waiting for each outcome (twenty at a time): once done, every write is in.
            for start_at in range(0, FAILOVER_WRITES, 20):
                await asyncio.gather(
                    *(
                        client.set(scope, f"k{n % 50}", n, wait=True, timeout=60)
                        for n in range(start_at, min(start_at + 20, FAILOVER_WRITES))
                    )
                )

        writing = asyncio.create_task(write())
        killed = None
        while killed is None and not writing.done():
            holder = await relay_holder(db)
            # The relay runs in a process of each worker's own (worker.supervisor): killing
            # it ends that worker's run, and the other worker's relay takes over.
            ours = {pid for w in workers for pid in tree(w.pid)}
            if holder in ours and len(subscriber.items) > 100:
                os.kill(holder, signal.SIGKILL)
                killed = holder
            await asyncio.sleep(0.001)
        await writing
        assert killed is not None, "never saw a worker process hold the relay mid-stream"
        # Writes applied out of order are superseded, not changes: the log's head, once
        # every write is in, is what the feed must reach.
        head = await head_of(db, plugin_id)
        await wait_until(lambda: _has(subscriber, head), timeout=60, what="every change")
        assert subscriber.first_seen() == list(range(start + 1, head + 1))
        print(
            f"killed the relay's worker {killed}; {len(subscriber.items)} deliveries for "
            f"{FAILOVER_WRITES} changes"
        )
    finally:
        for process in workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in workers:
            await wait_exit(process)
