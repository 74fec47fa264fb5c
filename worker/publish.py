"""What the worker sends: replies to callers, rejected messages to the dead-letter exchange,
and bursts of persistent messages (the change feed's relay).

Both write path and read path publish through this one place. Every publish is bounded in
time (a broker that is away makes it fail, it never hangs a drain). Dead letters go on a
channel with publisher confirms, so "dead-lettered" always means "the broker has it".

A burst (``publish_in_order``) is written to the socket as one block of frames, encoded
here, with one confirmation per message: aiormq's ``basic_publish`` costs a lock round, a
task and a socket write per message (about 150 µs of CPU each under load, against 30 µs in
a burst), which made the relay, one message per change, the write path's largest cost.

A dead letter is the rejected message as it arrived, body and properties, with its reason in
headers. The headers that record a rejection (``x-reject-*``, ``x-original-*``, RabbitMQ's
``x-death`` and friends) are the worker's and RabbitMQ's to write: a publisher's own are
dropped first, so a dead letter can never claim another publisher, routing key or reason
than its own (``dead replay`` trusts them).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

import aiormq
import pamqp.encode
import structlog
from aio_pika.abc import AbstractChannel
from aiormq.abc import ChannelFrame
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


# ----------------------------------------------------------------------------- bursts

_FRAME_END: Final = b"\xce"
_METHOD_FRAME: Final = 1
_HEADER_FRAME: Final = 2
_BODY_FRAME: Final = 3
_BASIC_CLASS: Final = 60
_BASIC_PUBLISH: Final = 40
# Basic property flags (AMQP 0-9-1 §4.2.6.1, in the order of the properties).
_CONTENT_TYPE: Final = 0x8000
_DELIVERY_MODE: Final = 0x1000
_MESSAGE_ID: Final = 0x0080
_MESSAGE_TYPE: Final = 0x0020
_PERSISTENT: Final = 2


class Outgoing(NamedTuple):
    """One message of a burst."""

    routing_key: str
    message_id: str
    body: bytes


def _short_string(text: str) -> bytes:
    data = text.encode()
    if len(data) > 255:
        raise ValueError(f"an AMQP short string holds at most 255 bytes, not {len(data)}")
    return bytes((len(data),)) + data


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + _FRAME_END


def burst_frames(
    channel: int,
    exchange: str,
    messages: Sequence[Outgoing],
    *,
    content_type: str,
    message_type: str,
    max_content: int,
) -> bytes:
    """The frames of ``messages`` published persistent to ``exchange`` on ``channel``, as
    pamqp would encode them (``basic.publish``, a content header with ``content_type``,
    ``delivery_mode`` 2, ``message_id`` and ``type``, the body in frames of at most
    ``max_content`` bytes), for far less CPU: only the message id and the body vary."""
    exchange_field = _short_string(exchange)
    fixed = _short_string(content_type) + bytes((_PERSISTENT,))
    kind = _short_string(message_type)
    flags = _CONTENT_TYPE | _DELIVERY_MODE | _MESSAGE_ID | _MESSAGE_TYPE
    methods: dict[str, bytes] = {}
    parts: list[bytes] = []
    for routing_key, message_id, body in messages:
        method = methods.get(routing_key)
        if method is None:
            method = methods[routing_key] = _frame(
                _METHOD_FRAME,
                channel,
                struct.pack(">HHH", _BASIC_CLASS, _BASIC_PUBLISH, 0)
                + exchange_field
                + _short_string(routing_key)
                + b"\x00",  # neither mandatory nor immediate
            )
        parts.append(method)
        properties = fixed + _short_string(message_id) + kind
        parts.append(
            _frame(
                _HEADER_FRAME,
                channel,
                struct.pack(">HHQH", _BASIC_CLASS, 0, len(body), flags) + properties,
            )
        )
        for start in range(0, len(body), max_content):
            parts.append(_frame(_BODY_FRAME, channel, body[start : start + max_content]))
    return b"".join(parts)


class Confirmations:
    """The broker's answers to the messages of a burst, awaited together."""

    def __init__(self, channel: aiormq.Channel, first_tag: int, count: int) -> None:
        loop = asyncio.get_running_loop()
        self._pending = count
        self._refused = 0
        # The only future of the channel's own: closing the channel fails it, and with it
        # ``refused``; one per message would cost a fifth of a publish.
        self._answered_all = channel.create_future()
        self._futures: list[asyncio.Future[Any]] = []
        for tag in range(first_tag, first_tag + count):
            confirmation = loop.create_future()
            confirmation.add_done_callback(self._answered)
            channel.confirmations[tag] = confirmation
            self._futures.append(confirmation)
        if not count:
            self._answered_all.set_result(None)

    def _answered(self, confirmation: asyncio.Future[Any]) -> None:
        acked = (
            not confirmation.cancelled()
            and confirmation.exception() is None
            and isinstance(confirmation.result(), Basic.Ack)
        )
        self._refused += not acked
        self._pending -= 1
        if not self._pending and not self._answered_all.done():
            self._answered_all.set_result(None)

    async def refused(self) -> int:
        """How many of the messages the broker refused (nacked), once it answered every
        one; raises when the channel closed first."""
        await self._answered_all
        return self._refused

    def abandon(self) -> None:
        """Stop waiting: later answers are ignored."""
        for confirmation in self._futures:
            confirmation.cancel()
        self._answered_all.cancel()


async def publish_in_order(
    channel: aiormq.abc.AbstractChannel,
    exchange: str,
    messages: Sequence[Outgoing],
    *,
    content_type: str,
    message_type: str,
) -> Confirmations:
    """Publish ``messages`` persistent, in order, on a channel with publisher confirms, in
    one write to the socket; returns once they are written, with their confirmations.

    It does what aiormq's ``basic_publish`` does for one message, for all of them at once:
    under the channel's lock (so no other publish comes between, and the delivery tags
    follow the order on the wire), each message takes the next delivery tag and registers
    its confirmation where the channel's reader resolves it."""
    if not isinstance(channel, aiormq.Channel) or not channel.publisher_confirms:
        raise TypeError("publish_in_order needs an aiormq channel with publisher confirms")
    async with channel.lock:
        payload = burst_frames(
            channel.number,
            exchange,
            messages,
            content_type=content_type,
            message_type=message_type,
            max_content=channel.max_content_size,
        )
        first = channel.delivery_tag + 1
        confirmations = Confirmations(channel, first, len(messages))
        channel.delivery_tag += len(messages)
        written = channel.create_future()
        try:
            await channel.write_queue.put(ChannelFrame(payload, False, written))
        except BaseException:
            # Not queued, so the broker never sees these tags: give them back.
            channel.delivery_tag -= len(messages)
            for tag in range(first, first + len(messages)):
                channel.confirmations.pop(tag, None)
            confirmations.abandon()
            raise
        await written
    return confirmations
