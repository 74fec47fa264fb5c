"""The two frames every delivery brings, ``basic.deliver`` and a content header, decoded by
``worker.frames``' own code: the same values and the same failures as pamqp's generic
decoding (as ``worker.frames`` makes it total), whatever the bytes."""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from pamqp import base, commands, frame, header
from pamqp.body import ContentBody

from worker import frames

frames.make_total()

_SHORT_STRING = st.binary(max_size=40).map(lambda raw: bytes([len(raw)]) + raw)
_FIELD = st.one_of(
    _SHORT_STRING,
    st.binary(min_size=1, max_size=1),  # an octet
    st.binary(min_size=8, max_size=8),  # a timestamp
    st.binary(max_size=12).map(lambda raw: struct.pack(">I", len(raw)) + raw),  # a table
    st.binary(max_size=6),  # anything, truncated data included
)


def _outcome(decode: Any) -> tuple[str, Any]:
    try:
        return "ok", decode()
    except Exception as exc:  # noqa: BLE001 - both decoders must fail alike, whatever it is
        return "failed", type(exc) in (ValueError, struct.error, IndexError)


def _properties_by_pamqp(flags: int, data: bytes) -> dict[str, Any]:
    properties = commands.Basic.Properties()
    commands.Basic.Properties.unmarshal(properties, flags, data)
    return {name: getattr(properties, name) for name in properties.__slots__}


def _properties_by_worker(flags: int, data: bytes) -> dict[str, Any]:
    properties = commands.Basic.Properties()
    frames._unmarshal_properties(properties, flags, data)
    return {name: getattr(properties, name) for name in properties.__slots__}


@given(flags=st.integers(0, 0xFFFF), fields=st.lists(_FIELD, max_size=14))
def test_properties_decode_as_pamqp_decodes_them(flags: int, fields: list[bytes]) -> None:
    data = b"".join(fields)
    by_worker = _outcome(lambda: _properties_by_worker(flags, data))
    by_pamqp = _outcome(lambda: _properties_by_pamqp(flags, data))
    if by_pamqp[0] == "failed":
        assert by_worker[0] == "failed"
    else:
        assert by_worker == by_pamqp


@given(
    consumer_tag=_SHORT_STRING,
    delivery_tag=st.binary(max_size=8),
    redelivered=st.binary(max_size=1),
    exchange=_SHORT_STRING,
    routing_key=_SHORT_STRING,
    cut=st.integers(0, 200),
)
def test_a_deliver_method_decodes_as_pamqp_decodes_it(
    consumer_tag: bytes,
    delivery_tag: bytes,
    redelivered: bytes,
    exchange: bytes,
    routing_key: bytes,
    cut: int,
) -> None:
    data = (consumer_tag + delivery_tag + redelivered + exchange + routing_key)[:cut]

    def decoded(unmarshal: Any) -> tuple[Any, ...]:
        method = commands.Basic.Deliver()
        unmarshal(method, data)
        return tuple(getattr(method, name) for name in method.__slots__)

    by_worker = _outcome(lambda: decoded(commands.Basic.Deliver.unmarshal))
    by_pamqp = _outcome(lambda: decoded(base.Frame.unmarshal))
    assert by_worker == by_pamqp


def test_a_delivery_reads_back_what_was_published() -> None:
    properties = commands.Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        headers={"x-deadline": 1_750_000_000_000, "x-name": "a"},
        correlation_id="c-1",
        reply_to="amq.rabbitmq.reply-to.x",
        message_id="m-1",
        user_id="plugin-user",
        app_id="app",
        message_type="change",
    )
    deliver = commands.Basic.Deliver(
        consumer_tag="ctag", delivery_tag=2**40, redelivered=True, exchange="ex", routing_key="rk"
    )
    wire = (
        frame.marshal(deliver, 3)
        + frame.marshal(header.ContentHeader(0, 4, properties), 3)
        + frame.marshal(ContentBody(b"body"), 3)
    )
    decoded = []
    while wire:
        used, _, value = frame.unmarshal(wire)
        decoded.append(value)
        wire = wire[used:]
    content = decoded[1]
    assert isinstance(content, header.ContentHeader)
    assert vars_of(decoded[0]) == vars_of(deliver)
    assert vars_of(content.properties) == vars_of(properties)


def vars_of(value: Any) -> dict[str, Any]:
    return {name: getattr(value, name) for name in value.__slots__}
