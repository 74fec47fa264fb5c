"""Several broker addresses: how a list is written and checked (``schemas.brokers``), that no
password of any of them is ever shown, and that the worker, the client and the CLI each
connect to a live one of them, in a random order, and name every node they could not reach.

The trial's findings: a comma-separated ``PLUGIN_STATE_AMQP_URL`` was handed whole to
aio-pika (its vhost became the rest of the list, and the workers waited for ever), and only
the first URL's password was masked in the start-up line.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from urllib.parse import urlsplit, urlunsplit

import pytest
import structlog

from schemas.brokers import AddressError, redact, redact_all, split_urls
from worker.client import BrokerUnreachable, Scope, StateClient, failover
from worker.config import ConfigError, Settings
from worker.logs import redact_urls

from .conftest import StartWorker
from .helpers import wait_until

NODES = "amqp://u:s3cr,et@h1:5781/,amqp://u:s3cr,et@h2:5782/, amqp://u:s3cr,et@h3:5783/"


def unused_port_url(live: str) -> str:
    """``live`` with the port of nothing: a node that is down."""
    parts = urlsplit(live)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{_unused_port()}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) > 1 else host))


def _unused_port() -> int:
    import socket  # noqa: PLC0415 - only here

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # closed again: nothing listens there


# ------------------------------------------------------------------------------ the list


def test_a_comma_separated_list_is_several_urls_and_a_comma_in_a_password_is_not_a_separator() -> (
    None
):
    assert split_urls(NODES) == (
        "amqp://u:s3cr,et@h1:5781/",
        "amqp://u:s3cr,et@h2:5782/",
        "amqp://u:s3cr,et@h3:5783/",
    )
    # Repeated flags, each possibly a list itself, read the same.
    assert split_urls(["amqp://u:s3cr,et@h1:5781/", NODES.split(",", 2)[2]]) == split_urls(
        "amqp://u:s3cr,et@h1:5781/,amqp://u:s3cr,et@h2:5782/, amqp://u:s3cr,et@h3:5783/"
    )
    assert split_urls("amqp://guest:guest@localhost:5672/") == (
        "amqp://guest:guest@localhost:5672/",
    )


@pytest.mark.parametrize(
    ("urls", "why"),
    [
        ("", "no broker URL"),
        ("http://h1/", "amqp:// or amqps://"),
        ("amqp://h1:port/", "not a valid URL"),
        ("amqp://u:a@h1/,amqp://u:b@h2/", "more than host and port"),
        ("amqp://u:a@h1/,amqp://u:a@h2/other", "more than host and port"),
        ("amqp://u:a@h1/,amqps://u:a@h2/", "more than host and port"),
        ("amqp://h1/,amqp://h1/", "twice"),
    ],
)
def test_a_list_that_cannot_name_one_broker_is_refused_without_showing_a_password(
    urls: str, why: str
) -> None:
    with pytest.raises(AddressError, match=why) as refused:
        split_urls(urls)
    assert ":a@" not in str(refused.value) and ":b@" not in str(refused.value)
    with pytest.raises(ConfigError, match="PLUGIN_STATE_AMQP_URL"):
        Settings.from_env({"PLUGIN_STATE_AMQP_URL": urls} if urls else {}, amqp_url=urls or "")


def test_every_password_of_every_url_is_hidden_wherever_it_appears() -> None:
    text = (
        f"connecting to {NODES} failed: URL('amqp://u:s3cr,et@h2:5782/') and postgresql://p:pw@db/x"
    )
    shown = redact(text)
    assert "s3cr" not in shown and ":pw@" not in shown
    assert shown.count(":***@") == 5
    assert redact_all(split_urls(NODES)) == (
        "amqp://u:***@h1:5781/,amqp://u:***@h2:5782/,amqp://u:***@h3:5783/"
    )
    # Without a password there is nothing to hide, and nothing else changes.
    assert redact("amqp://h1:5672/ amqp://u@h2/") == "amqp://h1:5672/ amqp://u@h2/"


def test_settings_show_every_url_of_the_list_redacted() -> None:
    settings = Settings.from_env({"PLUGIN_STATE_AMQP_URL": NODES})
    assert settings.amqp_urls == split_urls(NODES)
    shown = json.dumps(settings.redacted())
    assert "s3cr" not in shown
    assert settings.redacted()["amqp_url"] == redact(NODES)


def test_the_log_processor_hides_passwords_in_any_field() -> None:
    event = {"event": "x", "error": f"<AMQPError: vhost '{NODES}' not found>", "n": 3}
    shown = redact_urls(None, "info", dict(event))
    assert "s3cr" not in json.dumps(shown)
    assert shown["n"] == 3
    assert structlog.get_config()  # configured by worker.logs in the processes below


async def test_connections_start_on_every_node_in_turn_not_always_the_first() -> None:
    """Shuffled: many clients spread over the nodes instead of piling onto the first."""
    tried_first: Counter[int] = Counter()

    async def open_node(addresses: tuple[str, ...], index: int) -> int:
        return index

    for _ in range(300):
        tried_first[await failover.any_node(NODES, open_node)] += 1
    assert set(tried_first) == {0, 1, 2}
    assert min(tried_first.values()) > 50, tried_first


# ------------------------------------------------------------------------------ connecting


async def test_with_no_node_answering_the_client_fails_fast_naming_each_node(
    settings: Settings, plugin_id: uuid.UUID
) -> None:
    live = settings.amqp_urls[0]
    dead = [unused_port_url(live), unused_port_url(live)]
    client = StateClient(dead, plugin_id, prefix=settings.prefix, timeout=5)
    started = asyncio.get_running_loop().time()
    with pytest.raises(BrokerUnreachable) as refused:
        await client.connect()
    assert asyncio.get_running_loop().time() - started < 5
    message = str(refused.value)
    for url in dead:
        assert f"127.0.0.1:{urlsplit(url).port}" in message
    password = urlsplit(live).password
    assert password is None or f":{password}@" not in message


async def test_worker_and_client_use_the_live_node_of_a_list_with_dead_ones(
    settings: Settings, start_worker: StartWorker, plugin_id: uuid.UUID
) -> None:
    live = settings.amqp_urls[0]
    urls = ",".join([unused_port_url(live), live, unused_port_url(live)])
    worker = await start_worker(amqp_url=urls)
    assert worker.readiness()["rabbitmq"]
    for _ in range(3):  # whichever node each one tries first
        async with StateClient(urls, plugin_id, prefix=settings.prefix, timeout=10) as state:
            await state.set(Scope.instance(), "k", 1, wait=True)
            entry = await state.get(Scope.instance(), "k")
            assert entry is not None and entry.value == 1


async def test_the_worker_and_the_cli_take_a_list_and_log_no_password_of_it(
    settings: Settings, plugin_id: uuid.UUID, db: object
) -> None:
    """The trial's run, shrunk: several URLs in PLUGIN_STATE_AMQP_URL (a dead node first),
    JSON logs; the worker starts, a write through the CLI (repeated --amqp-url) is applied,
    and no log line of either shows a password."""
    live = settings.amqp_urls[0]
    password = urlsplit(live).password or "guest"
    urls = [unused_port_url(live), live, unused_port_url(live)]
    env = {
        **os.environ,
        "PLUGIN_STATE_DATABASE_URL": settings.database_url,
        "PLUGIN_STATE_AMQP_URL": ",".join(urls),
        "PLUGIN_STATE_PREFIX": settings.prefix,
        "PLUGIN_STATE_TRUSTED_USERS": ",".join(sorted(settings.trusted_users)),
        "PLUGIN_STATE_HTTP_PORT": "0",
        "PLUGIN_STATE_LOG_FORMAT": "json",
    }
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.cli", "run", env=env, stderr=subprocess.PIPE
    )
    assert worker.stderr is not None
    lines: list[str] = []
    try:
        while "worker_started" not in (lines or [""])[-1]:
            lines.append((await asyncio.wait_for(worker.stderr.readline(), 30)).decode())
            assert lines[-1], "the worker exited before it started"
        cli_env = {k: v for k, v in env.items() if k != "PLUGIN_STATE_AMQP_URL"}
        flags = [part for url in reversed(urls) for part in ("--amqp-url", url)]
        cli = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker.cli",
            *flags,
            "set",
            "--plugin",
            str(plugin_id),
            "--scope",
            "instance",
            "k",
            '"v"',
            "--wait",
            env=cli_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(cli.communicate(), 60)
        assert cli.returncode == 0, err.decode()
        assert json.loads(out)["applied"] is True
    finally:
        worker.terminate()
        rest, _ = await worker.communicate()
    assert worker.returncode == 0
    logged = "".join(lines) + (rest or b"").decode() + err.decode()
    assert f":{password}@" not in logged
    starting = next(json.loads(line) for line in lines if "worker_starting" in line)
    assert starting["amqp_url"] == redact(",".join(urls))


async def test_a_connection_moves_to_another_address_when_its_node_goes(
    settings: Settings,
) -> None:
    """Two addresses of the one local broker, each behind a proxy of the test's own: cut
    the one in use, and the connection comes back through the other."""
    from .proxy import TcpProxy  # noqa: PLC0415

    live = urlsplit(settings.amqp_urls[0])
    assert live.hostname is not None
    async with (
        TcpProxy(live.hostname, live.port or 5672) as first,
        TcpProxy(live.hostname, live.port or 5672) as second,
    ):
        urls = [
            urlunsplit(live._replace(netloc=f"{live.username}:{live.password}@127.0.0.1:{p}"))
            for p in (first.port, second.port)
        ]
        connection = await failover.connect(urls, shuffle=False, retry_initial=0.05)
        try:
            assert connection.node == f"127.0.0.1:{first.port}"
            channel = await connection.channel()
            first.cut()

            async def moved() -> bool:
                return connection.node == f"127.0.0.1:{second.port}" and not channel.is_closed

            await wait_until(moved, 15, "the connection to come back through the other node")
            await channel.ready()
            await channel.declare_queue("", exclusive=True)  # and it works
        finally:
            await connection.close()
