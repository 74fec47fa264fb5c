"""``plugin-state-worker dead list|replay|purge``: the dead-letter queue, for operators.

The work is done by ``worker.dead_letters`` (which also says how the queue is read
without losing anything); this module parses flags, asks for confirmation and prints:
a table for people, or with ``--json`` one JSON object per dead letter and line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, TypeVar

import click
from tqdm import tqdm

from worker.broker import BROKER_FAILURES
from worker.config import Settings
from worker.dead_letters import DeadLetter, DeadLetterError, DeadLetters, Selection, Tally
from worker.loop import run_async
from worker.output import json_line
from worker.topology import Names

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

# (title, width) of the table's columns; the last one is not padded.
_COLUMNS: Final = (
    ("#", 5),
    ("CODE", 18),
    ("ROUTING KEY", 41),
    ("ID", 25),
    ("CONTENT TYPE", 20),
    ("BYTES", 9),
    ("REASON", 41),
    ("PREVIEW", 0),
)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one operation on an event loop of its own; failures become clean CLI errors."""
    try:
        return run_async(coro)
    except DeadLetterError as exc:
        raise click.ClickException(str(exc)) from None
    except (*BROKER_FAILURES, OSError) as exc:
        raise click.ClickException(
            f"RabbitMQ failed ({type(exc).__name__}: {exc}); every dead letter not yet "
            "handled is still in the queue"
        ) from None


async def _with_dead_letters(
    settings: Settings, action: Callable[[DeadLetters], Awaitable[T]]
) -> T:
    async with DeadLetters.open(settings) as letters:
        return await action(letters)


def _changing_options(command: F) -> F:
    """What the commands that take dead letters out of the queue share."""
    command = click.option(
        "--progress/--no-progress",
        default=None,
        help="Show a progress bar on stderr (default: when stderr is a terminal).",
    )(command)
    return click.option("--yes", is_flag=True, help="Do not ask for confirmation.")(command)


def _selection_options(command: F) -> F:
    command = click.option(
        "--routing-key",
        metavar="GLOB",
        help="Only dead letters whose original routing key matches GLOB (e.g. 'cmd.8f0c*').",
    )(command)
    return click.option(
        "--code",
        "codes",
        multiple=True,
        metavar="CODE",
        help="Only dead letters with this code (x-reject-code, or RabbitMQ's x-death reason "
        "such as delivery_limit); repeat for several.",
    )(command)


def _confirm_or_skip(settings: Settings, yes: bool, question: Callable[[int], str]) -> bool:
    """False when the queue is empty (nothing to do); asks ``question(count)`` unless
    ``yes``, aborting on no. Asked outside any event loop: a person may take their time."""
    count = _run(_with_dead_letters(settings, DeadLetters.count))
    if count == 0:
        click.echo(f"no dead letters in {Names(settings.prefix).dead}")
        return False
    if not yes:
        click.confirm(question(count), abort=True)
    return True


class _ProgressBar:
    """A tqdm bar over the messages looked at, counting those taken (``Progress``)."""

    def __init__(self, verb: str, show: bool | None) -> None:
        self._verb = verb
        # tqdm's `disable=None` shows the bar only on a terminal.
        self._disable = None if show is None else not show
        self._bar: Any = None
        self._taken = 0

    def begin(self, total: int) -> None:
        self._bar = tqdm(total=total, unit="msg", desc="dead letters", disable=self._disable)

    def advance(self, taken: bool) -> None:
        if self._bar is None:
            return
        self._taken += taken
        self._bar.set_postfix({self._verb: self._taken}, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _summary(verb: str, tally: Tally, selection: Selection, queue: str) -> str:
    withheld = (
        f"; left {tally.withheld} forbidden one(s) in place, forbidden or whose publisher "
        "may not act for their plugin (replay those only with --code forbidden besides "
        "their own code, as a user who may act for their plugins):\n  " + "\n  ".join(tally.refused)
        if tally.withheld
        else ""
    )
    return (
        f"{verb} {tally.taken} of {tally.total} dead letter(s) in {queue} "
        f"(selected: {selection}); looked at {tally.scanned}{withheld}"
    )


# --------------------------------------------------------------------------- commands


@click.group()
def dead() -> None:
    """List, replay and purge the dead-letter queue (<prefix>.dead)."""


@dead.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per dead letter and line.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="Show at most N dead letters (the whole queue is still walked, to keep its order).",
)
@_selection_options
@click.pass_obj
def list_command(
    settings: Settings,
    as_json: bool,
    limit: int | None,
    codes: tuple[str, ...],
    routing_key: str | None,
) -> None:
    """Show the dead letters in queue order, leaving every one in the queue."""
    selection = Selection(frozenset(codes), routing_key)
    header_shown = False

    def show(letter: DeadLetter) -> None:
        nonlocal header_shown
        if as_json:
            click.echo(json_line(letter.as_json()))
            return
        if not header_shown:
            click.echo(_row([title for title, _ in _COLUMNS]))
            header_shown = True
        click.echo(_row(_cells(letter)))

    tally = _run(_with_dead_letters(settings, lambda d: d.list(show, selection, limit)))
    if not as_json:
        click.echo(
            f"{tally.taken} of {tally.total} dead letter(s) in {Names(settings.prefix).dead} "
            f"shown (selected: {selection})"
        )


