"""The operator commands end to end: CliRunner, through a running worker, over AMQP."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
from click.testing import CliRunner, Result

from worker.cli import main
from worker.config import Settings
from worker.state_commands import register
from worker.topology import Names, declare

from .cli import clean_env, cli
from .conftest import StartWorker
from .helpers import state_of, wait_until

register(main)

Invoke = Callable[..., Awaitable[Result]]


@pytest.fixture
def invoke(settings: Settings, plugin_id: uuid.UUID) -> Invoke:
    """Run ``plugin-state-worker COMMAND --plugin <this test's plugin> ARGS`` in a thread:
    the command runs its own event loop."""

    async def run(command: str, *args: str, plugin: uuid.UUID = plugin_id) -> Result:
        argv = [
            "--amqp-url",
            settings.amqp_url,
            "--prefix",
            settings.prefix,
            "--log-level",
            "warning",
            command,
            "--plugin",
            str(plugin),
            *args,
        ]
        return await asyncio.to_thread(CliRunner().invoke, main, argv)

    return run


def output(result: Result) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


async def test_set_then_get_prints_the_entry(start_worker: StartWorker, invoke: Invoke) -> None:
    await start_worker()
    written = await invoke("set", "--scope", "issue:ISS-42", "cursor", '{"page": 3}', "--wait")
    assert written.exit_code == 0, written.output
    [write] = output(written)
    assert write["applied"] is True

    got = await invoke("get", "--scope", "issue:ISS-42", "cursor")
    assert got.exit_code == 0, got.output
    [entry] = output(got)
    assert entry["found"] is True
    assert entry["value"] == {"page": 3}
    assert entry["version"] == write["id"]
    assert (entry["scope_kind"], entry["scope_id"], entry["namespace"], entry["key"]) == (
        "issue",
        "ISS-42",
        "default",
        "cursor",
    )


async def test_set_without_wait_prints_the_id_once_queued(
    start_worker: StartWorker, invoke: Invoke, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    result = await invoke("set", "--scope", "instance", "--namespace", "auth", "token", '"abc"')
    assert result.exit_code == 0, result.output
    [write] = output(result)
    assert uuid.UUID(write["id"]).version == 7
    assert "applied" not in write

    # Each command is its own client: a later `get` has no write to wait for, so wait here.
    async def stored() -> bool:
        return await state_of(db, plugin_id) == {("instance", None, "auth", "token"): "abc"}

    await wait_until(stored, what="the set to be applied")
    got = await invoke("get", "--scope", "instance", "--namespace", "auth", "token")
    assert output(got)[0]["value"] == "abc"


async def test_get_of_a_missing_entry_prints_found_false_and_exits_1(
    start_worker: StartWorker, invoke: Invoke
) -> None:
    await start_worker()
    result = await invoke("get", "--scope", "instance", "nothing-here")
    assert result.exit_code == 1
    assert output(result) == [{"found": False}]


async def test_delete_removes_the_entry(
    start_worker: StartWorker, invoke: Invoke, db: asyncpg.Pool, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    await invoke("set", "--scope", "run:r-1", "k", "null", "--wait")
    assert await state_of(db, plugin_id) == {("run", "r-1", "default", "k"): None}
    deleted = await invoke("delete", "--scope", "run:r-1", "k", "--wait")
    assert deleted.exit_code == 0, deleted.output
    assert output(deleted)[0]["applied"] is True
    assert await state_of(db, plugin_id) == {}


async def test_list_prints_one_line_per_entry_across_pages(
    start_worker: StartWorker, invoke: Invoke
) -> None:
    await start_worker()
    for scope, key in [("issue:ISS-1", "a"), ("issue:ISS-1", "b"), ("issue:ISS-2", "a")]:
        await invoke("set", "--scope", scope, key, json.dumps(key), "--wait")
    await invoke("set", "--scope", "instance", "--namespace", "ns", "x", "1", "--wait")

    every = await invoke("list", "--page-size", "1")
    assert every.exit_code == 0, every.output
    assert [(e["scope_kind"], e["scope_id"], e["key"]) for e in output(every)] == [
        ("instance", None, "x"),
        ("issue", "ISS-1", "a"),
        ("issue", "ISS-1", "b"),
        ("issue", "ISS-2", "a"),
    ]
    of_kind = await invoke("list", "--scope", "issue", "--key-prefix", "a")
    assert [e["scope_id"] for e in output(of_kind)] == ["ISS-1", "ISS-2"]
    of_scope = await invoke("list", "--scope", "issue:ISS-1")
    assert [e["key"] for e in output(of_scope)] == ["a", "b"]
    of_namespace = await invoke("list", "--namespace", "ns")
    assert [e["value"] for e in output(of_namespace)] == [1]


async def test_errors_exit_2_with_the_typed_reason(
    start_worker: StartWorker, invoke: Invoke
) -> None:
    await start_worker()
    invalid = await invoke("get", "--scope", "instance", "__proto__")
    assert invalid.exit_code == 2
    assert "invalid_request" in invalid.output

    unknown = await invoke("set", "--scope", "instance", "k", "1", "--wait", plugin=uuid.uuid4())
    assert unknown.exit_code == 2
    assert "unknown_plugin" in unknown.output


async def test_bad_arguments_are_usage_errors(invoke: Invoke) -> None:
    not_json = await invoke("set", "--scope", "instance", "k", "not json")
    assert not_json.exit_code == 2
    assert "not a JSON value" in not_json.output
    bad_scope = await invoke("get", "--scope", "planet:mars", "k")
    assert bad_scope.exit_code == 2
    assert "unknown scope kind" in bad_scope.output
    no_id = await invoke("get", "--scope", "issue", "k")
    assert no_id.exit_code == 2


async def test_conditional_writes_from_the_command_line_exit_3_on_a_conflict(
    start_worker: StartWorker, invoke: Invoke
) -> None:
    await start_worker()
    claimed = await invoke(
        "set", "--scope", "run:R-1", "owner", '"me"', "--if-absent", "--ttl", "60"
    )
    assert claimed.exit_code == 0, claimed.output
    [claim] = output(claimed)
    assert claim["applied"] is True
    again = await invoke("set", "--scope", "run:R-1", "owner", '"you"', "--if-absent")
    assert again.exit_code == 3, again.output
    assert output(again)[0]["outcome"] == "conflict"
    got = await invoke("get", "--scope", "run:R-1", "owner")
    [entry] = output(got)
    assert entry["value"] == "me" and "expires_at" in entry
    stale = await invoke("delete", "--scope", "run:R-1", "owner", "--if-version", str(uuid.uuid4()))
    assert stale.exit_code == 2, stale.output  # not a UUIDv7: refused by the worker
    wrong = await invoke(
        "delete",
        "--scope",
        "run:R-1",
        "owner",
        "--if-version",
        "01900000-0000-7000-8000-000000000000",
    )
    assert wrong.exit_code == 3, wrong.output
    renewed = await invoke(
        "set", "--scope", "run:R-1", "owner", '"me, again"', "--if-version", claim["id"]
    )
    assert renewed.exit_code == 0, renewed.output
    [renewal] = output(renewed)
    lost = await invoke("set", "--scope", "run:R-1", "owner", '"late"', "--if-version", claim["id"])
    assert lost.exit_code == 3, lost.output  # the claim's version is no longer the entry's
    deleted = await invoke("delete", "--scope", "run:R-1", "owner", "--if-version", renewal["id"])
    assert deleted.exit_code == 0, deleted.output


async def test_watch_prints_the_entries_then_changes_and_resumes_from_a_position(
    start_worker: StartWorker, invoke: Invoke
) -> None:
    await start_worker()
    await invoke("set", "--scope", "issue:ISS-1", "a", "1", "--wait")
    first = await invoke("watch", "--scope", "issue:ISS-1", "--until-synced")
    assert first.exit_code == 0, first.output
    lines = output(first)
    assert [(e["event"], e.get("key"), e.get("value")) for e in lines] == [
        ("change", "a", 1),
        ("synced", None, None),
    ]
    await invoke("set", "--scope", "issue:ISS-1", "b", '"two"', "--wait")
    await invoke("delete", "--scope", "issue:ISS-1", "a", "--wait")
    resumed = await invoke("watch", "--since", lines[-1]["position"], "--until-synced")
    assert [(e["event"], e.get("change"), e.get("key")) for e in output(resumed)] == [
        ("change", "set", "b"),
        ("change", "delete", "a"),
        ("synced", None, None),
    ]


# ------------------------------------------------------------ refused here, by the worker's rules


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--scope", "instance", "", "1"], "Error: invalid_request: key must not be empty\n"),
        (
            ["--scope", "instance", "__proto__", "1"],
            "Error: invalid_request: key must not be one of __proto__, prototype, constructor\n",
        ),
        (
            ["--scope", "instance", "--namespace", " ", "k", "1"],
            "Error: invalid_request: namespace must not be only whitespace\n",
        ),
    ],
)
async def test_set_refuses_locally_what_the_worker_would_dead_letter(
    start_worker: StartWorker,
    settings: Settings,
    plugin_id: uuid.UUID,
    amqp: aio_pika.abc.AbstractChannel,
    args: list[str],
    line: str,
) -> None:
    await start_worker()
    env = clean_env(PLUGIN_STATE_AMQP_URL=settings.amqp_url, PLUGIN_STATE_PREFIX=settings.prefix)
    ran = await cli("set", "--plugin", str(plugin_id), *args, env=env)
    assert (ran.code, ran.stdout, ran.stderr) == (2, "", line)
    commands = await amqp.declare_queue(Names(settings.prefix).commands_queue, passive=True)
    dead = await amqp.declare_queue(Names(settings.prefix).dead, passive=True)
    assert commands.declaration_result.message_count == 0
    assert dead.declaration_result.message_count == 0


async def test_set_takes_its_value_from_stdin_or_a_file_and_the_plugin_by_key(
    start_worker: StartWorker,
    settings: Settings,
    database_url: str,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    tmp_path: Path,
) -> None:
    await start_worker()
    key = await db.fetchval("SELECT plugin_key FROM plugins WHERE id = $1", plugin_id)
    env = clean_env(
        PLUGIN_STATE_AMQP_URL=settings.amqp_url,
        PLUGIN_STATE_PREFIX=settings.prefix,
        PLUGIN_STATE_DATABASE_URL=database_url,
    )
    big = {"blob": "x" * 900_000}  # more than a command line may hold
    (tmp_path / "value.json").write_text(json.dumps(big))
    ran = await cli(
        "set",
        "--plugin",
        key,
        "--scope",
        "instance",
        "big",
        f"@{tmp_path / 'value.json'}",
        "--wait",
        env=env,
    )
    assert ran.code == 0, ran.stderr
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        "set",
        "--plugin",
        key,
        "--scope",
        "instance",
        "piped",
        "-",
        "--wait",
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    await asyncio.wait_for(process.communicate(b'{"from": "stdin"}'), 30)
    assert process.returncode == 0
    stored = await state_of(db, plugin_id)
    assert stored[("instance", None, "default", "big")] == big
    assert stored[("instance", None, "default", "piped")] == {"from": "stdin"}
    ran = await cli("get", "--plugin", "pstest_no_such_key", "--scope", "instance", "k", env=env)
    assert (ran.code, ran.stderr) == (
        2,
        "Error: no plugin with the key or id 'pstest_no_such_key' (`plugin-state-worker "
        "plugins list` shows them)\n",
    )


async def test_a_timeout_says_no_worker_may_be_running(
    settings: Settings, plugin_id: uuid.UUID, amqp: aio_pika.abc.AbstractChannel
) -> None:
    # The topology exists, but no worker consumes.
    await declare(amqp, settings)
    env = clean_env(PLUGIN_STATE_AMQP_URL=settings.amqp_url, PLUGIN_STATE_PREFIX=settings.prefix)
    ran = await cli(
        "get", "--plugin", str(plugin_id), "--scope", "instance", "k", "--timeout", "0.5", env=env
    )
    assert ran.code == 2
    assert ran.stderr.startswith("Error: no reply within 0.5s"), ran.stderr
    assert ran.stderr.endswith(
        ": no worker may be running for this prefix (start `plugin-state-worker run`, or check "
        "--prefix / PLUGIN_STATE_PREFIX)\n"
    )


async def test_every_command_prints_one_json_style_and_the_wires_timestamps(
    start_worker: StartWorker, settings: Settings, database_url: str, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    env = clean_env(
        PLUGIN_STATE_AMQP_URL=settings.amqp_url,
        PLUGIN_STATE_PREFIX=settings.prefix,
        PLUGIN_STATE_DATABASE_URL=database_url,
    )
    plugin = ["--plugin", str(plugin_id), "--scope", "instance"]
    assert (await cli("set", *plugin, "k", '{"a": 1}', "--wait", env=env)).code == 0
    got = (await cli("get", *plugin, "k", env=env)).stdout
    listed = (await cli("plugins", "list", env=env)).stdout
    for line in [got, *listed.splitlines()]:
        assert '": ' not in line and '", "' not in line, line  # compact, like the wire
    assert json.loads(got)["updated_at"].endswith("+00:00")
    mine = next(json.loads(line) for line in listed.splitlines() if str(plugin_id) in line)
    assert mine["created_at"].endswith("+00:00")
