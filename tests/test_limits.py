"""Limits that push back: the commands queue's length limit, per-plugin quotas (exact under
concurrency), and the bounds on one transaction, one stuck write and the bytes a worker
holds."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import aio_pika
import asyncpg
import msgspec

from worker.config import Settings
from worker.topology import Names, declare

from . import helpers
from .conftest import StartWorker
from .helpers import delete_cmd, queue_messages, set_cmd, state_of, uuid7, wait_until
from .rpc import RawRpc


async def test_a_flood_is_nacked_at_the_queue_limit_and_nothing_accepted_is_lost(
    start_worker: StartWorker,
    settings: Settings,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
) -> None:
    limit = 50
    settings = settings.with_changes(commands_max_length=limit)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare(channel, settings)
        exchange = await channel.get_exchange(settings.prefix, ensure=False)
        commands = [set_cmd(plugin_id, f"k{n}", n) for n in range(limit + 30)]
        accepted, refused = [], []
        for command in commands:  # no worker yet: the queue fills up
            message = aio_pika.Message(
                msgspec.json.encode(command),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                user_id=helpers.PUBLISHER,
            )
            try:
                await exchange.publish(message, routing_key=f"cmd.{plugin_id}")
            except aio_pika.exceptions.DeliveryError:
                refused.append(command)
            else:
                accepted.append(command)
    print(f"flood: {len(accepted)} confirmed, {len(refused)} nacked")
    # A quorum queue enforces its limit after the fact and may take one message more.
    assert limit <= len(accepted) <= limit + 1
    assert refused and all(commands.index(c) >= limit for c in refused)

    await start_worker(commands_max_length=limit)
    expected = {("issue", "ISS-1", "default", c["key"]): c["value"] for c in accepted}

    async def all_accepted_applied() -> bool:
        return await state_of(db, plugin_id) == expected

    await wait_until(all_accepted_applied, what="every confirmed write to be applied")


async def test_quota_on_entries_refuses_new_entries_but_allows_updates_and_deletes(
    start_worker: StartWorker,
    settings: Settings,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    plugin_id: uuid.UUID,
) -> None:
    await start_worker(quota_entries=3)
    async with RawRpc(settings.amqp_url, settings.prefix) as caller:

        async def write(command: dict[str, object]) -> dict[str, object]:
            return await caller.call(plugin_id, command, kind="cmd")

        for n in range(3):
            assert (await write(set_cmd(plugin_id, f"k{n}", n)))["type"] == "applied"
        over = await write(set_cmd(plugin_id, "k3", 3))
        assert over["type"] == "error" and over["code"] == "quota_exceeded", over
        assert (await write(set_cmd(plugin_id, "k0", "updated")))["type"] == "applied"
        assert (await write(delete_cmd(plugin_id, "k1")))["type"] == "applied"
        assert (await write(set_cmd(plugin_id, "k3", 3)))["type"] == "applied"
    assert len(await state_of(db, plugin_id)) == 3
    dead = await queue_messages(amqp, Names(settings.prefix).dead)
    assert [(m.headers or {}).get("x-reject-code") for m in dead] == ["quota_exceeded"]


async def test_quota_on_bytes_refuses_a_value_that_would_go_over(
    start_worker: StartWorker, settings: Settings, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    await start_worker(quota_bytes=300)
    async with RawRpc(settings.amqp_url, settings.prefix) as caller:
        small = await caller.call(plugin_id, set_cmd(plugin_id, "a", "x" * 100), kind="cmd")
        assert small["type"] == "applied"
        big = await caller.call(plugin_id, set_cmd(plugin_id, "b", "x" * 250), kind="cmd")
        assert big["type"] == "error" and big["code"] == "quota_exceeded"
    assert set(await state_of(db, plugin_id)) == {("issue", "ISS-1", "default", "a")}


# ------------------------------------------------------------------ quotas, exactly


async def test_quotas_hold_exactly_under_concurrent_workers(
    start_worker: StartWorker,
    settings: Settings,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    plugin_id: uuid.UUID,
) -> None:
    limit = 40
    for _ in range(3):
        await start_worker(quota_entries=limit, apply_concurrency=3, batch_size=10)
    commands = [set_cmd(plugin_id, f"k{n}", n) for n in range(200)]
    await asyncio.gather(*(helpers.publish(amqp, settings.prefix, plugin_id, c) for c in commands))

    async def all_settled() -> bool:
        dead = await amqp.declare_queue(Names(settings.prefix).dead, passive=True)
        stored = await db.fetchval(
            "SELECT count(*) FROM plugin_state WHERE plugin_id=$1", plugin_id
        )
        return bool(dead.declaration_result.message_count + stored == len(commands))

    await wait_until(all_settled, what="every write applied or refused")
    assert len(await state_of(db, plugin_id)) == limit
    counted = await db.fetchval("SELECT entries FROM plugin_counters WHERE plugin_id=$1", plugin_id)
    assert counted == limit


async def test_tombstones_count_against_their_own_quota(
    start_worker: StartWorker,
    settings: Settings,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    plugin_id: uuid.UUID,
) -> None:
    await start_worker(quota_tombstones=5)
    async with RawRpc(settings.amqp_url, settings.prefix) as caller:
        outcomes = [
            (await caller.call(plugin_id, delete_cmd(plugin_id, f"never-{n}"), kind="cmd")).get(
                "code", "applied"
            )
            for n in range(8)
        ]
    assert outcomes == ["applied"] * 5 + ["quota_exceeded"] * 3
    tombstones = await db.fetchval(
        "SELECT count(*) FROM plugin_state_versions WHERE plugin_id=$1 AND deleted", plugin_id
    )
    assert tombstones == 5


# --------------------------------------------------------------------- bounded work


async def test_a_write_transaction_is_bounded_in_ops_not_in_messages(
    start_worker: StartWorker,
    settings: Settings,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    plugin_id: uuid.UUID,
) -> None:
    ops = [
        {"op": "set", "scope_kind": "issue", "scope_id": f"S{m}", "key": f"k{n}", "value": n}
        for m in range(20)
        for n in range(1000)
    ]
    batches = [
        {"op": "batch", "id": str(uuid7()), "plugin_id": str(plugin_id), "ops": ops[i : i + 1000]}
        for i in range(0, len(ops), 1000)
    ]
    await declare(amqp, settings)
    for batch in batches:  # all queued before the worker starts: one delivery batch
        await helpers.publish(amqp, settings.prefix, plugin_id, batch)
    worker = await start_worker(transaction_max_ops=2000)

    async def all_applied() -> bool:
        count = await db.fetchval("SELECT count(*) FROM plugin_state WHERE plugin_id=$1", plugin_id)
        return bool(count == len(ops))

    await wait_until(all_applied, timeout=60, what="20,000 ops applied")
    transactions = worker.metrics.value("plugin_state_transaction_ops_count")
    within = worker.metrics.value("plugin_state_transaction_ops_bucket", le="2500.0")
    assert transactions >= 10 and within == transactions


async def test_a_write_transaction_is_bounded_in_bytes_of_values(
    start_worker: StartWorker,
    settings: Settings,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    plugin_id: uuid.UUID,
) -> None:
    value = "v" * 300_000
    writes = [set_cmd(plugin_id, f"big{n}", value) for n in range(12)]
    await declare(amqp, settings)
    for write in writes:  # all queued before the worker starts: one delivery batch
        await helpers.publish(amqp, settings.prefix, plugin_id, write)
    worker = await start_worker(transaction_max_bytes=1_000_000)

    async def all_applied() -> bool:
        count = await db.fetchval("SELECT count(*) FROM plugin_state WHERE plugin_id=$1", plugin_id)
        return bool(count == len(writes))

    await wait_until(all_applied, timeout=60, what="12 values of 300 kB applied")
    # 1 MB holds three of them: twelve writes take at least four transactions.
    assert worker.metrics.value("plugin_state_transaction_ops_count") >= 4


@contextlib.asynccontextmanager
async def plugin_locked(database_url: str, plugin_id: uuid.UUID) -> AsyncIterator[None]:
    """Hold the plugin's counters row, as a stuck writer would: its writes wait."""
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():
            await holder.execute(
                "SELECT 1 FROM plugin_counters WHERE plugin_id = $1 FOR UPDATE", plugin_id
            )
            yield
    finally:
        await holder.close()


