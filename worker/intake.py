"""The one place where an untrusted delivery becomes a command, a request, or its error.

A message from the broker is any bytes with any AMQP properties. Each path hands every
delivery to this module, which decodes it, authorizes it, validates it and works out where
its answer may go, and returns either what was asked or the typed error that is its outcome.
Nothing here raises: a failure that no rule foresaw (a bug, a decoder's surprise) becomes
``internal`` for that message alone, logged with its traceback, and can never unwind the
worker's task groups.

Order matters, for security more than for speed:

1. properties: a message whose AMQP properties could not be decoded is ``invalid_message``
   (see ``worker.frames``); so is an unknown content type;
2. where to answer: ``reply_to`` must be RabbitMQ's direct reply-to or a queue of the
   caller's own, ``<prefix>.reply.<plugin_id>.<name>`` for the plugin of the routing key,
   else the message is refused (``invalid_request``) and nothing is sent anywhere: the
   worker never delivers into a queue its caller could not read (protocol §3);
3. decoding (the codecs classify every failure);
4. authorization, before validation: a caller who may not act for the plugin hears
   ``forbidden`` whatever else is wrong, so every dead letter that is not ``forbidden`` was
   sent by someone allowed to act for its plugin, and replaying it cannot launder a write
   into another plugin's state;
5. validation (``worker.validate``).

An answer that is ``forbidden`` never goes to a named reply queue: the caller was not allowed
to act for that plugin, so it cannot have the right to that plugin's queue either.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, TypeVar

import structlog

from schemas.codec import JSON, Codec, codec_for
from schemas.errors import (
    Forbidden,
    Internal,
    InvalidMessage,
    InvalidRequest,
    StateError,
    UnknownPlugin,
)
from schemas.messages import (
    ChangesRequest,
    GetManyRequest,
    GetRequest,
    ListRequest,
    ReadRequest,
    WriteCommand,
)
from schemas.rules import check_entry
from schemas.topology import DEADLINE_HEADER, DIRECT_REPLY_TO, Names
from worker.auth import Authorizer, Caller, Route, routed_plugin
from worker.broker import Delivery
from worker.changes import decode_position
from worker.cursor import decode_cursor
from worker.frames import UNREADABLE_HEADER
from worker.model import EntryKey, Write
from worker.validate import Rules, check_after, validate_write

log = structlog.get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R", bound="_Received")

MAX_WAIT_SECONDS: Final = 5.0
"""Longest a read waits for its ``after`` write (protocol §3)."""


def classified(step: Callable[[], T], what: str, message: Delivery) -> T | StateError:
    """Run one step of handling ``message``; its failure, whatever it is, is its outcome."""
    try:
        return step()
    except StateError as exc:
        return exc
    except Exception as exc:  # the one place a message's unforeseen failure is classified
        log.exception(
            "message_handling_failed",
            step=what,
            routing_key=message.routing_key,
            delivery_tag=message.delivery_tag,
        )
        return Internal(f"the worker could not handle this message ({type(exc).__name__})")


def reply_target(reply_to: str | None, plugin_id: uuid.UUID | None, names: Names) -> str | None:
    """Where an answer may go: None when none was asked for; ``invalid_request`` for a
    queue that is not the caller's own."""
    if not reply_to:
        return None
    if reply_to == DIRECT_REPLY_TO or reply_to.startswith(DIRECT_REPLY_TO + "."):
        return reply_to
    if plugin_id is not None:
        own = names.reply_queue_prefix(plugin_id)
        if reply_to.startswith(own) and len(reply_to) > len(own):
            return reply_to
    raise InvalidRequest(
        "reply_to must be amq.rabbitmq.reply-to (direct reply-to) or a queue of your own, "
        f"{names.reply_queue_prefix('<plugin_id>')}<name>, for the plugin of the routing key"
    )


@dataclass(slots=True, eq=False)
class _Received:
    """What every delivery has once its properties are read."""

    message: Delivery
    codec: Codec
    """The codec answers use: the request's own, or JSON when its content type is unusable."""
    caller: Caller
    routed: uuid.UUID | None
    """The plugin the routing key names."""
    reply_to: str | None = None
    error: StateError | None = None
    unreadable: bool = False
    """Its AMQP properties could not be decoded: nobody can tell who sent it."""

    @property
    def named_reply(self) -> bool:
        return self.reply_to is not None and not self.reply_to.startswith(DIRECT_REPLY_TO)

    def answer_to(self, outcome: object) -> str | None:
        """Where the answer to ``outcome`` goes (None: nowhere)."""
        if self.named_reply and isinstance(outcome, Forbidden):
            return None
        return self.reply_to


