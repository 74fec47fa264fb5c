"""Reads: one client loop against the RPC ceiling, the raw round trip and the worker, and
the worker's ``get`` beside a saturated write flood.

The client is the same for every server: one connection and channel (no publisher
confirms: a read is not persistent), replies on RabbitMQ direct reply-to, JSON bodies
encoded before the clock starts, ``user_id`` set. ``concurrency`` callers each send a
request and wait for its reply, in a loop, for a fixed time after a short warm-up; at
concurrency 1 that gives the latency, at the high concurrency the throughput.

Beside a flood, a fresh worker starts on a commands queue pre-filled with more writes than
it can apply during the measurement, and one caller reads back to back while it applies
them; the report compares that ``get`` p99 with the idle one.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)

from worker.bench.harness import APPLICATION_NAME, BenchEnv, Process, wait_for
from worker.bench.report import (
    RAW_SELECT,
    RPC_CEILING,
    WORKER_GET,
    WORKER_GET_MANY,
    FloodReads,
    Latency,
    Rate,
    ReadFigures,
)
from worker.bench.workload import EntryName, WriteStream, get_body, get_many_body

DIRECT_REPLY_TO: Final = "amq.rabbitmq.reply-to"
CALL_TIMEOUT: Final = 10.0
_ERROR_TAG: Final = b'"type":"error"'
_SAMPLE_BODIES: Final = 1000


class RpcClient:
    """Calls over direct reply-to on one channel; replies are matched by correlation id."""

    def __init__(self, env: BenchEnv) -> None:
        self.env = env
        self._waiting: dict[str, asyncio.Future[bytes]] = {}
        self._ids = itertools.count()
        self._connection: AbstractConnection | None = None
        self._exchange: AbstractExchange | None = None

    async def __aenter__(self) -> Self:
        self._connection = await aio_pika.connect(
            self.env.amqp_url,
            client_properties={"connection_name": f"{APPLICATION_NAME} rpc client"},
        )
        channel: AbstractChannel = await self._connection.channel(publisher_confirms=False)
        replies = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await replies.consume(self._on_reply, no_ack=True)
        self._exchange = await channel.get_exchange(self.env.settings.prefix, ensure=False)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        waiter = self._waiting.pop(message.correlation_id or "", None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message.body)

    async def call(self, routing_key: str, body: bytes) -> bytes:
        """The reply's body; TimeoutError after ``CALL_TIMEOUT``."""
        assert self._exchange is not None
        correlation_id = str(next(self._ids))
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = waiter
        try:
            await self._exchange.publish(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    correlation_id=correlation_id,
                    reply_to=DIRECT_REPLY_TO,
                    user_id=self.env.user_id,
                ),
                routing_key,
                mandatory=False,
            )
            async with asyncio.timeout(CALL_TIMEOUT):
                return await waiter
        finally:
            self._waiting.pop(correlation_id, None)


@dataclass
class LoopResult:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0


async def closed_loop(
    client: RpcClient,
    routing_key: str,
    bodies: list[bytes],
    concurrency: int,
    seconds: float,
    progress: Any = None,
) -> LoopResult:
    """``concurrency`` callers calling back to back for ``seconds``, each with a random
    one of ``bodies``."""
    result = LoopResult()
    deadline = time.monotonic() + seconds
    rng = random.Random(concurrency)

    async def caller() -> None:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                reply = await client.call(routing_key, rng.choice(bodies))
            except TimeoutError:
                result.errors += 1
                continue
            if _ERROR_TAG in reply[:32]:
                result.errors += 1
                continue
            result.latencies.append(time.perf_counter() - started)
            if progress is not None:
                progress.update(1)

    began = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(caller())
    result.seconds = time.perf_counter() - began
    return result


async def measure_server(
    client: RpcClient,
    server: Process,
    label: str,
    routing_key: str,
    bodies: list[bytes],
    concurrency: int,
    seconds: float,
    bar: Callable[..., Any],
) -> ReadFigures:
    """Latency at concurrency 1, then throughput at ``concurrency``, each after a warm-up."""
    await closed_loop(client, routing_key, bodies, concurrency, _warm_up(seconds))
    with bar(f"reads: {label} c=1", unit="call") as progress:
        alone = await closed_loop(client, routing_key, bodies, 1, seconds, progress)
    with bar(f"reads: {label} c={concurrency}", unit="call") as progress:
        cpu_before = server.cpu_seconds()
        loaded = await closed_loop(client, routing_key, bodies, concurrency, seconds, progress)
        cpu = server.cpu_seconds() - cpu_before
    return ReadFigures(
        latency=Latency.of(alone.latencies),
        throughput=Rate(len(loaded.latencies), loaded.seconds),
        errors=alone.errors + loaded.errors,
        cpu_per_call=cpu / max(1, len(loaded.latencies)),
    )


