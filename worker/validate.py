"""The rules of the data model that a type cannot express, with their error codes.

Pure functions: a decoded command and the clock in, a ``Write`` or a typed error out.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from schemas.errors import InvalidMessage, InvalidRequest, Stale, UnsupportedValue, ValueTooLarge
from schemas.messages import BatchCommand, BatchDelete, SetCommand, WriteCommand
from worker.auth import Caller
from worker.config import Settings
from worker.model import EntryKey, EntryWrite, Write

_json_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Rules:
    """The configurable limits the rules use."""

    value_max_bytes: int
    retention_ms: int
    future_skew_ms: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Rules:
        return cls(
            value_max_bytes=settings.value_max_bytes,
            retention_ms=settings.retention_seconds * 1000,
            future_skew_ms=settings.future_skew_seconds * 1000,
        )


def uuid7_millis(value: uuid.UUID) -> int:
    """The Unix time in milliseconds that a UUIDv7 carries in its first 48 bits."""
    return value.int >> 80


def uuid7_floor(millis: int) -> uuid.UUID:
    """The smallest UUIDv7 of that millisecond: every id made at or after it sorts above."""
    return uuid.UUID(bytes=max(millis, 0).to_bytes(6, "big") + b"\x70\x00\x80" + bytes(7))


def check_write_id(write_id: uuid.UUID, now_ms: int, rules: Rules) -> None:
    """A write's id must be a UUIDv7 whose time is neither too far ahead nor too old."""
    # Bit arithmetic rather than UUID's version and variant properties: this runs per write.
    bits = write_id.int
    if (bits >> 76) & 0xF != 7 or (bits >> 62) & 0x3 != 0b10:
        raise InvalidRequest(f"id {write_id} is not a UUIDv7")
    at = bits >> 80
    if at > now_ms + rules.future_skew_ms:
        raise InvalidRequest(
            f"id {write_id} lies {(at - now_ms) / 1000:.0f} s in the future "
            f"(at most {rules.future_skew_ms // 1000} s allowed)"
        )
    if at < now_ms - rules.retention_ms:
        raise Stale(
            f"id {write_id} is {(now_ms - at) / 1000:.0f} s old, older than the "
            f"tombstone retention of {rules.retention_ms // 1000} s"
        )


def check_scope(scope_kind: str, scope_id: str | None) -> None:
    """``instance`` has no scope id; every other scope kind needs one."""
    if scope_kind == "instance":
        if scope_id is not None:
            raise InvalidRequest("scope_id must be null for scope_kind 'instance'")
    elif scope_id is None:
        raise InvalidRequest(f"scope_id is required for scope_kind {scope_kind!r}")


def encode_value(value: msgspec.Raw, rules: Rules, *, msgpack: bool = False) -> str:
    """The written value as JSON text for ``jsonb``, or the error that keeps it out.

    A JSON value is kept exactly as sent, only checked: it is walked (decoded) only when it
    holds a ``\\u0000`` escape, the one thing in well-formed JSON that jsonb cannot store.
    A MessagePack value is decoded, checked for what JSON cannot hold, and re-encoded.
    """
    raw = bytes(value)
    if msgpack:
        decoded = _decode_or_refuse(msgspec.msgpack.decode, raw)
        _check_storable(decoded)
        encoded = _json_encoder.encode(decoded)
    else:
        if b"\\u0000" in raw:
            _check_storable(_decode_or_refuse(msgspec.json.decode, raw))
        encoded = raw
    if len(encoded) > rules.value_max_bytes:
        raise ValueTooLarge(
            f"value is {len(encoded)} bytes of JSON; the limit is {rules.value_max_bytes}"
        )
    try:
        return encoded.decode()
    except UnicodeDecodeError:
        raise InvalidMessage("value holds a string that is not valid UTF-8") from None


def _decode_or_refuse(decode: Callable[[bytes], Any], raw: bytes) -> Any:
    try:
        return decode(raw)
    except RecursionError:
        raise UnsupportedValue("value nests too deeply (the limit is about 1000 levels)") from None
    except UnicodeDecodeError:
        raise InvalidMessage("value holds a string that is not valid UTF-8") from None


def _check_storable(value: Any) -> None:
    # Iterative, so a deeply nested value cannot exhaust the interpreter's stack.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise UnsupportedValue("value contains U+0000, which jsonb cannot store")
        elif isinstance(item, bool | int) or item is None:
            continue
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise UnsupportedValue(f"value contains {item}, which jsonb cannot store")
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, inner in item.items():
                if not isinstance(key, str):
                    raise UnsupportedValue("value has an object key that is not a string")
                if "\x00" in key:
                    raise UnsupportedValue("value has an object key containing U+0000")
                stack.append(inner)
        else:
            raise UnsupportedValue(f"value contains {type(item).__name__} data, which is not JSON")


def validate_write(
    command: WriteCommand,
    now_ms: int,
    rules: Rules,
    caller: Caller,
    *,
    msgpack: bool = False,
) -> Write:
    """Turn a decoded write command into the entry writes it makes, or raise its error."""
    check_write_id(command.id, now_ms, rules)
    version = command.id
    plugin_id = command.plugin_id
    entries: list[EntryWrite] = []
    if isinstance(command, BatchCommand):
        for index, op in enumerate(command.ops):
            try:
                check_scope(op.scope_kind, op.scope_id)
                value_json = (
                    None
                    if isinstance(op, BatchDelete)
                    else encode_value(op.value, rules, msgpack=msgpack)
                )
            except (InvalidRequest, UnsupportedValue, ValueTooLarge) as exc:
                raise type(exc)(f"ops[{index}]: {exc.message}") from None
            key = EntryKey(plugin_id, op.scope_kind, op.scope_id, op.namespace, op.key)
            entries.append(EntryWrite(key, version, value_json))
    else:
        check_scope(command.scope_kind, command.scope_id)
        key = EntryKey(
            plugin_id, command.scope_kind, command.scope_id, command.namespace, command.key
        )
        value_json = (
            encode_value(command.value, rules, msgpack=msgpack)
            if isinstance(command, SetCommand)
            else None
        )
        entries.append(EntryWrite(key, version, value_json))
    return Write(id=version, plugin_id=plugin_id, entries=tuple(entries), caller=caller)
