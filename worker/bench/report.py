"""The figures of one run, the ratios the performance targets name, the table and the JSON.

Targets are shown in parentheses as information: a ratio is a measurement of one run on
one machine, never a verdict, so nothing here passes or fails.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

MB: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` things done in ``seconds``."""

    count: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else math.inf

    def as_json(self) -> dict[str, float]:
        return {"count": self.count, "seconds": self.seconds, "per_second": self.per_second}

    @classmethod
    def pooled(cls, rates: Sequence[Rate]) -> Rate:
        """Several runs as one: all they did over all their time."""
        return cls(sum(r.count for r in rates), sum(r.seconds for r in rates))


QUANTILES: Final = (*(n / 100 for n in range(100)), 0.995, 0.999, 1.0)
"""The fractions every latency keeps the distribution at (0 is the fastest, 1 the slowest)."""


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted ``ordered`` (``fraction`` 0.5 is the median)."""
    if not ordered:
        return math.nan
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


@dataclass(frozen=True, slots=True)
class Latency:
    """Percentiles of a latency sample, in milliseconds."""

    p50_ms: float
    p99_ms: float
    count: int
    quantiles_ms: tuple[float, ...] = ()
    """The sample's distribution: its value at each of ``QUANTILES`` (none when empty), so
    that a chart can draw it without the raw sample."""

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        ordered = sorted(seconds)
        return cls(
            percentile(ordered, 0.5) * 1000,
            percentile(ordered, 0.99) * 1000,
            len(ordered),
            tuple(percentile(ordered, q) * 1000 for q in QUANTILES) if ordered else (),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "count": self.count,
            "quantiles_ms": list(self.quantiles_ms),
        }


PUBLISHER_KEPT_PACE: Final = 0.95
"""A latency phase whose publisher reached less than this share of its pace measured the
publisher, and says so."""


@dataclass(frozen=True, slots=True)
class WriteLatency:
    """Publish-to-commit latency of writes paced at one rate."""

    rate: float
    """Writes per second published (a fraction of the measured maximum)."""
    latency: Latency
    """Publish-to-commit, per write."""
    drain_seconds: float
    """From the last publish to the last commit: about one batch when the consumer kept up
    with the pace, the backlog it accumulated when it did not."""
    published_rate: float
    """Writes per second the bench's publisher actually reached; below ``rate`` the
    publisher, not the worker, was the limit."""

    @property
    def publisher_limited(self) -> bool:
        return self.published_rate < PUBLISHER_KEPT_PACE * self.rate

    def as_json(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            **self.latency.as_json(),
            "drain_seconds": self.drain_seconds,
            "published_rate": self.published_rate,
            "publisher_limited": self.publisher_limited,
        }


@dataclass(frozen=True, slots=True)
class ReadFigures:
    """One RPC server under the client loop: latency alone, throughput under load."""

    latency: Latency
    """At concurrency 1."""
    throughput: Rate
    """Calls answered at the high concurrency."""
    errors: int
    """Calls that timed out or were answered with an error reply."""
    cpu_per_call: float
    """CPU seconds the server process used per call during the throughput run: what a
    call costs the server, whatever else the machine was busy with."""

    def as_json(self) -> dict[str, Any]:
        return {
            "latency": self.latency.as_json(),
            "throughput": self.throughput.as_json(),
            "errors": self.errors,
            "cpu_per_call": self.cpu_per_call,
        }


@dataclass(frozen=True, slots=True)
class FloodReads:
    """The worker's ``get`` at concurrency 1 while its write path is saturated by a
    pre-filled commands queue."""

    latency: Latency
    flood_writes: int
    """Writes pre-filled before the worker started."""
    backlog_left: int
    """Writes still ready in the queue when the last call was answered: 0 means the flood
    ran out during the measurement, and the write path was not saturated throughout."""
    errors: int

    @property
    def saturated(self) -> bool:
        return self.backlog_left > 0

    def as_json(self) -> dict[str, Any]:
        return {
            "latency": self.latency.as_json(),
            "flood_writes": self.flood_writes,
            "backlog_left": self.backlog_left,
            "saturated": self.saturated,
            "errors": self.errors,
        }


@dataclass(frozen=True, slots=True)
class MemoryFigures:
    """The worker's resident memory (bytes) from /proc/<pid>/status, summed over its
    processes (a supervisor and the two under it, ``worker.supervisor``)."""

    started_rss: int
    """Right after start-up, when the first deliveries arrived."""
    peak_rss: int
    """VmHWM after the write and read phases at full load (and the soak): the sum of each
    process's, which bounds the worker's peak from above."""
    soak_start_rss: int
    """Median of the soak's first fifth of samples."""
    soak_end_rss: int
    """Median of the soak's last fifth of samples."""
    soak_seconds: float
    soak_writes: int
    soak_reads: Latency
    """The reads made back to back during the soak, beside the writes."""
    rss_samples: tuple[tuple[float, int], ...]
    """``VmRSS`` through the soak: (seconds since it began, bytes)."""
    peaks: tuple[tuple[str, int], ...] = ()
    """Each process's VmHWM at the end, by name (``supervisor``, ``writes+relay``,
    ``reads``)."""

    @property
    def drift(self) -> int:
        return self.soak_end_rss - self.soak_start_rss

    @property
    def flat(self) -> bool:
        """Within 5 % (and at least 5 MB) of where the soak started: no visible growth."""
        return abs(self.drift) <= max(5 * MB, self.soak_start_rss // 20)

    def as_json(self) -> dict[str, Any]:
        return {
            "started_rss": self.started_rss,
            "peak_rss": self.peak_rss,
            "soak_start_rss": self.soak_start_rss,
            "soak_end_rss": self.soak_end_rss,
            "soak_seconds": self.soak_seconds,
            "soak_writes": self.soak_writes,
            "soak_reads": self.soak_reads.as_json(),
            "rss_samples": [list(sample) for sample in self.rss_samples],
            "peaks": dict(self.peaks),
            "drift": self.drift,
            "flat": self.flat,
        }


@dataclass(frozen=True, slots=True)
class PeerFigures:
    """What a user would run instead of the worker, over a write stream like the worker's."""

    title: str
    """Its name in the table and the charts, with its settings."""
    settings: dict[str, Any]
    writes: Rate
    cpu_per_write: float
    """CPU seconds per write of the process that applied them (Postgres' own not counted)."""
    write_latency: tuple[WriteLatency, ...] = ()
    """Publish-to-commit at paced rates, the lowest first (a peer behind a queue)."""
    statement_latency: Latency | None = None
    """Each statement's round trip under the full load (a peer without a queue)."""

    def as_json(self) -> dict[str, Any]:
        statement = self.statement_latency
        return {
            "title": self.title,
            "settings": self.settings,
            "writes": self.writes.as_json(),
            "cpu_per_write": self.cpu_per_write,
            "write_latency": [point.as_json() for point in self.write_latency],
            "statement_latency": None if statement is None else statement.as_json(),
        }


# The peers, by the key the report uses for them, with the ratio of the worker's write
# throughput to theirs and its target.
FASTSTREAM: Final = "faststream"
DIRECT: Final = "direct"

_PEER_RATIOS: Final = {
    FASTSTREAM: ("write throughput / FastStream subscriber", ">= 3"),
    DIRECT: ("write throughput / direct upserts", ">= 1"),
}

# The read servers, by the key the report uses for them.
RPC_CEILING: Final = "rpc_ceiling"
RAW_SELECT: Final = "raw_select"
WORKER_GET: Final = "worker_get"
WORKER_GET_MANY: Final = "worker_get_many"

_READ_TITLES: Final = {
    RPC_CEILING: "RPC ceiling (constant reply, no database)",
    RAW_SELECT: "raw RPC round trip (one indexed SELECT)",
    WORKER_GET: "worker get",
    WORKER_GET_MANY: "worker get_many",
}


@dataclass(frozen=True, slots=True)
class ChangeFigures:
    """The change log's figures (``worker.bench.changes``)."""

    cached_get: Latency
    """A ``get`` answered by the near cache."""
    cache_hit_rate: float
    watch: Latency
    """From a change's transaction to a watcher's receiving it."""
    commits_plain: Rate
    """Small write transactions of several connections, back to back (``notify.py``)."""
    commits_notifying: Rate
    """The same, each also calling ``pg_notify``."""

    def as_json(self) -> dict[str, Any]:
        return {
            "cached_get": self.cached_get.as_json(),
            "cache_hit_rate": self.cache_hit_rate,
            "watch": self.watch.as_json(),
            "commits_plain": self.commits_plain.as_json(),
            "commits_notifying": self.commits_notifying.as_json(),
        }


@dataclass(frozen=True, slots=True)
class Ratio:
    name: str
    value: float
    target: str
    detail: str


@dataclass(frozen=True, slots=True)
class Variant:
    """The worker's write throughput over a variant of the workload or of its settings,
    measured in the same run as the plain one and compared with it."""

    title: str
    rate: Rate
    ratio: str
    """The ratio's name: this throughput over the plain one (``inverted``: the plain one
    over this, for a variant that turns something off)."""
    target: str
    inverted: bool = False
    against: Variant | None = None
    """The run it is compared with, when not the plain one: the same workload but for the
    one thing the ratio measures."""

    def as_json(self) -> dict[str, Any]:
        against = None if self.against is None else self.against.as_json()
        return {"title": self.title, **self.rate.as_json(), "target": self.target} | (
            {} if against is None else {"against": against}
        )


@dataclass(frozen=True, slots=True)
class NodeShare:
    """One node's part in one write run."""

    node: str
    led: tuple[str, ...]
    """The run's commands queues this node led."""
    writes: int
    """The run's writes routed to those queues."""
    per_second: float
    worker_connections: int
    memory_bytes: int

    def as_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "led": list(self.led),
            "writes": self.writes,
            "per_second": self.per_second,
            "worker_connections": self.worker_connections,
            "memory_bytes": self.memory_bytes,
        }


