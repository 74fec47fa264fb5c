"""Limits that push back: the commands queue's length limit and per-plugin quotas."""

from __future__ import annotations

import uuid

import aio_pika
import asyncpg
import msgspec

from worker.config import Settings
from worker.topology import Names, declare

from . import helpers
from .conftest import StartWorker
from .helpers import delete_cmd, queue_messages, set_cmd, state_of, wait_until
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
