"""Writes the regression seeds (``python -m tests.fuzz.seeds``): the inputs that once
stopped every worker, and a few valid ones to start from, in the target's format."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Final

import msgspec
from pamqp.commands import Basic

from tests.fuzz.target import NOW_MS, PLUGIN, encode_input
from worker.validate import uuid7_floor

DIRECTORY: Final = Path(__file__).parent / "seeds"
_ID: Final = str(uuid7_floor(NOW_MS))  # a UUIDv7 at the target's clock


def _set(value: object = "RAW") -> dict[str, object]:
    return {
        "op": "set",
        "id": _ID,
        "plugin_id": str(PLUGIN),
        "scope_kind": "issue",
        "scope_id": "ISS-1",
        "key": "k",
        "value": value,
    }


def _spliced(encode: object, raw: bytes) -> bytes:
    assert callable(encode)
    body: bytes = encode(_set())
    placeholder: bytes = encode("RAW")
    return body.replace(placeholder, raw)


def seeds() -> dict[str, bytes]:
    json, msgpack = msgspec.json.encode, msgspec.msgpack.encode
    as_msgpack = Basic.Properties(content_type="application/msgpack")
    return {
        "msgpack-bad-timestamp": encode_input(
            _spliced(msgpack, bytes.fromhex("c703ff000000")), as_msgpack
        ),
        "msgpack-map-key-map": encode_input(
            _spliced(msgpack, b"\x81\x81\xa1a\x01\x01"), as_msgpack
        ),
        "json-nul-and-bad-utf8": encode_input(_spliced(json, b'"\\u0000\xff"')),
        "valid-set": encode_input(json(_set({"page": 3}))),
        "valid-msgpack-set": encode_input(msgpack(_set([1, 2.5, None])), as_msgpack),
        "valid-get": encode_input(
            json({**_set(), "op": "get", "after": _ID}),
            Basic.Properties(reply_to="amq.rabbitmq.reply-to.abc", correlation_id="c"),
            read=True,
        ),
        "with-properties": encode_input(
            json(_set(1)),
            Basic.Properties(
                content_type="application/json",
                headers={"x-deadline": 1, "nested": {"a": [1, "b"]}},
                timestamp=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
                reply_to="amq.rabbitmq.reply-to.abc",
                correlation_id="c",
            ),
        ),
    }


def main() -> None:
    DIRECTORY.mkdir(exist_ok=True)
    for name, data in seeds().items():
        (DIRECTORY / name).write_bytes(data)


if __name__ == "__main__":
    main()