def _warm_up(seconds: float) -> float:
    """Calls made before a measurement of ``seconds``, not counted."""
    return min(1.0, seconds / 5)


async def _reference_server(env: BenchEnv, kind: str) -> tuple[Process, str]:
    """Start a reference server on a queue of its own; its routing key."""
    queue = await env.bench_queue(f"rpc-{kind}", f"{kind}.*", quorum=False)
    server = await env.spawn(
        f"server-{kind}",
        [
            "-m",
            "worker.bench.servers",
            kind,
            env.amqp_url,
            queue.name,
            env.settings.database_url,
        ],
        env.worker_environment(),
    )
    await env.wait_for_consumer(queue.name, server)
    return server, f"{kind}.x"


async def measure_reads(
    env: BenchEnv,
    worker: Process,
    plugin_id: uuid.UUID,
    entries: list[EntryName],
    concurrency: int,
    get_many_keys: int,
    seconds: float,
    bar: Callable[..., Any],
) -> dict[str, ReadFigures]:
    """The four read figures; the worker must be running (it serves ``rpc.<plugin>``)."""
    rng = random.Random(5)
    gets = [get_body(plugin_id, entry) for entry in entries]
    get_manys = [
        get_many_body(plugin_id, rng.sample(entries, min(get_many_keys, len(entries))))
        for _ in range(_SAMPLE_BODIES)
    ]
    figures: dict[str, ReadFigures] = {}
    async with RpcClient(env) as client:
        for key, kind in ((RPC_CEILING, "constant"), (RAW_SELECT, "select")):
            server, routing_key = await _reference_server(env, kind)
            try:
                figures[key] = await measure_server(
                    client, server, kind, routing_key, gets, concurrency, seconds, bar
                )
            finally:
                await env.stop(server)
        worker_key = env.names.rpc_key(plugin_id)
        figures[WORKER_GET] = await measure_server(
            client, worker, "worker get", worker_key, gets, concurrency, seconds, bar
        )
        figures[WORKER_GET_MANY] = await measure_server(
            client,
            worker,
            f"worker get_many({get_many_keys})",
            worker_key,
            get_manys,
            concurrency,
            seconds,
            bar,
        )
    return figures


async def measure_get_beside_flood(
    env: BenchEnv, flood: WriteStream, seconds: float, bar: Callable[..., Any]
) -> FloodReads:
    """``get`` at concurrency 1 for ``seconds`` while a fresh worker applies ``flood``,
    pre-filled before it started (reading the flood's own entries); then the worker is
    stopped and what is left of the flood purged, so that no later phase sees it. No
    other worker may run: they would answer the reads too."""
    queue = env.names.commands_queue
    total = len(flood.bodies)
    with bar("flood: publish", total=total) as progress:
        await env.publish_all(env.names.command_key(flood.plugin_id), flood.bodies, progress)
    gets = [get_body(flood.plugin_id, entry) for entry in flood.entries]
    async with RpcClient(env) as client:
        worker = await env.spawn_worker("worker-flood")

        async def applying() -> bool:
            return (await env.queue_counts(queue))[0] < total

        await wait_for(
            applying,
            timeout=60,
            what="the worker to start on the flood",
            interval=0.005,
            alive=worker.check_alive,
        )
        # And serves reads: its rpc consumer is the last it starts (worker.app).
        await env.wait_for_consumer(env.names.rpc_queue, worker)
        routing_key = env.names.rpc_key(flood.plugin_id)
        # As for the idle figure: the worker's first calls prepare its statements.
        await closed_loop(client, routing_key, gets, 1, _warm_up(seconds))
        with bar("reads: worker get beside a write flood c=1", unit="call") as progress:
            beside = await closed_loop(client, routing_key, gets, 1, seconds, progress)
        left = (await env.queue_counts(queue))[0]
    await env.stop(worker)
    await (await env.channel.declare_queue(queue, passive=True)).purge()
    return FloodReads(Latency.of(beside.latencies), total, left, beside.errors)
