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
SELECT plugin_id, entries, bytes, tombstones, head, now() AS now,
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

-- name: recorded_conditional_writes
-- Which of these conditional writes ($1 ids, $2 their plugins) were judged before, and how:
-- applied, or a conflict (and the batch's failing op).
SELECT c.id, c.conflict, c.failed_op FROM plugin_state_conditional_writes c
JOIN unnest($1::uuid[], $2::uuid[]) AS w (id, plugin_id)
    ON c.id = w.id AND c.plugin_id = w.plugin_id;

-- name: record_conditional_writes
-- The conditional writes this transaction judged ($1 ids, $2 their plugins, $3 whether each
-- was a conflict, $4 its failing op).
INSERT INTO plugin_state_conditional_writes (id, plugin_id, conflict, failed_op)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bool[], $4::int[])
ON CONFLICT DO NOTHING;

-- name: purge_conditional_writes
-- Conditional writes (applied or conflicted) older than the cut-off ($1 seconds, by the
-- database's clock): a redelivery that old is refused as stale before it could be mistaken
-- for a fresh write.
DELETE FROM plugin_state_conditional_writes
WHERE id < (lpad(to_hex((extract(epoch FROM statement_timestamp()
                                     - make_interval(secs => $1::double precision))
                         * 1000)::bigint), 12, '0') || '70008000000000000000')::uuid;

-- name: write_entries
-- The last statement of a write transaction: the entry writes that won (decided under the
-- plugin locks, each entry once), in one round trip. $1..$11 are the entries: key, version,
-- whether it is a delete, the value's JSON text (null for a delete), its size, when it
-- expires (Unix ms, or null) and its position in its plugin's order (null when the change
-- log is off); $12..$16 each plugin's change of usage and its new head; $17..$20 the feed's
-- rows, one per plugin: its first and last position and its items (none when the log is
-- off). Every part is a data-modifying CTE of this one
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
), fed AS (
    INSERT INTO plugin_state_feed (plugin_id, position, last_position, items)
    SELECT * FROM unnest($17::uuid[], $18::bigint[], $19::bigint[], $20::bytea[])
    RETURNING 1
)
SELECT (SELECT count(*) FROM versions) AS versions,
       (SELECT count(*) FROM upserted) AS upserted,
       (SELECT count(*) FROM removed_scoped) + (SELECT count(*) FROM removed_instance)
           AS removed,
       (SELECT count(*) FROM counted) AS counted,
       (SELECT count(*) FROM fed) AS fed;

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
-- limit). At most $17 rows of that range are read (the scan window, so a page costs a
-- bounded amount whatever the filters): $10..$13, the filters the range cannot express
-- (null: none), and expiry apply to the window's rows. At most $14 rows come back (the page
-- size plus one: the extra row tells whether another page follows): the matching ones, and
-- the window's last row when the window was read to its end (`window_end`; `matches` says
-- whether it is an item), where the next page starts. A row's value is sent only while the
-- page's running size (each value's bound on its rendering, value_bytes, plus its names
-- and $16 bytes of framing) stays within $15 bytes; `within` says which rows fit, the
-- first always does.
SELECT scope_kind, scope_id, namespace, state_key, version, updated_at, expires_at,
       value_json, within, matches, window_end
