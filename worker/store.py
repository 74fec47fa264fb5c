"""Every SQL statement the worker runs and the asyncpg calls around them.

The statements live in ``worker/sql/queries.sql``, each under a ``-- name:`` line; this
module loads them once and gives each a typed method. Batches go to Postgres as arrays.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, Final

import asyncpg

from worker.model import EntryKey, EntryWrite

APPLICATION_NAME: Final = "plugin-state-worker"

# Advisory lock keys (two-int form, so they never collide with other lock users' bigint
# keys): class 0x5053 ("PS"), one object id per job.
LOCK_CLASS: Final = 0x5053
MIGRATE_LOCK: Final = 1
RETENTION_LOCK: Final = 2

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
    """An entry's value as stored: JSON text (jsonb's own rendering), version, time."""

    value_json: str
    version: uuid.UUID
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Lookup:
    """One looked-up entry: its value (None when missing) and whether the write the reader
    asked to see (``after``) has reached it."""

    value: StoredValue | None
    ready: bool


@dataclass(frozen=True, slots=True)
class Listed:
    """One entry of a ``list`` page."""

    entry: EntryKey
    value: StoredValue


ListPosition = tuple[str, str, str, str]
"""Where a list page ended: (scope_kind, scope_id or '', namespace, key)."""


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


def _key_columns(entries: Sequence[EntryWrite]) -> tuple[list[Any], ...]:
    return (
        [e.entry.plugin_id for e in entries],
        [e.entry.scope_kind for e in entries],
        [e.entry.scope_id for e in entries],
        [e.entry.namespace for e in entries],
        [e.entry.key for e in entries],
    )


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

    async def plugin_usage(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, tuple[int, int]]:
        """(entries, bytes) stored per plugin; plugins without state are left out."""
        rows = await self.pool.fetch(QUERIES["plugin_usage"], list(ids))
        return {row["plugin_id"]: (row["entries"], row["bytes"]) for row in rows}

    async def apply_entries(self, entries: Sequence[EntryWrite]) -> set[EntryKey]:
        """Apply entry writes (each entry at most once) in one transaction.

        Returns the entries whose write won; the others were superseded by a newer
        version already stored (or by an equal one: a duplicate).
        """
        if not entries:
            return set()
        async with self.pool.acquire() as conn, conn.transaction():
            won_rows = await conn.fetch(
                QUERIES["claim_versions"],
                *_key_columns(entries),
                [e.version for e in entries],
                [e.is_delete for e in entries],
            )
            won = {EntryKey(*row) for row in won_rows}
            sets = [e for e in entries if e.entry in won and not e.is_delete]
            deletes = [e for e in entries if e.entry in won and e.is_delete]
            if sets or deletes:
                await conn.execute(
                    QUERIES["apply_values"],
                    *_key_columns(sets),
                    [e.value_json for e in sets],
                    [e.version for e in sets],
                    *_key_columns(deletes),
                )
        return won

    async def lookup_entries(
        self, wanted: Sequence[tuple[EntryKey, uuid.UUID | None]]
    ) -> list[Lookup]:
        """Look many entries up in one round trip, in order; each with its ``after``."""
        rows = await self.pool.fetch(
            QUERIES["lookup_entries"],
            [e.plugin_id for e, _ in wanted],
            [e.scope_kind for e, _ in wanted],
            [e.scope_id for e, _ in wanted],
            [e.namespace for e, _ in wanted],
            [e.key for e, _ in wanted],
            [after for _, after in wanted],
        )
        return [
            Lookup(
                value=None
                if row["version"] is None
                else StoredValue(row["value_json"], row["version"], row["updated_at"]),
                ready=row["ready"],
            )
            for row in rows
        ]

    async def list_entries(
        self,
        plugin_id: uuid.UUID,
        *,
        scope_kind: str | None,
        scope_id: str | None,
        namespace: str | None,
        prefix: str,
        limit: int,
        after: ListPosition | None,
    ) -> list[Listed]:
        """Up to ``limit`` entries in list order, after ``after`` when given."""
        args: list[Any] = [plugin_id, scope_kind, scope_id, namespace, prefix, limit]
        if after is None:
            rows = await self.pool.fetch(QUERIES["list_first_page"], *args)
        else:
            rows = await self.pool.fetch(QUERIES["list_next_page"], *args, *after)
        return [
            Listed(
                EntryKey(
                    plugin_id,
                    row["scope_kind"],
                    row["scope_id"],
                    row["namespace"],
                    row["state_key"],
                ),
                StoredValue(row["value_json"], row["version"], row["updated_at"]),
            )
            for row in rows
        ]

    async def purge_tombstones(self, older_than: uuid.UUID, limit: int) -> int | None:
        """Remove up to ``limit`` tombstones older than the version ``older_than``.

        Returns how many went, or None when another worker holds the job's lock.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(QUERIES["try_lock"], LOCK_CLASS, RETENTION_LOCK):
                return None
            status = await conn.execute(QUERIES["purge_tombstones"], older_than, limit)
        return int(status.split()[-1])

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
            if await conn.fetchval(QUERIES["lock_plugin"], plugin_id) is None:
                raise LookupError(f"plugin {plugin_id} no longer exists")
            entries = int(await conn.fetchval(QUERIES["count_plugin_entries"], plugin_id))
            if entries and not purge:
                return None
            await conn.execute(QUERIES["remove_plugin"], plugin_id)
        return entries
