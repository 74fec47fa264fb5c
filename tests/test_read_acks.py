"""The read path settles every request exactly once, whatever order its answers come in.

Reads that wait for their writes are answered by one task, new reads by another, and a
slow ``list`` of a burst may still be running while the rest of its burst is answered: a
``multiple`` ack must cover none of the requests still being answered (acking one
unanswered, or acking one twice, which closes the channel with ``PRECONDITION_FAILED -
unknown delivery tag``). A request whose reply or dead letter cannot be sent goes back to
the queue, unacked, and is answered once the broker takes it again.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import aio_pika
import aiormq
import asyncpg
import msgspec
import pytest
import structlog

from worker.app import Worker
from worker.config import Settings
from worker.publish import Publisher

from .conftest import StartWorker
from .helpers import get_request as get
from .helpers import publish, queue_messages, set_cmd, uuid7, wait_until
from .rpc import RawRpc

BIG_ROWS = 60_000
"""Entries of the plugin whose filtered lists are slow enough to overlap other answers."""


class CountingRpc(RawRpc):
    """Counts every reply per correlation id (the plain caller keeps only the first)."""

    def __init__(self, amqp_url: str, prefix: str) -> None:
        super().__init__(amqp_url, prefix)
        self.replies: Counter[str] = Counter()

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.replies[message.correlation_id or ""] += 1
        await super()._on_reply(message)


@pytest.fixture
async def rpc(settings: Settings) -> AsyncIterator[CountingRpc]:
    caller = CountingRpc(settings.amqp_url, settings.prefix)
    async with caller:
        yield caller


@pytest.fixture
async def big_plugin(db: asyncpg.Pool) -> AsyncIterator[uuid.UUID]:
    plugin = uuid.uuid4()
    await db.execute("INSERT INTO plugins (id, plugin_key) VALUES ($1, $2)", plugin, str(plugin))
    await db.execute(
        """
        INSERT INTO plugin_state (plugin_id, scope_kind, scope_id, namespace, state_key,
                                  value_json, version, value_bytes)
        SELECT $1, 'issue', 'S' || (n / 100), 'default', 'key-' || n, to_jsonb(n), $2, 1
        FROM generate_series(1, $3) n
        """,
        plugin,
        uuid7(),
        BIG_ROWS,
    )
    yield plugin
    await db.execute("DELETE FROM plugins WHERE id = $1", plugin)


async def rpc_underlay(worker: Worker) -> aiormq.abc.AbstractChannel:
    assert worker.rpc is not None
    return await worker.rpc.subscription.channel.get_underlay_channel()


def publisher(worker: Worker) -> Publisher:
    assert worker.rpc is not None
    return worker.rpc.publisher


async def _true(value: bool) -> bool:
    return value


async def interleaved_traffic(
    rpc: CountingRpc,
    amqp: aio_pika.abc.AbstractChannel,
    prefix: str,
    plugin_id: uuid.UUID,
    big_plugin: uuid.UUID,
    worker_channel: aiormq.abc.AbstractChannel,
    rounds: int = 40,
) -> list[asyncio.Future[aio_pika.abc.AbstractIncomingMessage]]:
    """Rounds of: a read waiting for its write (or, every third round, for its deadline),
    then a slow ``list`` and quick ``get``s behind it, then the write: the waiter is
    answered, by the task re-checking waiters, while the burst behind it is half answered.
    Returns every request's reply future (stops early once the worker's channel closed)."""
    slow_list = {"op": "list", "plugin_id": str(big_plugin), "scope_id": "nothing", "limit": 10}
    sent: list[asyncio.Future[aio_pika.abc.AbstractIncomingMessage]] = []
    for round_ in range(rounds):
        if worker_channel.is_closed:
            break
        write = set_cmd(plugin_id, f"w{round_}", round_)
        if round_ % 3:
            waiter = await rpc.send(plugin_id, get(plugin_id, f"w{round_}", after=write["id"]))
        else:
            deadline = {"x-deadline": int(time.time() * 1000) + 30}
            never = get(plugin_id, "never", after=str(uuid7()))
            waiter = await rpc.send(plugin_id, never, headers=deadline)
        burst = [waiter, await rpc.send(big_plugin, slow_list)]
        burst += [await rpc.send(plugin_id, get(plugin_id, f"k{n}")) for n in range(6)]
        await publish(amqp, prefix, plugin_id, write)
        sent += burst
        await asyncio.wait(burst, timeout=5)
    return sent


async def test_every_read_is_acked_once_however_its_answers_interleave(
    start_worker: StartWorker,
    rpc: CountingRpc,
    amqp: aio_pika.abc.AbstractChannel,
    prefix: str,
    plugin_id: uuid.UUID,
    big_plugin: uuid.UUID,
) -> None:
    worker = await start_worker()
    channel = await rpc_underlay(worker)
    sent = await interleaved_traffic(rpc, amqp, prefix, plugin_id, big_plugin, channel)
    replies = [msgspec.json.decode((await asyncio.wait_for(f, 20)).body) for f in sent]
    assert {r["type"] for r in replies} == {"value", "page", "error"}
    assert {r["code"] for r in replies if r["type"] == "error"} == {"write_pending"}
    assert not channel.is_closed, "the rpc channel was closed (acked twice or unknown tag)"
    assert await rpc_underlay(worker) is channel
    assert len(rpc.replies) == len(sent)
    assert set(rpc.replies.values()) == {1}


async def test_a_read_whose_reply_fails_goes_back_unacked_and_is_answered_later(
    start_worker: StartWorker,
    rpc: CountingRpc,
    amqp: aio_pika.abc.AbstractChannel,
    prefix: str,
    plugin_id: uuid.UUID,
    big_plugin: uuid.UUID,
) -> None:
    worker = await start_worker()
    channel = await rpc_underlay(worker)
    reply_channel = publisher(worker).reply_channel
    with structlog.testing.capture_logs() as logs:
        traffic = asyncio.create_task(
            interleaved_traffic(rpc, amqp, prefix, plugin_id, big_plugin, channel, rounds=20)
        )
        await wait_until(lambda: _true(len(rpc.replies) >= 40), what="traffic under way")
        await reply_channel.close()
        await wait_until(
            lambda: _true(any(e["event"] == "rpc_reply_failed" for e in logs)),
            what="a reply to fail",
        )
        await reply_channel.reopen()
        sent = await traffic
        for future in sent:
            await asyncio.wait_for(future, 30)
    assert not channel.is_closed, "the rpc channel was closed (acked twice or unknown tag)"
    assert set(rpc.replies.values()) == {1}
    assert len(rpc.replies) == len(sent)


async def test_a_read_without_reply_to_whose_dead_letter_fails_is_not_acked(
    start_worker: StartWorker,
    amqp: aio_pika.abc.AbstractChannel,
    prefix: str,
    plugin_id: uuid.UUID,
) -> None:
    worker = await start_worker(roles=frozenset({"reads"}))
    dead_channel = publisher(worker).confirm_channel
    with structlog.testing.capture_logs() as logs:
        await dead_channel.close()
        await publish(amqp, prefix, plugin_id, get(plugin_id, "k"), kind="rpc")
        await wait_until(
            lambda: _true(any(e["event"] == "rpc_dead_letter_failed" for e in logs)),
            what="the dead letter to fail",
        )
    await dead_channel.reopen()

    async def dead_lettered() -> bool:
        return bool(await queue_messages(amqp, f"{prefix}.dead"))

    await wait_until(dead_lettered, what="the request to be dead-lettered once the broker takes it")
