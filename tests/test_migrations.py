"""`migrate`: creates the database, applies each file once, refuses what it cannot trust, and
builds the reference schema of protocol §1.

Every test works on databases of its own, created under unique names and dropped afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from worker import migrate as migrations_module
from worker.migrate import MigrationError, check_server_version, load_migrations, migrate

from .conftest import database_url_for, drop_database, unique
from .services import ServiceUrls

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
CONSOLE_COMMAND = Path(sys.prefix) / "bin" / "plugin-state-worker"
# Postgres checks a new database's name before it inserts it, so of two concurrent CREATE
# DATABASEs the later may fail on this index rather than with duplicate_database.
CREATE_DATABASE_RACE = "pg_database_datname_index"


def expected_history() -> list[tuple[int, str, str]]:
    """(version, name, sha256 of the file) for every file in migrations/, read from disk."""
    history = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        match = re.fullmatch(r"(\d+)_([\w-]+)\.sql", path.name)
        assert match, f"unexpected file name {path.name}"
        checksum = hashlib.sha256(path.read_bytes()).hexdigest()
        history.append((int(match.group(1)), match.group(2), checksum))
    return history


async def recorded_history(conn: asyncpg.Connection) -> list[tuple[int, str, str]]:
    rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations ORDER BY 1")
    return [(row["version"], row["name"], row["checksum"]) for row in rows]


async def database_exists(admin_url: str, name: str) -> bool:
    conn = await asyncpg.connect(admin_url)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


@pytest.fixture
async def fresh_database(services: ServiceUrls) -> AsyncIterator[tuple[str, str]]:
    """(name, url) of a database that does not exist yet; dropped after the test."""
    name = unique("db")
    yield name, database_url_for(services.admin_database_url, name)
    await drop_database(services.admin_database_url, name)


@pytest.fixture
def fresh_url(fresh_database: tuple[str, str]) -> str:
    return fresh_database[1]


@pytest.fixture
async def migrated(fresh_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the fresh database after one `migrate`."""
    await migrate(fresh_url)
    conn = await asyncpg.connect(fresh_url)
    yield conn
    await conn.close()


# --------------------------------------------------------------------------- applying


async def test_migrate_creates_a_missing_database_and_records_each_file_with_its_checksum(
    services: ServiceUrls, fresh_database: tuple[str, str]
) -> None:
    name, url = fresh_database
    assert not await database_exists(services.admin_database_url, name)

    applied = await migrate(url)

    assert await database_exists(services.admin_database_url, name)
    history = expected_history()
    assert history[0][:2] == (1, "plugins_and_state")
    assert applied == [f"{version:03d}_{stem}.sql" for version, stem, _ in history]
    conn = await asyncpg.connect(url)
    try:
        assert await recorded_history(conn) == history
        assert await conn.fetchval("SELECT to_regclass('plugin_state') IS NOT NULL")
    finally:
        await conn.close()


async def test_migrate_run_again_applies_nothing(
    fresh_url: str, migrated: asyncpg.Connection
) -> None:
    before = await migrated.fetch("SELECT * FROM schema_migrations ORDER BY version")

    assert await migrate(fresh_url) == []

    assert await migrated.fetch("SELECT * FROM schema_migrations ORDER BY version") == before


