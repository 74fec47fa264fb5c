"""A raw RPC caller over direct reply-to, independent of the project's client."""

from __future__ import annotations

import asyncio
import uuid
from types import TracebackType
from typing import Any

import aio_pika
import msgspec

from schemas.codec import JSON, MSGPACK

from . import helpers
from .helpers import encode

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


_AS_TEST_USER: Any = object()


class RawRpc:
    """Calls and publishes as the connection's user; ``user_id`` is what messages carry
    (the test user by default, None for none, anything else to try forging it)."""

    def __init__(self, amqp_url: str, prefix: str, user_id: str | None = _AS_TEST_USER) -> None:
        self.amqp_url = amqp_url
        self.prefix = prefix
        self.user_id = helpers.PUBLISHER if user_id is _AS_TEST_USER else user_id
        self._futures: dict[str, asyncio.Future[aio_pika.abc.AbstractIncomingMessage]] = {}

    async def __aenter__(self) -> RawRpc:
        self.connection = await aio_pika.connect(self.amqp_url)
        self.channel = await self.connection.channel()
        queue = await self.channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await queue.consume(self._on_reply, no_ack=True)
        self.exchange = await self.channel.get_exchange(self.prefix, ensure=False)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.connection.close()

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        future = self._futures.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message)

    async def send(
        self,
        plugin_id: uuid.UUID | str,
        body: dict[str, Any] | bytes,
        *,
        content_type: str | None = JSON,
        expiration: float | None = None,
        reply: bool = True,
        kind: str = "rpc",
        headers: dict[str, Any] | None = None,
    ) -> asyncio.Future[aio_pika.abc.AbstractIncomingMessage]:
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[aio_pika.abc.AbstractIncomingMessage] = (
            asyncio.get_running_loop().create_future()
        )
        self._futures[correlation_id] = future
        await self.exchange.publish(
            aio_pika.Message(
                encode(body, content_type or JSON),
                content_type=content_type,
                correlation_id=correlation_id,
                reply_to=DIRECT_REPLY_TO if reply else None,
                expiration=expiration,
                user_id=self.user_id,
                headers=headers,
            ),
            routing_key=f"{kind}.{plugin_id}",
        )
        return future

    async def answering(self, plugin_id: uuid.UUID) -> bool:
        """Whether a worker answers a `get` within a second: a probe for ``wait_until``."""
        try:
            await self.call(plugin_id, helpers.get_request(plugin_id, "nothing"), timeout=1)
        except TimeoutError:
            return False
        return True

    async def call(
        self,
        plugin_id: uuid.UUID | str,
        body: dict[str, Any] | bytes,
        *,
        content_type: str | None = JSON,
        expiration: float | None = None,
        timeout: float = 10.0,
        kind: str = "rpc",
        headers: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Send and wait for the reply (a write with ``kind="cmd"`` gets one after commit)."""
        future = await self.send(
            plugin_id,
            body,
            content_type=content_type,
            expiration=expiration,
            kind=kind,
            headers=headers,
        )
        message = await asyncio.wait_for(future, timeout)
        assert message.content_type == (content_type if content_type == MSGPACK else JSON)
        decoded: dict[str, Any] = (
            msgspec.msgpack.decode(message.body)
            if message.content_type == MSGPACK
            else msgspec.json.decode(message.body)
        )
        return decoded
