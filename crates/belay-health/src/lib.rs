//! The health checker: preflight checks before a migration, postflight validation after
//! it, and probes (HTTP and SQL, with Kubernetes probe semantics) that raise trigger
//! events. It owns measuring, judging against configurable thresholds and reporting —
//! every result carries the measured value, the threshold and a remedy — and nothing
//! else: it must not roll back, run migrations or decide what happens next. Callers (the
//! CLI, the agent, the rollback controller) act on its results and events.
//!
//! - [`preflight`] / [`preflight_url`]: pass | warn | block per check; [`any_blocks`],
//!   [`apply_overrides`] for `--override-check NAME --reason …`.
//! - [`postflight`]: invalid indexes, `NOT VALID` constraints, user assertions
//!   (`[[checks]]`), smoke queries, `verify.sql` scripts.
//! - [`run_probe`] / [`watch`]: a stream of [`ProbeEvent`]s driven by the pure
//!   [`ProbeMachine`]; an event with `triggered: true` is the one a rollback controller
//!   acts on.
//! - [`HealthApi`]: preflight, postflight and probes of a named target, as every caller
//!   sees them (in-process: [`HealthTargets`]; over gRPC and through the controller:
//!   `belay-rpc`).

mod api;
mod check;
mod disk;
mod error;
mod pg_error;
mod postflight;
mod preflight;
mod probe;
mod units;

pub use api::{
    HealthApi, HealthTarget, HealthTargets, MigrationFacts, PreflightOptions, ProbeCheck,
    ProbeEvents, TargetProbe,
};
pub use check::{CheckResult, CheckStatus, Severity, any_blocks, apply_overrides};
pub use disk::{DiskSpace, disk_space};
pub use error::HealthError;
pub use postflight::{
    EXPECTATION_FORMS, Expectation, PostflightSpec, SmokeQuery, UserCheck, VerifyScript, postflight,
};
pub use preflight::{
    MigrationSummary, PREFLIGHT_CHECKS, PreflightContext, Thresholds, preflight, preflight_url,
};
pub use probe::{
    Evidence, HttpProbe, PROBE_FORMS, ProbeEvent, ProbeKind, ProbeMachine, ProbeOutcome,
    ProbeResult, ProbeSpec, ProbeState, ProbeStream, SqlProbe, Transition, WatchOutcome, run_probe,
    run_probes, watch,
};
pub use units::{format_bytes, parse_bytes};
