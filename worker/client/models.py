"""What the client's calls take and give: scopes, entries, changes, batch ops, times to
live, and how the worker's replies become them."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, TypeAlias, cast

from msgspec import UNSET, UnsetType

from schemas.messages import (
    DEFAULT_NAMESPACE,
    SCOPE_KINDS,
    BatchDelete,
    BatchSet,
    ChangeItem,
    PageItem,
    ScopeKind,
    ValueReply,
)

from .errors import UnexpectedReply


@dataclass(frozen=True, slots=True)
class Scope:
    """Where an entry lives: ``Scope.instance()``, ``Scope.issue("ISS-42")``, ..."""

    kind: ScopeKind
    id: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCOPE_KINDS:
            raise ValueError(f"unknown scope kind {self.kind!r}: one of {', '.join(SCOPE_KINDS)}")
        if (self.kind == "instance") != (self.id is None):
            raise ValueError("the instance scope has no id; every other scope kind needs one")

    @classmethod
    def parse(cls, text: str) -> Scope:
        """``instance`` or ``KIND:ID``; the id may itself contain colons."""
        kind, colon, scope_id = text.partition(":")
        return cls(cast(ScopeKind, kind), scope_id if colon else None)

    @classmethod
    def instance(cls) -> Scope:
        return cls("instance")

    @classmethod
    def company(cls, scope_id: str) -> Scope:
        return cls("company", scope_id)

    @classmethod
    def project(cls, scope_id: str) -> Scope:
        return cls("project", scope_id)

    @classmethod
    def project_workspace(cls, scope_id: str) -> Scope:
        return cls("project_workspace", scope_id)

    @classmethod
    def agent(cls, scope_id: str) -> Scope:
        return cls("agent", scope_id)

    @classmethod
    def issue(cls, scope_id: str) -> Scope:
        return cls("issue", scope_id)

    @classmethod
    def goal(cls, scope_id: str) -> Scope:
        return cls("goal", scope_id)

    @classmethod
    def run(cls, scope_id: str) -> Scope:
        return cls("run", scope_id)

    def __str__(self) -> str:
        return self.kind if self.id is None else f"{self.kind}:{self.id}"


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored entry. ``value`` is ``None`` for a stored JSON ``null``; ``version`` is the
    id of the write that stored it (what ``if_version`` names); ``expires_at`` is set for an
    entry with a time to live."""

    scope: Scope
    namespace: str
    key: str
    value: Any
    version: uuid.UUID
    updated_at: datetime
    expires_at: datetime | None = None


ChangeKind: TypeAlias = Literal["set", "delete", "expire"]


@dataclass(frozen=True, slots=True)
class Change:
    """One change of the plugin's state, from its change log (protocol §8): ``set`` (with
    the value), ``delete`` or ``expire`` (``version``: the write whose time to live ran
    out). ``position`` is where it is in the log: ``watch(since=position)`` goes on after
    it."""

    position: str
    kind: ChangeKind
    scope: Scope
    namespace: str
    key: str
    version: uuid.UUID
    updated_at: datetime
    value: Any = None
    expires_at: datetime | None = None

    @property
    def entry(self) -> Entry | None:
        """The entry this change leaves (None after a delete or an expiry)."""
        if self.kind != "set":
            return None
        return Entry(
            self.scope,
            self.namespace,
            self.key,
            self.value,
            self.version,
            self.updated_at,
            self.expires_at,
        )


BatchOp: TypeAlias = BatchSet | BatchDelete
EntryName: TypeAlias = tuple[Scope, str] | tuple[Scope, str, str]
"""``(scope, key)`` or ``(scope, key, namespace)``, as ``get_many`` takes them."""
EntryKey: TypeAlias = tuple[str, str | None, str, str]
"""An entry as the client's memories key it: (scope kind, scope id, namespace, key)."""


def entry_key(scope: Scope, namespace: str, key: str) -> EntryKey:
    return (scope.kind, scope.id, namespace, key)


Ttl: TypeAlias = timedelta | float
"""A time to live: a ``timedelta``, or seconds."""


def ttl_ms(ttl: Ttl | None) -> int | None:
    """A time to live in whole milliseconds (at least one), as the wire carries it."""
    if ttl is None:
        return None
    seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else float(ttl)
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"a time to live must be positive, not {ttl!r}")
    return max(1, round(seconds * 1000))


def op_set(
    scope: Scope,
    key: str,
    value: Any,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    if_version: uuid.UUID | None = None,
    if_absent: bool = False,
    ttl: Ttl | None = None,
) -> BatchSet:
    """A ``set`` for ``StateClient.batch``, conditional or expiring as ``StateClient.set``."""
    return BatchSet(
        scope_kind=scope.kind,
        scope_id=scope.id,
        namespace=namespace,
        key=key,
        value=value,
        if_version=if_version,
        if_absent=if_absent,
        ttl_ms=ttl_ms(ttl),
    )


def op_delete(
    scope: Scope,
    key: str,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    if_version: uuid.UUID | None = None,
) -> BatchDelete:
    """A ``delete`` for ``StateClient.batch``, conditional as ``StateClient.delete``."""
    return BatchDelete(
        scope_kind=scope.kind,
        scope_id=scope.id,
        namespace=namespace,
        key=key,
        if_version=if_version,
    )


# ------------------------------------------------------------------ from the replies


def entry_from_value(scope: Scope, namespace: str, key: str, reply: ValueReply) -> Entry | None:
    if not reply.found:
        return None
    if (
        reply.value is UNSET
        or isinstance(reply.version, UnsetType)
        or isinstance(reply.updated_at, UnsetType)
    ):
        raise UnexpectedReply("a found value without its value, version or updated_at")
    return Entry(
        scope=scope,
        namespace=namespace,
        key=key,
        value=reply.value,
        version=reply.version,
        updated_at=timestamp(reply.updated_at),
        expires_at=_optional_timestamp(reply.expires_at),
    )


def entry_from_item(item: PageItem) -> Entry:
    return Entry(
        scope=Scope(item.scope_kind, item.scope_id),
        namespace=item.namespace,
        key=item.key,
        value=item.value,
        version=item.version,
        updated_at=timestamp(item.updated_at),
        expires_at=_optional_timestamp(item.expires_at),
    )


def change_from_item(item: ChangeItem) -> Change:
    if item.change == "set" and item.value is UNSET:
        raise UnexpectedReply(f"the set at position {item.position} came without its value")
    return Change(
        position=item.position,
        kind=item.change,
        scope=Scope(item.scope_kind, item.scope_id),
        namespace=item.namespace,
        key=item.key,
        version=item.version,
        updated_at=timestamp(item.updated_at),
        value=None if item.value is UNSET else item.value,
        expires_at=_optional_timestamp(item.expires_at),
    )


def timestamp(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise UnexpectedReply(f"a timestamp is not an RFC 3339 date-time: {text!r}") from None


def _optional_timestamp(text: str | UnsetType) -> datetime | None:
    return None if isinstance(text, UnsetType) else timestamp(text)
