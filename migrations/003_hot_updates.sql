-- Most writes update an entry that exists. Leave room on each page so that those updates
-- can be HOT (heap-only: no new index entries), and index nothing that a write changes:
-- the tombstone index on `version` made every register update a full (non-HOT) update
-- with new entries in every index. Retention, which ran on that index, now scans the
-- register instead (one worker, every retention interval).
DROP INDEX plugin_state_versions_tombstones_idx;
ALTER TABLE plugin_state_versions SET (fillfactor = 80);
ALTER TABLE plugin_state SET (fillfactor = 80);
