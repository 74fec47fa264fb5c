"""The client is a library: it writes nothing to stdout and configures no logging; its
events go through the standard ``logging`` machinery, where the application decides."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid

from .services import ServiceUrls

_USE_THE_CLIENT = """
import asyncio, logging, sys, uuid
from worker.client import StateClient

{setup}

async def main() -> None:
    async with StateClient({url!r}, uuid.UUID({plugin!r}), prefix={prefix!r}):
        pass

asyncio.run(main())
print("root handlers:", logging.getLogger().handlers, file=sys.stderr)
"""


def _run(services: ServiceUrls, prefix: str, setup: str = "") -> subprocess.CompletedProcess[str]:
    script = _USE_THE_CLIENT.format(
        setup=textwrap.dedent(setup), url=services.amqp_url, plugin=str(uuid.uuid4()), prefix=prefix
    )
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )


def test_using_the_client_writes_nothing_to_stdout_nor_configures_logging(
    services: ServiceUrls, prefix: str
) -> None:
    done = _run(services, prefix)
    assert done.stdout == ""
    assert "state_client_connected" not in done.stderr
    assert "root handlers: []" in done.stderr


def test_the_client_logs_through_the_standard_logging_machinery(
    services: ServiceUrls, prefix: str
) -> None:
    done = _run(
        services,
        prefix,
        """
        class Fields(logging.Handler):
            def emit(self, record):
                print("record", record.name, record.getMessage(), record.connection_name,
                      file=sys.stderr)

        logging.getLogger("worker.client").addHandler(Fields())
        logging.getLogger("worker.client").setLevel(logging.INFO)
        """,
    )
    assert done.stdout == ""
    assert "record worker.client.connection state_client_connected plugin-state-client" in (
        done.stderr
    ), done.stderr
