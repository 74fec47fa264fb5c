"""Structured logging: an event name plus fields, as text for people or one JSON object per
line for machines. Payloads and secrets are never logged: the password of every URL in every
field of every line (an error's text included) is replaced by ``***`` before it is written."""

from __future__ import annotations

import logging
import sys

import structlog
from structlog.typing import EventDict, WrappedLogger

from schemas.brokers import redact


def configure(log_format: str = "text", level: str = "info") -> None:
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_urls,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def redact_urls(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    """Hide the password of any URL in a text field: a setting, an error's message or
    traceback (a driver's error may quote the URL it was given)."""
    for name, value in event.items():
        if isinstance(value, str) and "://" in value:
            event[name] = redact(value)
    return event
