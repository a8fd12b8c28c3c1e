-- belay controller store, schema version 1 (PostgreSQL).
-- Applied by belay's own engine; its history is in belay_store.schema_history.
-- Keep in step with ../sqlite/V1__init.sql: same tables, columns and meaning.

CREATE SCHEMA IF NOT EXISTS belay_controller;

-- Agents: one row per agent process that registered, kept when it goes away.
CREATE TABLE belay_controller.agents (
    name            text        PRIMARY KEY,
    address         text        NOT NULL,
    version         text        NOT NULL,
    registered_at   timestamptz NOT NULL,
    last_heartbeat  timestamptz NOT NULL
);

-- Targets (databases), unique by name across agents.
CREATE TABLE belay_controller.targets (
    name         text  PRIMARY KEY,
    agent        text  NOT NULL REFERENCES belay_controller.agents (name) ON DELETE CASCADE,
    environment  text,
    labels       jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(labels) = 'object')
);
CREATE INDEX targets_agent_idx ON belay_controller.targets (agent);

-- Deployments. last_seq is the newest event's seq: appending an event increments it,
-- which also locks the row, so concurrent appends get consecutive numbers.
CREATE TABLE belay_controller.deployments (
    id                     uuid        PRIMARY KEY,
    state                  text        NOT NULL CHECK (state IN ('planned', 'preflight',
                               'backing_up', 'migrating', 'validating', 'watching', 'succeeded',
                               'failed', 'rolling_back', 'rolled_back', 'escalated')),
    to_version             text,
    environment            text,
    params                 jsonb       NOT NULL DEFAULT '{}',
    skip_promotion_reason  text,
    requested_by           text,
    created_at             timestamptz NOT NULL,
    updated_at             timestamptz NOT NULL,
    finished_at            timestamptz,
    last_seq               bigint      NOT NULL DEFAULT 0 CHECK (last_seq >= 0)
);
CREATE INDEX deployments_created_idx ON belay_controller.deployments (created_at DESC, id DESC);
CREATE INDEX deployments_unfinished_idx ON belay_controller.deployments (created_at)
    WHERE state NOT IN ('succeeded', 'rolled_back', 'escalated');
CREATE INDEX deployments_promotion_idx ON belay_controller.deployments (environment, to_version)
    WHERE state = 'succeeded';

-- Each target's progress within a deployment, in deployment order (position).
CREATE TABLE belay_controller.deployment_targets (
    deployment_id  uuid        NOT NULL REFERENCES belay_controller.deployments (id) ON DELETE CASCADE,
    target         text        NOT NULL,
    position       integer     NOT NULL,
    state          text        NOT NULL CHECK (state IN ('pending', 'running', 'succeeded',
                                   'failed', 'skipped', 'unknown')),
    message        text        NOT NULL DEFAULT '',
    updated_at     timestamptz NOT NULL,
    PRIMARY KEY (deployment_id, target),
    UNIQUE (deployment_id, position)
);

-- The event log; the primary key is the (deployment_id, seq) index readers follow.
CREATE TABLE belay_controller.deployment_events (
    deployment_id  uuid        NOT NULL REFERENCES belay_controller.deployments (id) ON DELETE CASCADE,
    seq            bigint      NOT NULL CHECK (seq > 0),
    at             timestamptz NOT NULL,
    target         text,
    kind           text        NOT NULL,
    message        text        NOT NULL,
    payload        jsonb       NOT NULL DEFAULT '{}',
    PRIMARY KEY (deployment_id, seq)
);
