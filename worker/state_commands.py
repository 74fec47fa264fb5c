"""Operator commands that read and write a plugin's state through the worker, as a plugin
would: ``get``, ``set``, ``delete``, ``list`` and ``watch`` of ``plugin-state-worker``.

They talk AMQP with ``worker.client.StateClient`` (never Postgres), using the AMQP URL and
prefix of the global settings. Output is JSON on stdout, one object per line. Exit codes
follow grep: 0 done (``get``: found), 1 ``get`` found nothing, 2 an error.
"""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec

from schemas.codec import JSON, codec_for
from schemas.errors import StateError
from schemas.messages import DEFAULT_NAMESPACE, MAX_LIST_LIMIT, SCOPE_KINDS, ScopeKind
from worker import diagnosis
from worker.auth import Caller
from worker.broker import BROKER_FAILURES
from worker.client import (
    ClientError,
    Conflict,
    Entry,
    MonotonicUuid7,
    RequestTimeout,
    Reset,
    Scope,
    StateClient,
    Synced,
    WatchEvent,
    ttl_ms,
)
from worker.config import Settings
from worker.loop import run_async
from worker.output import json_line
from worker.store import DATABASE_FAILURES, Store, create_pool
from worker.validate import Rules, validate_write

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_JSON = codec_for(JSON)

EXIT_NOT_FOUND = 1
EXIT_CONFLICT = 3


class CommandFailed(click.ClickException):
    """The worker answered an error, or the broker could not be reached in time."""

    exit_code = 2


