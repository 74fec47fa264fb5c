"""Worker processes for tests that need real OS processes (signals, several workers).

``run`` splits a worker into processes (``worker.supervisor``): the process a test spawns is
the supervisor, and ``parts`` finds the processes under it by what each does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

# The bench reads a worker's process tree the same way: one reading of /proc for both.
from worker.bench.harness import children, part_of, tree
from worker.config import Settings

from .helpers import wait_until

__all__ = [
    "alive",
    "children",
    "kill_tree",
    "part_of",
    "parts",
    "peak_rss",
    "spawn_worker",
    "tree",
    "wait_exit",
]


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


def parts(process: subprocess.Popen[bytes]) -> dict[str, int]:
    """The processes of a spawned ``run``, by part (``writes+relay``, ``reads``)."""
    return {part: pid for pid in children(process.pid) if (part := part_of(pid)) is not None}


def peak_rss(pid: int) -> int:
    """A process's peak resident memory in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def kill_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a spawned ``run`` and every process under it at once, as a crash of the
    whole worker (the OOM killer of its container) would: none of them drains. The
    supervisor first, so that it cannot react to the others' deaths."""
    for pid in tree(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