@dataclass(frozen=True, slots=True)
class PartitionFigures:
    """Write throughput of the same workers over 1 and over N commands partitions."""

    partitions: int
    processes: int
    single: Rate
    partitioned: Rate | None
    skipped: str | None = None
    """Why the partitioned run did not happen."""
    single_nodes: list[NodeShare] = field(default_factory=list)
    """The cluster's per-node figures of each run (``worker.bench.nodes``)."""
    partitioned_nodes: list[NodeShare] = field(default_factory=list)
    nodes_skipped: str | None = None
    """Why there are no per-node figures."""

    def as_json(self) -> dict[str, Any]:
        return {
            "partitions": self.partitions,
            "processes": self.processes,
            "single": self.single.as_json(),
            "partitioned": None if self.partitioned is None else self.partitioned.as_json(),
            "skipped": self.skipped,
            "single_nodes": [share.as_json() for share in self.single_nodes],
            "partitioned_nodes": [share.as_json() for share in self.partitioned_nodes],
            "nodes_skipped": self.nodes_skipped,
        }


@dataclass(frozen=True, slots=True)
class Throughput:
    """One write throughput of the run, as the throughput chart shows it."""

    label: str
    rate: Rate
    kind: str
    """``ceiling``, ``alternative`` (what one could run instead, the naive consumer included)
    or ``worker``."""


