"""The hot paths' view of registered plugins: cached for a while, misses asked again."""

from __future__ import annotations

import uuid

import asyncpg

from worker.plugins import PluginDirectory
from worker.store import Store

from .conftest import unique


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_registered_plugin_is_remembered_until_the_ttl_runs_out(
    database_url: str, db: asyncpg.Pool
) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    assert pool is not None
    clock = Clock()
    directory = PluginDirectory(Store(pool), ttl_seconds=5, clock=clock)
    plugin = uuid.uuid4()
    try:
        await db.execute(
            "INSERT INTO plugins (id, plugin_key, amqp_user) VALUES ($1, $2, 'alice')",
            plugin,
            unique("plugin"),
        )
        assert await directory.owners([plugin]) == {plugin: "alice"}
        await db.execute("UPDATE plugins SET amqp_user = 'bob' WHERE id = $1", plugin)
        clock.now += 4
        assert await directory.owners([plugin]) == {plugin: "alice"}, "within the TTL"
        clock.now += 2
        assert await directory.owners([plugin]) == {plugin: "bob"}, "after the TTL"
    finally:
        await db.execute("DELETE FROM plugins WHERE id = $1", plugin)
        await pool.close()


async def test_an_unknown_plugin_is_asked_again_so_a_new_registration_is_seen_at_once(
    database_url: str, db: asyncpg.Pool
) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    assert pool is not None
    directory = PluginDirectory(Store(pool), ttl_seconds=60)
    plugin = uuid.uuid4()
    try:
        assert await directory.owners([plugin]) == {}
        await db.execute(
            "INSERT INTO plugins (id, plugin_key) VALUES ($1, $2)", plugin, unique("plugin")
        )
        assert await directory.owners([plugin]) == {plugin: None}
    finally:
        await db.execute("DELETE FROM plugins WHERE id = $1", plugin)
        await pool.close()