async def test_a_write_that_keeps_timing_out_is_split_off_then_dead_lettered(
    start_worker: StartWorker,
    settings: Settings,
    database_url: str,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    plugin_id: uuid.UUID,
) -> None:
    other = uuid.uuid4()
    await db.execute("INSERT INTO plugins (id, plugin_key) VALUES ($1, $2)", other, str(other))
    await declare(amqp, settings)
    stuck = set_cmd(plugin_id, "stuck", 1)
    await helpers.publish(amqp, settings.prefix, plugin_id, stuck)
    await helpers.publish(amqp, settings.prefix, other, set_cmd(other, "free", 2))
    async with plugin_locked(database_url, plugin_id):
        await start_worker(db_command_timeout_seconds=0.5)

        async def free_applied() -> bool:
            return bool(await state_of(db, other))

        await wait_until(free_applied, what="the write in the same batch, split off")
        dead = await amqp.declare_queue(Names(settings.prefix).dead, passive=True)

        async def stuck_dead() -> bool:
            queue = await amqp.declare_queue(dead.name, passive=True)
            return bool(queue.declaration_result.message_count == 1)

        await wait_until(stuck_dead, what="the stuck write dead-lettered")
    (letter,) = await queue_messages(amqp, Names(settings.prefix).dead)
    assert (letter.headers or {})["x-reject-code"] == "internal"
    assert "timed out 3 times" in str((letter.headers or {})["x-reject-reason"])
    await db.execute("DELETE FROM plugins WHERE id = $1", other)


