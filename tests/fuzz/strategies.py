"""Hypothesis strategies for hostile bytes: any MessagePack, any JSON, any AMQP properties.

Built from the formats' grammars rather than from Python values, so that they reach what
no encoder produces: every MessagePack extension type (timestamps of every size, valid or
not), non-string map keys, lengths that lie, the reserved byte; JSON strings with invalid
UTF-8, lone surrogate escapes and ``\\u0000``, numbers no double holds; property tables
nested deep, with keys that are not UTF-8 and timestamps past the year 9999.
"""

from __future__ import annotations

import datetime
import struct
from typing import Final

import msgspec
from hypothesis import strategies as st

from tests.frames import deep_table
from tests.fuzz.target import NOW_MS, PLUGIN
from worker.validate import uuid7_floor

_ID: Final = str(uuid7_floor(NOW_MS))

# ------------------------------------------------------------------------ MessagePack


def _sized(head: int, width: str, payload: bytes, lie: int) -> bytes:
    return bytes([head]) + struct.pack(width, max(0, len(payload) + lie)) + payload


_lies = st.sampled_from([0, 0, 0, 0, 1, -1, 7])
_raw = st.binary(max_size=24)

msgpack_scalars = st.one_of(
    st.sampled_from([b"\xc0", b"\xc2", b"\xc3", b"\xc1"]),  # nil, false, true, reserved
    st.integers(0, 0x7F).map(lambda n: bytes([n])),
    st.integers(0xE0, 0xFF).map(lambda n: bytes([n])),
    st.tuples(
        st.sampled_from(
            [
                (0xCC, 1),
                (0xCD, 2),
                (0xCE, 4),
                (0xCF, 8),
                (0xD0, 1),
                (0xD1, 2),
                (0xD2, 4),
                (0xD3, 8),
                (0xCA, 4),
                (0xCB, 8),
            ]
        ),
        st.binary(min_size=8, max_size=8),
    ).map(lambda t: bytes([t[0][0]]) + t[1][: t[0][1]]),
    st.tuples(st.integers(0, 31), _raw).map(
        lambda t: bytes([0xA0 | min(t[0], len(t[1]))]) + t[1][: t[0]]
    ),
    st.tuples(st.sampled_from([(0xD9, ">B"), (0xDA, ">H"), (0xDB, ">I")]), _raw, _lies).map(
        lambda t: _sized(t[0][0], t[0][1], t[1], t[2])
    ),
    st.tuples(st.sampled_from([(0xC4, ">B"), (0xC5, ">H"), (0xC6, ">I")]), _raw, _lies).map(
        lambda t: _sized(t[0][0], t[0][1], t[1], t[2])
    ),
    # fixext 1, 2, 4, 8, 16 of any type code (-1 is the timestamp).
    st.tuples(
        st.sampled_from([(0xD4, 1), (0xD5, 2), (0xD6, 4), (0xD7, 8), (0xD8, 16)]),
        st.integers(0, 255),
        st.binary(min_size=16, max_size=16),
    ).map(lambda t: bytes([t[0][0], t[1]]) + t[2][: t[0][1]]),
    # ext 8, 16, 32: timestamps of sizes 4, 8, 12 and every other size, any type code.
    st.tuples(
        st.sampled_from([(0xC7, ">B"), (0xC8, ">H"), (0xC9, ">I")]),
        st.sampled_from([0xFF, 0xFF, 0x00, 0x7F, 0x80]),
        st.binary(max_size=16),
        _lies,
    ).map(
        lambda t: (
            bytes([t[0][0]]) + struct.pack(t[0][1], max(0, len(t[2]) + t[3])) + bytes([t[1]]) + t[2]
        )
    ),
)


def _array(children: list[bytes], lie: int) -> bytes:
    n = max(0, len(children) + lie)
    head = bytes([0x90 | n]) if n < 16 else b"\xdc" + struct.pack(">H", n)
    return head + b"".join(children)


def _map(pairs: list[tuple[bytes, bytes]], lie: int) -> bytes:
    n = max(0, len(pairs) + lie)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
    return head + b"".join(k + v for k, v in pairs)


_grammar_values = st.recursive(
    msgpack_scalars,
    lambda inner: st.one_of(
        st.builds(_array, st.lists(inner, max_size=4), _lies),
        st.builds(_map, st.lists(st.tuples(inner, inner), max_size=3), _lies),
    ),
    max_leaves=12,
)
"""Built from the grammar: reaches what no encoder writes (lying lengths, maps as keys, the
reserved byte), and is mostly not well-formed."""

