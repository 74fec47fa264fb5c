"""One bench run: its sizes, and its phases in order, side by side on one machine.

1. ceiling: raw aio-pika through a quorum queue, no database;
2. naive baseline: one upsert, one transaction, one ack per message;
3. the peers: a FastStream subscriber (throughput, then its publish-to-commit latency), and
   the same writes upserted straight into Postgres, no queue;
4. (with ``workers`` > 1) the write throughput of that many fresh workers; (with
   ``partitions`` > 1) the write throughput over 1 and over that many commands partitions;
5. the write throughput of one fresh worker, which then stays up for the rest:
6. its publish-to-commit latency at each of ``LATENCY_FRACTIONS`` of the rate it just reached;
7. coalesced writes: one coalescing client firing sets as fast as it can at that worker;
8. reads: the RPC ceiling, the raw round trip, then its ``get`` and ``get_many``;
9. changes: a near-cached ``get``, and commit-to-watcher latency;
10. memory: its peak so far, then a soak of steady mixed load;
11. with a fresh worker of its own: ``get`` beside a saturated write flood.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Final

from worker.bench.baseline import measure_baseline
from worker.bench.ceiling import measure_ceiling
from worker.bench.changes import measure_changes
from worker.bench.coalesced import measure_coalesced
from worker.bench.harness import BenchEnv, bench_env
from worker.bench.memory import soak
from worker.bench.nodes import Management, default_management_url
from worker.bench.partitions import measure_partitions
from worker.bench.peers import measure_direct, measure_faststream
from worker.bench.reads import measure_get_beside_flood, measure_reads
from worker.bench.report import DIRECT, FASTSTREAM, BenchReport, Rate, Variant
from worker.bench.workload import WriteStream, entry_names
from worker.bench.writes import measure_latency, measure_throughput, paced_count
from worker.config import Settings

LATENCY_FRACTIONS: Final = (0.1, 0.25, 0.5)
"""The paced rates of the latency phases, as fractions of the measured maximum."""
FLOOD_MARGIN: Final = 1.5
"""The flood under the reads holds this many times what the fastest worker run applies
during the measurement and a second more (start-up, the warm-up), so that it lasts
through it."""
_WRITES_SEED: Final = 4
"""The worker's write stream; the peers get its first ``peer_writes`` writes (the same
operations on the same entries with the same values, for plugins of their own)."""


@dataclass(frozen=True, slots=True)
class Sizes:
    messages: int = 50_000
    """Messages through the ceiling's queue."""
    writes: int = 50_000
    """Writes pre-filled for each worker throughput run."""
    baseline_writes: int = 10_000
    """Writes for the naive baseline (it is slow: one commit each)."""
    peer_writes: int = 20_000
    """Writes for each peer: the FastStream subscriber and the direct upserts."""
    entries: int = 10_000
    """Distinct entries the writes go to (and the reads read)."""
    workers: int = 1
    """Worker processes of the extra multi-worker throughput run (1: none)."""
    partitions: int = 1
    """Commands partitions of the run that compares 1 and N of them (1: none); its workers
    are ``workers`` processes, at least 2."""
    latency_seconds: float = 10.0
    """How long writes are paced at each rate of the latency phase."""
    read_seconds: float = 5.0
    """How long each read measurement lasts (after a warm-up)."""
    read_concurrency: int = 128
    """Callers of the read throughput measurements."""
    get_many_keys: int = 100
    """Entries per ``get_many``."""
    soak_seconds: float = 180.0
    """How long the steady mixed load of the memory soak lasts."""
    soak_read_concurrency: int = 4
    """Callers reading back to back during the soak."""
    notify_connections: int = 8
    """Connections committing at once in the measurement of ``NOTIFY``'s cost."""


SMALL = Sizes(
    messages=2_000,
    writes=2_000,
    baseline_writes=300,
    peer_writes=300,
    entries=500,
    latency_seconds=1.0,
    read_seconds=0.5,
    read_concurrency=32,
    get_many_keys=100,
    soak_seconds=3.0,
)
"""Every phase at a size that runs in well under a minute; figures are only indicative."""


def sizes_with(base: Sizes, **changes: Any) -> Sizes:
    """``base`` with the flags that were given (``None`` means not given)."""
    return replace(base, **{name: value for name, value in changes.items() if value is not None})


