"""The examples under examples/ run as written, against a running worker, and the README
quotes them whole: what a newcomer copies is what CI ran."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from worker.config import Settings

from .cli import clean_env
from .conftest import StartWorker
from .helpers import state_of, wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


async def _run(*argv: str, settings: Settings, cwd: Path = ROOT) -> str:
    env = clean_env(PLUGIN_STATE_AMQP_URL=settings.amqp_url, PLUGIN_STATE_PREFIX=settings.prefix)
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return out.decode()


def _python(name: str) -> str:
    return str(EXAMPLES / "python" / name)


def example_files() -> list[Path]:
    return sorted(
        path
        for path in EXAMPLES.rglob("*")
        if path.suffix in (".py", ".js") and "node_modules" not in path.parts
    )


@pytest.mark.parametrize("path", example_files(), ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_the_readme_quotes_every_example_whole(path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    assert path.read_text().strip() in readme, f"{path} is not quoted in README.md"


async def test_the_python_quickstart_prints_what_it_listed(
    start_worker: StartWorker, settings: Settings, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    out = await _run(
        sys.executable,
        str(EXAMPLES / "python" / "quickstart.py"),
        str(plugin_id),
        settings=settings,
    )
    assert out == "cursor {'page': 3}\nseen True\n"


async def test_the_python_conditions_example_counts_and_claims(
    start_worker: StartWorker, settings: Settings, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    out = await _run(
        sys.executable,
        str(EXAMPLES / "python" / "conditions.py"),
        str(plugin_id),
        settings=settings,
    )
    assert out == "retries 3\nworker-b lost the claim to worker-a\n"


async def test_the_python_cache_example_reads_its_writes_through_the_cache(
    start_worker: StartWorker, settings: Settings, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    out = await _run(
        sys.executable, str(EXAMPLES / "python" / "cache.py"), str(plugin_id), settings=settings
    )
    assert out == (
        "settings {'theme': 'dark'}\nafter a write {'theme': 'light'}\nfresh {'theme': 'light'}\n"
    )


async def test_the_node_example_publishes_a_write_the_worker_applies(
    start_worker: StartWorker,
    settings: Settings,
    plugin_id: uuid.UUID,
    db: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node is not installed")
    for name in ("package.json", "set.js"):
        shutil.copy(EXAMPLES / "node" / name, tmp_path / name)
    await _run(
        npm, "install", "--no-audit", "--no-fund", "--silent", settings=settings, cwd=tmp_path
    )
    await start_worker()
    out = await _run(node, "set.js", str(plugin_id), settings=settings, cwd=tmp_path)
    write_id = uuid.UUID(out.strip())
    assert write_id.version == 7

    async def applied() -> bool:
        return (await state_of(db, plugin_id)).get(("instance", None, "default", "token")) == "abc"

    await wait_until(applied, what="the Node example's write to be applied")


async def test_the_python_watch_example_sees_the_entry_then_its_change(
    start_worker: StartWorker, settings: Settings, plugin_id: uuid.UUID
) -> None:
    await start_worker()
    out = await _run(sys.executable, _python("watch.py"), str(plugin_id), settings=settings)
    assert out == "status open\nstatus closed\n"