class _Intake:
    route: Route

    def __init__(self, names: Names, rules: Rules, authorizer: Authorizer) -> None:
        self.names = names
        self.rules = rules
        self.authorizer = authorizer

    def _properties(self, message: Delivery, received: _Received) -> None:
        headers = message.properties.headers or {}
        if UNREADABLE_HEADER in headers:
            received.unreadable = True
            received.error = InvalidMessage(
                f"its AMQP properties cannot be read ({headers[UNREADABLE_HEADER]!s})"
            )
            return
        try:
            received.codec = codec_for(message.content_type)
        except StateError as exc:
            received.error = exc
        try:
            received.reply_to = reply_target(message.reply_to, received.routed, self.names)
        except InvalidRequest as exc:
            received.error = exc

    def _start(self, message: Delivery, kind: type[R]) -> R:
        received = kind(
            message,
            codec_for(JSON),
            Caller(message.user_id, message.routing_key),
            routed_plugin(message.routing_key, self.route),
        )
        self._properties(message, received)
        return received

    def authorize(
        self,
        received: _Received,
        plugin_id: uuid.UUID | None,
        owners: Mapping[uuid.UUID, str | None],
    ) -> StateError | None:
        """Whether the caller may act for the plugin it names (the routing key's, when the
        body could not be read). A refusal outranks every other error but ``forbidden``'s
        own twin, ``unknown_plugin``, which a trusted caller of a broken message does not
        need to hear."""
        if received.unreadable:
            # No user_id to judge by: refused for what it is, and never replayed as anyone's.
            return received.error
        plugin = plugin_id or received.routed
        if plugin is None:
            return Forbidden(
                f"routing key {received.caller.routing_key!r} does not name a plugin "
                f"(expected {self.route}.<plugin_id>)"
            )
        refused = self.authorizer.check(received.caller, plugin, owners, self.route)
        if isinstance(refused, UnknownPlugin) and received.error is not None:
            return received.error
        return refused or received.error


# ------------------------------------------------------------------------------- writes


@dataclass(slots=True, eq=False)
class ReceivedWrite(_Received):
    """A write delivery, decoded (``command``) or not (``error``)."""

    command: WriteCommand | None = None

    def plugins(self) -> Iterable[uuid.UUID]:
        """Plugins whose registration deciding this write needs."""
        if self.routed is not None:
            yield self.routed
        if self.command is not None:
            yield self.command.plugin_id


class WriteIntake(_Intake):
    route = "cmd"

    def receive(self, message: Delivery) -> ReceivedWrite:
        """Read a write delivery's properties and body; never raises."""
        outcome = classified(lambda: self._receive(message), "receive", message)
        if isinstance(outcome, StateError):
            received = ReceivedWrite(
                message, codec_for(JSON), Caller(None, message.routing_key), None
            )
            received.error = outcome
            return received
        return outcome

    def _receive(self, message: Delivery) -> ReceivedWrite:
        received = self._start(message, ReceivedWrite)
        if received.error is None:
            try:
                received.command = received.codec.decode_write(message.body)
            except StateError as exc:
                received.error = exc
        return received

    def admit(
        self, received: ReceivedWrite, owners: Mapping[uuid.UUID, str | None], now_ms: int
    ) -> Write | StateError:
        """Authorize, then validate; never raises."""

        def admit() -> Write:
            command = received.command
            refused = self.authorize(
                received, None if command is None else command.plugin_id, owners
            )
            if refused is not None:
                raise refused
            assert command is not None
            msgpack = received.codec.content_type != JSON
            return validate_write(command, now_ms, self.rules, received.caller, msgpack=msgpack)

        return classified(admit, "admit", received.message)


# -------------------------------------------------------------------------------- reads


