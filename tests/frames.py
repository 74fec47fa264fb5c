"""Publishing AMQP properties that no well-behaved client sends, as an attacker would.

pamqp refuses to encode what it could not decode (an out-of-range timestamp, a short string
that is not UTF-8, a header table nested thousands deep), so the tests swap its encoders,
for the length of one publish, for ones that put a ``RawField`` on the wire as it is. RabbitMQ
accepts all of these and hands them on to consumers.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterator
from typing import Any

import aio_pika
from pamqp import encode
from pamqp.commands import Basic

from . import helpers


class RawField(bytes):
    """A property's whole encoding, sent as is."""


def short_string(raw: bytes) -> RawField:
    return RawField(bytes([len(raw)]) + raw)


def timestamp(seconds: int) -> RawField:
    return RawField(struct.pack(">Q", seconds))


def table(entries: bytes) -> RawField:
    return RawField(struct.pack(">I", len(entries)) + entries)


def deep_table(depth: int) -> RawField:
    """``{"a": {"a": ...}}``, ``depth`` tables deep."""
    inner = struct.pack(">I", 0)
    for _ in range(depth):
        entry = b"\x01aF" + inner
        inner = struct.pack(">I", len(entry)) + entry
    return RawField(inner)


@contextlib.contextmanager
def raw_fields() -> Iterator[None]:
    saved = dict(encode.METHODS)

    def passing(name: str) -> Callable[[Any], bytes]:
        original = saved[name]
        return lambda value: bytes(value) if isinstance(value, RawField) else original(value)

    for name in ("shortstr", "timestamp", "table"):
        encode.METHODS[name] = passing(name)
    try:
        yield
    finally:
        encode.METHODS.update(saved)


async def publish_raw(
    channel: aio_pika.abc.AbstractChannel,
    exchange: str,
    routing_key: str,
    body: bytes,
    **properties: Any,
) -> None:
    """Publish with properties that may hold ``RawField`` values, confirmed when the
    channel confirms."""
    properties.setdefault("user_id", helpers.PUBLISHER)
    underlay = await channel.get_underlay_channel()
    with raw_fields():
        await underlay.basic_publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            properties=Basic.Properties(delivery_mode=2, **properties),
        )
