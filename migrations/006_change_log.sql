-- The change log and its feed (protocol §8).
--
-- The log is the version register itself: each entry's row carries the position of its
-- newest change (migration 005), so the log is compacted by construction (one change per
-- entry, the newest), deletions and expiries stay as long as their tombstones do, and
-- reading it from a position is one range of this index.
CREATE INDEX plugin_state_versions_changes_idx
    ON plugin_state_versions (plugin_id, position) WHERE position IS NOT NULL;

-- Positions at or below this were tombstones the retention removed: a reader asking for a
-- position older than that may have missed a deletion, and is answered `compacted`.
ALTER TABLE plugin_counters ADD COLUMN purged_through bigint NOT NULL DEFAULT 0;

-- The feed's outbox: every change, in full, as the items the relay publishes to
-- <prefix>.changes (written in the change's own transaction, removed once published), so
-- that a subscriber receives every change, even one a later write compacted away from the
-- log before the relay got to it. One row per plugin and transaction: its changes'
-- positions run from `position` to `last_position`, their items are JSON lines in `items`
-- (JSON text holds no raw newline), so a batch of 500 writes is one row to insert and
-- delete, not 500.
CREATE TABLE plugin_state_feed (
    plugin_id     uuid NOT NULL REFERENCES plugins (id) ON DELETE CASCADE,
    position      bigint NOT NULL,
    last_position bigint NOT NULL,
    items         bytea NOT NULL,
    -- When the changes committed (their transaction's time): the relay's lag is measured
    -- from it.
    at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (plugin_id, position),
    CHECK (last_position >= position)
);
