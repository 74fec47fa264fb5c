"""The README stays true: every setting is documented, and the quick start is what CI runs."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import click

from worker.cli import main
from worker.config import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_in_the_readme_configuration_table() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [
        ENV_PREFIX + f.name.upper()
        for f in dataclasses.fields(Settings)
        if f"`{ENV_PREFIX}{f.name.upper()}`" not in readme
    ]
    assert missing == []


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make run" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


# ------------------------------------------------------- numbers and commands from the code


TIMES = "\N{MULTIPLICATION SIGN}"


def _spaced(number: int) -> str:
    """2000 as docs/performance.md writes it: 2 000."""
    return f"{number:,}".replace(",", " ")


def test_deploy_readme_gives_the_pool_and_prefetch_the_code_uses() -> None:
    deploy = " ".join((ROOT / "deploy" / "README.md").read_text().split())
    defaults = Settings()
    pool = defaults.db_pool_size
    assert f"`PLUGIN_STATE_DB_POOL_SIZE` ({pool})" in deploy
    assert f"`maxReplicaCount {TIMES} {pool}`" in deploy
    prefetch = (
        f"({defaults.apply_concurrency} + 1) {TIMES} {defaults.batch_size} "
        f"= {defaults.effective_prefetch})"
    )
    assert prefetch in deploy


def test_performance_doc_gives_the_prefetch_the_code_uses() -> None:
    performance = (ROOT / "docs" / "performance.md").read_text()
    prefetch = Settings().effective_prefetch
    assert f"the worker's prefetch ({_spaced(prefetch)})" in performance


def _command_rows() -> list[tuple[list[str], set[str]]]:
    """The README's command table: (the command path, the flags the row names)."""
    readme = (ROOT / "README.md").read_text()
    rows = []
    for line in readme.splitlines():
        match = re.match(r"\| `plugin-state-worker ([^`]*)` \|", line)
        if match is None:
            continue
        words = [w for w in match.group(1).split() if re.fullmatch(r"[a-z|\\]+", w)]
        rows.append((words, set(re.findall(r"--[a-z][a-z-]*", match.group(1)))))
    return rows


def _commands_named(words: list[str]) -> list[click.Command]:
    """``get\\|set`` names two commands; ``dead list`` one, below the ``dead`` group."""
    found: list[click.Command] = [main]
    for word in words:
        inner = [
            group.commands[name]
            for group in found
            if isinstance(group, click.Group)
            for name in word.replace("\\", "").split("|")
            if name in group.commands
        ]
        if not inner:
            break
        found = inner
    return found


def test_every_flag_of_the_readme_command_table_exists() -> None:
    rows = _command_rows()
    assert len(rows) >= 10
    for words, flags in rows:
        commands = _commands_named(words)
        assert main not in commands, words
        for command in commands:
            known = {
                opt for param in command.params for opt in [*param.opts, *param.secondary_opts]
            }
            assert flags <= known, (command.name, flags - known)