@dataclass(frozen=True, slots=True)
class LatencyCurve:
    """One consumer's publish-to-commit latency at the paced rates it was measured at."""

    label: str
    maximum: Rate
    """The throughput the paced rates are fractions of."""
    points: tuple[WriteLatency, ...]


@dataclass(frozen=True, slots=True)
class BenchReport:
    name: str
    """The run's database and topology prefix (both removed when it ended)."""
    sizes: dict[str, Any]
    ceiling_publish: Rate
    ceiling_consume: Rate
    ceiling_cpu_per_message: float
    """CPU seconds of the ceiling's consumer per message."""
    baseline: Rate
    worker_writes: Rate
    worker_cpu_per_write: float
    """CPU seconds of the worker process per write in the throughput run."""
    workers: int
    """Processes of the optional multi-worker run (1: not run)."""
    worker_writes_many: Rate | None
    write_latency: tuple[WriteLatency, ...]
    """Publish-to-commit through the worker at one or more paced rates, the lowest first."""
    peers: dict[str, PeerFigures]
    reads: dict[str, ReadFigures]
    get_beside_flood: FloodReads
    memory: MemoryFigures
    variants: dict[str, Variant]
    changes: ChangeFigures
    coalesced: Rate | None = None
    """Fire-and-forget sets from one coalescing client, first call to last commit."""
    partitions: PartitionFigures | None = None
    """With ``--partitions N``: 1 and N partitions side by side."""

    # What the charts of ``--plot`` draw: a phase shows in a chart by being listed here.

    def throughputs(self) -> list[Throughput]:
        """Every write throughput, in the table's order."""
        rates = [
            Throughput("ceiling: publish (confirms)", self.ceiling_publish, "ceiling"),
            Throughput("ceiling: consume (ack multiple)", self.ceiling_consume, "ceiling"),
            Throughput("naive baseline", self.baseline, "alternative"),
            *(Throughput(peer.title, peer.writes, "alternative") for peer in self.peers.values()),
            Throughput("worker, 1 process", self.worker_writes, "worker"),
        ]
        if self.worker_writes_many is not None:
            rates.append(
                Throughput(f"worker, {self.workers} processes", self.worker_writes_many, "worker")
            )
        for variant in self.variants.values():
            if variant.against is not None:
                rates.append(Throughput(variant.against.title, variant.against.rate, "worker"))
            rates.append(Throughput(variant.title, variant.rate, "worker"))
        if self.coalesced is not None:
            rates.append(Throughput("coalesced writes from one client", self.coalesced, "worker"))
        return rates

    def latency_curves(self) -> list[LatencyCurve]:
        """Publish-to-commit against offered load, for everything measured that way."""
        return [
            LatencyCurve("worker, 1 process", self.worker_writes, self.write_latency),
            *(
                LatencyCurve(peer.title, peer.writes, peer.write_latency)
                for peer in self.peers.values()
                if peer.write_latency
            ),
        ]

    def get_distributions(self) -> dict[str, Latency]:
        """Distributions of ``get`` latency: the worker's idle, its reference, and beside
        writes."""
        return {
            "worker get, idle (one caller)": self.reads[WORKER_GET].latency,
            "raw RPC round trip (one indexed SELECT), idle": self.reads[RAW_SELECT].latency,
            "worker get beside a saturated write flood (one caller)": (
                self.get_beside_flood.latency
            ),
            (
                f"worker get during the soak ({self.sizes['soak_read_concurrency']} callers, "
                "beside writes at half the maximum)"
            ): self.memory.soak_reads,
        }

    def ratios(self) -> list[Ratio]:
        get = self.reads[WORKER_GET]
        raw = self.reads[RAW_SELECT]
        ceiling = self.reads[RPC_CEILING]
        memory = self.memory
        return [
            Ratio(
                "write throughput / ceiling",
                self.worker_writes.per_second / self.ceiling_consume.per_second,
                ">= 0.8",
                f"{self.worker_writes.per_second:,.0f} / {self.ceiling_consume.per_second:,.0f}",
            ),
            *(
                []
                if self.coalesced is None
                else [
                    Ratio(
                        "coalesced writes from one client / ceiling",
                        self.coalesced.per_second / self.ceiling_consume.per_second,
                        ">= 2.5",
                        f"{self.coalesced.per_second:,.0f} / "
                        f"{self.ceiling_consume.per_second:,.0f}",
                    )
                ]
            ),
            Ratio(
                "write throughput / naive baseline",
                self.worker_writes.per_second / self.baseline.per_second,
                ">= 3",
                f"{self.worker_writes.per_second:,.0f} / {self.baseline.per_second:,.0f}",
            ),
            *(
                Ratio(
                    name,
                    self.worker_writes.per_second / self.peers[key].writes.per_second,
                    target,
                    f"{self.worker_writes.per_second:,.0f} / "
                    f"{self.peers[key].writes.per_second:,.0f}",
                )
                for key, (name, target) in _PEER_RATIOS.items()
            ),
            *(_variant_ratio(variant, self.worker_writes) for variant in self.variants.values()),
            Ratio(
                "cached get p50 / get p50",
                self.changes.cached_get.p50_ms / get.latency.p50_ms,
                "<= 0.02",
                f"{self.changes.cached_get.p50_ms * 1000:.1f} us / {get.latency.p50_ms:.2f} ms, "
                f"hit rate {self.changes.cache_hit_rate:.1%}",
            ),
            Ratio(
                "commit-to-watcher p50 / get p50",
                self.changes.watch.p50_ms / get.latency.p50_ms,
                "<= 2",
                f"{self.changes.watch.p50_ms:.2f} ms / {get.latency.p50_ms:.2f} ms",
            ),
            Ratio(
                "commits with NOTIFY / without",
                self.changes.commits_notifying.per_second / self.changes.commits_plain.per_second,
                "what NOTIFY would cost",
                f"{self.changes.commits_notifying.per_second:,.0f} / "
                f"{self.changes.commits_plain.per_second:,.0f} commits/s, "
                f"{self.sizes['notify_connections']} connections",
            ),
            Ratio(
                "get p50 / raw RPC round trip p50",
                get.latency.p50_ms / raw.latency.p50_ms,
                "<= 1.3",
                f"{get.latency.p50_ms:.2f} ms / {raw.latency.p50_ms:.2f} ms",
            ),
            Ratio(
                "get p99 beside a write flood / idle get p99",
                self.get_beside_flood.latency.p99_ms / get.latency.p99_ms,
                "<= 5",
                f"{self.get_beside_flood.latency.p99_ms:.2f} ms / {get.latency.p99_ms:.2f} ms"
                + ("" if self.get_beside_flood.saturated else ", the flood ran out: not saturated"),
            ),
            Ratio(
                "get throughput / RPC ceiling",
                get.throughput.per_second / ceiling.throughput.per_second,
                ">= 0.9",
                f"{get.throughput.per_second:,.0f} / {ceiling.throughput.per_second:,.0f}",
            ),
            Ratio(
                "peak RSS (MB)",
                memory.peak_rss / MB,
                "<= 200",
                f"VmHWM summed over the worker's {len(memory.peaks) or 1} processes after full "
                "write and read load and the soak",
            ),
            Ratio(
                "soak RSS drift (MB)",
                memory.drift / MB,
                "flat",
                f"{memory.soak_start_rss / MB:.1f} -> {memory.soak_end_rss / MB:.1f} MB over "
                f"{memory.soak_seconds:.0f} s: {'flat' if memory.flat else 'GREW'}",
            ),
        ]

    def table(self) -> str:
        concurrency = self.sizes["read_concurrency"]
        rows: list[tuple[str, str, str]] = [
            ("WRITES", "", ""),
            ("ceiling: publish (confirms)", _rate(self.ceiling_publish), "msg/s"),
            ("ceiling: consume (ack multiple)", _rate(self.ceiling_consume), "msg/s"),
            ("ceiling: consumer CPU per message", _micros(self.ceiling_cpu_per_message), "us"),
            ("naive baseline", _rate(self.baseline), "writes/s"),
        ]
        for peer in self.peers.values():
            rows += [
                (peer.title, _rate(peer.writes), "writes/s"),
                ("  CPU per write", _micros(peer.cpu_per_write), "us"),
            ]
            if peer.statement_latency is not None:
                latency = peer.statement_latency
                rows.append(
                    (
                        "  per-statement round trip",
                        f"p50 {latency.p50_ms:.2f}  p99 {latency.p99_ms:.2f}",
                        "ms",
                    )
                )
            rows += _latency_rows("  ", peer.write_latency, peer.writes)
        rows += [
            ("worker, 1 process", _rate(self.worker_writes), "writes/s"),
            ("worker CPU per write", _micros(self.worker_cpu_per_write), "us"),
        ]
        if self.worker_writes_many is not None:
            rows.append(
                (f"worker, {self.workers} processes", _rate(self.worker_writes_many), "writes/s")
            )
        for variant in self.variants.values():
            if variant.against is not None:
                rows.append((variant.against.title, _rate(variant.against.rate), "writes/s"))
            rows.append((variant.title, _rate(variant.rate), "writes/s"))
        if self.coalesced is not None:
            rows.append(("coalesced writes from one client", _rate(self.coalesced), "writes/s"))
        rows += _partition_rows(self.partitions)
        rows += _latency_rows("", self.write_latency, self.worker_writes)
        rows.append(("READS", "", ""))
        for key, name in _READ_TITLES.items():
            figures = self.reads[key]
            title = f"{name} of {self.sizes['get_many_keys']}" if key == WORKER_GET_MANY else name
            rows.append(
                (
                    f"{title}: c=1",
                    f"p50 {figures.latency.p50_ms:.2f}  p99 {figures.latency.p99_ms:.2f}",
                    "ms",
                )
            )
            errors = f" ({figures.errors} errors)" if figures.errors else ""
            rows.append(
                (f"{title}: c={concurrency}", _rate(figures.throughput) + errors, "calls/s")
            )
            rows.append(
                (
                    f"{title}: server CPU per call",
                    _micros(figures.cpu_per_call),
                    "us",
                )
            )
        flood = self.get_beside_flood
        ran_out = "" if flood.saturated else " (the flood ran out)"
        errors = f" ({flood.errors} errors)" if flood.errors else ""
        rows.append(
            (
                f"worker get beside a saturated write flood: c=1{ran_out}{errors}",
                f"p50 {flood.latency.p50_ms:.2f}  p99 {flood.latency.p99_ms:.2f}",
                "ms",
            )
        )
        changes = self.changes
        rows += [
            ("CHANGES", "", ""),
            (
                f"cached get (hit rate {changes.cache_hit_rate:.1%})",
                f"p50 {changes.cached_get.p50_ms * 1000:.1f}  p99 "
                f"{changes.cached_get.p99_ms * 1000:.1f}",
                "us",
            ),
            (
                "commit to watcher",
                f"p50 {changes.watch.p50_ms:.2f}  p99 {changes.watch.p99_ms:.2f}",
                "ms",
            ),
            ("small commits, plain", _rate(changes.commits_plain), "commits/s"),
            ("small commits, each with pg_notify", _rate(changes.commits_notifying), "commits/s"),
        ]
        memory = self.memory
        rows += [
            ("MEMORY (worker RSS)", "", ""),
            ("at the first deliveries", f"{memory.started_rss / MB:.1f}", "MB"),
            ("peak (VmHWM, summed over its processes)", f"{memory.peak_rss / MB:.1f}", "MB"),
            *((f"  peak of {name}", f"{peak / MB:.1f}", "MB") for name, peak in memory.peaks),
            (
                f"soak {memory.soak_seconds:.0f} s: start -> end",
                f"{memory.soak_start_rss / MB:.1f} -> {memory.soak_end_rss / MB:.1f}",
                "MB",
            ),
            (
                f"soak: {memory.soak_writes:,} writes, get p50/p99 beside them",
                f"p50 {memory.soak_reads.p50_ms:.1f}  p99 {memory.soak_reads.p99_ms:.1f}",
                "ms",
            ),
        ]
        width = max(len(name) for name, _, _ in rows) + 2
        lines = [
            f"{name}" if not value else f"  {name.ljust(width)}{value.rjust(22)}  {unit}"
            for name, value, unit in rows
        ]
        lines += ["RATIOS (target in parentheses, information only)"]
        for ratio in self.ratios():
            lines.append(
                f"  {ratio.name.ljust(width)}{ratio.value:>22.2f}  ({ratio.target})  {ratio.detail}"
            )
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sizes": self.sizes,
            "ceiling": {
                "publish": self.ceiling_publish.as_json(),
                "consume": self.ceiling_consume.as_json(),
                "cpu_per_message": self.ceiling_cpu_per_message,
            },
            "baseline": self.baseline.as_json(),
            "worker_writes": {
                **self.worker_writes.as_json(),
                "cpu_per_write": self.worker_cpu_per_write,
            },
            "workers": self.workers,
            "worker_writes_many": (
                None if self.worker_writes_many is None else self.worker_writes_many.as_json()
            ),
            "write_latency": [point.as_json() for point in self.write_latency],
            "peers": {key: peer.as_json() for key, peer in self.peers.items()},
            "reads": {key: figures.as_json() for key, figures in self.reads.items()},
            "get_beside_flood": self.get_beside_flood.as_json(),
            "memory": self.memory.as_json(),
            "variants": {key: variant.as_json() for key, variant in self.variants.items()},
            "changes": self.changes.as_json(),
            "coalesced": None if self.coalesced is None else self.coalesced.as_json(),
            "partitions": None if self.partitions is None else self.partitions.as_json(),
            "ratios": {
                ratio.name: {"value": ratio.value, "target": ratio.target}
                for ratio in self.ratios()
            },
            "quantiles": list(QUANTILES),
        }


