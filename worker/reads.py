"""What a read answers: values looked up together, list pages, all within the reply limit.

Pure where it can be (bounds, sizes, reply building); the two queries are ``Store``'s.
Every reply stays within ``max_reply_bytes`` (protocol §3): a ``list`` page ends early (at
least one item, the cursor continues), a ``get_many`` that would be larger is
``reply_too_large``; a ``list`` page reads at most ``LIST_SCAN`` rows of its range.
Sizes are estimated from the stored size of each value before anything
is loaded, so a hostile request (a 1 MiB entry named 1000 times) costs at most one reply's
worth of memory, never more; the encoded reply is measured again before it is sent.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import msgspec
from msgspec import UNSET, UnsetType

from schemas.codec import JSON, Codec
from schemas.errors import ReplyTooLarge
from schemas.messages import (
    ChangeItem,
    ChangesReply,
    ChangesRequest,
    ListRequest,
    PageItem,
    PageReply,
    ValueReply,
)
from worker import changes
from worker.cursor import ListPosition, encode_cursor
from worker.model import EntryKey
from worker.store import Found, ListBounds, Listed, LogPage, StoredValue

FRAMING: Final = 200
"""Bytes of JSON around one value in a reply (field names, version, timestamps), at most."""
_TOP: Final = "\U0010ffff"
"""Greater than every scope kind: the upper bound of an unfiltered list."""
LIST_SCAN: Final = 10_000
"""Most rows of the list index one ``list`` page reads: filters the index range cannot
express (a scope id without its kind, a namespace or a prefix alone) that match little
still answer soon, with fewer items (none, maybe) and a cursor past what was read."""


def item_size(value_bytes: int, entry: EntryKey | None = None) -> int:
    """A reply item's size at most: jsonb renders a value's text at most half again as long
    as it was sent (a space after each comma and colon), plus its names and framing."""
    names = (
        0 if entry is None else len(entry.key) + len(entry.namespace) + len(entry.scope_id or "")
    )
    return value_bytes * 3 // 2 + 4 * names + FRAMING


def embed(value_json: str, codec: Codec) -> Any:
    """A stored value as a reply carries it: JSON replies carry jsonb's text as is;
    MessagePack needs the value itself."""
    if codec.content_type == JSON:
        return msgspec.Raw(value_json.encode())
    return msgspec.json.decode(value_json)


def value_reply(value: StoredValue | None, codec: Codec) -> ValueReply:
    if value is None:
        return ValueReply(found=False)
    assert value.value_json is not None
    return ValueReply(
        found=True,
        value=embed(value.value_json, codec),
        version=value.version,
        updated_at=value.updated_at.isoformat(),
        expires_at=_timestamp(value.expires_at),
    )


def _timestamp(at: datetime | None) -> str | UnsetType:
    return UNSET if at is None else at.isoformat()


def check_lookup_size(entries: Sequence[EntryKey], found: Sequence[Found], limit: int) -> None:
    """``reply_too_large`` when the values of ``found`` cannot fit in one reply."""
    size = sum(
        item_size(f.value.value_bytes, e) if f.value is not None else FRAMING
        for e, f in zip(entries, found, strict=True)
    )
    if size > limit:
        raise ReplyTooLarge(
            f"the reply would be about {size} bytes; the limit is {limit}: ask for fewer "
            "entries at a time"
        )


def withheld(found: Sequence[Found]) -> bool:
    """Whether some value was held back by the burst's budget (to be looked up again)."""
    return any(f.value is not None and f.value.value_json is None for f in found)


def ready(found: Found, after: uuid.UUID | None) -> bool:
    """Whether the write named by ``after`` (or a newer one) has reached the entry."""
    return after is None or (found.register_version is not None and found.register_version >= after)


# ------------------------------------------------------------------------------- list


