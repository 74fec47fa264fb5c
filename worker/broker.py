"""What talking to RabbitMQ entails, for every component that consumes or publishes: the
failures it may raise, deliveries and how they are acked, and subscriptions that survive
reconnects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from worker import frames

log = structlog.get_logger(__name__)

# Before any connection: no property a publisher sets may close it.
frames.make_total()

# What the broker side may raise at a publish, an ack or a cancel: the connection or channel
# is gone or refused us. Callers keep their work unacked, so it comes back.
BROKER_FAILURES: Final = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    # A RuntimeError, not an AMQPError: raised by anything touching a closed channel,
    # even reading a delivery's `channel` attribute.
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    TimeoutError,
)

_SETTLE_SECONDS: Final = 0.02


async def settle_deliveries() -> None:
    """Let deliveries that arrived before a cancel-ok reach their callback.

    aio-pika hands each delivery to its callback through two scheduled tasks, so a few
    that the broker sent just before the cancel may still be on their way when the cancel
    returns; a drain must take them too, or they would come back as redeliveries.
    """
    for _ in range(5):
        await asyncio.sleep(0)
    await asyncio.sleep(_SETTLE_SECONDS)


class Delivery:
    """A delivered message as aiormq hands it over, without aio-pika's per-message wrapper
    object and extra task (a fifth of the write path's CPU in the profile)."""

    __slots__ = ("generation", "raw", "received")

    def __init__(self, raw: DeliveredMessage, received: float, generation: int = 0) -> None:
        self.raw = raw
        self.received = received
        self.generation = generation

    @property
    def body(self) -> bytes:
        return self.raw.body

    @property
    def properties(self) -> Basic.Properties:
        return self.raw.header.properties

    @property
    def content_type(self) -> str | None:
        return self.raw.header.properties.content_type

    @property
    def user_id(self) -> str | None:
        return self.raw.header.properties.user_id

    @property
    def reply_to(self) -> str | None:
        return self.raw.header.properties.reply_to

    @property
    def correlation_id(self) -> str | None:
        return self.raw.header.properties.correlation_id

    @property
    def expiration(self) -> float | None:
        """The AMQP expiration in seconds, if the publisher set a valid one."""
        try:
            return int(self.raw.header.properties.expiration or "") / 1000
        except ValueError:
            return None

    @property
    def routing_key(self) -> str:
        return self.raw.routing_key or ""

    @property
    def delivery_tag(self) -> int:
        return self.raw.delivery_tag or 0

    @property
    def channel(self) -> aiormq.abc.AbstractChannel:
        return self.raw.channel


async def nack_all(deliveries: Iterable[Delivery]) -> None:
    """Give deliveries back to their queue (requeue), one by one: after a failure that was
    not theirs, so that a later ``multiple`` ack cannot cover them."""
    for delivery in deliveries:
        try:
            await delivery.channel.basic_nack(delivery.delivery_tag, requeue=True)
        except BROKER_FAILURES as exc:
            # The channel is gone, and the broker requeues what it held.
            log.info("nack_lost_with_channel", error=repr(exc))
            return


async def ack_all(deliveries: Iterable[Delivery]) -> None:
    """Ack deliveries settled in order: one ack with `multiple` per channel.

    Only for deliveries whose channel holds no older unsettled one: a delivery that could
    not be settled must have been given back (``nack_all``) first. After a reconnect a batch
    can span two channels; the old one's messages are redelivered by the broker.
    """
    last: dict[int, Delivery] = {}
    for delivery in deliveries:
        held = last.get(id(delivery.channel))
        if held is None or delivery.delivery_tag > held.delivery_tag:
            last[id(delivery.channel)] = delivery
    for delivery in last.values():
        try:
            await delivery.channel.basic_ack(delivery.delivery_tag, multiple=True)
        except BROKER_FAILURES as exc:
            log.info("ack_lost_with_channel", error=repr(exc))


class Subscription:
    """A consumer on one queue, on or off as its owner wants, kept so through reconnects,
    broker cancels and failures.

    The owner starts it, and holds it back for a reason (``hold``) until the reason passes
    (``release``): draining, a failing database, or too many bytes held unsettled. RabbitMQ's
    prefetch counts messages, not bytes, so the subscription counts the bodies it hands out
    (the owner reports what it settled with ``settled``), steps back past ``max_held_bytes``,
    and consumes again with a prefetch lowered to what that many bytes hold at the bodies'
    average size: after the first wave of large messages, what a worker holds stays near the
    limit whatever their size.

    It consumes while started and not held. When reality differs (a channel reopened after a
    reconnect, the broker cancelled the consumer because a node went down or the queue
    moved, a ``basic.consume`` failed), ``keep`` (a task of the owner's task group)
    makes it so again, with capped exponential back-off. After a broker cancel, or a
    consume refused because the queue is not there, it declares the queue again (``declare``)
    before it consumes: the queue may have been deleted, or its node lost.

    Deliveries the owner *parks* (``park``: held unacked for long, like reads waiting for
    a change) would use up the prefetch, which RabbitMQ counts per consumer: once as many
    as half the prefetch were parked since the consumer was made, it is made again (cancel,
    consume), since a new consumer's count starts at nothing while the parked deliveries
    stay the channel's, to be settled as any other. So parked deliveries never starve the
    others of the prefetch.

    It consumes through aiormq directly, so aio-pika's robust channel does not restore it.
    """

    def __init__(
        self,
        channel: AbstractRobustChannel,
        queue: str,
        on_delivery: Callable[[Delivery], None],
        *,
        declare: Callable[[aiormq.abc.AbstractChannel], Awaitable[None]] | None = None,
        prefetch: int = 0,
        max_held_bytes: int = 0,
        retry_initial: float = 0.2,
        retry_max: float = 10.0,
    ) -> None:
        self.channel = channel
        self.queue = queue
        self.on_delivery = on_delivery
        self.declare = declare
        self._declared = True  # by the owner, before it starts
        self.prefetch = prefetch
        self.max_held_bytes = max_held_bytes
        self.average_body = 0.0
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.held_bytes = 0
        self._started = False
        self._holds: set[str] = set()
        self._tag: str | None = None
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._generation = 0
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._backoff = retry_initial
        self._backing_off: asyncio.Task[None] | None = None
        self.parked = 0
        self._parked_when_consumed = 0
        self._renew = False
        channel.reopen_callbacks.add(self._on_reopen)

    @property
    def consuming(self) -> bool:
        return self._tag is not None

    @property
    def wanted(self) -> bool:
        return self._started and not self._holds

    async def start(self) -> None:
        """Consume (raising if the broker refuses: a start-up error)."""
        self._started = True
        async with self._lock:
            await self._reconcile()

    async def stop(self) -> None:
        """Stop deliveries for good; those already sent still reach ``on_delivery`` before
        this returns. What is held stays held (unacked) until settled or the channel
        closes."""
        await self.hold("stopped")
        if self._backing_off is not None:
            self._backing_off.cancel()
        await settle_deliveries()

    async def hold(self, reason: str) -> None:
        """Stop consuming until ``release(reason)``."""
        self._holds.add(reason)
        await self._try_reconcile()

    async def release(self, reason: str) -> None:
        """Consume again once no reason holds it back (retried by ``keep`` on failure)."""
        if reason in self._holds:
            self._holds.discard(reason)
            await self._try_reconcile()

    def back_off(self) -> None:
        """Take no deliveries for a while, longer each time in a row: after deliveries were
        given back because what settling them needs (a dead letter, a reply) failed, so that
        the queue does not spin through them until the broker takes them again."""
        if self._backing_off is not None and not self._backing_off.done():
            return
        delay, self._backoff = self._backoff, min(self._backoff * 2, self.retry_max)

        async def hold_then_release() -> None:
            await self.hold("backing_off")
            await asyncio.sleep(delay)
            await self.release("backing_off")

        self._backing_off = asyncio.get_running_loop().create_task(
            hold_then_release(), name=f"back-off {self.queue}"
        )

    def went_well(self) -> None:
        """Settling worked: the next back-off starts short again."""
        self._backoff = self.retry_initial

    def park(self) -> None:
        """The owner holds one more delivery for long (see the class)."""
        self.parked += 1
        if self._tag is not None and self.parked - self._parked_when_consumed >= max(
            1, self.current_prefetch() // 2
        ):
            self._renew = True
            self._changed.set()

    def unpark(self) -> None:
        """A parked delivery is being settled."""
        self.parked = max(0, self.parked - 1)

    def settled(self, deliveries: Iterable[Delivery]) -> None:
        """The owner has acked, nacked or dead-lettered these: their bytes are free."""
        freed = sum(len(d.body) for d in deliveries if d.generation == self._generation)
        self.held_bytes = max(0, self.held_bytes - freed)
        if "held_bytes" in self._holds and self.held_bytes <= self.max_held_bytes // 2:
            self._holds.discard("held_bytes")
            self._changed.set()

    async def keep(self) -> None:
        """Make the consumer what the owner wants after every change, until cancelled."""
        delay = self.retry_initial
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                async with self._lock:
                    await self._reconcile()
            except BROKER_FAILURES as exc:
                log.warning("subscription_retry", queue=self.queue, error=repr(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max)
                self._changed.set()
            else:
                delay = self.retry_initial

    async def _try_reconcile(self) -> None:
        try:
            async with self._lock:
                await self._reconcile()
        except BROKER_FAILURES as exc:
            log.info("subscription_change_deferred", queue=self.queue, error=repr(exc))
            self._changed.set()

    def current_prefetch(self) -> int:
        """The prefetch to consume with: the configured one, lowered so that a prefetch of
        bodies of the average size seen fits in ``max_held_bytes``."""
        if not self.max_held_bytes or self.average_body < 1:
            return self.prefetch
        fitting = max(1, int(self.max_held_bytes // self.average_body))
        return min(self.prefetch, fitting) if self.prefetch else fitting

    async def _reconcile(self) -> None:
        if self._renew and self.wanted and self._tag is not None:
            self._renew = False
            tag, self._tag = self._tag, None
            if self._underlay is not None and not self._underlay.is_closed:
                await self._underlay.basic_cancel(tag)
            log.debug("consumer_renewed", queue=self.queue, parked=self.parked)
        if self.wanted and self._tag is None:
            underlay = await self.channel.get_underlay_channel()
            if not self._declared and self.declare is not None:
                await self.declare(underlay)
                self._declared = True
                log.info("queue_declared_again", queue=self.queue)
            if self.prefetch or self.max_held_bytes:
                await underlay.basic_qos(prefetch_count=self.current_prefetch())
            try:
                ok = await underlay.basic_consume(self.queue, self._deliver, no_ack=False)
            except aiormq.exceptions.ChannelNotFoundEntity:
                self._declared = False
                raise
            if underlay is not self._underlay:
                underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
            self._underlay, self._tag = underlay, ok.consumer_tag
            self._parked_when_consumed = self.parked
            log.info("subscribed", queue=self.queue)
        elif not self.wanted and self._tag is not None:
            tag, self._tag = self._tag, None
            if self._underlay is not None and not self._underlay.is_closed:
                await self._underlay.basic_cancel(tag)

    def _on_reopen(self, *_args: object) -> None:
        # The old channel's deliveries are gone with it (the broker requeues them).
        self._tag = None
        self._generation += 1
        self.held_bytes = 0
        self.parked = self._parked_when_consumed = 0
        self._holds.discard("held_bytes")
        self._changed.set()

    def _on_broker_cancel(self, frame: object) -> None:
        if getattr(frame, "consumer_tag", None) == self._tag:
            log.warning("consumer_cancelled_by_broker", queue=self.queue)
            self._tag = None
            self._declared = False
            self._changed.set()

    async def _deliver(self, raw: DeliveredMessage) -> None:
        delivery = Delivery(raw, time.monotonic(), self._generation)
        if self.max_held_bytes:
            size = len(raw.body)
            # Moves fast with the traffic: the next prefetch should fit what comes now.
            self.average_body += (size - self.average_body) * 0.05
            self.held_bytes += size
            if self.held_bytes > self.max_held_bytes and "held_bytes" not in self._holds:
                log.info("holding_back_deliveries", queue=self.queue, held_bytes=self.held_bytes)
                self._holds.add("held_bytes")
                self._changed.set()
        self.on_delivery(delivery)


class Subscriptions:
    """Several subscriptions, one per queue and each on a channel of its own, feeding one
    owner as one: what the owner asks of it (hold, release, back off, …) it asks of each.

    The write path consumes every commands partition through one (``worker.topology``): a
    channel per queue keeps each consumer's prefetch and delivery tags its own, so the
    ``multiple`` acks of ``ack_all`` (one per channel) never cover another queue's
    deliveries, and a queue whose leader moves is re-subscribed without touching the others.
    """

    def __init__(self, members: Iterable[Subscription]) -> None:
        self.members = tuple(members)
        self._owners: dict[int, Subscription] = {}
        for member in self.members:
            member.on_delivery = self._delivered_by(member, member.on_delivery)

    def _delivered_by(
        self, member: Subscription, on_delivery: Callable[[Delivery], None]
    ) -> Callable[[Delivery], None]:
        def deliver(delivery: Delivery) -> None:
            self._owners[id(delivery.raw.channel)] = member
            on_delivery(delivery)

        return deliver

    @property
    def queues(self) -> tuple[str, ...]:
        return tuple(member.queue for member in self.members)

    @property
    def consuming(self) -> bool:
        return all(member.consuming for member in self.members)

    @property
    def held_bytes(self) -> int:
        return sum(member.held_bytes for member in self.members)

    def current_prefetch(self) -> int:
        """What the members hold at most together."""
        return sum(member.current_prefetch() for member in self.members)

    async def start(self) -> None:
        for member in self.members:
            await member.start()

    async def stop(self) -> None:
        await asyncio.gather(*(member.stop() for member in self.members))

    async def hold(self, reason: str) -> None:
        await asyncio.gather(*(member.hold(reason) for member in self.members))

    async def release(self, reason: str) -> None:
        await asyncio.gather(*(member.release(reason) for member in self.members))

    def back_off(self) -> None:
        for member in self.members:
            member.back_off()

    def went_well(self) -> None:
        for member in self.members:
            member.went_well()

    def settled(self, deliveries: Iterable[Delivery]) -> None:
        by_member: dict[int, list[Delivery]] = {}
        for delivery in deliveries:
            owner = self._owners.get(id(delivery.raw.channel))
            if owner is not None:
                by_member.setdefault(id(owner), []).append(delivery)
        for member in self.members:
            member.settled(by_member.get(id(member), ()))

    async def keep(self) -> None:
        async with asyncio.TaskGroup() as group:
            for member in self.members:
                group.create_task(member.keep(), name=f"subscription {member.queue}")