@pytest.mark.parametrize("exists", [False, True], ids=["missing-database", "empty-database"])
async def test_three_migrate_processes_at_once_all_succeed_and_apply_each_file_once(
    services: ServiceUrls, fresh_database: tuple[str, str], exists: bool
) -> None:
    name, url = fresh_database
    if exists:
        admin = await asyncpg.connect(services.admin_database_url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
    env = {**os.environ, "PLUGIN_STATE_DATABASE_URL": url}
    processes = [
        await asyncio.create_subprocess_exec(
            CONSOLE_COMMAND,
            "migrate",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(3)
    ]
    outputs = await asyncio.gather(*(p.communicate() for p in processes))

    conn = await asyncpg.connect(url)
    try:
        assert await recorded_history(conn) == expected_history()
    finally:
        await conn.close()
    failures = [
        (stdout + stderr).decode()
        for process, (stdout, stderr) in zip(processes, outputs, strict=True)
        if process.returncode != 0
    ]
    assert failures == []


# --------------------------------------------------------------------------- refusing


REWRITE_FREE_SINCE = 5
"""From this migration on (conditions and expiry, the change log, ...), none may rewrite a
table that holds entries: on a large deployment a rewrite holds an exclusive lock for as long
as it takes to copy the table."""
ENTRY_TABLES = ("plugin_state", "plugin_state_versions", "plugin_counters")


async def test_no_migration_since_conditions_rewrites_a_table_of_entries(
    fresh_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    every = load_migrations()
    before: dict[str, int] = {}
    for upto in range(REWRITE_FREE_SINCE - 1, len(every) + 1):
        monkeypatch.setattr(migrations_module, "load_migrations", lambda n=upto: every[:n])
        conn = None
        try:
            await migrate(fresh_url)
            conn = await asyncpg.connect(fresh_url)
            files = {
                table: await conn.fetchval("SELECT pg_relation_filenode($1::regclass)", table)
                for table in ENTRY_TABLES
                if await conn.fetchval("SELECT to_regclass($1)", table) is not None
            }
        finally:
            if conn is not None:
                await conn.close()
        rewritten = {t for t, f in files.items() if before.get(t, f) != f}
        assert not rewritten, f"{every[upto - 1].file_name} rewrote {sorted(rewritten)}"
        before = files


async def test_migrate_refuses_a_migration_edited_after_it_was_applied(
    fresh_url: str, migrated: asyncpg.Connection
) -> None:
    await migrated.execute("UPDATE schema_migrations SET checksum = $1 WHERE version = 1", "0" * 64)

    with pytest.raises(MigrationError, match=r"001_plugins_and_state\.sql was edited"):
        await migrate(fresh_url)


async def test_migrate_refuses_a_database_with_a_migration_it_does_not_know(
    fresh_url: str, migrated: asyncpg.Connection
) -> None:
    await migrated.execute(
        "INSERT INTO schema_migrations (version, name, checksum) VALUES (999, 'later', $1)",
        "0" * 64,
    )

    with pytest.raises(MigrationError, match=r"does not know \(\[999\]\)"):
        await migrate(fresh_url)


def test_server_older_than_postgres_15_is_refused_naming_both_versions() -> None:
    with pytest.raises(MigrationError, match=r"PostgreSQL 15 .*this server is 14\.11"):
        check_server_version(140011)


def test_postgres_15_is_accepted() -> None:
    check_server_version(150000)


# --------------------------------------------------------------------------- the schema


async def columns_of(conn: asyncpg.Connection, table: str) -> dict[str, tuple[str, bool]]:
    """column -> (data type, nullable)."""
    rows = await conn.fetch(
        "SELECT column_name, data_type, is_nullable = 'YES' AS nullable "
        "FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = $1",
        table,
    )
    return {row["column_name"]: (row["data_type"], row["nullable"]) for row in rows}


async def unique_constraints(conn: asyncpg.Connection, table: str) -> dict[str, list[str]]:
    """Name -> columns, in order, of the table's unique constraints."""
    rows = await conn.fetch(
        """
        SELECT c.conname,
               array_agg(a.attname ORDER BY k.n) AS columns
        FROM pg_constraint c
        CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k (attnum, n)
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
        WHERE c.conrelid = $1::text::regclass AND c.contype = 'u'
        GROUP BY c.conname
        """,
        table,
    )
    return {row["conname"]: list(row["columns"]) for row in rows}


async def index_columns(conn: asyncpg.Connection, index: str) -> tuple[str, list[str]]:
    """(table, columns in order) of an index."""
    row = await conn.fetchrow(
        """
        SELECT i.indrelid::regclass::text AS table_name,
               array_agg(a.attname ORDER BY k.n) AS columns
        FROM pg_index i
        CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k (attnum, n)
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indexrelid = $1::text::regclass
        GROUP BY i.indrelid
        """,
        index,
    )
    assert row is not None, f"no index {index}"
    return row["table_name"], list(row["columns"])


async def test_plugins_table_has_a_uuid_id_a_unique_key_and_a_unique_nullable_amqp_user(
    migrated: asyncpg.Connection,
) -> None:
    assert await columns_of(migrated, "plugins") == {
        "id": ("uuid", False),
        "plugin_key": ("text", False),
        "amqp_user": ("text", True),
        "created_at": ("timestamp with time zone", False),
        "updated_at": ("timestamp with time zone", False),
    }
    primary_key = await migrated.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = 'plugins'::regclass AND contype = 'p'"
    )
    assert primary_key == "PRIMARY KEY (id)"
    assert sorted((await unique_constraints(migrated, "plugins")).values()) == [
        ["amqp_user"],
        ["plugin_key"],
    ]


async def test_plugin_state_table_has_exactly_the_reference_columns_plus_ours(
    migrated: asyncpg.Connection,
) -> None:
    # Ours are nullable or have a default, so an existing writer of the table keeps working.
    assert await columns_of(migrated, "plugin_state") == {
        "id": ("uuid", False),
        "plugin_id": ("uuid", False),
        "scope_kind": ("text", False),
        "scope_id": ("text", True),
        "namespace": ("text", False),
        "state_key": ("text", False),
        "value_json": ("jsonb", False),
        "updated_at": ("timestamp with time zone", False),
        "version": ("uuid", False),
        "value_bytes": ("integer", True),
        "expires_at": ("timestamp with time zone", True),
    }
    namespace_default = await migrated.fetchval(
        "SELECT column_default FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = 'plugin_state' "
        "AND column_name = 'namespace'"
    )
    assert namespace_default == "'default'::text"


async def test_plugin_state_unique_entry_constraint_treats_nulls_as_equal(
    migrated: asyncpg.Connection,
) -> None:
    assert (await unique_constraints(migrated, "plugin_state"))[
        "plugin_state_unique_entry_idx"
    ] == ["plugin_id", "scope_kind", "scope_id", "namespace", "state_key"]
    nulls_not_distinct = await migrated.fetchval(
        "SELECT i.indnullsnotdistinct FROM pg_constraint c "
        "JOIN pg_index i ON i.indexrelid = c.conindid "
        "WHERE c.conname = 'plugin_state_unique_entry_idx' "
        "AND c.conrelid = 'plugin_state'::regclass"
    )
    assert nulls_not_distinct is True


async def test_plugin_state_has_the_plugin_scope_index(migrated: asyncpg.Connection) -> None:
    assert await index_columns(migrated, "plugin_state_plugin_scope_idx") == (
        "plugin_state",
        ["plugin_id", "scope_kind"],
    )


async def test_the_feed_outbox_compresses_with_lz4_where_the_server_has_it(
    migrated: asyncpg.Connection,
) -> None:
    method = await migrated.fetchval(
        "SELECT attcompression::text FROM pg_attribute "
        "WHERE attrelid = 'plugin_state_feed'::regclass AND attname = 'items'"
    )
    lz4 = await migrated.fetchval(
        "SELECT count(*) FROM pg_settings "
        "WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)"
    )
    assert method == ("l" if lz4 else "")


async def test_plugin_state_rows_go_with_their_plugin(migrated: asyncpg.Connection) -> None:
    foreign_keys = await migrated.fetch(
        """
        SELECT c.confrelid::regclass::text AS target, c.confdeltype::text,
               (SELECT array_agg(a.attname) FROM pg_attribute a
                WHERE a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)) AS columns,
               (SELECT array_agg(a.attname) FROM pg_attribute a
                WHERE a.attrelid = c.confrelid AND a.attnum = ANY (c.confkey)) AS target_columns
        FROM pg_constraint c
        WHERE c.conrelid = 'plugin_state'::regclass AND c.contype = 'f'
        """
    )
    assert [tuple(row) for row in foreign_keys] == [("plugins", "c", ["plugin_id"], ["id"])]


async def test_two_instance_entries_with_the_same_key_violate_the_unique_constraint(
    migrated: asyncpg.Connection,
) -> None:
    plugin = await migrated.fetchval(
        "INSERT INTO plugins (plugin_key) VALUES ($1) RETURNING id", unique("plugin")
    )
    insert = (
        "INSERT INTO plugin_state (plugin_id, scope_kind, scope_id, namespace, state_key, "
        "value_json, version) VALUES ($1, 'instance', NULL, 'default', 'token', $2, $3)"
    )
    await migrated.execute(insert, plugin, '"a"', uuid.uuid4())

    with pytest.raises(asyncpg.UniqueViolationError) as raised:
        await migrated.execute(insert, plugin, '"b"', uuid.uuid4())

    assert raised.value.constraint_name == "plugin_state_unique_entry_idx"
