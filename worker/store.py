"""Every SQL statement the worker runs and the asyncpg calls around them.

The statements live in ``worker/sql/queries.sql``, each under a ``-- name:`` line; this
module loads them once and gives each a typed method. Batches go to Postgres as arrays.
"""

from __future__ import annotations

import asyncio
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
from worker.model import Conflict, EntryKey, EntryState, EntryWrite, Judged, Usage, Write

APPLICATION_NAME: Final = "plugin-state-worker"

# Advisory lock keys (two-int form, so they never collide with other lock users' bigint
# keys): class 0x5053 ("PS"), one object id per job.
LOCK_CLASS: Final = 0x5053
MIGRATE_LOCK: Final = 1
RETENTION_LOCK: Final = 2
EXPIRY_LOCK: Final = 3
RELAY_LOCK: Final = 4

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


async def create_pool(
    database_url: str,
    size: int,
    command_timeout: float,
    application_name: str = APPLICATION_NAME,
    *,
    statement_cache: int = 100,
) -> asyncpg.Pool:
    """A pool whose backends name themselves (``application_name``, which a worker makes
    its own), so operators (and fault tests) can find them. ``statement_cache`` 0 prepares
    nothing that outlives a statement, for a transaction pooler in between."""
    pool = await asyncpg.create_pool(
        database_url,
        min_size=1,
        max_size=size,
        command_timeout=command_timeout,
        statement_cache_size=statement_cache,
        server_settings={"application_name": application_name[:63]},
    )
    assert pool is not None  # asyncpg types the pool as optional only for the un-awaited form
    return pool


@dataclass(frozen=True, slots=True)
class LoggedChange:
    """One entry's newest change, as the change log holds it."""

    position: int
    entry: EntryKey
    version: uuid.UUID
    change: str
    """``set``, ``delete`` or ``expire``."""
    at: datetime
    value_json: str | None
    """A set's value, unless held back by the page's byte budget (``within``)."""
    expires_at: datetime | None
    within: bool


@dataclass(frozen=True, slots=True)
class LogPage:
    """A page of a plugin's change log, read in one snapshot."""

    head: int
    purged_through: int
    scanned_to: int | None
    """The last position looked at (None: none after ``since``)."""
    scanned: int
    changes: list[LoggedChange]


