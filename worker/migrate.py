"""Applies ``migrations/NNN_name.sql`` in order, once each, recorded with checksums.

Safe to run again and from many processes at once: the whole run holds a Postgres advisory
lock, and each file is applied and recorded in one transaction. A file edited after it was
applied is an error, never silently skipped.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import structlog

from worker.store import APPLICATION_NAME, LOCK_CLASS, MIGRATE_LOCK, QUERIES

log = structlog.get_logger(__name__)

MIN_SERVER_VERSION: Final = 150000

_FILE_NAME: Final = re.compile(r"^(\d+)_([\w-]+)\.sql$")


class MigrationError(RuntimeError):
    """The database cannot be brought to the schema this worker needs."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def file_name(self) -> str:
        return f"{self.version:03d}_{self.name}.sql"


def load_migrations() -> list[Migration]:
    """The migration files shipped with the package, in version order."""
    found: dict[int, Migration] = {}
    for item in resources.files("migrations").iterdir():
        match = _FILE_NAME.match(item.name)
        if not match:
            continue
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migration files share the number {version}")
        found[version] = Migration(version, match.group(2), item.read_text())
    return [found[v] for v in sorted(found)]


def check_server_version(server_version_num: int) -> None:
    """Refuse a server older than PostgreSQL 15 (``server_version_num``, e.g. 150004)."""
    if server_version_num >= MIN_SERVER_VERSION:
        return
    major, rest = divmod(server_version_num, 10000)
    found = f"{major}.{rest}" if major >= 10 else f"{major}.{rest // 100}.{rest % 100}"
    raise MigrationError(
        f"PostgreSQL 15 or newer is required (this server is {found}): "
        "plugin_state's unique constraint uses NULLS NOT DISTINCT"
    )


async def _connect(
    database_url: str, create_database: bool, on_create: Callable[[str], None]
) -> asyncpg.Connection:
    settings = {"application_name": f"{APPLICATION_NAME} migrate"}
    try:
        return await asyncpg.connect(database_url, server_settings=settings)
    except asyncpg.InvalidCatalogNameError:
        if not create_database:
            raise
    parts = urlsplit(database_url)
    name = parts.path.lstrip("/")
    admin = await asyncpg.connect(
        urlunsplit(parts._replace(path="/postgres")), server_settings=settings
    )
    try:
        # Identifiers cannot be bound as parameters; quote_ident makes the name safe.
        quoted = await admin.fetchval(QUERIES["quote_ident"], name)
        await admin.execute(f"CREATE DATABASE {quoted}")
        log.info("database_created", database=name)
        on_create(name)
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        # Another migrate process created it first. Postgres reports a concurrent create of
        # the same name as a unique violation on pg_database rather than a duplicate.
        pass
    finally:
        await admin.close()
    return await asyncpg.connect(database_url, server_settings=settings)


async def migrate(
    database_url: str,
    *,
    create_database: bool = True,
    on_create: Callable[[str], None] = lambda _name: None,
) -> list[str]:
    """Bring the database up to date; returns the files applied by this call. A missing
    database is created (unless ``create_database`` is false), and ``on_create`` told."""
    migrations = load_migrations()
    conn = await _connect(database_url, create_database, on_create)
    try:
        check_server_version(await conn.fetchval(QUERIES["server_version_num"]))
        await conn.execute(QUERIES["lock"], LOCK_CLASS, MIGRATE_LOCK)
        try:
            return await _apply_pending(conn, migrations)
        finally:
            await conn.execute(QUERIES["unlock"], LOCK_CLASS, MIGRATE_LOCK)
    finally:
        await conn.close()


async def _apply_pending(conn: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    await conn.execute(QUERIES["create_migration_history"])
    applied = {row["version"]: row for row in await conn.fetch(QUERIES["applied_migrations"])}
    known = {m.version for m in migrations}
    unknown = sorted(set(applied) - known)
    if unknown:
        raise MigrationError(
            f"the database has migrations this worker does not know ({unknown}): "
            "it was migrated by a newer version"
        )
    done: list[str] = []
    for migration in migrations:
        row = applied.get(migration.version)
        if row is not None:
            if row["checksum"] != migration.checksum:
                raise MigrationError(
                    f"migration {migration.file_name} was edited after it was applied "
                    f"(recorded checksum {row['checksum'][:12]}…, file has "
                    f"{migration.checksum[:12]}…): add a new migration instead"
                )
            continue
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(
                QUERIES["record_migration"],
                migration.version,
                migration.name,
                migration.checksum,
            )
        log.info("migration_applied", migration=migration.file_name)
        done.append(migration.file_name)
    return done
