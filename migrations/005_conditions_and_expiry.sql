-- Conditional writes and expiring entries (protocol §7), and the order of a plugin's writes.
--
-- Every column is nullable or has a constant default: adding it rewrites no table.

-- When an entry expires; a direct reader of the table filters on it (expires_at IS NULL OR
-- expires_at > now()). The register keeps it too, so that a condition sees an expired
-- entry as absent before the sweeper has removed its row.
ALTER TABLE plugin_state ADD COLUMN expires_at timestamptz;
ALTER TABLE plugin_state_versions ADD COLUMN expires_at timestamptz;
-- A tombstone the expiry sweeper made (rather than a delete).
ALTER TABLE plugin_state_versions ADD COLUMN expired boolean NOT NULL DEFAULT false;

-- The sweeper finds expired rows through this index; rows without a time to live are not
-- in it, so writes of permanent entries stay heap-only updates.
CREATE INDEX plugin_state_expiry_idx ON plugin_state (expires_at) WHERE expires_at IS NOT NULL;

-- Where each entry's newest change stands in its plugin's order of writes. Positions are
-- given under the plugin's counters lock, which every writer holds to its commit, so they
-- follow the order in which writes were decided and committed; `head` is the last one given.
ALTER TABLE plugin_state_versions ADD COLUMN position bigint;
ALTER TABLE plugin_counters ADD COLUMN head bigint NOT NULL DEFAULT 0;

-- The conditional writes that were applied, so that a redelivered one is told from a fresh
-- one: a redelivery is answered `applied` (or `superseded` once overtaken) without being
-- judged again, and a fresh one whose condition fails is a `conflict`, never mistaken for a
-- duplicate. Kept for the tombstone retention (an older write is refused as stale anyway);
-- only conditional writes are recorded, so unconditional ones pay nothing.
CREATE TABLE plugin_state_conditional_writes (
    id          uuid NOT NULL,
    plugin_id   uuid NOT NULL REFERENCES plugins (id) ON DELETE CASCADE,
    PRIMARY KEY (id, plugin_id)
);
