"""The worker's Prometheus metrics, in a registry of its own per worker instance.

A registry per instance (not the process-global one) lets tests run several workers in one
process and read each one's counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.writes = Counter(
            "plugin_state_writes",
            "Write commands by outcome: applied, superseded, conflict or rejected",
            ["outcome"],
            registry=self.registry,
        )
        self.rejects = Counter(
            "plugin_state_rejects",
            "Rejected messages by error code",
            ["code"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "plugin_state_batch_size",
            "Write messages per applied batch",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
            registry=self.registry,
        )
        self.transaction_ops = Histogram(
            "plugin_state_transaction_ops",
            "Entry writes per Postgres transaction (bounded by PLUGIN_STATE_TRANSACTION_MAX_OPS)",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
            registry=self.registry,
        )
        self.apply_seconds = Histogram(
            "plugin_state_apply_seconds",
            "Time to apply one batch in Postgres",
            registry=self.registry,
        )
        self.lag_seconds = Histogram(
            "plugin_state_write_lag_seconds",
            "End-to-end lag of applied writes (per batch, its oldest): commit time minus the "
            "write's UUIDv7 time",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        self.connected = Gauge(
            "plugin_state_connected",
            "1 while the worker reaches the service (rabbitmq, postgres)",
            ["service"],
            registry=self.registry,
        )
        self.paused = Gauge(
            "plugin_state_consumer_paused",
            "1 while the write consumer is paused because Postgres is failing",
            registry=self.registry,
        )

        self.rpc_seconds = Histogram(
            "plugin_state_rpc_seconds",
            "Time from receiving a read request to sending its reply, by op",
            ["op"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.rpc_waiting = Gauge(
            "plugin_state_rpc_waiting",
            "Read requests waiting for their `after` write (read-your-writes)",
            registry=self.registry,
        )
        self.rpc_expired = Counter(
            "plugin_state_rpc_expired",
            "Read requests dropped because they expired before they were served",
            registry=self.registry,
        )

        self.expired = Counter(
            "plugin_state_expired",
            "Expired entries whose rows the sweeper turned into tombstones",
            registry=self.registry,
        )

        self.changes_published = Counter(
            "plugin_state_changes_published",
            "Changes the relay published to <prefix>.changes (protocol §8)",
            registry=self.registry,
        )
        self.relay_lag = Histogram(
            "plugin_state_relay_lag_seconds",
            "Time from a change's transaction to the broker's confirm of its publication",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 30, 300),
            registry=self.registry,
        )
        self.log_head = Gauge(
            "plugin_state_change_log_head",
            "The last position the relay published, per plugin (its change log's head, as "
            "far as the feed is concerned)",
            ["plugin_id"],
            registry=self.registry,
        )

    def count_write(self, outcome: str, count: int = 1) -> None:
        self.writes.labels(outcome=outcome).inc(count)

    def count_reject(self, code: str) -> None:
        self.writes.labels(outcome="rejected").inc()
        self.rejects.labels(code=code).inc()

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when never set): for tests and the CLI."""
        sample = self.registry.get_sample_value(name, labels)
        return 0.0 if sample is None else sample
