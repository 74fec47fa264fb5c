"""The dead-letter queue ``<prefix>.dead``, for operators: list, replay, purge.

Two kinds of message end up there. The worker's own rejects carry ``x-reject-code``,
``x-reject-reason``, ``x-original-routing-key``, ``x-original-exchange`` (and
``x-original-user-id``) over the original body and properties (``worker.publish``).
Commands that RabbitMQ itself dead-lettered (the commands queue's delivery limit, a
``basic.reject``) carry RabbitMQ's ``x-death`` header instead; its reason
(``delivery_limit``, ``rejected``, ...) stands in for the code.

How the queue is read without losing anything: every operation walks the messages present
when it starts, taking each with ``basic.get`` and manual ack, one at a time (``basic.get``
has no prefetch: only the current message, and for a replay a bounded window of messages
awaiting their publisher confirm, are in memory, never the whole queue). A message the
operation does not take (list takes none) is *held*: left unacked, so it is neither lost
nor handed out again during the walk; once the walk is over, all held messages go back with
one ``basic.nack(multiple, requeue)``. When anything fails halfway, nothing is nacked
explicitly: closing the connection returns every unacked message to the queue, so a crash at
any instant loses nothing.

Why the walk always goes through the whole queue, even for ``--limit``: a quorum queue puts
a requeued message at its *back*. Were a walk to stop early, what it held would go behind
the messages it never reached, and a mere listing would rotate the queue. Walking to the
end and returning everything at once keeps the order (a classic queue, which requeues in
place, keeps it as well). Requeuing each message right away is no alternative either: a
classic queue would hand the same message out again at once.

Costs of that choice, documented rather than hidden:

- Each requeue counts as a delivery in a quorum queue. The dead queue is declared without
  a delivery limit, which on RabbitMQ 3.x means none. RabbitMQ 4.0+ gives every quorum
  queue a default limit of 20, past which a message of a queue without a dead-letter target
  is dropped: there the dead queue needs ``x-delivery-limit: -1`` (or a policy) before
  these commands are used often. (Not on 3.x: there -1 drops a message at its first
  requeue.)
- While an operation runs, the messages it holds are unacked: another reader of the dead
  queue does not see them, and RabbitMQ's ``consumer_timeout`` (30 minutes by default)
  bounds how long one walk may take before the broker closes its channel (which, again,
  returns every held message).
- Messages that arrive during an operation are not part of it: it stops after as many
  messages as the queue held when it started, and on a quorum queue those newcomers end up
  ahead of the older messages it returns.

Replay is at least once: a dead letter is acked only after its republish is confirmed, so
a crash between the two republishes it again next time, which the worker's idempotent,
last-writer-wins apply makes harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import os
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
import msgspec
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)

from schemas.codec import MSGPACK
from worker import diagnosis
from worker.broker import BROKER_FAILURES
from worker.config import Settings, redact_url
from worker.publish import PUBLISH_TIMEOUT, without_bookkeeping
from worker.topology import Names

PREVIEW_CHARS: Final = 80
"""A body preview is cut to this many characters: never the full payload."""
REPLAY_WINDOW: Final = 64
"""Republished messages awaiting their publisher confirm at once."""
GET_TIMEOUT: Final = 10.0

FORBIDDEN: Final = "forbidden"
"""Dead letters of this code are replayed only when asked for by code (``--code
forbidden``): a replay goes out as the operator's user, who may act for plugins the
original publisher could not."""

DeadLetteredBy = Literal["worker", "rabbitmq", "unknown"]


class DeadLetterError(Exception):
    """An operation on the dead-letter queue could not be done; nothing was lost."""


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What an operator needs to know of one dead letter (never its full body)."""

    index: int
    """1-based position in the queue when the operation started."""
    code: str
    """``x-reject-code``, or RabbitMQ's ``x-death`` reason (``delivery_limit``, ...)."""
    reason: str
    dead_lettered_by: DeadLetteredBy
    exchange: str
    """Where a replay publishes it: the original exchange (``""`` is the default one)."""
    routing_key: str
    """The original routing key, with which a replay publishes it."""
    user_id: str | None
    """The original, broker-validated publisher, when the message carried one."""
    message_id: str | None
    correlation_id: str | None
    content_type: str | None
    body_size: int
    preview: str

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "code": self.code,
            "reason": self.reason,
            "dead_lettered_by": self.dead_lettered_by,
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "user_id": self.user_id,
            "message_id": self.message_id,
            "correlation_id": self.correlation_id,
            "content_type": self.content_type,
            "body_size": self.body_size,
            "preview": self.preview,
        }


