"""The import contracts of pyproject.toml (checked by ``lint-imports`` in ``make lint``) name
every module of the server side, so a new module cannot slip past them unlisted."""

from __future__ import annotations

import pkgutil
import tomllib
from pathlib import Path
from typing import Any

import pytest

import worker

ROOT = Path(__file__).resolve().parent.parent


def contracts() -> dict[str, dict[str, Any]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {c["id"]: c for c in config["tool"]["importlinter"]["contracts"]}


def worker_modules() -> set[str]:
    return {f"worker.{module.name}" for module in pkgutil.iter_modules(worker.__path__)}


@pytest.mark.parametrize(
    ("contract", "allowed"),
    [("client-alone", {"worker.client"}), ("config-bottom", {"worker.config"})],
)
def test_a_contract_forbids_every_other_module_of_the_worker(
    contract: str, allowed: set[str]
) -> None:
    forbidden = set(contracts()[contract]["forbidden_modules"])
    assert forbidden == worker_modules() - allowed


def test_nothing_of_the_worker_may_import_its_console_command() -> None:
    cli = contracts()["cli-top"]
    assert cli["forbidden_modules"] == ["worker.cli"]
    assert set(cli["source_modules"]) == worker_modules() - {"worker.cli"}


def test_the_contract_package_may_import_nothing_of_the_worker() -> None:
    assert contracts()["contract-alone"]["forbidden_modules"] == ["worker"]
