-- belay controller store, schema version 3 (SQLite): each target's pipeline step and
-- outcome. Keep in step with ../postgres/V3__target_steps.sql (see there for what it is
-- for).
ALTER TABLE deployment_targets ADD COLUMN step TEXT CHECK (step IN ('planned', 'preflight',
    'backing_up', 'migrating', 'validating', 'watching', 'succeeded', 'failed', 'rolling_back',
    'rolled_back', 'escalated'));
ALTER TABLE deployment_targets ADD COLUMN outcome TEXT NOT NULL DEFAULT 'null'
    CHECK (json_valid(outcome));
