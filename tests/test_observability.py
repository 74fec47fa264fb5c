"""Metrics and health over HTTP, and structured logs, as an operator meets them."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import subprocess
import sys
import uuid
from urllib.parse import urlsplit

import aio_pika
import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from worker.app import Worker
from worker.config import Settings

from .cli import refused_port
from .conftest import StartWorker
from .helpers import publish, set_cmd, state_of, through, wait_until
from .proxy import TcpProxy
from .rpc import RawRpc


async def http_get(worker: Worker, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{worker.health.port}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_what_was_sent_after_traffic(
    start_worker: StartWorker,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    settings: Settings,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    worker = await start_worker()
    for n in range(5):
        await publish(amqp, prefix, plugin_id, set_cmd(plugin_id, f"k{n}", n))
    await publish(amqp, prefix, plugin_id, b"not json")
    await publish(amqp, prefix, plugin_id, set_cmd(plugin_id, "bad", 1, scope_kind="galaxy"))

    async def settled() -> bool:
        return worker.metrics.value("plugin_state_writes_total", outcome="applied") == 5 and (
            worker.metrics.value("plugin_state_writes_total", outcome="rejected") == 2
        )

    await wait_until(settled, what="the writes to be counted")
    async with RawRpc(settings.amqp_url, prefix) as rpc:
        for n in range(3):
            await rpc.call(
                plugin_id,
                {
                    "op": "get",
                    "plugin_id": str(plugin_id),
                    "scope_kind": "issue",
                    "scope_id": "ISS-1",
                    "key": f"k{n}",
                },
            )
        await rpc.call(plugin_id, {"op": "list", "plugin_id": str(plugin_id)})
    status, text = await http_get(worker, "/metrics")
    assert status == 200
    got = samples(text)
    assert got[("plugin_state_writes_total", (("outcome", "applied"),))] == 5
    assert got[("plugin_state_writes_total", (("outcome", "rejected"),))] == 2
    assert got[("plugin_state_rejects_total", (("code", "invalid_message"),))] == 1
    assert got[("plugin_state_rejects_total", (("code", "invalid_request"),))] == 1
    # One lag sample per applied batch (its oldest write): 1 to 5 batches here.
    assert 1 <= got[("plugin_state_write_lag_seconds_count", ())] <= 5
    assert got[("plugin_state_rpc_seconds_count", (("op", "get"),))] == 3
    assert got[("plugin_state_rpc_seconds_count", (("op", "list"),))] == 1
    assert got[("plugin_state_batch_size_sum", ())] == 7
    assert got[("plugin_state_apply_seconds_count", ())] >= 1
    assert got[("plugin_state_consumer_paused", ())] == 0
    assert got[("plugin_state_rpc_waiting", ())] == 0
    assert got[("plugin_state_connected", (("service", "rabbitmq"),))] == 1
    assert got[("plugin_state_connected", (("service", "postgres"),))] == 1
    assert len(await state_of(db, plugin_id)) == 5


async def test_healthz_answers_and_readyz_follows_postgres(
    start_worker: StartWorker,
    settings: Settings,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    target = settings.database_url
    parts = urlsplit(target)
    async with TcpProxy(parts.hostname or "localhost", parts.port or 5432) as proxy:
        worker = await start_worker(database_url=through(target, proxy.port))
        assert (await http_get(worker, "/healthz"))[0] == 200
        status, body = await http_get(worker, "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True

        proxy.cut()
        await publish(amqp, prefix, plugin_id, set_cmd(plugin_id, "k", 1))

        async def not_ready() -> bool:
            return (await http_get(worker, "/readyz"))[0] == 503

        await wait_until(not_ready, what="/readyz to report the outage")
        status, body = await http_get(worker, "/readyz")
        assert json.loads(body)["postgres"] is False
        assert (await http_get(worker, "/healthz"))[0] == 200, "alive while not ready"

        proxy.restore()

        async def ready_again() -> bool:
            return (await http_get(worker, "/readyz"))[0] == 200

        await wait_until(ready_again, what="/readyz to recover")

        async def applied() -> bool:
            return len(await state_of(db, plugin_id)) == 1

        # Before the proxy goes: the write sent during the outage must not be left for the
        # worker's drain, which would then find Postgres gone for good (a DrainTimeout).
        # The worker retries on its back-off, which a loaded machine stretches: wait long.
        await wait_until(applied, timeout=60, what="the write sent during the outage to be applied")


async def test_json_logs_are_one_object_per_line_without_secrets(settings: Settings) -> None:
    env = {
        **os.environ,
        "PLUGIN_STATE_DATABASE_URL": settings.database_url,
        "PLUGIN_STATE_AMQP_URL": settings.amqp_url,
        "PLUGIN_STATE_PREFIX": settings.prefix,
        "PLUGIN_STATE_HTTP_PORT": "0",
        "PLUGIN_STATE_LOG_FORMAT": "json",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.cli", "run", env=env, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    lines: list[str] = []
    while len(lines) < 3:
        line = await asyncio.wait_for(process.stderr.readline(), 30)
        lines.append(line.decode())
        if "worker_started" in lines[-1]:
            break
    process.terminate()
    await process.communicate()
    assert process.returncode == 0
    events = [json.loads(line) for line in lines if line.strip()]
    assert all("event" in e and "level" in e and "timestamp" in e for e in events)
    starting = next(e for e in events if e["event"] == "worker_starting")
    password = urlsplit(settings.amqp_url).password
    assert f":{password}@" not in json.dumps(starting)
    assert starting["amqp_url"] == settings.amqp_url.replace(f":{password}@", ":***@")


_ONE_LINE = """
import logging, sys

class Recording:
    writes = []
    def write(self, text):
        self.writes.append(text)
        return len(text)
    def flush(self):
        pass
    def isatty(self):
        return False

sys.stderr = Recording()
from worker import logs
logs.configure("json", "info")
import structlog
structlog.get_logger("worker.app").info("worker_draining", field="x" * 2000)
logging.getLogger("worker.client").warning("client_event %s", "y" * 2000)
print(repr(sys.stderr.writes), file=sys.__stdout__)
"""


def test_each_log_line_is_written_whole_in_one_write() -> None:
    # The processes of a run write to one stderr: two writes per line would interleave.
    ran = subprocess.run(
        [sys.executable, "-c", _ONE_LINE], capture_output=True, text=True, timeout=30, check=True
    )
    writes = ast.literal_eval(ran.stdout)
    assert len(writes) == 2, writes
    assert all(write.endswith("\n") and write.count("\n") == 1 for write in writes)
    assert json.loads(writes[0])["event"] == "worker_draining"
    assert "client_event" in writes[1]


async def test_readyz_names_postgres_alone_while_only_postgres_is_missing(
    settings: Settings,
) -> None:
    port = refused_port()
    worker = Worker(settings.with_changes(database_url=f"postgresql://postgres@127.0.0.1:{port}/x"))
    running = asyncio.create_task(worker.run())
    try:

        async def rabbitmq_up() -> bool:
            if not worker.health.port:
                return False
            status, body = await http_get(worker, "/readyz")
            return status == 503 and json.loads(body)["rabbitmq"] is True

        await wait_until(rabbitmq_up, what="/readyz to see RabbitMQ up")
        status, body = await http_get(worker, "/readyz")
        assert (status, json.loads(body)["postgres"]) == (503, False)
    finally:
        worker.request_stop()
        await asyncio.wait_for(running, 20)