@dead.command()
@_selection_options
@click.option("--limit", type=click.IntRange(min=1), help="Replay at most N dead letters.")
@_changing_options
@click.pass_obj
def replay(
    settings: Settings,
    codes: tuple[str, ...],
    routing_key: str | None,
    limit: int | None,
    yes: bool,
    progress: bool | None,
) -> None:
    """Republish dead letters to their original exchange and routing key, without the
    reject headers; each leaves the dead queue once its republish is confirmed."""
    selection = Selection(frozenset(codes), routing_key)
    queue = Names(settings.prefix).dead
    at_most = f"at most {limit} " if limit else ""

    def question(count: int) -> str:
        return (
            f"Replay {at_most}dead letters (selected: {selection}) of the {count} in {queue} "
            "to their original exchange?"
        )

    if not _confirm_or_skip(settings, yes, question):
        return
    bar = _ProgressBar("replayed", progress)
    try:
        tally = _run(_with_dead_letters(settings, lambda d: d.replay(selection, limit, bar)))
    finally:
        bar.close()
    click.echo(_summary("replayed", tally, selection, queue))


@dead.command()
@_selection_options
@click.option("--all", "everything", is_flag=True, help="Purge every dead letter.")
@_changing_options
@click.pass_obj
def purge(
    settings: Settings,
    codes: tuple[str, ...],
    routing_key: str | None,
    everything: bool,
    yes: bool,
    progress: bool | None,
) -> None:
    """Delete the selected dead letters for good (--code / --routing-key), or every one
    (--all)."""
    if everything == bool(codes or routing_key):
        raise click.UsageError("say what to purge: --code and/or --routing-key, or --all")
    selection = Selection(frozenset(codes), routing_key)
    queue = Names(settings.prefix).dead

    def question(count: int) -> str:
        return f"Delete dead letters (selected: {selection}) of the {count} in {queue} for good?"

    if not _confirm_or_skip(settings, yes, question):
        return
    bar = _ProgressBar("purged", progress)
    try:
        tally = _run(_with_dead_letters(settings, lambda d: d.purge(selection, bar)))
    finally:
        bar.close()
    click.echo(_summary("purged", tally, selection, queue))


def register(main: click.Group) -> None:
    """Add the ``dead`` group to the console command."""
    main.add_command(dead)


# --------------------------------------------------------------------------- table


def _cells(letter: DeadLetter) -> list[str]:
    return [
        str(letter.index),
        letter.code,
        letter.routing_key,
        letter.message_id or letter.correlation_id or "-",
        letter.content_type or "-",
        str(letter.body_size),
        letter.reason,
        letter.preview,
    ]


def _row(cells: list[str]) -> str:
    out = []
    for text, (_, width) in zip(cells, _COLUMNS, strict=True):
        if width == 0:
            out.append(text)
            continue
        room = width - 1  # one space between columns
        cut = text if len(text) <= room else text[: room - 1] + "…"
        out.append(cut.ljust(width))
    return "".join(out).rstrip()