_extensions = st.builds(
    msgspec.msgpack.Ext,
    st.sampled_from([-1, -1, -1, 0, 1, 42, 127, -128]),
    st.one_of(
        st.binary(max_size=17), st.sampled_from([bytes(4), bytes(8), bytes(12), b"\xff" * 12])
    ),
)
_hashable = st.one_of(
    st.text(max_size=6),
    st.integers(-(2**63), 2**63 - 1),
    st.binary(max_size=4),
    st.booleans(),
    st.none(),
)
_python_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=8),
        st.binary(max_size=8),
        _extensions,
        st.datetimes(timezones=st.just(datetime.UTC)),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(_hashable, inner, max_size=3)
    ),
    max_leaves=12,
).map(msgspec.msgpack.encode)
"""Encoded from Python values: well-formed, with every extension (timestamps of any size,
valid or not), binary, NaN and Infinity, and keys that are not strings."""

msgpack_values = st.one_of(_python_values, _python_values, _python_values, _grammar_values)
"""One MessagePack object, usually well-formed, or bytes that only look like one."""

deep_msgpack = st.integers(200, 3000).map(lambda depth: b"\x91" * depth + b"\xc0")


def _msgpack_str(text: str) -> bytes:
    raw = text.encode()
    return (bytes([0xA0 | len(raw)]) if len(raw) < 32 else b"\xd9" + bytes([len(raw)])) + raw


@st.composite
def msgpack_commands(draw: st.DrawFn) -> bytes:
    """A write or read as a MessagePack map: mostly valid but for its value (any MessagePack,
    deep or not), sometimes with other fields replaced or a map that lies about its size."""
    instance = draw(st.booleans())
    fields = {
        "op": _msgpack_str(draw(st.sampled_from(["set", "set", "set", "delete", "get"]))),
        "id": _msgpack_str(_ID),
        "plugin_id": _msgpack_str(str(PLUGIN)),
        "scope_kind": _msgpack_str("instance" if instance else "issue"),
        "scope_id": b"\xc0" if instance else _msgpack_str("ISS-1"),
        "key": _msgpack_str("k"),
        "value": draw(st.one_of(msgpack_values, msgpack_values, msgpack_values, deep_msgpack)),
    }
    # The conditions and expiry of protocol §7, valid or not.
    if draw(st.booleans()):
        fields["if_version"] = _msgpack_str(str(uuid7_floor(NOW_MS - draw(st.integers(-5, 5)))))
    if draw(st.booleans()):
        fields["if_absent"] = draw(st.sampled_from([b"\xc3", b"\xc2", b"\xc0", b"\x01"]))
    if draw(st.booleans()):
        fields["ttl_ms"] = msgspec.msgpack.encode(draw(st.integers(-(2**63), 2**64 - 1)))
    if draw(st.integers(0, 3)) == 0:
        for name in draw(st.sets(st.sampled_from(sorted(fields)), max_size=2)):
            fields[name] = draw(msgpack_values)
    if draw(st.integers(0, 3)) == 0:
        fields["op"] = _msgpack_str("batch")
        op = [(_msgpack_str(k), v) for k, v in fields.items() if k not in ("op", "id", "plugin_id")]
        fields["ops"] = _array([_map([(_msgpack_str("op"), _msgpack_str("set")), *op], 0)], 0)
    lie = draw(_lies) if draw(st.integers(0, 4)) == 0 else 0
    return _map([(_msgpack_str(k), v) for k, v in fields.items()], lie)


# ------------------------------------------------------------------------------- JSON

_escapes = st.sampled_from(
    [
        b"\\u0000",
        b"\\ud800",
        b"\\udfff",
        b"\\ud800\\u0041",
        b"\\n",
        b'\\"',
        b"\\\\",
        b"\\u00e9",
        b"\\x",
        b"\\",
    ]
)
_string_parts = st.one_of(
    st.text(max_size=6).map(str.encode),
    _escapes,
    st.sampled_from(
        [b"\x80", b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x00", b"\x1f"]
    ),
)
json_strings = st.lists(_string_parts, max_size=5).map(lambda parts: b'"' + b"".join(parts) + b'"')
json_numbers = st.one_of(
    st.integers().map(lambda n: str(n).encode()),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode()),
    st.sampled_from(
        [
            b"1e999",
            b"-1e-999",
            b"1e131071",
            b"1e131072",
            b"1e-16384",
            b"-0",
            b"01",
            b"1.",
            b".5",
            b"1e",
            b"NaN",
            b"Infinity",
            b"1E+2",
            b"123456789012345678901234567890",
        ]
    ),
    st.tuples(st.integers(-9, 9), st.integers(-200_000, 200_000)).map(
        lambda t: f"{t[0]}e{t[1]}".encode()
    ),
)
json_scalars = st.one_of(
    json_strings, json_numbers, st.sampled_from([b"true", b"false", b"null", b"nul", b""])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: b"[" + b",".join(xs) + b"]"),
        st.lists(st.tuples(json_strings, inner), max_size=3).map(
            lambda kv: b"{" + b",".join(k + b":" + v for k, v in kv) + b"}"
        ),
    ),
    max_leaves=12,
)
deep_json = st.integers(200, 3000).map(lambda depth: b"[" * depth + b"]" * depth)


