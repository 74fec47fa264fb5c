-- Every statement the worker runs, by name. `worker/store.py` loads this file and calls
-- each one; batches travel as arrays through unnest, one round trip per statement.

-- name: server_version_num
SELECT current_setting('server_version_num')::int;

-- name: ping
SELECT 1;

-- name: plugin_owners
-- Which of these plugin ids are registered, and the RabbitMQ user each belongs to.
SELECT id, amqp_user FROM plugins WHERE id = ANY($1::uuid[]);

-- name: plugin_usage
-- Entries and stored bytes (of the values' JSON text) per plugin, for quotas.
SELECT plugin_id, count(*) AS entries, coalesce(sum(octet_length(value_json::text)), 0) AS bytes
FROM plugin_state
WHERE plugin_id = ANY($1::uuid[])
GROUP BY plugin_id;

-- name: claim_versions
-- Last-writer-wins, decided per entry in the version register. The upsert locks each
-- entry's register row, so concurrent writers of one entry queue behind each other and
-- then see the newest version. Rows are inserted in key order so that two batches lock
-- their common entries in the same order and cannot deadlock. Returns the entries whose
-- write won (the caller sends each entry at most once).
INSERT INTO plugin_state_versions AS v
    (plugin_id, scope_kind, scope_id, namespace, state_key, version, deleted)
SELECT t.plugin_id, t.scope_kind, t.scope_id, t.namespace, t.state_key, t.version, t.deleted
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::uuid[], $7::bool[])
    AS t (plugin_id, scope_kind, scope_id, namespace, state_key, version, deleted)
ORDER BY t.plugin_id, t.scope_kind, t.scope_id, t.namespace, t.state_key
ON CONFLICT ON CONSTRAINT plugin_state_versions_entry_idx DO UPDATE
    SET version = EXCLUDED.version, deleted = EXCLUDED.deleted, changed_at = now()
    WHERE v.version < EXCLUDED.version
RETURNING v.plugin_id, v.scope_kind, v.scope_id, v.namespace, v.state_key;

-- name: apply_values
-- Runs after claim_versions in the same transaction, as a statement of its own so that its
-- snapshot includes every write committed before our register locks were granted.
-- $1..$7 are the winning sets, $8..$12 the winning deletes. Deletes are split by whether
-- scope_id is null, because `=` never matches null and `IS NOT DISTINCT FROM` cannot use
-- the unique index.
WITH upserted AS (
    INSERT INTO plugin_state AS s
        (plugin_id, scope_kind, scope_id, namespace, state_key, value_json, version, updated_at)
    SELECT t.plugin_id, t.scope_kind, t.scope_id, t.namespace, t.state_key,
           t.value_json::jsonb, t.version, now()
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                $7::uuid[])
        AS t (plugin_id, scope_kind, scope_id, namespace, state_key, value_json, version)
    ON CONFLICT ON CONSTRAINT plugin_state_unique_entry_idx DO UPDATE
        SET value_json = EXCLUDED.value_json,
            version = EXCLUDED.version,
            updated_at = EXCLUDED.updated_at
    RETURNING 1
), removed_scoped AS (
    DELETE FROM plugin_state AS s
    USING unnest($8::uuid[], $9::text[], $10::text[], $11::text[], $12::text[])
        AS d (plugin_id, scope_kind, scope_id, namespace, state_key)
    WHERE d.scope_id IS NOT NULL
      AND s.plugin_id = d.plugin_id AND s.scope_kind = d.scope_kind
      AND s.scope_id = d.scope_id AND s.namespace = d.namespace
      AND s.state_key = d.state_key
    RETURNING 1
), removed_instance AS (
    DELETE FROM plugin_state AS s
    USING unnest($8::uuid[], $9::text[], $10::text[], $11::text[], $12::text[])
        AS d (plugin_id, scope_kind, scope_id, namespace, state_key)
    WHERE d.scope_id IS NULL AND s.scope_id IS NULL
      AND s.plugin_id = d.plugin_id AND s.scope_kind = d.scope_kind
      AND s.namespace = d.namespace AND s.state_key = d.state_key
    RETURNING 1
)
SELECT (SELECT count(*) FROM upserted) AS upserted,
       (SELECT count(*) FROM removed_scoped) + (SELECT count(*) FROM removed_instance)
           AS removed,
       -- Wakes read-your-writes waiters of every worker (delivered at commit).
       pg_notify('plugin_state_commits', '') AS notified;

-- name: lookup_entries
-- The values of many entries in one round trip, one row per requested entry (n is its
-- 1-based position). `ready` is false while the write named by `after` (or a newer one)
-- has not reached the entry's version register yet. Each lookup is split on whether
-- scope_id is null so that both arms use the unique index.
SELECT w.n, s.value_json, s.version, s.updated_at,
       coalesce(w.after IS NULL OR v.version >= w.after, false) AS ready
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::uuid[])
    WITH ORDINALITY AS w (plugin_id, scope_kind, scope_id, namespace, state_key, after, n)
