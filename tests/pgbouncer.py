"""A PgBouncer of the test's own, in transaction pooling, in front of the machine's Postgres.

Debian's ``pgbouncer`` (installed by ``.ci/run``), started on a free loopback port with a
configuration, log and pid file in a temporary directory, and stopped after. It never runs
as root (PgBouncer refuses to), so it runs as the ``postgres`` user of the Debian package.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from .helpers import free_port, through, wait_until

CONFIG = """\
[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = trust
auth_file = {directory}/users.txt
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 200
server_reset_query =
ignore_startup_parameters = extra_float_digits
logfile = {directory}/pgbouncer.log
pidfile = {directory}/pgbouncer.pid
"""


@dataclass(frozen=True)
class Bouncer:
    port: int
    pool_size: int
    directory: Path

    def url(self, database_url: str) -> str:
        """``database_url``, through this PgBouncer."""
        return through(database_url, self.port)


@contextlib.asynccontextmanager
async def pgbouncer(database_url: str, pool_size: int) -> AsyncIterator[Bouncer]:
    """PgBouncer in transaction mode with ``pool_size`` server connections per database."""
    binary = shutil.which("pgbouncer", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if binary is None:
        # CI installs it (.ci/run); elsewhere `apt-get install pgbouncer` runs this test.
        if os.environ.get("CI"):
            pytest.fail("pgbouncer is not installed: .ci/run installs Debian's package")
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    owner = pwd.getpwnam("postgres")
    as_owner = os.geteuid() == 0  # PgBouncer refuses to run as root
    with tempfile.TemporaryDirectory(prefix="pstest_pgbouncer_") as name:
        bouncer = Bouncer(free_port(), pool_size, Path(name))
        config = _write_files(bouncer, database_url, owner)
        process = await asyncio.create_subprocess_exec(
            binary,
            str(config),
            user=owner.pw_uid if as_owner else None,
            group=owner.pw_gid if as_owner else None,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            await wait_until(lambda: _answers(bouncer.url(database_url)), what="pgbouncer")
            yield bouncer
        finally:
            process.send_signal(signal.SIGINT)  # PgBouncer's "exit at once"
            try:
                await asyncio.wait_for(process.wait(), timeout=10)
            except TimeoutError:
                process.kill()
                await process.wait()


def _write_files(bouncer: Bouncer, database_url: str, owner: pwd.struct_passwd) -> Path:
    """Its configuration and users, owned by the user it runs as; the configuration's path."""
    target = urlsplit(database_url)
    directory = bouncer.directory
    (directory / "users.txt").write_text(f'"{target.username or "postgres"}" ""\n')
    config = directory / "pgbouncer.ini"
    config.write_text(
        CONFIG.format(
            host=target.hostname or "127.0.0.1",
            port=target.port or 5432,
            listen=bouncer.port,
            directory=directory,
            pool_size=bouncer.pool_size,
        )
    )
    for path in (directory, *directory.iterdir()):
        os.chown(path, owner.pw_uid, owner.pw_gid)
    return config


async def _answers(url: str) -> bool:
    try:
        connection = await asyncpg.connect(url, statement_cache_size=0, timeout=2)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    await connection.close()
    return True
