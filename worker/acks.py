"""Acks for deliveries settled out of order: the read path answers a read that waited for
its write long after the reads delivered behind it, and several tasks answer at once.

A ``multiple`` ack settles every unacked delivery of its channel up to its tag, so it is
sound only below the lowest delivery still unsettled; acking a delivery twice, or nacking
one a ``multiple`` ack already covered, is a channel error (``PRECONDITION_FAILED - unknown
delivery tag``) that closes the channel and requeues all it held. The ledger knows, per
channel, every delivery handed out and not yet acked or given back, and acks with
``multiple`` only up to the lowest of those; deliveries settled above it are acked one by
one. Flushes are serialized, so that no decision is taken while another's acks are still
being written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import structlog

from worker.broker import BROKER_FAILURES, Delivery, nack_all

log = structlog.get_logger(__name__)


class AckLedger:
    """What each channel's deliveries await: an answer (open), an ack, or to be given back."""

    def __init__(self) -> None:
        self._open: dict[int, dict[int, Delivery]] = {}
        """id(channel) -> delivery tag -> delivery, neither acked nor given back yet."""
        self._to_ack: list[Delivery] = []
        self._to_nack: list[Delivery] = []
        self._lock = asyncio.Lock()

    def received(self, delivery: Delivery) -> None:
        """A delivery was handed out: it stays open until settled and flushed."""
        self._open.setdefault(_channel_key(delivery), {})[delivery.delivery_tag] = delivery

    def answered(self, delivery: Delivery) -> None:
        """Its reply (or dead letter) is sent, or it expired: ack it at the next flush."""
        self._to_ack.append(delivery)

    def give_back(self, delivery: Delivery) -> None:
        """What settling it needs failed: requeue it at the next flush."""
        self._to_nack.append(delivery)

    @property
    def open_count(self) -> int:
        return sum(len(tags) for tags in self._open.values())

    async def flush(self) -> tuple[list[Delivery], list[Delivery]]:
        """Give back, then ack, what was settled since the last flush; returns both."""
        async with self._lock:
            failed, self._to_nack = self._to_nack, []
            settled, self._to_ack = self._to_ack, []
            self._close(failed)
            self._close(settled)
            await nack_all(failed)
            await self._ack(settled)
        return failed, settled

    def _close(self, deliveries: Iterable[Delivery]) -> None:
        for delivery in deliveries:
            key = _channel_key(delivery)
            tags = self._open.get(key)
            if tags is None:
                continue
            tags.pop(delivery.delivery_tag, None)
            if not tags:
                del self._open[key]

    async def _ack(self, settled: list[Delivery]) -> None:
        by_channel: dict[int, list[Delivery]] = {}
        for delivery in settled:
            by_channel.setdefault(_channel_key(delivery), []).append(delivery)
        for key, deliveries in by_channel.items():
            still_open = self._open.get(key)
            lowest_open = min(still_open) if still_open else float("inf")
            below = [d for d in deliveries if d.delivery_tag < lowest_open]
            above = [d for d in deliveries if d.delivery_tag > lowest_open]
            try:
                if below:
                    newest = max(below, key=lambda d: d.delivery_tag)
                    await newest.channel.basic_ack(newest.delivery_tag, multiple=True)
                for delivery in above:
                    await delivery.channel.basic_ack(delivery.delivery_tag)
            except BROKER_FAILURES as exc:
                # The channel is gone, and the broker requeues what it held.
                log.info("ack_lost_with_channel", error=repr(exc))


def _channel_key(delivery: Delivery) -> int:
    # The channel object lives as long as any of its deliveries is held (each refers to
    # it), so its id cannot be reused while the ledger holds a delivery of it.
    return id(delivery.raw.channel)