LEFT JOIN LATERAL (
    SELECT s.value_json, s.version, s.updated_at FROM plugin_state s
    WHERE w.scope_id IS NOT NULL
      AND s.plugin_id = w.plugin_id AND s.scope_kind = w.scope_kind
      AND s.scope_id = w.scope_id AND s.namespace = w.namespace AND s.state_key = w.state_key
    UNION ALL
    SELECT s.value_json, s.version, s.updated_at FROM plugin_state s
    WHERE w.scope_id IS NULL AND s.scope_id IS NULL
      AND s.plugin_id = w.plugin_id AND s.scope_kind = w.scope_kind
      AND s.namespace = w.namespace AND s.state_key = w.state_key
) s ON true
LEFT JOIN LATERAL (
    SELECT v.version FROM plugin_state_versions v
    WHERE w.after IS NOT NULL AND w.scope_id IS NOT NULL
      AND v.plugin_id = w.plugin_id AND v.scope_kind = w.scope_kind
      AND v.scope_id = w.scope_id AND v.namespace = w.namespace AND v.state_key = w.state_key
    UNION ALL
    SELECT v.version FROM plugin_state_versions v
    WHERE w.after IS NOT NULL AND w.scope_id IS NULL AND v.scope_id IS NULL
      AND v.plugin_id = w.plugin_id AND v.scope_kind = w.scope_kind
      AND v.namespace = w.namespace AND v.state_key = w.state_key
) v ON true
ORDER BY w.n;

-- name: list_first_page
-- A plugin's entries in (scope_kind, scope_id, namespace, key) order, optionally filtered;
-- $6 is the page size plus one (the extra row tells whether another page follows).
SELECT scope_kind, scope_id, namespace, state_key, value_json, version, updated_at
FROM plugin_state
WHERE plugin_id = $1
  AND ($2::text IS NULL OR scope_kind = $2)
  AND ($3::text IS NULL OR scope_id = $3)
  AND ($4::text IS NULL OR namespace = $4)
  AND starts_with(state_key, $5)
ORDER BY scope_kind, coalesce(scope_id, ''), namespace, state_key
LIMIT $6;

-- name: list_next_page
-- As list_first_page, after the cursor ($7..$10, the last entry of the previous page):
-- keyset paging, so entries added or removed between pages never shift the others.
SELECT scope_kind, scope_id, namespace, state_key, value_json, version, updated_at
FROM plugin_state
WHERE plugin_id = $1
  AND ($2::text IS NULL OR scope_kind = $2)
  AND ($3::text IS NULL OR scope_id = $3)
  AND ($4::text IS NULL OR namespace = $4)
  AND starts_with(state_key, $5)
  AND (scope_kind, coalesce(scope_id, ''), namespace, state_key) > ($7, $8, $9, $10)
ORDER BY scope_kind, coalesce(scope_id, ''), namespace, state_key
LIMIT $6;

-- name: purge_tombstones
-- Removes up to $2 tombstones whose version is older than $1. SKIP LOCKED: a tombstone a
-- writer holds is left for the next round, so the purge never waits on (or deadlocks
-- with) the write path.
DELETE FROM plugin_state_versions
WHERE ctid IN (
    SELECT ctid FROM plugin_state_versions
    WHERE deleted AND version < $1::uuid
    ORDER BY version
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
AND deleted AND version < $1::uuid;

-- name: try_lock
-- A transaction-scoped advisory lock: one worker at a time runs a housekeeping job.
SELECT pg_try_advisory_xact_lock($1::int, $2::int);

-- name: add_plugin
INSERT INTO plugins (id, plugin_key, amqp_user)
VALUES (coalesce($1::uuid, gen_random_uuid()), $2, $3)
RETURNING id, plugin_key, amqp_user, created_at, updated_at;

-- name: list_plugins
SELECT p.id, p.plugin_key, p.amqp_user, p.created_at, p.updated_at,
       (SELECT count(*) FROM plugin_state s WHERE s.plugin_id = p.id) AS entries
FROM plugins p
ORDER BY p.plugin_key;

-- name: find_plugin
-- By id ($2, when what the operator typed is a UUID) or by key ($1); an id match wins
-- over a key that happens to spell another plugin's id.
SELECT id, plugin_key, amqp_user FROM plugins
WHERE plugin_key = $1 OR id = $2::uuid
ORDER BY id = $2::uuid DESC NULLS LAST
LIMIT 1;

-- name: lock_plugin
-- Held until the removal commits, so no write can add state between count and delete.
SELECT id FROM plugins WHERE id = $1 FOR UPDATE;

-- name: count_plugin_entries
SELECT count(*) FROM plugin_state WHERE plugin_id = $1;

-- name: remove_plugin
-- ON DELETE CASCADE removes the plugin's state and its version register.
DELETE FROM plugins WHERE id = $1;

-- name: create_migration_history
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- name: applied_migrations
SELECT version, name, checksum FROM schema_migrations;

-- name: record_migration
INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3);

-- name: lock
-- A session-scoped advisory lock, for a job that spans several transactions (migrate).
SELECT pg_advisory_lock($1::int, $2::int);

-- name: unlock
SELECT pg_advisory_unlock($1::int, $2::int);

-- name: quote_ident
SELECT quote_ident($1);
