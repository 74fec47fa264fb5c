"""Write throughput over 1 and N commands partitions, side by side (``--partitions N``).

Both runs have the same workers (``--workers`` processes, at least 2: partitions pay off
when several workers share the write path) and streams of the same size. For N, the bench
declares the partitioned topology first, so that the pre-filled stream is spread over the
partitions (each write published with a ``message_id``, as the client sets it), and the
workers run with ``PLUGIN_STATE_COMMAND_PARTITIONS=N``. Afterwards the single queue is
declared again and the (empty) partitions are deleted.

On a broker without the consistent-hash exchange the partitioned run is skipped, and the
report says so. On one node every partition's leader is the same node: the figures then
show the cost of the partitions, not what they buy on a cluster (docs/cluster.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from worker.bench.harness import BenchEnv
from worker.bench.report import PartitionFigures, Rate
from worker.bench.workload import EntryName, WriteStream
from worker.bench.writes import measure_throughput
from worker.topology import consistent_hash_available, declare


async def measure_partitions(
    env: BenchEnv,
    partitions: int,
    processes: int,
    writes: int,
    entries: list[EntryName],
    bar: Callable[..., Any],
) -> PartitionFigures:
    processes = max(2, processes)
    single = await _throughput(env, writes, entries, processes, 1, bar)
    if not await consistent_hash_available(env.settings.amqp_url):
        return PartitionFigures(
            partitions,
            processes,
            single,
            None,
            "the broker has no consistent-hash exchange (rabbitmq_consistent_hash_exchange)",
        )
    partitioned = await _throughput(env, writes, entries, processes, partitions, bar)
    return PartitionFigures(partitions, processes, single, partitioned)


async def _throughput(
    env: BenchEnv,
    writes: int,
    entries: list[EntryName],
    processes: int,
    partitions: int,
    bar: Callable[..., Any],
) -> Rate:
    settings = env.settings.with_changes(command_partitions=partitions)
    topology = await declare(env.channel, settings)
    plugin = await env.add_plugin(f"partitions-{partitions}")
    stream = WriteStream(plugin, writes, entries, seed=5)
    try:
        run = await measure_throughput(
            env,
            stream,
            processes,
            bar,
            queues=topology.command_queues,
            command_partitions=str(partitions),
        )
        for process in run.workers:
            await env.stop(process)
    finally:
        if partitions > 1:
            await declare(env.channel, env.settings)
            for name in topology.command_queues:
                if name != env.names.commands_queue:
                    await env.channel.queue_delete(name)
            await env.channel.exchange_delete(env.names.commands_hash)
            await env.channel.exchange_delete(env.names.commands_unhashed)
    return run.rate