def _parse_scope(kind_alone: bool) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """``instance`` or ``KIND:ID``; with ``kind_alone``, a bare ``KIND`` too (a filter)."""

    def parse(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
        if value is None or (kind_alone and value in SCOPE_KINDS and value != "instance"):
            return value
        try:
            return Scope.parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    return parse


def _parse_json(_ctx: click.Context, _param: click.Parameter, value: str) -> Any:
    """JSON text; ``-`` reads it from stdin, ``@FILE`` from a file (a value may be 1 MiB,
    more than a command line holds)."""
    text: str | bytes = value
    if value == "-":
        text = sys.stdin.buffer.read()
    elif value.startswith("@"):
        try:
            text = Path(value[1:]).read_bytes()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {value[1:]}: {exc.strerror}") from None
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise click.BadParameter(f"not a JSON value ({exc}); quote strings: '\"text\"'") from None


def _common(scope_required: bool) -> Callable[[F], F]:
    """--plugin, --scope, --namespace and --timeout, as every command takes them."""

    def decorate(command: F) -> F:
        for option in reversed(
            [
                click.option(
                    "--plugin", required=True, help="Plugin id, or its key (looked up in Postgres)."
                ),
                click.option(
                    "--scope",
                    callback=_parse_scope(kind_alone=not scope_required),
                    required=scope_required,
                    help="instance or KIND:ID, e.g. issue:ISS-42"
                    + ("" if scope_required else " (or KIND alone); default: every scope"),
                ),
                click.option(
                    "--namespace",
                    default=DEFAULT_NAMESPACE if scope_required else None,
                    show_default=scope_required,
                    help="Namespace" + ("." if scope_required else "; default: every one."),
                ),
                click.option(
                    "--timeout", type=float, default=5.0, show_default=True, help="Seconds."
                ),
            ]
        ):
            command = option(command)
        return command

    return decorate


def _wait_option(command: F) -> F:
    return click.option(
        "--wait/--no-wait",
        default=None,
        help="Return once the worker applied it, not once queued (conditional writes wait "
        "unless --no-wait).",
    )(command)


def _if_version_option(command: F) -> F:
    return click.option(
        "--if-version",
        type=click.UUID,
        help="Only if the entry's value is still the one this write id stored (exit 3 if not).",
    )(command)


def _run_write(write: Coroutine[Any, Any, uuid.UUID], waited: bool) -> None:
    """Print a write's outcome: its id, and whether it was applied; a conflict exits 3."""
    try:
        click.echo(_written_json(_run(write), waited))
    except ConflictFailed as conflict:
        click.echo(json_line({"id": conflict.write_id, "applied": False, "outcome": "conflict"}))
        click.get_current_context().exit(EXIT_CONFLICT)


class ConflictFailed(Exception):
    def __init__(self, write_id: uuid.UUID) -> None:
        super().__init__(str(write_id))
        self.write_id = write_id


@asynccontextmanager
async def _client(settings: Settings, plugin: str, timeout: float) -> AsyncIterator[StateClient]:
    client = StateClient(
        settings.amqp_url,
        await _plugin_id(settings, plugin),
        prefix=settings.prefix,
        timeout=timeout,
        remember=0,
    )
    try:
        await client.connect()
    except (*BROKER_FAILURES, OSError) as exc:
        failure = diagnosis.broker_failure(exc, settings.amqp_url)
        if failure is None:
            raise
        raise CommandFailed(str(failure)) from None
    try:
        yield client
    finally:
        await client.close()


async def _plugin_id(settings: Settings, plugin: str) -> uuid.UUID:
    """``--plugin``: an id as it is, a key looked up in Postgres (as ``plugins remove``)."""
    with contextlib.suppress(ValueError):
        return uuid.UUID(plugin)
    try:
        pool = await create_pool(settings.database_url, 1, settings.db_command_timeout_seconds)
    except DATABASE_FAILURES as exc:
        failure = diagnosis.database_failure(exc, settings.database_url)
        if failure is None:
            raise
        raise CommandFailed(
            f"--plugin {plugin!r} is a key, to look up in Postgres: {failure}"
        ) from None
    store = Store(pool)
    try:
        row = await store.find_plugin(plugin)
    finally:
        await store.close()
    if row is None:
        raise CommandFailed(
            f"no plugin with the key or id {plugin!r} (`plugin-state-worker plugins list` "
            "shows them)"
        )
    return row.id


def _names(scope: Scope, namespace: str, key: str) -> dict[str, Any]:
    return {"scope_kind": scope.kind, "scope_id": scope.id, "namespace": namespace, "key": key}


def _check_write(settings: Settings, client: StateClient, command: dict[str, Any]) -> None:
    """Refuse here what the worker would dead-letter, by the worker's own rules (the codec
    and ``worker.validate``): all but authorization, quotas and the database's clock."""
    body = {"id": str(MonotonicUuid7()()), "plugin_id": str(client.plugin_id), **command}
    try:
        decoded = _JSON.decode_write(msgspec.json.encode(body))
        validate_write(
            decoded,
            int(time.time() * 1000),
            Rules.from_settings(settings),
            Caller(None, f"cmd.{client.plugin_id}"),
        )
    except StateError as exc:
        raise CommandFailed(str(exc)) from None


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; the contract's and the client's errors exit 2."""
    try:
        return run_async(coro)
    except Conflict as exc:
        raise ConflictFailed(exc.write_id) from None
    except RequestTimeout as exc:
        raise CommandFailed(
            f"{exc}: no worker may be running for this prefix (start `plugin-state-worker "
            "run`, or check --prefix / PLUGIN_STATE_PREFIX)"
        ) from None
    except (StateError, ClientError) as exc:
        # A StateError reads "code: message" by itself; a ClientError is its message.
        raise CommandFailed(str(exc)) from None


def _entry_json(entry: Entry, **extra: Any) -> str:
    return json_line(
        {
            **extra,
            "scope_kind": entry.scope.kind,
            "scope_id": entry.scope.id,
            "namespace": entry.namespace,
            "key": entry.key,
            "value": entry.value,
            "version": entry.version,
            "updated_at": entry.updated_at,
            **({} if entry.expires_at is None else {"expires_at": entry.expires_at}),
        }
    )


def _written_json(write_id: uuid.UUID, wait: bool) -> str:
    return json_line({"id": write_id, **({"applied": True} if wait else {})})


@click.command("get")
@_common(scope_required=True)
@click.argument("key")
@click.pass_obj
def get_command(
    settings: Settings, plugin: str, scope: Scope, namespace: str, timeout: float, key: str
) -> None:
    """Print the entry KEY as JSON: {"found": true, ..., "value": ...}.

    A missing entry prints {"found": false} and exits 1; an error exits 2.
    """

    async def read() -> Entry | None:
        async with _client(settings, plugin, timeout) as client:
            return await client.get(scope, key, namespace=namespace)

    entry = _run(read())
    if entry is None:
        click.echo(json_line({"found": False}))
        click.get_current_context().exit(EXIT_NOT_FOUND)
    click.echo(_entry_json(entry, found=True))


@click.command("set")
@_common(scope_required=True)
@_wait_option
@_if_version_option
@click.option("--if-absent", is_flag=True, help="Only if the entry has no value (exit 3 if not).")
@click.option(
    "--ttl",
    type=click.FloatRange(min=0.001),
    help="Seconds after which the entry expires (reads then find nothing).",
)
@click.argument("key")
@click.argument("value", metavar="JSON_VALUE", callback=_parse_json)
@click.pass_obj
def set_command(
    settings: Settings,
    plugin: str,
    scope: Scope,
    namespace: str,
    timeout: float,
    wait: bool | None,
    if_version: uuid.UUID | None,
    if_absent: bool,
    ttl: float | None,
    key: str,
    value: Any,
) -> None:
    """Store JSON_VALUE (any JSON: '{"page": 3}', '"text"', 'null') at KEY.

    Prints {"id": WRITE_ID} once the broker has the write queued (a `get` right after
    may not see it yet), or with --wait {"id": WRITE_ID, "applied": true} once the worker
    applied it. A conditional write (--if-version, --if-absent) waits: when its condition
    does not hold it prints "outcome": "conflict" and exits 3. An error exits 2.
    """
    conditional = if_version is not None or if_absent

    async def write() -> uuid.UUID:
        async with _client(settings, plugin, timeout) as client:
            _check_write(
                settings,
                client,
                {
                    "op": "set",
                    **_names(scope, namespace, key),
                    "value": value,
                    "if_version": if_version,
                    "if_absent": if_absent,
                    "ttl_ms": ttl_ms(ttl),
                },
            )
            return await client.set(
                scope,
                key,
                value,
                namespace=namespace,
                if_version=if_version,
                if_absent=if_absent,
                ttl=ttl,
                wait=wait,
            )

    _run_write(write(), wait if wait is not None else conditional)


@click.command("delete")
@_common(scope_required=True)
@_wait_option
@_if_version_option
@click.argument("key")
@click.pass_obj
def delete_command(
    settings: Settings,
    plugin: str,
    scope: Scope,
    namespace: str,
    timeout: float,
    wait: bool | None,
    if_version: uuid.UUID | None,
    key: str,
) -> None:
    """Delete the entry KEY. Prints {"id": WRITE_ID} (with --wait, "applied": true too);
    with --if-version a conflict prints "outcome": "conflict" and exits 3; an error exits 2."""

    async def write() -> uuid.UUID:
        async with _client(settings, plugin, timeout) as client:
            _check_write(
                settings,
                client,
                {"op": "delete", **_names(scope, namespace, key), "if_version": if_version},
            )
            return await client.delete(
                scope, key, namespace=namespace, if_version=if_version, wait=wait
            )

    _run_write(write(), wait if wait is not None else if_version is not None)


@click.command("list")
@_common(scope_required=False)
@click.option(
    "--key-prefix",
    default="",
    help="Only keys starting with this (not the global --prefix, the topology's).",
)
@click.option(
    "--page-size",
    type=click.IntRange(1, MAX_LIST_LIMIT),
    default=100,
    show_default=True,
    help="Entries per request.",
)
@click.pass_obj
def list_command(
    settings: Settings,
    plugin: str,
    scope: Scope | ScopeKind | None,
    namespace: str | None,
    timeout: float,
    key_prefix: str,
    page_size: int,
) -> None:
    """Print the plugin's entries, one JSON object per line, in (scope kind, scope id,
    namespace, key) order. --scope KIND alone lists every scope of that kind. An error
    exits 2 (after the lines already printed)."""

    async def read() -> None:
        async with _client(settings, plugin, timeout) as client:
            async for entry in client.list(
                scope, namespace=namespace, prefix=key_prefix, page_size=page_size
            ):
                click.echo(_entry_json(entry))

    _run(read())


@click.command("watch")
@_common(scope_required=False)
@click.option(
    "--key-prefix",
    default="",
    help="Only keys starting with this (not the global --prefix, the topology's).",
)
@click.option("--since", help="Go on after this position (a change's, or a synced line's).")
@click.option(
    "--initial/--no-initial",
    default=True,
    show_default=True,
    help="Without --since, print the current entries first.",
)
@click.option("--until-synced", is_flag=True, help="Stop once caught up (after the synced line).")
@click.pass_obj
def watch_command(
    settings: Settings,
    plugin: str,
    scope: Scope | ScopeKind | None,
    namespace: str | None,
    timeout: float,
    key_prefix: str,
    since: str | None,
    initial: bool,
    until_synced: bool,
) -> None:
    """Print the plugin's changes as JSON lines, as they happen, until interrupted:
    {"event": "change", "position": ..., "change": "set" | "delete" | "expire", ...}; once
    caught up {"event": "synced", "position": ...}; after the log was compacted past the
    watch {"event": "reset", ...}, then the current entries again. Lost connections and
    restarted workers are ridden out; an error that retrying cannot cure exits 2."""

    async def follow() -> None:
        async with _client(settings, plugin, timeout) as client:
            async for event in client.watch(
                scope, namespace=namespace, prefix=key_prefix, since=since, initial=initial
            ):
                click.echo(_event_json(event))
                if until_synced and isinstance(event, Synced):
                    return

    with contextlib.suppress(KeyboardInterrupt):
        _run(follow())


def _event_json(event: WatchEvent) -> str:
    if isinstance(event, Synced):
        return json_line({"event": "synced", "position": event.position})
    if isinstance(event, Reset):
        return json_line({"event": "reset", "reason": event.reason})
    return json_line(
        {
            "event": "change",
            "position": event.position,
            "change": event.kind,
            "scope_kind": event.scope.kind,
            "scope_id": event.scope.id,
            "namespace": event.namespace,
            "key": event.key,
            "version": event.version,
            "updated_at": event.updated_at,
            **({"value": event.value} if event.kind == "set" else {}),
            **({} if event.expires_at is None else {"expires_at": event.expires_at}),
        }
    )


COMMANDS = (get_command, set_command, delete_command, list_command, watch_command)


def register(main: click.Group) -> None:
    """Add the state commands to ``main`` (again is harmless)."""
    for command in COMMANDS:
        if command.name not in main.commands:
            main.add_command(command)
