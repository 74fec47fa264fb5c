"""The wire contract (protocol §1 and §3) as msgspec structs.

Decoding into these types *is* the first validation: every field's type, every length and
character rule a schema can state lives here, so the exported JSON Schema carries it to
other languages. Rules a type cannot express (scope_id versus scope_kind, UUIDv7 time
windows, what a value may contain) live in ``worker.validate``.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from schemas.errors import ErrorCode

SCOPE_KINDS: Final = (
    "instance",
    "company",
    "project",
    "project_workspace",
    "agent",
    "issue",
    "goal",
    "run",
)

ScopeKind = Literal[
    "instance", "company", "project", "project_workspace", "agent", "issue", "goal", "run"
]

MAX_NAME_LENGTH: Final = 500
MAX_BATCH_OPS: Final = 1000
MAX_LIST_LIMIT: Final = 1000
MAX_GET_MANY_ENTRIES: Final = 1000
DEFAULT_NAMESPACE: Final = "default"
RESERVED_NAMES: Final = frozenset({"__proto__", "prototype", "constructor"})

# Not empty or all whitespace, not a reserved word, no NUL. Written as one regular expression
# that ECMAScript and Python read alike, so the exported JSON Schema enforces it too: the end
# of the string is `(?![\s\S])` (Python's `$` also matches before a final newline), and the
# whitespace class is spelled out (the two languages' `\s` differ at the edges).
_WHITESPACE: Final = (
    r"[\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
)
_END: Final = r"(?![\s\S])"
NAME_PATTERN: Final = (
    rf"^(?!{_WHITESPACE}*{_END})(?!(?:__proto__|prototype|constructor){_END})[^\x00]*{_END}"
)

Name = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        pattern=NAME_PATTERN,
        description="1 to 500 characters, not all whitespace, no NUL, "
        "not __proto__, prototype or constructor",
    ),
]
_ONLY_WHITESPACE: Final = re.compile(rf"{_WHITESPACE}*{_END}")


def name_problem(name: str) -> str | None:
    """The rule of ``Name`` that ``name`` breaks, in words (``must not be empty``), or None.
    The same rules as ``NAME_PATTERN`` and the length limits, said so that a person reading
    a reply, a dead letter's reason or the CLI's error need not read a regular expression."""
    if not name:
        return "must not be empty"
    if "\x00" in name:
        return "must not contain U+0000 (NUL)"
    if name in RESERVED_NAMES:
        return "must not be one of " + ", ".join(sorted(RESERVED_NAMES, key=_RESERVED_ORDER.index))
    if _ONLY_WHITESPACE.match(name):
        return "must not be only whitespace"
    if len(name) > MAX_NAME_LENGTH:
        return f"must be at most {MAX_NAME_LENGTH} characters (it has {len(name)})"
    return None


_RESERVED_ORDER: Final = ("__proto__", "prototype", "constructor")


KeyPrefix = Annotated[
    str, Meta(max_length=MAX_NAME_LENGTH, pattern=r"^[^\x00]*$", description="a key prefix")
]
WriteId = Annotated[
    uuid.UUID,
    Meta(description="UUIDv7 made by the publisher: idempotency key and version of the write"),
]
JsonValue = Annotated[Any, Meta(description="any JSON value, null included")]
# Written values stay undecoded: a JSON value is stored exactly as sent (jsonb keeps
# numbers such as 1e-999 or 0.1000000000000000055511 that a float would alter), and no
# intermediate objects are built on the hot path. MessagePack values are converted.
WrittenValue = Annotated[msgspec.Raw, Meta(description="any JSON value, null included")]
# A string, not a datetime: MessagePack would otherwise carry a timestamp extension, and the
# contract says RFC 3339 in both encodings.
Timestamp = Annotated[
    str, Meta(description="RFC 3339 date-time", extra_json_schema={"format": "date-time"})
]
IfVersion = Annotated[
    uuid.UUID,
    Meta(
        description="apply only if the entry has a value written by exactly this write "
        "(its version); older than the write's own id (protocol §7)"
    ),
]
IfAbsent = Annotated[
    bool, Meta(description="true: apply only if the entry has no value now (protocol §7)")
]
# Present on a delete only to refuse them: a condition the worker cannot honour must not
# be dropped silently as an unknown field would be.
NotOnDelete = Annotated[
    Literal[False], Meta(description="not for a delete: if_absent applies to a set")
]
NoTtlOnDelete = Annotated[None, Meta(description="not for a delete: a delete does not expire")]
TtlMs = Annotated[
    int,
    Meta(
        ge=1,
        description="the entry expires this many milliseconds after the write's UUIDv7 time; "
        "at most the tombstone retention (protocol §7)",
    ),
]


class _Wire(Struct, kw_only=True, omit_defaults=False, forbid_unknown_fields=False):
    """Common settings: fields by keyword, unknown fields ignored for forward compatibility."""


# ---------------------------------------------------------------------------- writes


class SetCommand(_Wire, tag="set", tag_field="op", kw_only=True):
    """Store ``value`` at the entry, if ``id`` is newer than what the entry has seen."""

    id: WriteId
    plugin_id: uuid.UUID
    scope_kind: ScopeKind
    scope_id: Name | None = None
    namespace: Name = DEFAULT_NAMESPACE
    key: Name
    value: WrittenValue
    if_version: IfVersion | None = None
    if_absent: IfAbsent = False
    ttl_ms: TtlMs | None = None


class DeleteCommand(_Wire, tag="delete", tag_field="op", kw_only=True):
    """Remove the entry, leaving a tombstone at version ``id``."""

    id: WriteId
    plugin_id: uuid.UUID
    scope_kind: ScopeKind
    scope_id: Name | None = None
    namespace: Name = DEFAULT_NAMESPACE
    key: Name
    if_version: IfVersion | None = None
    if_absent: NotOnDelete = False
    ttl_ms: NoTtlOnDelete = None


class BatchSet(_Wire, tag="set", tag_field="op", kw_only=True):
    """A ``set`` inside a batch: the batch gives its ``id`` and ``plugin_id``."""

    scope_kind: ScopeKind
    scope_id: Name | None = None
    namespace: Name = DEFAULT_NAMESPACE
    key: Name
    value: WrittenValue
    if_version: IfVersion | None = None
    if_absent: IfAbsent = False
    ttl_ms: TtlMs | None = None


class BatchDelete(_Wire, tag="delete", tag_field="op", kw_only=True):
    """A ``delete`` inside a batch: the batch gives its ``id`` and ``plugin_id``."""

    scope_kind: ScopeKind
    scope_id: Name | None = None
    namespace: Name = DEFAULT_NAMESPACE
    key: Name
    if_version: IfVersion | None = None
    if_absent: NotOnDelete = False
    ttl_ms: NoTtlOnDelete = None


class BatchCommand(_Wire, tag="batch", tag_field="op", kw_only=True):
    """Several sets and deletes of one plugin, applied all or nothing at version ``id``."""

    id: WriteId
    plugin_id: uuid.UUID
    ops: Annotated[list[BatchSet | BatchDelete], Meta(min_length=1, max_length=MAX_BATCH_OPS)]


WriteCommand = SetCommand | DeleteCommand | BatchCommand
WRITE_OPS: Final = frozenset({"set", "delete", "batch"})

# ----------------------------------------------------------------------------- reads


class EntryRef(_Wire, kw_only=True):
    """One entry named by its scope key, as in ``get_many``."""

    scope_kind: ScopeKind
    scope_id: Name | None = None
    namespace: Name = DEFAULT_NAMESPACE
    key: Name
    after: uuid.UUID | None = None


class GetRequest(_Wire, tag="get", tag_field="op", kw_only=True):
    """Read one entry; with ``after``, wait until that write (or a later one) is applied."""

    plugin_id: uuid.UUID
    scope_kind: ScopeKind
    scope_id: Name | None = None
    namespace: Name = DEFAULT_NAMESPACE
    key: Name
    after: uuid.UUID | None = None


class GetManyRequest(_Wire, tag="get_many", tag_field="op", kw_only=True):
    """Read several entries; the reply lists one value per entry, in order."""

    plugin_id: uuid.UUID
    entries: Annotated[list[EntryRef], Meta(max_length=MAX_GET_MANY_ENTRIES)]


class ListRequest(_Wire, tag="list", tag_field="op", kw_only=True):
    """Page through a plugin's entries in (scope_kind, scope_id, namespace, key) order."""

    plugin_id: uuid.UUID
    scope_kind: ScopeKind | None = None
    scope_id: Name | None = None
    namespace: Name | None = None
    prefix: KeyPrefix = ""
    limit: Annotated[int, Meta(ge=1, le=MAX_LIST_LIMIT)] = 100
    cursor: str | None = None


