-- Every statement the worker runs, by name. `worker/store.py` loads this file and calls
-- each one; batches travel as arrays through unnest, one round trip per statement.

-- name: server_version_num
SELECT current_setting('server_version_num')::int;

-- name: ping
SELECT 1;

-- name: plugin_owners
-- Which of these plugin ids are registered, and the RabbitMQ user each belongs to.
SELECT id, amqp_user FROM plugins WHERE id = ANY($1::uuid[]);

-- name: lock_plugins
-- The first statement of every write transaction: lock each plugin's counters row, in plugin
-- order (so two transactions can never wait for each other in a cycle), and read its usage
-- and the database's clock. Every writer of a plugin's entries takes this lock first, so
-- until commit nobody else changes them: the next statement, with a snapshot of its own
-- taken after the lock was granted, reads exactly the state the writes meet. (It must be a
-- statement of its own: a snapshot taken before waiting for the lock would miss what the
-- transaction we waited for committed.) A plugin without a row is not registered.
SELECT plugin_id, entries, bytes, tombstones, head,
       (extract(epoch FROM statement_timestamp()) * 1000)::bigint AS now_ms
FROM plugin_counters
WHERE plugin_id = ANY($1::uuid[])
ORDER BY plugin_id
FOR UPDATE;

-- name: read_entries
-- What the version register holds for each entry (n is its 1-based position), read after
-- lock_plugins. Entries without a register row are left out. Rows written before
-- value_bytes existed are measured from their value. Each lookup is split on whether scope_id
-- is null so that both arms use the unique index (`=` never matches null).
SELECT w.n, v.version, v.deleted,
       CASE WHEN v.deleted THEN 0 ELSE coalesce(v.value_bytes, legacy.value_bytes, 0) END
           AS value_bytes,
       (extract(epoch FROM v.expires_at) * 1000)::bigint AS expires_at_ms
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[])
    WITH ORDINALITY AS w (plugin_id, scope_kind, scope_id, namespace, state_key, n)
JOIN LATERAL (
    SELECT v.version, v.deleted, v.value_bytes, v.expires_at FROM plugin_state_versions v
    WHERE w.scope_id IS NOT NULL
      AND v.plugin_id = w.plugin_id AND v.scope_kind = w.scope_kind
      AND v.scope_id = w.scope_id AND v.namespace = w.namespace AND v.state_key = w.state_key
    UNION ALL
    SELECT v.version, v.deleted, v.value_bytes, v.expires_at FROM plugin_state_versions v
    WHERE w.scope_id IS NULL AND v.scope_id IS NULL
      AND v.plugin_id = w.plugin_id AND v.scope_kind = w.scope_kind
      AND v.namespace = w.namespace AND v.state_key = w.state_key
) v ON true
LEFT JOIN LATERAL (
    SELECT octet_length(s.value_json::text) AS value_bytes FROM plugin_state s
    WHERE v.value_bytes IS NULL AND NOT v.deleted AND w.scope_id IS NOT NULL
      AND s.plugin_id = w.plugin_id AND s.scope_kind = w.scope_kind
      AND s.scope_id = w.scope_id AND s.namespace = w.namespace AND s.state_key = w.state_key
    UNION ALL
    SELECT octet_length(s.value_json::text) FROM plugin_state s
    WHERE v.value_bytes IS NULL AND NOT v.deleted AND w.scope_id IS NULL AND s.scope_id IS NULL
      AND s.plugin_id = w.plugin_id AND s.scope_kind = w.scope_kind
      AND s.namespace = w.namespace AND s.state_key = w.state_key
) legacy ON true;

-- name: applied_conditional_writes
-- Which of these conditional writes ($1 ids, $2 their plugins) were applied before.
SELECT c.id FROM plugin_state_conditional_writes c
JOIN unnest($1::uuid[], $2::uuid[]) AS w (id, plugin_id)
    ON c.id = w.id AND c.plugin_id = w.plugin_id;

-- name: record_conditional_writes
-- The conditional writes this transaction applied ($1 ids, $2 their plugins).
INSERT INTO plugin_state_conditional_writes (id, plugin_id)
SELECT * FROM unnest($1::uuid[], $2::uuid[])
ON CONFLICT DO NOTHING;

