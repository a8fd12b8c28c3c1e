-- belay controller store, schema version 4 (PostgreSQL): rollback requests from alerts.
-- Keep in step with ../sqlite/V4__rollback_requests.sql.
--
-- Alertmanager delivers at least once and several alerts may name one deployment, so a
-- rollback is requested at most once per (deployment, target): the first delivery inserts
-- the row (state `requested`) *before* the rollback is triggered; later deliveries are
-- only counted in `deliveries` and listed in rollback_request_deliveries.
--   requested   recorded; the trigger is being called (a controller that stops while
--               calling it marks it failed when it starts again)
--   started     the trigger accepted the rollback
--   failed      the trigger failed transiently (agent unreachable, store unavailable):
--               the next delivery of any alert naming it calls it again
--   refused     the trigger refused for good (the reason in `message`)
--   unavailable this controller cannot execute rollbacks (the reason in `message`)
CREATE TABLE belay_controller.rollback_requests (
    deployment_id  uuid        NOT NULL REFERENCES belay_controller.deployments (id) ON DELETE CASCADE,
    target         text        NOT NULL,
    state          text        NOT NULL CHECK (state IN ('requested', 'started', 'failed',
                                   'refused', 'unavailable')),
    alertname      text        NOT NULL,
    fingerprint    text        NOT NULL,
    labels         jsonb       NOT NULL DEFAULT '{}',
    annotations    jsonb       NOT NULL DEFAULT '{}',
    starts_at      timestamptz,
    message        text        NOT NULL DEFAULT '',
    attempts       bigint      NOT NULL CHECK (attempts > 0),
    deliveries     bigint      NOT NULL CHECK (deliveries > 0),
    requested_at   timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    PRIMARY KEY (deployment_id, target)
);

-- Every delivery that named a request, the first one included: who (alert) and when.
CREATE TABLE belay_controller.rollback_request_deliveries (
    deployment_id  uuid        NOT NULL,
    target         text        NOT NULL,
    n              bigint      NOT NULL CHECK (n > 0),
    at             timestamptz NOT NULL,
    alertname      text        NOT NULL,
    fingerprint    text        NOT NULL,
    outcome        text        NOT NULL CHECK (outcome IN ('first', 'retry', 'duplicate')),
    PRIMARY KEY (deployment_id, target, n),
    FOREIGN KEY (deployment_id, target)
        REFERENCES belay_controller.rollback_requests (deployment_id, target) ON DELETE CASCADE
);
