-- belay controller store, schema version 1 (SQLite).
-- Applied by belay-store itself (belay's engine is PostgreSQL-only); its history is in
-- store_schema_history. Keep in step with ../postgres/V1__init.sql: same tables, columns
-- and meaning. Timestamps are RFC 3339 text in UTC with microseconds, always 27
-- characters (2024-01-02T03:04:05.000006Z), so text order is time order. UUIDs are
-- lowercase hyphenated text; JSON is text.

-- Agents: one row per agent process that registered, kept when it goes away.
CREATE TABLE agents (
    name            TEXT NOT NULL PRIMARY KEY,
    address         TEXT NOT NULL,
    version         TEXT NOT NULL,
    registered_at   TEXT NOT NULL,
    last_heartbeat  TEXT NOT NULL
) STRICT;

-- Targets (databases), unique by name across agents.
CREATE TABLE targets (
    name         TEXT NOT NULL PRIMARY KEY,
    agent        TEXT NOT NULL REFERENCES agents (name) ON DELETE CASCADE,
    environment  TEXT,
    labels       TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(labels) AND json_type(labels) = 'object')
) STRICT;
CREATE INDEX targets_agent_idx ON targets (agent);

-- Deployments. last_seq is the newest event's seq: appending an event increments it
-- inside a write transaction, so concurrent appends get consecutive numbers.
CREATE TABLE deployments (
    id                     TEXT    NOT NULL PRIMARY KEY CHECK (length(id) = 36),
    state                  TEXT    NOT NULL CHECK (state IN ('planned', 'preflight',
                               'backing_up', 'migrating', 'validating', 'watching', 'succeeded',
                               'failed', 'rolling_back', 'rolled_back', 'escalated')),
    to_version             TEXT,
    environment            TEXT,
    params                 TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(params)),
    skip_promotion_reason  TEXT,
    requested_by           TEXT,
    created_at             TEXT    NOT NULL,
    updated_at             TEXT    NOT NULL,
    finished_at            TEXT,
    last_seq               INTEGER NOT NULL DEFAULT 0 CHECK (last_seq >= 0)
) STRICT;
CREATE INDEX deployments_created_idx ON deployments (created_at DESC, id DESC);
CREATE INDEX deployments_unfinished_idx ON deployments (created_at)
    WHERE state NOT IN ('succeeded', 'rolled_back', 'escalated');
CREATE INDEX deployments_promotion_idx ON deployments (environment, to_version)
    WHERE state = 'succeeded';

-- Each target's progress within a deployment, in deployment order (position).
CREATE TABLE deployment_targets (
    deployment_id  TEXT    NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    target         TEXT    NOT NULL,
    position       INTEGER NOT NULL,
    state          TEXT    NOT NULL CHECK (state IN ('pending', 'running', 'succeeded',
                               'failed', 'skipped', 'unknown')),
    message        TEXT    NOT NULL DEFAULT '',
    updated_at     TEXT    NOT NULL,
    PRIMARY KEY (deployment_id, target),
    UNIQUE (deployment_id, position)
) STRICT;

-- The event log; the primary key is the (deployment_id, seq) index readers follow.
CREATE TABLE deployment_events (
    deployment_id  TEXT    NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    seq            INTEGER NOT NULL CHECK (seq > 0),
    at             TEXT    NOT NULL,
    target         TEXT,
    kind           TEXT    NOT NULL,
    message        TEXT    NOT NULL,
    payload        TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(payload)),
    PRIMARY KEY (deployment_id, seq)
) STRICT;
