"""``run`` serves reads from a process of its own (``worker.supervisor``): split by default,
one HTTP face for every process, each process drained on SIGTERM, a process that dies ends
the run, none outlives a supervisor killed outright, and reads are answered while the write
path is saturated."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import uuid
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker.config import Settings
from worker.health import merged_metrics, merged_readiness
from worker.metrics import Metrics
from worker.supervisor import PROCESS_LABEL, _read_word, _watch_supervisor, plan
from worker.topology import Names, declare

from .broker import connections_named, require_rabbitmqctl
from .helpers import free_port, publish, set_cmd, wait_until
from .helpers import get_request as get
from .processes import alive, children, parts, spawn_worker, wait_exit
from .rpc import RawRpc
from .streams import Stream

SPLIT = {"writes+relay", "reads"}


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(page: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    }


def value(got: Samples, name: str, **labels: str) -> float | None:
    return got.get((name, tuple(sorted(labels.items()))))


# --------------------------------------------------------------------------- the plan


def test_the_read_path_gets_a_process_of_its_own_when_the_worker_also_writes_or_relays() -> None:
    # In the order they start: reads first.
    assert [(p.name, sorted(p.roles), p.housekeeping) for p in plan(Settings())] == [
        ("reads", ["reads"], False),
        ("writes+relay", ["relay", "writes"], True),
    ]
    # The worker's Postgres connections are shared out, not doubled.
    assert [p.pool_size for p in plan(Settings(db_pool_size=6))] == [2, 4]
    assert [p.pool_size for p in plan(Settings(db_pool_size=12))] == [4, 8]
    assert [p.pool_size for p in plan(Settings(db_pool_size=2))] == [1, 1]
    beside_relay = plan(Settings(roles=frozenset({"reads", "relay"})))
    assert [p.name for p in beside_relay] == ["reads", "relay"]


@pytest.mark.parametrize(
    "settings",
    [
        Settings(processes="single"),
        Settings(roles=frozenset({"reads"})),
        Settings(roles=frozenset({"writes"})),
        Settings(roles=frozenset({"writes", "relay"})),
    ],
)
def test_one_process_does_everything_when_asked_or_when_the_worker_does_not_read_beside(
    settings: Settings,
) -> None:
    [part] = plan(settings)
    assert (part.roles, part.housekeeping, part.pool_size) == (settings.roles, True, 6)


def test_a_process_gets_the_supervisors_settings_through_its_environment() -> None:
    for settings in (
        Settings(),
        Settings(
            amqp_url="amqp://w:secret@rabbit-1/,amqp://w:secret@rabbit-2/",
            trusted_users=frozenset({"host", "ops"}),
            changes=False,
            http_port=9200,
            retry_initial_seconds=0.05,
            roles=frozenset({"reads", "relay"}),
        ),
    ):
        assert Settings.from_env(settings.to_env()) == settings


def test_metrics_of_several_processes_are_one_page_each_sample_naming_its_process() -> None:
    writes, reads = Metrics(), Metrics()
    writes.count_write("applied", 3)
    reads.rpc_seconds.labels(op="get").observe(0.002)
    page = merged_metrics(
        {
            "writes+relay": generate_latest(writes.registry).decode(),
            "reads": generate_latest(reads.registry).decode(),
        },
        PROCESS_LABEL,
    ).decode()
    families = list(text_string_to_metric_families(page))
    assert len({family.name for family in families}) == len(families)
    got = samples(page)
    assert value(got, "plugin_state_writes_total", outcome="applied", process="writes+relay") == 3
    assert value(got, "plugin_state_rpc_seconds_count", op="get", process="reads") == 1
    assert value(got, "plugin_state_rpc_seconds_count", op="get", process="writes+relay") is None


def test_readiness_of_several_processes_holds_where_it_holds_in_each() -> None:
    checks = merged_readiness(
        [
            {"rabbitmq": True, "consuming_writes": True, "consuming_reads": True},
            {"rabbitmq": False, "consuming_writes": True, "consuming_reads": False},
        ]
    )
    assert checks == {"rabbitmq": False, "consuming_writes": True, "consuming_reads": False}


# --------------------------------------------------------------------------- a real run


async def readyz(port: int) -> tuple[int, dict[str, bool]] | None:
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            body: dict[str, bool] = json.loads(await response.text())
            return response.status, body
    except aiohttp.ClientError:
        return None


async def metrics(port: int) -> Samples:
    url = f"http://127.0.0.1:{port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return samples(await response.text())


def json_events(stderr: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]


async def test_run_serves_reads_from_a_process_of_its_own_behind_one_http_face(
    settings: Settings, amqp: aio_pika.abc.AbstractChannel, plugin_id: uuid.UUID, prefix: str
) -> None:
    require_rabbitmqctl()
    await declare(amqp, settings)
    port = free_port()
    worker = spawn_worker(settings, http_port=str(port))
    try:

        async def ready() -> bool:
            answer = await readyz(port)
            return answer is not None and answer[0] == 200

        await wait_until(ready, timeout=60, what="the worker to be ready")
        answer = await readyz(port)
        assert answer is not None and answer[1]["processes"] is True
        found = parts(worker)
        assert set(found) == SPLIT
        # One connection each, named after the process that holds it.
        reads = await connections_named(f":{found['reads']}:")
        writes = await connections_named(f":{found['writes+relay']}:")
        assert len(reads) == len(writes) == 1
        assert " reads" in reads[0] and " reads" not in writes[0]

        async with RawRpc(settings.amqp_url, prefix) as rpc:
            write = set_cmd(plugin_id, "k", 1)
            await publish(amqp, prefix, plugin_id, write)
            reply = await rpc.call(plugin_id, get(plugin_id, "k", after=write["id"]))
            assert reply["found"] and reply["value"] == 1
        # The write was applied by one process and the read answered by the other.
        got = await metrics(port)
        writer, reader = "writes+relay", "reads"
        assert value(got, "plugin_state_writes_total", outcome="applied", process=writer) == 1
        assert value(got, "plugin_state_rpc_seconds_count", op="get", process=reader) == 1
        assert value(got, "plugin_state_rpc_seconds_count", op="get", process=writer) is None

        # A process that cannot answer makes the whole worker not ready.
        os.kill(found["reads"], signal.SIGSTOP)
        try:
            answer = await readyz(port)
            assert answer is not None and answer[0] == 503 and answer[1]["processes"] is False
        finally:
            os.kill(found["reads"], signal.SIGCONT)
        await wait_until(ready, what="the worker to be ready again")
    finally:
        worker.send_signal(signal.SIGTERM)
    assert await wait_exit(worker) == 0


async def test_processes_single_runs_every_role_in_one_process(
    settings: Settings, amqp: aio_pika.abc.AbstractChannel, plugin_id: uuid.UUID, prefix: str
) -> None:
    await declare(amqp, settings)
    worker = spawn_worker(settings, processes="single")
    try:
        async with RawRpc(settings.amqp_url, prefix) as rpc:
            await wait_until(lambda: rpc.answering(plugin_id), timeout=60, what="reads")
            write = set_cmd(plugin_id, "k", 1)
            await publish(amqp, prefix, plugin_id, write)
            reply = await rpc.call(plugin_id, get(plugin_id, "k", after=write["id"]))
            assert reply["found"]
        assert children(worker.pid) == []
    finally:
        worker.send_signal(signal.SIGTERM)
    assert await wait_exit(worker) == 0


async def test_sigterm_to_the_supervisor_drains_every_process_and_exits_zero(
    settings: Settings,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    await declare(amqp, settings)
    stream = Stream(plugin_id, count=3000, seed=21)
    await stream.publish(amqp, prefix)
    process = spawn_worker(
        settings, stderr=subprocess.PIPE, batch_size="100", log_format="json", log_level="info"
    )
    try:
        async with RawRpc(settings.amqp_url, prefix) as rpc:
            await wait_until(lambda: rpc.answering(plugin_id), timeout=60, what="reads")
        await wait_until(lambda: stream.some_applied(db), what="the worker to apply writes")
        found = parts(process)
    finally:
        process.send_signal(signal.SIGTERM)
    assert process.stderr is not None
    # Read to the end: every process writes to this pipe, so the end means none is left.
    log = await asyncio.to_thread(process.stderr.read)
    assert await wait_exit(process) == 0
    events = json_events(log)
    drained = {e["process"]: e for e in events if e["event"] == "consumer_drained"}
    assert set(drained) == SPLIT
    writes = drained["writes+relay"]
    print(f"SIGTERM: the write process received {writes['received']}, acked {writes['acked']}")
    assert writes["received"] == writes["acked"] > 0
    assert {e["process"] for e in events if e["event"] == "worker_stopped"} == SPLIT
    assert not any(alive(pid) for pid in found.values())


@pytest.mark.parametrize("victim", sorted(SPLIT))
async def test_a_process_that_dies_ends_the_run_the_other_drained_exit_1(
    victim: str, settings: Settings, amqp: aio_pika.abc.AbstractChannel, plugin_id: uuid.UUID
) -> None:
    await declare(amqp, settings)
    process = spawn_worker(settings, stderr=subprocess.PIPE, log_format="json", log_level="info")
    async with RawRpc(settings.amqp_url, settings.prefix) as rpc:
        await wait_until(lambda: rpc.answering(plugin_id), timeout=60, what="reads")
    found = parts(process)
    os.kill(found[victim], signal.SIGKILL)
    assert process.stderr is not None
    log = await asyncio.wait_for(asyncio.to_thread(process.stderr.read), 60)
    assert await wait_exit(process) == 1
    events = json_events(log)
    [died] = [e for e in events if e["event"] == "process_died"]
    assert (died["process"], died["pid"], died["code"]) == (victim, found[victim], -9)
    [survivor] = SPLIT - {victim}
    assert {e["process"] for e in events if e["event"] == "worker_stopped"} == {survivor}
    assert not alive(found[survivor])


async def test_no_process_outlives_a_supervisor_killed_outright(
    settings: Settings, amqp: aio_pika.abc.AbstractChannel, plugin_id: uuid.UUID
) -> None:
    await declare(amqp, settings)
    process = spawn_worker(settings)
    async with RawRpc(settings.amqp_url, settings.prefix) as rpc:
        await wait_until(lambda: rpc.answering(plugin_id), timeout=60, what="reads")
    found = parts(process)
    assert set(found) == SPLIT
    process.send_signal(signal.SIGKILL)
    assert await wait_exit(process) == -signal.SIGKILL

    async def gone() -> bool:
        return not any(alive(pid) for pid in found.values())

    # They drain first (up to the drain timeout, 30 s by default), slower on a busy machine.
    await wait_until(gone, timeout=90, what="the supervisor's processes to stop")
    # They stopped as on SIGTERM: nothing consumes the worker's queues any more.
    names = Names(settings.prefix)
    for queue in (names.commands_queue, names.rpc_queue):
        declared = await amqp.declare_queue(queue, passive=True)
        assert declared.declaration_result.consumer_count == 0, queue


async def test_a_process_stops_when_its_supervisor_dies_with_a_report_of_it_unread() -> None:
    # A Unix socket whose peer closes with data unread is reset, not ended: the process's
    # read fails with ECONNRESET instead of returning the end of the stream. It must stop
    # all the same (the killed supervisor above had not yet read one "started").
    supervisor_end, process_end = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=process_end)
    writer.write(b"started\n")
    await writer.drain()
    gone = asyncio.Event()
    watching = asyncio.ensure_future(_watch_supervisor(reader, gone.set))
    supervisor_end.close()  # as the system does for a SIGKILLed process, the report unread
    await asyncio.wait_for(watching, timeout=5)
    assert gone.is_set()
    with pytest.raises(ConnectionResetError):
        await reader.read()  # it was a reset indeed
    writer.close()


async def test_a_process_told_nothing_by_a_supervisor_gone_reads_an_empty_word() -> None:
    supervisor_end, process_end = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=process_end)
    writer.write(b"http 1234\n")
    await writer.drain()
    supervisor_end.close()
    assert await asyncio.wait_for(_read_word(reader), timeout=5) == b""
    writer.close()


async def test_reads_are_answered_while_the_write_path_is_saturated(
    settings: Settings,
    amqp: aio_pika.abc.AbstractChannel,
    db: asyncpg.Pool,
    plugin_id: uuid.UUID,
    prefix: str,
) -> None:
    await declare(amqp, settings)
    stream = Stream(plugin_id, count=20_000, entries=500, seed=22)
    await stream.publish(amqp, prefix)
    process = spawn_worker(settings, batch_size="100")
    try:
        async with RawRpc(settings.amqp_url, prefix) as rpc:
            await wait_until(lambda: stream.some_applied(db), timeout=60, what="writes")
            for n in range(20):
                reply = await rpc.call(plugin_id, get(plugin_id, f"k{n}"), timeout=30)
                assert reply["type"] == "value", reply
        queue = await amqp.declare_queue(Names(prefix).commands_queue, passive=True)
        left = queue.declaration_result.message_count
        print(f"20 reads answered with {left} writes still waiting in the queue")
        assert left and left > 0, "the flood ran out: the write path was not saturated"
    finally:
        process.send_signal(signal.SIGTERM)
    assert await wait_exit(process, timeout=60) == 0
