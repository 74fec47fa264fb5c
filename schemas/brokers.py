"""Broker addresses (protocol §5): one RabbitMQ, or the nodes of one cluster, as AMQP URLs.

``PLUGIN_STATE_AMQP_URL`` may hold several URLs, comma-separated; a worker, the client and
the CLI connect to any live one and move to another when theirs goes down. The URLs of a
list name one broker reached at several addresses, so they may differ only in host and port:
the same scheme, user, password, virtual host and options (the client's ``user_id`` is the
connection's user, and options such as TLS files hold for every node).

And how an address is shown: every password in a URL, wherever it appears in a text (a log
line, an error, a metric label), becomes ``***``.

Here, not in ``worker.config`` or ``worker.client``, because both need it and neither may
import the other (``pyproject.toml``'s import contracts); it depends on the standard
library only, so any producer can use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final
from urllib.parse import urlsplit

SCHEMES: Final = ("amqp", "amqps")

# A list splits only before a scheme, so a comma inside a URL (a password may hold one)
# never splits it.
_SEPARATOR: Final = re.compile(r"\s*,\s*(?=amqps?://)", re.IGNORECASE)
# The password of any URL in a text, `scheme://user:password@`, up to the last `@` before the
# path (a password should escape an `@`, but one that does not is hidden whole all the same)
# and never into the next URL of a list.
_PASSWORD: Final = re.compile(
    r"(?P<head>[a-z][a-z0-9+.-]*://[^\s:/@]*:)(?:(?!,\s*[a-z][a-z0-9+.-]*://)[^\s/])*@",
    re.IGNORECASE,
)


class AddressError(ValueError):
    """A broker address, or a list of them, that cannot be used."""


def split_urls(text: str | Iterable[str]) -> tuple[str, ...]:
    """The URLs of ``text`` (comma-separated) or of each string of an iterable (each may
    itself be a comma-separated list), checked: at least one, each ``amqp://`` or
    ``amqps://`` with a host, all alike but for host and port, none twice."""
    texts = [text] if isinstance(text, str) else list(text)
    urls = tuple(
        url for part in texts for url in (u.strip() for u in _SEPARATOR.split(part)) if url
    )
    if not urls:
        raise AddressError("no broker URL given")
    first = _alike(urls[0])
    for url in urls:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as exc:
            raise AddressError(f"{redact(url)} is not a valid URL ({exc})") from None
        if parts.scheme.lower() not in SCHEMES or not parts.hostname:
            raise AddressError(f"{redact(url)} is not an amqp:// or amqps:// URL with a host")
        if _alike(url) != first:
            raise AddressError(
                f"{redact(url)} differs from {redact(urls[0])} in more than host and port: "
                "the URLs of a list are the nodes of one broker (the same scheme, user, "
                "password, virtual host and options)"
            )
    if len(set(urls)) != len(urls):
        raise AddressError(f"a broker URL is given twice in {redact_all(urls)}")
    return urls


def _alike(url: str) -> tuple[str | None, ...]:
    """What the URLs of one list share: all but host and port."""
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.username, parts.password, parts.path or "/", parts.query


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``:
    ``amqp://user:secret@host/`` becomes ``amqp://user:***@host/``."""
    return _PASSWORD.sub(r"\g<head>***@", text)


def redact_all(urls: Iterable[str]) -> str:
    """A list of URLs as one loggable string (comma-separated, passwords hidden)."""
    return ",".join(redact(url) for url in urls)


def host_of(url: str) -> str:
    """``host:port`` of a URL (the default port by scheme): which node, safe to show."""
    parts = urlsplit(url)
    port = parts.port or (5671 if parts.scheme.lower() == "amqps" else 5672)
    return f"{parts.hostname}:{port}"