@dataclass(slots=True, eq=False)
class ReadCall(_Received):
    """A read request being served: what it asked (or why it cannot be served), where to
    answer, and until when it may wait for an ``after`` write."""

    request: ReadRequest | None = None
    received_at: float = 0.0
    deadline: float = 0.0
    wanted: list[tuple[EntryKey, uuid.UUID | None]] = field(default_factory=list)
    """The entries a ``get`` or ``get_many`` reads, each with the write it waits for."""
    resume: int | None = None
    """Where a ``changes`` read that waits reads from next."""
    parked: bool = False
    """Waiting (for its ``after`` write or a change), its delivery parked in the
    subscription (``worker.broker.Subscription.park``)."""
    settled: bool = False
    """Answered, dead-lettered or given back: nothing more is sent for it."""

    @property
    def op(self) -> str:
        return "invalid" if self.request is None else str(self.request.__struct_config__.tag)

    @property
    def plugin_id(self) -> uuid.UUID | None:
        return None if self.request is None else self.request.plugin_id


class ReadIntake(_Intake):
    route = "rpc"

    def receive(self, message: Delivery, now_ms: int | None = None) -> ReadCall:
        """Read a request's properties and body and check what types cannot; never raises.
        A call without ``reply_to`` (or with a refused one) cannot be answered: the caller
        dead-letters it."""
        at = int(time.time() * 1000) if now_ms is None else now_ms
        outcome = classified(lambda: self._receive(message, at), "receive", message)
        if isinstance(outcome, StateError):
            call = ReadCall(message, codec_for(JSON), Caller(None, message.routing_key), None)
            call.error = outcome
            return call
        return outcome

    def _receive(self, message: Delivery, now_ms: int) -> ReadCall:
        call = self._start(message, ReadCall)
        call.received_at = message.received
        call.deadline = self._deadline(message, now_ms)
        if call.error is None and call.reply_to is None:
            call.error = InvalidRequest("a read request needs reply_to (and correlation_id)")
        if call.error is not None:
            return call
        try:
            call.request = call.codec.decode_read(message.body)
            call.wanted = self._wanted(call.request, now_ms)
        except StateError as exc:
            call.error = exc
        if isinstance(call.request, ChangesRequest):
            call.deadline = self._deadline(message, now_ms, call.request.wait_ms / 1000)
        return call

    def _deadline(self, message: Delivery, now_ms: int, wait: float = MAX_WAIT_SECONDS) -> float:
        """When to stop waiting: ``wait`` (5 s for an ``after``, ``wait_ms`` for
        ``changes``) or the expiration after receipt, whichever is first, and never after
        the caller's own deadline when it sent one (``x-deadline``)."""
        received = message.received
        expiration = message.expiration
        deadline = received + (wait if expiration is None else min(expiration, wait))
        caller_deadline = (message.properties.headers or {}).get(DEADLINE_HEADER)
        if isinstance(caller_deadline, int) and not isinstance(caller_deadline, bool):
            deadline = min(deadline, received + (caller_deadline - now_ms) / 1000)
        return deadline

    def _wanted(self, request: ReadRequest, now_ms: int) -> list[tuple[EntryKey, uuid.UUID | None]]:
        if isinstance(request, ListRequest | ChangesRequest):
            if request.scope_kind == "instance" and request.scope_id is not None:
                raise InvalidRequest("scope_id must be null for scope_kind 'instance'")
            if isinstance(request, ListRequest) and request.cursor is not None:
                decode_cursor(request.cursor)
            if isinstance(request, ChangesRequest) and request.since is not None:
                decode_position(request.since)
            return []
        if isinstance(request, GetRequest):
            refs = [request]
        else:
            assert isinstance(request, GetManyRequest)
            refs = request.entries  # type: ignore[assignment]
        wanted = []
        for index, ref in enumerate(refs):
            where = "" if isinstance(request, GetRequest) else f"entries[{index}]: "
            try:
                check_entry(ref.scope_kind, ref.scope_id, ref.namespace, ref.key)
                after = ref.after
                if after is not None and not check_after(after, now_ms, self.rules):
                    after = None  # older than the retention: nothing left to wait for
            except InvalidRequest as exc:
                raise InvalidRequest(where + exc.message) from None
            key = EntryKey(request.plugin_id, ref.scope_kind, ref.scope_id, ref.namespace, ref.key)
            wanted.append((key, after))
        return wanted
