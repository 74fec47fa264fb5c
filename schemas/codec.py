"""JSON and MessagePack codecs for the contract, chosen by the AMQP ``content_type``.

Decoding failures are classified into the contract's codes here, once, for every caller:
malformed bodies, non-objects and unknown ops are ``invalid_message``; a known op with bad
fields is ``invalid_request``; a number no JSON store can hold is ``unsupported_value``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from schemas.errors import InvalidMessage, InvalidRequest, StateError
from schemas.messages import (
    READ_OPS,
    WRITE_OPS,
    ReadRequest,
    Reply,
    WriteCommand,
    name_problem,
)

JSON: Final = "application/json"
MSGPACK: Final = "application/msgpack"

# Where msgspec says a field failed (`$.ops[3].key`), and that path's steps.
_PATH: Final = re.compile(r"at `(\$[^`]*)`")
_STEP: Final = re.compile(r"\.(\w+)|\[(\d+)\]")

_CONTENT_TYPES: Final = {
    JSON: JSON,
    "": JSON,
    MSGPACK: MSGPACK,
    "application/x-msgpack": MSGPACK,
    "application/vnd.msgpack": MSGPACK,
}


@dataclass(frozen=True, slots=True)
class Codec:
    """Encoders and decoders of one content type, built once."""

    content_type: str
    name: str
    writes: msgspec.json.Decoder[WriteCommand] | msgspec.msgpack.Decoder[WriteCommand]
    reads: msgspec.json.Decoder[ReadRequest] | msgspec.msgpack.Decoder[ReadRequest]
    replies: msgspec.json.Decoder[Reply] | msgspec.msgpack.Decoder[Reply]
    envelope: msgspec.json.Decoder[_Envelope] | msgspec.msgpack.Decoder[_Envelope]
    generic: msgspec.json.Decoder[Any] | msgspec.msgpack.Decoder[Any]
    encoder: msgspec.json.Encoder | msgspec.msgpack.Encoder

    def encode(self, message: object) -> bytes:
        return self.encoder.encode(message)

    def decode_write(self, body: bytes) -> WriteCommand:
        try:
            return self.writes.decode(body)
        except _DECODE_FAILURES as exc:
            raise self._classify(body, exc, WRITE_OPS, "write command") from None

    def decode_read(self, body: bytes) -> ReadRequest:
        try:
            return self.reads.decode(body)
        except _DECODE_FAILURES as exc:
            raise self._classify(body, exc, READ_OPS, "read request") from None

    def decode_reply(self, body: bytes) -> Reply:
        try:
            return self.replies.decode(body)
        except _DECODE_FAILURES as exc:
            raise InvalidMessage(f"malformed reply: {exc}") from None

    def _classify(self, body: bytes, exc: Exception, ops: frozenset[str], what: str) -> StateError:
        if isinstance(exc, RecursionError):
            # Too deep even to look at the op; within an object only a value nests so deep,
            # far past the nesting limit (protocol §1).
            if self._looks_like_object(body):
                return InvalidRequest("value nests arrays and objects deeper than the limit")
            return InvalidMessage(f"body must be a {self.name} object")
        if isinstance(exc, UnicodeDecodeError):
            return InvalidMessage(f"body holds a string that is not valid UTF-8: {exc.reason}")
        if not isinstance(exc, msgspec.ValidationError):
            return InvalidMessage(f"body is not well-formed {self.name}: {exc}")
        text = str(exc)
        # The typed decode failed: look again at the op alone, to tell "not an object / which
        # op?" (the message's shape) from "a known op with a bad field" (its content).
        try:
            op = self.envelope.decode(body).op
        except RecursionError:
            # A deep value elsewhere: go by where the typed decode stopped instead.
            if "`$.op`" in text or "field `op`" in text:
                return InvalidMessage(f"body has no usable `op`: {text}")
            return InvalidRequest(text)
        except _DECODE_FAILURES:
            return InvalidMessage(f"body must be a {self.name} object with a string `op`")
        if op is None:
            return InvalidMessage("body has no `op`")
        if not isinstance(op, str) or op not in ops:
            return InvalidMessage(f"unknown op {op!r}: a {what} is one of {sorted(ops)}")
        return InvalidRequest(self._in_words(body, text))

    def _in_words(self, body: bytes, text: str) -> str:
        """msgspec's message, but a name's broken rule said in words rather than as the
        constraint (a regular expression, a length) that caught it."""
        where = _PATH.search(text)
        if where is None or not ("matching regex" in text or "`str` of length" in text):
            return text
        value: Any
        try:
            value = self.generic.decode(body)
            for field, index in _STEP.findall(where.group(1)):
                value = value[field] if field else value[int(index)]
        except (*_DECODE_FAILURES, LookupError, TypeError):
            return text
        problem = name_problem(value) if isinstance(value, str) else None
        if problem is None:
            return text
        return f"{where.group(1).removeprefix('$.')} {problem}"

    def _looks_like_object(self, body: bytes) -> bool:
        if self.content_type == JSON:
            return body.lstrip()[:1] == b"{"
        return bool(body) and (0x80 <= body[0] <= 0x8F or body[0] in (0xDE, 0xDF))


class _Envelope(msgspec.Struct):
    """Only the op: decoding it skips every other field, whatever they hold."""

    op: Any = None


# msgspec raises UnicodeDecodeError for invalid UTF-8 in strings and RecursionError past
# the interpreter's recursion limit, besides its own DecodeError.
_DECODE_FAILURES: Final = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def _codec(content_type: str, name: str, module: Any) -> Codec:
    """A codec from one of msgspec's format modules (``msgspec.json``, ``msgspec.msgpack``),
    which offer the same Decoder and Encoder."""
    return Codec(
        content_type=content_type,
        name=name,
        writes=module.Decoder(WriteCommand),
        reads=module.Decoder(ReadRequest),
        replies=module.Decoder(Reply),
        envelope=module.Decoder(_Envelope),
        generic=module.Decoder(),
        encoder=module.Encoder(),
    )


_CODECS: Final = {
    JSON: _codec(JSON, "JSON", msgspec.json),
    MSGPACK: _codec(MSGPACK, "MessagePack", msgspec.msgpack),
}
# The spellings nearly every message uses, looked up without parsing (a per-message cost).
_EXACT: Final = {None: _CODECS[JSON], JSON: _CODECS[JSON], MSGPACK: _CODECS[MSGPACK]}


def codec_for(content_type: str | None) -> Codec:
    """The codec for an AMQP ``content_type``; absent means JSON, parameters are ignored."""
    exact = _EXACT.get(content_type)
    if exact is not None:
        return exact
    base = (content_type or "").split(";", 1)[0].strip().lower()
    try:
        return _CODECS[_CONTENT_TYPES[base]]
    except KeyError:
        raise InvalidMessage(
            f"unsupported content_type {content_type!r}: use {JSON} or {MSGPACK}"
        ) from None
