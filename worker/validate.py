"""The rules of the data model that a type cannot express, with their error codes.

Pure functions: a decoded command and the clock in, a ``Write`` or a typed error out. The
rules of names and values are the contract's own (``schemas.rules``), which the Python
client and the CLI check too, so a write the client lets through is refused by the worker
only for what the client cannot know (authorization, quotas, the database's clock, a
configured limit tighter than the default).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from schemas.errors import InvalidMessage, InvalidRequest, Stale, UnsupportedValue, ValueTooLarge
from schemas.messages import (
    BatchCommand,
    BatchDelete,
    BatchSet,
    DeleteCommand,
    SetCommand,
    WriteCommand,
)
from schemas.rules import check_entry, encode_value, is_uuid7, uuid7_millis
from worker.auth import Caller
from worker.model import EntryKey, EntryWrite, Write

if TYPE_CHECKING:
    from worker.config import Settings


@dataclass(frozen=True, slots=True)
class Rules:
    """The configurable limits the rules use."""

    value_max_bytes: int
    retention_ms: int
    future_skew_ms: int
    value_max_depth: int = 256

    @classmethod
    def from_settings(cls, settings: Settings) -> Rules:
        return cls(
            value_max_bytes=settings.value_max_bytes,
            retention_ms=settings.retention_seconds * 1000,
            future_skew_ms=settings.future_skew_seconds * 1000,
            value_max_depth=settings.value_max_depth,
        )


def uuid7_floor(millis: int) -> uuid.UUID:
    """The smallest UUIDv7 of that millisecond: every id made at or after it sorts above."""
    return uuid.UUID(bytes=max(millis, 0).to_bytes(6, "big") + b"\x70\x00\x80" + bytes(7))


def check_write_id(write_id: uuid.UUID, now_ms: int, rules: Rules) -> None:
    """A write's id must be a UUIDv7 whose time is neither too far ahead nor too old."""
    if not is_uuid7(write_id):
        raise InvalidRequest(f"id {write_id} is not a UUIDv7")
    at = write_id.int >> 80
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


def check_after(after: uuid.UUID, now_ms: int, rules: Rules, what: str = "after") -> bool:
    """A read's ``after`` must name a write that could still arrive: a UUIDv7 not further
    ahead than writes may be. Returns False when it is older than the retention: such a
    write was applied long ago or refused as stale, so there is nothing to wait for."""
    if not is_uuid7(after):
        raise InvalidRequest(f"{what} {after} is not a UUIDv7 (it names a write's id)")
    at = after.int >> 80
    if at > now_ms + rules.future_skew_ms:
        raise InvalidRequest(
            f"{what} {after} lies {(at - now_ms) / 1000:.0f} s in the future: no write "
            f"can have that id (at most {rules.future_skew_ms // 1000} s ahead)"
        )
    return at >= now_ms - rules.retention_ms


# ------------------------------------------------------------------------------ writes


def check_conditions(
    op: SetCommand | DeleteCommand | BatchSet | BatchDelete, write_id: uuid.UUID, rules: Rules
) -> tuple[uuid.UUID | None, bool, int | None]:
    """A write's conditions and expiry (protocol §7): (if_version, if_absent, the Unix ms
    its entry expires at), or ``invalid_request``."""
    if_version, if_absent, ttl_ms = op.if_version, op.if_absent, op.ttl_ms
    if if_version is not None:
        if if_absent:
            raise InvalidRequest("a write takes at most one of if_version and if_absent")
        if not is_uuid7(if_version):
            raise InvalidRequest(f"if_version {if_version} is not a UUIDv7 (it names a write)")
        if if_version >= write_id:
            raise InvalidRequest(
                f"if_version {if_version} must be older than the write's own id {write_id} "
                "(make the write's id after reading the version)"
            )
    if ttl_ms is None:
        return if_version, if_absent, None
    if ttl_ms > rules.retention_ms:
        raise InvalidRequest(
            f"ttl_ms {ttl_ms} is longer than the tombstone retention ({rules.retention_ms} ms)"
        )
    return if_version, if_absent, uuid7_millis(write_id) + ttl_ms


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
    ops = command.ops if isinstance(command, BatchCommand) else [command]
    for index, op in enumerate(ops):
        try:
            entries.append(_entry_write(op, plugin_id, version, rules, msgpack))
        except (InvalidMessage, InvalidRequest, UnsupportedValue, ValueTooLarge) as exc:
            if not isinstance(command, BatchCommand):
                raise
            raise type(exc)(f"ops[{index}]: {exc.message}") from None
    return Write(
        id=version,
        plugin_id=plugin_id,
        entries=tuple(entries),
        caller=caller,
        batch=isinstance(command, BatchCommand),
    )


def _entry_write(
    op: SetCommand | DeleteCommand | BatchSet | BatchDelete,
    plugin_id: uuid.UUID,
    version: uuid.UUID,
    rules: Rules,
    msgpack: bool,
) -> EntryWrite:
    check_entry(op.scope_kind, op.scope_id, op.namespace, op.key)
    if_version, if_absent, expires_at_ms = check_conditions(op, version, rules)
    if isinstance(op, SetCommand | BatchSet):
        value_json, size = encode_value(
            op.value, rules.value_max_bytes, rules.value_max_depth, msgpack=msgpack
        )
    else:
        value_json, size = None, 0
    return EntryWrite(
        EntryKey(plugin_id, op.scope_kind, op.scope_id, op.namespace, op.key),
        version,
        value_json,
        size,
        expires_at_ms=expires_at_ms,
        if_version=if_version,
        if_absent=if_absent,
    )
