"""The hot statements' plans at a size where a sequential scan would lose: every read, the
write transaction's reads, the retention, all served by an index. Plans are generic (the
statement's own, whatever its parameters), as a worker runs them once a prepared statement
has been used a few times."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from schemas.messages import ListRequest
from worker.reads import LIST_SCAN, list_bounds
from worker.store import QUERIES

from .helpers import uuid7

SCOPES = 300
KEYS = 100


@pytest.fixture(scope="module")
async def big(database_url: str) -> AsyncIterator[tuple[asyncpg.Connection, uuid.UUID]]:
    """Two plugins of 30,000 entries each (a tenth of them tombstones), analyzed."""
    conn = await asyncpg.connect(database_url)
    plugins = [uuid.uuid4(), uuid.uuid4()]
    for plugin in plugins:
        await conn.execute(
            "INSERT INTO plugins (id, plugin_key) VALUES ($1, $2)", plugin, str(plugin)
        )
        await conn.execute(
            """
            INSERT INTO plugin_state (plugin_id, scope_kind, scope_id, namespace, state_key,
                                      value_json, version, value_bytes)
            SELECT $1, CASE WHEN s % 2 = 0 THEN 'issue' ELSE 'project' END, 'S' || s,
                   'default', 'key-' || k, to_jsonb(k), $2, 1
            FROM generate_series(1, $3) s, generate_series(1, $4) k
            """,
            plugin,
            uuid7(),
            SCOPES,
            KEYS,
        )
        await conn.execute(
            """
            INSERT INTO plugin_state_versions (plugin_id, scope_kind, scope_id, namespace,
                                               state_key, version, deleted, deleted_at)
            SELECT plugin_id, scope_kind, scope_id, namespace, state_key, version,
                   random() < 0.1, CASE WHEN random() < 0.1 THEN now() END
            FROM plugin_state WHERE plugin_id = $1
            """,
            plugin,
        )
    await conn.execute("ANALYZE plugin_state")
    await conn.execute("ANALYZE plugin_state_versions")
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    yield conn, plugins[0]
    for plugin in plugins:
        await conn.execute("DELETE FROM plugins WHERE id = $1", plugin)
    await conn.close()


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


async def plan_of(conn: asyncpg.Connection, query: str, *args: Any) -> list[dict[str, Any]]:
    text = await conn.fetchval("EXPLAIN (FORMAT JSON) " + query, *args)
    return list(nodes(json.loads(text)[0]["Plan"]))


def scans(plan: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Relation -> how it is scanned."""
    found: dict[str, set[str]] = {}
    for node in plan:
        if "Relation Name" in node:
            found.setdefault(node["Relation Name"], set()).add(node["Node Type"])
    return found


BIG_TABLES = ("plugin_state", "plugin_state_versions")


def assert_indexed(plan: list[dict[str, Any]]) -> None:
    """Neither large table is read sequentially (small ones may be, as they should)."""
    for relation, how in scans(plan).items():
        if relation in BIG_TABLES:
            assert "Seq Scan" not in how, f"{relation} is scanned sequentially: {how}"


LIST_FILTERS = {
    "one scope": {"scope_kind": "issue", "scope_id": "S42"},
    "one scope, namespace and key prefix": {
        "scope_kind": "issue",
        "scope_id": "S42",
        "namespace": "default",
        "prefix": "key-1",
    },
    "a scope kind": {"scope_kind": "project"},
    "everything": {},
}
SPARSE_FILTERS = {
    "a scope id without its kind": {"scope_id": "S299"},
    "a namespace only": {"namespace": "elsewhere"},
    "a key prefix only": {"prefix": "key-100"},
}


def list_args(plugin: uuid.UUID, filters: dict[str, str], page: str, limit: int = 100) -> list[Any]:
    """A list statement's parameters, as the worker passes them (the first page, or the
    page after a cursor within the filters' range)."""
    request = ListRequest(plugin_id=plugin, **filters)  # type: ignore[arg-type]
    bounds = list_bounds(request)
    start = bounds.lower
    if page == "list_next_page":
        start = max(start, ("issue", "S42", "default", "key-5"))
    return [
        plugin,
        *start,
        *bounds.upper,
        bounds.scope_kind,
        bounds.scope_id,
        bounds.namespace,
        bounds.prefix,
        limit + 1,
        8 << 20,
        200,
        LIST_SCAN,
    ]


@pytest.mark.parametrize(
    "filters",
    [*LIST_FILTERS.values(), *SPARSE_FILTERS.values()],
    ids=[*LIST_FILTERS.keys(), *SPARSE_FILTERS.keys()],
)
@pytest.mark.parametrize("page", ["list_first_page", "list_next_page"])
async def test_every_list_page_is_an_index_range(
    big: tuple[asyncpg.Connection, uuid.UUID], filters: dict[str, str], page: str
) -> None:
    conn, plugin = big
    plan = await plan_of(conn, QUERIES[page], *list_args(plugin, filters, page))
    assert_indexed(plan)
    used = {n.get("Index Name") for n in plan}
    assert "plugin_state_list_order_idx" in used, used
    # The index hands the rows in list order: nothing large to sort. For a range the
    # planner expects to be small (one scope here, a hundred entries) it may fetch the range
    # through a bitmap and sort it, depending on the table's statistics (which the other
    # tests' rows change); never a sort of more than one page's scan window.
    sorted_rows = [n["Plan Rows"] for n in plan if n["Node Type"] == "Sort"]
    assert all(rows <= LIST_SCAN for rows in sorted_rows), sorted_rows


