-- `list` pages in (scope_kind, scope_id, namespace, key) order with keyset cursors. Instance
-- entries have a NULL scope_id and every other kind a non-empty one, so coalescing NULL to
-- '' gives a total order in which a row comparison (the cursor) can use this index.
CREATE INDEX plugin_state_list_order_idx
    ON plugin_state (plugin_id, scope_kind, (coalesce(scope_id, '')), namespace, state_key);
