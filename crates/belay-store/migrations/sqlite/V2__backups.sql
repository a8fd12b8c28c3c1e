-- belay controller store, schema version 2 (SQLite): the backup catalog mirror.
-- Keep in step with ../postgres/V2__backups.sql (see there for what it is for).
CREATE TABLE backups (
    target         TEXT    NOT NULL,
    id             TEXT    NOT NULL,
    created_at     TEXT    NOT NULL,
    format         TEXT    NOT NULL,
    scope          TEXT    NOT NULL,
    verified       INTEGER NOT NULL CHECK (verified IN (0, 1)),
    size           INTEGER NOT NULL CHECK (size >= 0),
    deployment_id  TEXT    CHECK (deployment_id IS NULL OR length(deployment_id) = 36),
    manifest       TEXT    NOT NULL CHECK (json_valid(manifest) AND json_type(manifest) = 'object'),
    mirrored_at    TEXT    NOT NULL,
    PRIMARY KEY (target, id)
) STRICT;
CREATE INDEX backups_deployment_idx ON backups (deployment_id)
    WHERE deployment_id IS NOT NULL;