async def test_a_worker_holds_back_when_the_bodies_it_holds_pass_the_byte_limit(
    start_worker: StartWorker,
    settings: Settings,
    database_url: str,
    db: asyncpg.Pool,
    amqp: aio_pika.abc.AbstractChannel,
    plugin_id: uuid.UUID,
) -> None:
    limit = 1024 * 1024
    body_size = 200 * 1024
    await declare(amqp, settings)
    commands = [set_cmd(plugin_id, f"k{n}", "x" * body_size) for n in range(60)]
    for command in commands[:40]:
        await helpers.publish(amqp, settings.prefix, plugin_id, command)
    async with plugin_locked(database_url, plugin_id):
        worker = await start_worker(held_max_bytes=limit)
        assert worker.consumer is not None
        consumer = worker.consumer

        async def held_back() -> bool:
            return not consumer.subscription.consuming

        await wait_until(held_back, what="the consumer to step back")
        commands_queue = Names(settings.prefix).commands_queue

        async def first_wave_arrived() -> bool:
            # What the broker had sent before the cancel reached it is still on its way:
            # every one of the 40 is either received or ready again in the queue.
            queue = await amqp.declare_queue(commands_queue, passive=True)
            return consumer.received + (queue.declaration_result.message_count or 0) == 40

        await wait_until(first_wave_arrived, what="the deliveries in flight at the cancel")
        first_wave = consumer.received
        print(f"held {consumer.subscription.held_bytes} bytes of a {limit} limit")
        for command in commands[40:]:
            await helpers.publish(amqp, settings.prefix, plugin_id, command)
        await asyncio.sleep(0.5)
        queue = await amqp.declare_queue(Names(settings.prefix).commands_queue, passive=True)
        assert queue.declaration_result.message_count == 20, "delivered while held back"
        assert consumer.received == first_wave
    # Released: everything applied, and the prefetch now fits the limit at this body size.
    await wait_until(lambda: all_written(db, plugin_id, len(commands)), timeout=60, what="all")
    assert consumer.subscription.current_prefetch() * body_size <= limit * 1.2


async def all_written(db: asyncpg.Pool, plugin_id: uuid.UUID, count: int) -> bool:
    stored = await db.fetchval("SELECT count(*) FROM plugin_state WHERE plugin_id=$1", plugin_id)
    return bool(stored == count)
