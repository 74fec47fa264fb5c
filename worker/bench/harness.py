"""The bench's own world, removed afterwards: a database, a topology prefix, processes.

``bench_env`` creates the database ``pstest_bench_<random>`` (migrated from scratch) on the
configured Postgres server and uses the same name as its topology prefix, so a run never
touches real data or another run's. On the way out it stops every process it started,
deletes every queue and exchange of its prefix and drops the database, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from tqdm import tqdm

from worker.config import Settings
from worker.migrate import migrate
from worker.store import QUERIES, Store
from worker.topology import Names, commands_queue_arguments, declare

APPLICATION_NAME: Final = "plugin-state-worker bench"
NAME_PREFIX: Final = "pstest_bench_"
_STOP_SECONDS: Final = 30.0
_LOG_TAIL: Final = 2000
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """The bench cannot go on: a process died, the broker refused, a deadline passed."""


def new_progress(show: bool | None) -> Callable[..., Any]:
    """A tqdm factory writing to stderr; ``show=None`` shows bars only on a terminal."""

    def bar(desc: str, total: float | None = None, unit: str = "msg") -> Any:
        return tqdm(
            desc=desc,
            total=total,
            unit=unit,
            file=sys.stderr,
            disable=None if show is None else not show,
            dynamic_ncols=True,
        )

    return bar


async def wait_for(
    predicate: Callable[[], Awaitable[bool]],
    *,
    timeout: float,
    what: str,
    interval: float = 0.02,
    alive: Callable[[], None] = lambda: None,
) -> float:
    """Poll until ``predicate`` holds; returns the ``time.perf_counter()`` it first held.

    ``alive`` raises when a process the wait depends on has died, so a crash is reported
    at once instead of as a time-out."""
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():
            return time.perf_counter()
        alive()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True, slots=True)
class Resident:
    """Resident memory in bytes: ``VmRSS`` now, ``VmHWM`` the peak so far. Of a process tree
    (a worker split into processes, ``worker.supervisor``), the sums over its processes, and
    ``processes`` each one's, by name; the sum of the peaks bounds the tree's peak from above
    (each process's peak counted whenever it came, and the pages they share, such as the
    interpreter's, once per process)."""

    rss: int
    peak: int
    processes: tuple[tuple[str, int, int], ...] = ()
    """(name, rss, peak) of each process."""


@dataclass
class Process:
    """A child process of the bench (a worker or a reference server), logging to a file.
    Its figures (CPU time, memory) are those of its whole tree: a worker's supervisor and
    the processes under it."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    log_file: TextIO

    @property
    def pid(self) -> int:
        return self.process.pid

    def tree(self) -> list[int]:
        """The process and those under it that run now."""
        return tree(self.pid)

    def resident(self) -> Resident:
        processes = []
        for pid in self.tree():
            fields: dict[str, int] = {}
            with contextlib.suppress(FileNotFoundError):  # it exited meanwhile
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    name, _, value = line.partition(":")
                    if name in ("VmRSS", "VmHWM"):
                        fields[name] = int(value.split()[0]) * 1024  # reported in kB
            if len(fields) == 2:
                processes.append((self._name_of(pid), fields["VmRSS"], fields["VmHWM"]))
        return Resident(
            rss=sum(rss for _, rss, _ in processes),
            peak=sum(peak for _, _, peak in processes),
            processes=tuple(processes),
        )

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process tree has used so far (of the processes
        that run now: none of a worker's ends while it is measured)."""
        ticks = 0
        for pid in self.tree():
            # /proc/<pid>/stat: the fields after the command (which may hold spaces) in
            # parentheses; utime and stime are the 14th and 15th, in clock ticks.
            with contextlib.suppress(FileNotFoundError):
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
                ticks += int(fields[11]) + int(fields[12])
        return ticks / _CLOCK_TICKS

    def _name_of(self, pid: int) -> str:
        """A worker's process by its part (``--part``), its supervisor, or the process."""
        part = part_of(pid)
        if part is not None:
            return part
        return "supervisor" if pid == self.pid and children(pid) else self.name

    def log_tail(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")[-_LOG_TAIL:]

    def check_alive(self) -> None:
        if self.process.returncode is not None:
            raise BenchError(
                f"{self.name} (pid {self.pid}) exited with {self.process.returncode}; "
                f"its log ends with:\n{self.log_tail()}"
            )

    async def stop(self) -> int:
        """SIGTERM, then SIGKILL if it has not exited in time; returns its exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(_STOP_SECONDS):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        self.log_file.close()
        assert self.process.returncode is not None
        return self.process.returncode


def children(pid: int) -> list[int]:
    """The processes ``pid`` started that are still running (Linux: /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and every process under it."""
    return [pid, *(below for child in children(pid) for below in tree(child))]


def part_of(pid: int) -> str | None:
    """What a process of a split worker does (its ``--part``, ``worker.supervisor``); None
    for a supervisor, a worker in one process, or a process that is gone."""
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return None
    if b"--part" not in arguments:
        return None
    return arguments[arguments.index(b"--part") + 1].decode()


# --------------------------------------------------------------------------- environment


@dataclass
class BenchEnv:
    """What a bench run owns. ``settings`` name the bench's database and prefix."""

    settings: Settings
    admin_url: str
    store: Store
    connection: AbstractConnection
    channel: AbstractChannel
    exchange: AbstractExchange
    user_id: str
    log_dir: Path
    processes: list[Process] = field(default_factory=list)
    bench_queues: list[str] = field(default_factory=list)

    @property
    def names(self) -> Names:
        return Names(self.settings.prefix)

    @property
    def amqp_url(self) -> str:
        """The broker URL of the bench's own connections and reference servers: the first of
        a list (its workers get the whole list, and spread over the nodes)."""
        return self.settings.amqp_urls[0]

    @property
    def pool(self) -> asyncpg.Pool:
        return self.store.pool

    async def add_plugin(self, label: str) -> uuid.UUID:
        row = await self.store.add_plugin(f"bench-{label}", None, None)
        return row.id

    def bench_queue_name(self, label: str) -> str:
        return f"{self.settings.prefix}.bench.{label}"

    async def bench_queue(self, label: str, routing_key: str, *, quorum: bool) -> AbstractQueue:
        """A queue of the bench's own, bound to the prefix's exchange by ``routing_key``;
        a quorum one has the commands queue's arguments, so it behaves the same."""
        name = self.bench_queue_name(label)
        arguments = commands_queue_arguments(self.settings) if quorum else None
        queue = await self.channel.declare_queue(name, durable=True, arguments=arguments)
        self.bench_queues.append(name)
        await queue.bind(self.exchange, routing_key=routing_key)
        return queue

    async def queue_counts(self, name: str) -> tuple[int, int]:
        """(ready messages, consumers) of a queue, by a passive declare."""
        queue = await self.channel.declare_queue(name, passive=True)
        result = queue.declaration_result
        return result.message_count or 0, result.consumer_count or 0

    async def wait_for_consumer(self, queue_name: str, process: Process) -> None:
        """Until ``process`` (started to consume ``queue_name``) has subscribed."""

        async def consuming() -> bool:
            return (await self.queue_counts(queue_name))[1] > 0

        await wait_for(
            consuming, timeout=60, what=f"{process.name} to consume", alive=process.check_alive
        )

    def message(self, body: bytes, **properties: Any) -> aio_pika.Message:
        return aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            user_id=self.user_id,
            **properties,
        )

    async def publish_all(
        self,
        routing_key: str,
        bodies: Iterable[bytes],
        bar: Any,
        window: int = 1000,
        *,
        message_ids: bool = False,
    ) -> None:
        """Publish persistent with confirms, up to ``window`` unconfirmed at a time;
        ``message_ids``: each with a ``message_id`` of its own (a random one: it spreads
        over partitions as a write's id does)."""
        slots = asyncio.Semaphore(window)

        async def one(body: bytes) -> None:
            properties = {"message_id": uuid.uuid4().hex} if message_ids else {}
            try:
                await self.exchange.publish(self.message(body, **properties), routing_key)
            finally:
                slots.release()
            bar.update(1)

        async with asyncio.TaskGroup() as group:
            for body in bodies:
                await slots.acquire()
                group.create_task(one(body))

    def worker_environment(self, **overrides: str) -> dict[str, str]:
        """``plugin-state-worker run``'s environment: the caller's, pointed at the bench's
        database and prefix, trusting the bench's user (``overrides`` by lower-case name)."""
        settings = self.settings
        return {
            **os.environ,
            "PLUGIN_STATE_DATABASE_URL": settings.database_url,
            "PLUGIN_STATE_AMQP_URL": settings.amqp_url,
            "PLUGIN_STATE_PREFIX": settings.prefix,
            "PLUGIN_STATE_TRUSTED_USERS": self.user_id,
            "PLUGIN_STATE_LOG_LEVEL": "warning",
            # Several workers run at once: each takes a free port for its HTTP server.
            "PLUGIN_STATE_HTTP_PORT": "0",
            **{f"PLUGIN_STATE_{name.upper()}": value for name, value in overrides.items()},
        }

    async def spawn(self, name: str, args: list[str], environment: dict[str, str]) -> Process:
        """Start ``python ARGS`` with its output in a log file of the run."""
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("w")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            env=environment,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
        child = Process(name, process, log_path, log_file)
        self.processes.append(child)
        return child

    async def spawn_worker(self, name: str, **overrides: str) -> Process:
        return await self.spawn(
            name, ["-m", "worker.cli", "run"], self.worker_environment(**overrides)
        )

    async def stop(self, process: Process) -> None:
        code = await process.stop()
        self.processes.remove(process)
        if code != 0:
            raise BenchError(
                f"{process.name} exited with {code} on SIGTERM; log:\n{process.log_tail()}"
            )


def _with_path(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@contextlib.asynccontextmanager
async def bench_env(settings: Settings) -> AsyncIterator[BenchEnv]:
    """Create the bench's database and topology; remove everything on the way out."""
    name = f"{NAME_PREFIX}{uuid.uuid4().hex[:10]}"
    database_url = _with_path(settings.database_url, name)
    admin_url = _with_path(settings.database_url, "postgres")
    amqp_url = settings.amqp_urls[0]
    user_id = urlsplit(amqp_url).username or "guest"
    bench_settings = settings.with_changes(
        database_url=database_url, prefix=name, trusted_users=frozenset({user_id})
    )
    with tempfile.TemporaryDirectory(prefix=name) as log_dir:
        try:
            await migrate(database_url)
            pool = await asyncpg.create_pool(
                database_url,
                min_size=1,
                max_size=4,
                server_settings={"application_name": APPLICATION_NAME},
            )
            assert pool is not None
            store = Store(pool)
            try:
                connection = await aio_pika.connect(
                    amqp_url, client_properties={"connection_name": APPLICATION_NAME}
                )
                async with connection:
                    channel = await connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
                    topology = await declare(channel, bench_settings)
                    env = BenchEnv(
                        settings=bench_settings,
                        admin_url=admin_url,
                        store=store,
                        connection=connection,
                        channel=channel,
                        exchange=topology.exchange,
                        user_id=user_id,
                        log_dir=Path(log_dir),
                    )
                    try:
                        yield env
                    finally:
                        for process in list(env.processes):
                            await process.stop()
                        await _delete_topology(amqp_url, env)
            finally:
                await store.close()
        finally:
            await _drop_database(admin_url, name)


async def _delete_topology(amqp_url: str, env: BenchEnv) -> None:
    """On a connection of its own: the bench's may be the reason we are leaving."""
    names = env.names
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for queue in (names.commands_queue, names.rpc_queue, names.dead, *env.bench_queues):
            await channel.queue_delete(queue)
        for exchange in (names.exchange, names.dead):
            await channel.exchange_delete(exchange)


async def _drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url, server_settings={"application_name": APPLICATION_NAME})
    try:
        quoted = await conn.fetchval(QUERIES["quote_ident"], name)
        await conn.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
    finally:
        await conn.close()
