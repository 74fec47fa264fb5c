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

Each run also gets the cluster's per-node figures (``worker.bench.nodes``), taken from the
management API while its workers are still connected; without the API the report says why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from worker.bench.harness import BenchEnv
from worker.bench.nodes import Management, ManagementUnavailable
from worker.bench.report import NodeShare, PartitionFigures, Rate
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
    management: Management,
) -> PartitionFigures:
    processes = max(2, processes)
    nodes_skipped = None
    try:
        await management.check()
    except ManagementUnavailable as exc:
        nodes_skipped = str(exc)
    usable = None if nodes_skipped else management
    single, single_nodes = await _throughput(env, writes, entries, processes, 1, bar, usable)
    if not await consistent_hash_available(env.amqp_url):
        return PartitionFigures(
            partitions,
            processes,
            single,
            None,
            "the broker has no consistent-hash exchange (rabbitmq_consistent_hash_exchange)",
            single_nodes=single_nodes,
            nodes_skipped=nodes_skipped,
        )
    partitioned, partitioned_nodes = await _throughput(
        env, writes, entries, processes, partitions, bar, usable
    )
    return PartitionFigures(
        partitions,
        processes,
        single,
        partitioned,
        single_nodes=single_nodes,
        partitioned_nodes=partitioned_nodes,
        nodes_skipped=nodes_skipped,
    )


async def _throughput(
    env: BenchEnv,
    writes: int,
    entries: list[EntryName],
    processes: int,
    partitions: int,
    bar: Callable[..., Any],
    management: Management | None,
) -> tuple[Rate, list[NodeShare]]:
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
        shares = (
            []
            if management is None
            else await management.shares(run.depths, run.rate.seconds, processes)
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
    return run.rate, shares
