//! The rollback controller of one target: plans and runs the rollback of a deployment
//! over the capability traits (`MigrationApi`, `BackupApi`, `HealthApi`,
//! `DeploymentLog`). The planner ([`plan`]) resolves what `<to>` names (a deployment,
//! a schema version, a release), gathers the facts (undo availability, irreversible
//! migrations, the pre-deployment backup's manifest, live row counts, which tables each
//! migration writes) and walks an explicit decision tree — undo, table restore, full
//! restore, escalate — with one reason per branch and what each path would lose. The
//! executor ([`exec`]) takes a verified emergency backup, runs the hooks, the strategy
//! and the verification, records every step in the deployment's log (`rolling_back`,
//! `rolled_back`, `escalated`) and writes the incident report ([`report`]).
//! [`RollbackHandler`] is the pipeline's `FailureHandler` for `on_failure = "rollback"`.
//!
//! It must not reach into the capability crates' insides (it calls their traits only),
//! print anything (callers get events and notes), or decide exit codes.

pub mod api;
pub mod error;
pub mod exec;
pub mod facts;
pub mod failpoint;
pub mod handler;
pub mod hooks;
pub mod lifecycle;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod plan;
pub mod report;
pub mod resume;
pub mod run_lock;

pub use api::{
    Execute, LocalRollbacks, RollbackApi, RollbackStatus, Rollbackable, TargetRollbacks,
    incident_report,
};
pub use error::RollbackError;
pub use exec::{
    AbortSignal, Executor, KIND_INCIDENT_REPORT, KIND_ROLLBACK_PLAN, KIND_ROLLBACK_STEP, Outcome,
    recovery_database,
};
pub use facts::{LiveTable, NoScriptFacts, PgTableStats, ScriptFact, ScriptFacts, TableStats};
pub use handler::{HandlerNote, Notify, RollbackHandler, execute_command, shell_quote};
pub use model::{
    BackupUse, HookCommand, HookFailure, HookSetting, Mode, PathLoss, Reason, RevertedMigration,
    RollbackPlan, RollbackPolicy, RollbackSettings, Strategy, Trigger, TriggerKind,
};
pub use notify::{
    Delivery, KIND_NOTIFY, Notifier, NotifierSetting, NotifyAction, NotifyFormat, dedup_key,
};
pub use plan::{PlanInput, Planner, Resolved, RollbackTo, decide, resolve, resolve_in};
pub use report::{BackupLocations, IncidentReport, Severity, StepRecord};
pub use resume::{KIND_ROLLBACK_STEP_STARTED, NextAction, Progress, progress};
pub use run_lock::{PgRunLock, RunLock};
