//! The deployment pipeline: one target's deployment as a state machine — `planned →
//! preflight → backing_up → migrating → validating → watching → succeeded`, or `failed`
//! with the step, the reason and the evidence — driven through the capability traits
//! (`HealthApi`, `MigrationApi`, `LockMonitorApi`, `BackupApi`) and recorded through a
//! [`DeploymentLog`]. The CLI runs it in-process for local `migrate`; agents run it for
//! remote `migrate` and for each target of a fleet deployment.
//!
//! It owns the order of the steps, the policy that says what each step does, and the
//! record a rollback needs. It must not reach into the capability crates' insides, open
//! database connections of its own, or print anything: callers render its events.

pub mod record;

pub use record::{
    AppliedMigration, DeployEvent, DeploymentLog, DeploymentOutcome, DeploymentRecord, LogError,
    NewDeployment, Step,
};
