"""The ceiling: what RabbitMQ and aio-pika alone do with the worker's messages.

The worker's write bodies go, persistent with pipelined publisher confirms, through the
prefix's topic exchange into a quorum queue declared with the commands queue's arguments.
Then one consumer with the worker's prefetch takes them, acking every ``batch_size``
messages with ``multiple=True``; no database. Publishing and consuming are timed
separately: consuming from the first delivery to the last ack, which a synchronous round
trip on the same channel (``basic.qos``) proves the broker has processed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from worker.bench.harness import BenchEnv, BenchError
from worker.bench.report import Rate


async def prefill(
    env: BenchEnv, label: str, routing_key: str, bodies: list[bytes], bar: Callable[..., Any]
) -> Rate:
    """Declare the bench queue ``label`` and publish ``bodies`` into it; the publish rate."""
    await env.bench_queue(label, routing_key, quorum=True)
    with bar(f"{label}: publish", total=len(bodies)) as progress:
        started = time.perf_counter()
        await env.publish_all(routing_key, bodies, progress)
        return Rate(len(bodies), time.perf_counter() - started)


@dataclass(frozen=True, slots=True)
class Ceiling:
    publish: Rate
    consume: Rate
    cpu_per_message: float
    """CPU seconds of this process (the consumer, on the same event loop as the worker's)
    per message consumed."""


async def measure_ceiling(env: BenchEnv, bodies: list[bytes], bar: Callable[..., Any]) -> Ceiling:
    """Publish and consume ``bodies`` through a quorum queue, no database."""
    published = await prefill(env, "ceiling", "ceiling.x", bodies, bar)
    settings = env.settings
    total = len(bodies)
    channel = await env.connection.channel()
    prefetch = settings.effective_prefetch
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.get_queue(env.bench_queue_name("ceiling"), ensure=False)
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[float] = loop.create_future()
    first = 0.0
    count = acked = 0
    with bar("ceiling: consume", total=total) as progress:

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal first, count, acked
            # Deliveries reach this callback in order, and nothing awaits before counting.
            if count == 0:
                first = time.perf_counter()
            count += 1
            if count % settings.batch_size and count != total:
                return
            await message.ack(multiple=True)
            progress.update(count - acked)
            acked = count
            if count == total:
                await channel.set_qos(prefetch_count=prefetch)
                finished.set_result(time.perf_counter())

        cpu_before = time.process_time()
        tag = await queue.consume(on_message)
        try:
            async with asyncio.timeout(max(60.0, total / 200)):
                last = await finished
        except TimeoutError:
            raise BenchError(f"ceiling: only {count} of {total} messages arrived") from None
        cpu = time.process_time() - cpu_before
        await queue.cancel(tag)
    await channel.close()
    return Ceiling(published, Rate(total, last - first), cpu / total)
