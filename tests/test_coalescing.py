"""The client coalesces fire-and-forget writes into batches without changing what each
caller sees: the same final state, far fewer messages, read-your-writes, typed errors at
once for invalid writes, a refusal for every caller of a refused batch, a flush on close,
and conditional or waiting writes sent alone."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
import asyncpg
import pytest

from schemas.errors import InvalidRequest, UnsupportedValue, ValueTooLarge
from schemas.topology import Names
from worker.client import Coalescing, PublishRefused, Scope, StateClient
from worker.config import Settings
from worker.topology import declare

from .conftest import StartWorker, unique
from .helpers import state_of, wait_until

ISSUE = Scope.issue("ISS-7")
ClientFactory = Callable[..., StateClient]
Op = tuple[str, Any]  # (key, value), or (key, DELETE)
DELETE = object()


@pytest.fixture
def connect(settings: Settings, plugin_id: uuid.UUID) -> ClientFactory:
    def factory(**options: Any) -> StateClient:
        options = {"prefix": settings.prefix, "timeout": 10.0, **options}
        plugin = options.pop("plugin_id", plugin_id)
        return StateClient(settings.amqp_url, plugin, **options)

    return factory


async def add_plugin(db: asyncpg.Pool) -> uuid.UUID:
    plugin = uuid.uuid4()
    await db.execute(
        "INSERT INTO plugins (id, plugin_key) VALUES ($1, $2)", plugin, unique("plugin")
    )
    return plugin


def stream(count: int, keys: int, seed: int) -> list[Op]:
    rng = random.Random(seed)
    return [
        (f"k{rng.randrange(keys)}", DELETE if rng.random() < 0.2 else {"n": i, "pad": "x" * 40})
        for i in range(count)
    ]


def final_state(ops: list[Op]) -> dict[tuple[Any, ...], Any]:
    state: dict[tuple[Any, ...], Any] = {}
    for key, value in ops:
        entry = ("issue", ISSUE.id, "default", key)
        if value is DELETE:
            state.pop(entry, None)
        else:
            state[entry] = value
    return state


async def fire(client: StateClient, ops: list[Op]) -> list[uuid.UUID]:
    return await asyncio.gather(
        *(
            client.delete(ISSUE, key) if value is DELETE else client.set(ISSUE, key, value)
            for key, value in ops
        )
    )


async def commands_in_queue(amqp: aio_pika.abc.AbstractChannel, settings: Settings) -> int:
    queue = await amqp.declare_queue(Names(settings.prefix).commands_queue, passive=True)
    count = queue.declaration_result.message_count
    assert count is not None
    return count


async def test_coalesced_and_uncoalesced_streams_end_in_the_same_state(
    start_worker: StartWorker, connect: ClientFactory, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    ops = stream(3000, 12, seed=11)
    expected = final_state(ops)
    other = await add_plugin(db)
    async with connect() as coalesced, connect(plugin_id=other, coalesce=False) as alone:
        await fire(coalesced, ops)
        await fire(alone, ops)

    async def both_applied() -> bool:
        return await state_of(db, plugin_id) == expected == await state_of(db, other)

    await wait_until(both_applied, 30, "both streams to be applied")


async def test_concurrent_writes_travel_in_far_fewer_messages(
    start_worker: StartWorker,
    connect: ClientFactory,
    amqp: aio_pika.abc.AbstractChannel,
    settings: Settings,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
) -> None:
    await declare(amqp, settings)  # no worker yet: the messages stay in the queue, counted
    ops = stream(2000, 50, seed=12)
    async with connect() as client:
        ids = await fire(client, ops)
    messages = await commands_in_queue(amqp, settings)
    # Gathered while no confirm (then one) is outstanding, at most 1000 writes a batch.
    assert 2 <= messages <= 20
    assert len(set(ids)) == messages
    assert ids == sorted(ids)  # the batches' ids follow the calls' order
    await start_worker()

    async def applied() -> bool:
        return await state_of(db, plugin_id) == final_state(ops)

    await wait_until(applied, 30, "the batches to be applied")


async def test_a_batch_is_bounded_in_ops_and_bytes(
    connect: ClientFactory, amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    await declare(amqp, settings)
    async with connect(coalesce=Coalescing(max_ops=10, max_bytes=4096)) as client:
        ids = await asyncio.gather(*(client.set(ISSUE, f"k{i}", i) for i in range(100)))
        big = await asyncio.gather(*(client.set(ISSUE, f"b{i}", "y" * 1500) for i in range(10)))
        # Too large to share a batch: goes alone.
        alone = await client.set(ISSUE, "huge", "z" * 8000)
    assert all(ids.count(i) <= 10 for i in ids)
    assert all(big.count(i) <= 2 for i in big)
    assert alone not in big
    assert await commands_in_queue(amqp, settings) >= 100 // 10 + 10 // 2 + 1


async def test_read_your_writes_holds_for_coalesced_writes(
    start_worker: StartWorker, connect: ClientFactory
) -> None:
    await start_worker()
    async with connect() as client:
        ids = await asyncio.gather(*(client.set(ISSUE, f"k{i}", {"v": i}) for i in range(300)))
        assert len(set(ids)) < 300  # they were coalesced
        for i in (0, 150, 299):
            assert client.last_write(ISSUE, f"k{i}") == ids[i]
            entry = await client.get(ISSUE, f"k{i}")
            assert entry is not None and entry.value == {"v": i} and entry.version == ids[i]
        deleted = await asyncio.gather(client.delete(ISSUE, "k1"), client.set(ISSUE, "k2", 2))
        assert client.last_write(ISSUE, "k1") == deleted[0]
        assert await client.get(ISSUE, "k1") is None


async def test_an_invalid_write_raises_at_once_and_does_not_poison_the_others(
    start_worker: StartWorker, connect: ClientFactory, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    deep: Any = 1
    for _ in range(300):
        deep = [deep]
    invalid: list[tuple[str, Any, type[Exception], str]] = [
        ("__proto__", 1, InvalidRequest, "key must not be one of __proto__"),
        ("   ", 1, InvalidRequest, "key must not be only whitespace"),
        ("k" * 501, 1, InvalidRequest, "key must be at most 500 characters"),
        ("nul", "a\x00b", UnsupportedValue, r"U\+0000"),
        ("nan", [1.0, float("nan")], UnsupportedValue, "nan"),
        ("deep", deep, InvalidRequest, "more than 256 deep"),
        ("large", "x" * (1024 * 1024), ValueTooLarge, "the limit is 1048576"),
    ]
    async with connect() as client:
        calls = []
        for i in range(200):
            calls.append(client.set(ISSUE, f"ok{i}", i))
            if i % 25 == 0 and invalid:
                key, value, _, _ = invalid[len(calls) % len(invalid)]
                calls.append(client.set(ISSUE, key, value))
        results = await asyncio.gather(*calls, return_exceptions=True)
        raised = [r for r in results if isinstance(r, BaseException)]
        assert len(raised) == 8
        for key, value, error, words in invalid:
            with pytest.raises(error, match=words):
                await client.set(ISSUE, key, value)
        with pytest.raises(InvalidRequest, match="namespace must not be empty"):
            await client.delete(ISSUE, "ok1", namespace="")

    async def valid_ones_applied() -> bool:
        return await state_of(db, plugin_id) == {
            ("issue", ISSUE.id, "default", f"ok{i}"): i for i in range(200)
        }

    await wait_until(valid_ones_applied, 30, "the valid writes to be applied")


async def test_a_refused_publish_raises_for_every_caller_of_the_batch(
    connect: ClientFactory, amqp: aio_pika.abc.AbstractChannel, settings: Settings
) -> None:
    # A commands queue full at one message, and no worker draining it: the broker nacks.
    await declare(amqp, settings.with_changes(commands_max_length=1))
    async with connect() as client:

        async def nacked() -> bool:
            try:
                await client.set(ISSUE, "filler", 0, timeout=1)
            except PublishRefused:
                return True
            return False

        await wait_until(nacked, 30, "the commands queue to be full")
        results = await asyncio.gather(
            *(client.set(ISSUE, f"k{i}", i, timeout=2) for i in range(50)),
            return_exceptions=True,
        )
        assert all(isinstance(r, PublishRefused) for r in results), results
        assert all(client.last_write(ISSUE, f"k{i}") is None for i in range(50))


async def test_closing_the_client_sends_what_is_gathered(
    start_worker: StartWorker, connect: ClientFactory, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    client = connect(coalesce=Coalescing(linger=0.2))
    await client.connect()
    writes = [asyncio.create_task(client.set(ISSUE, f"k{i}", i)) for i in range(100)]
    await asyncio.sleep(0)  # let the calls join the open batch
    await client.close()
    assert all(write.done() for write in writes)
    assert len({write.result() for write in writes}) == 1

    async def applied() -> bool:
        return len(await state_of(db, plugin_id)) == 100

    await wait_until(applied, 30, "the flushed batch to be applied")


async def test_conditional_and_waiting_writes_are_never_coalesced(
    start_worker: StartWorker, connect: ClientFactory
) -> None:
    await start_worker()
    async with connect() as client:
        waited = await asyncio.gather(
            *(client.set(ISSUE, f"w{i}", i, wait=True) for i in range(30))
        )
        claimed = await asyncio.gather(
            *(client.set(ISSUE, f"c{i}", i, if_absent=True, wait=False) for i in range(30))
        )
        versioned = await asyncio.gather(
            *(client.delete(ISSUE, f"w{i}", if_version=waited[i], wait=False) for i in range(30))
        )
        expiring = await asyncio.gather(*(client.set(ISSUE, f"t{i}", i, ttl=60) for i in range(30)))
        deleted = await asyncio.gather(
            *(client.delete(ISSUE, f"c{i}", wait=True) for i in range(30))
        )
        for ids in (waited, claimed, versioned, expiring, deleted):
            assert len(set(ids)) == 30
