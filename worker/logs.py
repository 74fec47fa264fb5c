"""Structured logging: an event name plus fields, as text for people or one JSON object per
line for machines. Payloads and secrets are never logged: the password of every URL in every
field of every line (an error's text included) is replaced by ``***`` before it is written.

The worker logs through structlog; the client package (``worker.client``), a library, logs
through the standard ``logging`` machinery and never configures it. The console command
routes those records through the same renderer, on stderr, so the operator commands that use
the client print its events in the worker's format and never on stdout, where their output
goes.
"""

from __future__ import annotations

import logging
import sys

import structlog
from structlog.typing import EventDict, WrappedLogger

from schemas.brokers import redact

CLIENT_LOGGER = "worker.client"
QUIETED: tuple[str, ...] = ("aiormq.connection",)
"""Libraries' loggers whose failures the commands report themselves, as one line that says
what to do (``worker.diagnosis``): aiormq logs a refused connection as an error first."""


def configure(log_format: str = "text", level: str = "info") -> None:
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            redact_urls,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        # One write per line, newline included (print() makes two): the processes of a
        # run share stderr (worker.supervisor), and with unbuffered output (the image's
        # PYTHONUNBUFFERED) two writes of theirs interleave mid-line.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.ExtraAdder(),
                timestamper,
                redact_urls,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    client = logging.getLogger(CLIENT_LOGGER)
    client.handlers = [handler]
    # The operator commands' output is their JSON and, on failure, one line: the client's
    # connects and closes are news only when debugging.
    client.setLevel(
        numeric_level if numeric_level <= logging.DEBUG else max(numeric_level, logging.WARNING)
    )
    client.propagate = False
    for name in QUIETED:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def redact_urls(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    """Hide the password of any URL in a text field: a setting, an error's message or
    traceback (a driver's error may quote the URL it was given)."""
    for name, value in event.items():
        if isinstance(value, str) and "://" in value:
            event[name] = redact(value)
    return event
