"""The read path: ``get``, ``get_many`` and ``list`` over AMQP RPC, with read-your-writes.

Requests are served in bursts: whatever has arrived is decoded together and every ``get``
and ``get_many`` entry of the burst is looked up in one query (on the unique index).
Replies go to the request's ``reply_to`` with its ``correlation_id``, in its encoding.

A request naming a write (``after``) that has not reached its entry yet waits, without
polling Postgres hard: waiters are re-checked together, in one query, when a commit is
signalled (this worker's consumer, or ``LISTEN`` for other workers) or every
``_POLL_SECONDS``, until the request's expiration or 5 s, then get ``write_pending``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import structlog
from aio_pika.abc import AbstractRobustChannel

from schemas.codec import JSON, Codec, codec_for
from schemas.errors import (
    Internal,
    InvalidMessage,
    InvalidRequest,
    StateError,
    WritePending,
)
from schemas.messages import (
    ErrorReply,
    GetManyRequest,
    GetRequest,
    ListRequest,
    PageItem,
    PageReply,
    ReadRequest,
    Reply,
    ValueReply,
    ValuesReply,
)
from worker.auth import Caller
from worker.broker import BROKER_FAILURES, Delivery, Subscription, ack_all
from worker.commits import CommitSignal
from worker.config import Settings
from worker.metrics import Metrics
from worker.model import EntryKey
from worker.plugins import PluginDirectory
from worker.publish import Publisher
from worker.store import DATABASE_FAILURES, ListPosition, Lookup, Store, StoredValue
from worker.topology import Names
from worker.validate import check_scope

log = structlog.get_logger(__name__)

MAX_WAIT_SECONDS: Final = 5.0
_POLL_SECONDS: Final = 0.25
_BURST: Final = 256
_STOP: Final = object()


@dataclass(eq=False)
class _Call:
    """One request being served: where to answer, what it asked, until when it may wait."""

    message: Delivery
    codec: Codec
    request: ReadRequest
    caller: Caller
    received: float
    deadline: float
    wanted: list[tuple[EntryKey, uuid.UUID | None]] = field(default_factory=list)

    @property
    def op(self) -> str:
        return str(self.request.__struct_config__.tag)


def encode_cursor(position: ListPosition) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(position)).decode().rstrip("=")


def decode_cursor(cursor: str) -> ListPosition:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        kind, scope_id, namespace, key = msgspec.json.decode(raw, type=tuple[str, str, str, str])
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise InvalidRequest("cursor is not one this server issued") from None
    return kind, scope_id, namespace, key


def _value_reply(value: StoredValue | None, codec: Codec) -> ValueReply:
    if value is None:
        return ValueReply(found=False)
    return ValueReply(
        found=True,
        value=_embed(value.value_json, codec),
        version=value.version,
        updated_at=value.updated_at.isoformat(),
    )


def _embed(value_json: str, codec: Codec) -> Any:
    # JSON replies carry the stored JSON text as is; MessagePack needs the value itself.
    if codec.content_type == JSON:
        return msgspec.Raw(value_json.encode())
    return msgspec.json.decode(value_json)


def _wanted(request: GetRequest | GetManyRequest) -> list[tuple[EntryKey, uuid.UUID | None]]:
    if isinstance(request, GetRequest):
        check_scope(request.scope_kind, request.scope_id)
        key = EntryKey(
            request.plugin_id,
            request.scope_kind,
            request.scope_id,
            request.namespace,
            request.key,
        )
        return [(key, request.after)]
    wanted = []
    for index, ref in enumerate(request.entries):
        try:
            check_scope(ref.scope_kind, ref.scope_id)
        except InvalidRequest as exc:
            raise InvalidRequest(f"entries[{index}]: {exc.message}") from None
        key = EntryKey(request.plugin_id, ref.scope_kind, ref.scope_id, ref.namespace, ref.key)
        wanted.append((key, ref.after))
    return wanted


class RpcServer:
    """Consumes the rpc queue and answers every request exactly once (or drops it expired)."""

    def __init__(
        self,
        settings: Settings,
        channel: AbstractRobustChannel,
        store: Store,
        publisher: Publisher,
        metrics: Metrics,
        commits: CommitSignal,
        plugins: PluginDirectory,
    ) -> None:
        self.settings = settings
        self.authorizer = settings.authorizer
        self.subscription = Subscription(
            channel, Names(settings.prefix).rpc_queue, self._on_delivery
        )
        self.store = store
        self.plugins = plugins
        self.publisher = publisher
        self.metrics = metrics
        self.commits = commits
        self._inbox: asyncio.Queue[object] = asyncio.Queue()
        self._waiting: list[_Call] = []
        # Calls sent to wait (or being re-checked) and not answered yet: while there are
        # any, acks go one by one, since a `multiple` ack would cover them too.
        self._held: set[_Call] = set()
        self._to_ack: list[Delivery] = []
        self._draining = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.subscription.start()

    async def run(self) -> None:
        """Serve until ``drain``; waiting requests then go back to the queue for another
        worker instead of being answered early."""
        async with asyncio.TaskGroup() as group:
            keeping = group.create_task(self.subscription.keep(), name="rpc-subscription")
            waiting = group.create_task(self._wait_loop(), name="rpc-waiters")
            await self._serve_loop()
            waiting.cancel()
            keeping.cancel()
        for call in self._waiting:
            try:
                await call.message.channel.basic_nack(call.message.delivery_tag, requeue=True)
            except BROKER_FAILURES as exc:
                log.info("rpc_requeue_lost_with_channel", error=repr(exc))
        self._waiting.clear()
        self._held.clear()
        self.metrics.rpc_waiting.set(0)

    async def drain(self) -> None:
        if self._draining.is_set():
            return
        self._draining.set()
        await self.subscription.stop()
        self._inbox.put_nowait(_STOP)

    @property
    def consuming(self) -> bool:
        return self.subscription.consuming

    def _on_delivery(self, delivery: Delivery) -> None:
        self._inbox.put_nowait(delivery)

    # ------------------------------------------------------------------ serving

    async def _serve_loop(self) -> None:
        while True:
            item = await self._inbox.get()
            if item is _STOP:
                return
            burst = [item]
            stopping = False
            while len(burst) < _BURST and not self._inbox.empty():
                nxt = self._inbox.get_nowait()
                if nxt is _STOP:
                    stopping = True
                    break
                burst.append(nxt)
            await self._serve_burst(burst)  # type: ignore[arg-type]
            if stopping:
                return

    async def _serve_burst(self, burst: list[Delivery]) -> None:
        calls: list[_Call] = []
        for message in burst:
            call = await self._admit(message)
            if call is not None:
                calls.append(call)
        if calls:
            await self._serve_calls(calls)
        await self._flush_acks()

    async def _serve_calls(self, calls: list[_Call]) -> None:
        try:
            owners = await self.plugins.owners(c.request.plugin_id for c in calls)
        except DATABASE_FAILURES as exc:
            await self._fail_all(calls, exc)
            return
        lookups: list[_Call] = []
        lists: list[_Call] = []
        for call in calls:
            refused = self.authorizer.check(call.caller, call.request.plugin_id, owners, "rpc")
            if refused is not None:
                await self._answer_error(call, refused)
            elif isinstance(call.request, ListRequest):
                lists.append(call)
            else:
                lookups.append(call)
        await asyncio.gather(self._serve_lookups(lookups), *(self._serve_list(c) for c in lists))

    async def _admit(self, message: Delivery) -> _Call | None:
        """Decode and validate; answer (or drop) what cannot be served. None if handled."""
        received = message.received
        expiration = message.expiration
        if expiration is not None and time.monotonic() > received + expiration:
            self.metrics.rpc_expired.inc()
            self._to_ack.append(message)
            return None
        if not message.reply_to:
            error = InvalidRequest("a read request needs reply_to (and correlation_id)")
            self.metrics.count_reject(error.code)
            try:
                await self.publisher.dead_letter(message.as_incoming(), error)
            except BROKER_FAILURES as exc:
                log.warning("rpc_dead_letter_failed", error=repr(exc))
                return None
            self._to_ack.append(message)
            return None
        try:
            codec = codec_for(message.content_type)
        except InvalidMessage as exc:
            await self._reply(
                message, codec_for(JSON), ErrorReply(code=exc.code, message=exc.message)
            )
            return None
        wait = MAX_WAIT_SECONDS if expiration is None else min(expiration, MAX_WAIT_SECONDS)
        try:
            request = codec.decode_read(message.body)
            caller = Caller(message.user_id, message.routing_key)
            call = _Call(message, codec, request, caller, received, received + wait)
            if isinstance(request, ListRequest):
                if request.scope_kind == "instance" and request.scope_id is not None:
                    raise InvalidRequest("scope_id must be null for scope_kind 'instance'")
                if request.cursor is not None:
                    decode_cursor(request.cursor)
            else:
                call.wanted = _wanted(request)
        except StateError as exc:
            await self._reply(message, codec, ErrorReply(code=exc.code, message=exc.message))
            return None
        return call

    async def _serve_lookups(self, calls: list[_Call]) -> None:
        if not calls:
            return
        try:
            await self._resolve(calls)
        except DATABASE_FAILURES as exc:
            await self._fail_all(calls, exc)

    async def _resolve(self, calls: list[_Call]) -> None:
        """Look every entry of ``calls`` up in one query; answer the calls whose ``after``
        writes have arrived, give up on those past their deadline, keep the rest waiting."""
        lookups = await self.store.lookup_entries([w for c in calls for w in c.wanted])
        now = time.monotonic()
        offset = 0
        for call in calls:
            mine = lookups[offset : offset + len(call.wanted)]
            offset += len(call.wanted)
            if all(lookup.ready for lookup in mine):
                await self._answer_lookup(call, mine)
            elif call.deadline <= now:
                await self._answer_pending(call)
            else:
                self._waiting.append(call)
                self._held.add(call)
        self.metrics.rpc_waiting.set(len(self._waiting))

    async def _answer_lookup(self, call: _Call, lookups: list[Lookup]) -> None:
        reply: Reply
        if isinstance(call.request, GetRequest):
            reply = _value_reply(lookups[0].value, call.codec)
        else:
            reply = ValuesReply(items=[_value_reply(lk.value, call.codec) for lk in lookups])
        await self._answer(call, reply)

    async def _serve_list(self, call: _Call) -> None:
        request = call.request
        assert isinstance(request, ListRequest)
        after = None if request.cursor is None else decode_cursor(request.cursor)
        try:
            rows = await self.store.list_entries(
                request.plugin_id,
                scope_kind=request.scope_kind,
                scope_id=request.scope_id,
                namespace=request.namespace,
                prefix=request.prefix,
                limit=request.limit + 1,
                after=after,
            )
        except DATABASE_FAILURES as exc:
            await self._fail_all([call], exc)
            return
        page = rows[: request.limit]
        next_cursor = None
        if len(rows) > request.limit:
            last = page[-1].entry
            next_cursor = encode_cursor(
                (last.scope_kind, last.scope_id or "", last.namespace, last.key)
            )
        items = [
            PageItem(
                scope_kind=row.entry.scope_kind,  # type: ignore[arg-type]
                scope_id=row.entry.scope_id,
                namespace=row.entry.namespace,
                key=row.entry.key,
                value=_embed(row.value.value_json, call.codec),
                version=row.value.version,
                updated_at=row.value.updated_at.isoformat(),
            )
            for row in page
        ]
        await self._answer(call, PageReply(items=items, next_cursor=next_cursor))

    # ------------------------------------------------------------------ waiting

    async def _wait_loop(self) -> None:
        while True:
            timeout = _POLL_SECONDS
            if self._waiting:
                nearest = min(c.deadline for c in self._waiting) - time.monotonic()
                timeout = max(0.0, min(timeout, nearest))
            await self.commits.wait(timeout)
            if self._waiting:
                await self._recheck()

    async def _recheck(self) -> None:
        calls, self._waiting = self._waiting, []
        try:
            await self._resolve(calls)
        except DATABASE_FAILURES as exc:
            # Not the request's fault: keep waiting (the deadline still holds).
            log.warning("rpc_recheck_failed", error=repr(exc))
            now = time.monotonic()
            for call in calls:
                if call.deadline <= now:
                    await self._answer_pending(call)
                else:
                    self._waiting.append(call)
        await self._flush_acks()

    async def _answer_pending(self, call: _Call) -> None:
        await self._answer_error(
            call,
            WritePending(
                f"the write named by `after` was not applied within "
                f"{call.deadline - call.received:.1f} s"
            ),
        )

    # ------------------------------------------------------------------ replying

    async def _fail_all(self, calls: list[_Call], exc: BaseException) -> None:
        log.warning("rpc_database_failed", error=repr(exc), requests=len(calls))
        for call in calls:
            await self._answer_error(call, Internal("the database is unavailable; retry"))

    async def _answer_error(self, call: _Call, error: StateError) -> None:
        await self._answer(call, ErrorReply(code=error.code, message=error.message))

    async def _answer(self, call: _Call, reply: Reply) -> None:
        self.metrics.rpc_seconds.labels(op=call.op).observe(time.monotonic() - call.received)
        await self._reply(call.message, call.codec, reply)
        self._held.discard(call)

    async def _reply(self, message: Delivery, codec: Codec, reply: Reply) -> None:
        assert message.reply_to is not None
        try:
            try:
                await self.publisher.reply(message.reply_to, message.correlation_id, reply, codec)
            except (msgspec.EncodeError, OverflowError) as exc:
                # jsonb holds numbers MessagePack cannot (integers past 64 bits).
                refused = ErrorReply(
                    code="unsupported_value",
                    message=f"the value cannot be sent as {codec.name} ({exc}); read it as JSON",
                )
                await self.publisher.reply(message.reply_to, message.correlation_id, refused, codec)
        except BROKER_FAILURES as exc:
            # The request stays unacked and comes back to some worker with the connection.
            log.info("rpc_reply_failed", error=repr(exc))
            return
        self._to_ack.append(message)

    async def _flush_acks(self) -> None:
        """Ack what was answered: with one `multiple` ack per channel when no request is
        held waiting (the usual case), else one by one so as not to cover those."""
        settled, self._to_ack = self._to_ack, []
        if not self._held:
            await ack_all(settled)
            return
        for message in settled:
            try:
                await message.channel.basic_ack(message.delivery_tag)
            except BROKER_FAILURES as exc:
                log.info("rpc_ack_lost_with_channel", error=repr(exc))
