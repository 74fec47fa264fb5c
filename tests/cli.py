"""The console command as a real process, as an operator runs it."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str


def clean_env(**variables: str) -> dict[str, str]:
    """The environment without any PLUGIN_STATE_ setting of the caller's, plus these."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLUGIN_STATE_")}
    return {**env, **variables}


async def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> Ran:
    """``plugin-state-worker ARGS``: its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        *args,
        env=clean_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


def refused_port() -> int:
    """A local port nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