async def rows_read(conn: asyncpg.Connection, page: str, args: list[Any]) -> tuple[int, int]:
    """How many rows of the list index a page read (its index scan's actual rows), and how
    many rows the statement answered, under the statement's generic plan (a worker's, once
    the prepared statement has been used a few times)."""
    await conn.execute(f"PREPARE {page} AS {QUERIES[page]}")
    try:
        literals = [
            await conn.fetchval("SELECT quote_nullable($1::text)", None if a is None else str(a))
            for a in args
        ]
        text = await conn.fetchval(
            f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {page}({', '.join(literals)})"
        )
    finally:
        await conn.execute(f"DEALLOCATE {page}")
    plan = list(nodes(json.loads(text)[0]["Plan"]))
    (scan,) = [n for n in plan if n.get("Index Name") == "plugin_state_list_order_idx"]
    assert not any(n["Node Type"] == "Sort" for n in plan)
    return scan["Actual Rows"] * scan["Actual Loops"], plan[0]["Actual Rows"]


@pytest.mark.parametrize("filters", LIST_FILTERS.values(), ids=LIST_FILTERS.keys())
@pytest.mark.parametrize("page", ["list_first_page", "list_next_page"])
async def test_a_page_whose_filters_lead_the_index_reads_its_own_rows_only(
    big: tuple[asyncpg.Connection, uuid.UUID], filters: dict[str, str], page: str
) -> None:
    conn, plugin = big
    read, answered = await rows_read(conn, page, list_args(plugin, filters, page, limit=100))
    assert answered <= 101
    # The page and the row telling whether another follows (and the one or two the window
    # functions look ahead): the scan window is not read on.
    assert read <= 101 + 2, read


@pytest.mark.parametrize("filters", SPARSE_FILTERS.values(), ids=SPARSE_FILTERS.keys())
@pytest.mark.parametrize("page", ["list_first_page", "list_next_page"])
async def test_a_page_whose_filters_match_little_reads_at_most_the_scan_window(
    big: tuple[asyncpg.Connection, uuid.UUID], filters: dict[str, str], page: str
) -> None:
    conn, plugin = big
    read, _ = await rows_read(conn, page, list_args(plugin, filters, page, limit=100))
    assert read == LIST_SCAN


async def test_a_burst_of_lookups_probes_the_unique_indexes(
    big: tuple[asyncpg.Connection, uuid.UUID],
) -> None:
    conn, plugin = big
    n = 50
    plan = await plan_of(
        conn,
        QUERIES["lookup_entries"],
        [plugin] * n,
        ["issue"] * n,
        [f"S{2 * i}" for i in range(n)],
        ["default"] * n,
        [f"key-{i}" for i in range(n)],
        [True] * n,
        8 << 20,
    )
    assert_indexed(plan)


async def test_a_write_transaction_reads_its_entries_by_index(
    big: tuple[asyncpg.Connection, uuid.UUID],
) -> None:
    conn, plugin = big
    n = 50
    plan = await plan_of(
        conn,
        QUERIES["read_entries"],
        [plugin] * n,
        ["issue"] * n,
        [f"S{2 * i}" for i in range(n)],
        ["default"] * n,
        [f"key-{i}" for i in range(n)],
    )
    assert_indexed(plan)


async def test_the_sweeper_finds_expired_entries_through_the_expiry_index(
    big: tuple[asyncpg.Connection, uuid.UUID],
) -> None:
    conn, plugin = big
    # One entry in a hundred expiring, some of them expired: the sweeper's statements must
    # go straight to those through the partial expiry index, whatever the table's size.
    # In a transaction rolled back, so the other tests' data and statistics stay as they are.
    trial = conn.transaction()
    await trial.start()
    try:
        await conn.execute(
            """
            UPDATE plugin_state SET expires_at = now() + (random() - 0.5) * interval '1 hour'
            WHERE plugin_id = $1 AND state_key = 'key-7'
            """,
            plugin,
        )
        await conn.execute("ANALYZE plugin_state")
        candidates = await plan_of(conn, QUERIES["expired_plugins"], 1000)
        sweep = await plan_of(conn, QUERIES["sweep_expired"], 1000, [plugin], True)
    finally:
        await trial.rollback()
    for plan in (candidates, sweep):
        assert_indexed(plan)
        assert "plugin_state_expiry_idx" in {n.get("Index Name") for n in plan}


async def test_retention_finds_old_tombstones_through_their_index(
    big: tuple[asyncpg.Connection, uuid.UUID],
) -> None:
    conn, plugin = big
    candidates = await plan_of(conn, QUERIES["old_tombstone_plugins"], 60.0, 5000)
    assert_indexed(candidates)
    assert "plugin_state_versions_tombstones_idx" in {n.get("Index Name") for n in candidates}
    purge = await plan_of(conn, QUERIES["purge_tombstones"], 60.0, 5000, [plugin])
    assert_indexed(purge)