FROM (
SELECT scope_kind, scope_id, namespace, state_key, version, updated_at, expires_at,
       sk, sid, ns, k,
       CASE WHEN matches AND (row_number() OVER w = 1 OR sum(
                coalesce(value_bytes, octet_length(value_json::text)) + octet_length(state_key)
                + octet_length(namespace) + octet_length(coalesce(scope_id, '')) + $16::int
            ) OVER w <= $15::bigint)
            THEN value_json END AS value_json,
       NOT matches OR row_number() OVER w = 1 OR sum(
           coalesce(value_bytes, octet_length(value_json::text)) + octet_length(state_key)
           + octet_length(namespace) + octet_length(coalesce(scope_id, '')) + $16::int
       ) OVER w <= $15::bigint AS within,
       matches, scanned = $17 AS window_end
FROM (
    SELECT s.*, row_number() OVER (ORDER BY sk, sid, ns, k) AS scanned,
           ($10::text IS NULL OR scope_kind = $10)
           AND ($11::text IS NULL OR coalesce(scope_id, '') = $11)
           AND ($12::text IS NULL OR namespace = $12)
           AND starts_with(state_key, $13)
           AND (expires_at IS NULL OR expires_at > statement_timestamp()) AS matches
    FROM (
        SELECT scope_kind, scope_id, namespace, state_key, version, updated_at, expires_at,
               value_json, value_bytes,
               scope_kind COLLATE "C" AS sk, coalesce(scope_id, '') COLLATE "C" AS sid,
               namespace COLLATE "C" AS ns, state_key COLLATE "C" AS k
        FROM plugin_state
        WHERE plugin_id = $1
          AND (scope_kind COLLATE "C", coalesce(scope_id, '') COLLATE "C",
               namespace COLLATE "C", state_key COLLATE "C") >= ($2, $3, $4, $5)
          AND (scope_kind COLLATE "C", coalesce(scope_id, '') COLLATE "C",
               namespace COLLATE "C", state_key COLLATE "C") < ($6, $7, $8, $9)
        ORDER BY sk, sid, ns, k
        LIMIT $17
    ) s
) window_rows
WHERE matches OR scanned = $17
WINDOW w AS (ORDER BY sk, sid, ns, k ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
LIMIT $14
) page
ORDER BY sk, sid, ns, k;

-- name: list_next_page
-- As list_first_page, after the cursor $2..$5 (the last entry of the previous page, or the
-- last row its window read): keyset paging, so entries added or removed between pages never
-- shift the others.
SELECT scope_kind, scope_id, namespace, state_key, version, updated_at, expires_at,
       value_json, within, matches, window_end
FROM (
SELECT scope_kind, scope_id, namespace, state_key, version, updated_at, expires_at,
       sk, sid, ns, k,
       CASE WHEN matches AND (row_number() OVER w = 1 OR sum(
                coalesce(value_bytes, octet_length(value_json::text)) + octet_length(state_key)
                + octet_length(namespace) + octet_length(coalesce(scope_id, '')) + $16::int
            ) OVER w <= $15::bigint)
            THEN value_json END AS value_json,
       NOT matches OR row_number() OVER w = 1 OR sum(
           coalesce(value_bytes, octet_length(value_json::text)) + octet_length(state_key)
           + octet_length(namespace) + octet_length(coalesce(scope_id, '')) + $16::int
       ) OVER w <= $15::bigint AS within,
       matches, scanned = $17 AS window_end
FROM (
    SELECT s.*, row_number() OVER (ORDER BY sk, sid, ns, k) AS scanned,
           ($10::text IS NULL OR scope_kind = $10)
           AND ($11::text IS NULL OR coalesce(scope_id, '') = $11)
           AND ($12::text IS NULL OR namespace = $12)
           AND starts_with(state_key, $13)
           AND (expires_at IS NULL OR expires_at > statement_timestamp()) AS matches
    FROM (
        SELECT scope_kind, scope_id, namespace, state_key, version, updated_at, expires_at,
               value_json, value_bytes,
               scope_kind COLLATE "C" AS sk, coalesce(scope_id, '') COLLATE "C" AS sid,
               namespace COLLATE "C" AS ns, state_key COLLATE "C" AS k
        FROM plugin_state
        WHERE plugin_id = $1
          AND (scope_kind COLLATE "C", coalesce(scope_id, '') COLLATE "C",
               namespace COLLATE "C", state_key COLLATE "C") > ($2, $3, $4, $5)
          AND (scope_kind COLLATE "C", coalesce(scope_id, '') COLLATE "C",
               namespace COLLATE "C", state_key COLLATE "C") < ($6, $7, $8, $9)
        ORDER BY sk, sid, ns, k
        LIMIT $17
    ) s
) window_rows
WHERE matches OR scanned = $17
WINDOW w AS (ORDER BY sk, sid, ns, k ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
LIMIT $14
) page
ORDER BY sk, sid, ns, k;

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
-- so nothing can bring such an entry back. The counters follow in the same statement, and
-- purged_through: a change log reader from before those positions may have missed them.
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
    RETURNING v.plugin_id, v.position
), counted AS (
    UPDATE plugin_counters AS c
    SET tombstones = c.tombstones - p.n,
        purged_through = greatest(c.purged_through, coalesce(p.through, 0))
    FROM (SELECT plugin_id, count(*) AS n, max(position) AS through
          FROM purged GROUP BY plugin_id) AS p
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
-- keeps the version (marked deleted and expired, at the next position of its plugin when the
-- change log is on: $3), so an older write still cannot bring the value back. The counters
-- follow. Returns the entries swept (the caller checks each became a tombstone, and writes
-- their changes to the feed).
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
              s.expires_at, coalesce(s.value_bytes, octet_length(s.value_json::text))
                  AS value_bytes
), positioned AS (
    SELECT g.*, CASE WHEN $3::bool THEN c.head + row_number() OVER (
               PARTITION BY g.plugin_id
               ORDER BY g.scope_kind, g.scope_id, g.namespace, g.state_key
           ) END AS position
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
    RETURNING v.plugin_id, v.scope_kind, v.scope_id, v.namespace, v.state_key, v.version,
              v.position, v.expires_at
), tombstoned_instance AS (
    UPDATE plugin_state_versions AS v
    SET deleted = true, expired = true, value_bytes = NULL, deleted_at = now(),
        changed_at = now(), position = p.position
    FROM positioned p
    WHERE p.scope_id IS NULL AND v.scope_id IS NULL
      AND v.plugin_id = p.plugin_id AND v.scope_kind = p.scope_kind
      AND v.namespace = p.namespace AND v.state_key = p.state_key AND v.version = p.version
    RETURNING v.plugin_id, v.scope_kind, v.scope_id, v.namespace, v.state_key, v.version,
              v.position, v.expires_at
), counted AS (
    UPDATE plugin_counters AS c
    SET entries = c.entries - g.n, bytes = c.bytes - g.bytes,
        tombstones = c.tombstones + g.n,
        head = c.head + CASE WHEN $3::bool THEN g.n ELSE 0 END
    FROM (SELECT plugin_id, count(*) AS n, sum(value_bytes) AS bytes
          FROM gone GROUP BY plugin_id) AS g
    WHERE c.plugin_id = g.plugin_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS removed, t.*, now() AS now
FROM (SELECT * FROM tombstoned_scoped UNION ALL SELECT * FROM tombstoned_instance) t;

-- name: feed_rows
-- Write the feed's rows of a sweep ($1..$4, as write_entries' $17..$20), in its transaction.
INSERT INTO plugin_state_feed (plugin_id, position, last_position, items)
SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bytea[]);

