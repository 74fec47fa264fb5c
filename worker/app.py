"""The worker process: start, serve, drain, stop, in that order, each a readable step.

``start`` connects to Postgres and RabbitMQ (waiting for them with back-off), declares the
topology and subscribes. ``serve`` runs the consumer and the housekeeping until asked to
stop, then drains: no more deliveries, everything held is committed and acked. ``stop``
closes the connections. SIGTERM and SIGINT trigger the stop (see ``worker.cli``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Final, TypeVar

import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from worker import diagnosis
from worker.applier import Applier
from worker.auth import Authorizer
from worker.broker import BROKER_FAILURES
from worker.client import failover
from worker.config import Settings
from worker.consumer import CommandConsumer
from worker.health import HealthServer, registry_exposition
from worker.intake import ReadIntake, WriteIntake
from worker.metrics import Metrics
from worker.plugins import PluginDirectory
from worker.priority import ReadsFirst
from worker.publish import Publisher
from worker.quota import Quota
from worker.relay import Relay
from worker.retention import run_retention
from worker.rpc import RpcServer
from worker.store import APPLICATION_NAME, DATABASE_FAILURES, Store, create_pool
from worker.sweeper import run_sweeper
from worker.topology import Names, declare
from worker.validate import Rules
from worker.wakeups import CommitNotices, Wakeups

log = structlog.get_logger(__name__)

T = TypeVar("T")

_WATCH_INTERVAL: Final = 2.0
_PING_TIMEOUT: Final = 2.0


class Worker:
    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], float] = time.time,
        *,
        housekeeping: bool = True,
    ) -> None:
        """``housekeeping``: also run the expiry sweeper and the tombstone retention (the
        read process of a split worker leaves them to its sibling, ``worker.supervisor``)."""
        self.settings = settings
        self.clock = clock
        self.housekeeping = housekeeping
        self.metrics = Metrics()
        self.instance = uuid.uuid4().hex[:8]
        self.stopping = asyncio.Event()
        self.store: Store | None = None
        self.connection: AbstractRobustConnection | None = None
        self.read_connection: AbstractRobustConnection | None = None
        self.consumer: CommandConsumer | None = None
        self.rpc: RpcServer | None = None
        self.channels: list[AbstractChannel] = []
        self.read_channels: list[AbstractChannel] = []
        self.wakeups = Wakeups()
        self.notices: CommitNotices | None = None
        self.relay: Relay | None = None
        self.database_ok = False
        self.started = asyncio.Event()
        """Set once connected, declared and consuming (``start`` returned)."""
        self.health = HealthServer(
            self._readiness,
            registry_exposition(self.metrics.registry),
            settings.http_host,
            settings.http_port,
        )

    @property
    def connection_name(self) -> str:
        """Shown by RabbitMQ, so an operator (or a fault test) can find this worker's
        connections; unique per worker, even with several in one process."""
        return f"plugin-state-worker {socket.gethostname()}:{os.getpid()}:{self.instance}"

    async def start(self) -> None:
        settings = self.settings
        log.info("worker_starting", **settings.redacted())
        # Up first, so /healthz answers (and /readyz says why not) while services are awaited.
        await self.health.start()
        await self._connect()
        assert self.connection is not None and self.store is not None
        assert self.read_connection is not None
        # One channel per consumer, so each has its own prefetch and its own delivery tags
        # (the write path acks with `multiple`); replies and dead letters on their own.
        # Each subscription sets its channel's prefetch (worker.broker.Subscription).
        # Declared on a channel of its own, closed at once: a robust channel that kept the
        # declarations would replay them when it reopens, and one that fails (a queue whose
        # node is down) would leave it closed for good. The consumers declare their queue
        # again when the broker cancels them (worker.broker.Subscription).
        setup_channel = await self.connection.channel()
        topology = await declare(setup_channel, settings)
        await setup_channel.close()
        commands_channel = await self.connection.channel()
        # One more channel per further commands queue (partitions, worker.topology).
        partition_channels = [await self.connection.channel() for _ in topology.command_queues[1:]]
        confirm_channel = await self.connection.channel(publisher_confirms=True)
        reply_channel = await self.connection.channel(publisher_confirms=False)
        notices_channel = await self.connection.channel(publisher_confirms=False)
        relay_channel = await self.connection.channel(publisher_confirms=True)
        # Closed in this order at stop: consumers first, publishers last.
        self.channels = [
            commands_channel,
            *partition_channels,
            notices_channel,
            relay_channel,
            reply_channel,
            confirm_channel,
        ]
        names = Names(settings.prefix)
        publisher = Publisher(reply_channel, confirm_channel, names.dead)
        # The read path on a connection of its own (see _connect): its requests, replies
        # and dead letters.
        rpc_channel = await self.read_connection.channel()
        read_reply_channel = await self.read_connection.channel(publisher_confirms=False)
        read_confirm_channel = await self.read_connection.channel(publisher_confirms=True)
        self.read_channels = [rpc_channel, read_reply_channel, read_confirm_channel]
        read_publisher = Publisher(read_reply_channel, read_confirm_channel, names.dead)
        self.notices = CommitNotices(notices_channel, settings.prefix, self.instance, self.wakeups)
        await self.notices.start()
        plugins = PluginDirectory(self.store, settings.plugin_cache_seconds)
        authorizer = Authorizer.from_settings(settings)
        rules = Rules.from_settings(settings)
        priority = ReadsFirst()
        self.consumer = CommandConsumer(
            settings=settings,
            channel=commands_channel,
            intake=WriteIntake(names, rules, authorizer),
            plugins=plugins,
            applier=Applier(
                self.store,
                rules.retention_ms,
                Quota.from_settings(settings),
                changes=settings.changes,
            ),
            publisher=publisher,
            metrics=self.metrics,
            clock=self.clock,
            on_commit=lambda changed: self._committed(key.plugin_id for key in changed),
            queues=list(
                zip([commands_channel, *partition_channels], topology.command_queues, strict=True)
            ),
            priority=priority,
        )
        self.rpc = RpcServer(
            settings=settings,
            channel=rpc_channel,
            intake=ReadIntake(names, rules, authorizer),
            store=self.store,
            plugins=plugins,
            publisher=read_publisher,
            metrics=self.metrics,
            wakeups=self.wakeups,
            clock=self.clock,
            priority=priority,
        )
        if settings.changes and "relay" in settings.roles:
            self.relay = Relay(
                self.store,
                relay_channel,
                names,
                self.wakeups.listener(),
                self.metrics,
                retry_initial=settings.retry_initial_seconds,
                retry_max=settings.retry_max_seconds,
                priority=priority,
            )
            await self.relay.start()
        if "writes" in settings.roles:
            await self.consumer.start()
        if "reads" in settings.roles:
            await self.rpc.start()
        log.info("worker_started", prefix=settings.prefix, roles=sorted(settings.roles))
        self.started.set()

    async def _connect(self) -> None:
        """Connect to Postgres and RabbitMQ at once, each waited for on its own, so that
        /readyz tells which one is missing while the other is up."""
        settings = self.settings

        async def postgres() -> None:
            pool = await self._until_up(
                "postgres",
                lambda: create_pool(
                    settings.database_url,
                    settings.db_pool_size,
                    settings.db_command_timeout_seconds,
                    # Which worker a backend serves, in pg_stat_activity.
                    f"{APPLICATION_NAME} {os.getpid()}:{self.instance}",
                    statement_cache=settings.db_statement_cache,
                ),
                lambda exc: diagnosis.database_failure(exc, settings.database_url),
            )
            self.store = Store(pool)
            self.database_ok = True

        def broker(name: str) -> Awaitable[AbstractRobustConnection]:
            return self._until_up(
                "rabbitmq",
                # Any live node of the broker's, and another when that one goes down.
                lambda: failover.connect(
                    settings.amqp_urls,
                    connection_name=name,
                    retry_initial=settings.retry_initial_seconds,
                    retry_max=settings.retry_max_seconds,
                ),
                lambda exc: diagnosis.broker_failure(exc, settings.amqp_url),
            )

        async def rabbitmq() -> None:
            # The read path gets a connection of its own: aiormq hands a connection's frames
            # to its channels in order, through small buffers, so on a shared one a read
            # request waits behind every write delivery the broker sent before it (up to
            # the prefetch: seconds' worth of writes when the queue is full). A worker
            # that only reads has nothing to wait behind, one that does not read no reads.
            roles = settings.roles
            if roles == {"reads"}:
                self.connection = await broker(f"{self.connection_name} reads")
                self.read_connection = self.connection
                return
            self.connection = await broker(self.connection_name)
            if "reads" in roles:
                self.read_connection = await broker(f"{self.connection_name} reads")
            else:
                self.read_connection = self.connection

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(postgres(), name="connect-postgres")
                group.create_task(rabbitmq(), name="connect-rabbitmq")
        except* (diagnosis.ServiceFailure, StoppedWhileWaiting) as failed:
            # A permanent failure says more than the stop it caused in the other task.
            first = sorted(failed.exceptions, key=lambda e: isinstance(e, StoppedWhileWaiting))
            raise first[0] from None

    async def serve(self) -> None:
        """Run until ``request_stop``, then drain; returns when everything held is settled."""
        assert self.consumer is not None and self.rpc is not None and self.store is not None
        settings = self.settings
        async with asyncio.TaskGroup() as group:
            consuming = group.create_task(self.consumer.run(), name="commands")
            serving = group.create_task(self.rpc.run(), name="rpc")
            background = [group.create_task(self._watch_database(), name="database-watch")]
            if self.housekeeping:
                background += [
                    group.create_task(run_retention(self.store, settings), name="retention"),
                    group.create_task(
                        run_sweeper(self.store, settings, self.metrics, self._committed),
                        name="expiry-sweeper",
                    ),
                ]
            if self.relay is not None:
                background.append(group.create_task(self.relay.run(), name="relay"))
            await self.stopping.wait()
            log.info("worker_draining")
            await asyncio.gather(self.consumer.drain(), self.rpc.drain())
            await asyncio.gather(consuming, serving)
            for task in background:
                task.cancel()

    def _committed(self, plugins: Iterable[uuid.UUID]) -> None:
        """Plugins' state changed here: tell the waiters of this worker and of the others."""
        if self.notices is not None:
            self.notices.committed(plugins)

    def request_stop(self) -> None:
        self.stopping.set()

    async def _readiness(self) -> dict[str, bool]:
        return self.readiness()

    def readiness(self) -> dict[str, bool]:
        """What /readyz reports: ready only when every value is true."""
        roles = self.settings.roles
        broker = all(
            connection is not None and connection.connected.is_set()
            for connection in (self.connection, self.read_connection)
        )
        paused = self.consumer is not None and self.consumer.paused
        self.metrics.connected.labels(service="rabbitmq").set(broker)
        self.metrics.connected.labels(service="postgres").set(self.database_ok)
        return {
            "rabbitmq": broker,
            "postgres": self.database_ok and not paused,
            "consuming_writes": "writes" not in roles
            or (self.consumer is not None and self.consumer.consuming),
            "consuming_reads": "reads" not in roles
            or (self.rpc is not None and self.rpc.consuming),
            "not_stopping": not self.stopping.is_set(),
        }

    async def _watch_database(self) -> None:
        """Keep ``database_ok`` true to what Postgres answers, for /readyz and the gauges."""
        assert self.store is not None
        while True:
            try:
                await self.store.ping(timeout=_PING_TIMEOUT)
            except DATABASE_FAILURES as exc:
                if self.database_ok:
                    log.warning("database_unreachable", error=repr(exc))
                self.database_ok = False
            else:
                self.database_ok = True
            self.readiness()  # refreshes the connection gauges
            await asyncio.sleep(_WATCH_INTERVAL)

    async def stop(self) -> None:
        if self.notices is not None:
            await self.notices.stop()
        # Each channel is closed with a handshake, so the broker has taken every ack sent
        # on it before the connection goes.
        for channel in [*self.read_channels, *self.channels]:
            try:
                await channel.close()
            except BROKER_FAILURES as exc:
                log.info("channel_close_failed", error=repr(exc))
        if self.read_connection not in (None, self.connection):
            await self.read_connection.close()
        if self.connection is not None:
            await self.connection.close()
        if self.store is not None:
            await self.store.close()
        await self.health.stop()
        log.info("worker_stopped")

    async def run(self) -> None:
        """start, serve, stop: the whole life of a worker process. Asked to stop while
        still waiting for a service, it stops there, as a normal stop."""
        try:
            await self.start()
            if not self.stopping.is_set():
                await self.serve()
        except StoppedWhileWaiting as stopped:
            log.info("stopped_while_waiting", service=str(stopped))
        finally:
            await self.stop()

    async def _until_up(
        self,
        what: str,
        connect: Callable[[], Awaitable[T]],
        diagnose: Callable[[BaseException], diagnosis.ServiceFailure | None],
    ) -> T:
        """Connect, waiting out failures that may pass with capped back-off; a permanent
        one (a refused login) raises its ``ServiceFailure``, a stop ``StoppedWhileWaiting``
        (even in the middle of an attempt)."""
        delay = self.settings.retry_initial_seconds
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            while True:
                async with _attempt(connect()) as attempt:
                    either: set[asyncio.Future[Any]] = {attempt, stop}
                    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                    # Asked here, not after the block: leaving it cancels an unfinished
                    # attempt, whose result would then be a CancelledError, which a task
                    # group takes for a task that ended quietly.
                    stopped = not attempt.done()
                if stopped:
                    raise StoppedWhileWaiting(what)
                try:
                    return attempt.result()
                except (*DATABASE_FAILURES, *BROKER_FAILURES) as exc:
                    failure = diagnose(exc)
                    if failure is not None and failure.permanent:
                        raise failure from None
                    log.warning(
                        "waiting_for_service",
                        service=what,
                        error=str(failure) if failure else repr(exc),
                        retry_in=delay,
                    )
                await asyncio.wait({stop}, timeout=delay)
                if stop.done():
                    raise StoppedWhileWaiting(what)
                delay = min(delay * 2, self.settings.retry_max_seconds)
        finally:
            stop.cancel()


def freeze_imports() -> None:
    """Before a long run: what was imported lives as long as the process, so it is moved out
    of the collector's way, and a full collection scans only what comes after (under a
    write flood such pauses, which held up the reads, went from 30-40 ms to mostly
    13-17 ms). For the processes of ``run`` only: never in a test's process."""
    gc.collect()
    gc.freeze()


@contextlib.asynccontextmanager
async def _attempt(connect: Awaitable[T]) -> AsyncIterator[asyncio.Future[T]]:
    """A connection attempt as a task that never outlives the block: left unfinished (a
    stop, or the other service's permanent failure) it is cancelled and awaited."""
    attempt = asyncio.ensure_future(connect)
    try:
        yield attempt
    finally:
        if not attempt.done():
            attempt.cancel()
            await asyncio.gather(attempt, return_exceptions=True)


class StoppedWhileWaiting(Exception):
    """Asked to stop (SIGTERM, SIGINT) before a service could be reached: a normal stop."""
