"""The read path: ``get``, ``get_many`` and ``list`` over AMQP RPC, with read-your-writes.

Requests are served in bursts: whatever has arrived goes through ``worker.intake`` (an
outcome per request, never an exception) and every ``get`` and ``get_many`` entry of the
burst is looked up in one query (each entry once, values loaded within a byte budget; see
``worker.reads``). Replies go to the request's ``reply_to`` with its ``correlation_id``, in
its encoding; a request that cannot be answered (no usable ``reply_to``, or ``forbidden``
towards a named reply queue) is dead-lettered.

A request naming a write (``after``) that has not reached its entry yet waits, without
polling Postgres hard: waiters are re-checked together, in one query, when their plugin's
state changes (``worker.wakeups``) or on a slow poll, until their deadline (5 s, the
request's expiration, or the caller's own), then get ``write_pending``. At most
``max_waiting_reads`` reads of one plugin wait at once; more are answered at once.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec
import structlog
from aio_pika.abc import AbstractRobustChannel

from schemas.codec import Codec
from schemas.errors import (
    Compacted,
    Internal,
    InvalidRequest,
    ReplyTooLarge,
    StateError,
    UnknownPlugin,
    UnsupportedValue,
    WritePending,
)
from schemas.messages import (
    ChangesReply,
    ChangesRequest,
    ErrorReply,
    GetRequest,
    ListRequest,
    PageReply,
    Reply,
    ValuesReply,
)
from worker import changes, reads, topology
from worker.acks import AckLedger
from worker.broker import BROKER_FAILURES, Delivery, Subscription, nack_all
from worker.config import Settings
from worker.cursor import decode_cursor, encode_cursor
from worker.intake import ReadCall, ReadIntake, classified
from worker.metrics import Metrics
from worker.model import EntryKey
from worker.plugins import PluginDirectory
from worker.priority import ReadsFirst
from worker.publish import Publisher
from worker.store import DATABASE_FAILURES, Found, LogPage, Store
from worker.topology import rpc_queue_name
from worker.wakeups import Wakeups

log = structlog.get_logger(__name__)

_POLL_SECONDS: Final = 0.5
_BURST: Final = 256
_SLICE: Final = 64
_STOP: Final = object()
_END: Final = 2**62
"""Past every position: reading from it finds nothing but the head (``since: null``)."""
# What encoding a stored value may fail with: jsonb holds numbers MessagePack cannot
# (integers past 64 bits), and values written before the nesting limit may nest deeper
# than an encoder recurses.
_UNENCODABLE: Final = (msgspec.EncodeError, OverflowError, RecursionError, ValueError)


class RpcServer:
    """Consumes the rpc queue and answers every request exactly once (or drops it expired)."""

    def __init__(
        self,
        settings: Settings,
        channel: AbstractRobustChannel,
        intake: ReadIntake,
        store: Store,
        plugins: PluginDirectory,
        publisher: Publisher,
        metrics: Metrics,
        wakeups: Wakeups,
        clock: Callable[[], float] = time.time,
        priority: ReadsFirst | None = None,
    ) -> None:
        self.settings = settings
        self.intake = intake
        self.subscription = Subscription(
            channel,
            rpc_queue_name(settings),
            self._on_delivery,
            declare=lambda channel: topology.declare_again(
                channel, settings, rpc_queue_name(settings)
            ),
            prefetch=settings.rpc_prefetch,
            max_held_bytes=settings.held_max_bytes,
            retry_initial=settings.retry_initial_seconds,
            retry_max=settings.retry_max_seconds,
        )
        self.store = store
        self.plugins = plugins
        self.publisher = publisher
        self.metrics = metrics
        self.wakeups = wakeups.listener()
        self.clock = clock
        self.priority = priority or ReadsFirst()
        self.max_reply = settings.max_reply_bytes
        self._inbox: asyncio.Queue[object] = asyncio.Queue()
        self._waiting: dict[uuid.UUID, list[ReadCall]] = {}
        # Shared by the loop serving new requests and the loop re-checking waiting ones:
        # a `multiple` ack must cover neither's requests still being answered.
        self.acks = AckLedger()
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
        await nack_all(call.message for calls in self._waiting.values() for call in calls)
        self._waiting.clear()
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
        self.acks.received(delivery)
        self.priority.arrived()
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
            try:
                await self._serve_burst(burst)  # type: ignore[arg-type]
            finally:
                self.priority.served(len(burst))
            if stopping:
                return

    async def _serve_burst(self, burst: list[Delivery]) -> None:
        now_ms = int(self.clock() * 1000)
        calls: list[ReadCall] = []
        for position, message in enumerate(burst):
            expiration = message.expiration
            if expiration is not None and time.monotonic() > message.received + expiration:
                self.metrics.rpc_expired.inc()
                self.acks.answered(message)
            else:
                calls.append(self.intake.receive(message, now_ms))
            if position % _SLICE == _SLICE - 1:
                await asyncio.sleep(0)
        if calls:
            await self._serve_calls(calls)
        await self._flush_acks()

    async def _serve_calls(self, calls: list[ReadCall]) -> None:
        wanted = {p for c in calls for p in (c.routed, c.plugin_id) if p is not None}
        try:
            owners = await self.plugins.owners(wanted) if wanted else {}
        except DATABASE_FAILURES as exc:
            log.warning("rpc_database_failed", error=repr(exc), requests=len(calls))
            for call in calls:
                await self._refuse(call, Internal("the database is unavailable; retry"))
            return
        lookups: list[ReadCall] = []
        following: list[ReadCall] = []
        others: list[Awaitable[None]] = []
        for call in calls:
            refused = classified(
                lambda call=call: self.intake.authorize(  # type: ignore[misc]
                    call, call.plugin_id, owners
                ),
                "authorize",
                call.message,
            )
            if refused is not None:
                await self._refuse(call, refused)
            elif isinstance(call.request, ListRequest):
                others.append(self._guarded([call], self._serve_lists))
            elif isinstance(call.request, ChangesRequest):
                following.append(call)
            else:
                lookups.append(call)
        await asyncio.gather(
            self._guarded(lookups, self._serve_lookups),
            self._guarded(following, self._serve_changes),
            *others,
        )

    async def _guarded(
        self, calls: list[ReadCall], serve: Callable[[list[ReadCall]], Awaitable[None]]
    ) -> None:
        """Serve ``calls``; a failure no rule foresaw (a bug) is the outcome of the request
        that caused it, found by serving the unsettled ones one by one, and answered
        ``internal``: nothing a request causes stops the read path. Database failures are
        handled where they happen (by the serving step itself)."""
        if not calls:
            return
        try:
            await serve(calls)
        except Exception as exc:
            log.exception("read_handling_failed", requests=len(calls))
            waiting = {id(c) for waiters in self._waiting.values() for c in waiters}
            unsettled = [c for c in calls if not c.settled and id(c) not in waiting]
            if len(calls) > 1:
                for call in unsettled:
                    await self._guarded([call], serve)
                return
            for call in unsettled:
                failure = f"the worker could not answer this request ({type(exc).__name__})"
                await self._refuse(call, Internal(failure))

    async def _serve_lists(self, calls: list[ReadCall]) -> None:
        for call in calls:
            await self._serve_list(call)

    async def _serve_lookups(self, calls: list[ReadCall]) -> None:
        while calls:
            try:
                calls = await self._resolve(calls)
            except DATABASE_FAILURES as exc:
                log.warning("rpc_database_failed", error=repr(exc), requests=len(calls))
                for call in calls:
                    await self._refuse(call, Internal("the database is unavailable; retry"))
                return

    async def _resolve(self, calls: list[ReadCall]) -> list[ReadCall]:
        """Look every entry of ``calls`` up in one query; answer the calls whose ``after``
        writes have arrived, give up on those past their deadline, keep the rest waiting.
        Returns the calls whose values the burst's budget held back, to look up again."""
        distinct: dict[EntryKey, int] = {}
        wants: list[bool] = []
        for call in calls:
            for key, after in call.wanted:
                index = distinct.setdefault(key, len(distinct))
                if index == len(wants):
                    wants.append(False)
                wants[index] = wants[index] or after is not None
        found = await self.store.lookup_entries(list(distinct), wants, self.max_reply)
        now = time.monotonic()
        again: list[ReadCall] = []
        for call in calls:
            mine = [found[distinct[key]] for key, _ in call.wanted]
            if not all(
                reads.ready(f, after) for f, (_, after) in zip(mine, call.wanted, strict=True)
            ):
                await self._wait_or_give_up(call, now)
                continue
            try:
                reads.check_lookup_size([key for key, _ in call.wanted], mine, self.max_reply)
            except ReplyTooLarge as exc:
                await self._answer_error(call, exc)
                continue
            if reads.withheld(mine):
                again.append(call)
                continue
            await self._answer(call, _lookup_reply(call, mine))
        self.metrics.rpc_waiting.set(sum(len(w) for w in self._waiting.values()))
        return again

    async def _wait_or_give_up(self, call: ReadCall, now: float) -> None:
        """Keep ``call`` waiting for its plugin's next change, unless its deadline passed or
        its plugin has as many waiting as it may (then it is answered now)."""
        plugin = call.plugin_id
        assert plugin is not None
        waiting = self._waiting.setdefault(plugin, [])
        following = isinstance(call.request, ChangesRequest)
        cap = self.settings.max_followers if following else self.settings.max_waiting_reads
        alike = sum(isinstance(c.request, ChangesRequest) == following for c in waiting)
        if call.deadline <= now:
            await self._give_up(call)
        elif alike >= cap:
            kind = "changes reads" if following else "reads waiting for their writes"
            await self._give_up(call, f"{alike} {kind} of this plugin already wait (at most {cap})")
        else:
            waiting.append(call)
            if not call.parked:
                call.parked = True
                self.subscription.park()

    async def _give_up(self, call: ReadCall, why: str | None = None) -> None:
        if isinstance(call.request, ChangesRequest):
            # Nothing changed in time: the empty page a long poll ends with.
            resume = changes.encode_position(call.resume or 0)
            await self._answer(call, lambda: ChangesReply(next=resume, items=[]))
            return
        reason = why or (
            f"the write named by `after` was not applied within "
            f"{max(call.deadline - call.received_at, 0):.1f} s"
        )
        await self._answer_error(call, WritePending(reason))

    async def _serve_list(self, call: ReadCall) -> None:
        request = call.request
        assert isinstance(request, ListRequest)
        after = None if request.cursor is None else decode_cursor(request.cursor)
        budget = self.max_reply - reads.FRAMING
        try:
            rows, resume = await self.store.list_entries(
                request.plugin_id,
                reads.list_bounds(request),
                limit=request.limit,
                after=after,
                scan=reads.LIST_SCAN,
                budget=budget,
                framing=reads.FRAMING,
            )
        except DATABASE_FAILURES as exc:
            log.warning("rpc_database_failed", error=repr(exc), requests=1)
            await self._refuse(call, Internal("the database is unavailable; retry"))
            return
        await self._answer(call, lambda: reads.page_reply(rows, resume, call.codec))

    async def _serve_changes(self, calls: list[ReadCall]) -> None:
        """Answer pages of the change log, or let them wait (``wait_ms``) while empty. Reads
        of the same page (the same plugin, position, filters and limit: the near caches
        and watchers of a plugin, woken by one commit) are one query."""
        groups: dict[tuple[object, ...], list[ReadCall]] = {}
        for call in calls:
            request = call.request
            assert isinstance(request, ChangesRequest)
            since = call.resume
            if since is None and request.since is not None:
                since = changes.decode_position(request.since)
            key = (
                request.plugin_id,
                since,
                request.limit,
                request.scope_kind,
                request.scope_id,
                request.namespace,
                request.prefix,
            )
            groups.setdefault(key, []).append(call)
        await asyncio.gather(*(self._serve_page(group) for group in groups.values()))

    async def _serve_page(self, calls: list[ReadCall]) -> None:
        """Serve reads of one page of the log (``_serve_changes``)."""
        first = calls[0]
        request = first.request
        assert isinstance(request, ChangesRequest)
        if not self.settings.changes:
            for call in calls:
                await self._answer_error(
                    call, InvalidRequest("the change log is off in this deployment")
                )
            return
        since = first.resume
        if since is None and request.since is not None:
            since = changes.decode_position(request.since)
        try:
            page = await self.store.read_changes(
                request.plugin_id,
                _END if since is None else since,
                reads.list_bounds(request),
                limit=request.limit,
                scan=reads.LOG_SCAN,
                budget=self.max_reply - reads.FRAMING,
            )
        except DATABASE_FAILURES as exc:
            log.warning("rpc_database_failed", error=repr(exc), requests=len(calls))
            for call in calls:
                await self._refuse(call, Internal("the database is unavailable; retry"))
            return
        refused = _refusal(page, since)
        for call in calls:
            if refused is not None:
                await self._answer_error(call, refused)
                continue
            assert page is not None
            reply = reads.changes_reply(
                page, page.head if since is None else since, request.limit, call.codec
            )
            if not reply.items and call.deadline > time.monotonic():
                call.resume = changes.decode_position(reply.next)
                await self._wait_or_give_up(call, time.monotonic())
            else:
                await self._answer(call, functools.partial(_same, reply))

    # ------------------------------------------------------------------ waiting

    async def _wait_loop(self) -> None:
        while True:
            timeout = _POLL_SECONDS
            waiters = [c for calls in self._waiting.values() for c in calls]
            if waiters:
                nearest = min(c.deadline for c in waiters) - time.monotonic()
                timeout = max(0.0, min(timeout, nearest))
            changed = await self.wakeups.wait(timeout)
            if self._waiting:
                await self._recheck(changed)

    async def _recheck(self, changed: set[uuid.UUID] | None) -> None:
        """Re-check the waiters of the plugins that changed (all of them on a poll, or when
        notices may have been missed); answer those past their deadline. On a poll, the
        ``changes`` readers are re-read only where their plugin's head moved (one query for
        all of them), so thousands of followers cost one query a poll, not thousands."""
        now = time.monotonic()
        calls: list[ReadCall] = []
        for plugin in list(self._waiting):
            waiting = self._waiting[plugin]
            if changed is None or not changed or plugin in changed:
                calls += waiting
                del self._waiting[plugin]
                continue
            expired = [c for c in waiting if c.deadline <= now]
            if expired:
                self._waiting[plugin] = [c for c in waiting if c.deadline > now]
                for call in expired:
                    await self._give_up(call)
        following = [c for c in calls if isinstance(c.request, ChangesRequest)]
        lookups = [c for c in calls if not isinstance(c.request, ChangesRequest)]
        if following and changed is not None and not changed:
            following = await self._moved(following, now)
        if lookups or following:
            await asyncio.gather(
                self._guarded(lookups, self._serve_lookups),
                self._guarded(following, self._serve_changes),
            )
        await self._flush_acks()

    async def _moved(self, following: list[ReadCall], now: float) -> list[ReadCall]:
        """Of these ``changes`` readers, those whose plugin's log has moved past where they
        wait, or whose deadline passed; the rest wait on."""
        try:
            heads = await self.store.heads({c.plugin_id for c in following if c.plugin_id})
        except DATABASE_FAILURES as exc:
            log.warning("rpc_recheck_failed", error=repr(exc))
            heads = {}
        moved = []
        for call in following:
            assert call.plugin_id is not None
            if call.deadline <= now or heads.get(call.plugin_id, 0) > (call.resume or 0):
                moved.append(call)
            else:
                self._waiting.setdefault(call.plugin_id, []).append(call)
        return moved

    # ------------------------------------------------------------------ replying

    async def _refuse(self, call: ReadCall, error: StateError) -> None:
        """Answer ``error``, or dead-letter the request when no answer may be sent."""
        if call.answer_to(error) is not None:
            await self._answer_error(call, error)
            return
        self.metrics.count_reject(error.code)
        log.info("read_rejected", code=error.code, routing_key=call.message.routing_key)
        call.settled = True
        try:
            await self.publisher.dead_letter(call.message, error)
        except BROKER_FAILURES as exc:
            log.warning("rpc_dead_letter_failed", error=repr(exc))
            self.acks.give_back(call.message)
            return
        except Exception:  # unforeseen: given back, not lost, and the read path goes on
            log.exception("rpc_dead_letter_failed")
            self.acks.give_back(call.message)
            return
        self.acks.answered(call.message)

    async def _answer_error(self, call: ReadCall, error: StateError) -> None:
        await self._answer(call, lambda: ErrorReply(code=error.code, message=error.message))

    async def _answer(self, call: ReadCall, build: Callable[[], Reply]) -> None:
        """Encode and send a reply; what cannot be encoded or is too large is answered with
        its error instead."""
        self.metrics.rpc_seconds.labels(op=call.op).observe(time.monotonic() - call.received_at)
        if call.parked:
            call.parked = False
            self.subscription.unpark()
        body = self._encode(call, build)
        call.settled = True
        reply_to = call.answer_to(None)
        if reply_to is None:  # pragma: no cover - refused calls never get here
            self.acks.answered(call.message)
            return
        try:
            await self.publisher.reply_body(reply_to, call.message.correlation_id, body, call.codec)
        except BROKER_FAILURES as exc:
            # Given back: some worker answers it with the connection back.
            log.info("rpc_reply_failed", error=repr(exc))
            self.acks.give_back(call.message)
            return
        except Exception:  # unforeseen: given back, not lost, and the read path goes on
            log.exception("rpc_reply_failed")
            self.acks.give_back(call.message)
            return
        self.acks.answered(call.message)

    def _encode(self, call: ReadCall, build: Callable[[], Reply]) -> bytes:
        codec = call.codec
        try:
            reply = build()
            body = codec.encode(reply)
        except _UNENCODABLE as exc:
            refused = f"the value cannot be sent as {codec.name} ({exc}); read it as JSON"
            return _error_body(codec, UnsupportedValue(refused))
        except Exception as exc:  # a reply no rule foresaw failing: this request's outcome
            log.exception("reply_building_failed", op=call.op)
            failure = f"the worker could not build this reply ({type(exc).__name__})"
            return _error_body(codec, Internal(failure))
        if len(body) <= self.max_reply:
            return body
        if isinstance(reply, PageReply) and len(reply.items) > 1:
            # Estimates are bounds, not exact: end the page earlier still.
            keep = max(1, len(reply.items) // 2)
            last = reply.items[keep - 1]
            cursor = encode_cursor((last.scope_kind, last.scope_id or "", last.namespace, last.key))
            shorter = PageReply(items=reply.items[:keep], next_cursor=cursor)
            return self._encode(call, lambda: shorter)
        return _error_body(
            codec,
            ReplyTooLarge(f"the reply would be {len(body)} bytes; the limit is {self.max_reply}"),
        )

    async def _flush_acks(self) -> None:
        """Give back what could not be answered, then ack what was, never covering a
        request still unanswered (``worker.acks``)."""
        failed, settled = await self.acks.flush()
        if failed:
            self.subscription.back_off()
        elif settled:
            self.subscription.went_well()
        self.subscription.settled([*failed, *settled])


def _same(reply: Reply) -> Reply:
    return reply


def _refusal(page: LogPage | None, since: int | None) -> StateError | None:
    """Why a page of the log read from ``since`` cannot be answered, if it cannot."""
    if page is None:
        return UnknownPlugin("the plugin is not registered")
    if since is None:
        return None
    if since < page.purged_through:
        return Compacted(
            f"position {since} is older than the log keeps (deletions up to "
            f"{page.purged_through} are gone): list the entries again and follow from "
            "a position taken before the listing"
        )
    if since > page.head:
        return InvalidRequest("since is ahead of the change log")
    return None


def _error_body(codec: Codec, error: StateError) -> bytes:
    return codec.encode(ErrorReply(code=error.code, message=error.message))


def _lookup_reply(call: ReadCall, found: list[Found]) -> Callable[[], Reply]:
    if isinstance(call.request, GetRequest):
        return lambda: reads.value_reply(found[0].value, call.codec)
    return lambda: ValuesReply(items=[reads.value_reply(f.value, call.codec) for f in found])
