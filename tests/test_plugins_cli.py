"""`plugin-state-worker plugins add|list|remove` against the session's database (protocol §5)."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
from click.testing import CliRunner, Result

from worker.cli import main

from .conftest import unique
from .helpers import uuid7


async def cli(database_url: str, *args: str) -> Result:
    """Run the console command in a thread: it starts an event loop of its own."""
    return await asyncio.to_thread(
        CliRunner().invoke, main, ["--database-url", database_url, *args]
    )


def assert_succeeded(result: Result) -> None:
    assert result.exit_code == 0, result.output


def assert_failed_cleanly(result: Result, message: str) -> None:
    """A non-zero exit with an error message, not a traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert message in result.stderr, result.stderr


async def add_state(db: asyncpg.Pool, plugin_id: uuid.UUID, key: str) -> None:
    """One stored entry, as the worker leaves it: its value and its version register row."""
    version = uuid7()
    await db.execute(
        "INSERT INTO plugin_state (plugin_id, scope_kind, scope_id, namespace, state_key, "
        "value_json, version) VALUES ($1, 'issue', 'ISS-1', 'default', $2, '{}', $3)",
        plugin_id,
        key,
        version,
    )
    await db.execute(
        "INSERT INTO plugin_state_versions (plugin_id, scope_kind, scope_id, namespace, "
        "state_key, version, deleted) VALUES ($1, 'issue', 'ISS-1', 'default', $2, $3, false)",
        plugin_id,
        key,
        version,
    )


async def rows_of(db: asyncpg.Pool, plugin_id: uuid.UUID) -> dict[str, int]:
    counts = await db.fetchrow(
        "SELECT (SELECT count(*) FROM plugins WHERE id = $1) AS plugins, "
        "(SELECT count(*) FROM plugin_state WHERE plugin_id = $1) AS state, "
        "(SELECT count(*) FROM plugin_state_versions WHERE plugin_id = $1) AS versions",
        plugin_id,
    )
    assert counts is not None
    return dict(counts)


# --------------------------------------------------------------------------- add


async def test_add_prints_the_new_plugins_id_and_registers_it(
    database_url: str, db: asyncpg.Pool
) -> None:
    key = unique("plugin")

    result = await cli(database_url, "plugins", "add", "--key", key)

    assert_succeeded(result)
    plugin_id = uuid.UUID(result.stdout.strip())
    row = await db.fetchrow("SELECT plugin_key, amqp_user FROM plugins WHERE id = $1", plugin_id)
    assert row is not None
    assert dict(row) == {"plugin_key": key, "amqp_user": None}


async def test_add_stores_the_given_id_and_amqp_user(database_url: str, db: asyncpg.Pool) -> None:
    key, user, plugin_id = unique("plugin"), unique("user"), uuid.uuid4()

    result = await cli(
        database_url, "plugins", "add", "--key", key, "--id", str(plugin_id), "--amqp-user", user
    )

    assert_succeeded(result)
    assert result.stdout.strip() == str(plugin_id)
    row = await db.fetchrow("SELECT plugin_key, amqp_user FROM plugins WHERE id = $1", plugin_id)
    assert row is not None
    assert dict(row) == {"plugin_key": key, "amqp_user": user}


async def test_add_with_a_key_already_registered_fails_with_a_clear_message(
    database_url: str, db: asyncpg.Pool
) -> None:
    key = unique("plugin")
    assert_succeeded(await cli(database_url, "plugins", "add", "--key", key))

    result = await cli(database_url, "plugins", "add", "--key", key)

    assert_failed_cleanly(result, "a plugin with that key, id or AMQP user exists")
    assert await db.fetchval("SELECT count(*) FROM plugins WHERE plugin_key = $1", key) == 1


# --------------------------------------------------------------------------- list


async def test_list_prints_one_json_object_per_line_including_a_new_plugin(
    database_url: str,
) -> None:
    key, user = unique("plugin"), unique("user")
    added = await cli(database_url, "plugins", "add", "--key", key, "--amqp-user", user)
    assert_succeeded(added)

    result = await cli(database_url, "plugins", "list")

    assert_succeeded(result)
    listed = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(isinstance(item, dict) for item in listed)
    mine = [item for item in listed if item["plugin_key"] == key]
    assert len(mine) == 1
    assert mine[0]["id"] == added.stdout.strip()
    assert mine[0]["amqp_user"] == user
    assert mine[0]["entries"] == 0


# --------------------------------------------------------------------------- remove


async def test_remove_deletes_a_plugin_without_state(database_url: str, db: asyncpg.Pool) -> None:
    key = unique("plugin")
    added = await cli(database_url, "plugins", "add", "--key", key)
    plugin_id = uuid.UUID(added.stdout.strip())

    result = await cli(database_url, "plugins", "remove", key)

    assert_succeeded(result)
    assert await rows_of(db, plugin_id) == {"plugins": 0, "state": 0, "versions": 0}


async def test_remove_refuses_while_the_plugin_has_state_and_points_to_purge(
    database_url: str, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    await add_state(db, plugin_id, "cursor")

    result = await cli(database_url, "plugins", "remove", str(plugin_id))

    assert_failed_cleanly(result, "use --purge")
    assert await rows_of(db, plugin_id) == {"plugins": 1, "state": 1, "versions": 1}


async def test_remove_with_purge_deletes_the_plugin_and_its_state_through_the_cascade(
    database_url: str, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    await add_state(db, plugin_id, "cursor")
    await add_state(db, plugin_id, "token")

    result = await cli(database_url, "plugins", "remove", "--purge", str(plugin_id))

    assert_succeeded(result)
    assert await rows_of(db, plugin_id) == {"plugins": 0, "state": 0, "versions": 0}


async def test_remove_of_an_unknown_plugin_fails_clearly(database_url: str) -> None:
    missing = str(uuid.uuid4())

    result = await cli(database_url, "plugins", "remove", missing)

    assert_failed_cleanly(result, f"no plugin '{missing}'")
