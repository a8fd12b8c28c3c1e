-- belay controller store, schema version 2 (PostgreSQL): the backup catalog mirror.
-- Keep in step with ../sqlite/V2__backups.sql.
--
-- A copy of each agent's backup catalog as the controller last saw it (refreshed by
-- every backup call routed through the controller). The agent's catalog stays the truth;
-- the mirror lets the controller answer "which backup precedes deployment D" without the
-- agent, and protect that backup from retention while D is unfinished. No foreign key to
-- targets: a target re-registering (which replaces its row) must not erase its backups.
CREATE TABLE belay_controller.backups (
    target         text        NOT NULL,
    id             text        NOT NULL,
    created_at     timestamptz NOT NULL,
    format         text        NOT NULL,
    scope          text        NOT NULL,
    verified       boolean     NOT NULL,
    size           bigint      NOT NULL CHECK (size >= 0),
    deployment_id  uuid,
    -- The catalog entry as JSON (id, label, files with sha256, verified_at, ...).
    manifest       jsonb       NOT NULL CHECK (jsonb_typeof(manifest) = 'object'),
    mirrored_at    timestamptz NOT NULL,
    PRIMARY KEY (target, id)
);
CREATE INDEX backups_deployment_idx ON belay_controller.backups (deployment_id)
    WHERE deployment_id IS NOT NULL;