def _position(entry: EntryKey) -> ListPosition:
    return entry.scope_kind, entry.scope_id or "", entry.namespace, entry.key


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
    """Each plugin's last position given (its order of writes, see ``worker.changes``)."""
    now_ms: int
    """The database's clock, Unix ms."""
    now: datetime | None
    """The transaction's time (what ``updated_at`` records)."""


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
            now=rows[0]["now"] if rows else None,
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

    async def try_lock(self, job: int) -> bool:
        """The transaction's advisory lock of a housekeeping job (one worker at a time)."""
        return bool(await self.conn.fetchval(QUERIES["try_lock"], LOCK_CLASS, job))

    async def expired_plugins(self, limit: int) -> list[uuid.UUID]:
        rows = await self.conn.fetch(QUERIES["expired_plugins"], limit)
        return [row["plugin_id"] for row in rows]

    async def sweep_expired(
        self, limit: int, plugins: Sequence[uuid.UUID], changes: bool
    ) -> tuple[list[Swept], datetime | None]:
        """Turn up to ``limit`` expired entries of ``plugins`` (locked) into tombstones;
        the entries, and the transaction's time."""
        rows = await self.conn.fetch(QUERIES["sweep_expired"], limit, list(plugins), changes)
        removed = rows[0]["removed"] if rows else 0
        if removed != len(rows):
            raise StoreInconsistent(
                f"removed {removed} expired rows but made {len(rows)} tombstones"
            )
        swept = [
            Swept(
                EntryKey(
                    r["plugin_id"], r["scope_kind"], r["scope_id"], r["namespace"], r["state_key"]
                ),
                r["version"],
                r["position"],
                r["expires_at"],
            )
            for r in rows
        ]
        return swept, (rows[0]["now"] if rows else None)

    async def feed(self, rows: Sequence[FeedRow]) -> None:
        """Write rows to the feed's outbox, in this transaction."""
        if rows:
            await self.conn.execute(QUERIES["feed_rows"], *_feed_columns(rows))

    async def feed_next(
        self, plugins: int, per_plugin: int, max_bytes: int, after: uuid.UUID | None
    ) -> list[FeedRow]:
        """The relay's next rows from the outbox (``feed_next`` says which)."""
        rows = await self.conn.fetch(QUERIES["feed_next"], plugins, per_plugin, max_bytes, after)
        return [
            FeedRow(r["plugin_id"], r["position"], r["last_position"], r["items"], r["waited"])
            for r in rows
        ]

    async def feed_published(self, through: Mapping[uuid.UUID, int]) -> None:
        """Each plugin's rows up to the one at its position were published: remove them."""
        await self.conn.execute(QUERIES["feed_published"], list(through), list(through.values()))

    async def recorded_conditional_writes(self, writes: Sequence[Write]) -> dict[uuid.UUID, Judged]:
        """How each of these conditional writes was judged before, for those that were
        (redeliveries)."""
        rows = await self.conn.fetch(
            QUERIES["recorded_conditional_writes"],
            [w.id for w in writes],
            [w.plugin_id for w in writes],
        )
        return {
            row["id"]: Conflict(row["failed_op"]) if row["conflict"] else "applied" for row in rows
        }

    async def record_conditional_writes(self, judged: Sequence[tuple[Write, Judged]]) -> None:
        """Record how these conditional writes were judged, in this transaction."""
        if judged:
            await self.conn.execute(
                QUERIES["record_conditional_writes"],
                [w.id for w, _ in judged],
                [w.plugin_id for w, _ in judged],
                [isinstance(j, Conflict) for _, j in judged],
                [j.failed_op if isinstance(j, Conflict) else None for _, j in judged],
            )

    async def write_entries(
        self,
        stores: Sequence[EntryWrite],
        usage: Mapping[uuid.UUID, Usage],
        positions: Sequence[int | None],
        heads: Mapping[uuid.UUID, int],
        feed: Sequence[FeedRow],
    ) -> None:
        """Store the winning entry writes at their positions (None when the change log is
        off), the plugins' changes of usage and heads, and the feed's rows (one per
        plugin, or none)."""
        if not stores:
            return
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
            list(positions),
            plugins,
            [c.entries for c in change],
            [c.bytes for c in change],
            [c.tombstones for c in change],
            [heads[p] for p in plugins],
            *_feed_columns(feed),
        )
        assert row is not None
        deletes = sum(e.is_delete for e in stores)
        if row["versions"] != len(stores) or row["upserted"] != len(stores) - deletes:
            raise StoreInconsistent(
                f"wrote {row['versions']} register rows and {row['upserted']} values for "
                f"{len(stores)} entry writes ({deletes} deletes)"
            )


@dataclass(frozen=True, slots=True)
class FeedRow:
    """One plugin's changes of one transaction, as the feed's outbox holds them."""

    plugin_id: uuid.UUID
    position: int
    """The first change's; the others follow one by one."""
    last_position: int
    items: bytes
    """The change items, JSON lines, in position order, as published."""
    waited: float = 0.0
    """Seconds since its transaction began (as the relay reads it)."""


def _feed_columns(rows: Sequence[FeedRow]) -> tuple[list[Any], ...]:
    return (
        [r.plugin_id for r in rows],
        [r.position for r in rows],
        [r.last_position for r in rows],
        [r.items for r in rows],
    )


