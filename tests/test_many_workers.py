"""Any number of ``run`` processes share one host with no configuration: the HTTP port a
user did not choose moves (and the worker logs where); one the user chose and cannot have
is a one-line error naming the setting."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import uuid
from typing import Any

import aio_pika
import aiohttp
import asyncpg

from worker.config import Settings
from worker.topology import Names

from .cli import clean_env, cli
from .helpers import publish, set_cmd, state_of, wait_until
from .processes import spawn_worker, wait_exit


async def _serving(process: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Read the worker's JSON log up to its ``http_serving`` event; the events read."""
    assert process.stderr is not None
    events: dict[str, Any] = {}
    while "http_serving" not in events:
        line = await asyncio.wait_for(asyncio.to_thread(process.stderr.readline), 30)
        assert line, f"the worker exited: {events}"
        event = json.loads(line)
        events[event["event"]] = event
    return events


async def _ready(port: int) -> bool:
    url = f"http://127.0.0.1:{port}/readyz"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status == 200


async def test_three_workers_with_no_configuration_all_run_and_consume(
    settings: Settings,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
) -> None:
    # The test's own database and prefix, but PLUGIN_STATE_HTTP_PORT unset: the default.
    workers = [
        spawn_worker(
            settings, stderr=subprocess.PIPE, http_port=None, log_level="info", log_format="json"
        )
        for _ in range(3)
    ]
    try:
        started = [await _serving(worker) for worker in workers]
        ports = [events["http_serving"]["port"] for events in started]
        assert len(set(ports)) == 3, ports
        for events in started:
            port = events["http_serving"]["port"]
            if port != 9108:  # someone (one of these, or another process) has the default
                assert events["http_port_moved"]["wanted"] == 9108
                assert events["http_port_moved"]["port"] == port

        async def all_ready() -> bool:
            return all(await asyncio.gather(*(_ready(port) for port in ports)))

        await wait_until(all_ready, what="every worker to be ready")
        names = Names(settings.prefix)
        for queue in (names.commands_queue, names.rpc_queue):
            declared = await amqp.declare_queue(queue, passive=True)
            assert declared.declaration_result.consumer_count == 3, queue
        for n in range(30):
            await publish(amqp, settings.prefix, plugin_id, set_cmd(plugin_id, f"k{n}", n))

        async def applied() -> bool:
            return len(await state_of(db, plugin_id)) == 30

        await wait_until(applied, what="the writes to be applied")
        assert all(worker.poll() is None for worker in workers)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        codes = [await wait_exit(worker) for worker in workers]
        for worker in workers:
            assert worker.stderr is not None
            worker.stderr.close()
    assert codes == [0, 0, 0]


async def test_a_chosen_http_port_in_use_is_one_line_naming_the_setting(
    settings: Settings,
) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_env(
            PLUGIN_STATE_DATABASE_URL=settings.database_url,
            PLUGIN_STATE_AMQP_URL=settings.amqp_url,
            PLUGIN_STATE_PREFIX=settings.prefix,
            PLUGIN_STATE_HTTP_PORT=str(port),
            PLUGIN_STATE_LOG_LEVEL="warning",
        )
        ran = await cli("run", env=env)
    assert (ran.code, ran.stdout) == (1, "")
    assert ran.stderr == (
        f"Error: cannot serve HTTP on 0.0.0.0:{port}: another process has that port; set "
        "PLUGIN_STATE_HTTP_PORT to a free one (0 picks any), or leave it unset to let the "
        "worker find one\n"
    )