-- name: read_changes
-- A page of a plugin's change log after position $2: its entries' newest changes in
-- position order (the register, so compacted: one change per entry), with the filters of
-- list ($5..$8), at most $4 of them, and at most $3 positions looked at (so a filter that
-- matches little still answers soon; `scanned` says how far it looked). The plugin's head
-- and what its retention removed come from the same snapshot, which holds every change
-- committed before it and none after: positions are given in commit order, so what the
-- snapshot holds is all of the log up to the head. Values are sent while the page's running
-- size stays within $9 bytes (the first always), like list's.
WITH scanned AS (
    SELECT v.* FROM plugin_state_versions v
    WHERE v.plugin_id = $1 AND v.position IS NOT NULL AND v.position > $2
    ORDER BY v.position
    LIMIT $3
), meta AS (
    SELECT c.head, c.purged_through,
           (SELECT max(position) FROM scanned) AS scanned_to,
           (SELECT count(*) FROM scanned) AS scanned
    FROM plugin_counters c WHERE c.plugin_id = $1
), matched AS (
    SELECT v.* FROM scanned v
    WHERE ($5::text IS NULL OR v.scope_kind = $5)
      AND ($6::text IS NULL OR coalesce(v.scope_id, '') = $6)
      AND ($7::text IS NULL OR v.namespace = $7)
      AND starts_with(v.state_key, $8)
    ORDER BY v.position
    LIMIT $4
), valued AS (
    SELECT m.position, m.scope_kind, m.scope_id, m.namespace, m.state_key, m.version,
           m.deleted, m.expired, m.changed_at, m.expires_at AS register_expires_at,
           s.value_json, s.updated_at, s.expires_at,
           coalesce(s.value_bytes, octet_length(s.value_json::text), 0) AS value_bytes
    FROM matched m
    LEFT JOIN LATERAL (
        SELECT s.value_json, s.updated_at, s.expires_at, s.value_bytes FROM plugin_state s
        WHERE NOT m.deleted AND m.scope_id IS NOT NULL
          AND s.plugin_id = m.plugin_id AND s.scope_kind = m.scope_kind
          AND s.scope_id = m.scope_id AND s.namespace = m.namespace
          AND s.state_key = m.state_key AND s.version = m.version
        UNION ALL
        SELECT s.value_json, s.updated_at, s.expires_at, s.value_bytes FROM plugin_state s
        WHERE NOT m.deleted AND m.scope_id IS NULL AND s.scope_id IS NULL
          AND s.plugin_id = m.plugin_id AND s.scope_kind = m.scope_kind
          AND s.namespace = m.namespace AND s.state_key = m.state_key
          AND s.version = m.version
    ) s ON true
)
SELECT meta.head, meta.purged_through, meta.scanned_to, meta.scanned, v.position,
       v.scope_kind, v.scope_id, v.namespace, v.state_key, v.version, v.deleted, v.expired,
       v.changed_at, v.register_expires_at, v.updated_at, v.expires_at,
       CASE WHEN row_number() OVER w = 1 OR sum(v.value_bytes + 200) OVER w <= $9::bigint
            THEN v.value_json END AS value_json,
       row_number() OVER w = 1 OR sum(v.value_bytes + 200) OVER w <= $9::bigint AS within
