"""The event loop every console command runs on: uvloop where it is installed.

Its own module, below ``worker.cli`` and the command modules it registers (``bench``,
``dead``, the state commands), so each of them runs its coroutine the same way without
importing the command group that imports them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed: it is the faster event loop."""
    try:
        import uvloop  # noqa: PLC0415 - optional at run time
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)
