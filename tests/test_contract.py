"""Protocol §1, §3 and §4 as far as decoding and validation go: pure, no services.

A case builds a body, encodes it in the encoding under test (JSON and MessagePack alike),
decodes and validates it against a fixed clock, and checks the ``Write`` or the error code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import os
import uuid
from collections.abc import Callable
from typing import Any, Final

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import rules
from schemas.codec import JSON, MSGPACK, Codec, codec_for
from schemas.errors import InvalidMessage, StateError
from schemas.messages import (
    MAX_BATCH_OPS,
    MAX_LIST_LIMIT,
    MAX_NAME_LENGTH,
    READ_OPS,
    SCOPE_KINDS,
    WRITE_OPS,
    AppliedReply,
    ChangeItem,
    ChangesReply,
    ChangesRequest,
    ErrorReply,
    GetManyRequest,
    GetRequest,
    ListRequest,
    PageItem,
    PageReply,
    ReadRequest,
    Reply,
    ValueReply,
    ValuesReply,
)
from tests.helpers import delete_cmd, set_cmd, uuid7
from worker.auth import Caller
from worker.config import Settings
from worker.model import EntryKey, EntryWrite, Write
from worker.validate import Rules, uuid7_floor, validate_write

NOW_MS: Final = 1_750_000_000_000
MINUTE_MS: Final = 60_000
DAY_MS: Final = 24 * 60 * MINUTE_MS
RULES: Final = Rules.from_settings(Settings())
PLUGIN: Final = uuid.UUID("5a4c1f84-6f43-4b1e-9c2e-0d9b8f0c7a11")
MISSING: Final[Any] = object()
"""A field value meaning "leave the field out"."""

RESERVED_WORDS: Final = ("__proto__", "prototype", "constructor")
NAME_FIELDS: Final = ("scope_id", "namespace", "key")
OTHER_SCOPE_KINDS: Final = tuple(kind for kind in SCOPE_KINDS if kind != "instance")


@pytest.fixture(scope="module", params=[JSON, MSGPACK], ids=["json", "msgpack"])
def codec(request: pytest.FixtureRequest) -> Codec:
    return codec_for(request.param)


# ------------------------------------------------------------------------------- bodies


def changed(body: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    for name, value in fields.items():
        if value is MISSING:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def command(kind: str = "set", /, **fields: Any) -> dict[str, Any]:
    """A valid write of ``kind`` made at NOW_MS, with ``fields`` changed (MISSING drops one)."""
    write_id = uuid7(NOW_MS)
    if kind == "batch":
        body = {"op": "batch", "id": str(write_id), "plugin_id": str(PLUGIN), "ops": [batch_op()]}
    elif kind == "delete":
        body = delete_cmd(PLUGIN, "cursor", write_id=write_id, scope_id="ISS-42")
    else:
        body = set_cmd(PLUGIN, "cursor", {"page": 3}, write_id=write_id, scope_id="ISS-42")
    return changed(body, fields)


def batch_op(kind: str = "set", /, **fields: Any) -> dict[str, Any]:
    """An op inside a batch: a command without ``id`` and ``plugin_id``."""
    return command(kind, id=MISSING, plugin_id=MISSING, **fields)


def read_request(kind: str = "get", /, **fields: Any) -> dict[str, Any]:
    """A valid read request of ``kind``, with ``fields`` changed (MISSING drops one)."""
    scope = {"scope_kind": "issue", "scope_id": "ISS-42", "namespace": "default"}
    bodies: dict[str, dict[str, Any]] = {
        "get": {"op": "get", **scope, "key": "cursor", "after": str(uuid7(NOW_MS))},
        "get_many": {"op": "get_many", "entries": [{"scope_kind": "instance", "key": "token"}]},
        "list": {"op": "list", **scope, "prefix": "", "limit": 100, "cursor": None},
        "changes": {"op": "changes", "since": "42", "limit": 100, "wait_ms": 20_000, **scope},
    }
    return changed({**bodies[kind], "plugin_id": str(PLUGIN)}, fields)


RAW: Final = "RAW"
"""A string in a body that ``spliced`` replaces with encoded bytes no Python value makes."""


def spliced(codec: Codec, body: dict[str, Any], raw: bytes) -> bytes:
    return codec.encode(body).replace(codec.encode(RAW), raw)


def json_with_number(body: dict[str, Any], number: str) -> bytes:
    """JSON text of ``body`` with the token ``number`` where ``RAW`` stands."""
    return spliced(codec_for(JSON), body, number.encode())


def nested_arrays(codec: Codec, depth: int) -> bytes:
    """``[[[...]]]``, ``depth`` levels deep: deeper than msgspec decodes when over ~1000."""
    if codec.content_type == JSON:
        return b"[" * depth + b"]" * depth
    return b"\x91" * (depth - 1) + b"\x90"  # fixarrays of one element, then an empty one


# ------------------------------------------------------------------------ decode+validate


def decode_and_validate(codec: Codec, body: dict[str, Any] | bytes, rules: Rules = RULES) -> Write:
    raw = body if isinstance(body, bytes) else codec.encode(body)
    command = codec.decode_write(raw)
    caller = Caller("tester", f"cmd.{command.plugin_id}")
    return validate_write(command, NOW_MS, rules, caller, msgpack=codec.content_type == MSGPACK)


def raised(action: Callable[[], object]) -> StateError:
    with pytest.raises(StateError) as caught:
        action()
    return caught.value


def write_error(codec: Codec, body: dict[str, Any] | bytes, rules: Rules = RULES) -> StateError:
    return raised(lambda: decode_and_validate(codec, body, rules))


def read_error(codec: Codec, body: dict[str, Any]) -> StateError:
    return raised(lambda: codec.decode_read(codec.encode(body)))


def only_entry(write: Write) -> EntryWrite:
    (entry,) = write.entries
    return entry


# -------------------------------------------------------------------- invalid_message


@pytest.mark.parametrize(
    "body",
    [b"", b"\xc1", b"{not json", b'{"op": "set"', b"\xff\xfe\x00", b"\x00"],
    ids=repr,
)
def test_garbage_bytes_are_invalid_message(codec: Codec, body: bytes) -> None:
    assert write_error(codec, body).code == "invalid_message"
    assert raised(lambda: codec.decode_read(body)).code == "invalid_message"


@pytest.mark.parametrize("body", [42, -1.5, "set", None, True], ids=repr)
def test_body_that_is_not_an_object_is_invalid_message(codec: Codec, body: object) -> None:
    assert write_error(codec, codec.encode(body)).code == "invalid_message"


def test_array_body_is_invalid_message(codec: Codec) -> None:
    assert write_error(codec, codec.encode([command()])).code == "invalid_message"


@pytest.mark.parametrize("kind", ["set", "delete", "batch"])
def test_body_without_op_is_invalid_message(codec: Codec, kind: str) -> None:
    assert write_error(codec, command(kind, op=MISSING)).code == "invalid_message"


@pytest.mark.parametrize("op", ["upsert", "SET", "", "set ", "ops"])
def test_unknown_op_is_invalid_message(codec: Codec, op: str) -> None:
    assert write_error(codec, command(op=op)).code == "invalid_message"
    assert read_error(codec, read_request(op=op)).code == "invalid_message"


@pytest.mark.parametrize("op", [1, 1.5, True, None, ["set"], {"set": 1}], ids=repr)
def test_op_that_is_not_a_string_is_invalid_message(codec: Codec, op: object) -> None:
    assert write_error(codec, command(op=op)).code == "invalid_message"


@pytest.mark.parametrize("kind", sorted(READ_OPS))
def test_read_op_on_the_write_path_is_invalid_message(codec: Codec, kind: str) -> None:
    assert write_error(codec, read_request(kind)).code == "invalid_message"


@pytest.mark.parametrize("kind", sorted(WRITE_OPS))
def test_write_op_on_the_read_path_is_invalid_message(codec: Codec, kind: str) -> None:
    assert read_error(codec, command(kind)).code == "invalid_message"


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/xml", "application/cbor", "json", "msgpack"]
)
def test_unsupported_content_type_is_invalid_message(content_type: str) -> None:
    with pytest.raises(InvalidMessage):
        codec_for(content_type)


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (None, JSON),
        ("", JSON),
        ("application/json; charset=utf-8", JSON),
        ("Application/MsgPack", MSGPACK),
        ("application/x-msgpack", MSGPACK),
    ],
)
def test_content_type_picks_the_codec_and_absent_means_json(
    content_type: str | None, expected: str
) -> None:
    assert codec_for(content_type).content_type == expected


# -------------------------------------------------------------------- invalid_request

REQUIRED_FIELDS: Final = [
    *(("set", name) for name in ("id", "plugin_id", "scope_kind", "key", "value")),
    *(("delete", name) for name in ("id", "plugin_id", "scope_kind", "key")),
    *(("batch", name) for name in ("id", "plugin_id", "ops")),
]


@pytest.mark.parametrize(("kind", "field"), REQUIRED_FIELDS)
def test_missing_required_field_is_invalid_request(codec: Codec, kind: str, field: str) -> None:
    assert write_error(codec, command(kind, **{field: MISSING})).code == "invalid_request"


@pytest.mark.parametrize(
    ("kind", "field"),
    [("set", "scope_kind"), ("set", "key"), ("set", "value"), ("delete", "key")],
)
def test_missing_required_field_of_a_batch_op_is_invalid_request(
    codec: Codec, kind: str, field: str
) -> None:
    body = command("batch", ops=[batch_op(kind, **{field: MISSING})])
    assert write_error(codec, body).code == "invalid_request"


WRONG_TYPES: Final = [
    ("id", 123),
    ("id", None),
    ("id", ["0190c5e4-0000-7000-8000-000000000000"]),
    ("plugin_id", 5),
    ("plugin_id", None),
    ("scope_kind", 1),
    ("scope_kind", None),
    ("scope_kind", True),
    ("scope_id", 7),
    ("scope_id", ["ISS-42"]),
    ("namespace", None),
    ("namespace", 3.5),
    ("key", 42),
    ("key", True),
    ("key", None),
    ("key", {"a": 1}),
]


@pytest.mark.parametrize(("field", "value"), WRONG_TYPES, ids=repr)
def test_field_of_the_wrong_type_is_invalid_request(
    codec: Codec, field: str, value: object
) -> None:
    assert write_error(codec, command(**{field: value})).code == "invalid_request"


@pytest.mark.parametrize("ops", [{}, "set", None, 1, [1], ["set"], [None]], ids=repr)
def test_batch_ops_of_the_wrong_type_is_invalid_request(codec: Codec, ops: object) -> None:
    assert write_error(codec, command("batch", ops=ops)).code == "invalid_request"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "not-a-uuid"),
        ("id", ""),
        ("id", "0190c5e4-0000-7000-8000"),
        ("id", "0190c5e4-0000-7000-8000-00000000000g"),
        ("plugin_id", "1234"),
        ("plugin_id", "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz"),
    ],
)
def test_bad_uuid_is_invalid_request(codec: Codec, field: str, value: str) -> None:
    assert write_error(codec, command(**{field: value})).code == "invalid_request"


def with_variant_bits(value: uuid.UUID, bits: int) -> uuid.UUID:
    return uuid.UUID(int=(value.int & ~(0x3 << 62)) | (bits << 62))


NOT_V7: Final = {
    "v4": uuid.UUID("5a4c1f84-6f43-4b1e-9c2e-0d9b8f0c7a11"),
    "v1": uuid.UUID("c232ab00-9414-11ec-b3c8-9f6bdeced846"),
    "nil": uuid.UUID(int=0),
    "max": uuid.UUID(int=(1 << 128) - 1),
    "v7-ncs-variant": with_variant_bits(uuid7_floor(NOW_MS), 0b00),
    "v7-microsoft-variant": with_variant_bits(uuid7_floor(NOW_MS), 0b11),
}


@pytest.mark.parametrize("write_id", NOT_V7.values(), ids=NOT_V7.keys())
@pytest.mark.parametrize("kind", ["set", "delete", "batch"])
def test_id_that_is_not_a_uuidv7_is_invalid_request(
    codec: Codec, kind: str, write_id: uuid.UUID
) -> None:
    assert write_error(codec, command(kind, id=str(write_id))).code == "invalid_request"


@pytest.mark.parametrize("kind", ["set", "delete", "batch"])
def test_id_more_than_five_minutes_ahead_is_invalid_request(codec: Codec, kind: str) -> None:
    ahead = uuid7(NOW_MS + 5 * MINUTE_MS + 1)
    assert write_error(codec, command(kind, id=str(ahead))).code == "invalid_request"


@pytest.mark.parametrize("kind", ["set", "delete", "batch"])
def test_id_exactly_five_minutes_ahead_is_accepted(codec: Codec, kind: str) -> None:
    ahead = uuid7(NOW_MS + 5 * MINUTE_MS)
    assert decode_and_validate(codec, command(kind, id=str(ahead))).id == ahead


@pytest.mark.parametrize("scope_kind", ["team", "", "Instance", "issues", "project-workspace"])
def test_unknown_scope_kind_is_invalid_request(codec: Codec, scope_kind: str) -> None:
    assert write_error(codec, command(scope_kind=scope_kind)).code == "invalid_request"


@pytest.mark.parametrize("scope_id", [None, MISSING], ids=["null", "absent"])
@pytest.mark.parametrize("scope_kind", OTHER_SCOPE_KINDS)
@pytest.mark.parametrize("kind", ["set", "delete"])
def test_scope_id_null_or_absent_for_a_non_instance_kind_is_invalid_request(
    codec: Codec, kind: str, scope_kind: str, scope_id: object
) -> None:
    body = command(kind, scope_kind=scope_kind, scope_id=scope_id)
    assert write_error(codec, body).code == "invalid_request"


@pytest.mark.parametrize("kind", ["set", "delete"])
def test_scope_id_set_for_instance_is_invalid_request(codec: Codec, kind: str) -> None:
    body = command(kind, scope_kind="instance", scope_id="ISS-42")
    assert write_error(codec, body).code == "invalid_request"


def name_error_code(codec: Codec, field: str, name: str) -> str:
    # scope_id needs a kind that takes one, which the default "issue" is.
    return write_error(codec, command(**{field: name})).code


@pytest.mark.parametrize("field", NAME_FIELDS)
def test_empty_name_is_invalid_request(codec: Codec, field: str) -> None:
    assert name_error_code(codec, field, "") == "invalid_request"


@pytest.mark.parametrize("name", [" ", " \t\r\n ", "\u3000", "\u00a0\u2003"], ids=repr)
@pytest.mark.parametrize("field", NAME_FIELDS)
def test_whitespace_only_name_is_invalid_request(codec: Codec, field: str, name: str) -> None:
    assert name_error_code(codec, field, name) == "invalid_request"


@pytest.mark.parametrize("name", ["\x00", "a\x00", "\x00b", "a\x00b"], ids=repr)
@pytest.mark.parametrize("field", NAME_FIELDS)
def test_name_with_nul_is_invalid_request(codec: Codec, field: str, name: str) -> None:
    assert name_error_code(codec, field, name) == "invalid_request"


@pytest.mark.parametrize("field", NAME_FIELDS)
def test_name_over_500_characters_is_invalid_request(codec: Codec, field: str) -> None:
    assert name_error_code(codec, field, "x" * (MAX_NAME_LENGTH + 1)) == "invalid_request"
    assert name_error_code(codec, field, "é" * (MAX_NAME_LENGTH + 1)) == "invalid_request"


@pytest.mark.parametrize("word", RESERVED_WORDS)
@pytest.mark.parametrize("field", NAME_FIELDS)
def test_reserved_word_name_is_invalid_request(codec: Codec, field: str, word: str) -> None:
    assert name_error_code(codec, field, word) == "invalid_request"


@pytest.mark.parametrize("word", RESERVED_WORDS)
def test_reserved_word_key_is_invalid_request_on_the_read_path(codec: Codec, word: str) -> None:
    assert read_error(codec, read_request("get", key=word)).code == "invalid_request"
    entries = [{"scope_kind": "instance", "key": word}]
    assert read_error(codec, read_request("get_many", entries=entries)).code == "invalid_request"


def test_empty_batch_is_invalid_request(codec: Codec) -> None:
    assert write_error(codec, command("batch", ops=[])).code == "invalid_request"


def test_batch_over_1000_ops_is_invalid_request(codec: Codec) -> None:
    body = command("batch", ops=[batch_op(key=f"k{i}") for i in range(MAX_BATCH_OPS + 1)])
    assert write_error(codec, body).code == "invalid_request"


def test_batch_of_1000_ops_is_accepted(codec: Codec) -> None:
    body = command("batch", ops=[batch_op(key=f"k{i}") for i in range(MAX_BATCH_OPS)])
    assert len(decode_and_validate(codec, body).entries) == MAX_BATCH_OPS


BAD_BATCH_OPS: Final = {
    "empty key": {"key": ""},
    "key of the wrong type": {"key": 5},
    "reserved namespace": {"namespace": "constructor"},
    "unknown scope_kind": {"scope_kind": "team"},
    "scope_id null for issue": {"scope_id": None},
    "scope_id for instance": {"scope_kind": "instance", "scope_id": "x"},
    "no op": {"op": MISSING},
    "read op": {"op": "get"},
    "nested batch": {"op": "batch"},
    "set without value": {"value": MISSING},
}


@pytest.mark.parametrize("defect", BAD_BATCH_OPS.values(), ids=BAD_BATCH_OPS.keys())
def test_invalid_op_inside_a_batch_rejects_the_batch_naming_its_index(
    codec: Codec, defect: dict[str, Any]
) -> None:
    ops = [batch_op(), batch_op("delete"), batch_op(**defect), batch_op()]
    error = write_error(codec, command("batch", ops=ops))
    assert error.code == "invalid_request"
    assert "ops[2]" in error.message


@pytest.mark.parametrize("limit", [0, -1, MAX_LIST_LIMIT + 1])
def test_list_limit_outside_1_to_1000_is_invalid_request(codec: Codec, limit: int) -> None:
    assert read_error(codec, read_request("list", limit=limit)).code == "invalid_request"


@pytest.mark.parametrize("limit", [1, MAX_LIST_LIMIT])
def test_list_limit_of_1_to_1000_is_accepted(codec: Codec, limit: int) -> None:
    request = codec.decode_read(codec.encode(read_request("list", limit=limit)))
    assert isinstance(request, ListRequest)
    assert request.limit == limit


def test_list_limit_defaults_to_100(codec: Codec) -> None:
    request = codec.decode_read(codec.encode(read_request("list", limit=MISSING)))
    assert isinstance(request, ListRequest)
    assert request.limit == 100


READ_TYPES: Final[dict[str, type[ReadRequest]]] = {
    "get": GetRequest,
    "get_many": GetManyRequest,
    "list": ListRequest,
    "changes": ChangesRequest,
}


@pytest.mark.parametrize("kind", sorted(READ_OPS))
def test_valid_read_request_decodes_to_its_op(codec: Codec, kind: str) -> None:
    request = codec.decode_read(codec.encode(read_request(kind)))
    assert isinstance(request, READ_TYPES[kind])
    assert request.plugin_id == PLUGIN


# ------------------------------------------------------------------ unsupported_value

NUL_VALUES: Final = {
    "string": "a\x00b",
    "nested string": {"a": [1, {"b": "x\x00"}]},
    "object key": {"k\x00": 1},
    "nested object key": [{"ok": {"\x00": True}}],
}


@pytest.mark.parametrize("value", NUL_VALUES.values(), ids=NUL_VALUES.keys())
def test_nul_in_a_value_is_unsupported_value(codec: Codec, value: object) -> None:
    assert write_error(codec, command(value=value)).code == "unsupported_value"
    error = write_error(codec, command("batch", ops=[batch_op(), batch_op(value=value)]))
    assert (error.code, "ops[1]" in error.message) == ("unsupported_value", True)


MSGPACK_ONLY_VALUES: Final = {
    "NaN": math.nan,
    "Infinity": math.inf,
    "-Infinity": -math.inf,
    "nested NaN": {"a": [1.0, math.nan]},
    "nested Infinity": [{"b": math.inf}],
    "binary": b"\x01\x02",
    "empty binary": b"",
    "nested binary": {"a": [b"\x00"]},
    "integer map key": {1: "a"},
    "nested float map key": {"a": {2.5: 1}},
    "array map key": {(1, 2): 1},
    "extension": msgspec.msgpack.Ext(5, b"x"),
    "timestamp": [msgspec.msgpack.Ext(-1, b"\x00\x00\x00\x01")],
}


@pytest.mark.parametrize("value", MSGPACK_ONLY_VALUES.values(), ids=MSGPACK_ONLY_VALUES.keys())
def test_messagepack_value_with_no_json_form_is_unsupported_value(value: object) -> None:
    msgpack = codec_for(MSGPACK)
    assert write_error(msgpack, command(value=value)).code == "unsupported_value"


@pytest.mark.parametrize(
    "number", ["1e999", "-1e999", "1E400", "1e-999", "0.1000000000000000055511"]
)
@pytest.mark.parametrize("value", [RAW, {"a": [1, RAW]}], ids=["top", "nested"])
def test_json_number_a_double_cannot_hold_is_stored_exactly_as_sent(
    number: str, value: object
) -> None:
    # jsonb's numeric holds it; decoding to a float would have altered it (or made it inf).
    json_codec = codec_for(JSON)
    body = json_with_number(command(value=value), number)
    stored = only_entry(decode_and_validate(json_codec, body)).value_json
    assert stored is not None and number in stored
    batch = json_with_number(command("batch", ops=[batch_op(value=value)]), number)
    assert number in (only_entry(decode_and_validate(json_codec, batch)).value_json or "")


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_nan_or_infinity_token_in_json_is_invalid_message(token: str) -> None:
    # JSON has no such tokens: the body is not well-formed, whatever field holds them.
    body = json_with_number(command(value=RAW), token)
    assert write_error(codec_for(JSON), body).code == "invalid_message"


def test_value_nested_beyond_the_decoder_limit_is_invalid_request(codec: Codec) -> None:
    body = spliced(codec, command(value=RAW), nested_arrays(codec, 5000))
    assert write_error(codec, body).code == "invalid_request"


def test_value_nested_256_deep_is_accepted(codec: Codec) -> None:
    body = spliced(codec, command(value=RAW), nested_arrays(codec, 256))
    assert only_entry(decode_and_validate(codec, body)).value_json == "[" * 256 + "]" * 256


@pytest.mark.parametrize("depth", [257, 900])
def test_value_nested_deeper_than_256_is_invalid_request(codec: Codec, depth: int) -> None:
    body = spliced(codec, command(value=RAW), nested_arrays(codec, depth))
    error = write_error(codec, body)
    assert error.code == "invalid_request"
    assert "256" in error.message or "limit" in error.message


def test_objects_count_towards_the_nesting_limit_like_arrays(codec: Codec) -> None:
    deep: Any = 1
    for _ in range(257):
        deep = {"a": deep}
    assert write_error(codec, command(value=deep)).code == "invalid_request"


def test_the_nesting_limit_is_configurable(codec: Codec) -> None:
    rules = dataclasses.replace(RULES, value_max_depth=3)
    assert decode_and_validate(codec, command(value=[[[1]]]), rules)
    assert write_error(codec, command(value=[[[[1]]]]), rules).code == "invalid_request"


@pytest.mark.parametrize(
    ("number", "written_out"), [("1e999", 1000), ("1.5e-999", 1002), ("-2E+5000", 5002)]
)
def test_a_number_counts_as_long_as_jsonb_writes_it_out(number: str, written_out: int) -> None:
    # jsonb keeps numbers as numeric, without exponent: 1e999 reads back as 1000 digits.
    rules = dataclasses.replace(RULES, value_max_bytes=written_out + 10)
    body = json_with_number(command(value=RAW), number)
    entry = only_entry(decode_and_validate(codec_for(JSON), body, rules))
    assert entry.value_json == number
    assert written_out <= entry.value_bytes <= written_out + 10
    small = dataclasses.replace(RULES, value_max_bytes=written_out - 10)
    assert write_error(codec_for(JSON), body, small).code == "value_too_large"


def test_many_small_numbers_that_write_out_huge_are_value_too_large() -> None:
    # 1e131071 is 8 bytes of JSON and 131072 digits in jsonb: a few of them would be a
    # reply of gigabytes.
    body = json_with_number(command(value=RAW), "[" + ",".join(["1e131071"] * 100) + "]")
    assert write_error(codec_for(JSON), body).code == "value_too_large"


@pytest.mark.parametrize("number", ["1e131072", "1e-16384"])
def test_a_number_jsonb_cannot_hold_is_unsupported_value(number: str) -> None:
    body = json_with_number(command(value=RAW), number)
    assert write_error(codec_for(JSON), body).code == "unsupported_value"


@given(st.lists(st.sampled_from([b"0", b"7", b"9", b"e", b"E", b"a", b".", b"-"]), max_size=12))
def test_a_value_is_looked_at_for_exponents_whenever_a_digit_precedes_an_e(
    parts: list[bytes],
) -> None:
    # What the worker and the client check first, before they walk a value's numbers.
    text = b"".join(parts)
    expected = any(a in b"0123456789" and b in b"eE" for a, b in itertools.pairwise(text))
    assert rules._has_exponent(text) == expected


def test_a_string_that_only_looks_like_a_number_is_not_counted_as_one() -> None:
    entry = only_entry(decode_and_validate(codec_for(JSON), command(value="1e99999")))
    assert entry.value_bytes == len('"1e99999"')


# -------------------------------------------------------------------- value_too_large


def string_of_json_size(size: int) -> str:
    return "x" * (size - 2)  # the quotes are the other two bytes


@pytest.mark.parametrize("limit", [16, RULES.value_max_bytes])
def test_value_over_the_size_limit_is_value_too_large(codec: Codec, limit: int) -> None:
    rules = dataclasses.replace(RULES, value_max_bytes=limit)
    body = command(value=string_of_json_size(limit + 1))
    assert write_error(codec, body, rules).code == "value_too_large"


@pytest.mark.parametrize("limit", [16, RULES.value_max_bytes])
def test_value_exactly_at_the_size_limit_is_accepted(codec: Codec, limit: int) -> None:
    rules = dataclasses.replace(RULES, value_max_bytes=limit)
    value = string_of_json_size(limit)
    entry = only_entry(decode_and_validate(codec, command(value=value), rules))
    assert entry.value_json == json.dumps(value)


def test_value_size_counts_bytes_of_utf8_json(codec: Codec) -> None:
    rules = dataclasses.replace(RULES, value_max_bytes=16)
    assert decode_and_validate(codec, command(value="é" * 7), rules)  # 14 bytes + quotes
    assert write_error(codec, command(value="é" * 8), rules).code == "value_too_large"


def test_value_too_large_inside_a_batch_names_its_index(codec: Codec) -> None:
    rules = dataclasses.replace(RULES, value_max_bytes=16)
    ops = [batch_op(value=1), batch_op(value=string_of_json_size(17))]
    error = write_error(codec, command("batch", ops=ops), rules)
    assert (error.code, "ops[1]" in error.message) == ("value_too_large", True)


# ---------------------------------------------------------------------------- stale


@pytest.mark.parametrize("kind", ["set", "delete", "batch"])
def test_id_older_than_the_retention_is_stale(codec: Codec, kind: str) -> None:
    old = uuid7(NOW_MS - 7 * DAY_MS - 1)
    assert write_error(codec, command(kind, id=str(old))).code == "stale"


@pytest.mark.parametrize("kind", ["set", "delete", "batch"])
def test_id_exactly_at_the_retention_is_accepted(codec: Codec, kind: str) -> None:
    oldest = uuid7(NOW_MS - 7 * DAY_MS)
    assert decode_and_validate(codec, command(kind, id=str(oldest))).id == oldest


def test_default_rules_are_the_spec_defaults() -> None:
    assert (
        Rules(value_max_bytes=1024 * 1024, retention_ms=7 * DAY_MS, future_skew_ms=5 * MINUTE_MS)
        == RULES
    )


# ------------------------------------------------------------------------ accepted writes

VALUES: Final = {
    "object": {"page": 3, "nested": {"list": [1, 2], "none": None}},
    "empty object": {},
    "array": [1, "two", None, True, 2.5, [], {}],
    "empty array": [],
    "string": 'cursor é 😀 \n\t"quoted"',
    "empty string": "",
    "integer": 42,
    "negative integer": -7,
    "int64 bounds": [-(2**63), 2**63 - 1],
    "float": 2.5,
    "tiny float": 5e-324,
    "true": True,
    "false": False,
    "null": None,
}


@pytest.mark.parametrize("value", VALUES.values(), ids=VALUES.keys())
def test_every_value_kind_round_trips_to_its_json_text(codec: Codec, value: object) -> None:
    entry = only_entry(decode_and_validate(codec, command(value=value)))
    assert not entry.is_delete
    assert entry.value_json == msgspec.json.encode(value).decode()
    assert json.loads(entry.value_json) == value


def test_set_becomes_one_entry_write_at_its_id(codec: Codec) -> None:
    body = command()
    write = decode_and_validate(codec, body)
    assert (write.id, write.plugin_id) == (uuid.UUID(body["id"]), PLUGIN)
    entry = only_entry(write)
    assert entry.entry == EntryKey(PLUGIN, "issue", "ISS-42", "default", "cursor")
    assert (entry.version, entry.value_json) == (write.id, '{"page":3}')


def test_delete_becomes_one_entry_write_without_a_value(codec: Codec) -> None:
    entry = only_entry(decode_and_validate(codec, command("delete")))
    assert entry.is_delete
    assert entry.entry == EntryKey(PLUGIN, "issue", "ISS-42", "default", "cursor")


@pytest.mark.parametrize("kind", ["set", "delete"])
def test_namespace_defaults_to_default(codec: Codec, kind: str) -> None:
    entry = only_entry(decode_and_validate(codec, command(kind, namespace=MISSING)))
    assert entry.entry.namespace == "default"
    batch = command("batch", ops=[batch_op(kind, namespace=MISSING)])
    assert only_entry(decode_and_validate(codec, batch)).entry.namespace == "default"


@pytest.mark.parametrize("scope_id", [None, MISSING], ids=["null", "absent"])
def test_scope_id_may_be_null_or_absent_for_instance(codec: Codec, scope_id: object) -> None:
    body = command(scope_kind="instance", scope_id=scope_id)
    assert only_entry(decode_and_validate(codec, body)).entry.scope_id is None


@pytest.mark.parametrize("scope_kind", OTHER_SCOPE_KINDS)
def test_every_other_scope_kind_takes_a_scope_id(codec: Codec, scope_kind: str) -> None:
    entry = only_entry(decode_and_validate(codec, command(scope_kind=scope_kind)))
    assert (entry.entry.scope_kind, entry.entry.scope_id) == (scope_kind, "ISS-42")


def test_batch_with_two_ops_on_one_entry_keeps_both_in_order(codec: Codec) -> None:
    ops = [batch_op(value=1), batch_op("delete"), batch_op(value=2), batch_op(key="other")]
    body = command("batch", ops=ops)
    write = decode_and_validate(codec, body)
    assert [entry.value_json for entry in write.entries] == ["1", None, "2", '{"page":3}']
    assert len({entry.entry for entry in write.entries[:3]}) == 1
    assert {entry.version for entry in write.entries} == {uuid.UUID(body["id"])}


@pytest.mark.parametrize("name", ["x" * MAX_NAME_LENGTH, "é" * MAX_NAME_LENGTH], ids=["ascii", "é"])
@pytest.mark.parametrize("field", NAME_FIELDS)
def test_500_character_name_is_accepted(codec: Codec, field: str, name: str) -> None:
    entry = only_entry(decode_and_validate(codec, command(**{field: name})))
    assert getattr(entry.entry, field) == name


@pytest.mark.parametrize(
    "name", ["Prototype", "__proto__x", "constructors", " padded ", "a\tb", "ISS 42"], ids=repr
)
@pytest.mark.parametrize("field", NAME_FIELDS)
def test_name_that_only_resembles_a_rule_is_accepted(codec: Codec, field: str, name: str) -> None:
    entry = only_entry(decode_and_validate(codec, command(**{field: name})))
    assert getattr(entry.entry, field) == name


def test_unknown_fields_are_ignored(codec: Codec) -> None:
    body = command("batch", extra={"future": True}, ops=[batch_op(flag=1, version=[1])])
    assert len(decode_and_validate(codec, body).entries) == 1


# ---------------------------------------------------------------------------- replies

VERSION: Final = uuid7_floor(NOW_MS)
UPDATED_AT: Final = "2025-06-15T12:00:00+00:00"


def on_the_wire(codec: Codec, reply: Reply) -> Any:
    raw = codec.encode(reply)
    return msgspec.json.decode(raw) if codec.content_type == JSON else msgspec.msgpack.decode(raw)


def test_missing_value_reply_is_exactly_type_and_found(codec: Codec) -> None:
    expected = {"type": "value", "found": False}
    assert codec.encode(ValueReply(found=False)) == codec.encode(expected)
    assert codec_for(JSON).encode(ValueReply(found=False)) == b'{"type":"value","found":false}'


def test_found_null_value_reply_keeps_value_null(codec: Codec) -> None:
    reply = ValueReply(found=True, value=None, version=VERSION, updated_at=UPDATED_AT)
    wire = on_the_wire(codec, reply)
    assert "value" in wire
    assert wire["value"] is None
    assert (wire["type"], wire["found"], wire["version"]) == ("value", True, str(VERSION))


def test_last_page_reply_carries_a_null_next_cursor(codec: Codec) -> None:
    assert on_the_wire(codec, PageReply(items=[], next_cursor=None)) == {
        "type": "page",
        "items": [],
        "next_cursor": None,
    }


def test_page_reply_carries_its_next_cursor_and_item_scopes(codec: Codec) -> None:
    item = PageItem(
        scope_kind="instance",
        scope_id=None,
        namespace="default",
        key="token",
        value=None,
        version=VERSION,
        updated_at=UPDATED_AT,
    )
    wire = on_the_wire(codec, PageReply(items=[item], next_cursor="opaque"))
    assert wire["next_cursor"] == "opaque"
    (item_wire,) = wire["items"]
    assert {"scope_kind", "scope_id", "namespace", "key", "value", "version", "updated_at"} <= (
        item_wire.keys()
    )
    assert (item_wire["scope_id"], item_wire["value"]) == (None, None)


def test_reply_carries_updated_at_as_rfc3339_text_in_both_encodings(codec: Codec) -> None:
    # A string in the struct, so MessagePack cannot turn it into a timestamp extension.
    reply = ValueReply(found=True, value=1, version=VERSION, updated_at=UPDATED_AT)
    wire = on_the_wire(codec, reply)["updated_at"]
    assert wire == UPDATED_AT
    assert datetime.datetime.fromisoformat(wire) == datetime.datetime(
        2025, 6, 15, 12, 0, tzinfo=datetime.UTC
    )


REPLIES: Final[dict[str, Reply]] = {
    "value found": ValueReply(found=True, value={"a": 1}, version=VERSION, updated_at=UPDATED_AT),
    "value missing": ValueReply(found=False),
    "values": ValuesReply(items=[ValueReply(found=False), ValueReply(found=True, value=None)]),
    "page": PageReply(items=[], next_cursor="c"),
    "changes": ChangesReply(
        next="7",
        items=[
            ChangeItem(
                position="6",
                change="set",
                scope_kind="issue",
                scope_id="ISS-42",
                namespace="default",
                key="cursor",
                version=VERSION,
                value={"page": 3},
                updated_at=UPDATED_AT,
            ),
            ChangeItem(
                position="7",
                change="expire",
                scope_kind="instance",
                scope_id=None,
                namespace="default",
                key="lease",
                version=VERSION,
                updated_at=UPDATED_AT,
                expires_at=UPDATED_AT,
            ),
        ],
    ),
    "applied": AppliedReply(id=VERSION, outcome="superseded"),
    "error": ErrorReply(code="write_pending", message="not applied in time"),
}


@pytest.mark.parametrize("reply", REPLIES.values(), ids=REPLIES.keys())
def test_every_reply_decodes_back_to_itself(codec: Codec, reply: Reply) -> None:
    assert codec.decode_reply(codec.encode(reply)) == reply


# ------------------------------------------------------------------- hostile bodies


@pytest.mark.parametrize("field", ["key", "namespace", "scope_id", "id"])
def test_json_number_beyond_double_range_in_a_name_is_invalid_request(field: str) -> None:
    body = json_with_number(command(**{field: RAW}), "1e999")
    assert write_error(codec_for(JSON), body).code == "invalid_request"


@pytest.mark.parametrize("word", RESERVED_WORDS)
def test_reserved_word_followed_by_a_newline_is_not_reserved(codec: Codec, word: str) -> None:
    # ECMAScript reads the exported pattern the same way: only the exact word is reserved.
    entry = only_entry(decode_and_validate(codec, command(key=f"{word}\n")))
    assert entry.entry.key == f"{word}\n"


DEEP_BODIES: Final = {
    "bare nested array": (None, "invalid_message"),
    "deep value": (command(value=RAW), "invalid_request"),
    "bad key before a deep value": (command(key=5, value=RAW), "invalid_request"),
    "unknown op with a deep value": (command(op="upsert", value=RAW), "invalid_message"),
}


@pytest.mark.parametrize(("body", "code"), DEEP_BODIES.values(), ids=DEEP_BODIES.keys())
def test_deeply_nested_body_is_a_state_error(
    codec: Codec, body: dict[str, Any] | None, code: str
) -> None:
    deep = nested_arrays(codec, 5000)
    raw = deep if body is None else spliced(codec, body, deep)
    assert write_error(codec, raw).code == code


NOT_UTF8: Final = {JSON: b'"\x80"', MSGPACK: b"\xa1\x80"}
"""A one-byte string whose byte is not UTF-8, in each encoding."""


def test_string_that_is_not_utf8_is_invalid_message(codec: Codec) -> None:
    body = spliced(codec, command(key=RAW), NOT_UTF8[codec.content_type])
    assert write_error(codec, body).code == "invalid_message"


# ------------------------------------------------------------------------- any input

ints: Final = st.integers(min_value=-(2**63), max_value=2**64 - 1)
storable: Final = st.recursive(
    st.none() | st.booleans() | ints | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children),
    max_leaves=10,
)
"""Values jsonb can hold, save for U+0000 in strings."""
values: Final = st.recursive(
    st.none() | st.booleans() | ints | st.floats() | st.text(max_size=12) | st.binary(max_size=4),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=6) | ints, children, max_size=4)
    ),
    max_leaves=10,
)
"""Anything either encoding can carry: NaN, Infinity, binary and integer keys included."""

names: Final = st.text(min_size=1, max_size=8)
write_ids: Final = st.integers(NOW_MS - 8 * DAY_MS, NOW_MS + 10 * MINUTE_MS).map(
    lambda at: str(uuid7_floor(at))
)
scopes: Final = st.sampled_from(SCOPE_KINDS).flatmap(
    lambda kind: st.fixed_dictionaries(
        {"scope_kind": st.just(kind), "scope_id": st.none() if kind == "instance" else names}
    )
)
entry_fields: Final = st.builds(
    lambda scope, fields: {**scope, **fields},
    scopes,
    st.fixed_dictionaries(
        {"key": names, "value": storable | values},
        optional={
            "namespace": names,
            "limit": st.integers(-1, MAX_LIST_LIMIT + 1),
            "if_version": write_ids,
            "if_absent": st.booleans(),
            "ttl_ms": st.integers(-1, 8 * DAY_MS),
            "after": write_ids,
        },
    ),
)
batch_ops: Final = st.builds(
    lambda op, fields: {"op": op, **fields}, st.sampled_from(["set", "delete"]), entry_fields
)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """A write or read request, often valid, with up to two fields left out or replaced.

    Names are any text (whitespace, NUL and all), ids span the time window and beyond it,
    values are anything the encoding carries; the replacements are anything at all.
    """
    kind = draw(st.sampled_from([*sorted(WRITE_OPS), *sorted(READ_OPS)]))
    body: dict[str, Any] = {"op": kind, "id": draw(write_ids), "plugin_id": str(PLUGIN)}
    if kind == "batch":
        body["ops"] = draw(st.lists(batch_ops, min_size=1, max_size=3))
    elif kind == "get_many":
        body["entries"] = draw(st.lists(entry_fields, max_size=3))
    else:
        body |= draw(entry_fields)
    for name in draw(st.sets(st.sampled_from(sorted(body)), max_size=2)):
        changed(body, {name: draw(st.just(MISSING) | values)})
    return body


def assert_write_or_state_error(codec: Codec, raw: bytes) -> None:
    """Decoding and validating any input gives a ``Write`` or a typed error, nothing else."""
    try:
        write = decode_and_validate(codec, raw)
    except StateError:
        pass
    else:
        for entry in write.entries:
            if entry.value_json is not None:
                assert "\\u0000" not in entry.value_json
                assert len(entry.value_json.encode()) <= RULES.value_max_bytes
                msgspec.json.decode(entry.value_json)
    with contextlib.suppress(StateError):
        codec.decode_read(raw)


# Thousands of cases in CI (per test and encoding); `make fuzz` runs far more.
FUZZ_EXAMPLES: Final = int(os.environ.get("PLUGIN_STATE_FUZZ_EXAMPLES", "1000"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(raw=st.binary(max_size=200))
def test_any_bytes_decode_to_a_write_or_a_state_error(codec: Codec, raw: bytes) -> None:
    assert_write_or_state_error(codec, raw)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(body=requests())
def test_any_object_decodes_to_a_write_or_a_state_error(codec: Codec, body: object) -> None:
    assert_write_or_state_error(codec, codec.encode(body))


# ------------------------------------------------------------ conditions and expiry (§7)


def older_id() -> str:
    return str(uuid7(NOW_MS - MINUTE_MS))


def test_if_version_and_if_absent_together_are_invalid_request(codec: Codec) -> None:
    body = command(if_version=older_id(), if_absent=True)
    error = write_error(codec, body)
    assert error.code == "invalid_request" and "at most one" in error.message


@pytest.mark.parametrize("when", ["same", "newer"])
def test_if_version_not_older_than_the_write_is_invalid_request(codec: Codec, when: str) -> None:
    body = command()
    body["if_version"] = body["id"] if when == "same" else str(uuid7(NOW_MS + MINUTE_MS))
    error = write_error(codec, body)
    assert error.code == "invalid_request" and "older than the write" in error.message


def test_if_version_that_is_not_a_uuidv7_is_invalid_request(codec: Codec) -> None:
    assert write_error(codec, command(if_version=str(uuid.uuid4()))).code == "invalid_request"


@pytest.mark.parametrize("ttl", [0, -1, 7 * DAY_MS + 1, 1.5, "10", True])
def test_a_ttl_outside_one_ms_to_the_retention_is_invalid_request(
    codec: Codec, ttl: object
) -> None:
    assert write_error(codec, command(ttl_ms=ttl)).code == "invalid_request"


@pytest.mark.parametrize("ttl", [1, 7 * DAY_MS])
def test_a_ttl_expires_the_entry_after_the_writes_own_time(codec: Codec, ttl: int) -> None:
    body = command(ttl_ms=ttl)
    entry = only_entry(decode_and_validate(codec, body))
    assert entry.expires_at_ms == (uuid.UUID(body["id"]).int >> 80) + ttl


@pytest.mark.parametrize("field", ["if_absent", "ttl_ms"])
def test_a_delete_refuses_what_only_a_set_can_carry(codec: Codec, field: str) -> None:
    value: object = True if field == "if_absent" else 1000
    assert write_error(codec, command("delete", **{field: value})).code == "invalid_request"


def test_conditions_and_ttl_of_batch_ops_are_checked_naming_the_op(codec: Codec) -> None:
    ops = [batch_op(), batch_op(key="b", if_version=older_id(), if_absent=True)]
    error = write_error(codec, command("batch", ops=ops))
    assert error.code == "invalid_request" and error.message.startswith("ops[1]:")
    fine = [
        batch_op(key="a", if_absent=True, ttl_ms=5000),
        batch_op("delete", key="b", if_version=older_id()),
    ]
    write = decode_and_validate(codec, command("batch", ops=fine))
    assert [e.if_absent for e in write.entries] == [True, False]
    assert write.entries[1].if_version == uuid.UUID(fine[1]["if_version"])
    assert write.entries[0].expires_at_ms is not None and write.batch


def test_a_write_without_conditions_is_unconditional_and_permanent(codec: Codec) -> None:
    entry = only_entry(decode_and_validate(codec, command()))
    assert not entry.conditional and entry.expires_at_ms is None


@pytest.mark.parametrize(
    "reply",
    [
        AppliedReply(id=uuid7(NOW_MS), outcome="conflict", failed_op=3),
        AppliedReply(id=uuid7(NOW_MS), outcome="conflict"),
        ValueReply(
            found=True,
            value=1,
            version=uuid7(NOW_MS),
            updated_at="2026-01-01T00:00:00+00:00",
            expires_at="2026-01-02T00:00:00+00:00",
        ),
    ],
    ids=["conflict-of-a-batch", "conflict", "value-with-expiry"],
)
def test_conflict_and_expiry_replies_round_trip(codec: Codec, reply: Reply) -> None:
    assert codec.decode_reply(codec.encode(reply)) == reply


def test_a_conflict_reply_without_failed_op_leaves_it_out(codec: Codec) -> None:
    body = codec.encode(AppliedReply(id=uuid7(NOW_MS), outcome="conflict"))
    decoded = (
        msgspec.json.decode(body) if codec.content_type == JSON else msgspec.msgpack.decode(body)
    )
    assert set(decoded) == {"type", "id", "outcome"}
