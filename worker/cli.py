"""The console command ``plugin-state-worker`` (protocol §5)."""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import click

from worker import dead_commands, diagnosis, logs, state_commands, supervisor
from worker.app import Worker, freeze_imports
from worker.bench import command as bench_command
from worker.config import ENV_PREFIX, ConfigError, Settings
from worker.doctor import examine
from worker.loop import run_async
from worker.migrate import MigrationError, migrate
from worker.output import json_line
from worker.store import DATABASE_FAILURES, Store, create_pool

T = TypeVar("T")


class _Main(click.Group):
    """The command group: a service that cannot be reached or refuses is one line on stderr
    (``Error: ...``, exit 1), never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except diagnosis.ServiceFailure as exc:
            raise click.ClickException(str(exc)) from None


class BadSetting(click.ClickException):
    """A setting has a value the worker cannot run with (exit 2, like a usage error)."""

    exit_code = 2


def bad_setting(exc: ConfigError, flags: dict[str, Any]) -> BadSetting:
    """The config error, naming the flag where the value came from one."""
    message = str(exc)
    for name, value in flags.items():
        if value is not None:
            variable = ENV_PREFIX + name.upper()
            message = message.replace(variable, f"--{name.replace('_', '-')}")
    return BadSetting(message)


@click.group(cls=_Main)
@click.option("--database-url", help="Postgres URL [PLUGIN_STATE_DATABASE_URL]")
@click.option(
    "--amqp-url",
    multiple=True,
    help="RabbitMQ URL; repeat it (or comma-separate) for the nodes of a cluster "
    "[PLUGIN_STATE_AMQP_URL]",
)
@click.option(
    "--prefix",
    help="Name prefix of the exchanges and queues (not a key prefix) [PLUGIN_STATE_PREFIX]",
)
@click.option("--log-format", type=click.Choice(["text", "json"]), help="[PLUGIN_STATE_LOG_FORMAT]")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="[PLUGIN_STATE_LOG_LEVEL]",
)
@click.pass_context
def main(ctx: click.Context, /, **flags: Any) -> None:
    """Plugin state over AMQP: apply plugins' state commands and answer their reads."""
    flags["amqp_url"] = ",".join(flags["amqp_url"]) or None  # the nodes, as the variable has them
    try:
        settings = Settings.from_env(**flags)
    except ConfigError as exc:
        raise bad_setting(exc, flags) from None
    logs.configure(settings.log_format, settings.log_level)
    ctx.obj = settings


@main.command("migrate")
@click.pass_obj
def migrate_command(settings: Settings) -> None:
    """Apply migrations/ to the database (creating it if missing); safe to repeat."""
    try:
        applied = run_async(_migrate(settings.database_url))
    except MigrationError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"applied {len(applied)} migration(s)" + "".join(f"\n  {a}" for a in applied))


@main.command()
@click.option("--batch-size", type=int, help="[PLUGIN_STATE_BATCH_SIZE]")
@click.option("--batch-wait-ms", type=int, help="[PLUGIN_STATE_BATCH_WAIT_MS]")
@click.option("--prefetch", type=int, help="[PLUGIN_STATE_PREFETCH]")
@click.option(
    "--migrate/--no-migrate",
    "run_migrations",
    default=False,
    help="Apply migrations before starting.",
)
# How a supervising `run` starts each of its processes (worker.supervisor).
@click.option("--part", hidden=True)
@click.option("--supervisor-fd", type=int, hidden=True)
@click.pass_context
def run(
    ctx: click.Context,
    /,
    run_migrations: bool,
    part: str | None,
    supervisor_fd: int | None,
    **flags: Any,
) -> None:
    """Declare the topology, then consume writes and serve reads until SIGTERM/SIGINT."""
    try:
        settings = ctx.obj.with_changes(**{k: v for k, v in flags.items() if v is not None})
    except ConfigError as exc:
        raise bad_setting(exc, flags) from None
    if part is not None and supervisor_fd is not None:
        run_async(supervisor.serve_part(settings, part, supervisor_fd))
    elif len(supervisor.plan(settings)) == 1:
        run_async(_run(settings, run_migrations))
    else:
        ctx.exit(run_async(_supervise(settings, run_migrations)))


async def _run(settings: Settings, run_migrations: bool) -> None:
    if run_migrations:
        await _migrate(settings.database_url)
    worker = Worker(settings)
    _stop_on_signals(worker.request_stop)
    freeze_imports()
    await worker.run()