-- name: purge_conditional_writes
-- Conditional writes older than the cut-off ($1 seconds, by the database's clock): a
-- redelivery that old is refused as stale before it could be mistaken for a fresh write.
DELETE FROM plugin_state_conditional_writes
WHERE id < (lpad(to_hex((extract(epoch FROM statement_timestamp()
                                     - make_interval(secs => $1::double precision))
                         * 1000)::bigint), 12, '0') || '70008000000000000000')::uuid;

-- name: write_entries
-- The last statement of a write transaction: the entry writes that won (decided under the
-- plugin locks, each entry once), in one round trip. $1..$11 are the entries: key, version,
-- whether it is a delete, the value's JSON text (null for a delete), its size, when it
-- expires (Unix ms, or null) and its position in its plugin's order; $12..$16 each plugin's
-- change of usage and its new head. Every part is a data-modifying CTE of this one
-- statement, so all of it runs; the counts let the caller check that nothing was skipped.
WITH versions AS (
    INSERT INTO plugin_state_versions AS v
        (plugin_id, scope_kind, scope_id, namespace, state_key, version, deleted,
         value_bytes, deleted_at, changed_at, expires_at, expired, position)
    SELECT t.plugin_id, t.scope_kind, t.scope_id, t.namespace, t.state_key, t.version,
           t.deleted, CASE WHEN t.deleted THEN NULL ELSE t.value_bytes END,
           CASE WHEN t.deleted THEN now() END, now(),
           to_timestamp(t.expires_at_ms / 1000.0), false, t.position
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::uuid[],
                $7::bool[], $9::int[], $10::bigint[], $11::bigint[])
        AS t (plugin_id, scope_kind, scope_id, namespace, state_key, version, deleted,
              value_bytes, expires_at_ms, position)
    ON CONFLICT ON CONSTRAINT plugin_state_versions_entry_idx DO UPDATE
        SET version = EXCLUDED.version, deleted = EXCLUDED.deleted,
            value_bytes = EXCLUDED.value_bytes, deleted_at = EXCLUDED.deleted_at,
            changed_at = EXCLUDED.changed_at, expires_at = EXCLUDED.expires_at,
            expired = false, position = EXCLUDED.position
        WHERE v.version < EXCLUDED.version
    RETURNING 1
), upserted AS (
    INSERT INTO plugin_state AS s
        (plugin_id, scope_kind, scope_id, namespace, state_key, value_json, version,
         updated_at, value_bytes, expires_at)
    SELECT t.plugin_id, t.scope_kind, t.scope_id, t.namespace, t.state_key,
           t.value_json::jsonb, t.version, now(), t.value_bytes,
           to_timestamp(t.expires_at_ms / 1000.0)
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::uuid[],
                $7::bool[], $8::text[], $9::int[], $10::bigint[])
        AS t (plugin_id, scope_kind, scope_id, namespace, state_key, version, deleted,
              value_json, value_bytes, expires_at_ms)
    WHERE NOT t.deleted
    ON CONFLICT ON CONSTRAINT plugin_state_unique_entry_idx DO UPDATE
        SET value_json = EXCLUDED.value_json,
            version = EXCLUDED.version,
            updated_at = EXCLUDED.updated_at,
            value_bytes = EXCLUDED.value_bytes,
            expires_at = EXCLUDED.expires_at
    RETURNING 1
), removed_scoped AS (
    DELETE FROM plugin_state AS s
    USING unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $7::bool[])
        AS d (plugin_id, scope_kind, scope_id, namespace, state_key, deleted)
    WHERE d.deleted AND d.scope_id IS NOT NULL
      AND s.plugin_id = d.plugin_id AND s.scope_kind = d.scope_kind
      AND s.scope_id = d.scope_id AND s.namespace = d.namespace
      AND s.state_key = d.state_key
    RETURNING 1
), removed_instance AS (
    DELETE FROM plugin_state AS s
    USING unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $7::bool[])
        AS d (plugin_id, scope_kind, scope_id, namespace, state_key, deleted)
    WHERE d.deleted AND d.scope_id IS NULL AND s.scope_id IS NULL
      AND s.plugin_id = d.plugin_id AND s.scope_kind = d.scope_kind
      AND s.namespace = d.namespace AND s.state_key = d.state_key
    RETURNING 1
), counted AS (
    UPDATE plugin_counters AS c
    SET entries = c.entries + d.entries,
        bytes = c.bytes + d.bytes,
        tombstones = c.tombstones + d.tombstones,
        head = d.head
    FROM unnest($12::uuid[], $13::bigint[], $14::bigint[], $15::bigint[], $16::bigint[])
        AS d (plugin_id, entries, bytes, tombstones, head)
    WHERE c.plugin_id = d.plugin_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM versions) AS versions,
       (SELECT count(*) FROM upserted) AS upserted,
       (SELECT count(*) FROM removed_scoped) + (SELECT count(*) FROM removed_instance)
           AS removed,
       (SELECT count(*) FROM counted) AS counted;