@st.composite
def json_commands(draw: st.DrawFn) -> bytes:
    """A write or read as JSON text whose value (or another field) is any JSON, well-formed
    or not, sometimes cut short."""
    op = draw(st.sampled_from([b"set", b"delete", b"batch", b"get", b"list", b"changes"]))
    value = draw(st.one_of(json_values, deep_json))
    key = draw(st.one_of(st.just(b'"k"'), json_strings))
    conditions = b"".join(
        draw(
            st.lists(
                st.sampled_from(
                    [
                        b',"if_absent":true',
                        b',"if_absent":false',
                        b',"if_version":"' + str(uuid7_floor(NOW_MS - 1)).encode() + b'"',
                        b',"if_version":"' + _ID.encode() + b'"',
                        b',"ttl_ms":1',
                        b',"ttl_ms":0',
                        b',"ttl_ms":604800001',
                        b',"ttl_ms":1e3',
                        b',"since":"0"',
                        b',"since":"18446744073709551616"',
                        b',"since":null',
                        b',"since":"-1"',
                        b',"wait_ms":30001',
                        b',"wait_ms":1',
                    ]
                ),
                max_size=2,
            )
        )
    )
    body = (
        b'{"op":"'
        + op
        + b'","id":"'
        + _ID.encode()
        + b'","plugin_id":"'
        + str(PLUGIN).encode()
        + b'","scope_kind":"issue","scope_id":"ISS-1","key":'
        + key
        + b',"value":'
        + value
        + conditions
        + b"}"
    )
    if draw(st.integers(0, 9)) == 0:
        body = body[: draw(st.integers(0, len(body)))]
    return body


# ---------------------------------------------------------------------- AMQP properties


def _table(entries: list[bytes]) -> bytes:
    payload = b"".join(entries)
    return struct.pack(">I", len(payload)) + payload


_table_values = st.one_of(
    st.binary(max_size=8).map(lambda b: b"S" + struct.pack(">I", len(b)) + b),
    st.binary(max_size=8).map(lambda b: b"s" + bytes([len(b)]) + b),
    st.integers(0, 2**64 - 1).map(lambda n: b"T" + struct.pack(">Q", n)),
    st.integers(-(2**31), 2**31 - 1).map(lambda n: b"I" + struct.pack(">i", n)),
    st.sampled_from([b"t\x01", b"V", b"Z", b"\x00", b"F\x00\x00\x00\x05"]),  # last: a lying table
)
property_tables = st.recursive(
    st.lists(st.tuples(st.binary(min_size=1, max_size=6), _table_values), max_size=3).map(
        lambda kv: _table([bytes([len(k)]) + k + v for k, v in kv])
    ),
    lambda inner: st.lists(st.tuples(st.binary(min_size=1, max_size=4), inner), max_size=2).map(
        lambda kv: _table([bytes([len(k)]) + k + b"F" + v for k, v in kv])
    ),
    max_leaves=6,
)
deep_tables = st.integers(100, 6000).map(lambda depth: bytes(deep_table(depth)))


@st.composite
def property_blobs(draw: st.DrawFn) -> bytes:
    """A content header's property bytes: flags and fields in order, each field well-formed
    or not (short strings of any bytes, tables of anything, timestamps of any size)."""
    flags = draw(st.integers(0, 0xFFFF)) & ~1
    fields = []
    shortstr = st.binary(max_size=40).map(lambda b: bytes([len(b)]) + b)
    kinds = [
        shortstr,
        shortstr,
        st.one_of(property_tables, deep_tables),
        st.binary(min_size=1, max_size=1),
        st.binary(min_size=1, max_size=1),
        shortstr,
        shortstr,
        shortstr,
        shortstr,
        st.binary(min_size=8, max_size=8),
        shortstr,
        shortstr,
        shortstr,
        shortstr,
    ]
    for bit, kind in zip(range(15, 1, -1), kinds, strict=True):
        if flags & (1 << bit):
            fields.append(draw(kind))
    blob = struct.pack(">H", flags) + b"".join(fields)
    if draw(st.integers(0, 9)) == 0:
        blob = blob[: draw(st.integers(0, len(blob)))]
    return blob


__all__ = [
    "deep_json",
    "deep_msgpack",
    "json_commands",
    "json_values",
    "msgpack_commands",
    "msgpack_values",
    "property_blobs",
]
