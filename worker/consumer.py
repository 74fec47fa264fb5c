"""The write path: deliveries in, batches applied in Postgres, then acks.

Two tasks form a pipeline: ``_collect`` groups deliveries into batches (up to
``batch_size`` messages; it waits up to ``batch_wait_ms`` for more only while Postgres is
busy with earlier batches), while ``_process`` applies up to ``apply_concurrency`` batches
at once, each in one transaction, and settles them in delivery order: rejects are
dead-lettered (with confirms), callers that asked get their reply, and each batch is acked
with one ``multiple`` ack per channel. Nothing is acked before it is committed or
dead-lettered.

When Postgres fails, the consumer pauses (cancels its subscription, so no more deliveries
arrive), keeps what it holds, retries with capped back-off, and resumes. ``drain`` stops
consuming and finishes what is held; it is what SIGTERM calls.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Final

import structlog
from aio_pika.abc import AbstractRobustChannel

from schemas.codec import JSON, Codec, codec_for
from schemas.errors import Internal, StateError
from schemas.messages import AppliedReply, ErrorReply, Reply
from worker.applier import Applier, Result
from worker.auth import Caller
from worker.broker import BROKER_FAILURES, Delivery, Subscription, ack_all
from worker.config import Settings
from worker.metrics import Metrics
from worker.model import Write
from worker.publish import Publisher
from worker.store import DATABASE_FAILURES
from worker.topology import Names
from worker.validate import Rules, uuid7_millis, validate_write

log = structlog.get_logger(__name__)


_STOP: Final = object()


class DrainTimeout(RuntimeError):
    """Draining took longer than allowed; unacked messages go back to the queue."""


class CommandConsumer:
    """Consumes the commands queue and applies it to Postgres."""

    def __init__(
        self,
        settings: Settings,
        channel: AbstractRobustChannel,
        applier: Applier,
        publisher: Publisher,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        on_commit: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.subscription = Subscription(
            channel, Names(settings.prefix).commands_queue, self._on_delivery
        )
        self.applier = applier
        self.publisher = publisher
        self.metrics = metrics
        self.clock = clock
        self.on_commit = on_commit
        self.rules = Rules.from_settings(settings)
        self._inbox: asyncio.Queue[Delivery | object] = asyncio.Queue()
        self._batches: asyncio.Queue[list[Delivery] | None] = asyncio.Queue(1)
        self._applying = 0
        self._draining = False
        self._stopped = False
        self._drain_deadline = float("inf")
        self.paused = False
        self.received = 0
        self.acked = 0

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
            await self.subscription.stop()

    async def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.metrics.paused.set(0)
            if not self._draining:
                await self.subscription.start()

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
        """Apply up to ``apply_concurrency`` batches at once, each in its own transaction
        (last writer wins does not care in which order they commit), and settle them in
        delivery order, which the `multiple` acks need."""
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
            results, ids = await self._apply_batch(batch)
            if previous is not None:
                await previous
            await self._settle(batch, results, ids)
        finally:
            self._applying -= 1
            slots.release()
            if not settled.done():
                settled.set_result(None)

    async def _apply_batch(
        self, batch: list[Delivery]
    ) -> tuple[list[Result], list[uuid.UUID | None]]:
        now_ms = int(self.clock() * 1000)
        results: list[Result] = []
        ids: list[uuid.UUID | None] = []
        writes: list[Write] = []
        positions: list[int] = []
        for position, message in enumerate(batch):
            try:
                codec = codec_for(message.content_type)
                command = codec.decode_write(message.body)
                caller = Caller(message.user_id, message.routing_key)
                msgpack = codec.content_type != JSON
                write = validate_write(command, now_ms, self.rules, caller, msgpack=msgpack)
            except StateError as exc:
                results.append(exc)
                ids.append(None)
                continue
            results.append("superseded")
            ids.append(write.id)
            writes.append(write)
            positions.append(position)
        if writes:
            started = time.perf_counter()
            outcomes = await self._apply_until_done(writes)
            self.metrics.apply_seconds.observe(time.perf_counter() - started)
            self.on_commit()
            for position, outcome in zip(positions, outcomes, strict=True):
                results[position] = outcome
        self.metrics.batch_size.observe(len(batch))
        return results, ids

    async def _apply_until_done(self, writes: list[Write]) -> list[Result]:
        delay = self.settings.retry_initial_seconds
        while True:
            try:
                outcomes = await self.applier.apply(writes)
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
            return outcomes

    async def _settle(
        self,
        batch: list[Delivery],
        results: list[Result],
        ids: list[uuid.UUID | None],
    ) -> None:
        sends = []
        outcomes: Counter[str] = Counter()
        oldest_applied: uuid.UUID | None = None
        for message, result, write_id in zip(batch, results, ids, strict=True):
            if isinstance(result, StateError):
                self.metrics.count_reject(result.code)
                log.info(
                    "write_rejected",
                    code=result.code,
                    reason=result.message[:200],
                    routing_key=message.routing_key,
                )
                sends.append(self.publisher.dead_letter(message.as_incoming(), result))
            else:
                outcomes[result] += 1
                if result == "applied" and write_id is not None:
                    oldest_applied = min(write_id, oldest_applied or write_id)
            if message.reply_to:
                sends.append(self._reply(message, result, write_id))
        for outcome, count in outcomes.items():
            self.metrics.count_write(outcome, count)
        if oldest_applied is not None:
            # Once per batch, for its oldest write: the lag that matters, at a fraction of
            # the cost of observing every write.
            self.metrics.lag_seconds.observe(self.clock() - uuid7_millis(oldest_applied) / 1000)
        try:
            await asyncio.gather(*sends)
        except BROKER_FAILURES as exc:
            # Not acking is safe: redelivered writes are superseded duplicates, and a
            # redelivered reject is rejected (and dead-lettered) again.
            log.warning("settle_failed_not_acking", error=repr(exc), size=len(batch))
            return
        await ack_all(batch)
        self.acked += len(batch)

    async def _reply(self, message: Delivery, result: Result, write_id: uuid.UUID | None) -> None:
        codec = codec_for_reply(message.content_type)
        reply: Reply
        if isinstance(result, StateError) or write_id is None:
            error = result if isinstance(result, StateError) else Internal("no write id")
            reply = ErrorReply(code=error.code, message=error.message)
        else:
            reply = AppliedReply(id=write_id, outcome=result)
        assert message.reply_to is not None
        await self.publisher.reply(message.reply_to, message.correlation_id, reply, codec)


def codec_for_reply(content_type: str | None) -> Codec:
    """Replies use the request's encoding; an unusable content type gets a JSON reply."""
    try:
        return codec_for(content_type)
    except StateError:
        return codec_for(JSON)
