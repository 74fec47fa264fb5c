"""Every operator-facing failure is one line on stderr saying what failed, where (password
masked) and what to do, with the exit code the README gives; never a traceback."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import uuid
from urllib.parse import urlsplit, urlunsplit

from worker.app import Worker
from worker.config import Settings

from .cli import clean_env, cli, refused_port
from .conftest import drop_database
from .helpers import wait_until
from .services import ServiceUrls

DATABASE_HINT = "--database-url (PLUGIN_STATE_DATABASE_URL)"


def _with(url: str, *, netloc: str | None = None, path: str | None = None) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=netloc or parts.netloc, path=path or parts.path))


async def test_refused_postgres_is_one_line_for_plugins_list_and_migrate() -> None:
    port = refused_port()
    url = f"postgresql://postgres:secret@127.0.0.1:{port}/plugin_state"
    line = (
        f"Error: cannot reach Postgres at postgresql://postgres:***@127.0.0.1:{port}/plugin_state"
        f" (connection refused): start Postgres there, or point {DATABASE_HINT} at it\n"
    )
    for command in (["plugins", "list"], ["migrate"]):
        ran = await cli("--database-url", url, *command)
        assert (ran.code, ran.stdout, ran.stderr) == (1, "", line), command


async def test_unknown_role_is_one_line(services: ServiceUrls) -> None:
    parts = urlsplit(services.admin_database_url)
    url = _with(services.admin_database_url, netloc=f"pstest_nobody@{parts.hostname}:{parts.port}")
    ran = await cli("--database-url", url, "plugins", "list")
    assert (ran.code, ran.stdout) == (1, "")
    assert ran.stderr == (
        f'Error: Postgres at {url} refused the login (role "pstest_nobody" does not exist): '
        f"fix the user or password in {DATABASE_HINT}, or create that role\n"
    )


async def test_missing_database_is_one_line_that_says_to_migrate(services: ServiceUrls) -> None:
    url = _with(services.admin_database_url, path="/pstest_no_such_db")
    ran = await cli("--database-url", url, "plugins", "list")
    assert (ran.code, ran.stdout) == (1, "")
    assert ran.stderr == (
        f'Error: Postgres at {url} has no such database (database "pstest_no_such_db" does '
        "not exist): run `plugin-state-worker migrate` to create it, or fix the name in "
        f"{DATABASE_HINT}\n"
    )


async def test_a_bad_flag_value_names_the_flag_and_a_bad_variable_names_the_variable() -> None:
    ran = await cli("--database-url", "mysql://db/x", "plugins", "list")
    assert (ran.code, ran.stderr) == (2, "Error: --database-url must be a postgresql:// URL\n")
    ran = await cli("plugins", "list", env=clean_env(PLUGIN_STATE_DATABASE_URL="mysql://db/x"))
    assert (ran.code, ran.stderr) == (
        2,
        "Error: PLUGIN_STATE_DATABASE_URL must be a postgresql:// URL\n",
    )


async def test_run_with_a_refused_amqp_login_stops_at_once_with_one_line(
    database_url: str, services: ServiceUrls, prefix: str
) -> None:
    parts = urlsplit(services.amqp_url)
    wrong = _with(services.amqp_url, netloc=f"{parts.username}:wrong@{parts.hostname}:{parts.port}")
    env = clean_env(
        PLUGIN_STATE_DATABASE_URL=database_url,
        PLUGIN_STATE_PREFIX=prefix,
        PLUGIN_STATE_HTTP_PORT="0",
        PLUGIN_STATE_LOG_LEVEL="warning",
    )
    ran = await cli("--amqp-url", wrong, "run", env=env)
    masked = _with(wrong, netloc=f"{parts.username}:***@{parts.hostname}:{parts.port}")
    assert (ran.code, ran.stdout) == (1, "")
    assert ran.stderr == (
        f"Error: RabbitMQ at {masked} refused the login: fix the user or password in "
        "--amqp-url (PLUGIN_STATE_AMQP_URL)\n"
    )


async def test_run_stopped_while_waiting_for_postgres_exits_0_without_a_traceback(
    services: ServiceUrls, prefix: str
) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        env = clean_env(
            PLUGIN_STATE_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{refused_port()}/x",
            PLUGIN_STATE_AMQP_URL=services.amqp_url,
            PLUGIN_STATE_PREFIX=prefix,
            PLUGIN_STATE_HTTP_PORT="0",
            PLUGIN_STATE_LOG_FORMAT="json",
        )
        output = await _stop_while_waiting(env, sig)
        assert output.startswith("0\n"), (sig, output)
        assert "Traceback" not in output
        assert '"stopped_while_waiting"' in output


async def test_a_stop_in_the_middle_of_a_connection_attempt_is_a_normal_stop(
    settings: Settings,
) -> None:
    # A socket that takes connections and never answers: Postgres' handshake hangs.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/x"
        worker = Worker(settings.with_changes(database_url=url))
        running = asyncio.create_task(worker.run())

        async def connected_to_rabbitmq() -> bool:
            return worker.connection is not None

        await wait_until(connected_to_rabbitmq, what="the worker to wait on Postgres alone")
        worker.request_stop()
        await asyncio.wait_for(running, 20)
    assert worker.store is None


async def _stop_while_waiting(env: dict[str, str], sig: signal.Signals) -> str:
    """Start ``run``, send ``sig`` once it logs that it waits; its exit code and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.cli", "run", env=env, stderr=subprocess.PIPE
    )
    stderr = process.stderr
    assert stderr is not None
    lines: list[str] = []

    async def waiting() -> bool:
        lines.append((await stderr.readline()).decode())
        return '"waiting_for_service"' in lines[-1]

    await wait_until(waiting, timeout=20, what="the worker to wait for Postgres")
    process.send_signal(sig)
    _, rest = await asyncio.wait_for(process.communicate(), 20)
    return f"{process.returncode}\n" + "".join(lines) + rest.decode()


async def test_migrate_says_when_it_creates_the_database(services: ServiceUrls) -> None:
    name = "pstest_db_typo_" + uuid.uuid4().hex[:8]
    url = _with(services.admin_database_url, path=f"/{name}")
    host = urlsplit(url).netloc.rpartition("@")[2]
    try:
        ran = await cli("--database-url", url, "--log-level", "warning", "migrate")
        assert ran.code == 0, ran.stderr
        assert ran.stderr == f"created the database {name!r} on {host} (it did not exist)\n"
        again = await cli("--database-url", url, "--log-level", "warning", "migrate")
        assert (again.code, again.stderr) == (0, "")
    finally:
        await drop_database(services.admin_database_url, name)


async def test_refused_rabbitmq_is_one_line_for_the_amqp_commands() -> None:
    port = refused_port()
    url = f"amqp://guest:secret@127.0.0.1:{port}/"
    line = (
        f"Error: cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:{port}/ (connection "
        "refused): start RabbitMQ there, or point --amqp-url (PLUGIN_STATE_AMQP_URL) at it\n"
    )
    plugin = str(uuid.uuid4())
    for command, code in (
        (["dead", "list"], 1),
        (["get", "--plugin", plugin, "--scope", "instance", "k"], 2),
        (["set", "--plugin", plugin, "--scope", "instance", "k", "1"], 2),
    ):
        ran = await cli("--amqp-url", url, *command)
        assert (ran.code, ran.stdout, ran.stderr) == (code, "", line), command
