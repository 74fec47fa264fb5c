"""The client's wire: one robust AMQP connection (to any node of the broker's, moving to
another when that one goes down: ``failover``), one channel with publisher confirms, and
replies through direct reply-to (or a reply queue of the client's own).

``Connection.call`` publishes a message and, for a read or a write that waits, waits for
its answer, until the call's deadline: when the connection or channel is lost, the call is
sent again once the channel is back (reads are idempotent; a write is re-sent with the same
id, which the contract makes harmless). A nacked publish is sent again on a fresh channel,
with back-off, until a bounded run of nacks makes it a refusal (``nacks``). So a call
either completes or raises (``RequestTimeout``, ``PublishRefused``...); it never hangs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from msgspec import Struct

from schemas.codec import Codec, codec_for
from schemas.errors import Forbidden, StateError, error_from_code
from schemas.messages import ErrorReply, Reply
from schemas.topology import DEADLINE_HEADER, DIRECT_REPLY_TO, Names

from . import failover, nacks
from .errors import NotConnected, PublishRefused, RequestTimeout, UnexpectedReply, Unroutable
from .log import get_logger

log = get_logger(__name__)

R = TypeVar("R", bound=Struct)

RECONNECT_INTERVAL: Final = 1.0
"""The longest pause between two rounds of reconnection attempts over the broker's nodes
(aio-pika's default, 5 s, is as long as a whole default call); a quarter of it between two
nodes of a round."""
_REPLY_MARGIN: Final = 0.5
"""Reads expire this much (at most 10 % of the remaining time) before the caller gives up,
so that an answer the worker sends at the expiration (``write_pending``) still arrives."""
_RETRY_INITIAL: Final = 0.05
_RETRY_MAX: Final = 1.0


class _Resend(Exception):
    """The channel was lost while a call was in flight: send it again."""


class _Nacked(Exception):
    """The broker nacked the publish (``nacks``): send it again on a fresh channel."""

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        super().__init__("nacked")
        self.channel = channel


class Connection:
    """Publishes calls and matches their replies, across reconnects."""

    def __init__(
        self,
        urls: tuple[str, ...],
        names: Names,
        codec: Codec,
        *,
        user_id: str,
        reply_to: str,
        timeout: float,
        connection_name: str,
    ) -> None:
        self.urls = urls
        self.names = names
        self.codec = codec
        self.user_id = user_id
        self.reply_to = reply_to
        self.timeout = timeout
        self.connection_name = connection_name
        self.on_lost: list[Callable[[], None]] = []
        """Called when the channel is lost (a watcher's or a cache's position may then be
        all they can trust)."""
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchange: AbstractExchange | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def connected(self) -> bool:
        """Open, with its channel up (not reconnecting)."""
        channel = self._channel
        return channel is not None and not channel.is_closed

    async def open(self) -> None:
        """Connect, open the confirm channel and consume the replies on it."""
        if self._connection is not None:
            raise RuntimeError("the client is already connected")
        connection = await failover.connect(
            self.urls,
            connection_name=self.connection_name,
            timeout=self.timeout,
            retry_initial=RECONNECT_INTERVAL / 4,
            retry_max=RECONNECT_INTERVAL,
        )
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            channel.close_callbacks.add(self._on_channel_closed)
            # Declared robust, the reply consumer is restored with the channel after a
            # reconnect, before the channel counts as ready again.
            if self.reply_to == DIRECT_REPLY_TO:
                replies = await channel.declare_queue(DIRECT_REPLY_TO, passive=True)
            else:
                replies = await channel.declare_queue(
                    self.reply_to, exclusive=True, auto_delete=True
                )
            await replies.consume(self._on_reply, no_ack=True)
        except BaseException:
            await connection.close()
            raise
        connection.reconnect_callbacks.add(self._on_reconnected)
        self._connection = connection
        self._channel = channel
        self._exchange = await channel.get_exchange(self.names.exchange, ensure=False)
        log.info("state_client_connected", connection_name=self.connection_name)

    async def close(self) -> None:
        """Close; calls still in flight raise ``NotConnected``."""
        connection = self._connection
        if connection is None:
            return
        self._connection = self._channel = self._exchange = None
        self._fail_pending(NotConnected("the client was closed"))
        await connection.close()
        log.info("state_client_closed", connection_name=self.connection_name)

    async def call(
        self,
        routing_key: str,
        body: bytes,
        *,
        reply: bool,
        timeout: float | None,
        write_id: uuid.UUID | None = None,
    ) -> Reply | None:
        """Publish (and, with ``reply``, wait for the answer) until done or the deadline;
        a channel lost on the way means sending again. A write (``write_id``) is
        persistent and never expires: the worker must apply it even if nobody waits."""
        seconds = self.timeout if timeout is None else timeout
        deadline = asyncio.timeout(seconds)
        delay = _RETRY_INITIAL
        run = nacks.NackRun(f"exchange {self.names.exchange!r}, routing key {routing_key!r}")
        try:
            async with deadline:
                while True:
                    try:
                        return await self._attempt(
                            routing_key,
                            body,
                            reply=reply,
                            expires_at=None if write_id else deadline.when(),
                            write_id=write_id,
                        )
                    except _Resend as exc:
                        log.info("state_client_retry", reason=str(exc), retry_in=delay)
                        pause, delay = delay, min(delay * 2, _RETRY_MAX)
                    except _Nacked as nacked:
                        pause = run.nacked()
                        log.info("state_client_nacked", nacks=run.count, retry_in=pause)
                        await self._renew(nacked.channel)
                    await asyncio.sleep(pause)
        except TimeoutError:
            if not deadline.expired():
                raise
            if run.count:
                # The broker's last word was a nack, not silence.
                raise run.refusal() from None
            what = "reply" if reply else "publisher confirm"
            raise RequestTimeout(
                f"no {what} within {seconds}s for {routing_key} on {self.names.exchange}"
            ) from None

    async def _attempt(
        self,
        routing_key: str,
        body: bytes,
        *,
        reply: bool,
        expires_at: float | None,
        write_id: uuid.UUID | None,
    ) -> Reply | None:
        if self._channel is None or self._exchange is None:
            raise NotConnected("the client is not connected: call connect() first")
        channel, exchange = self._channel, self._exchange
        await channel.ready()
        underlay = await channel.get_underlay_channel()
        loop = asyncio.get_running_loop()
        correlation_id = uuid.uuid4().hex
        waiter: asyncio.Future[Reply] | None = None
        if reply:
            waiter = loop.create_future()
            self._pending[correlation_id] = waiter
        message = aio_pika.Message(
            body,
            content_type=self.codec.content_type,
            delivery_mode=(
                aio_pika.DeliveryMode.NOT_PERSISTENT
                if write_id is None
                else aio_pika.DeliveryMode.PERSISTENT
            ),
            timestamp=datetime.now(UTC),
            expiration=None if expires_at is None else _expiration(expires_at - loop.time()),
            headers=None if expires_at is None else {DEADLINE_HEADER: _deadline_ms(expires_at)},
            message_id=None if write_id is None else str(write_id),
            user_id=self.user_id,
            reply_to=self.reply_to if reply else None,
            correlation_id=correlation_id if reply else None,
        )
        try:
            try:
                await _publish(exchange, message, routing_key)
            except aiormq.exceptions.DeliveryError:
                raise _Nacked(underlay) from None
            return None if waiter is None else await waiter
        finally:
            self._pending.pop(correlation_id, None)
            if waiter is not None and waiter.done() and not waiter.cancelled():
                # A channel loss may have failed it while the publish failed too: that
                # failure is moot, and asyncio would log it as never retrieved.
                waiter.exception()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        waiter = self._pending.get(message.correlation_id or "")
        if waiter is None or waiter.done():
            # Its caller gave up (timed out) or was answered already.
            log.debug("state_client_reply_unclaimed", correlation_id=message.correlation_id)
            return
        try:
            waiter.set_result(codec_for(message.content_type).decode_reply(message.body))
        except StateError as exc:
            waiter.set_exception(exc)

    def _on_channel_closed(self, _channel: object, exc: BaseException | None) -> None:
        if self._connection is None:
            return  # closed by close(), which failed the pending calls itself
        # Replies addressed to the lost channel will never arrive: send again.
        log.warning("state_client_channel_lost", error=repr(exc), pending=len(self._pending))
        self._fail_pending(_Resend(f"channel lost: {exc!r}"))
        for callback in self.on_lost:
            callback()

    async def _renew(self, nacked: aiormq.abc.AbstractChannel) -> None:
        """Replace the channel that nacked, unless that was done already (calls nacked
        together renew it once): the robust channel opens a fresh one, with the reply
        consumer, and the calls in flight on the old one are sent again."""
        channel = self._channel
        if channel is None or nacked.is_closed:
            return
        try:
            current = await channel.get_underlay_channel()
            if current is nacked:
                log.info("state_client_channel_renewed", reason="nacked")
                await current.close()
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            log.info("state_client_channel_renew_failed", error=repr(exc))
        except asyncio.CancelledError:
            # aiormq cancels a channel's pending close when its connection is lost (a node
            # killed): that is the connection going, which the robust connection mends, not
            # this call being cancelled, unless it is.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            log.info("state_client_channel_renew_failed", error="connection lost")

    def _on_reconnected(self, _connection: object) -> None:
        log.info("state_client_reconnected", connection_name=self.connection_name)

    def _fail_pending(self, exc: Exception) -> None:
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(exc)


def expect(reply: Reply | None, kind: type[R]) -> R:
    """The reply as ``kind``; an ``error`` reply raises its code's ``StateError``."""
    if isinstance(reply, ErrorReply):
        raise error_from_code(reply.code, reply.message)
    if not isinstance(reply, kind):
        raise UnexpectedReply(f"expected a {kind.__name__}, got {type(reply).__name__}")
    return reply


async def _publish(exchange: AbstractExchange, message: aio_pika.Message, routing_key: str) -> None:
    """Publish, mandatory, and wait for the confirm; broker answers become typed errors
    (but a nack, ``aiormq.exceptions.DeliveryError``, which the caller retries), a lost
    channel becomes ``_Resend``."""
    where = f"exchange {exchange.name!r}, routing key {routing_key!r}"
    try:
        await exchange.publish(message, routing_key, mandatory=True)
    except aiormq.exceptions.PublishError:
        raise Unroutable(
            f"no queue is bound for {where}, or its node is down: is a worker running?"
        ) from None
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise PublishRefused(f"the broker refused the message ({where}): {exc}") from None
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise Unroutable(f"no exchange {exchange.name!r}: is a worker running?") from None
    except aiormq.exceptions.ChannelAccessRefused as exc:
        raise Forbidden(f"the broker refused the publish ({where}): {exc}") from None
    except (
        aiormq.exceptions.AMQPConnectionError,
        aiormq.exceptions.ChannelClosed,
        aiormq.exceptions.ChannelInvalidStateError,
        ConnectionError,
    ) as exc:
        raise _Resend(f"publish failed: {exc!r}") from None


def _expiration(remaining: float) -> float:
    return max(remaining - min(_REPLY_MARGIN, remaining / 10), 0.001)


def _deadline_ms(expires_at: float) -> int:
    """The Unix time in ms at which a read expires, from its loop-time deadline."""
    remaining = _expiration(expires_at - asyncio.get_running_loop().time())
    return int((time.time() + remaining) * 1000)
