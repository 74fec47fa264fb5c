"""What ``NOTIFY`` costs at commit: the wake-up path the worker does not use.

Postgres queues a transaction's notifications at commit under one lock for the whole
database (``NotifyQueueLock``, and the heavyweight lock on the ``pg_notify`` queue taken in
``PreCommit_Notify``), so notifying transactions commit one after another, whatever else
they touch. ``concurrency`` connections run small write transactions (one row each, their
own rows) back to back, first plain, then each also calling ``pg_notify``; the ratio of
the two rates is what a ``NOTIFY`` per write transaction would cost the workers' commits.
The worker signals commits with messages on ``<prefix>.commits`` instead
(``worker.wakeups``), which cost the database nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Final

import asyncpg

from worker.bench.harness import APPLICATION_NAME, BenchEnv
from worker.bench.report import Rate

_TABLE: Final = "bench_notify_rows"
_PLAIN: Final = f"UPDATE {_TABLE} SET n = n + 1 WHERE id = $1"
_NOTIFYING: Final = f"WITH u AS ({_PLAIN} RETURNING id) SELECT pg_notify('bench', id::text) FROM u"


async def measure_notify(
    env: BenchEnv, concurrency: int, seconds: float, bar: Callable[..., Any]
) -> tuple[Rate, Rate]:
    """Commits per second of ``concurrency`` writers without, then with, ``pg_notify``."""
    async with asyncpg.create_pool(
        env.settings.database_url,
        min_size=concurrency,
        max_size=concurrency,
        server_settings={"application_name": APPLICATION_NAME},
    ) as pool:
        await pool.execute(f"CREATE TABLE {_TABLE} (id int PRIMARY KEY, n bigint)")
        await pool.execute(
            f"INSERT INTO {_TABLE} SELECT g, 0 FROM generate_series(1, $1) g", concurrency
        )
        rates = []
        for label, statement in (("plain", _PLAIN), ("with NOTIFY", _NOTIFYING)):
            with bar(f"notify: commits, {label}", unit="commit") as progress:
                rates.append(await _commits(pool, statement, concurrency, seconds, progress))
        await pool.execute(f"DROP TABLE {_TABLE}")
    return rates[0], rates[1]


async def _commits(
    pool: asyncpg.Pool, statement: str, concurrency: int, seconds: float, progress: Any
) -> Rate:
    deadline = time.monotonic() + seconds
    counts = [0] * concurrency

    async def writer(n: int) -> None:
        async with pool.acquire() as conn:
            while time.monotonic() < deadline:
                async with conn.transaction():
                    await conn.execute(statement, n + 1)
                counts[n] += 1
                if counts[n] % 100 == 0:
                    progress.update(100)

    started = time.monotonic()
    await asyncio.gather(*(writer(n) for n in range(concurrency)))
    return Rate(sum(counts), time.monotonic() - started)