@dataclass(frozen=True, slots=True)
class Swept:
    """An expired entry the sweeper turned into a tombstone."""

    entry: EntryKey
    version: uuid.UUID
    position: int | None
    expires_at: datetime | None


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
        async with self._transaction() as conn:
            yield WriteTransaction(conn)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
        """A transaction on a connection of its own, whose cancellation always surfaces.

        A task cancelled inside the block rolls back; when its connection died meanwhile,
        the rollback raises a database failure in place of the ``CancelledError``, and a
        loop that retries database failures (the relay, the sweeper, the retention) would
        swallow the cancel and never stop. The cancel is what happened: it is re-raised."""
        async with self.pool.acquire() as conn:
            try:
                async with conn.transaction():
                    yield conn
            except DATABASE_FAILURES as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from exc
                raise

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
        scan: int,
        budget: int,
        framing: int,
    ) -> tuple[list[Listed], ListPosition | None]:
        """Up to ``limit`` entries in list order within ``bounds`` (after ``after`` when
        given), among at most ``scan`` rows of the range, cut short to stay within ``budget``
        bytes; and where the next page starts (None: nothing follows)."""
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
            scan,
        ]
        query = QUERIES["list_first_page" if after is None else "list_next_page"]
        rows = await self.pool.fetch(query, *args)
        page: list[Listed] = []
        for row in rows:
            if len(page) == limit or not row["within"]:
                # A full page, or one ended early by the budget: the next starts after its
                # last item (the first row is always within).
                return page, _position(page[-1].entry)
            entry = EntryKey(
                plugin_id, row["scope_kind"], row["scope_id"], row["namespace"], row["state_key"]
            )
            if row["matches"]:
                value = StoredValue(
                    row["value_json"],
                    row["version"],
                    row["updated_at"],
                    expires_at=row["expires_at"],
                )
                page.append(Listed(entry, value))
            if row["window_end"]:
                # The scan window is read to its end: the next page starts after its last
                # row, whether it matched or not (the range may go on).
                return page, _position(entry)
        return page, None

    async def read_changes(
        self,
        plugin_id: uuid.UUID,
        since: int,
        bounds: ListBounds,
        *,
        limit: int,
        scan: int,
        budget: int,
    ) -> LogPage | None:
        """A page of the plugin's change log after ``since`` (None: no such plugin)."""
        rows = await self.pool.fetch(
            QUERIES["read_changes"],
            plugin_id,
            since,
            scan,
            limit,
            bounds.scope_kind,
            bounds.scope_id,
            bounds.namespace,
            bounds.prefix,
            budget,
        )
        if not rows:
            return None
        first = rows[0]
        changes = [
            LoggedChange(
                position=r["position"],
                entry=EntryKey(
                    plugin_id, r["scope_kind"], r["scope_id"], r["namespace"], r["state_key"]
                ),
                version=r["version"],
                change=("expire" if r["expired"] else "delete") if r["deleted"] else "set",
                at=r["updated_at"] if not r["deleted"] and r["updated_at"] else r["changed_at"],
                value_json=r["value_json"],
                expires_at=r["expires_at"] if not r["deleted"] else r["register_expires_at"],
                within=r["within"],
            )
            for r in rows
            if r["position"] is not None
        ]
        return LogPage(
            head=first["head"],
            purged_through=first["purged_through"],
            scanned_to=first["scanned_to"],
            scanned=first["scanned"],
            changes=changes,
        )

    async def heads(self, plugins: Iterable[uuid.UUID]) -> dict[uuid.UUID, int]:
        """Where each plugin's change log ends (its last position given)."""
        rows = await self.pool.fetch(QUERIES["heads"], list(plugins))
        return {row["plugin_id"]: row["head"] for row in rows}

    async def purge_tombstones(self, older_than_seconds: float, limit: int) -> int | None:
        """Remove up to ``limit`` tombstones older than ``older_than_seconds`` by the
        database's clock. Returns how many went, or None when another worker holds the job's
        lock."""
        async with self._transaction() as conn:
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
        async with self._transaction() as conn:
            await WriteTransaction(conn).lock_plugins([plugin_id])
            if await conn.fetchval(QUERIES["lock_plugin"], plugin_id) is None:
                raise LookupError(f"plugin {plugin_id} no longer exists")
            entries = int(await conn.fetchval(QUERIES["count_plugin_entries"], plugin_id))
            if entries and not purge:
                return None
            await conn.execute(QUERIES["remove_plugin"], plugin_id)
        return entries