def describe(index: int, message: AbstractIncomingMessage, default_exchange: str) -> DeadLetter:
    """Read a dead letter's headers: the worker's ``x-reject-*`` / ``x-original-*`` ones, or
    RabbitMQ's ``x-death``. ``default_exchange`` is where a letter that names no original
    exchange came from (the prefix's exchange). Never raises: a letter whose headers make no
    sense is still shown (code ``unknown``), so it can be listed and purged."""
    try:
        return _describe(index, message, default_exchange)
    except Exception as exc:  # noqa: BLE001 - any letter, however odd, must be shown
        return DeadLetter(
            index=index,
            code="unknown",
            reason=f"its headers cannot be read ({type(exc).__name__})",
            dead_lettered_by="unknown",
            exchange=default_exchange,
            routing_key=_text(message.routing_key) or "",
            user_id=None,
            message_id=None,
            correlation_id=None,
            content_type=None,
            body_size=len(message.body),
            preview=preview(message.body, None),
        )


def _describe(index: int, message: AbstractIncomingMessage, default_exchange: str) -> DeadLetter:
    headers: Mapping[str, Any] = message.headers or {}
    by: DeadLetteredBy
    code = _text(headers.get("x-reject-code"))
    deaths = _deaths(headers)
    if code is not None:
        by = "worker"
        reason = _text(headers.get("x-reject-reason")) or ""
        exchange = _text(headers.get("x-original-exchange"))
        routing_key = _text(headers.get("x-original-routing-key"))
    elif deaths:
        # x-death holds one entry per (queue, reason), the most recent first: the latest
        # says why the message is here, the oldest where it was first published.
        by = "rabbitmq"
        latest, origin = deaths[0], deaths[-1]
        code = _text(latest.get("reason")) or "unknown"
        reason = (
            f"dead-lettered by RabbitMQ from queue {_text(latest.get('queue'))!r} "
            f"({code}, {_text(latest.get('count')) or '?'} time(s))"
        )
        exchange = _text(origin.get("exchange"))
        keys = origin.get("routing-keys")
        routing_key = _text(keys[0]) if isinstance(keys, list) and keys else None
    else:
        by, code = "unknown", "unknown"
        reason = "no x-reject-code or x-death header: not dead-lettered by the worker or RabbitMQ"
        exchange, routing_key = None, None
    original_user = _text(headers.get("x-original-user-id")) or message.user_id
    return DeadLetter(
        index=index,
        code=code,
        reason=reason,
        dead_lettered_by=by,
        exchange=default_exchange if exchange is None else exchange,
        routing_key=routing_key if routing_key is not None else message.routing_key or "",
        user_id=original_user,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        content_type=message.content_type,
        body_size=len(message.body),
        preview=preview(message.body, message.content_type),
    )


def preview(body: bytes, content_type: str | None, width: int = PREVIEW_CHARS) -> str:
    """The start of a body as one printable line of at most ``width`` characters.

    MessagePack is shown as the JSON it decodes to; anything undecodable as escaped text."""
    source = body
    if content_type == MSGPACK:
        # Not valid MessagePack (or nothing JSON can show): its bytes are shown, escaped,
        # like any other body.
        with contextlib.suppress(
            msgspec.MsgspecError, TypeError, ValueError, OverflowError, RecursionError
        ):
            source = msgspec.json.encode(msgspec.msgpack.decode(body))
    # A character is at most 4 bytes of UTF-8: this is enough for `width` of them.
    head = source[: width * 4]
    text = head.decode("utf-8", errors="backslashreplace")
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    if len(text) > width or len(head) < len(source):
        return text[: width - 1] + "…"
    return text


def _text(value: object) -> str | None:
    """A header value as text (pamqp gives ``bytes`` for strings that are not UTF-8)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    return str(value)


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _deaths(headers: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    deaths = headers.get("x-death")
    if not isinstance(deaths, list):
        return []
    return [d for d in deaths if isinstance(d, Mapping)]


# --------------------------------------------------------------------------- choosing


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters an operation takes; an empty selection takes every one."""

    codes: frozenset[str] = frozenset()
    routing_key: str | None = None
    """A glob (``fnmatch``: ``*``, ``?``, ``[...]``) over the original routing key."""

    def matches(self, letter: DeadLetter) -> bool:
        if self.codes and letter.code not in self.codes:
            return False
        return self.routing_key is None or fnmatch.fnmatchcase(letter.routing_key, self.routing_key)

    def __str__(self) -> str:
        parts = []
        if self.codes:
            parts.append("code " + " or ".join(sorted(self.codes)))
        if self.routing_key is not None:
            parts.append(f"routing key {self.routing_key}")
        return " and ".join(parts) or "all"


