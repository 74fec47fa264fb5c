"""The reference RPC servers the worker's reads are compared with, each a process of its own
(as the worker is), on uvloop, consuming with the worker's RPC prefetch and replying on a
channel of their own without confirms, as the worker does:

- ``constant``: decodes the request and replies a constant ``value`` reply; no database.
  What the broker, aio-pika and direct reply-to allow: the RPC ceiling.
- ``select``: decodes the request and answers it from one indexed ``SELECT`` on a pool of
  the worker's size: the raw round trip the worker's ``get`` is compared with.

    python -m worker.bench.servers constant|select AMQP_URL QUEUE [DATABASE_URL]
"""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Final

import aio_pika
import asyncpg
import msgspec
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from schemas.codec import JSON, codec_for
from schemas.messages import GetRequest, ValueReply
from worker.config import Settings
from worker.loop import run_async

# One entry's value as the worker stores it, keyed like the worker's unique index.
SELECT_ENTRY: Final = """
SELECT value_json, version, updated_at FROM plugin_state
WHERE plugin_id = $1 AND scope_kind = $2 AND scope_id = $3 AND namespace = $4
  AND state_key = $5
"""

_CODEC: Final = codec_for(JSON)
_CONSTANT_VALUE: Final = msgspec.Raw(
    msgspec.json.encode({"status": "queued", "page": 3, "note": "x" * 240, "done": False})
)

Answer = Callable[[bytes], Awaitable[bytes]]


_CONSTANT_REPLY: Final = _CODEC.encode(
    ValueReply(
        found=True,
        value=_CONSTANT_VALUE,
        version=uuid.UUID("0192f5d4-8c1e-7a3b-9f00-1c2d3e4f5a6b"),
        updated_at=datetime(2025, 1, 1, tzinfo=UTC).isoformat(),
    )
)


async def _answer_constant(body: bytes) -> bytes:
    _CODEC.decode_read(body)
    return _CONSTANT_REPLY


def _select_answer(pool: asyncpg.Pool) -> Answer:
    async def answer(body: bytes) -> bytes:
        request = _CODEC.decode_read(body)
        assert isinstance(request, GetRequest)
        row = await pool.fetchrow(
            SELECT_ENTRY,
            request.plugin_id,
            request.scope_kind,
            request.scope_id,
            request.namespace,
            request.key,
        )
        if row is None:
            return _CODEC.encode(ValueReply(found=False))
        return _CODEC.encode(
            ValueReply(
                found=True,
                value=msgspec.Raw(row["value_json"].encode()),
                version=row["version"],
                updated_at=row["updated_at"].isoformat(),
            )
        )

    return answer


async def _serve(answer: Answer, amqp_url: str, queue_name: str, prefetch: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        replies: AbstractChannel = await connection.channel()
        queue = await channel.get_queue(queue_name, ensure=False)

        async def on_message(message: AbstractIncomingMessage) -> None:
            reply = await answer(message.body)
            assert message.reply_to is not None
            await replies.default_exchange.publish(
                aio_pika.Message(
                    reply,
                    content_type=JSON,
                    correlation_id=message.correlation_id,
                    delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
                ),
                routing_key=message.reply_to,
                mandatory=False,
            )
            await message.ack()

        await queue.consume(on_message)
        await stop.wait()


async def main(kind: str, amqp_url: str, queue_name: str, database_url: str | None) -> None:
    settings = Settings.from_env()
    if kind == "constant":
        await _serve(_answer_constant, amqp_url, queue_name, settings.rpc_prefetch)
        return
    if kind != "select" or database_url is None:
        raise SystemExit(__doc__)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=settings.db_pool_size)
    assert pool is not None
    try:
        await _serve(_select_answer(pool), amqp_url, queue_name, settings.rpc_prefetch)
    finally:
        await pool.close()


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if len(arguments) not in (3, 4):
        raise SystemExit(__doc__)
    run_async(
        main(
            arguments[0], arguments[1], arguments[2], arguments[3] if len(arguments) == 4 else None
        )
    )