def _successor(text: str) -> str | None:
    """The smallest string greater than every string that starts with ``text`` (in code
    point order), or None when there is none."""
    chars = list(text)
    while chars:
        point = ord(chars[-1]) + 1
        if point == 0xD800:
            point = 0xE000  # surrogates cannot be stored
        if point <= 0x10FFFF:
            chars[-1] = chr(point)
            return "".join(chars)
        chars.pop()
    return None


def list_bounds(request: ListRequest | ChangesRequest) -> ListBounds:
    """The range of the list order the filters select, as far as the filters given form a
    leading run of (scope_kind, scope_id, namespace, key prefix); the rest stay filters."""
    chain: list[str] = []
    if request.scope_kind is not None:
        chain.append(request.scope_kind)
        if request.scope_id is not None or request.scope_kind == "instance":
            chain.append(request.scope_id or "")
            if request.namespace is not None:
                chain.append(request.namespace)
    prefix_upper = _successor(request.prefix) if request.prefix and len(chain) == 3 else None
    if prefix_upper is not None:
        lower = (*chain, request.prefix)
        upper: tuple[str, ...] = (*chain, prefix_upper)
    elif chain:
        # Exact values: nothing lies between a name and the name followed by U+0001 (names
        # hold no NUL), so this excludes every longer name.
        lower = (*chain, *[""] * (4 - len(chain)))
        upper = (*chain[:-1], chain[-1] + "\x01")
    else:
        lower, upper = ("", "", "", ""), (_TOP,)
    return ListBounds(
        lower=_position(lower),
        upper=_position(upper),
        scope_kind=request.scope_kind,
        scope_id=request.scope_id,
        namespace=request.namespace,
        prefix=request.prefix,
    )


def _position(parts: tuple[str, ...]) -> ListPosition:
    padded = (*parts, "", "", "", "")[:4]
    return padded[0], padded[1], padded[2], padded[3]


def page_reply(rows: Sequence[Listed], resume: ListPosition | None, codec: Codec) -> PageReply:
    """A list page as a reply; its cursor is ``resume``, where the next page starts (None:
    nothing follows)."""
    items = [
        PageItem(
            scope_kind=row.entry.scope_kind,  # type: ignore[arg-type]
            scope_id=row.entry.scope_id,
            namespace=row.entry.namespace,
            key=row.entry.key,
            value=embed(row.value.value_json or "null", codec),
            version=row.value.version,
            updated_at=row.value.updated_at.isoformat(),
            expires_at=_timestamp(row.value.expires_at),
        )
        for row in rows
    ]
    return PageReply(items=items, next_cursor=None if resume is None else encode_cursor(resume))


# ---------------------------------------------------------------------------- changes

LOG_SCAN: Final = 10_000
"""Most positions one ``changes`` read looks at: a filter that matches little still answers
soon, with a ``next`` past what it looked at."""


def changes_reply(page: LogPage, since: int, limit: int, codec: Codec) -> ChangesReply:
    """A page of the log as a reply, and where the next read starts: after the last item
    when the page (or the byte budget) is full, after the last position looked at when the
    scan window is, else at the head (every change up to it is in this snapshot)."""
    items: list[ChangeItem] = []
    for logged in page.changes:
        if not logged.within:
            break
        items.append(
            ChangeItem(
                position=changes.encode_position(logged.position),
                change=logged.change,  # type: ignore[arg-type]
                scope_kind=logged.entry.scope_kind,  # type: ignore[arg-type]
                scope_id=logged.entry.scope_id,
                namespace=logged.entry.namespace,
                key=logged.entry.key,
                version=logged.version,
                value=UNSET
                if logged.change != "set"
                else embed(logged.value_json or "null", codec),
                updated_at=logged.at.isoformat(),
                expires_at=_timestamp(logged.expires_at),
            )
        )
    if len(items) < len(page.changes) or len(items) == limit:
        last = page.changes[len(items) - 1].position if items else since
    elif page.scanned >= LOG_SCAN and page.scanned_to is not None:
        last = page.scanned_to
    else:
        last = max(since, page.head)
    return ChangesReply(next=changes.encode_position(last), items=items)