EVERYTHING: Final = Selection()


class Progress(Protocol):
    """Told how far an operation is: ``begin`` with the queue's length, then ``advance``
    once per message looked at, ``taken`` when the operation took it."""

    def begin(self, total: int) -> None: ...

    def advance(self, taken: bool) -> None: ...


class _NoProgress:
    def begin(self, total: int) -> None:
        pass

    def advance(self, taken: bool) -> None:
        pass


@dataclass(slots=True)
class Tally:
    """What an operation did: of ``total`` messages at its start, it looked at ``scanned``
    and took (listed, replayed, purged) ``taken``; the others are still in the queue."""

    total: int
    scanned: int = 0
    taken: int = 0
    withheld: int = 0
    """Selected ``forbidden`` letters a replay left in place (not asked for by code)."""


def _reached(tally: Tally, limit: int | None) -> bool:
    return limit is not None and tally.taken >= limit


# --------------------------------------------------------------------------- walking


@dataclass(slots=True)
class _Walk:
    """Takes the messages present at the start one by one and holds what is not taken.

    ``next`` gets the following message; the caller calls ``take`` for one it settles
    (acks) itself. ``return_held`` requeues every held message with one ``multiple`` nack:
    it must run only once every taken message is settled, or the nack would cover those
    too."""

    queue: AbstractQueue
    default_exchange: str
    progress: Progress
    tally: Tally
    _current: AbstractIncomingMessage | None = None
    _current_taken: bool = False
    _newest_held: AbstractIncomingMessage | None = None

    async def next(self) -> tuple[DeadLetter, AbstractIncomingMessage] | None:
        self._hold_current()
        if self.tally.scanned >= self.tally.total:
            return None
        message = await self.queue.get(no_ack=False, fail=False, timeout=GET_TIMEOUT)
        if message is None:
            return None
        self.tally.scanned += 1
        self._current, self._current_taken = message, False
        return describe(self.tally.scanned, message, self.default_exchange), message

    def take(self) -> None:
        self._current_taken = True
        self.tally.taken += 1

    async def return_held(self) -> None:
        self._hold_current()
        if self._newest_held is not None:
            await self._newest_held.nack(multiple=True, requeue=True)
            self._newest_held = None

    def _hold_current(self) -> None:
        if self._current is None:
            return
        if not self._current_taken:
            self._newest_held = self._current
        self.progress.advance(self._current_taken)
        self._current = None


# --------------------------------------------------------------------------- operations


