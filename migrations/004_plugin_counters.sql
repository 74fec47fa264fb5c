-- Exact usage per plugin, and the lock that orders every write of a plugin's entries.
--
-- Every write transaction locks the counters row of each plugin it writes (in plugin order)
-- before it reads or changes any of that plugin's entries, and updates the counters in the
-- same transaction: quotas hold exactly, whatever the number of workers, and no query ever
-- sums a plugin's rows again. Rows are created with the plugin (the trigger below), so a
-- plugin registered by hand with a plain INSERT works too.
CREATE TABLE plugin_counters (
    plugin_id   uuid PRIMARY KEY REFERENCES plugins (id) ON DELETE CASCADE,
    entries     bigint NOT NULL DEFAULT 0,
    bytes       bigint NOT NULL DEFAULT 0,
    tombstones  bigint NOT NULL DEFAULT 0
);
-- Updated by every write transaction: leave room for heap-only updates.
ALTER TABLE plugin_counters SET (fillfactor = 50);

CREATE FUNCTION plugin_state_add_counters() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO plugin_counters (plugin_id) VALUES (NEW.id) ON CONFLICT DO NOTHING;
    RETURN NEW;
END
$$;
CREATE TRIGGER plugins_add_counters AFTER INSERT ON plugins
    FOR EACH ROW EXECUTE FUNCTION plugin_state_add_counters();

-- The size of a value's JSON text as it was sent, kept so that quotas, reply budgets and
-- transaction bounds never render jsonb to count it. Nullable, without a default: adding it
-- rewrites nothing; rows written before it are measured when first needed.
ALTER TABLE plugin_state ADD COLUMN value_bytes integer;
ALTER TABLE plugin_state_versions ADD COLUMN value_bytes integer;

-- When an entry became a tombstone. Retention finds old tombstones through this partial
-- index; a write that keeps an entry a value leaves the column NULL and the update can stay
-- heap-only (the index on `version` it replaces made every register update a full one).
ALTER TABLE plugin_state_versions ADD COLUMN deleted_at timestamptz;
UPDATE plugin_state_versions SET deleted_at = changed_at WHERE deleted;
CREATE INDEX plugin_state_versions_tombstones_idx
    ON plugin_state_versions (deleted_at) WHERE deleted_at IS NOT NULL;

INSERT INTO plugin_counters (plugin_id, entries, bytes, tombstones)
SELECT p.id,
       (SELECT count(*) FROM plugin_state s WHERE s.plugin_id = p.id),
       (SELECT coalesce(sum(octet_length(s.value_json::text)), 0)
        FROM plugin_state s WHERE s.plugin_id = p.id),
       (SELECT count(*) FROM plugin_state_versions v WHERE v.plugin_id = p.id AND v.deleted)
FROM plugins p;

-- `list` in byte order (code point order of UTF-8), whatever the database's collation, so
-- that equality on the leading columns and a key-prefix range can both use the index, and a
-- cursor means the same on every server.
DROP INDEX plugin_state_list_order_idx;
CREATE INDEX plugin_state_list_order_idx ON plugin_state (
    plugin_id,
    scope_kind COLLATE "C",
    (coalesce(scope_id, '')) COLLATE "C",
    namespace COLLATE "C",
    state_key COLLATE "C"
);
