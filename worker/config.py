"""Every setting of the worker: its default, its environment variable, its validation.

Settings are built once at start-up (``Settings.from_env``) and passed down; nothing else
reads the environment. Defaults point at RabbitMQ and Postgres on localhost, so the worker
runs with no configuration at all on a machine that runs both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from typing import Any, Final
from urllib.parse import urlsplit

from schemas import brokers, rules
from schemas.topology import (
    DEFAULT_AMQP_URL,
    DEFAULT_PREFIX,
    QUORUM_GROUP_SIZE,
    RPC_QUEUE_TYPE,
    RPC_QUEUE_TYPES,
)

ENV_PREFIX: Final = "PLUGIN_STATE_"
MAX_COMMAND_PARTITIONS: Final = 64
DEFAULT_HTTP_PORT: Final = 9108
"""Where a worker serves HTTP when PLUGIN_STATE_HTTP_PORT is unset, if no other process of
the host has it (then the next free one of ``HTTP_PORT_TRIES``)."""
HTTP_PORT_TRIES: Final = 16
ROLES: Final = ("writes", "reads", "relay")
"""What a worker may do, in the order names list them."""
PROCESSES: Final = ("split", "single")


class ConfigError(ValueError):
    """A setting has a value the worker cannot run with."""


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


@dataclass(frozen=True, slots=True)
class Settings:
    """The worker's configuration. Field docs double as the README's configuration table."""

    database_url: str = "postgresql://postgres@localhost:5432/plugin_state"
    """Postgres to store state in; `migrate` creates the database if it is missing."""
    amqp_url: str = DEFAULT_AMQP_URL
    """RabbitMQ to consume from: one URL, or the nodes of a cluster, comma-separated (the
    worker connects to any live one, and moves to another when its node goes down)."""
    prefix: str = DEFAULT_PREFIX
    """Shared prefix of every exchange and queue name."""
    trusted_users: frozenset[str] = field(default_factory=frozenset)
    """RabbitMQ users that may act for every plugin (comma-separated)."""
    auth_mode: str = "strict"
    """`strict`: every message must carry a user_id; `permissive`: one without is allowed."""
    plugin_cache_seconds: float = 5.0
    """How long a worker trusts what it read of a plugin's registration (its amqp_user)."""
    quota_entries: int = 0
    """Most entries per plugin; 0 means no quota."""
    quota_bytes: int = 0
    """Most bytes of values' JSON text per plugin; 0 means no quota."""
    quota_tombstones: int = 0
    """Most tombstones (deleted or expired entries remembered for the retention) per plugin;
    0 means no quota."""

    changes: bool = True
    """The change log and its feed (protocol §8): positions for every change, `changes`
    reads, and the relay publishing every change to `<prefix>.changes`. Off for deployments
    that need neither: writes then cost a little less, and `changes` is refused."""

    roles: frozenset[str] = frozenset({"writes", "reads", "relay"})
    """What this worker does: `writes` (the commands queue), `reads` (the rpc queue), `relay`
    (publishes the change feed, one worker at a time), any of them."""
    processes: str = "split"
    """`split`: a worker that reads and also writes or relays serves reads from a process of
    its own, beside one for the rest, under one supervising `run` (worker.supervisor), so a
    busy write path cannot hold up reads; `single`: every role in one process."""

    batch_size: int = 500
    """Most write messages applied in one transaction."""
    batch_wait_ms: int = 20
    """Longest wait for a batch to fill once its first message arrived."""
    apply_concurrency: int = 3
    """Batches applied at once, each on its own Postgres connection (acked in order)."""
    prefetch: int = 0
    """Unacked write deliveries held per worker; 0 means one batch more than are applied at
    once (so that the next batch fills while the others are applied)."""
    rpc_prefetch: int = 256
    """Unanswered read requests held per worker."""
    value_max_bytes: int = rules.VALUE_MAX_BYTES
    """Largest value, measured as its JSON encoding."""
    value_max_depth: int = rules.VALUE_MAX_DEPTH
    """Deepest nesting of arrays and objects in a value; deeper is `invalid_request`."""
    max_reply_bytes: int = 8 * 1024 * 1024
    """Largest reply body: `list` pages end early to stay under it, a larger `get_many` is
    answered `reply_too_large`. Below the broker's largest message, above twice the largest
    value (jsonb renders a value's text up to half again as long as it was sent)."""
    transaction_max_ops: int = 5000
    """Most entry writes applied in one Postgres transaction (a batch of messages is split
    into several transactions past it; one message is never split)."""
    transaction_max_bytes: int = 16 * 1024 * 1024
    """Most bytes of values applied in one Postgres transaction, likewise."""
    held_max_bytes: int = 64 * 1024 * 1024
    """Bytes of message bodies a worker holds unsettled per queue before it stops taking
    more (RabbitMQ's prefetch counts messages only)."""
    max_waiting_reads: int = 64
    """Reads of one plugin that may wait for their `after` write at once in one worker;
    past it a read is answered `write_pending` at once."""
    max_followers: int = 256
    """`changes` reads of one plugin that may wait for a change at once in one worker
    (watchers, near caches); past it one is answered at once, with what there is."""
    retention_seconds: int = 7 * 24 * 3600
    """How long tombstones are kept; older writes are rejected as `stale`."""
    future_skew_seconds: int = 300
    """How far in the future of the worker's clock a write's UUIDv7 time may lie."""
    retention_interval_seconds: int = 600
    """How often one worker removes tombstones past the retention."""
    expiry_interval_seconds: float = 1.0
    """How often one worker removes expired entries' rows (an expired entry reads as missing
    at once; its row becomes a tombstone within about this long)."""
    delivery_limit: int = 50
    """Deliveries of one command before RabbitMQ dead-letters it (crash-loop guard)."""
    commands_max_length: int = 1_000_000
    """Length limit of the commands queue; past it publishers' confirms are nacked."""
    command_partitions: int = 1
    """Commands queues behind the exchange: 1 is the single `<prefix>.commands`; N spreads
    writes over the quorum queues `<prefix>.commands.0` … `.N-1` by a hash of their
    `message_id` (needs the `rabbitmq_consistent_hash_exchange` plugin). The same in every
    worker; workers also drain the partitions of a former, larger N."""
    quorum_group_size: int = QUORUM_GROUP_SIZE
    """Replicas of each quorum queue (commands, partitions, dead letters, a quorum rpc
    queue) when it is created: 3 suits a three-node cluster; on fewer nodes, one per node."""
    rpc_queue_type: str = RPC_QUEUE_TYPE
    """`classic`: the read path's queue `<prefix>.rpc` lives on one node; `quorum`:
    `<prefix>.rpc.quorum`, replicated, answers reads through the loss of a node at some
    latency (docs/cluster.md)."""
    db_pool_size: int = 6
    """Postgres connections per worker."""
    db_command_timeout_seconds: float = 30.0
    """Longest a Postgres statement may take before the batch is retried."""
    db_statement_cache: int = 100
    """Prepared statements kept per Postgres connection. 0 behind a pooler in transaction
    mode (PgBouncer `pool_mode = transaction` before 1.21), where a statement prepared in
    one transaction is gone in the next (docs/scaling.md)."""
    retry_initial_seconds: float = 0.2
    """First back-off after a Postgres or broker failure."""
    retry_max_seconds: float = 10.0
    """Longest back-off between retries."""
    drain_timeout_seconds: float = 30.0
    """On SIGTERM, how long to finish held work before giving up (it is redelivered)."""
    http_host: str = "0.0.0.0"
    """Address of the HTTP server for /metrics, /healthz and /readyz (all interfaces, for
    probes and scrapers from outside the container)."""
    http_port: int | None = None
    """Port of that HTTP server; 0 picks a free port. Unset, 9108, or when another process
    of the host has it (several workers on one machine) the next free one, logged."""
    log_format: str = "text"
    """`text` for people, `json` for one JSON object per line."""
    log_level: str = "info"
    """debug, info, warning or error."""

    @property
    def effective_prefetch(self) -> int:
        return self.prefetch or (self.apply_concurrency + 1) * self.batch_size

    @property
    def amqp_urls(self) -> tuple[str, ...]:
        """The broker's addresses, each a URL of its own (``schemas.brokers``)."""
        return brokers.split_urls(self.amqp_url)

    @property
    def retention(self) -> timedelta:
        return timedelta(seconds=self.retention_seconds)

    @property
    def future_skew(self) -> timedelta:
        return timedelta(seconds=self.future_skew_seconds)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``PLUGIN_STATE_*`` variables, then apply non-None ``overrides`` (flags)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(_env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def with_changes(self, **changes: Any) -> Settings:
        settings = replace(self, **changes)
        settings.validate()
        return settings

    def validate(self) -> None:
        positive = (
            "batch_size",
            "apply_concurrency",
            "rpc_prefetch",
            "value_max_bytes",
            "value_max_depth",
            "max_reply_bytes",
            "transaction_max_ops",
            "transaction_max_bytes",
            "held_max_bytes",
            "max_waiting_reads",
            "max_followers",
            "retention_seconds",
            "retention_interval_seconds",
            "delivery_limit",
            "commands_max_length",
            "db_pool_size",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_env_name(name)} must be positive")
        if not 1 <= self.command_partitions <= MAX_COMMAND_PARTITIONS:
            raise ConfigError(
                f"{_env_name('command_partitions')} must be from 1 to {MAX_COMMAND_PARTITIONS}"
            )
        if self.quorum_group_size < 1:
            raise ConfigError(f"{_env_name('quorum_group_size')} must be positive")
        if self.rpc_queue_type not in RPC_QUEUE_TYPES:
            raise ConfigError(f"{_env_name('rpc_queue_type')} must be classic or quorum")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ConfigError(f"{_env_name('http_port')} must be a port number")
        if self.auth_mode not in ("strict", "permissive"):
            raise ConfigError(f"{_env_name('auth_mode')} must be strict or permissive")
        if self.expiry_interval_seconds <= 0:
            raise ConfigError(f"{_env_name('expiry_interval_seconds')} must be positive")
        if self.plugin_cache_seconds < 0:
            raise ConfigError(f"{_env_name('plugin_cache_seconds')} cannot be negative")
        if self.max_reply_bytes < 2 * self.value_max_bytes + 64 * 1024:
            raise ConfigError(
                f"{_env_name('max_reply_bytes')} must be at least twice "
                f"{_env_name('value_max_bytes')} plus 64 KiB, so that any value fits in a reply"
            )
        if min(self.quota_entries, self.quota_bytes, self.quota_tombstones) < 0:
            raise ConfigError("quotas cannot be negative (0 means no quota)")
        if self.db_statement_cache < 0:
            raise ConfigError(f"{_env_name('db_statement_cache')} cannot be negative")
        if self.batch_wait_ms < 0 or self.prefetch < 0 or self.future_skew_seconds < 0:
            raise ConfigError("batch wait, prefetch and future skew cannot be negative")
        if self.prefetch and self.prefetch < self.batch_size:
            raise ConfigError(f"{_env_name('prefetch')} must be at least the batch size")
        if not 0 < self.retry_initial_seconds <= self.retry_max_seconds:
            raise ConfigError("retry back-off must satisfy 0 < initial <= max")
        if not self.roles or not self.roles <= set(ROLES):
            raise ConfigError(
                f"{_env_name('roles')} must be one or more of writes, reads and relay"
            )
        if self.processes not in PROCESSES:
            raise ConfigError(f"{_env_name('processes')} must be split or single")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"{_env_name('log_format')} must be text or json")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"{_env_name('log_level')} must be debug, info, warning or error")
        if not self.prefix or any(c in self.prefix for c in " *#"):
            raise ConfigError(f"{_env_name('prefix')} must be non-empty, without spaces, * or #")
        if urlsplit(self.database_url).scheme not in ("postgres", "postgresql"):
            raise ConfigError(f"{_env_name('database_url')} must be a postgresql:// URL")
        try:
            self.amqp_urls  # noqa: B018 - validates the list
        except brokers.AddressError as exc:
            raise ConfigError(f"{_env_name('amqp_url')}: {exc}") from None

    def to_env(self) -> dict[str, str]:
        """Every setting as the ``PLUGIN_STATE_*`` variable that ``from_env`` reads back to
        the same value (one that is unset, empty): how a supervising ``run`` hands its
        settings, flags included, to its processes."""
        return {_env_name(f.name): _unparse(getattr(self, f.name)) for f in fields(self)}

    def redacted(self) -> dict[str, object]:
        """The settings as loggable data: passwords in URLs are replaced."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_url"):
                value = redact_url(value)
            elif isinstance(value, frozenset):
                value = sorted(value)
            out[f.name] = value
        return out


def redact_url(url: str) -> str:
    """``amqp://user:secret@host/`` becomes ``amqp://user:***@host/``; every URL of a list."""
    return brokers.redact(url)


def _unparse(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, frozenset):
        return ",".join(sorted(value))
    return str(value)


def _parse(name: str, type_name: object, raw: str) -> object:
    kind = str(type_name)
    try:
        if kind in ("int", "int | None"):
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "frozenset[str]":
            return frozenset(u.strip() for u in raw.split(",") if u.strip())
        if kind == "bool":
            return {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}[
                raw.strip().lower()
            ]
    except KeyError:
        raise ConfigError(f"{_env_name(name)}={raw!r} must be on or off") from None
    except ValueError:
        raise ConfigError(f"{_env_name(name)}={raw!r} is not a valid {kind}") from None
    return raw