async def run_bench(
    settings: Settings,
    sizes: Sizes,
    bar: Callable[..., Any],
    management_url: str | None = None,
) -> BenchReport:
    """Every phase; ``management_url``: RabbitMQ's management API, for the per-node figures
    of ``--partitions`` (by default port 15672 of the first broker URL's host)."""
    async with bench_env(settings) as env:
        entries = entry_names(sizes.entries)
        ceiling_plugin = await env.add_plugin("ceiling")
        ceiling = WriteStream(ceiling_plugin, sizes.messages, entries, seed=1)
        ceiling_run = await measure_ceiling(env, ceiling.bodies, bar)
        baseline_plugin = await env.add_plugin("baseline")
        naive = WriteStream(baseline_plugin, sizes.baseline_writes, entries, seed=2)
        baseline = await measure_baseline(env, naive.bodies, bar)
        subscribed = WriteStream(
            await env.add_plugin("faststream"), sizes.peer_writes, entries, _WRITES_SEED
        )
        direct = WriteStream(
            await env.add_plugin("direct"), sizes.peer_writes, entries, _WRITES_SEED
        )
        peers = {
            FASTSTREAM: await measure_faststream(
                env, subscribed, LATENCY_FRACTIONS, sizes.latency_seconds, bar
            ),
            DIRECT: await measure_direct(env, direct, bar),
        }

        many = None
        if sizes.workers > 1:
            plugin = await env.add_plugin("writes-many")
            stream = WriteStream(plugin, sizes.writes, entries, seed=3)
            run = await measure_throughput(env, stream, sizes.workers, bar)
            for process in run.workers:
                await env.stop(process)
            many = run.rate
        partitions = None
        if sizes.partitions > 1:
            management = Management(
                management_url or default_management_url(env.amqp_url), env.amqp_url
            )
            partitions = await measure_partitions(
                env, sizes.partitions, sizes.workers, sizes.writes, entries, bar, management
            )

        # 20 % of the writes claim a fresh entry each, with `if_absent` or as plain sets: the
        # ratio is what the conditions cost, not what creating entries does.
        claims = {
            conditional: await _throughput_of(
                env,
                WriteStream(
                    await env.add_plugin(f"writes-claims-{conditional}"),
                    sizes.writes,
                    entries,
                    _WRITES_SEED,
                    conditional_share=0.2,
                    claims_conditional=conditional,
                ),
                bar,
            )
            for conditional in (False, True)
        }
        variants = {
            "conditional": Variant(
                "worker, 20 % conditional writes",
                claims[True],
                "write throughput, 20 % conditional / unconditional",
                ">= 0.9",
                against=Variant("worker, the same writes unconditional", claims[False], "", ""),
            ),
        }
        # The change log's cost from runs on, off, off, on (the last is the plain run below):
        # a drift of the shared machine or of the tables over the four weighs on both sides
        # alike, where one run of each measured mostly the drift.
        log_on = await _throughput_of(
            env,
            WriteStream(await env.add_plugin("writes-log-on"), sizes.writes, entries, _WRITES_SEED),
            bar,
        )
        log_off = [
            await _throughput_of(
                env,
                WriteStream(
                    await env.add_plugin(f"writes-log-off-{n}"), sizes.writes, entries, _WRITES_SEED
                ),
                bar,
                changes="off",
            )
            for n in (1, 2)
        ]

        plugin = await env.add_plugin("writes")
        stream = WriteStream(plugin, sizes.writes, entries, _WRITES_SEED)
        run = await measure_throughput(env, stream, 1, bar)
        variants["changes_off"] = Variant(
            "worker, change log and relay off (2 runs)",
            Rate.pooled(log_off),
            "write throughput, change log on / off",
            ">= 0.9",
            inverted=True,
            against=Variant(
                "worker, change log on (the runs before and after them)",
                Rate.pooled([log_on, run.rate]),
                "",
                "",
            ),
        )
        worker = run.workers[0]
        latency = [
            await measure_latency(
                env,
                worker,
                await env.add_plugin(f"latency-{fraction}"),
                run.rate.per_second * fraction,
                sizes.latency_seconds,
                bar,
            )
            for fraction in LATENCY_FRACTIONS
        ]
        coalesced = await measure_coalesced(
            env, worker, await env.add_plugin("coalesced"), sizes.writes, entries, bar
        )
        reads = await measure_reads(
            env,
            worker,
            plugin,
            entries,
            sizes.read_concurrency,
            sizes.get_many_keys,
            sizes.read_seconds,
            bar,
        )
        changes = await measure_changes(
            env, plugin, entries, sizes.read_seconds, sizes.notify_connections, bar
        )
        memory = await soak(
            env,
            worker,
            run.started_rss,
            plugin,
            entries,
            run.rate.per_second / 2,
            sizes.soak_read_concurrency,
            sizes.soak_seconds,
            bar,
        )
        await env.stop(worker)
        # Last, with a fresh worker (no other may answer the reads), so that what the flood
        # leaves behind (the relay's outbox, dead tuples) disturbs no other phase.
        fastest = max(run.rate.per_second, *(v.rate.per_second for v in variants.values()))
        flood = WriteStream(
            await env.add_plugin("flood"),
            paced_count(fastest * FLOOD_MARGIN, sizes.read_seconds + 1),
            entries,
            seed=7,
        )
        get_beside_flood = await measure_get_beside_flood(env, flood, sizes.read_seconds, bar)
    return BenchReport(
        name=env.settings.prefix,
        sizes=asdict(sizes),
        ceiling_publish=ceiling_run.publish,
        ceiling_consume=ceiling_run.consume,
        ceiling_cpu_per_message=ceiling_run.cpu_per_message,
        baseline=baseline,
        worker_writes=run.rate,
        worker_cpu_per_write=run.cpu_seconds / run.rate.count,
        workers=sizes.workers,
        worker_writes_many=many,
        write_latency=tuple(latency),
        peers=peers,
        reads=reads,
        get_beside_flood=get_beside_flood,
        memory=memory,
        variants=variants,
        changes=changes,
        partitions=partitions,
        coalesced=coalesced,
    )


async def _throughput_of(
    env: BenchEnv, stream: WriteStream, bar: Callable[..., Any], **settings: str
) -> Rate:
    """The write throughput of one fresh worker (with ``settings``) over ``stream``; the
    worker is stopped."""
    run = await measure_throughput(env, stream, 1, bar, **settings)
    for process in run.workers:
        await env.stop(process)
    return run.rate