FROM meta LEFT JOIN valued v ON true
WINDOW w AS (ORDER BY v.position ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
ORDER BY v.position;

-- name: heads
-- Where each of these plugins' change logs ends.
SELECT plugin_id, head FROM plugin_counters WHERE plugin_id = ANY($1::uuid[]);

-- name: feed_next
-- The relay's next rows: for up to $1 plugins with rows in the outbox (in plugin order,
-- after $4 when given, so every plugin gets its turn however busy the first ones are), each
-- plugin's first $2 rows in position order, cut where the running size passes $3 bytes
-- (the first row always goes). A prefix of each plugin's rows, so publishing them in this
-- order keeps each plugin's log order. The plugins are found by skipping along the primary
-- key (one probe per plugin), not by reading the whole outbox.
WITH RECURSIVE plugins AS (
    (SELECT plugin_id FROM plugin_state_feed
     WHERE $4::uuid IS NULL OR plugin_id > $4::uuid
     ORDER BY plugin_id LIMIT 1)
    UNION ALL
    SELECT (SELECT f.plugin_id FROM plugin_state_feed f
            WHERE f.plugin_id > p.plugin_id ORDER BY f.plugin_id LIMIT 1)
    FROM plugins p WHERE p.plugin_id IS NOT NULL
), picked AS (
    SELECT f.plugin_id, f.position, f.last_position, f.items, f.at
    FROM (SELECT plugin_id FROM plugins WHERE plugin_id IS NOT NULL LIMIT $1) p
    CROSS JOIN LATERAL (
        SELECT * FROM plugin_state_feed f
        WHERE f.plugin_id = p.plugin_id
        ORDER BY f.position LIMIT $2
    ) f
), sized AS (
    SELECT plugin_id, position, last_position, items, at,
           row_number() OVER w AS n, sum(octet_length(items)) OVER w AS running
    FROM picked
    WINDOW w AS (ORDER BY plugin_id, position ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
)
SELECT plugin_id, position, last_position, items,
       extract(epoch FROM clock_timestamp() - at)::double precision AS waited
FROM sized
WHERE n = 1 OR running <= $3
ORDER BY plugin_id, position;

-- name: feed_published
-- The relay published each plugin's ($1) rows up to the one at position $2: they leave the
-- outbox.
DELETE FROM plugin_state_feed f
USING unnest($1::uuid[], $2::bigint[]) AS d (plugin_id, through)
WHERE f.plugin_id = d.plugin_id AND f.position <= d.through;

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

-- name: plugin_census
-- What `doctor` says of the plugins table: how many plugins, how many a RabbitMQ user acts for.
SELECT count(*) AS plugins, count(amqp_user) AS mapped FROM plugins;
