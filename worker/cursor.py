"""``list`` cursors: where a page ended, opaque to callers, checked when they come back.

A cursor is the last entry of a page, (scope_kind, scope_id or '', namespace, key), as
base64url JSON. Nothing a caller sends as a cursor reaches Postgres unchecked: it must be
one a server could have issued (a scope kind of the contract, names without NUL within the
name limits), or it is ``invalid_request``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Final

import msgspec

from schemas.errors import InvalidRequest
from schemas.messages import MAX_NAME_LENGTH, SCOPE_KINDS

ListPosition = tuple[str, str, str, str]
"""Where a list page ended: (scope_kind, scope_id or '', namespace, key)."""

_MAX_CURSOR_CHARS: Final = 4 * 4 * MAX_NAME_LENGTH
_decoder = msgspec.json.Decoder(tuple[str, str, str, str])


def encode_cursor(position: ListPosition) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(position)).decode().rstrip("=")


def decode_cursor(cursor: str) -> ListPosition:
    """The position a cursor names, or ``invalid_request``."""
    refused = InvalidRequest("cursor is not one this server issued")
    if len(cursor) > _MAX_CURSOR_CHARS:
        raise refused
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        kind, scope_id, namespace, key = _decoder.decode(raw)
    except (binascii.Error, ValueError, msgspec.MsgspecError):
        raise refused from None
    names = (scope_id, namespace, key)
    if (
        kind not in SCOPE_KINDS
        or (kind == "instance") != (scope_id == "")
        or any("\x00" in name or len(name) > MAX_NAME_LENGTH for name in names)
        or not namespace
        or not key
    ):
        raise refused
    return kind, scope_id, namespace, key
