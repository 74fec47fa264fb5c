-- The reference schema of protocol §1, plus what last-writer-wins needs.

CREATE TABLE plugins (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    plugin_key  text NOT NULL,
    amqp_user   text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT plugins_plugin_key_key UNIQUE (plugin_key),
    CONSTRAINT plugins_amqp_user_key UNIQUE (amqp_user)
);

-- A row exists exactly when the entry has a value, so existing readers of this table keep
-- working. `version` is the UUIDv7 of the write that produced the value.
CREATE TABLE plugin_state (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    plugin_id   uuid NOT NULL REFERENCES plugins (id) ON DELETE CASCADE,
    scope_kind  text NOT NULL,
    scope_id    text,
    namespace   text NOT NULL DEFAULT 'default',
    state_key   text NOT NULL,
    value_json  jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    version     uuid NOT NULL,
    CONSTRAINT plugin_state_unique_entry_idx
        UNIQUE NULLS NOT DISTINCT (plugin_id, scope_kind, scope_id, namespace, state_key)
);

CREATE INDEX plugin_state_plugin_scope_idx ON plugin_state (plugin_id, scope_kind);

-- The version register: the newest write every entry has seen, set or delete. Each write
-- first upserts its entry's row here, which both decides last-writer-wins and serializes
-- concurrent writers of one entry (a row lock, taken in key order to rule out deadlocks).
-- Rows with `deleted` are the tombstones: they stop an older set from resurrecting a
-- deleted entry until the retention removes them.
CREATE TABLE plugin_state_versions (
    plugin_id   uuid NOT NULL REFERENCES plugins (id) ON DELETE CASCADE,
    scope_kind  text NOT NULL,
    scope_id    text,
    namespace   text NOT NULL,
    state_key   text NOT NULL,
    version     uuid NOT NULL,
    deleted     boolean NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT plugin_state_versions_entry_idx
        UNIQUE NULLS NOT DISTINCT (plugin_id, scope_kind, scope_id, namespace, state_key)
);

-- Retention scans only tombstones, oldest version first.
CREATE INDEX plugin_state_versions_tombstones_idx
    ON plugin_state_versions (version) WHERE deleted;
