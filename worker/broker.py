"""What talking to RabbitMQ entails, for every component that consumes or publishes: the
failures it may raise, and how in-flight deliveries settle after a cancel."""

from __future__ import annotations

import asyncio
from typing import Final

import aio_pika
import aiormq

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
