"""Cutting a worker's own broker connections with rabbitmqctl (never the broker itself)."""

from __future__ import annotations

import asyncio
import shutil

import pytest


async def rabbitmqctl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "-q",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {err.decode()}")
    return out.decode()


def require_rabbitmqctl() -> None:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not on PATH: cannot close a worker's broker connections")


async def connections_named(*name_parts: str) -> list[str]:
    """The client-provided properties of every connection whose name contains any of
    ``name_parts``, a line each."""
    listing = await rabbitmqctl("list_connections", "--no-table-headers", "client_properties")
    return [line for line in listing.splitlines() if any(part in line for part in name_parts)]


async def close_connections(name_contains: str) -> int:
    """Close every connection whose client-provided name contains ``name_contains``."""
    # The table format prints pids in the form close_connection accepts.
    listing = await rabbitmqctl(
        "list_connections", "--no-table-headers", "pid", "client_properties"
    )
    closed = 0
    for line in listing.splitlines():
        pid, _, properties = line.partition("\t")
        if name_contains in properties:
            await rabbitmqctl("close_connection", pid, "closed by a fault test")
            closed += 1
    return closed
