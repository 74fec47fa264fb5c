"""The processes of one ``run``: which there are, the supervisor that starts, watches and
stops them, and each process's link to it.

With the default ``PLUGIN_STATE_PROCESSES=split``, a worker that reads and also writes or
relays runs as three processes: this supervisor, which serves the HTTP face and does nothing
else; one for the write path, the relay and the housekeeping (expiry sweeper, tombstone
retention); one for the read path. Each has its own event loop and interpreter lock, so a
write path busy on the CPU holds up reads only as long as the system's scheduler lets it,
not for its whole turn on a shared event loop (``docs/performance.md``).

- **Start.** The supervisor binds its HTTP port (a taken one stops it here, with one line),
  spawns every process at once, so that their imports overlap, and lets them start one after
  another: each connects only once the one before it has started (connected, declared,
  consuming). A failure they would all meet, a refused login, is met and said once. The
  read process starts first: once the other takes writes, reads are served, and its
  start-up costs the write path nothing.
- **Run** until SIGTERM or SIGINT, or until a process exits.
- **Drain and stop.** SIGTERM to each process, which drains and stops as a lone worker does
  (``worker.app``); the supervisor waits for them up to the drain timeout and a grace, then
  SIGKILLs what is left, and exits 0 when every process stopped cleanly, 1 otherwise.

A process that exits on its own ends the run: the supervisor drains and stops the others and
exits 1 (0 when that process was only stopped, by a signal sent to it alone). It does not
restart it. A worker with a dead half would otherwise limp: answer reads while its writes
pile up, or the reverse. Restarting is the orchestrator's job, which counts the restarts,
backs off and alerts (Kubernetes, systemd ``Restart=``, compose ``restart:``), as it is
for a single-process worker; and, as inside a worker, a task that dies stops the service
instead of leaving it half alive.

**The link.** Each process inherits one end of a Unix socket pair. The supervisor writes
``start``; the process writes ``http <port>`` once its own HTTP server listens (on loopback,
on a port the system picks) and ``started`` once it consumes. When the supervisor goes away,
even by SIGKILL, the process reads the end of the stream (or a reset, when a report of its own
was left unread), and drains and stops: no orphan.
Portable, unlike ``PR_SET_PDEATHSIG``, and a stop, not a kill.

**HTTP.** The supervisor serves ``PLUGIN_STATE_HTTP_PORT``: ``/healthz`` while it runs,
``/readyz`` from its processes' own (a check holds when it holds in each; ``processes``
when each runs and answers), ``/metrics`` as every process's metrics labelled
``process="<its part's name>"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import msgspec
import structlog

from worker.app import Worker, freeze_imports
from worker.config import ENV_PREFIX, ROLES, Settings
from worker.health import HealthServer, merged_metrics, merged_readiness

log = structlog.get_logger(__name__)

LOOPBACK: Final = "127.0.0.1"
PROCESS_LABEL: Final = "process"
"""The label of ``/metrics`` naming the process a sample comes from."""
STOP_GRACE_SECONDS: Final = 10.0
"""How long past the drain timeout the supervisor waits for its processes to stop."""
_PROBE_SECONDS: Final = 2.0
_SCRAPE_SECONDS: Final = 10.0
_START: Final = b"start\n"
_STARTED: Final = b"started"
_HTTP: Final = b"http"
_SAID_WHY: Final = 1
"""The exit code of a process that stopped on a failure it explained in one line (the
console command's, ``worker.cli``)."""


@dataclass(frozen=True, slots=True)
class Part:
    """What one process of a worker does: its roles, the housekeeping or not, and its share
    of the worker's Postgres connections."""

    name: str
    roles: frozenset[str]
    housekeeping: bool
    pool_size: int

    def settings(self, settings: Settings) -> Settings:
        """The settings of this part's process: its roles and connections, in one process,
        HTTP on loopback at a port the system picks (the supervisor serves the one the
        operator gave)."""
        return settings.with_changes(
            roles=self.roles,
            db_pool_size=self.pool_size,
            processes="single",
            http_host=LOOPBACK,
            http_port=0,
        )


def plan(settings: Settings) -> list[Part]:
    """The processes of a ``run``: the read path in one of its own when the worker also
    writes or relays (``PLUGIN_STATE_PROCESSES=split``), otherwise every role in one.

    A split worker still opens at most ``PLUGIN_STATE_DB_POOL_SIZE`` Postgres connections
    (what deployments budget for, ``docs/scaling.md``): a third for the reads, the rest
    for the write transactions, the relay and the housekeeping, one each at least."""
    roles, pool = settings.roles, settings.db_pool_size
    if settings.processes == "single" or "reads" not in roles or roles == {"reads"}:
        return [Part(_name_of(roles), roles, housekeeping=True, pool_size=pool)]
    rest = roles - {"reads"}
    reads = max(1, pool // 3)
    return [  # in the order they start
        Part("reads", frozenset({"reads"}), housekeeping=False, pool_size=reads),
        Part(_name_of(rest), rest, housekeeping=True, pool_size=max(1, pool - reads)),
    ]


def _name_of(roles: frozenset[str]) -> str:
    return "+".join(role for role in ROLES if role in roles)


# --------------------------------------------------------------------------- supervisor


class Child:
    """One process of the run, as the supervisor sees it."""

    def __init__(
        self,
        part: Part,
        process: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.part = part
        self.process = process
        self.writer = writer
        self.http_port: int | None = None
        self.started = asyncio.Event()
        self.stop_sent = False
        self.exited = asyncio.ensure_future(process.wait())
        self._listening = asyncio.ensure_future(self._listen(reader))

    @classmethod
    async def spawn(cls, part: Part, settings: Settings) -> Child:
        """``plugin-state-worker run`` for ``part``, with the supervisor's settings (flags
        included) as its environment and its end of the link."""
        ours, theirs = socket.socketpair()
        environment = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        command = ["-m", "worker.cli", "run", "--part", part.name]
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                *command,
                "--supervisor-fd",
                str(theirs.fileno()),
                env={**environment, **settings.to_env()},
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        return cls(part, process, reader, writer)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def failed(self) -> bool:
        """It exited, and not as a stop: a SIGTERM before it could handle one is a stop."""
        code = self.process.returncode
        return code is not None and code != 0 and not (self.stop_sent and code == -signal.SIGTERM)

    def start(self) -> None:
        self.writer.write(_START)

    def stop(self) -> None:
        if self.process.returncode is None and not self.stop_sent:
            self.stop_sent = True
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()

    async def _listen(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            word, _, argument = line.strip().partition(b" ")
            if word == _HTTP:
                self.http_port = int(argument)
            elif word == _STARTED:
                self.started.set()

    async def readiness(self, session: aiohttp.ClientSession) -> dict[str, bool] | None:
        """Its ``/readyz`` checks; None while it cannot answer."""
        body = await self._get(session, "/readyz", _PROBE_SECONDS)
        if body is None:
            return None
        try:
            checks = msgspec.json.decode(body, type=dict[str, bool])
        except msgspec.DecodeError:
            return None
        checks.pop("ready", None)
        return checks

    async def metrics(self, session: aiohttp.ClientSession) -> str | None:
        body = await self._get(session, "/metrics", _SCRAPE_SECONDS)
        return None if body is None else body.decode()

    async def _get(self, session: aiohttp.ClientSession, path: str, timeout: float) -> bytes | None:
        if self.http_port is None or self.process.returncode is not None:
            return None
        url = f"http://{LOOPBACK}:{self.http_port}{path}"
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as got:
                return await got.read()
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def close(self) -> None:
        self._listening.cancel()
        self.writer.close()
        await asyncio.gather(self._listening, return_exceptions=True)


class Supervisor:
    """Starts the processes of a split worker, watches them, drains and stops them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.parts = plan(settings)
        self.children: list[Child] = []
        self.stopping = asyncio.Event()
        self.health = HealthServer(
            self.readiness, self.exposition, settings.http_host, settings.http_port
        )
        self._session: aiohttp.ClientSession | None = None

    def request_stop(self) -> None:
        self.stopping.set()

    async def run(self) -> int:
        """Start, supervise, drain and stop; the run's exit code."""
        structlog.contextvars.bind_contextvars(process="supervisor")
        self._session = aiohttp.ClientSession()
        try:
            await self.health.start()
            for part in self.parts:
                self.children.append(await Child.spawn(part, self.settings))
            log.info(
                "processes_spawned",
                processes={child.part.name: child.pid for child in self.children},
            )
            if await self._start_in_order():
                await _first(self.stopping.wait(), *(c.exited for c in self.children))
            return await self._stop()
        finally:
            await self._reap()
            await self.health.stop()
            await self._session.close()

    async def _start_in_order(self) -> bool:
        """Each process connects once the one before it has started; False when the run
        stopped or a process exited first."""
        for child in self.children:
            if self.stopping.is_set():
                return False
            child.start()
            await _first(child.started.wait(), self.stopping.wait(), child.exited)
            if not child.started.is_set():
                return False
        return True

    async def _stop(self) -> int:
        for child in self.children:
            if child.exited.done():
                self._exited_alone(child)
        log.info("processes_stopping")
        for child in self.children:
            child.stop()
        exits = [child.exited for child in self.children]
        timeout = self.settings.drain_timeout_seconds + STOP_GRACE_SECONDS
        _, late = await asyncio.wait(exits, timeout=timeout)
        for child in self.children:
            if child.exited in late:
                log.error("process_killed", process=child.part.name, pid=child.pid, after=timeout)
                child.kill()
        await asyncio.gather(*exits)
        failed = [child.part.name for child in self.children if child.failed]
        log.info("processes_stopped", failed=failed)
        return 1 if failed or late else 0

    async def _reap(self) -> None:
        """No process outlives the supervisor, even one left running by an error of its
        own: asked to stop, then killed."""
        running = [child for child in self.children if not child.exited.done()]
        for child in running:
            child.stop()
        if running:
            await asyncio.wait([child.exited for child in running], timeout=STOP_GRACE_SECONDS)
        for child in self.children:
            child.kill()
            await child.exited
            await child.close()

    def _exited_alone(self, child: Child) -> None:
        """Say why the run ends: a process exited without being asked to."""
        fields: dict[str, Any] = {
            "process": child.part.name,
            "pid": child.pid,
            "code": child.process.returncode,
        }
        if not child.failed:
            log.info("process_stopped_alone", **fields)
        elif child.process.returncode == _SAID_WHY and not child.started.is_set():
            # It said why itself (a refused login is one line): no second line here.
            log.info("process_failed_to_start", **fields)
        else:
            log.error("process_died", **fields)

    async def readiness(self) -> dict[str, bool]:
        assert self._session is not None
        answers = await asyncio.gather(*(c.readiness(self._session) for c in self.children))
        checks = merged_readiness(answer for answer in answers if answer is not None)
        checks["processes"] = len(answers) == len(self.parts) and None not in answers
        checks["not_stopping"] = checks.get("not_stopping", True) and not self.stopping.is_set()
        return checks

    async def exposition(self) -> bytes:
        assert self._session is not None
        texts = await asyncio.gather(*(c.metrics(self._session) for c in self.children))
        named = zip((child.part.name for child in self.children), texts, strict=True)
        return merged_metrics({name: t for name, t in named if t is not None}, PROCESS_LABEL)


async def _first(*awaitables: Awaitable[Any]) -> None:
    """Until the first of ``awaitables`` is done; the others are cancelled, but for
    futures, which are left to their owner."""
    waiting = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future, awaitable in zip(waiting, awaitables, strict=True):
            if future is not awaitable:
                future.cancel()


# --------------------------------------------------------------------------- a process


async def serve_part(settings: Settings, name: str, fd: int) -> None:
    """The life of one process of a split worker: wait for the supervisor's word, run the
    worker of its part, tell the supervisor its HTTP port and when it has started; drain and
    stop on SIGTERM or SIGINT, or when the supervisor is gone."""
    parts = {part.name: part for part in plan(settings)}
    part = parts[name]
    structlog.contextvars.bind_contextvars(process=name)
    worker = Worker(part.settings(settings), housekeeping=part.housekeeping)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    try:
        told = asyncio.ensure_future(_read_word(reader))
        await _first(told, worker.stopping.wait())
        if not told.done() or told.result() != _START:
            told.cancel()
            return  # stopped, or the supervisor went, before this process's turn
        watching = asyncio.ensure_future(_watch_supervisor(reader, worker.request_stop))
        reporting = asyncio.ensure_future(_report(writer, worker))
        freeze_imports()
        try:
            await worker.run()
        finally:
            for task in (watching, reporting):
                task.cancel()
            await asyncio.gather(watching, reporting, return_exceptions=True)
    finally:
        writer.close()


async def _read_word(reader: asyncio.StreamReader) -> bytes:
    """The supervisor's next line; empty once it is gone."""
    try:
        return await reader.readline()
    except ConnectionError:
        return b""  # gone, with a report of ours unread: a reset, not an end of stream


async def _watch_supervisor(reader: asyncio.StreamReader, gone: Callable[[], None]) -> None:
    """Call ``gone`` when the supervisor is: the end of the stream, or a reset when it died
    with a report of this process unread (the system resets a Unix socket whose peer closes
    with data in its buffer). Either way this process drains and stops: no orphan."""
    with contextlib.suppress(ConnectionError):
        await reader.read()  # the supervisor writes nothing more after ``start``
    log.warning("supervisor_gone")
    gone()


async def _report(writer: asyncio.StreamWriter, worker: Worker) -> None:
    with contextlib.suppress(ConnectionError):  # the supervisor is gone: the watch stops us
        await worker.health.serving.wait()
        writer.write(_HTTP + b" %d\n" % worker.health.port)
        await writer.drain()
        await worker.started.wait()
        writer.write(_STARTED + b"\n")
        await writer.drain()
