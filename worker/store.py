"""Every SQL statement the worker runs and the asyncpg calls around them.

The statements live in ``worker/sql/queries.sql``, each under a ``-- name:`` line; this
module loads them once and gives each a typed method. Batches go to Postgres as arrays.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, Final

import asyncpg

from worker.cursor import ListPosition
from worker.model import EntryKey, EntryState, EntryWrite, Usage, Write

APPLICATION_NAME: Final = "plugin-state-worker"

# Advisory lock keys (two-int form, so they never collide with other lock users' bigint
# keys): class 0x5053 ("PS"), one object id per job.
LOCK_CLASS: Final = 0x5053
MIGRATE_LOCK: Final = 1
RETENTION_LOCK: Final = 2
EXPIRY_LOCK: Final = 3

# Failures that are not the data's fault (Postgres down, restarting, a cut connection, a
# timeout): callers keep their work and retry. Data faults are handled in the applier first.
# InternalClientError is what asyncpg raises when a backend is killed in the middle of its
# type introspection; the connection is discarded and a retry gets a new one.
DATABASE_FAILURES: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)


def _load_queries() -> dict[str, str]:
    text = resources.files("worker").joinpath("sql/queries.sql").read_text()
    queries: dict[str, str] = {}
    for block in re.split(r"^-- name: ", text, flags=re.MULTILINE)[1:]:
        name, _, body = block.partition("\n")
        queries[name.strip()] = body.strip()
    return queries


QUERIES: Final = _load_queries()


@dataclass(frozen=True, slots=True)
class PluginRow:
    id: uuid.UUID
    plugin_key: str
    amqp_user: str | None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    entries: int = 0


@dataclass(frozen=True, slots=True)
class StoredValue:
    """An entry's value as stored: JSON text (jsonb's own rendering), version, time.

    ``value_json`` is None when the value was held back to keep a burst within its byte
    budget (``value_bytes`` tells its size)."""

    value_json: str | None
    version: uuid.UUID
    updated_at: datetime
    value_bytes: int = 0
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Found:
    """One looked-up entry: its value (None when missing) and, when asked for, the version
    its register holds (which tells whether a write named by ``after`` has reached it)."""

    value: StoredValue | None
    register_version: uuid.UUID | None


@dataclass(frozen=True, slots=True)
class Listed:
    """One entry of a ``list`` page."""

    entry: EntryKey
    value: StoredValue


@dataclass(frozen=True, slots=True)
class ListBounds:
    """A range of the list order ((scope_kind, scope_id or '', namespace, key) in byte
    order) and the filters the range cannot express."""

    lower: ListPosition
    upper: ListPosition
    scope_kind: str | None
    scope_id: str | None
    namespace: str | None
    prefix: str


async def create_pool(database_url: str, size: int, command_timeout: float) -> asyncpg.Pool:
    """A pool whose backends name themselves, so operators (and fault tests) can find them."""
    pool = await asyncpg.create_pool(
        database_url,
        min_size=1,
        max_size=size,
        command_timeout=command_timeout,
        server_settings={"application_name": APPLICATION_NAME},
    )
    assert pool is not None  # asyncpg types the pool as optional only for the un-awaited form
    return pool


class StoreInconsistent(RuntimeError):
    """A write transaction changed other rows than it decided to: it is rolled back."""


def _key_columns(entries: Sequence[EntryKey]) -> tuple[list[Any], ...]:
    return (
        [e.plugin_id for e in entries],
        [e.scope_kind for e in entries],
        [e.scope_id for e in entries],
        [e.namespace for e in entries],
        [e.key for e in entries],
    )


@dataclass(frozen=True, slots=True)
class Locked:
    """What a write transaction holds once it has locked its plugins."""

    usage: dict[uuid.UUID, Usage]
    heads: dict[uuid.UUID, int]
    """Each plugin's last position given (its order of writes, see migration 005)."""
    now_ms: int
    """The database's clock, Unix ms."""


