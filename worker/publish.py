"""What the worker sends: replies to callers and rejected messages to the dead-letter exchange.

Both write path and read path publish through this one place. Every publish is bounded in
time (a broker that is away makes it fail, it never hangs a drain). Dead letters go on a
channel with publisher confirms, so "dead-lettered" always means "the broker has it".

A dead letter is the rejected message as it arrived, body and properties, with its reason in
headers. The headers that record a rejection (``x-reject-*``, ``x-original-*``, RabbitMQ's
``x-death`` and friends) are the worker's and RabbitMQ's to write: a publisher's own are
dropped first, so a dead letter can never claim another publisher, routing key or reason
than its own (``dead replay`` trusts them).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any, Final

import pamqp.encode
import structlog
from aio_pika.abc import AbstractChannel
from pamqp.commands import Basic

from schemas.codec import Codec
from schemas.errors import StateError
from schemas.messages import Reply
from worker.broker import Delivery

log = structlog.get_logger(__name__)

PUBLISH_TIMEOUT: Final = 10.0
# What pamqp raises for a property it cannot encode (a short string that grew past 255
# bytes when bad UTF-8 was replaced on the way in, say).
_UNENCODABLE: Final = (ValueError, TypeError, OverflowError, struct.error)

# Long reasons (a msgspec path into a huge batch) are cut so the header stays small.
_MAX_REASON: Final = 1000
# A content header must fit in one frame (128 KiB by default); the original headers and
# ours must fit together, so larger original headers are left out of the dead letter.
MAX_KEPT_HEADER_BYTES: Final = 64 * 1024

BOOKKEEPING_PREFIXES: Final = ("x-reject-", "x-original-", "x-first-death-", "x-last-death-")
BOOKKEEPING_HEADERS: Final = frozenset({"x-death", "x-delivery-count"})


def without_bookkeeping(headers: dict[str, Any]) -> dict[str, Any]:
    """``headers`` without those that record how a message was dead-lettered."""
    return {
        name: value
        for name, value in headers.items()
        if name not in BOOKKEEPING_HEADERS and not name.startswith(BOOKKEEPING_PREFIXES)
    }


def _encoded_size(headers: dict[str, Any]) -> int | None:
    try:
        return len(pamqp.encode.field_table(headers))
    except (TypeError, ValueError, OverflowError, RecursionError):
        return None


def dead_letter_properties(message: Delivery, error: StateError) -> Basic.Properties:
    """The rejected message's properties, persistent, with the reason in its headers.

    Not its expiration (a dead letter stays until an operator replays or purges it, and a
    replay's clock would start again) and not its ``user_id`` (RabbitMQ would refuse our
    publish with another user's): that goes into ``x-original-user-id``."""
    original = message.properties
    headers = without_bookkeeping(dict(original.headers or {}))
    size = _encoded_size(headers)
    dropped = size is None or size > MAX_KEPT_HEADER_BYTES
    if dropped:
        headers = {"x-reject-headers-dropped": f"{size or 'unencodable'} bytes of headers"}
    headers["x-reject-code"] = error.code
    headers["x-reject-reason"] = error.message[:_MAX_REASON]
    headers["x-original-routing-key"] = message.routing_key
    headers["x-original-exchange"] = message.raw.exchange or ""
    if original.user_id:
        headers["x-original-user-id"] = original.user_id
    return Basic.Properties(
        content_type=original.content_type,
        content_encoding=original.content_encoding,
        headers=headers,
        delivery_mode=2,
        priority=original.priority,
        correlation_id=original.correlation_id,
        reply_to=original.reply_to,
        message_id=original.message_id,
        timestamp=original.timestamp,
        message_type=original.message_type,
        app_id=original.app_id,
    )


class Publisher:
    """Replies go on a channel without confirms (a lost reply is a caller's time-out, and
    waiting for a confirm would add a round trip to every read); dead letters go to the
    dead-letter exchange on a channel with confirms."""

    def __init__(
        self, reply_channel: AbstractChannel, confirm_channel: AbstractChannel, dead: str
    ) -> None:
        self.reply_channel = reply_channel
        self.confirm_channel = confirm_channel
        self.dead = dead

    async def reply(
        self, reply_to: str, correlation_id: str | None, reply: Reply, codec: Codec
    ) -> None:
        """Send an encoded reply to the caller's queue (direct reply-to or its own) via the
        default exchange; a caller that has gone away just drops it."""
        await self.reply_body(reply_to, correlation_id, codec.encode(reply), codec)

    async def reply_body(
        self, reply_to: str, correlation_id: str | None, body: bytes, codec: Codec
    ) -> None:
        # Straight to aiormq: building an aio-pika Message per reply was a fifth of the read
        # path's CPU. Not mandatory: RabbitMQ treats a direct reply-to name as unroutable
        # for a mandatory publish and would return every reply.
        properties = Basic.Properties(
            content_type=codec.content_type, correlation_id=correlation_id, delivery_mode=1
        )
        async with asyncio.timeout(PUBLISH_TIMEOUT):
            channel = await self.reply_channel.get_underlay_channel()
            try:
                await channel.basic_publish(
                    body, exchange="", routing_key=reply_to, properties=properties
                )
            except _UNENCODABLE as exc:
                # The request's own correlation_id or reply_to cannot be sent back: no reply
                # could ever reach the caller.
                log.warning("reply_unsendable", error=repr(exc))

    async def dead_letter(self, message: Delivery, error: StateError) -> None:
        """Republish a rejected message, body and properties intact, with its reason; returns
        once the broker confirmed it. Properties that cannot be sent again are left out."""
        async with asyncio.timeout(PUBLISH_TIMEOUT):
            channel = await self.confirm_channel.get_underlay_channel()
            try:
                properties = dead_letter_properties(message, error)
                await channel.basic_publish(
                    message.body,
                    exchange=self.dead,
                    routing_key=message.routing_key,
                    properties=properties,
                )
            except _UNENCODABLE as exc:
                properties = Basic.Properties(
                    headers={
                        "x-reject-code": error.code,
                        "x-reject-reason": error.message[:_MAX_REASON],
                        "x-reject-properties-dropped": repr(exc)[:_MAX_REASON],
                        "x-original-routing-key": message.routing_key,
                        "x-original-exchange": message.raw.exchange or "",
                    },
                    delivery_mode=2,
                )
                # The exchange is a fanout: the routing key is only for people to read.
                await channel.basic_publish(
                    message.body, exchange=self.dead, routing_key="", properties=properties
                )
