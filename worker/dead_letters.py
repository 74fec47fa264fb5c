"""The dead-letter queue ``<prefix>.dead``, for operators: list, replay, purge.

Two kinds of message end up there. The worker's own rejects carry ``x-reject-code``,
``x-reject-reason``, ``x-original-routing-key``, ``x-original-exchange`` (and
``x-original-user-id``) over the original body and properties (``worker.publish``).
Commands that RabbitMQ itself dead-lettered (the commands queue's delivery limit, an
expired ``expiration``, a ``basic.reject``) carry RabbitMQ's ``x-death`` header instead;
its reason (``delivery_limit``, ``expired``, ``rejected``, ...) stands in for the code.
Such a letter also keeps every header its publisher sent, forged ``x-reject-*`` and
``x-original-*`` ones included, so it is described from ``x-death`` and the properties
RabbitMQ validated only. A replay goes out as the operator's user: it never republishes a
letter whose original publisher could not act for its plugin unless told to (``Authority``).

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
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
import msgspec
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)

from schemas.codec import MSGPACK, codec_for
from schemas.errors import Forbidden, StateError
from worker import diagnosis
from worker.auth import Authorizer, Caller, Route, routed_plugin
from worker.broker import BROKER_FAILURES
from worker.client import failover, nacks
from worker.client.errors import PublishRefused
from worker.config import Settings, redact_url
from worker.plugins import PluginDirectory
from worker.publish import PUBLISH_TIMEOUT, without_bookkeeping
from worker.store import DATABASE_FAILURES, Store, create_pool
from worker.topology import Names

PREVIEW_CHARS: Final = 80
"""A body preview is cut to this many characters: never the full payload."""
REPLAY_WINDOW: Final = 64
"""Republished messages awaiting their publisher confirm at once."""
GET_TIMEOUT: Final = 10.0

FORBIDDEN: Final = "forbidden"
"""Dead letters of this code are replayed only when asked for by code (``--code
forbidden``): a replay goes out as the operator's user, who may act for plugins the
original publisher could not. So are letters whose original publisher may not act for the
plugin their replay would act for (``Authority``)."""
_ROUTES: Final[dict[str, Route]] = {"cmd": "cmd", "rpc": "rpc"}

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
    deaths = _deaths(headers)
    code = _text(headers.get("x-reject-code"))
    if deaths:
        # RabbitMQ dead-lettered it, keeping its publisher's headers: any x-reject-* or
        # x-original-* header is the publisher's, and so may be an x-death entry (RabbitMQ
        # 3.x increments the count of a matching entry a publisher sent, keeping its
        # exchange and routing keys). What RabbitMQ vouches for: the entry it puts first
        # (queue, reason), the routing key the message was published with (the delivery's
        # own, as the commands queue sets no dead-letter routing key) and the user_id it
        # validated.
        by = "rabbitmq"
        latest = deaths[0]
        code = _text(latest.get("reason")) or "unknown"
        reason = f"dead-lettered by RabbitMQ from queue {_text(latest.get('queue'))!r} ({code})"
        # Only the commands queue dead-letters here, and only the prefix's exchange feeds it.
        exchange = None
        routing_key = message.routing_key
        user = message.user_id
    elif code is not None:
        # The worker's own: it drops a publisher's bookkeeping headers before writing its
        # own, and only the worker (and operators) may publish to the dead exchange.
        by = "worker"
        reason = _text(headers.get("x-reject-reason")) or ""
        exchange = _text(headers.get("x-original-exchange"))
        routing_key = _text(headers.get("x-original-routing-key"))
        user = _text(headers.get("x-original-user-id"))
    else:
        by, code = "unknown", "unknown"
        reason = "no x-reject-code or x-death header: not dead-lettered by the worker or RabbitMQ"
        exchange, routing_key, user = None, None, message.user_id
    return DeadLetter(
        index=index,
        code=code,
        reason=reason,
        dead_lettered_by=by,
        exchange=default_exchange if exchange is None else exchange,
        routing_key=routing_key if routing_key is not None else message.routing_key or "",
        user_id=user,
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
    """Selected letters a replay left in place, not asked for by ``--code forbidden``:
    ``forbidden`` ones, and those whose publisher may not act for their plugin."""
    refused: list[str] = field(default_factory=list)
    """Why each withheld letter was, one line each (``#index routing key: reason``)."""


def _reached(tally: Tally, limit: int | None) -> bool:
    return limit is not None and tally.taken >= limit


# --------------------------------------------------------------------------- authority


class Authority:
    """Whether a dead letter's original publisher may act for the plugin its replay would.

    A replay goes out as the operator's user, typically one trusted for every plugin; were
    it not checked, a plugin's user could have a write for another plugin dead-lettered (an
    AMQP ``expiration`` is enough) and an ordinary replay would apply it. So before a letter
    is republished, its original, broker-validated user is held to the worker's own rules
    (``worker.auth``, protocol §6) for the body's ``plugin_id`` (the routing key's, when the
    body cannot be read: the worker then refuses it anyway) against the plugins table.
    Postgres is asked only when a letter needs it; a plugin that does not exist (yet) is
    not a refusal for a trusted publisher: the worker answers ``unknown_plugin`` again."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._authorizer = Authorizer.from_settings(settings)
        self._directory: PluginDirectory | None = None

    async def close(self) -> None:
        if self._directory is not None:
            await self._directory.store.close()

    async def refusal(self, letter: DeadLetter, message: AbstractIncomingMessage) -> str | None:
        """None when ``letter`` may be replayed; otherwise why not."""
        route = _ROUTES.get(letter.routing_key.partition(".")[0])
        if route is None:
            return None  # not a command or a read: nothing the worker would act on
        plugin = _body_plugin(message, route) or routed_plugin(letter.routing_key, route)
        if plugin is None:
            return None  # names no plugin: the worker refuses it whoever sends it
        try:
            owners = await (await self._plugins()).owners([plugin])
        except DATABASE_FAILURES as exc:
            raise DeadLetterError(
                f"cannot check who may replay dead letter #{letter.index} (Postgres: "
                f"{_failure(exc)}); it stays in the dead queue"
            ) from exc
        error = self._authorizer.check(
            Caller(letter.user_id, letter.routing_key), plugin, owners, route
        )
        return error.message if isinstance(error, Forbidden) else None

    async def _plugins(self) -> PluginDirectory:
        if self._directory is None:
            settings = self._settings
            pool = await create_pool(
                settings.database_url,
                1,
                settings.db_command_timeout_seconds,
                application_name="plugin-state-worker dead replay",
            )
            self._directory = PluginDirectory(Store(pool), settings.plugin_cache_seconds)
        return self._directory


def _body_plugin(message: AbstractIncomingMessage, route: Route) -> uuid.UUID | None:
    """The ``plugin_id`` of the body, decoded as the worker decodes it; None when it cannot
    be."""
    try:
        codec = codec_for(message.content_type)
        if route == "cmd":
            return codec.decode_write(message.body).plugin_id
        return codec.decode_read(message.body).plugin_id
    except StateError:
        return None


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
        connection: AbstractConnection,
        reading: AbstractChannel,
        publishing: AbstractChannel,
        queue: AbstractQueue,
        authority: Authority,
    ) -> None:
        self.names = names
        self.user = user  # the RabbitMQ user this connection logged in as
        self._connection = connection
        self._reading = reading
        self._publishing = publishing
        self._renewing = asyncio.Lock()
        self._queue = queue
        self._authority = authority
        self._exchanges: dict[str, AbstractExchange] = {}

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[DeadLetters]:
        """Connect (to any node of the broker's); closing returns to the queue whatever is
        still unacked. Not a robust connection: were it to reconnect, the messages a walk
        holds would be back in the queue while the walk went on."""
        names = Names(settings.prefix)
        name = f"plugin-state-worker dead {socket.gethostname()}:{os.getpid()}"
        try:
            connection = await failover.any_node(
                settings.amqp_urls,
                lambda urls, i: aio_pika.connect(
                    urls[i], client_properties={"connection_name": name}
                ),
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
            authority = Authority(settings)
            try:
                yield cls(names, user, connection, reading, publishing, queue, authority)
            finally:
                await authority.close()

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
        acked only once the broker confirmed its republish. ``forbidden`` letters, and those
        whose original publisher may not act for their plugin (``Authority``), stay unless
        the selection names the code ``forbidden``."""
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
                        if FORBIDDEN not in selection.codes:
                            refusal = await self._refusal(letter, message)
                            if refusal is not None:
                                walk.tally.withheld += 1
                                walk.tally.refused.append(
                                    f"#{letter.index} {letter.routing_key}: {refusal}"
                                )
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

    async def _refusal(self, letter: DeadLetter, message: AbstractIncomingMessage) -> str | None:
        if letter.code == FORBIDDEN:
            return "refused as forbidden when it was published"
        return await self._authority.refusal(letter, message)

    async def _replay_one(
        self, letter: DeadLetter, message: AbstractIncomingMessage, window: asyncio.Semaphore
    ) -> None:
        where = f"exchange {letter.exchange!r}, routing key {letter.routing_key!r}"
        run = nacks.NackRun(where)
        try:
            while True:
                publishing = self._publishing
                try:
                    exchange = await self._exchange(letter.exchange)
                    await exchange.publish(
                        replayable(message, letter, self.user),
                        routing_key=letter.routing_key,
                        mandatory=True,
                        timeout=PUBLISH_TIMEOUT,
                    )
                except aiormq.exceptions.DeliveryError as exc:
                    if isinstance(exc, aiormq.exceptions.PublishError):  # returned: unroutable
                        raise self._not_replayed(letter, where, exc) from exc
                    # Nacked: the queue may be electing a leader (``worker.client.nacks``).
                    try:
                        pause = run.nacked()
                    except PublishRefused as refused:
                        raise self._not_replayed(letter, where, refused) from exc
                    await self._renew_publishing(publishing)
                    await asyncio.sleep(pause)
                    continue
                except BROKER_FAILURES as exc:
                    raise self._not_replayed(letter, where, exc) from exc
                break
            await message.ack()
        finally:
            window.release()

    def _not_replayed(self, letter: DeadLetter, where: str, exc: BaseException) -> DeadLetterError:
        return DeadLetterError(
            f"dead letter #{letter.index} could not be replayed to {where} "
            f"({_failure(exc)}); it stays in {self.names.dead}"
        )

    async def _renew_publishing(self, nacked: AbstractChannel) -> None:
        """A fresh publishing channel, once for the replays that the old one nacked
        together (left open: replays still wait for its confirms)."""
        async with self._renewing:
            if self._publishing is nacked:
                self._publishing = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                self._exchanges.clear()

    async def _exchange(self, name: str) -> AbstractExchange:
        if name == "":
            return self._publishing.default_exchange
        if name not in self._exchanges:
            # Not checked here: a missing exchange fails the publish, which says so.
            self._exchanges[name] = await self._publishing.get_exchange(name, ensure=False)
        return self._exchanges[name]


def replayable(message: AbstractIncomingMessage, letter: DeadLetter, user: str) -> aio_pika.Message:
    """The dead letter as its publisher sent it: the same body and properties, without the
    dead-lettering headers, persistent.

    RabbitMQ accepts no ``user_id`` but the publishing connection's own, so a message that
    carried one (``letter.user_id``, never a publisher's header) is replayed with ``user``
    (the operator's, who now vouches for it, once ``Authority`` found that the original
    publisher could act for its plugin); one that carried none is replayed without. The
    ``expiration`` is not replayed: it was measured from the original publish."""
    headers = without_bookkeeping(dict(message.headers or {}))
    had_user = letter.user_id is not None
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