def _latency_rows(
    title: str, points: Sequence[WriteLatency], maximum: Rate
) -> list[tuple[str, str, str]]:
    """Two rows per paced rate, their names after ``title``: its publish-to-commit
    percentiles, and how far behind it left the consumer."""
    rows = []
    for point in points:
        latency = point.latency
        share = point.rate / maximum.per_second
        rows += [
            (
                f"{title}publish-to-commit at {point.rate:,.0f}/s ({share:.0%} of max)",
                f"p50 {latency.p50_ms:.1f}  p99 {latency.p99_ms:.1f}",
                "ms",
            ),
            (f"{title}  last publish to last commit", f"{point.drain_seconds * 1000:.1f}", "ms"),
        ]
        if point.publisher_limited:
            rows.append(
                (
                    f"{title}  the bench's publisher was the limit: it reached only",
                    f"{point.published_rate:,.0f}",
                    "writes/s",
                )
            )
    return rows


def _variant_ratio(variant: Variant, plain: Rate) -> Ratio:
    if variant.against is not None:
        plain = variant.against.rate
    if variant.inverted:
        return Ratio(
            variant.ratio,
            plain.per_second / variant.rate.per_second,
            variant.target,
            f"{plain.per_second:,.0f} / {variant.rate.per_second:,.0f}",
        )
    return Ratio(
        variant.ratio,
        variant.rate.per_second / plain.per_second,
        variant.target,
        f"{variant.rate.per_second:,.0f} / {plain.per_second:,.0f}",
    )


