-- belay controller store, schema version 4 (SQLite): rollback requests from alerts. Keep
-- in step with ../postgres/V4__rollback_requests.sql (see there for the states).
CREATE TABLE rollback_requests (
    deployment_id  TEXT    NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    target         TEXT    NOT NULL,
    state          TEXT    NOT NULL CHECK (state IN ('requested', 'started', 'failed',
                               'refused', 'unavailable')),
    alertname      TEXT    NOT NULL,
    fingerprint    TEXT    NOT NULL,
    labels         TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(labels)),
    annotations    TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(annotations)),
    starts_at      TEXT,
    message        TEXT    NOT NULL DEFAULT '',
    attempts       INTEGER NOT NULL CHECK (attempts > 0),
    deliveries     INTEGER NOT NULL CHECK (deliveries > 0),
    requested_at   TEXT    NOT NULL,
    updated_at     TEXT    NOT NULL,
    PRIMARY KEY (deployment_id, target)
) STRICT;

CREATE TABLE rollback_request_deliveries (
    deployment_id  TEXT    NOT NULL,
    target         TEXT    NOT NULL,
    n              INTEGER NOT NULL CHECK (n > 0),
    at             TEXT    NOT NULL,
    alertname      TEXT    NOT NULL,
    fingerprint    TEXT    NOT NULL,
    outcome        TEXT    NOT NULL CHECK (outcome IN ('first', 'retry', 'duplicate')),
    PRIMARY KEY (deployment_id, target, n),
    FOREIGN KEY (deployment_id, target)
        REFERENCES rollback_requests (deployment_id, target) ON DELETE CASCADE
) STRICT;