Position = Annotated[
    str,
    Meta(
        max_length=40,
        description="a position in a plugin's change log: opaque, as a reply gave it",
    ),
]
MAX_CHANGES_WAIT_MS: Final = 30_000


class ChangesRequest(_Wire, tag="changes", tag_field="op", kw_only=True):
    """Read a plugin's change log after ``since`` (null: its current end), with the
    filters of ``list``; with ``wait_ms``, wait that long for a change (protocol §8)."""

    plugin_id: uuid.UUID
    since: Position | None = None
    limit: Annotated[int, Meta(ge=1, le=MAX_LIST_LIMIT)] = 100
    wait_ms: Annotated[int, Meta(ge=0, le=MAX_CHANGES_WAIT_MS)] = 0
    scope_kind: ScopeKind | None = None
    scope_id: Name | None = None
    namespace: Name | None = None
    prefix: KeyPrefix = ""


ReadRequest = GetRequest | GetManyRequest | ListRequest | ChangesRequest
READ_OPS: Final = frozenset({"get", "get_many", "list", "changes"})

# --------------------------------------------------------------------------- replies


class _Reply(Struct, kw_only=True, omit_defaults=True, tag_field="type"):
    """Replies leave out what they do not have (``found: false`` carries no value)."""


class ValueReply(_Reply, tag="value", kw_only=True):
    """One entry's value; ``found`` tells a missing entry from a stored ``null``."""

    found: bool
    value: JsonValue | UnsetType = UNSET
    version: uuid.UUID | UnsetType = UNSET
    updated_at: Timestamp | UnsetType = UNSET
    expires_at: Timestamp | UnsetType = UNSET
    """Only for an entry with a time to live (protocol §7)."""