def _rate(rate: Rate) -> str:
    return f"{rate.per_second:,.0f}"


def _micros(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f}"


def _partition_rows(figures: PartitionFigures | None) -> list[tuple[str, str, str]]:
    if figures is None:
        return []
    workers = f"worker, {figures.processes} processes"
    rows = [(f"{workers}, 1 commands queue", _rate(figures.single), "writes/s")]
    rows += _node_rows(figures.single_nodes)
    title = f"{workers}, {figures.partitions} partitions"
    if figures.partitioned is None:
        rows.append((title, f"skipped: {figures.skipped}", ""))
    else:
        rows.append((title, _rate(figures.partitioned), "writes/s"))
        rows += _node_rows(figures.partitioned_nodes)
    if figures.nodes_skipped is not None:
        rows.append(("  per-node figures", f"none: {figures.nodes_skipped}", ""))
    return rows


def _queue_label(name: str) -> str:
    """``<prefix>.commands`` or ``<prefix>.commands.<n>``: the commands queue, partition n."""
    partition = name.rpartition(".commands")[2].lstrip(".")
    return f"partition {partition}" if partition else "the commands queue"


def _node_rows(shares: list[NodeShare]) -> list[tuple[str, str, str]]:
    """A node's share of a run: the queues it led, and the writes that went through them."""
    total = sum(share.writes for share in shares) or 1
    rows = []
    for share in shares:
        led = ", ".join(_queue_label(name) for name in share.led)
        rows.append(
            (
                f"  {share.node}: leads {led or 'none'}; {share.worker_connections} worker "
                f"connections, {share.memory_bytes / 1e6:,.0f} MB",
                f"{share.writes:,} ({share.writes / total:.0%}) {share.per_second:,.0f}",
                "writes/s",
            )
        )
    return rows
