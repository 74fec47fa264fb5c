"""Worker processes for tests that need real OS processes (signals, several workers)."""

from __future__ import annotations

import os
import subprocess
import sys

from worker.config import Settings

from .helpers import wait_until


def spawn_worker(
    settings: Settings, *, stderr: int | None = None, **overrides: str | None
) -> subprocess.Popen[bytes]:
    """``plugin-state-worker run`` with the test's settings (``overrides`` are extra
    ``PLUGIN_STATE_*`` variables, by lower-case name; None leaves one unset)."""
    env: dict[str, str | None] = {
        **os.environ,
        "PLUGIN_STATE_DATABASE_URL": settings.database_url,
        "PLUGIN_STATE_AMQP_URL": settings.amqp_url,
        "PLUGIN_STATE_PREFIX": settings.prefix,
        "PLUGIN_STATE_TRUSTED_USERS": ",".join(sorted(settings.trusted_users)),
        "PLUGIN_STATE_LOG_LEVEL": "warning",
        "PLUGIN_STATE_HTTP_PORT": "0",
        **{f"PLUGIN_STATE_{name.upper()}": value for name, value in overrides.items()},
    }
    present = {name: value for name, value in env.items() if value is not None}
    return subprocess.Popen([sys.executable, "-m", "worker.cli", "run"], env=present, stderr=stderr)


async def wait_exit(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    async def exited() -> bool:
        return process.poll() is not None

    await wait_until(exited, timeout=timeout, what="the worker process to exit")
    assert process.returncode is not None
    return process.returncode