async def _supervise(settings: Settings, run_migrations: bool) -> int:
    """The processes of a split worker, under a supervisor; its exit code."""
    if run_migrations:
        await _migrate(settings.database_url)
    parent = supervisor.Supervisor(settings)
    _stop_on_signals(parent.request_stop)
    return await parent.run()


def _stop_on_signals(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)


async def _migrate(database_url: str) -> list[str]:
    def created(name: str) -> None:
        # Said, not only logged: a misspelt name in the URL is otherwise a silent new database.
        click.echo(
            f"created the database {name!r} on {urlsplit(database_url).netloc.rpartition('@')[2]}"
            " (it did not exist)",
            err=True,
        )

    try:
        return await migrate(database_url, on_create=created)
    except DATABASE_FAILURES as exc:
        failure = diagnosis.database_failure(exc, database_url)
        if failure is None:
            raise
        raise failure from None


@main.command()
@click.pass_context
def doctor(ctx: click.Context) -> None:
    """Check Postgres (reachable, migrated), the plugins table, RabbitMQ, the topology,
    the user's permissions and the HTTP port: one line each; exit 1 if one fails."""
    checks = run_async(examine(ctx.obj))
    for check in checks:
        click.echo(check.line)
    if any(check.status != "ok" for check in checks):
        ctx.exit(1)


# --------------------------------------------------------------------------- plugins


@main.group()
def plugins() -> None:
    """Register, list and remove plugins."""


async def _with_store(settings: Settings, action: Any) -> Any:
    try:
        pool = await create_pool(
            settings.database_url,
            1,
            settings.db_command_timeout_seconds,
            statement_cache=settings.db_statement_cache,
        )
    except DATABASE_FAILURES as exc:
        failure = diagnosis.database_failure(exc, settings.database_url)
        if failure is None:
            raise
        raise failure from None
    store = Store(pool)
    try:
        return await action(store)
    finally:
        await store.close()


@plugins.command("add")
@click.option("--key", "plugin_key", required=True, help="Unique, human-readable plugin key.")
@click.option("--id", "plugin_id", type=click.UUID, help="Plugin id (default: a new UUID).")
@click.option("--amqp-user", help="RabbitMQ user that acts for this plugin.")
@click.pass_obj
def plugins_add(
    settings: Settings, plugin_key: str, plugin_id: uuid.UUID | None, amqp_user: str | None
) -> None:
    """Register a plugin; prints its id."""
    try:
        row = run_async(
            _with_store(settings, lambda s: s.add_plugin(plugin_key, plugin_id, amqp_user))
        )
    except asyncpg.UniqueViolationError as exc:
        raise click.ClickException(
            f"a plugin with that key, id or AMQP user exists: {exc}"
        ) from None
    click.echo(str(row.id))


@plugins.command("list")
@click.pass_obj
def plugins_list(settings: Settings) -> None:
    """List plugins, one JSON object per line."""
    rows = run_async(_with_store(settings, lambda s: s.list_plugins()))
    for row in rows:
        click.echo(
            json_line(
                {
                    "id": row.id,
                    "plugin_key": row.plugin_key,
                    "amqp_user": row.amqp_user,
                    "entries": row.entries,
                    "created_at": row.created_at,
                }
            )
        )


@plugins.command("remove")
@click.argument("plugin")
@click.option("--purge", is_flag=True, help="Also delete the plugin's state.")
@click.pass_obj
def plugins_remove(settings: Settings, plugin: str, purge: bool) -> None:
    """Remove PLUGIN (its id or key). Refuses while it has state, unless --purge."""

    async def action(store: Store) -> str:
        row = await store.find_plugin(plugin)
        if row is None:
            raise click.ClickException(f"no plugin {plugin!r}")
        try:
            removed = await store.remove_plugin(row.id, purge=purge)
        except LookupError as exc:
            raise click.ClickException(str(exc)) from None
        if removed is None:
            raise click.ClickException(
                f"plugin {row.plugin_key} has state entries; use --purge to delete them with it"
            )
        return f"removed plugin {row.plugin_key} ({row.id}) and {removed} entries"

    click.echo(run_async(_with_store(settings, action)))


state_commands.register(main)
dead_commands.register(main)
bench_command.register(main)


if __name__ == "__main__":
    sys.exit(main())
