"""One hostile delivery, from raw bytes to its outcome, as a worker handles it, without the
broker or the database: what the fuzzers run.

An input is ``[flags][properties length: 2 bytes][properties][body]``. ``flags`` picks the
path (writes or reads) and the caller; ``properties`` are a content header's property bytes,
decoded by pamqp as a worker would (``worker.frames`` included); the rest is the body.
Every outcome must be a command or a request, or a typed error other than ``internal``
(an ``internal`` here is a failure that no rule foresaw: a finding). Writes that pass are
answered as reads would answer them, in both encodings; refusals are turned into the dead
letter's properties and encoded, as ``worker.publish`` does.
"""

from __future__ import annotations

import struct
import uuid
from datetime import UTC, datetime
from typing import Final

import pamqp.encode
from aiormq.abc import DeliveredMessage
from pamqp import commands, header

from schemas.codec import JSON, MSGPACK, codec_for
from schemas.errors import Internal, StateError
from schemas.messages import ErrorReply
from schemas.topology import Names
from worker import frames, reads
from worker.auth import Authorizer
from worker.broker import Delivery
from worker.intake import ReadIntake, WriteIntake
from worker.model import Write
from worker.publish import dead_letter_properties
from worker.rpc import _UNENCODABLE
from worker.store import StoredValue
from worker.validate import Rules

frames.make_total()

PLUGIN: Final = uuid.UUID("5a4c1f84-6f43-4b1e-9c2e-0d9b8f0c7a11")
OWNER: Final = "plugin-user"
TRUSTED: Final = "host"
NOW_MS: Final = 1_750_000_000_000
RULES: Final = Rules(value_max_bytes=1 << 20, retention_ms=7 * 86_400_000, future_skew_ms=300_000)
NAMES: Final = Names()
AUTHORIZER: Final = Authorizer(frozenset({TRUSTED}))
WRITES: Final = WriteIntake(NAMES, RULES, AUTHORIZER)
READS: Final = ReadIntake(NAMES, RULES, AUTHORIZER)
OWNERS: Final = {PLUGIN: OWNER}
CALLERS: Final = (None, OWNER, TRUSTED, "someone-else")
MAX_REPLY: Final = 8 << 20
_BASIC_CLASS: Final = 60


class Finding(AssertionError):
    """The worker would have classified this input as ``internal``: a bug."""


def encode_input(
    body: bytes,
    properties: commands.Basic.Properties | None = None,
    *,
    read: bool = False,
    caller: int = 2,
) -> bytes:
    """An input of the target's format (for seeds and hypothesis)."""
    props = (properties or commands.Basic.Properties()).marshal()
    return bytes([(caller << 1) | read]) + struct.pack(">H", len(props)) + props + body


def delivery_of(data: bytes) -> tuple[Delivery, bool]:
    flags = data[0] if data else 0
    read = bool(flags & 1)
    length = struct.unpack(">H", data[1:3])[0] if len(data) >= 3 else 0
    props, body = data[3 : 3 + length], data[3 + length :]
    content = header.ContentHeader()
    content.unmarshal(struct.pack(">HHQ", _BASIC_CLASS, 0, len(body)) + props)
    caller = CALLERS[(flags >> 1) % len(CALLERS)]
    if content.properties.user_id is None and caller is not None:
        content.properties.user_id = caller
    route = "rpc" if read else "cmd"
    deliver = commands.Basic.Deliver(
        consumer_tag="fuzz",
        delivery_tag=1,
        exchange=NAMES.exchange,
        routing_key=f"{route}.{PLUGIN}",
    )
    raw = DeliveredMessage(delivery=deliver, header=content, body=body, channel=None)  # type: ignore[arg-type]
    return Delivery(raw, received=0.0), read


def one_delivery(data: bytes) -> StateError | Write | None:
    """Handle one input end to end; raise ``Finding`` for an outcome no rule foresaw."""
    delivery, read = delivery_of(data)
    if read:
        call = READS.receive(delivery, NOW_MS)
        outcome = call.error or READS.authorize(call, call.plugin_id, OWNERS)
        _check(outcome)
        if outcome is not None:
            _answer_error(outcome, call.codec.content_type)
            _dead_letter(delivery, outcome)
        return outcome
    received = WRITES.receive(delivery)
    written = WRITES.admit(received, OWNERS, NOW_MS)
    _check(written)
    if isinstance(written, StateError):
        _answer_error(written, received.codec.content_type)
        _dead_letter(delivery, written)
        return written
    for entry in written.entries:
        if entry.value_json is not None:
            _read_back(entry.value_json, entry.version, entry.value_bytes)
    return written


def _check(outcome: object) -> None:
    if isinstance(outcome, Internal):
        raise Finding(outcome.message)


def _answer_error(error: StateError, content_type: str) -> None:
    codec_for(content_type).encode(ErrorReply(code=error.code, message=error.message))


def _dead_letter(delivery: Delivery, error: StateError) -> None:
    try:
        dead_letter_properties(delivery, error).marshal()
    except (ValueError, TypeError, OverflowError, struct.error):
        # worker.publish falls back to bare properties for these.
        pamqp.encode.field_table({"x-reject-code": error.code})


def _read_back(value_json: str, version: uuid.UUID, value_bytes: int) -> None:
    """What a read of the stored value answers, in both encodings, within the limit."""
    stored = StoredValue(value_json, version, datetime.now(UTC), value_bytes)
    for content_type in (JSON, MSGPACK):
        codec = codec_for(content_type)
        try:
            body = codec.encode(reads.value_reply(stored, codec))
        except _UNENCODABLE:
            continue  # answered unsupported_value by the read path
        assert len(body) <= MAX_REPLY
    # The bound reply budgets use before loading a value is a bound of what was sent.
    assert len(value_json.encode()) <= value_bytes
