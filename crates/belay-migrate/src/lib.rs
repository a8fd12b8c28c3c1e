//! The migration engine: reads migration sources in five layouts, plans what to apply
//! or undo against a target's history, and executes it lock-safely — one runner per
//! database, one transaction per migration with its history row inside, each lock waited
//! for only while no application query queues behind it longer than `max_blocking`.
//! It must not decide rollbacks (that is `belay-rollback`'s job) nor own the history
//! table's storage (that is `belay-history`).

pub mod api;
pub mod backup;
pub mod config;
pub mod directives;
pub mod error;
pub mod events;
pub mod gate;
pub mod guard;
pub mod runner;
pub mod sections;
pub mod source;
pub mod sql;
pub mod status;

pub use api::{
    ApiError, ApplyOptions, LocalTargets, MigrationApi, PlanStepView, PlanView, TargetSpec,
    Validation,
};
pub use backup::{BackupContext, BackupHook, BackupStep, BackupTaken};
pub use config::ExecConfig;
pub use error::{ErrorKind, GuardExhaustion, MigrateError, ScriptFailure};
pub use events::{Direction, Event, EventKind, EventSink, RunnerHolder};
pub use gate::{GateScript, ScriptGate};
pub use guard::{BlockersGone, LockGuardHook, LockTrip, LockWatch, SessionBrief, WatchEnd};
pub use runner::{
    CheckOverride, Migrator, Plan, RepairAction, RepairScope, RunReport, RunnerSession,
    SessionStash, Step, StepResult, Target, UndoTarget,
};
pub use source::{Layout, Migration, MigrationSet, SourceError, load};
pub use status::{MigrationStatus, State};
