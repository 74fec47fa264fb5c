"""The pure rules of the data model (protocol §1) that a type cannot express, with their
error codes: an entry's names, and what a value may hold.

Part of the contract, so that a producer can check a write before sending it: the worker
(``worker.validate``) and the Python client (``worker.client``) both call these, one
implementation with the same messages and codes. Depends on msgspec and ``schemas`` only.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from typing import Any, Final

import msgspec

from schemas.errors import InvalidMessage, InvalidRequest, UnsupportedValue, ValueTooLarge
from schemas.messages import name_problem

VALUE_MAX_BYTES: Final = 1024 * 1024
"""The default largest value, measured as its JSON encoding (the worker's is configurable)."""
VALUE_MAX_DEPTH: Final = 256
"""The default deepest nesting of arrays and objects in a value (configurable likewise)."""

MAX_NAMES_BYTES: Final = 2400
"""Most bytes of UTF-8 in an entry's scope_id, namespace and key together. Postgres keeps a
btree entry within a third of a page (2704 bytes); the unique index over the five key
columns could not hold more, and a write past it would fail inside the database."""

_json_encoder = msgspec.json.Encoder()
_json_values = msgspec.json.Decoder()
# A digit followed by an exponent marker is the only way a JSON number's stored form (jsonb
# keeps numbers as `numeric` and writes them out in full) can be longer than its text. Found
# by mapping every digit to 0 and looking for "0e": a fifth of what a regular expression
# took (this runs on every value the worker and the client see).
_DIGITS_AS_ZERO: Final = bytes.maketrans(b"123456789", b"000000000")


def _has_exponent(raw: bytes) -> bool:
    digits = raw.translate(_DIGITS_AS_ZERO)
    return b"0e" in digits or b"0E" in digits


def uuid7_millis(value: uuid.UUID) -> int:
    """The Unix time in milliseconds that a UUIDv7 carries in its first 48 bits."""
    return value.int >> 80


def is_uuid7(value: uuid.UUID) -> bool:
    # Bit arithmetic rather than UUID's version and variant properties: this runs per write.
    bits = value.int
    return (bits >> 76) & 0xF == 7 and (bits >> 62) & 0x3 == 0b10


def check_scope(scope_kind: str, scope_id: str | None) -> None:
    """``instance`` has no scope id; every other scope kind needs one."""
    if scope_kind == "instance":
        if scope_id is not None:
            raise InvalidRequest("scope_id must be null for scope_kind 'instance'")
    elif scope_id is None:
        raise InvalidRequest(f"scope_id is required for scope_kind {scope_kind!r}")


def check_entry(scope_kind: str, scope_id: str | None, namespace: str, key: str) -> None:
    """The rules an entry's name follows beyond each field's own (``schemas.messages``)."""
    check_scope(scope_kind, scope_id)
    # Characters are at most 4 bytes: short names need no counting.
    if len(key) + len(namespace) + len(scope_id or "") > MAX_NAMES_BYTES // 4:
        size = len(key.encode()) + len(namespace.encode()) + len((scope_id or "").encode())
        if size > MAX_NAMES_BYTES:
            raise InvalidRequest(
                f"scope_id, namespace and key are {size} bytes of UTF-8 together; "
                f"at most {MAX_NAMES_BYTES}"
            )


def check_names(scope_id: str | None, namespace: str, key: str) -> None:
    """Each name's own rules (``schemas.messages.Name``), said in the words the worker uses
    when a decoded write breaks them."""
    for field, name in (("scope_id", scope_id), ("namespace", namespace), ("key", key)):
        problem = None if name is None else name_problem(name)
        if problem is not None:
            raise InvalidRequest(f"{field} {problem}")


# ------------------------------------------------------------------------------ values


def encode_value(
    value: msgspec.Raw,
    max_bytes: int = VALUE_MAX_BYTES,
    max_depth: int = VALUE_MAX_DEPTH,
    *,
    msgpack: bool = False,
) -> tuple[str, int]:
    """The written value as JSON text for ``jsonb`` and the most bytes a read of it can
    return, or the error that keeps it out.

    The value limit holds the JSON text with every number written out as jsonb stores it: a
    ``numeric`` has no exponent, so ``1e999`` is stored (and read back) as 1000 digits, and
    a small write cannot turn into a huge read. jsonb also writes a space after each colon
    and comma: the second number returned allows for those (counting every colon and comma,
    inside strings too, so it is a bound), which reply budgets use before loading a value.

    A JSON value is kept exactly as sent, only checked: it is walked (decoded) only when
    something in it needs a closer look: a ``\\u0000`` escape (jsonb cannot store U+0000),
    more brackets than the nesting limit, or a number with an exponent. A MessagePack value
    is decoded, checked for what JSON cannot hold, and re-encoded.
    """
    raw = bytes(value)
    if msgpack:
        decoded = _decode_or_refuse(msgspec.msgpack.decode, raw, "MessagePack")
        expansion = _check_storable(decoded, max_depth)
        encoded = _json_encoder.encode(decoded)
    else:
        expansion = 0
        if (
            b"\\u0000" in raw
            # Brackets are bytes: a value no longer than the limit cannot nest past it.
            or (len(raw) > max_depth and raw.count(b"[") + raw.count(b"{") > max_depth)
            or _has_exponent(raw)
        ):
            expansion = _check_json(raw, max_depth)
        encoded = raw
    size = len(encoded) + expansion
    if size > max_bytes:
        written_out = " with its numbers written out in full" if expansion else ""
        raise ValueTooLarge(f"value is {size} bytes of JSON{written_out}; the limit is {max_bytes}")
    try:
        return encoded.decode(), size + encoded.count(b":") + encoded.count(b",")
    except UnicodeDecodeError:
        raise InvalidMessage("value holds a string that is not valid UTF-8") from None


class _Number:
    """A JSON number with a fraction or an exponent, as the decoder met it."""

    __slots__ = ("expansion",)

    def __init__(self, token: str) -> None:
        self.expansion = _written_out_growth(token)


def _written_out_growth(token: str) -> int:
    mantissa, marker, exponent = token.lower().partition("e")
    if not marker:
        return 0
    power = int(exponent)
    # Postgres' numeric holds up to 131072 digits before the point and 16383 after.
    if power > 131_071 or power < -16_383:
        raise UnsupportedValue(f"value holds the number {token}, which jsonb cannot store")
    # At most the exponent's zeros, the mantissa's digits and "0." more than the token.
    return max(0, abs(power) + len(mantissa) + 2 - len(token))


_json_numbers = msgspec.json.Decoder(float_hook=_Number)


def _check_json(raw: bytes, max_depth: int) -> int:
    """Walk a JSON value: no U+0000, not too deep; returns how much longer its numbers get
    when written out in full."""
    decoded = _decode_or_refuse(_json_numbers.decode, raw, "JSON")
    return _check_storable(decoded, max_depth)


def _decode_or_refuse(decode: Any, raw: bytes, encoding: str) -> Any:
    try:
        return decode(raw)
    except RecursionError:
        raise InvalidRequest("value nests too deeply") from None
    except UnicodeDecodeError:
        raise InvalidMessage("value holds a string that is not valid UTF-8") from None
    except msgspec.ValidationError as exc:
        # MessagePack extensions the decoder knows (timestamps) but that are malformed.
        raise UnsupportedValue(f"value holds {encoding} that JSON cannot hold: {exc}") from None
    except (msgspec.DecodeError, TypeError, ValueError) as exc:
        text = str(exc)
        if "hashable" in text:
            raise UnsupportedValue("value has an object key that is not a string") from None
        raise InvalidMessage(f"value is not well-formed {encoding}: {text}") from None


def _walk(value: Any) -> Iterator[tuple[Any, int]]:
    # Iterative, so a deeply nested value cannot exhaust the interpreter's stack.
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        yield item, depth
        if isinstance(item, list):
            stack.extend((inner, depth + 1) for inner in item)
        elif isinstance(item, dict):
            stack.extend((inner, depth + 1) for inner in item.values())


def _check_storable(value: Any, max_depth: int) -> int:
    """Refuse what jsonb cannot hold or the rules forbid; return the growth of numbers
    written out in full."""
    growth = 0
    for item, depth in _walk(value):
        if isinstance(item, str):
            if "\x00" in item:
                raise UnsupportedValue("value contains U+0000, which jsonb cannot store")
        elif isinstance(item, bool | int) or item is None:
            continue
        elif isinstance(item, _Number):
            growth += item.expansion
        elif isinstance(item, float):
            growth += _float_growth(item)
        elif isinstance(item, list | dict):
            if depth >= max_depth:
                raise InvalidRequest(f"value nests arrays and objects more than {max_depth} deep")
            if isinstance(item, dict):
                for key in item:
                    if not isinstance(key, str):
                        raise UnsupportedValue("value has an object key that is not a string")
                    if "\x00" in key:
                        raise UnsupportedValue("value has an object key containing U+0000")
        else:
            raise UnsupportedValue(f"value contains {type(item).__name__} data, which is not JSON")
    return growth


def _float_growth(number: float) -> int:
    if not math.isfinite(number):
        raise UnsupportedValue(f"value contains {number}, which jsonb cannot store")
    magnitude = abs(number)
    # The JSON encoder writes these with an exponent (shortest round-trip form).
    if magnitude >= 1e16 or 0 < magnitude < 1e-4:
        return abs(math.floor(math.log10(magnitude))) + 2
    return 0


def check_finite(value: Any) -> None:
    """A Python value about to be encoded as JSON holds no NaN nor Infinity: msgspec writes
    them as ``null``, and another value must not be stored in their place."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise UnsupportedValue(f"value holds {item}, which JSON and jsonb cannot hold")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
