"""What the worker sends: replies to callers and rejected messages to the dead-letter exchange.

Both write path and read path publish through this one place, on a channel with publisher
confirms, so "dead-lettered" always means "the broker has it".
"""

from __future__ import annotations

from typing import Any, Final

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage
from pamqp.commands import Basic

from schemas.codec import Codec
from schemas.errors import StateError
from schemas.messages import Reply

PUBLISH_TIMEOUT: Final = 10.0

# Long reasons (a msgspec path into a huge batch) are cut so the header stays small.
_MAX_REASON: Final = 1000


class Publisher:
    """Replies go on a channel without confirms (a lost reply is a caller's time-out, and
    waiting for a confirm would add a round trip to every read); dead letters go through an
    exchange object of a channel with confirms."""

    def __init__(self, reply_channel: AbstractChannel, dead_exchange: AbstractExchange) -> None:
        self.reply_channel = reply_channel
        self.dead_exchange = dead_exchange

    async def reply(
        self, reply_to: str, correlation_id: str | None, reply: Reply, codec: Codec
    ) -> None:
        """Send a reply to the caller's queue (direct reply-to or its own) via the default
        exchange; a caller that has gone away just drops it."""
        # Straight to aiormq: building an aio-pika Message per reply was a fifth of the read
        # path's CPU. Not mandatory: RabbitMQ treats a direct reply-to name as unroutable
        # for a mandatory publish and would return every reply.
        channel = await self.reply_channel.get_underlay_channel()
        await channel.basic_publish(
            codec.encode(reply),
            exchange="",
            routing_key=reply_to,
            properties=Basic.Properties(
                content_type=codec.content_type, correlation_id=correlation_id, delivery_mode=1
            ),
            mandatory=False,
            timeout=PUBLISH_TIMEOUT,
        )

    async def dead_letter(self, message: AbstractIncomingMessage, error: StateError) -> None:
        """Republish a rejected message, body and properties intact, with its reason."""
        headers = dict(message.headers or {})
        # The commands queue's own count, not the message's: the dead queue keeps its own.
        headers.pop("x-delivery-count", None)
        headers["x-reject-code"] = error.code
        headers["x-reject-reason"] = error.message[:_MAX_REASON]
        headers["x-original-routing-key"] = message.routing_key or ""
        headers["x-original-exchange"] = message.exchange or ""
        if message.user_id:
            # RabbitMQ would refuse our publish with another user's user_id: keep it aside.
            headers["x-original-user-id"] = message.user_id
        dead = copy_message(message, headers)
        await self.dead_exchange.publish(
            dead, routing_key=message.routing_key or "", timeout=PUBLISH_TIMEOUT
        )


def copy_message(
    message: AbstractIncomingMessage, headers: dict[str, Any], user_id: str | None = None
) -> aio_pika.Message:
    """A persistent copy of a delivered message (body and properties) with new headers.

    Not the expiration: a dead letter stays until an operator replays or purges it, and a
    replay's clock would start again. ``user_id`` only as the publisher's own user: RabbitMQ
    refuses any other.
    """
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
        priority=message.priority,
        user_id=user_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