class ValuesReply(_Reply, tag="values", kw_only=True):
    """The answer to ``get_many``: one value reply per requested entry, in order."""

    items: list[ValueReply]


class PageItem(Struct, kw_only=True, omit_defaults=True):
    """One entry of a ``list`` page."""

    scope_kind: ScopeKind
    scope_id: str | None
    namespace: str
    key: str
    value: JsonValue
    version: uuid.UUID
    updated_at: Timestamp
    expires_at: Timestamp | UnsetType = UNSET
    """Only for an entry with a time to live (protocol §7)."""


class PageReply(_Reply, tag="page", kw_only=True):
    """One page of ``list``; ``next_cursor`` is null on the last page."""

    items: list[PageItem]
    # Required (no default) so that a null cursor is still sent: omit_defaults would drop it.
    next_cursor: str | None


ChangeKind = Literal["set", "delete", "expire"]


class ChangeItem(Struct, kw_only=True, omit_defaults=True):
    """One change of a plugin's state: ``set`` (with the value), ``delete`` or ``expire``
    (``version``: the write whose time to live ran out)."""

    position: Position
    change: ChangeKind
    scope_kind: ScopeKind
    scope_id: str | None
    namespace: str
    key: str
    version: uuid.UUID
    value: JsonValue | UnsetType = UNSET
    updated_at: Timestamp
    expires_at: Timestamp | UnsetType = UNSET


class ChangesReply(_Reply, tag="changes", kw_only=True):
    """A page of the change log; ``next`` is what to send as ``since`` to continue."""

    next: Position
    items: list[ChangeItem]


class AppliedReply(_Reply, tag="applied", kw_only=True):
    """Sent after commit to a write that carried ``reply_to``: ``superseded`` when a newer
    version was there (or an unconditional write was a duplicate), ``conflict`` when a
    condition of protocol §7 did not hold (``failed_op``: the first failing op of a batch)."""

    id: uuid.UUID
    outcome: Literal["applied", "superseded", "conflict"]
    failed_op: int | UnsetType = UNSET


class ErrorReply(_Reply, tag="error", kw_only=True):
    """Any failure, with a code from protocol §4."""

    code: ErrorCode
    message: str


Reply = ValueReply | ValuesReply | PageReply | ChangesReply | AppliedReply | ErrorReply

__all__ = [
    "MAX_BATCH_OPS",
    "MAX_LIST_LIMIT",
    "READ_OPS",
    "SCOPE_KINDS",
    "WRITE_OPS",
    "AppliedReply",
    "BatchCommand",
    "BatchDelete",
    "BatchSet",
    "ChangeItem",
    "ChangesReply",
    "ChangesRequest",
    "DeleteCommand",
    "EntryRef",
    "ErrorReply",
    "GetManyRequest",
    "GetRequest",
    "ListRequest",
    "PageItem",
    "PageReply",
    "ReadRequest",
    "Reply",
    "SetCommand",
    "ValueReply",
    "ValuesReply",
    "WriteCommand",
]
