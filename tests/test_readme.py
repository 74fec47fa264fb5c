"""The README stays true: every setting is documented, and the quick start is what CI runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

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