-- name: lookup_entries
-- The values of many entries in one round trip, one row per entry (n is its 1-based
-- position; the caller sends each entry once). `register_version` is the register's
-- version of the entries flagged in $6 (those a reader waits on with `after`). Values are
-- sent while their running size stays within $7 bytes (the first always): the others come
-- with their size only, so a burst of reads of large entries never loads more than that at
-- once. Each lookup is split on whether scope_id is null so that both arms use the unique
-- index. An entry past its expires_at reads as missing at once, whether or not the sweeper
-- has removed its row yet.
WITH found AS (
    SELECT w.n, s.value_json, s.version, s.updated_at, s.value_bytes, s.expires_at,
           v.version AS register_version
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bool[])
        WITH ORDINALITY AS w (plugin_id, scope_kind, scope_id, namespace, state_key,
                              wants_version, n)
    LEFT JOIN LATERAL (
        SELECT s.value_json, s.version, s.updated_at,
               coalesce(s.value_bytes, octet_length(s.value_json::text)) AS value_bytes,
               s.expires_at
        FROM plugin_state s
        WHERE w.scope_id IS NOT NULL
          AND (s.expires_at IS NULL OR s.expires_at > statement_timestamp())
          AND s.plugin_id = w.plugin_id AND s.scope_kind = w.scope_kind
          AND s.scope_id = w.scope_id AND s.namespace = w.namespace
          AND s.state_key = w.state_key
        UNION ALL
        SELECT s.value_json, s.version, s.updated_at,
               coalesce(s.value_bytes, octet_length(s.value_json::text)), s.expires_at
        FROM plugin_state s
        WHERE w.scope_id IS NULL AND s.scope_id IS NULL
          AND (s.expires_at IS NULL OR s.expires_at > statement_timestamp())
          AND s.plugin_id = w.plugin_id AND s.scope_kind = w.scope_kind
          AND s.namespace = w.namespace AND s.state_key = w.state_key
    ) s ON true
    LEFT JOIN LATERAL (
        SELECT v.version FROM plugin_state_versions v
        WHERE w.wants_version AND w.scope_id IS NOT NULL
          AND v.plugin_id = w.plugin_id AND v.scope_kind = w.scope_kind
          AND v.scope_id = w.scope_id AND v.namespace = w.namespace
          AND v.state_key = w.state_key
        UNION ALL
        SELECT v.version FROM plugin_state_versions v
        WHERE w.wants_version AND w.scope_id IS NULL AND v.scope_id IS NULL
          AND v.plugin_id = w.plugin_id AND v.scope_kind = w.scope_kind
          AND v.namespace = w.namespace AND v.state_key = w.state_key
    ) v ON true
)
SELECT n, version, updated_at, value_bytes, expires_at, register_version,
       CASE WHEN n = 1 OR sum(coalesce(value_bytes, 0)) OVER (ORDER BY n) <= $7
            THEN value_json END AS value_json
FROM found
ORDER BY n;

-- name: list_first_page
-- A plugin's entries in (scope_kind, scope_id, namespace, key) byte order, between the
-- bounds $2..$5 (inclusive) and $6..$9 (exclusive) that the filters make, which the list
-- index serves as one range (the rows come in its order: no sort, and the scan stops at the
-- limit); $10..$13 are the filters themselves (null: none), for filters the range cannot
-- express. At most $14 rows (the page size plus one: the extra row tells whether another
-- page follows). A row's value is sent only while the page's running size (each value's
-- bound on its rendering, value_bytes, plus its names and $16 bytes of framing) stays
-- within $15 bytes; `within` says which rows fit, the first always does.
SELECT scope_kind, scope_id, namespace, state_key, version, updated_at, expires_at,
       CASE WHEN row_number() OVER w = 1 OR sum(
                coalesce(value_bytes, octet_length(value_json::text)) + octet_length(state_key)
                + octet_length(namespace) + octet_length(coalesce(scope_id, '')) + $16::int
            ) OVER w <= $15::bigint
            THEN value_json END AS value_json,
       row_number() OVER w = 1 OR sum(
           coalesce(value_bytes, octet_length(value_json::text)) + octet_length(state_key)
           + octet_length(namespace) + octet_length(coalesce(scope_id, '')) + $16::int
       ) OVER w <= $15::bigint AS within
