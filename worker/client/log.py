"""The client's loggers: structlog's call style (an event name plus fields) on the standard
``logging`` machinery, under the ``worker.client`` logger names.

A library must not decide where its logs go: nothing here configures logging or writes to a
stream. The application does, with ``logging.basicConfig`` or its own handlers (the
console command routes them through its own renderer, ``worker.logs``); unconfigured,
Python shows warnings and errors on stderr and nothing on stdout.
"""

from __future__ import annotations

import logging

import structlog


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger for module ``name``: ``log.info("event", field=value)`` becomes a standard
    record whose message is the event name and whose ``extra`` holds the fields."""
    logger: structlog.stdlib.BoundLogger = structlog.wrap_logger(
        logging.getLogger(name),
        processors=[structlog.stdlib.filter_by_level, structlog.stdlib.render_to_log_kwargs],
        wrapper_class=structlog.stdlib.BoundLogger,
    )
    return logger
