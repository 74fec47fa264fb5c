"""The write path: deliveries in, bounded transactions applied in Postgres, then acks.

Two tasks form a pipeline: ``_collect`` groups deliveries into batches (up to
``batch_size`` messages; it waits up to ``batch_wait_ms`` for more only while Postgres is
busy with earlier batches), while ``_process`` handles up to ``apply_concurrency`` batches
at once and settles them in delivery order. Handling a batch: every delivery goes through
``worker.intake`` (decode, authorize, validate: an outcome per message, never an exception),
the valid writes are applied in transactions bounded in ops and bytes (``worker.applier``),
then settling: rejects are dead-lettered (with confirms), callers that asked get their reply,
and the batch is acked with one ``multiple`` ack per channel. Nothing is acked before it is
committed or dead-lettered; a delivery whose dead letter or reply could not be sent is given
back to the queue (nacked) before the ack, so that the ``multiple`` ack cannot cover it.

When Postgres fails, the consumer pauses (holds its subscription, so no more deliveries
arrive), keeps what it holds, retries with capped back-off, and resumes. ``drain`` stops
consuming and finishes what is held; it is what SIGTERM calls.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TypeVar

import structlog
from aio_pika.abc import AbstractRobustChannel
from msgspec import UNSET

from schemas.errors import Internal, StateError
from schemas.messages import AppliedReply, ErrorReply, Reply
from schemas.rules import uuid7_millis
from worker import topology
from worker.applier import Applier, TimedOut, transactions
from worker.broker import (
    BROKER_FAILURES,
    Delivery,
    Subscription,
    Subscriptions,
    ack_all,
    nack_all,
)
from worker.config import Settings
from worker.decisions import Result
from worker.intake import ReceivedWrite, WriteIntake
from worker.metrics import Metrics
from worker.model import Conflict, EntryKey, Write
from worker.plugins import PluginDirectory
from worker.priority import ReadsFirst
from worker.publish import Publisher
from worker.store import DATABASE_FAILURES
from worker.topology import Names

log = structlog.get_logger(__name__)

T = TypeVar("T")

_STOP: Final = object()
_SLICE: Final = 64
"""Messages decoded between two yields to the event loop, so that a large batch never
holds up the read path (which shares the loop) for more than a moment."""
TIMEOUT_STRIKES: Final = 3
"""Times one write may time out on its own, while Postgres answers, before it is
dead-lettered as ``internal`` (so that it cannot hold its queue back for ever)."""


class DrainTimeout(RuntimeError):
    """Draining took longer than allowed; unacked messages go back to the queue."""


class CommandConsumer:
    """Consumes the commands queue and applies it to Postgres."""

    def __init__(
        self,
        settings: Settings,
        channel: AbstractRobustChannel,
        intake: WriteIntake,
        plugins: PluginDirectory,
        applier: Applier,
        publisher: Publisher,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        on_commit: Callable[[Sequence[EntryKey]], None] = lambda _changed: None,
        queues: Sequence[tuple[AbstractRobustChannel, str]] = (),
        priority: ReadsFirst | None = None,
    ) -> None:
        """``queues``: every commands queue with a channel of its own (the partitions,
        ``worker.topology``); by default, the single commands queue on ``channel``."""
        self.settings = settings
        queues = queues or [(channel, Names(settings.prefix).commands_queue)]
        subscriptions = [self._subscription(channel, queue) for channel, queue in queues]
        self.subscription: Subscription | Subscriptions = (
            subscriptions[0] if len(subscriptions) == 1 else Subscriptions(subscriptions)
        )
        self.intake = intake
        self.plugins = plugins
        self.applier = applier
        self.publisher = publisher
        self.metrics = metrics
        self.clock = clock
        self.on_commit = on_commit
        self.priority = priority or ReadsFirst()
        self._inbox: asyncio.Queue[Delivery | object] = asyncio.Queue()
        self._batches: asyncio.Queue[list[Delivery] | None] = asyncio.Queue(1)
        self._applying = 0
        self._draining = False
        self._stopped = False
        self._drain_deadline = float("inf")
        self._strikes: Counter[uuid.UUID] = Counter()
        self.paused = False
        self.received = 0
        self.acked = 0

    def _subscription(self, channel: AbstractRobustChannel, queue: str) -> Subscription:
        settings = self.settings
        return Subscription(
            channel,
            queue,
            self._on_delivery,
            declare=lambda raw: topology.declare_again(raw, settings, queue),
            prefetch=settings.effective_prefetch,
            max_held_bytes=settings.held_max_bytes,
            retry_initial=settings.retry_initial_seconds,
            retry_max=settings.retry_max_seconds,
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Subscribe to the commands queue."""
        await self.subscription.start()

    async def run(self) -> None:
        """Collect and apply batches until ``drain`` has finished everything held."""
        async with asyncio.TaskGroup() as group:
            keeping = group.create_task(self.subscription.keep(), name="commands-subscription")
            group.create_task(self._collect(), name="collect-commands")
            await self._process()
            keeping.cancel()
        log.info("consumer_drained", received=self.received, acked=self.acked)

    async def drain(self) -> None:
        """Stop taking deliveries; ``run`` returns once what is held is settled."""
        if self._draining:
            return
        self._draining = True
        self._drain_deadline = time.monotonic() + self.settings.drain_timeout_seconds
        await self.subscription.stop()
        self._stopped = True
        self._inbox.put_nowait(_STOP)

    @property
    def consuming(self) -> bool:
        return self.subscription.consuming

    async def pause(self) -> None:
        """Stop taking deliveries (held ones stay held); used when Postgres fails."""
        if not self.paused:
            self.paused = True
            self.metrics.paused.set(1)
            await self.subscription.hold("database")

    async def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.metrics.paused.set(0)
            # A broker hiccup here is the subscription's to retry, not this batch's.
            await self.subscription.release("database")

    def _on_delivery(self, delivery: Delivery) -> None:
        self.received += 1
        if self._stopped:
            log.warning("late_delivery_after_drain", delivery_tag=delivery.delivery_tag)
        self._inbox.put_nowait(delivery)

    # ------------------------------------------------------------------ batching

    async def _collect(self) -> None:
        size = self.settings.batch_size
        wait = self.settings.batch_wait_ms / 1000
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._inbox.get()
            if first is _STOP:
                break
            batch = [first]
            deadline = loop.time() + wait
            while len(batch) < size:
                try:
                    item = self._inbox.get_nowait()
                except asyncio.QueueEmpty:
                    # Nothing is being applied: send what there is now rather than wait
                    # for more (batches grow by themselves while Postgres is busy).
                    if self._applying == 0 and self._batches.empty():
                        break
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        async with asyncio.timeout(remaining):
                            item = await self._inbox.get()
                    except TimeoutError:
                        break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            await self._batches.put(batch)  # type: ignore[arg-type]
        await self._batches.put(None)

    async def _process(self) -> None:
        """Handle up to ``apply_concurrency`` batches at once (last writer wins does not
        care in which order they commit), and settle them in delivery order, which the
        `multiple` acks need."""
        slots = asyncio.Semaphore(self.settings.apply_concurrency)
        loop = asyncio.get_running_loop()
        previous: asyncio.Future[None] | None = None
        async with asyncio.TaskGroup() as group:
            while (batch := await self._batches.get()) is not None:
                await slots.acquire()
                self._applying += 1
                settled: asyncio.Future[None] = loop.create_future()
                group.create_task(self._handle(batch, previous, settled, slots))
                previous = settled

    # ------------------------------------------------------------------ one batch

    async def _handle(
        self,
        batch: list[Delivery],
        previous: asyncio.Future[None] | None,
        settled: asyncio.Future[None],
        slots: asyncio.Semaphore,
    ) -> None:
        try:
            received, results = await self._apply_batch(batch)
            if previous is not None:
                await previous
            await self.priority.writes_turn()
            await self._settle(received, results)
        finally:
            self._applying -= 1
            slots.release()
            if not settled.done():
                settled.set_result(None)

    async def _apply_batch(self, batch: list[Delivery]) -> tuple[list[ReceivedWrite], list[Result]]:
        received = []
        for position, message in enumerate(batch):
            received.append(self.intake.receive(message))
            if position % _SLICE == _SLICE - 1:
                await self.priority.writes_turn()
        wanted = {plugin for r in received for plugin in r.plugins()}
        owners = await self._until_done(lambda: self.plugins.owners(wanted)) if wanted else {}
        now_ms = int(self.clock() * 1000)
        results: list[Result] = []
        writes: list[Write] = []
        positions: list[int] = []
        for position, item in enumerate(received):
            admitted = self.intake.admit(item, owners, now_ms)
            if isinstance(admitted, StateError):
                results.append(admitted)
            else:
                results.append("superseded")
                writes.append(admitted)
                positions.append(position)
            if position % _SLICE == _SLICE - 1:
                await self.priority.writes_turn()
        if writes:
            started = time.perf_counter()
            bounds = self.settings.transaction_max_ops, self.settings.transaction_max_bytes
            for group in transactions(writes, *bounds):
                await self.priority.writes_turn()
                self.metrics.transaction_ops.observe(sum(len(writes[i].entries) for i in group))
                outcomes = await self._apply_group([writes[i] for i in group])
                for index, outcome in zip(group, outcomes, strict=True):
                    results[positions[index]] = outcome
            self.metrics.apply_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(batch))
        return received, results

    async def _apply_group(self, writes: list[Write]) -> list[Result]:
        """Apply one transaction's writes until each has an outcome: retried through
        Postgres outages; a write that keeps timing out on its own is given up on."""
        results: list[Result | None] = [None] * len(writes)
        pending = list(range(len(writes)))
        while pending:
            group = [writes[i] for i in pending]
            applied = await self._until_done(
                lambda group=group: self.applier.apply_transaction(group)  # type: ignore[misc]
            )
            if applied.changed:
                self.on_commit(applied.changed)
            retry = []
            for index, outcome in zip(pending, applied.results, strict=True):
                if not isinstance(outcome, TimedOut):
                    results[index] = outcome
                    continue
                write_id = writes[index].id
                self._strikes[write_id] += 1
                if self._strikes[write_id] < TIMEOUT_STRIKES:
                    retry.append(index)
                    continue
                del self._strikes[write_id]
                results[index] = Internal(
                    f"applying this write timed out {TIMEOUT_STRIKES} times while Postgres "
                    "answered otherwise; it is dead-lettered so that it cannot hold the "
                    "queue back (replay it once the cause is found)"
                )
            pending = retry
        return [r if r is not None else Internal("write was not applied") for r in results]

    async def _until_done(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt`` until Postgres lets it finish: pause while it fails."""
        delay = self.settings.retry_initial_seconds
        while True:
            try:
                outcome = await attempt()
            except DATABASE_FAILURES as exc:
                if time.monotonic() > self._drain_deadline:
                    raise DrainTimeout("Postgres still failing at the drain deadline") from exc
                if not self.paused:
                    log.warning("database_failing_pausing", error=repr(exc))
                await self.pause()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max_seconds)
                continue
            if self.paused:
                log.info("database_back_resuming")
                await self.resume()
            return outcome

    # ------------------------------------------------------------------ settling

    async def _settle(self, received: list[ReceivedWrite], results: list[Result]) -> None:
        sends: list[Awaitable[None]] = []
        owners: list[int] = []
        outcomes: Counter[str] = Counter()
        oldest_applied: uuid.UUID | None = None
        for index, (item, result) in enumerate(zip(received, results, strict=True)):
            message = item.message
            if isinstance(result, StateError):
                self.metrics.count_reject(result.code)
                log.info(
                    "write_rejected",
                    code=result.code,
                    reason=result.message[:200],
                    routing_key=message.routing_key,
                )
                sends.append(self.publisher.dead_letter(message, result))
                owners.append(index)
            else:
                outcomes["conflict" if isinstance(result, Conflict) else result] += 1
                if result == "applied" and item.command is not None:
                    oldest_applied = min(item.command.id, oldest_applied or item.command.id)
            reply_to = item.answer_to(result)
            if reply_to is not None:
                sends.append(self._reply(item, reply_to, result))
                owners.append(index)
        for outcome, count in outcomes.items():
            self.metrics.count_write(outcome, count)
        if oldest_applied is not None:
            # Once per batch, for its oldest write: the lag that matters, at a fraction of
            # the cost of observing every write.
            self.metrics.lag_seconds.observe(self.clock() - uuid7_millis(oldest_applied) / 1000)
        failed: set[int] = set()
        sent_all = await asyncio.gather(*sends, return_exceptions=True)
        for index, sent in zip(owners, sent_all, strict=True):
            if isinstance(sent, Exception):
                if not isinstance(sent, BROKER_FAILURES):
                    log.error("settle_send_failed", error=repr(sent))
                failed.add(index)
            elif isinstance(sent, BaseException):
                raise sent
        batch = [item.message for item in received]
        if failed:
            # Given back, not acked: a redelivered write is a harmless duplicate, and a
            # redelivered reject is rejected (and dead-lettered) again, once the broker takes
            # dead letters again (a pause first, so the queue does not spin through them).
            log.warning("settle_failed_requeueing", failed=len(failed), size=len(batch))
            await nack_all(batch[i] for i in sorted(failed))
            self.subscription.back_off()
        else:
            self.subscription.went_well()
        await ack_all(m for i, m in enumerate(batch) if i not in failed)
        self.subscription.settled(batch)
        self.acked += len(batch) - len(failed)

    async def _reply(self, item: ReceivedWrite, reply_to: str, result: Result) -> None:
        reply: Reply
        if isinstance(result, StateError) or item.command is None:
            error = result if isinstance(result, StateError) else Internal("no write id")
            reply = ErrorReply(code=error.code, message=error.message)
        elif isinstance(result, Conflict):
            failed_op = UNSET if result.failed_op is None else result.failed_op
            reply = AppliedReply(id=item.command.id, outcome="conflict", failed_op=failed_op)
        else:
            reply = AppliedReply(id=item.command.id, outcome=result)
        await self.publisher.reply(reply_to, item.message.correlation_id, reply, item.codec)
