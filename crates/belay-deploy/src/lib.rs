//! The deployment pipeline: one target's deployment as a state machine — `planned →
//! preflight → backing_up → migrating → validating → watching → succeeded`, or `failed`
//! with the step, the reason and the evidence — driven through the capability traits
//! (`HealthApi` for preflight, postflight and probes, `MigrationApi::apply` for the
//! backup and the migrations, whose executor runs the lint gate and the backup hook under
//! its runner lock) and recorded through a [`DeploymentLog`]. The CLI runs it in-process
//! for local `migrate`; agents run it for remote `migrate` and for each target of a fleet
//! deployment ([`TargetDeployApi`], `target.rs`).
//!
//! It owns the order of the steps, the policy that says what each step does
//! ([`DeploymentPolicy`]), the record a rollback needs, and the seam a rollback controller
//! plugs into ([`FailureHandler`]). It must not reach into the capability crates'
//! insides, open database connections of its own, or print anything: callers render its
//! events.

pub mod hooks;
pub mod memory;
mod metrics;
pub mod pipeline;
pub mod policy;
pub mod record;
pub mod target;

pub use hooks::{DeployHook, HookRun};
pub use memory::MemoryLog;
pub use pipeline::{
    Cause, DeployError, DeploySink, Deployment, DeploymentRequest, FailureHandler, KIND_CHECK,
    KIND_FAILURE_HANDLER, KIND_HOOK, KIND_MIGRATION, KIND_NOTE, KIND_PROBE, KIND_RUN_REPORT,
    KIND_TRANSITION, Pipeline, SOAK_PHASE, StepFailure,
};
pub use policy::{
    BackupPolicy, DeployHooks, DeploymentPolicy, OnFailure, PostflightPolicy, PreflightPolicy,
    WatchPolicy,
};
pub use record::{
    AppliedMigration, DeployEvent, DeploymentLog, DeploymentOutcome, DeploymentRecord, LogError,
    NewDeployment, Step,
};
pub use target::{
    CatalogFor, DeployerPolicy, HandlerFor, LogFor, PipelineDeployer, TargetDeployApi,
    TargetDeployed, TargetDeployment, TargetPolicy, TargetRun,
};