class WriteTransaction:
    """The statements of one write transaction, in the order they must run (see
    ``worker.decisions`` for why this order makes the outcome exact)."""

    def __init__(self, conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> None:
        self.conn = conn

    async def lock_plugins(self, plugin_ids: Iterable[uuid.UUID]) -> Locked:
        """Lock the plugins' counters (the registered ones: the others have none)."""
        rows = await self.conn.fetch(QUERIES["lock_plugins"], sorted(set(plugin_ids)))
        return Locked(
            usage={r["plugin_id"]: Usage(r["entries"], r["bytes"], r["tombstones"]) for r in rows},
            heads={r["plugin_id"]: r["head"] for r in rows},
            now_ms=rows[0]["now_ms"] if rows else 0,
        )

    async def read_entries(self, entries: Sequence[EntryKey]) -> dict[EntryKey, EntryState]:
        """The register's state of each entry that has a register row."""
        if not entries:
            return {}
        rows = await self.conn.fetch(QUERIES["read_entries"], *_key_columns(entries))
        return {
            entries[row["n"] - 1]: EntryState(
                row["version"], row["deleted"], row["value_bytes"], row["expires_at_ms"]
            )
            for row in rows
        }

    async def applied_conditional_writes(self, writes: Sequence[Write]) -> set[uuid.UUID]:
        """Which of these conditional writes were applied before (redeliveries)."""
        rows = await self.conn.fetch(
            QUERIES["applied_conditional_writes"],
            [w.id for w in writes],
            [w.plugin_id for w in writes],
        )
        return {row["id"] for row in rows}

    async def record_conditional_writes(self, writes: Sequence[Write]) -> None:
        if writes:
            await self.conn.execute(
                QUERIES["record_conditional_writes"],
                [w.id for w in writes],
                [w.plugin_id for w in writes],
            )

    async def write_entries(
        self, stores: Sequence[EntryWrite], usage: Mapping[uuid.UUID, Usage], locked: Locked
    ) -> dict[uuid.UUID, int]:
        """Store the winning entry writes, each at the next position of its plugin, and the
        plugins' changes of usage; returns each plugin's head after it."""
        heads = dict(locked.heads)
        positions = []
        for entry_write in stores:
            heads[entry_write.entry.plugin_id] += 1
            positions.append(heads[entry_write.entry.plugin_id])
        if not stores:
            return heads
        plugins = sorted({e.entry.plugin_id for e in stores} | set(usage))
        change = [usage.get(p, Usage()) for p in plugins]
        row = await self.conn.fetchrow(
            QUERIES["write_entries"],
            *_key_columns([e.entry for e in stores]),
            [e.version for e in stores],
            [e.is_delete for e in stores],
            [e.value_json for e in stores],
            [e.value_bytes for e in stores],
            [e.expires_at_ms for e in stores],
            positions,
            plugins,
            [c.entries for c in change],
            [c.bytes for c in change],
            [c.tombstones for c in change],
            [heads[p] for p in plugins],
        )
        assert row is not None
        deletes = sum(e.is_delete for e in stores)
        if row["versions"] != len(stores) or row["upserted"] != len(stores) - deletes:
            raise StoreInconsistent(
                f"wrote {row['versions']} register rows and {row['upserted']} values for "
                f"{len(stores)} entry writes ({deletes} deletes)"
            )
        return heads


class Store:
    """The worker's view of Postgres."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def close(self) -> None:
        await self.pool.close()

    async def ping(self, timeout: float) -> None:
        """Raise unless Postgres answers within ``timeout`` seconds."""
        await self.pool.fetchval(QUERIES["ping"], timeout=timeout)

    async def plugin_owners(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str | None]:
        """The registered plugins among ``ids``, each with its ``amqp_user``."""
        rows = await self.pool.fetch(QUERIES["plugin_owners"], list(ids))
        return {row["id"]: row["amqp_user"] for row in rows}

    @asynccontextmanager
    async def write_transaction(self) -> AsyncIterator[WriteTransaction]:
        """One write transaction on a connection of its own; committed when the block
        ends, rolled back when it raises."""
        async with self.pool.acquire() as conn, conn.transaction():
            yield WriteTransaction(conn)

    async def lookup_entries(
        self, entries: Sequence[EntryKey], wants_version: Sequence[bool], budget: int
    ) -> list[Found]:
        """Look many entries up in one round trip, in order. Values are loaded while their
        running size stays within ``budget`` bytes (the first always)."""
        rows = await self.pool.fetch(
            QUERIES["lookup_entries"], *_key_columns(entries), list(wants_version), budget
        )
        return [
            Found(
                value=None
                if row["version"] is None
                else StoredValue(
                    row["value_json"],
                    row["version"],
                    row["updated_at"],
                    row["value_bytes"],
                    row["expires_at"],
                ),
                register_version=row["register_version"],
            )
            for row in rows
        ]

    async def list_entries(
        self,
        plugin_id: uuid.UUID,
        bounds: ListBounds,
        *,
        limit: int,
        after: ListPosition | None,
        budget: int,
        framing: int,
    ) -> tuple[list[Listed], bool]:
        """Up to ``limit`` entries in list order within ``bounds`` (after ``after`` when
        given), cut short to stay within ``budget`` bytes; and whether more follow."""
        args: list[Any] = [
            plugin_id,
            *(after or bounds.lower),
            *bounds.upper,
            bounds.scope_kind,
            bounds.scope_id,
            bounds.namespace,
            bounds.prefix,
            limit + 1,
            budget,
            framing,
        ]
        query = QUERIES["list_first_page" if after is None else "list_next_page"]
        rows = await self.pool.fetch(query, *args)
        page: list[Listed] = []
        for row in rows[:limit]:
            if not row["within"]:
                return page, True
            entry = EntryKey(
                plugin_id, row["scope_kind"], row["scope_id"], row["namespace"], row["state_key"]
            )
            value = StoredValue(
                row["value_json"], row["version"], row["updated_at"], expires_at=row["expires_at"]
            )
            page.append(Listed(entry, value))
        return page, len(rows) > limit

    async def purge_tombstones(self, older_than_seconds: float, limit: int) -> int | None:
        """Remove up to ``limit`` tombstones older than ``older_than_seconds`` by the
        database's clock. Returns how many went, or None when another worker holds the job's
        lock."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(QUERIES["try_lock"], LOCK_CLASS, RETENTION_LOCK):
                return None
            rows = await conn.fetch(QUERIES["old_tombstone_plugins"], older_than_seconds, limit)
            plugins = [row["plugin_id"] for row in rows]
            if not plugins:
                return 0
            await WriteTransaction(conn).lock_plugins(plugins)
            removed = await conn.fetchval(
                QUERIES["purge_tombstones"], older_than_seconds, limit, plugins
            )
        return int(removed)

    async def purge_conditional_writes(self, older_than_seconds: float) -> None:
        """Forget applied conditional writes older than ``older_than_seconds``."""
        await self.pool.execute(QUERIES["purge_conditional_writes"], older_than_seconds)

    async def sweep_expired(self, limit: int) -> tuple[int, list[uuid.UUID]] | None:
        """Turn up to ``limit`` expired entries into tombstones. Returns how many went and
        their plugins, or None when another worker holds the job's lock."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(QUERIES["try_lock"], LOCK_CLASS, EXPIRY_LOCK):
                return None
            rows = await conn.fetch(QUERIES["expired_plugins"], limit)
            plugins = [row["plugin_id"] for row in rows]
            if not plugins:
                return 0, []
            await WriteTransaction(conn).lock_plugins(plugins)
            swept = await conn.fetchrow(QUERIES["sweep_expired"], limit, plugins)
            assert swept is not None
            if swept["removed"] != swept["tombstoned"]:
                raise StoreInconsistent(
                    f"removed {swept['removed']} expired rows but made {swept['tombstoned']} "
                    "tombstones"
                )
        return swept["removed"], list(swept["plugins"])

    async def add_plugin(
        self, plugin_key: str, plugin_id: uuid.UUID | None, amqp_user: str | None
    ) -> PluginRow:
        row = await self.pool.fetchrow(QUERIES["add_plugin"], plugin_id, plugin_key, amqp_user)
        assert row is not None
        return PluginRow(**dict(row))

    async def list_plugins(self) -> list[PluginRow]:
        return [PluginRow(**dict(row)) for row in await self.pool.fetch(QUERIES["list_plugins"])]

    async def find_plugin(self, id_or_key: str) -> PluginRow | None:
        try:
            as_id: uuid.UUID | None = uuid.UUID(id_or_key)
        except ValueError:
            as_id = None
        row = await self.pool.fetchrow(QUERIES["find_plugin"], id_or_key, as_id)
        return None if row is None else PluginRow(**dict(row))

    async def remove_plugin(self, plugin_id: uuid.UUID, *, purge: bool) -> int | None:
        """Remove a plugin; its state goes with it through the cascade.

        Without ``purge``, a plugin that has state is kept. Returns the number of entries
        removed with it, or None when it was kept; LookupError when it is gone already.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            await WriteTransaction(conn).lock_plugins([plugin_id])
            if await conn.fetchval(QUERIES["lock_plugin"], plugin_id) is None:
                raise LookupError(f"plugin {plugin_id} no longer exists")
            entries = int(await conn.fetchval(QUERIES["count_plugin_entries"], plugin_id))
            if entries and not purge:
                return None
            await conn.execute(QUERIES["remove_plugin"], plugin_id)
        return entries
