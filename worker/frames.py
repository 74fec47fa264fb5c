"""Makes AMQP frame decoding total, so that no message property can close a connection.

RabbitMQ passes on property values that pamqp (under aiormq and aio-pika) cannot turn into
Python: a timestamp past the year 9999 (a millisecond epoch, or a Java client's negative
time), a short string that is not UTF-8, a header table nested deeper than the interpreter's
stack or with a key that is not UTF-8. pamqp raises inside the frame reader, aiormq closes the
whole connection, and the unacked message comes back to the next consumer, which dies the same
way: one published message takes down every worker, on both paths (aiormq issue #186 is the
timestamp case).

``make_total()`` changes pamqp's decoding, process-wide and idempotently, in three places:

- a timestamp that no ``datetime`` can hold decodes as None (absent): the worker never
  trusts a publisher's timestamp anyway;
- a short string that is not UTF-8 decodes with U+FFFD for each bad byte, so it can still be
  read, logged and re-encoded (a dead letter carries it that way);
- anything else that fails while decoding a content header's properties leaves the message
  with no properties but one header, ``UNREADABLE_HEADER``, giving the reason: the message
  still arrives (its body intact) and is refused as ``invalid_message``.

It also decodes the two frames every delivery brings, ``basic.deliver`` and the content
header's properties, with code of their own instead of pamqp's generic loops (which slice
the rest of the frame after every field and look each field's type up by name): a sixth of
the write path's CPU. Same values, same failures (checked against pamqp's own decoding by
a property test), and whatever the fast code does not know (a table, a timestamp) is
decoded as above.

Every module that talks AMQP calls it before connecting (``worker.broker`` at import).
"""

from __future__ import annotations

import datetime
import struct
from typing import Any, Final

from pamqp import commands, decode, header

UNREADABLE_HEADER: Final = "x-unreadable-properties"
"""Set, with the reason, on a message whose properties could not be decoded."""

_installed = False


def _timestamp(value: bytes) -> tuple[int, datetime.datetime | None]:
    try:
        seconds = struct.unpack(">Q", value[0:8])[0]
    except struct.error as err:
        raise ValueError("Could not unpack timestamp value") from err
    if seconds > 0xFFFFFFFF:
        # pamqp reads values past the year 2106 as milliseconds; keep that reading.
        seconds /= 1000.0
    try:
        return 8, datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    except (OverflowError, ValueError, OSError):
        return 8, None


def _short_str(value: bytes) -> tuple[int, str]:
    return _short_str_at(value, 0)


_PROPERTIES: Final = tuple(
    (name, commands.Basic.Properties.flags[name], getattr(commands.Basic.Properties, "_" + name))
    for name in commands.Basic.Properties.__slots__
)
"""Each property in wire order: its name, its flag and its type."""


def _short_str_at(data: bytes, at: int) -> tuple[int, str]:
    """``_short_str`` of ``data[at:]``, without copying the rest of the frame."""
    if at >= len(data):
        raise ValueError("Could not unpack short string value")
    length = data[at]
    return at + 1 + length, data[at + 1 : at + 1 + length].decode("utf-8", errors="replace")


def _unmarshal_properties(properties: commands.Basic.Properties, flags: int, data: bytes) -> None:
    """What ``Basic.Properties.unmarshal`` does, reading the short strings and octets in
    place; the other types (a table, a timestamp) as it decodes them."""
    at = 0
    for name, flag, kind in _PROPERTIES:
        if not flags & flag:
            continue
        value: Any
        if kind == "shortstr":
            at, value = _short_str_at(data, at)
        elif kind == "octet":
            if at >= len(data):
                raise ValueError("Could not unpack octet value")
            value = data[at]
            at += 1
        else:
            consumed, value = decode.by_type(data[at:], kind)
            at += consumed
        setattr(properties, name, value)


def _content_header_unmarshal(self: header.ContentHeader, data: bytes) -> None:
    self.class_id, self.weight, self.body_size = struct.unpack(">HHQ", data[0:12])
    try:
        offset, flags = self._get_flags(data[12:])
        _unmarshal_properties(self.properties, flags, data[12 + offset :])
    except Exception as exc:  # noqa: BLE001 - any property pamqp cannot read, e.g. a RecursionError
        reason = f"{type(exc).__name__}: {exc}"[:500]
        self.properties = commands.Basic.Properties(headers={UNREADABLE_HEADER: reason})


_DELIVERY_TAG: Final = struct.Struct(">q")  # signed, as pamqp reads a long-long


def _deliver_unmarshal(self: commands.Basic.Deliver, data: bytes) -> None:
    """``Frame.unmarshal`` for ``basic.deliver``: consumer tag, delivery tag, redelivered
    (a bit), exchange, routing key. Truncated data raises ``struct.error`` or
    ``ValueError``, as pamqp's does."""
    at, self.consumer_tag = _short_str_at(data, 0)
    (self.delivery_tag,) = _DELIVERY_TAG.unpack_from(data, at)
    at += 8
    if at >= len(data):
        raise ValueError("Could not unpack bit value")
    self.redelivered = bool(data[at] & 1)
    at, self.exchange = _short_str_at(data, at + 1)
    _, self.routing_key = _short_str_at(data, at)


def make_total() -> None:
    """Install the tolerant decoders (once per process)."""
    global _installed  # noqa: PLW0603 - one switch for the whole process
    if _installed:
        return
    methods: dict[str, Any] = decode.METHODS
    methods["timestamp"] = _timestamp
    methods["shortstr"] = _short_str
    table: dict[bytes, Any] = decode.TABLE_MAPPING
    table[b"T"] = _timestamp
    table[b"s"] = _short_str
    header.ContentHeader.unmarshal = _content_header_unmarshal  # type: ignore[method-assign]
    commands.Basic.Deliver.unmarshal = _deliver_unmarshal  # type: ignore[method-assign,assignment]
    _installed = True