FROM plugin_state
WHERE plugin_id = $1
  AND (scope_kind COLLATE "C", coalesce(scope_id, '') COLLATE "C",
       namespace COLLATE "C", state_key COLLATE "C") >= ($2, $3, $4, $5)
  AND (scope_kind COLLATE "C", coalesce(scope_id, '') COLLATE "C",
       namespace COLLATE "C", state_key COLLATE "C") < ($6, $7, $8, $9)
  AND ($10::text IS NULL OR scope_kind = $10)
  AND ($11::text IS NULL OR coalesce(scope_id, '') = $11)
  AND ($12::text IS NULL OR namespace = $12)
  AND starts_with(state_key, $13)
  AND (expires_at IS NULL OR expires_at > statement_timestamp())
WINDOW w AS (ORDER BY scope_kind COLLATE "C", coalesce(scope_id, '') COLLATE "C",
                      namespace COLLATE "C", state_key COLLATE "C"
             ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
ORDER BY scope_kind COLLATE "C", coalesce(scope_id, '') COLLATE "C",
         namespace COLLATE "C", state_key COLLATE "C"
LIMIT $14;

-- name: list_next_page
-- As list_first_page, after the cursor $2..$5 (the last entry of the previous page):
-- keyset paging, so entries added or removed between pages never shift the others.
SELECT scope_kind, scope_id, namespace, state_key, version, updated_at, expires_at,
       CASE WHEN row_number() OVER w = 1 OR sum(
                coalesce(value_bytes, octet_length(value_json::text)) + octet_length(state_key)
                + octet_length(namespace) + octet_length(coalesce(scope_id, '')) + $16::int
            ) OVER w <= $15::bigint
            THEN value_json END AS value_json,
       row_number() OVER w = 1 OR sum(
           coalesce(value_bytes, octet_length(value_json::text)) + octet_length(state_key)
           + octet_length(namespace) + octet_length(coalesce(scope_id, '')) + $16::int
       ) OVER w <= $15::bigint AS within
FROM plugin_state
WHERE plugin_id = $1
  AND (scope_kind COLLATE "C", coalesce(scope_id, '') COLLATE "C",
       namespace COLLATE "C", state_key COLLATE "C") > ($2, $3, $4, $5)
  AND (scope_kind COLLATE "C", coalesce(scope_id, '') COLLATE "C",
       namespace COLLATE "C", state_key COLLATE "C") < ($6, $7, $8, $9)
  AND ($10::text IS NULL OR scope_kind = $10)
  AND ($11::text IS NULL OR coalesce(scope_id, '') = $11)
  AND ($12::text IS NULL OR namespace = $12)
  AND starts_with(state_key, $13)
  AND (expires_at IS NULL OR expires_at > statement_timestamp())
WINDOW w AS (ORDER BY scope_kind COLLATE "C", coalesce(scope_id, '') COLLATE "C",
                      namespace COLLATE "C", state_key COLLATE "C"
             ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
ORDER BY scope_kind COLLATE "C", coalesce(scope_id, '') COLLATE "C",
         namespace COLLATE "C", state_key COLLATE "C"
LIMIT $14;

-- name: old_tombstone_plugins
-- Plugins with tombstones older than the cut-off ($1: seconds of retention and skew), for
-- the retention to lock before it removes any; the partial index on deleted_at finds them
-- without touching the rest of the register.
SELECT DISTINCT plugin_id FROM (
    SELECT plugin_id FROM plugin_state_versions
    WHERE deleted_at IS NOT NULL
      AND deleted_at < statement_timestamp() - make_interval(secs => $1::double precision)
    ORDER BY deleted_at
    LIMIT $2
) old;

-- name: purge_tombstones
-- Removes up to $2 tombstones of the plugins $3 (whose counters rows the transaction has
-- locked) older than the cut-off ($1 seconds, by the database's clock), both by when they
-- became tombstones and by version: a write older than the retention is refused as stale,
-- so nothing can bring such an entry back. The counters follow in the same statement.
WITH cut AS (
    SELECT statement_timestamp() - make_interval(secs => $1::double precision) AS at
), purged AS (
    DELETE FROM plugin_state_versions AS v
    USING cut
    WHERE v.ctid IN (
        SELECT o.ctid FROM plugin_state_versions o, cut
        WHERE o.deleted_at IS NOT NULL AND o.deleted_at < cut.at
          AND o.plugin_id = ANY($3::uuid[])
        ORDER BY o.deleted_at
        LIMIT $2
    )
      AND v.deleted
      AND v.version < (lpad(to_hex((extract(epoch FROM cut.at) * 1000)::bigint), 12, '0')
                       || '70008000000000000000')::uuid
    RETURNING v.plugin_id
), counted AS (
    UPDATE plugin_counters AS c SET tombstones = c.tombstones - p.n
    FROM (SELECT plugin_id, count(*) AS n FROM purged GROUP BY plugin_id) AS p
    WHERE c.plugin_id = p.plugin_id
    RETURNING 1
)
SELECT count(*) FROM purged;

-- name: expired_plugins
-- Plugins with entries past their expires_at, for the sweeper to lock before it removes any
-- (the oldest first, through the expiry index).
SELECT DISTINCT plugin_id FROM (
    SELECT plugin_id FROM plugin_state
    WHERE expires_at IS NOT NULL AND expires_at <= statement_timestamp()
    ORDER BY expires_at
    LIMIT $1
) expired;

-- name: sweep_expired
-- Turns up to $1 expired entries of the plugins $2 (whose counters rows the transaction has
-- locked) into tombstones at their version: the row goes from plugin_state, the register
-- keeps the version (marked deleted and expired, at the next position of its plugin), so an
-- older write still cannot bring the value back. The counters follow. Returns how many rows
-- went and how many register rows became tombstones (the caller checks they agree).
WITH gone AS (
    DELETE FROM plugin_state AS s
    WHERE s.ctid IN (
        SELECT o.ctid FROM plugin_state o
        WHERE o.expires_at IS NOT NULL AND o.expires_at <= statement_timestamp()
          AND o.plugin_id = ANY($2::uuid[])
        ORDER BY o.expires_at
        LIMIT $1
    )
      AND s.expires_at <= statement_timestamp()
    RETURNING s.plugin_id, s.scope_kind, s.scope_id, s.namespace, s.state_key, s.version,
              coalesce(s.value_bytes, octet_length(s.value_json::text)) AS value_bytes
), positioned AS (
    SELECT g.*, c.head + row_number() OVER (
               PARTITION BY g.plugin_id
               ORDER BY g.scope_kind, g.scope_id, g.namespace, g.state_key
           ) AS position
    FROM gone g JOIN plugin_counters c ON c.plugin_id = g.plugin_id
), tombstoned_scoped AS (
    UPDATE plugin_state_versions AS v
    SET deleted = true, expired = true, value_bytes = NULL, deleted_at = now(),
        changed_at = now(), position = p.position
    FROM positioned p
    WHERE p.scope_id IS NOT NULL
      AND v.plugin_id = p.plugin_id AND v.scope_kind = p.scope_kind
      AND v.scope_id = p.scope_id AND v.namespace = p.namespace
      AND v.state_key = p.state_key AND v.version = p.version
    RETURNING 1
), tombstoned_instance AS (
    UPDATE plugin_state_versions AS v
    SET deleted = true, expired = true, value_bytes = NULL, deleted_at = now(),
        changed_at = now(), position = p.position
    FROM positioned p
    WHERE p.scope_id IS NULL AND v.scope_id IS NULL
      AND v.plugin_id = p.plugin_id AND v.scope_kind = p.scope_kind
      AND v.namespace = p.namespace AND v.state_key = p.state_key AND v.version = p.version
    RETURNING 1
), counted AS (
    UPDATE plugin_counters AS c
    SET entries = c.entries - g.n, bytes = c.bytes - g.bytes,
        tombstones = c.tombstones + g.n, head = c.head + g.n
    FROM (SELECT plugin_id, count(*) AS n, sum(value_bytes) AS bytes
          FROM gone GROUP BY plugin_id) AS g
    WHERE c.plugin_id = g.plugin_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS removed,
       (SELECT count(*) FROM tombstoned_scoped) + (SELECT count(*) FROM tombstoned_instance)
           AS tombstoned,
       ARRAY(SELECT DISTINCT plugin_id FROM gone) AS plugins;

-- name: try_lock
-- A transaction-scoped advisory lock: one worker at a time runs a housekeeping job.
SELECT pg_try_advisory_xact_lock($1::int, $2::int);

-- name: add_plugin
INSERT INTO plugins (id, plugin_key, amqp_user)
VALUES (coalesce($1::uuid, gen_random_uuid()), $2, $3)
RETURNING id, plugin_key, amqp_user, created_at, updated_at;

-- name: list_plugins
SELECT p.id, p.plugin_key, p.amqp_user, p.created_at, p.updated_at,
       coalesce(c.entries, 0) AS entries
FROM plugins p
LEFT JOIN plugin_counters c ON c.plugin_id = p.id
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
-- Taken after lock_plugins, as every writer takes that lock first (so removal and writes
-- cannot deadlock).
SELECT id FROM plugins WHERE id = $1 FOR UPDATE;

-- name: count_plugin_entries
-- The rows themselves, not the counters: removal must refuse for state written any way.
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
