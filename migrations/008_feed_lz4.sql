-- The feed's outbox rows hold a transaction's changes in full (about 250 KiB for 500
-- writes), compressed when stored. Postgres' default method, pglz, took 5.5 ms of the
-- writing backend's CPU for such a row (11 µs per write, inside the transaction that holds
-- its plugins' locks); lz4 takes 1 ms, for half as many bytes again stored and logged (a
-- row lives only until the relay has published it). Only values stored from now on are
-- compressed the new way: nothing is rewritten. A server built without lz4 keeps pglz.
DO $$
BEGIN
    ALTER TABLE plugin_state_feed ALTER COLUMN items SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'this server has no lz4: the feed''s outbox keeps pglz';
END
$$;