class DeadLetters:
    """One connection to RabbitMQ, working on one prefix's dead-letter queue."""

    def __init__(
        self,
        names: Names,
        user: str,
        reading: AbstractChannel,
        publishing: AbstractChannel,
        queue: AbstractQueue,
    ) -> None:
        self.names = names
        self.user = user  # the RabbitMQ user this connection logged in as
        self._reading = reading
        self._publishing = publishing
        self._queue = queue
        self._exchanges: dict[str, AbstractExchange] = {}

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[DeadLetters]:
        """Connect; closing returns to the queue whatever is still unacked."""
        names = Names(settings.prefix)
        try:
            connection = await aio_pika.connect(
                settings.amqp_url,
                client_properties={
                    "connection_name": (
                        f"plugin-state-worker dead {socket.gethostname()}:{os.getpid()}"
                    )
                },
            )
        except (*BROKER_FAILURES, OSError) as exc:
            failure = diagnosis.broker_failure(exc, settings.amqp_url)
            raise DeadLetterError(
                str(failure)
                if failure
                else f"cannot connect to RabbitMQ at {redact_url(settings.amqp_url)}: "
                f"{_failure(exc)}"
            ) from exc
        async with connection:
            reading = await connection.channel(publisher_confirms=False)
            try:
                queue = await reading.declare_queue(names.dead, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise DeadLetterError(
                    f"there is no queue {names.dead!r}: no worker has declared the topology "
                    f"of prefix {names.prefix!r} yet"
                ) from None
            # Replays are confirmed, and an unroutable one comes back as an error (mandatory)
            # instead of vanishing.
            publishing = await connection.channel(publisher_confirms=True, on_return_raises=True)
            # aio-pika logs in as the URL's user, or as AMQP's default `guest`.
            user = unquote(urlsplit(settings.amqp_url).username or "") or "guest"
            yield cls(names, user, reading, publishing, queue)

    async def count(self) -> int:
        """Messages ready in the dead queue now (not those another reader holds)."""
        declared = await self._reading.declare_queue(self.names.dead, passive=True)
        count = declared.declaration_result.message_count
        return count or 0

    @asynccontextmanager
    async def _walking(self, progress: Progress | None) -> AsyncIterator[_Walk]:
        tally = Tally(total=await self.count())
        walk = _Walk(self._queue, self.names.exchange, progress or _NoProgress(), tally)
        walk.progress.begin(tally.total)
        # On an error the held messages are not nacked here: closing the connection
        # returns them, together with any taken message whose settling did not finish.
        yield walk
        await walk.return_held()

    async def list(
        self,
        show: Callable[[DeadLetter], object],
        selection: Selection = EVERYTHING,
        limit: int | None = None,
    ) -> Tally:
        """Call ``show(letter)`` for each selected dead letter, up to ``limit``, in queue
        order; every message stays in the queue, in its place."""
        async with self._walking(None) as walk:
            while (item := await walk.next()) is not None:
                letter, _ = item
                if selection.matches(letter) and not _reached(walk.tally, limit):
                    show(letter)
                    # Counted as taken, but held: a listing settles nothing.
                    walk.tally.taken += 1
            return walk.tally

    async def replay(
        self,
        selection: Selection = EVERYTHING,
        limit: int | None = None,
        progress: Progress | None = None,
    ) -> Tally:
        """Republish the selected dead letters (at most ``limit``) to their original
        exchange and routing key, body and properties as published, persistent; each is
        acked only once the broker confirmed its republish. ``forbidden`` letters stay unless
        the selection names that code."""
        window = asyncio.Semaphore(REPLAY_WINDOW)
        async with self._walking(progress) as walk:
            # The task group ends (every replay confirmed and acked) before `_walking`
            # returns the held messages.
            try:
                async with asyncio.TaskGroup() as replays:
                    while (item := await walk.next()) is not None:
                        letter, message = item
                        if not selection.matches(letter) or _reached(walk.tally, limit):
                            continue
                        if letter.code == FORBIDDEN and FORBIDDEN not in selection.codes:
                            walk.tally.withheld += 1
                            continue
                        walk.take()
                        await window.acquire()
                        replays.create_task(self._replay_one(letter, message, window))
            except* (DeadLetterError, *BROKER_FAILURES) as failures:
                # The first failure stopped the others: it is the one to tell.
                raise failures.exceptions[0] from None
            return walk.tally

    async def purge(
        self, selection: Selection = EVERYTHING, progress: Progress | None = None
    ) -> Tally:
        """Delete the selected dead letters (every one with an empty selection)."""
        async with self._walking(progress) as walk:
            while (item := await walk.next()) is not None:
                letter, message = item
                if selection.matches(letter):
                    walk.take()
                    await message.ack()
            return walk.tally

    async def _replay_one(
        self, letter: DeadLetter, message: AbstractIncomingMessage, window: asyncio.Semaphore
    ) -> None:
        try:
            try:
                exchange = await self._exchange(letter.exchange)
                await exchange.publish(
                    replayable(message, self.user),
                    routing_key=letter.routing_key,
                    mandatory=True,
                    timeout=PUBLISH_TIMEOUT,
                )
            except BROKER_FAILURES as exc:
                raise DeadLetterError(
                    f"dead letter #{letter.index} could not be replayed to exchange "
                    f"{letter.exchange!r} with routing key {letter.routing_key!r} "
                    f"({_failure(exc)}); it stays in {self.names.dead}"
                ) from exc
            await message.ack()
        finally:
            window.release()

    async def _exchange(self, name: str) -> AbstractExchange:
        if name == "":
            return self._publishing.default_exchange
        if name not in self._exchanges:
            # Not checked here: a missing exchange fails the publish, which says so.
            self._exchanges[name] = await self._publishing.get_exchange(name, ensure=False)
        return self._exchanges[name]


def replayable(message: AbstractIncomingMessage, user: str) -> aio_pika.Message:
    """The dead letter as its publisher sent it: the same body and properties, without the
    dead-lettering headers, persistent.

    RabbitMQ accepts no ``user_id`` but the publishing connection's own, so a message that
    carried one is replayed with ``user`` (the operator's, who now vouches for it: replay as
    a trusted user or as the plugin's); one that carried none is replayed without. The
    ``expiration`` is not replayed: it was measured from the original publish."""
    headers = without_bookkeeping(dict(message.headers or {}))
    had_user = bool((message.headers or {}).get("x-original-user-id") or message.user_id)
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
        priority=message.priority,
        user_id=user if had_user else None,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
