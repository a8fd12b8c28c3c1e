//! A gate over the scripts a run is about to apply, without depending on the linter: the
//! executor calls a [`ScriptGate`] for `migrate` once it holds the runner lock and knows
//! the pending steps, before the backup hook and before any statement. Checking there,
//! rather than in the caller, protects every way a run can start (local CLI, remote CLI
//! through the agent, fleet deployments) and checks exactly the scripts that will run. A
//! refusal refuses the run with nothing applied and history untouched.

use crate::api::ApiError;
use crate::events::Direction;
use crate::source::Script;

/// One pending script, in run order, with what a checker cannot see in its text.
#[derive(Debug, Clone)]
pub struct GateScript {
    /// The script's name as history records it (relative to the migrations directory).
    pub script: String,
    pub version: Option<String>,
    /// `Forward` or `Repeatable`.
    pub direction: Direction,
    /// Path, text and directives (`allow` included).
    pub source: Script,
    /// An undo script exists, or `-- belay:irreversible` says none is meant to;
    /// repeatables count as undoable (they are re-run, not undone).
    pub has_undo: bool,
}

/// Checks the pending scripts of a `migrate` run. Implemented over `belay-lint` in
/// `belay-guards`.
#[async_trait::async_trait]
pub trait ScriptGate: Send + Sync {
    /// `Ok` lets the run go on, with lines the executor emits as `warning` events (e.g.
    /// findings the gate accepted, and why); an error refuses it, its kind and message
    /// reaching the caller unchanged.
    ///
    /// `conn` is the run's own session, holding the runner lock: what the database says
    /// about the scripts' tables (their size, the server version) is read there, on the
    /// state the scripts will meet. The gate must leave the session as it found it (no
    /// open transaction, no changed settings).
    async fn check(
        &self,
        conn: &mut sqlx::PgConnection,
        scripts: &[GateScript],
    ) -> Result<Vec<String>, ApiError>;
}
