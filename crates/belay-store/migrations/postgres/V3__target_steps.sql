-- belay controller store, schema version 3 (PostgreSQL): each target's pipeline step and
-- outcome. Keep in step with ../sqlite/V3__target_steps.sql.
--
-- A fleet deployment runs belay-deploy's pipeline on every target's agent. `state` stays
-- the coordination state (pending, running, succeeded, failed, skipped, unknown); `step`
-- is where the target's own pipeline stands, in the deployment lifecycle's vocabulary
-- (planned, preflight, backing_up, migrating, validating, watching, succeeded, failed),
-- NULL before it started; `outcome` is how it ended (state, failed_step, reason,
-- evidence, to_version, backup_id, applied), JSON null until then.
ALTER TABLE belay_controller.deployment_targets
    ADD COLUMN step text CHECK (step IN ('planned', 'preflight', 'backing_up', 'migrating',
        'validating', 'watching', 'succeeded', 'failed', 'rolling_back', 'rolled_back',
        'escalated')),
    ADD COLUMN outcome jsonb NOT NULL DEFAULT 'null';
