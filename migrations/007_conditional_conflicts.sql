-- A conditional write whose condition did not hold is recorded too, with the op that failed,
-- so that its redelivery is answered `conflict` again rather than judged against a state
-- that may have changed since (an if_absent claim told `conflict`, then a late delete of the
-- holder's value: judged again, the redelivered claim would win as well). Protocol §7:
-- redelivery stays idempotent. Same table, same retention and purge as the applied ones;
-- unconditional writes are still never recorded.
--
-- Constant defaults: adding them rewrites no table, and the rows already there are the
-- applied writes they were.
ALTER TABLE plugin_state_conditional_writes ADD COLUMN conflict boolean NOT NULL DEFAULT false;
-- The first failing op of a conflicted batch (null for a single write, or an applied one).
ALTER TABLE plugin_state_conditional_writes ADD COLUMN failed_op integer;
