"""The error codes of the contract (protocol §4) and the exceptions that carry them.

Both the worker and the Python client raise these, so a caller can catch one class per code
and read ``exc.code`` to get the exact string that travels on the wire.
"""

from __future__ import annotations

from typing import ClassVar, Literal

ErrorCode = Literal[
    "invalid_message",
    "invalid_request",
    "unsupported_value",
    "value_too_large",
    "unknown_plugin",
    "quota_exceeded",
    "forbidden",
    "stale",
    "write_pending",
    "reply_too_large",
    "compacted",
    "internal",
]


class StateError(Exception):
    """A failure with a stable code from the contract and a human-readable message."""

    code: ClassVar[ErrorCode] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidMessage(StateError):
    """The body is not well-formed, not an object, or has no or an unknown ``op``."""

    code = "invalid_message"


class InvalidRequest(StateError):
    """A known ``op`` with a missing or mistyped field, or a value breaking a rule."""

    code = "invalid_request"


class UnsupportedValue(StateError):
    """The value cannot be stored as ``jsonb`` (U+0000, NaN, Infinity, binary)."""

    code = "unsupported_value"


class ValueTooLarge(StateError):
    """The value's JSON encoding is over the configured limit."""

    code = "value_too_large"


class UnknownPlugin(StateError):
    """``plugin_id`` names no registered plugin."""

    code = "unknown_plugin"


class QuotaExceeded(StateError):
    """The plugin is over its quota of entries or stored bytes."""

    code = "quota_exceeded"


class Forbidden(StateError):
    """The authenticated publisher may not act for that plugin."""

    code = "forbidden"


class Stale(StateError):
    """The write is older than the tombstone retention."""

    code = "stale"


class WritePending(StateError):
    """A read's ``after`` write was not applied before the deadline."""

    code = "write_pending"


class ReplyTooLarge(StateError):
    """The reply would be larger than the reply size limit."""

    code = "reply_too_large"


class Compacted(StateError):
    """A ``changes`` read asks for a position older than the change log keeps."""

    code = "compacted"


class Internal(StateError):
    """Anything else; the message that caused it is not lost."""

    code = "internal"


ERRORS_BY_CODE: dict[str, type[StateError]] = {
    cls.code: cls
    for cls in (
        InvalidMessage,
        InvalidRequest,
        UnsupportedValue,
        ValueTooLarge,
        UnknownPlugin,
        QuotaExceeded,
        Forbidden,
        Stale,
        WritePending,
        ReplyTooLarge,
        Compacted,
        Internal,
    )
}


def error_from_code(code: str, message: str) -> StateError:
    """Rebuild the typed exception for a code received on the wire."""
    return ERRORS_BY_CODE.get(code, Internal)(message)
