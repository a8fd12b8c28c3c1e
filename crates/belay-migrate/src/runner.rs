//! The executor: one runner per database, one transaction per migration with its history
//! row inside, lock waits given up (and retried once the blockers leave) as soon as the
//! application queues behind them, failures mapped to `file:line`.

use crate::backup::{BackupContext, BackupHook, BackupStep};
use crate::config::ExecConfig;
use crate::directives::NoTransactionSource;
use crate::error::{GuardExhaustion, MigrateError, ScriptFailure};
use crate::events::{Direction, Event, EventKind, EventSink, RunnerHolder};
use crate::gate::{GateScript, ScriptGate};
use crate::guard::{BlockersGone, LockGuardHook, LockTrip, LockWatch, SessionBrief, WatchEnd};
use crate::source::{Layout, MigrationSet, Script};
use crate::sql::{self, Statement};
use crate::status::{self, MigrationStatus, State};
use belay_core::{DatabaseUrl, Version, format_duration};
use belay_history::{EntryType, History, HistoryRow, NewRow, Outcome, RowState};
use chrono::Utc;
use futures::TryStreamExt as _;
use sqlx::Either;
use sqlx::postgres::{PgConnectOptions, PgDatabaseError, PgErrorPosition};
use sqlx::{ConnectOptions, Connection, PgConnection, Row};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};
use tracing::{Instrument, debug, info_span};
use uuid::Uuid;

/// First key of the runner's advisory lock ("bela"); the second is the history schema's
/// hash, so two belay histories in one database do not exclude each other.
const LOCK_CLASS: i32 = 0x6265_6c61;

/// How far `migrate` goes.
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub to: Option<String>,
    pub steps: Option<usize>,
}

/// How far `undo` goes back.
#[derive(Debug, Clone)]
pub enum UndoTarget {
    Steps(usize),
    /// Undo every applied migration newer than this version.
    To(String),
    All,
}

/// One script the executor will run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Step {
    pub version: Option<String>,
    pub description: String,
    pub script: String,
    pub direction: Direction,
    pub no_transaction: Option<NoTransactionSource>,
    #[serde(skip)]
    pub source: Script,
    #[serde(skip)]
    checksum: String,
    /// The backup taken before the run, recorded in this step's history row.
    #[serde(skip)]
    backup_id: Option<String>,
}

impl Step {
    pub fn path(&self) -> &std::path::Path {
        &self.source.path
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Problems that would make `migrate` refuse (drift, failed migrations).
    pub blockers: Vec<String>,
    pub warnings: Vec<String>,
    #[serde(skip)]
    pub history_exists: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StepResult {
    pub version: Option<String>,
    pub script: String,
    pub direction: Direction,
    pub execution_ms: u64,
    pub retries: u32,
    pub lock_wait_ms: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub deployment_id: Uuid,
    pub results: Vec<StepResult>,
    /// Set when another runner held the lock past `runner_wait` but left nothing to do.
    pub other_runner: Option<RunnerHolder>,
}

/// What `repair` may touch: one migration (`version`), and which of the two kinds of
/// repair. The default is everything, as `belay repair` without flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairScope {
    /// Only this migration (`repair --version V`).
    pub version: Option<String>,
    /// Only realign checksums (`--checksums-only`): failed rows stay failed.
    pub checksums_only: bool,
    /// Only set failed or interrupted rows aside (`--failed-only`): drift stays refused.
    pub failed_only: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RepairAction {
    pub version: Option<String>,
    pub script: String,
    pub action: String,
}

/// A preflight check the operator overrode for this run (`migrate --override-check NAME
/// --reason "…"`), recorded in the notes of every history row the run writes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CheckOverride {
    pub check: String,
    pub reason: String,
}

/// One lock guard trip, as a history row's notes keep it.
#[derive(Debug, Clone, serde::Serialize)]
struct TripNote {
    #[serde(flatten)]
    trip: LockTrip,
    attempt: u32,
    /// The statement's line in the script.
    line: usize,
    /// Whether the cancel stopped the statement (false: it finished first).
    cancelled: bool,
}

/// A session holding the runner lock (see [`Migrator::lock_runner`]). Dropping it without
/// [`release`](Self::release) closes the connection, which releases the lock too.
#[derive(Debug)]
pub struct RunnerSession {
    conn: PgConnection,
    schema: String,
}

impl RunnerSession {
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    /// Releases the lock and closes the connection.
    pub async fn release(mut self) {
        let _ = sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
            .bind(LOCK_CLASS)
            .bind(&self.schema)
            .execute(&mut self.conn)
            .await;
        let _ = self.conn.close().await;
    }
}

/// Runs migrations from one set against one database.
pub struct Migrator {
    url: DatabaseUrl,
    /// Shared, not copied: a command's several calls run from the set it read once.
    set: Arc<MigrationSet>,
    config: ExecConfig,
    history: History,
    sink: EventSink,
    deployment_id: Uuid,
    backup_hook: Option<Arc<dyn BackupHook>>,
    lock_guard: Option<Arc<dyn LockGuardHook>>,
    script_gate: Option<Arc<dyn ScriptGate>>,
    overrides: Vec<CheckOverride>,
    /// Why the guard went off in this run, once it failed: it stays off until the run
    /// ends, so a guard that cannot connect costs one attempt (and one warning), not one
    /// per statement while the migration may be holding its locks.
    guard_off: Mutex<Option<String>>,
    /// Where a read leaves its session for the command's next call (see [`SessionStash`]).
    stash: Option<Arc<SessionStash>>,
}

/// One idle session of a target kept between the calls of one command: its plan's read
/// leaves the session here and the run (or the next read) takes it, instead of each
/// opening its own (a connection costs a few milliseconds of the server's time, most of
/// a small deployment's). Only reads leave a session: one that ran a migration's
/// scripts may hold what they left (an advisory lock, a `LISTEN`), and is closed.
/// Not for a daemon: an idle session would sit outside its connection budget.
/// Once a run has taken the session, nothing is kept any more: what follows a run (its
/// postflight, a watch window of minutes) would leave an idle session open until the
/// command ends.
#[derive(Debug, Default)]
pub struct SessionStash(Mutex<Stashed>);

#[derive(Debug, Default)]
struct Stashed {
    kept: Option<(PgConnection, Instant)>,
    /// A run has taken the stash's session: reads close theirs from now on.
    retired: bool,
}

impl SessionStash {
    /// Older than this, a kept session is closed rather than reused: the server (an
    /// `idle_session_timeout`, a pooler) may have dropped it while the user read a plan.
    const FRESH_FOR: Duration = Duration::from_secs(30);
    /// A kept session that does not answer its ping within this is dropped for a new one
    /// (a network path gone silent would hold the ping for the kernel's retransmissions).
    const PING_WITHIN: Duration = Duration::from_secs(2);

    fn take(&self, for_run: bool) -> Option<PgConnection> {
        let mut s = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        s.retired |= for_run;
        s.kept
            .take()
            .filter(|(_, at)| at.elapsed() < Self::FRESH_FOR)
            .map(|(conn, _)| conn)
    }

    fn keep(&self, conn: PgConnection) {
        let mut s = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if !s.retired {
            s.kept = Some((conn, Instant::now()));
        }
    }
}

impl std::fmt::Debug for Migrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migrator")
            .field("url", &self.url)
            .field("dir", &self.set.dir)
            .field("deployment_id", &self.deployment_id)
            .field("backup_hook", &self.backup_hook.is_some())
            .field("lock_guard", &self.lock_guard.is_some())
            .field("script_gate", &self.script_gate.is_some())
            .field("overrides", &self.overrides)
            .finish_non_exhaustive()
    }
}

fn is_lock_timeout(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("55P03"))
}

/// `query_canceled`: the lock guard's cancel (or a statement_timeout, or someone's
/// pg_cancel_backend — only a trip reported by the guard makes it the guard's).
fn is_query_canceled(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("57014"))
}

/// What a statement came to.
/// A failed attempt: the step and statement that failed, the error, whether the guard's
/// cancel failed it, whom it waited for at the guard's last look, and the error
/// position's shift (see [`script_error_at`]).
type Failure<'s> = (
    &'s Step,
    &'s Statement,
    sqlx::Error,
    bool,
    Vec<SessionBrief>,
    usize,
);

/// How a batch ([`Migrator::run_batch`]) went.
enum Batch<'s> {
    /// The migration committed, its history row `rank` with it; `reset_done`: the session
    /// is ready for the next one.
    Committed {
        rank: Option<i32>,
        reset_done: bool,
    },
    Failed(Failure<'s>),
    /// The server refused the message before running any of it (a syntax error).
    Unparsed,
    /// The retry's wait for a ripe moment failed (rolled back; nothing of the script ran).
    RipeWaitFailed,
}

/// Whether a transactional script's statements can go in one message with its BEGIN:
/// nothing among them needs a round trip of its own (COPY's inline data, transaction
/// control, `CONCURRENTLY`), the server times each statement of a message on its own
/// (≥ 13; belay batches from 14, where the session reset rides with COMMIT too), and the
/// server will count the statements as belay does. The batch's accounting rests on that
/// count (which statement failed, whether COMMIT went through), so a statement the
/// splitter cut inside parentheses (a multi-action rule) keeps the script statement by
/// statement, where it fails as it always did.
fn batchable(conn: &PgConnection, script: &Script) -> bool {
    conn.server_version_num().is_some_and(|v| v >= 140_000)
        && !script.statements.is_empty()
        && script.statements.iter().all(|st| {
            st.copy_data.is_none()
                && !st.concurrently
                && !st.opens_transaction()
                && !st.closes_transaction()
                && sql::parens_balanced(st.text(&script.text))
        })
}

struct Ran {
    result: Result<(), sqlx::Error>,
    /// The guard cancelled the statement: it failed with 57014 and the guard tripped.
    tripped: bool,
    /// Whom the statement waited for at the guard's last look (empty: unwatched, or never
    /// seen waiting).
    last_blockers: Vec<SessionBrief>,
}

/// The write fence of a data-preserving undo script. In the script's own transaction,
/// before its first statement: `LOCK TABLE <tables> IN EXCLUSIVE MODE` (under the script's
/// `lock_timeout`, retries and the lock guard, like any statement of it), which waits for
/// the application's open writes to those tables to commit and holds new ones back while
/// reads go on (pg_dump's ACCESS SHARE included); then the hook's snapshot, taken by
/// another session, sees every committed row; then the script drops them, and COMMIT
/// releases the fence. One fence and one snapshot per script, so each script keeps its
/// own transaction, retries and history row, and writes stall for one script's snapshot
/// at a time.
struct UndoFence<'a> {
    hook: &'a dyn BackupHook,
    tables: Vec<String>,
}

impl UndoFence<'_> {
    /// `step` with the fence's `LOCK TABLE` as its only statement, so the fence runs
    /// through `run_statement` (guard, events, trip notes) and its waits and failures are
    /// reported against the undo script (at line 1).
    fn lock_step(&self, step: &Step) -> Step {
        // The session sits idle in its transaction while the snapshot runs: a server's
        // idle_in_transaction_session_timeout must not end it (and the fence) meanwhile.
        let text = format!(
            "SET LOCAL idle_in_transaction_session_timeout = 0; LOCK TABLE {} IN EXCLUSIVE MODE",
            self.tables.join(", ")
        );
        let mut fence = step.clone();
        fence.source.statements = vec![Statement {
            start: 0,
            end: text.len(),
            words: vec!["SET".into(), "LOCAL".into()],
            concurrently: false,
            copy_data: None,
        }];
        fence.source.text = text;
        fence
    }
}

/// A table name `to_regclass` parses without raising: one or two parts (three name
/// another database, which it refuses), each a plain identifier or a double-quoted one.
fn is_plain_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    (1..=2).contains(&parts.len())
        && parts.iter().all(
            |p| match p.strip_prefix('"').and_then(|q| q.strip_suffix('"')) {
                Some(q) => !q.is_empty() && !q.contains('"'),
                None => {
                    let mut chars = p.chars();
                    chars
                        .next()
                        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
                }
            },
        )
}

/// The tables a run's backup covers, as the scripts write them: those named in
/// `-- belay:tables=`, those the DDL drops data from (dropped, truncated, columns
/// dropped) and, for a migration, those it alters.
fn backup_table_names(steps: &[Step], undo: bool) -> Vec<String> {
    let mut named = Vec::new();
    for step in steps {
        named.extend(step.source.directives.tables.iter().cloned());
        for st in &step.source.statements {
            let t = st.table_targets(&step.source.text);
            named.extend(t.data_lost);
            if !undo {
                named.extend(t.altered);
            }
        }
    }
    named
}

impl Migrator {
    pub fn new(
        url: DatabaseUrl,
        set: impl Into<Arc<MigrationSet>>,
        config: ExecConfig,
        sink: EventSink,
    ) -> Result<Self, MigrateError> {
        let history = History::new(&config.history_schema)?;
        Ok(Migrator {
            url,
            set: set.into(),
            config,
            history,
            sink,
            deployment_id: Uuid::new_v4(),
            backup_hook: None,
            lock_guard: None,
            script_gate: None,
            overrides: Vec::new(),
            guard_off: Mutex::new(None),
            stash: None,
        })
    }

    /// Reads leave their session in `stash`, and every call takes a session from it
    /// before opening one (see [`SessionStash`]).
    pub fn with_session_stash(mut self, stash: Arc<SessionStash>) -> Self {
        self.stash = Some(stash);
        self
    }

    /// After a read: the session for the next call, when a stash is kept.
    fn leave(&self, conn: PgConnection) {
        if let Some(stash) = &self.stash {
            stash.keep(conn);
        }
    }

    /// Guards every statement of `migrate` and `undo` with `hook` (see [`LockGuardHook`]),
    /// with `max_blocking` from the [`ExecConfig`].
    pub fn with_lock_guard(mut self, hook: Arc<dyn LockGuardHook>) -> Self {
        self.lock_guard = Some(hook);
        self
    }

    /// Checks the pending scripts of `migrate` with `gate` before the backup and the first
    /// statement (see [`ScriptGate`]); a refusal applies nothing.
    pub fn with_script_gate(mut self, gate: Arc<dyn ScriptGate>) -> Self {
        self.script_gate = Some(gate);
        self
    }

    /// Preflight checks overridden for this run, recorded in the notes of its history rows.
    pub fn with_overrides(mut self, overrides: Vec<CheckOverride>) -> Self {
        self.overrides = overrides;
        self
    }

    /// Takes a backup through `hook` before `migrate` and `undo` change anything (see
    /// [`BackupHook`]); its id goes into every history row of the run.
    pub fn with_backup_hook(mut self, hook: Arc<dyn BackupHook>) -> Self {
        self.backup_hook = Some(hook);
        self
    }

    /// Runs under a caller-chosen deployment id (the controller's), recorded in every
    /// history row and event of this run.
    pub fn with_deployment_id(mut self, id: Uuid) -> Self {
        self.deployment_id = id;
        self
    }

    pub fn deployment_id(&self) -> Uuid {
        self.deployment_id
    }

    pub fn set(&self) -> &MigrationSet {
        &self.set
    }

    /// The schema of the history table this migrator keeps.
    pub fn history_schema(&self) -> &str {
        self.history.schema()
    }

    fn emit(&self, kind: EventKind) {
        (self.sink)(&Event {
            deployment_id: self.deployment_id,
            at: Utc::now(),
            kind,
        });
    }

    fn db_err(&self, doing: &'static str) -> impl Fn(sqlx::Error) -> MigrateError + '_ {
        move |e| MigrateError::Database {
            url: self.url.to_string(),
            doing,
            reason: crate::error::db_error_text(&e),
        }
    }

    async fn connect(&self) -> Result<PgConnection, MigrateError> {
        self.connect_for(false).await
    }

    /// A session, from the stash when it keeps a live one; `for_run`: the stash keeps no
    /// session from now on (see [`SessionStash`]).
    async fn connect_for(&self, for_run: bool) -> Result<PgConnection, MigrateError> {
        if let Some(mut conn) = self.stash.as_ref().and_then(|s| s.take(for_run)) {
            // One round trip tells a live session from one the server has closed.
            let ping =
                tokio::time::timeout(SessionStash::PING_WITHIN, sqlx::Connection::ping(&mut conn));
            if matches!(ping.await, Ok(Ok(()))) {
                return Ok(conn);
            }
        }
        let connect_err = |reason: String| MigrateError::Connect {
            url: self.url.to_string(),
            reason,
        };
        let opts = PgConnectOptions::from_str(self.url.expose())
            .map_err(|e| connect_err(belay_core::redact_url(&e.to_string())))?
            .application_name("belay")
            .log_statements(tracing::log::LevelFilter::Trace)
            // A migration's message waits for its locks and runs the whole script: slow is
            // its nature, and belay reports its time itself; sqlx's default would print
            // the message (history row included) as a warning on the user's terminal.
            .log_slow_statements(tracing::log::LevelFilter::Trace, Duration::from_secs(1));
        let mut conn = opts
            .connect()
            .await
            .map_err(|e| connect_err(belay_core::redact_url(&crate::error::db_error_text(&e))))?;
        belay_core::send_without_delay();
        apply_session_settings(&mut conn).await;
        Ok(conn)
    }

    /// Puts the session back as [`Self::connect`] left it, after a migration: scripts set
    /// session state (pg_dump's `search_path = ''`, `lock_timeout = 0`,
    /// `check_function_bodies = false`, …; a `SET ROLE`) that must reach neither the next
    /// migration, which was written for a fresh session, nor belay's own statements. Not
    /// `DISCARD ALL`: it would release the runner lock and drop sqlx's prepared statements.
    async fn reset_session(&self, conn: &mut PgConnection) -> Result<(), MigrateError> {
        sqlx::raw_sql(RESET_SESSION_SQL)
            .execute(&mut *conn)
            .await
            .map_err(self.db_err("resetting the session after a migration"))?;
        apply_session_settings(conn).await;
        Ok(())
    }

    async fn runner_holder(
        &self,
        conn: &mut PgConnection,
    ) -> Result<Option<RunnerHolder>, MigrateError> {
        let row = sqlx::query(
            "SELECT a.pid, a.backend_start, coalesce(a.application_name, ''), a.usename::text, host(a.client_addr) \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND l.classid = $1::int4::oid AND l.objid = hashtext($2)::oid \
             LIMIT 1",
        )
        .bind(LOCK_CLASS)
        .bind(self.history.schema())
        .fetch_optional(&mut *conn)
        .await
        .map_err(self.db_err("looking up the runner lock holder"))?;
        Ok(row.map(|r| RunnerHolder {
            pid: r.get(0),
            since: r.get(1),
            application_name: r.get(2),
            user: r.get(3),
            client_addr: r.get(4),
        }))
    }

    /// Waits for the runner lock by polling `pg_try_advisory_lock`: a session blocked in
    /// `pg_advisory_lock` holds a snapshot, and the holder's `CREATE INDEX CONCURRENTLY`
    /// would wait for that snapshot forever.
    async fn acquire_runner_lock(
        &self,
        conn: &mut PgConnection,
    ) -> Result<Option<RunnerHolder>, MigrateError> {
        let started = Instant::now();
        let mut announced = false;
        let mut poll = Duration::from_millis(50);
        loop {
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
                .bind(LOCK_CLASS)
                .bind(self.history.schema())
                .fetch_one(&mut *conn)
                .await
                .map_err(self.db_err("taking the runner lock"))?;
            if got {
                if announced {
                    self.emit(EventKind::RunnerAcquired {
                        waited_ms: started.elapsed().as_millis() as u64,
                    });
                }
                return Ok(None);
            }
            let holder = self.runner_holder(conn).await?;
            if !announced {
                announced = true;
                self.emit(EventKind::RunnerWaiting {
                    holder: holder.clone(),
                });
            }
            if started.elapsed() >= self.config.runner_wait {
                return Ok(Some(holder.unwrap_or(RunnerHolder {
                    pid: 0,
                    since: None,
                    application_name: "unknown".into(),
                    user: None,
                    client_addr: None,
                })));
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(Duration::from_millis(500));
        }
    }

    async fn release_runner_lock(&self, conn: &mut PgConnection) {
        let _ = sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
            .bind(LOCK_CLASS)
            .bind(self.history.schema())
            .execute(&mut *conn)
            .await;
    }

    async fn read(&self, conn: &mut PgConnection) -> Result<(Vec<HistoryRow>, bool), MigrateError> {
        let rows = self.history.rows(conn).await?;
        let active = self.runner_holder(conn).await?.is_some();
        Ok((rows, active))
    }

    /// Where every migration stands.
    pub async fn status(&self) -> Result<Vec<MigrationStatus>, MigrateError> {
        let mut conn = self.connect().await?;
        let (rows, active) = self.read(&mut conn).await?;
        self.leave(conn);
        Ok(status::compute(&self.set, &rows, active))
    }

    /// Problems that make `migrate` and `undo` refuse, one line each, naming files.
    fn blockers(statuses: &[MigrationStatus]) -> Vec<String> {
        statuses
            .iter()
            .filter_map(|s| {
                let v = s.version.as_deref().unwrap_or("R");
                match s.state {
                    State::Failed => Some(format!(
                        "migration {v} ({}) failed or was interrupted{}: inspect the database, then run `belay repair` to mark it resolved",
                        s.script,
                        s.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
                    )),
                    State::ChecksumMismatch => Some(format!(
                        "migration {v} ({}) changed after it was applied: run `belay validate`; restore the file, or run `belay repair` if the edit is deliberate",
                        s.script
                    )),
                    State::Running => Some(format!(
                        "migration {v} ({}) is running in another belay process",
                        s.script
                    )),
                    _ => None,
                }
            })
            .collect()
    }

    fn forward_steps(
        &self,
        statuses: &[MigrationStatus],
        target: &Target,
    ) -> Result<Vec<Step>, MigrateError> {
        let to = match &target.to {
            Some(t) => {
                let v = Version::parse(t).map_err(|_| MigrateError::UnknownVersion(t.clone()))?;
                if self.set.find(&v).is_none() {
                    return Err(MigrateError::UnknownVersion(t.clone()));
                }
                Some(v)
            }
            None => None,
        };
        let state_of: std::collections::HashMap<&str, State> = statuses
            .iter()
            .filter(|s| s.entry_type.is_forward())
            .map(|s| (s.script.as_str(), s.state))
            .collect();
        let mut steps = Vec::new();
        for m in &self.set.migrations {
            if to.as_ref().is_some_and(|t| &m.version > t) {
                break;
            }
            let st = state_of.get(m.script_name.as_str()).copied();
            if matches!(st, Some(State::Pending | State::Undone)) {
                steps.push(Step {
                    version: Some(m.version.to_string()),
                    description: m.description.clone(),
                    script: m.script_name.clone(),
                    direction: Direction::Forward,
                    no_transaction: m.up.no_transaction(),
                    source: m.up.clone(),
                    checksum: m.checksum.to_string(),
                    backup_id: None,
                });
            }
        }
        if let Some(n) = target.steps {
            steps.truncate(n);
        }
        if target.to.is_none() && target.steps.is_none() {
            for r in &self.set.repeatables {
                let pending = statuses.iter().any(|s| {
                    s.entry_type == EntryType::Repeatable
                        && s.script == r.script_name
                        && s.state == State::Pending
                });
                if pending {
                    steps.push(Step {
                        version: None,
                        description: r.description.clone(),
                        script: r.script_name.clone(),
                        direction: Direction::Repeatable,
                        no_transaction: r.script.no_transaction(),
                        source: r.script.clone(),
                        checksum: r.script.checksum.to_string(),
                        backup_id: None,
                    });
                }
            }
        }
        Ok(steps)
    }

    fn undo_steps(
        &self,
        statuses: &[MigrationStatus],
        target: &UndoTarget,
    ) -> Result<Vec<Step>, MigrateError> {
        let mut applied: Vec<(Version, &MigrationStatus)> = statuses
            .iter()
            .filter(|s| s.entry_type.is_forward())
            .filter(|s| matches!(s.state, State::Success | State::Missing | State::Future))
            .filter_map(|s| Some((Version::parse(s.version.as_deref()?).ok()?, s)))
            .collect();
        applied.sort_by(|a, b| b.0.cmp(&a.0));
        let chosen: Vec<_> = match target {
            UndoTarget::All => applied,
            UndoTarget::Steps(n) => applied.into_iter().take(*n).collect(),
            UndoTarget::To(t) => {
                let v = Version::parse(t).map_err(|_| MigrateError::UnknownVersion(t.clone()))?;
                applied.into_iter().filter(|(av, _)| av > &v).collect()
            }
        };
        let mut problems = Vec::new();
        let mut steps = Vec::new();
        for (v, s) in chosen {
            let Some(m) = self.set.find(&v) else {
                problems.push(format!(
                    "migration {v} ({}) is applied but its files are not in {}",
                    s.script,
                    self.set.dir.display()
                ));
                continue;
            };
            if m.up.directives.irreversible {
                problems.push(format!(
                    "{} is marked `-- belay:irreversible`",
                    m.up.path.display()
                ));
                continue;
            }
            let Some(down) = &m.down else {
                problems.push(format!(
                    "{} has no undo script; add one ({}) or restore from a backup",
                    m.up.path.display(),
                    match self.set.layout {
                        Some(Layout::Paired) => "<version>_<desc>.down.sql",
                        Some(Layout::Folder) => "down.sql in its folder",
                        Some(Layout::Goose) => "statements under `-- +goose Down` in the same file",
                        Some(Layout::Dbmate) =>
                            "statements under `-- migrate:down` in the same file",
                        Some(Layout::Flyway) | None => "U<version>__<desc>.sql",
                    }
                ));
                continue;
            };
            steps.push(Step {
                version: Some(m.version.to_string()),
                description: m.description.clone(),
                script: crate::source::relative_name(&self.set.dir, &down.path),
                direction: Direction::Undo,
                no_transaction: down.no_transaction(),
                source: down.clone(),
                checksum: down.checksum.to_string(),
                backup_id: None,
            });
        }
        if !problems.is_empty() {
            return Err(MigrateError::Refused {
                action: "undo",
                reason: format!("nothing was undone:\n  {}", problems.join("\n  ")),
            });
        }
        Ok(steps)
    }

    /// What `migrate` would do now, without taking locks or writing anything.
    pub async fn plan(&self, target: &Target) -> Result<Plan, MigrateError> {
        let mut conn = self.connect().await?;
        let (rows, active) = self.read(&mut conn).await?;
        let statuses = status::compute(&self.set, &rows, active);
        let steps = self.forward_steps(&statuses, target)?;
        let history_exists = self.history.exists(&mut conn).await?;
        self.leave(conn);
        Ok(Plan {
            steps,
            blockers: Self::blockers(&statuses),
            warnings: self.set.warnings.clone(),
            history_exists,
        })
    }

    /// What `undo` would do now.
    pub async fn plan_undo(&self, target: &UndoTarget) -> Result<Plan, MigrateError> {
        let mut conn = self.connect().await?;
        let (rows, active) = self.read(&mut conn).await?;
        self.leave(conn);
        let statuses = status::compute(&self.set, &rows, active);
        Ok(Plan {
            steps: self.undo_steps(&statuses, target)?,
            blockers: Self::blockers(&statuses),
            warnings: self.set.warnings.clone(),
            history_exists: !rows.is_empty(),
        })
    }

    /// Applies pending migrations up to `target`.
    pub async fn migrate(&self, target: &Target) -> Result<RunReport, MigrateError> {
        self.run(|statuses| self.forward_steps(statuses, target), "migrate")
            .instrument(info_span!("migrate", deployment_id = %self.deployment_id))
            .await
    }

    /// Reverts applied migrations, newest first, with their undo scripts.
    pub async fn undo(&self, target: &UndoTarget) -> Result<RunReport, MigrateError> {
        self.run(|statuses| self.undo_steps(statuses, target), "undo")
            .instrument(info_span!("undo", deployment_id = %self.deployment_id))
            .await
    }

    async fn run(
        &self,
        choose: impl Fn(&[MigrationStatus]) -> Result<Vec<Step>, MigrateError>,
        action: &'static str,
    ) -> Result<RunReport, MigrateError> {
        for w in &self.set.warnings {
            self.emit(EventKind::Warning { message: w.clone() });
        }
        // A guard that failed in an earlier run of this migrator may work again.
        *self
            .guard_off
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        let mut conn = self.connect_for(true).await?;
        let mut report = RunReport {
            deployment_id: self.deployment_id,
            results: Vec::new(),
            other_runner: None,
        };
        if let Some(holder) = self.acquire_runner_lock(&mut conn).await? {
            // The other runner may be doing exactly our work; if so, there is no failure.
            let (rows, _) = self.read(&mut conn).await?;
            let statuses = status::compute(&self.set, &rows, true);
            if choose(&statuses)?.is_empty() {
                report.other_runner = Some(holder);
                return Ok(report);
            }
            return Err(MigrateError::RunnerBusy {
                holder: Box::new(holder),
                waited_s: self.config.runner_wait.as_secs(),
            });
        }
        let result = self
            .run_locked(&mut conn, &choose, action, &mut report)
            .await;
        if let Some(hook) = &self.lock_guard {
            hook.release().await;
        }
        self.release_runner_lock(&mut conn).await;
        let _ = conn.close().await;
        result.map(|()| report)
    }

    async fn run_locked(
        &self,
        conn: &mut PgConnection,
        choose: &impl Fn(&[MigrationStatus]) -> Result<Vec<Step>, MigrateError>,
        action: &'static str,
        report: &mut RunReport,
    ) -> Result<(), MigrateError> {
        let rows = self.history.ensure_and_read(conn).await?;
        // We hold the lock: a `running` row now can only be a crash's remains.
        let statuses = status::compute(&self.set, &rows, false);
        let blockers = Self::blockers(&statuses);
        if !blockers.is_empty() {
            return Err(MigrateError::Refused {
                action,
                reason: blockers.join("\n  "),
            });
        }
        let mut steps = choose(&statuses)?;
        if let Some(newest) = newest_applied(&statuses) {
            for step in steps.iter().filter(|s| s.direction == Direction::Forward) {
                if step
                    .version
                    .as_deref()
                    .and_then(|v| Version::parse(v).ok())
                    .is_some_and(|v| v < newest)
                {
                    self.emit(EventKind::Warning {
                        message: format!(
                            "{} is applied out of order: version {newest} is already applied",
                            step.script
                        ),
                    });
                }
            }
        }
        // The gate sees exactly the scripts about to run, under the lock; it goes before
        // the backup so a refused run costs no pg_dump.
        if !steps.is_empty()
            && let Some(gate) = &self.script_gate
        {
            self.check_scripts(conn, gate.as_ref(), &steps).await?;
        }
        // An undo whose scripts drop data snapshots it script by script, each inside its
        // script's own transaction behind a write fence (see `UndoFence`).
        let fences = match &self.backup_hook {
            Some(hook) => self.undo_fences(conn, hook.as_ref(), &steps).await?,
            None => vec![Vec::new(); steps.len()],
        };
        // Otherwise the backup comes after the lock and the plan, before the first
        // statement.
        if !steps.is_empty()
            && fences.iter().all(Vec::is_empty)
            && let Some(hook) = &self.backup_hook
        {
            let backup_id = self
                .take_backup(conn, hook.as_ref(), &steps, action)
                .await?;
            for step in &mut steps {
                step.backup_id.clone_from(&backup_id);
            }
        }
        let backend_pid = self.backend_pid(conn, !steps.is_empty()).await;
        for (mut step, tables) in steps.into_iter().zip(fences) {
            let fence = match &self.backup_hook {
                Some(hook) if !tables.is_empty() => Some(UndoFence {
                    hook: hook.as_ref(),
                    tables,
                }),
                _ => None,
            };
            let fence = match fence {
                Some(f) if step.no_transaction.is_some() => {
                    step.backup_id = self.unfenced_snapshot(&step, f).await?;
                    None
                }
                f => f,
            };
            let result = self.execute(conn, &step, backend_pid, fence).await?;
            report.results.push(result);
        }
        Ok(())
    }

    /// For each step of an undo run, the existing tables it drops data from (or names in
    /// `-- belay:tables=`): the tables its snapshot holds and its fence locks. All empty
    /// for a migration run, when the hook takes nothing before an undo, or when no
    /// script drops data; then the run takes one backup up front as before.
    async fn undo_fences(
        &self,
        conn: &mut PgConnection,
        hook: &dyn BackupHook,
        steps: &[Step],
    ) -> Result<Vec<Vec<String>>, MigrateError> {
        let mut fences = vec![Vec::new(); steps.len()];
        if !steps.iter().any(|s| s.direction == Direction::Undo) || !hook.snapshots_undo() {
            return Ok(fences);
        }
        for (fence, step) in fences.iter_mut().zip(steps) {
            if step.source.statements.is_empty() {
                continue;
            }
            let named = backup_table_names(std::slice::from_ref(step), true);
            *fence = self.existing_tables(conn, &named).await?;
        }
        Ok(fences)
    }

    /// A no-transaction undo script that drops data: nothing can hold writes between its
    /// snapshot and its drop (each of its statements commits on its own), so its snapshot
    /// is taken just before it runs, and the run says what that does not guarantee.
    async fn unfenced_snapshot(
        &self,
        step: &Step,
        fence: UndoFence<'_>,
    ) -> Result<Option<String>, MigrateError> {
        self.emit(EventKind::Warning {
            message: format!(
                "{} runs outside a transaction, so belay cannot hold writes to {} between its snapshot and its drop: rows written to them in between are not in the snapshot. For an exact snapshot, move the DROP into an undo script that runs in a transaction",
                step.script,
                fence.tables.join(", ")
            ),
        });
        self.backup_hook_call(fence.hook, std::slice::from_ref(step), fence.tables, "undo")
            .await
    }

    /// The migration session's pid, for the lock guard to watch; `None` without a guard
    /// (or nothing to run), or if the server would not say or the guard cannot get its
    /// session (then the run goes unguarded, with a warning).
    async fn backend_pid(&self, conn: &mut PgConnection, needed: bool) -> Option<i32> {
        let hook = self.lock_guard.as_ref().filter(|_| needed)?;
        let pid = match sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await
        {
            Ok(pid) => pid,
            Err(e) => {
                self.guard_unavailable(&e.to_string());
                return None;
            }
        };
        // Now, while the migration holds only the runner lock: a guard that cannot connect
        // fails here rather than stalling the first statement's transaction.
        if let Err(e) = hook
            .prepare()
            .instrument(info_span!("lock_guard_prepare"))
            .await
        {
            self.guard_unavailable(&e.message);
            return None;
        }
        Some(pid)
    }

    /// Why the guard is off for the rest of this run, if it is.
    fn guard_off(&self) -> Option<String> {
        self.guard_off
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The guard could not watch (or stopped early): it stays off for the rest of the run
    /// and statements run under `lock_timeout` alone. Said once per run, in a warning and
    /// in the notes of the history rows written after it.
    fn guard_unavailable(&self, why: &str) {
        let why = belay_core::redact_url(why);
        {
            let mut off = self
                .guard_off
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if off.is_some() {
                return;
            }
            *off = Some(why.clone());
        }
        self.emit(EventKind::Warning {
            message: format!(
                "the lock guard is off for the rest of this run ({why}); statements run with lock_timeout alone"
            ),
        });
    }

    /// Runs one statement of a migration; with a lock guard, under its watch. Transaction
    /// control is not watched (it takes no table lock), nor are `CONCURRENTLY` statements:
    /// they take SHARE UPDATE EXCLUSIVE, which the application's reads and writes do not
    /// queue for, and cancelling a long index build over some other DDL's wait would
    /// waste it and leave an INVALID index.
    async fn run_statement(
        &self,
        conn: &mut PgConnection,
        step: &Step,
        st: &Statement,
        attempt: u32,
        backend_pid: Option<i32>,
        trips: &mut Vec<TripNote>,
    ) -> Ran {
        let script = &step.source;
        let guarded = self.guarded(backend_pid);
        let watch = if !st.concurrently && !st.opens_transaction() && !st.closes_transaction() {
            self.start_watch(backend_pid).await
        } else {
            None
        };
        if guarded
            && watch.is_none()
            && !st.concurrently
            && script.directives.lock_timeout.is_none()
        {
            // The attempt began under the guard's long safety-net timeout; unwatched, the
            // statement must give way as an unguarded one does.
            let set = if step.no_transaction.is_none() {
                "SET LOCAL"
            } else {
                "SET"
            };
            let sql = format!(
                "{set} lock_timeout = '{}'",
                format_duration(self.config.lock_timeout)
            );
            if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut *conn)
                .await
            {
                return Ran {
                    result: Err(e),
                    tripped: false,
                    last_blockers: Vec::new(),
                };
            }
        }
        let result = match &st.copy_data {
            Some(data) => copy_in(conn, st.text(&script.text), data).await,
            None => sqlx::raw_sql(sqlx::AssertSqlSafe(st.text(&script.text)))
                .execute(&mut *conn)
                .await
                .map(|_| ()),
        };
        let cancelled = matches!(&result, Err(e) if is_query_canceled(e));
        let line = sql::line_of_offset(&script.text, st.start);
        let (tripped, last_blockers) = self
            .end_watch(step, watch, cancelled, line, attempt, trips)
            .await;
        Ran {
            result,
            tripped,
            last_blockers,
        }
    }

    /// Starts the guard's watch over the migration's session, when the run is guarded; a
    /// guard that cannot watch is off for the rest of the run (said once).
    async fn start_watch(&self, backend_pid: Option<i32>) -> Option<Box<dyn LockWatch>> {
        let (Some(hook), Some(pid)) = (&self.lock_guard, backend_pid) else {
            return None;
        };
        if !self.guarded(backend_pid) {
            return None;
        }
        match hook.watch(pid, self.config.max_blocking).await {
            Ok(w) => Some(w),
            Err(e) => {
                self.guard_unavailable(&e.message);
                None
            }
        }
    }

    /// Stops a watch and reports its trips (at `line`): whether the guard's cancel is what
    /// failed the work (`cancel_failed`: it ended with 57014), and whom the migration waited
    /// for at the guard's last look.
    async fn end_watch(
        &self,
        step: &Step,
        watch: Option<Box<dyn LockWatch>>,
        cancel_failed: bool,
        line: usize,
        attempt: u32,
        trips: &mut Vec<TripNote>,
    ) -> (bool, Vec<SessionBrief>) {
        let end = match watch {
            Some(w) => w.stop().await.unwrap_or_else(|e| {
                self.guard_unavailable(&e.message);
                WatchEnd::default()
            }),
            None => WatchEnd::default(),
        };
        let new_trips = end.trips;
        let tripped = !new_trips.is_empty() && cancel_failed;
        let n = new_trips.len();
        for (k, trip) in new_trips.into_iter().enumerate() {
            // The last trip is the one whose cancel landed, if any did.
            let cancelled = tripped && k + 1 == n;
            self.emit(EventKind::LockGuardTripped {
                version: step.version.clone(),
                script: step.script.clone(),
                line,
                attempt,
                blocked_sessions: trip.blocked_sessions,
                longest_wait_ms: trip.longest_wait_ms,
                blockers: trip.blockers.iter().map(|b| b.pid).collect(),
                blocked_by: trip.blockers.clone(),
                cancelled,
            });
            trips.push(TripNote {
                trip,
                attempt,
                line,
                cancelled,
            });
        }
        (tripped, end.last_blockers)
    }

    /// After the guard cancelled a statement: waits (bounded by what is left of the
    /// migration's budget) until the sessions the migration was waiting for have finished
    /// their transactions, then backs off with jitter, or fails naming them when the
    /// budget is spent. Adds the wait to `lock_wait`. Returns what a batched retry waits
    /// for first ([`BlockersGone::ripe_wait`]).
    async fn after_guard_trip(
        &self,
        step: &Step,
        st: &Statement,
        attempts: u32,
        started: Instant,
        lock_wait: &mut Duration,
        trips: &[TripNote],
    ) -> Result<Option<String>, MigrateError> {
        let blockers: Vec<SessionBrief> = trips
            .last()
            .map(|t| t.trip.blockers.clone())
            .unwrap_or_default();
        let exhausted = |blockers: &[SessionBrief], still: bool| {
            self.guard_exhausted(step, st, attempts, started, trips, blockers, still)
        };
        if attempts >= self.config.max_attempts || started.elapsed() >= self.config.max_lock_wait {
            return Err(exhausted(&blockers, false));
        }
        if let Some(hook) = &self.lock_guard
            && !blockers.is_empty()
        {
            let pids: Vec<i32> = blockers.iter().map(|b| b.pid).collect();
            let budget = self.config.max_lock_wait.saturating_sub(started.elapsed());
            let waiting = Instant::now();
            let outcome = hook
                .wait_until_gone(&pids, budget)
                .instrument(info_span!("wait_for_blockers", pids = ?pids))
                .await;
            *lock_wait += waiting.elapsed();
            match outcome {
                Ok(gone) if !gone.remaining.is_empty() => {
                    return Err(exhausted(&still_held(gone.remaining, &blockers), true));
                }
                // They are gone: the lock is free now, and every moment of backoff is a
                // moment for the next transaction to take it first.
                Ok(gone) => {
                    debug!(
                        attempt = attempts,
                        ripe_wait = gone.ripe_wait.is_some(),
                        "retrying as soon as the blockers have gone"
                    );
                    return Ok(gone.ripe_wait);
                }
                // Not knowing when they are gone, fall back to the backoff alone.
                Err(e) => self.guard_unavailable(&e.message),
            }
        }
        let Some(backoff) = self.next_backoff(attempts, started) else {
            return Err(exhausted(&blockers, false));
        };
        debug!(
            attempt = attempts,
            backoff_ms = backoff.as_millis() as u64,
            "retrying after a lock guard trip"
        );
        tokio::time::sleep(backoff).await;
        Ok(None)
    }

    #[allow(clippy::too_many_arguments, reason = "everything the message names")]
    fn guard_exhausted(
        &self,
        step: &Step,
        st: &Statement,
        attempts: u32,
        started: Instant,
        trips: &[TripNote],
        blockers: &[SessionBrief],
        still_there: bool,
    ) -> MigrateError {
        let line = sql::line_of_offset(&step.source.text, st.start);
        let rolled_back = if step.no_transaction.is_some() {
            "The cancelled statement was rolled back; statements of this no-transaction script before it stay applied and its history row is `failed`: check them, then `belay repair`."
        } else {
            "The migration's transaction was rolled back: nothing of it was applied."
        };
        let who = if blockers.is_empty() {
            "Nothing blocked the migration: its own statement held its locks longer than the application could wait; make it lighter (`belay lint` suggests rewrites) or run it when traffic is low.".to_string()
        } else {
            let named: Vec<String> = blockers.iter().map(ToString::to_string).collect();
            format!(
                "The migration was waiting for {}{}; end or commit that transaction (`belay locks` shows it), then run migrate again.",
                named.join("; "),
                if still_there {
                    ", still in the same transaction when the budget ran out"
                } else {
                    ""
                }
            )
        };
        MigrateError::LockGuardExhausted(Box::new(GuardExhaustion {
            path: step.source.path.clone(),
            line,
            attempts,
            trips: u32::try_from(trips.len()).unwrap_or(u32::MAX),
            elapsed: format_duration(Duration::from_millis(started.elapsed().as_millis() as u64)),
            max_attempts: self.config.max_attempts,
            max_lock_wait: format_duration(self.config.max_lock_wait),
            max_blocking: format_duration(self.config.max_blocking),
            cause: format!("{rolled_back} {who}"),
        }))
    }

    /// The row's notes: the script's `-- belay:allow=` directives, the run's preflight
    /// overrides, the lock guard's trips, and why the guard went off if it did before the
    /// row was written; `None` when there is nothing to say.
    fn notes(&self, step: &Step, trips: &[TripNote]) -> Option<serde_json::Value> {
        let mut notes = serde_json::Map::new();
        let allow = &step.source.directives.allow;
        if !allow.is_empty() {
            notes.insert("allowed_lint".into(), serde_json::json!(allow));
        }
        if !self.overrides.is_empty() {
            notes.insert("overrides".into(), serde_json::json!(self.overrides));
        }
        if !trips.is_empty() {
            notes.insert("lock_guard_trips".into(), serde_json::json!(trips));
        }
        if let Some(why) = self.guard_off() {
            notes.insert("lock_guard_off".into(), serde_json::json!(why));
        }
        (!notes.is_empty()).then_some(serde_json::Value::Object(notes))
    }

    /// Runs the script gate over the forward and repeatable steps of a run (undo scripts
    /// are not gated: an undo is the way out of a bad deployment).
    async fn check_scripts(
        &self,
        conn: &mut PgConnection,
        gate: &dyn ScriptGate,
        steps: &[Step],
    ) -> Result<(), MigrateError> {
        let scripts: Vec<GateScript> = steps
            .iter()
            .filter(|s| s.direction != Direction::Undo)
            .map(|s| GateScript {
                script: s.script.clone(),
                version: s.version.clone(),
                direction: s.direction,
                source: s.source.clone(),
                has_undo: s.direction == Direction::Repeatable
                    || s.source.directives.irreversible
                    || self
                        .set
                        .migrations
                        .iter()
                        .any(|m| m.script_name == s.script && m.down.is_some()),
            })
            .collect();
        if scripts.is_empty() {
            return Ok(());
        }
        let notes = gate
            .check(conn, &scripts)
            .instrument(info_span!("script_gate"))
            .await
            .map_err(|e| MigrateError::GateRefused {
                kind: e.kind,
                message: e.message,
            })?;
        for message in notes {
            self.emit(EventKind::Warning { message });
        }
        Ok(())
    }

    /// Runs the backup hook for `steps`; a failure refuses the run (nothing applied yet).
    async fn take_backup(
        &self,
        conn: &mut PgConnection,
        hook: &dyn BackupHook,
        steps: &[Step],
        action: &'static str,
    ) -> Result<Option<String>, MigrateError> {
        let undo = steps.iter().any(|s| s.direction == Direction::Undo);
        let direction = if undo {
            Direction::Undo
        } else {
            Direction::Forward
        };
        let tables = if hook.reads_tables(direction) {
            self.existing_tables(conn, &backup_table_names(steps, undo))
                .await?
        } else {
            Vec::new()
        };
        self.backup_hook_call(hook, steps, tables, action).await
    }

    /// Calls the hook for `steps` with `tables`; its failure is the run's.
    async fn backup_hook_call(
        &self,
        hook: &dyn BackupHook,
        steps: &[Step],
        tables: Vec<String>,
        action: &'static str,
    ) -> Result<Option<String>, MigrateError> {
        // The guard's idle session is closed while the backup's two are open (the next
        // watch reconnects): a run never holds more than its own session plus either,
        // which the agent's connection budget counts on.
        if let Some(guard) = &self.lock_guard {
            guard.release().await;
        }
        let undo = steps.iter().any(|s| s.direction == Direction::Undo);
        let ctx = BackupContext {
            deployment_id: self.deployment_id,
            direction: if undo {
                Direction::Undo
            } else {
                Direction::Forward
            },
            steps: steps
                .iter()
                .map(|s| BackupStep {
                    version: s.version.clone(),
                    script: s.script.clone(),
                    direction: s.direction,
                })
                .collect(),
            tables,
        };
        let started = Instant::now();
        let taken = if undo {
            let versions: Vec<&str> = steps.iter().filter_map(|s| s.version.as_deref()).collect();
            let reason = format!(
                "before undo of {} (deployment {})",
                versions.join(", "),
                self.deployment_id
            );
            hook.before_undo(&ctx, &reason).await
        } else {
            hook.before_apply(&ctx).await
        }
        .map_err(|e| MigrateError::BackupFailed {
            action,
            kind: match e.kind {
                crate::error::ErrorKind::Unavailable => crate::error::ErrorKind::Unavailable,
                _ => crate::error::ErrorKind::Refused,
            },
            message: e.message,
        })?;
        Ok(taken.map(|t| {
            self.emit(EventKind::BackupTaken {
                id: t.id.clone(),
                scope: t.scope,
                ms: started.elapsed().as_millis() as u64,
            });
            t.id
        }))
    }

    /// Of `names` (as written in scripts), the ordinary or partitioned tables that exist,
    /// as `schema.table` (quoted where needed), deduplicated in order. Names PostgreSQL
    /// cannot parse are skipped.
    async fn existing_tables(
        &self,
        conn: &mut PgConnection,
        names: &[String],
    ) -> Result<Vec<String>, MigrateError> {
        // `to_regclass` raises on a name it cannot parse, failing the whole query: plain
        // names go in one query, any other in one of its own (skipped when it raises).
        const LOOKUP: &str = "SELECT n.at, format('%I.%I', ns.nspname, c.relname) \
               FROM unnest($1::text[], $2::int8[]) AS n(name, at) \
               JOIN pg_class c ON c.oid = to_regclass(n.name) \
               JOIN pg_namespace ns ON ns.oid = c.relnamespace \
              WHERE c.relkind IN ('r', 'p')";
        type Named<'n> = Vec<(usize, &'n String)>;
        let (plain, odd): (Named, Named) = names
            .iter()
            .enumerate()
            .partition(|(_, n)| is_plain_name(n));
        let batches = std::iter::once(plain)
            .filter(|p| !p.is_empty())
            .chain(odd.into_iter().map(|one| vec![one]));
        let mut found_at: Vec<(i64, String)> = Vec::new();
        for batch in batches {
            let (ats, batch_names): (Vec<i64>, Vec<&str>) = batch
                .iter()
                .map(|(at, n)| (i64::try_from(*at).unwrap_or(i64::MAX), n.as_str()))
                .unzip();
            let rows: Result<Vec<(i64, String)>, sqlx::Error> = sqlx::query_as(LOOKUP)
                .bind(&batch_names)
                .bind(&ats)
                .fetch_all(&mut *conn)
                .await;
            match rows {
                Ok(rows) => found_at.extend(rows),
                Err(sqlx::Error::Database(e)) if batch.len() == 1 => {
                    debug!(table = %batch_names[0], error = %e, "not a table name PostgreSQL can parse");
                }
                Err(e) => return Err(self.db_err("looking up tables to back up")(e)),
            }
        }
        found_at.sort_by_key(|(at, _)| *at);
        let mut out: Vec<String> = Vec::new();
        for (_, t) in found_at {
            if !out.contains(&t) {
                out.push(t);
            }
        }
        Ok(out)
    }

    fn new_row(&self, step: &Step, state: RowState) -> NewRow {
        NewRow {
            version: step.version.clone(),
            description: step.description.clone(),
            entry_type: match step.direction {
                Direction::Forward => EntryType::Sql,
                Direction::Undo => EntryType::UndoSql,
                Direction::Repeatable => EntryType::Repeatable,
            },
            script: step.script.clone(),
            checksum: Some(step.checksum.clone()),
            execution_time_ms: 0,
            deployment_id: Some(self.deployment_id),
            backup_id: step.backup_id.clone(),
            lock_wait_ms: 0,
            retries: 0,
            state,
            error: None,
            lock_trips: 0,
            notes: self.notes(step, &[]),
        }
    }

    /// The `lock_timeout` a statement (or, with `st` `None`, a transactional script) runs
    /// with. `guarded`: the lock guard watches it, so the guard decides when to give way
    /// and `lock_timeout` is only the outer safety net.
    fn lock_timeout_for(&self, script: &Script, st: Option<&Statement>, guarded: bool) -> Duration {
        if let Some(t) = script.directives.lock_timeout {
            return t;
        }
        if st.is_some_and(|s| s.concurrently) {
            self.config.concurrent_lock_timeout
        } else if guarded {
            self.config
                .guarded_lock_timeout
                .max(self.config.lock_timeout)
        } else {
            self.config.lock_timeout
        }
    }

    /// Whether the lock guard watches this run's statements now.
    fn guarded(&self, backend_pid: Option<i32>) -> bool {
        backend_pid.is_some() && self.lock_guard.is_some() && self.guard_off().is_none()
    }

    fn statement_timeout_for(&self, script: &Script) -> Option<Duration> {
        script
            .directives
            .statement_timeout
            .or(self.config.statement_timeout)
    }

    /// Backoff before the next attempt, or `None` when the budget is spent.
    fn next_backoff(&self, attempts: u32, started: Instant) -> Option<Duration> {
        if attempts >= self.config.max_attempts {
            return None;
        }
        let b = self.config.backoff(attempts);
        (started.elapsed() + b < self.config.max_lock_wait).then_some(b)
    }

    async fn execute(
        &self,
        conn: &mut PgConnection,
        step: &Step,
        backend_pid: Option<i32>,
        fence: Option<UndoFence<'_>>,
    ) -> Result<StepResult, MigrateError> {
        let span = info_span!("apply_migration", script = %step.script, version = ?step.version);
        self.emit(EventKind::Started {
            version: step.version.clone(),
            script: step.script.clone(),
            direction: step.direction,
            in_transaction: step.no_transaction.is_none(),
        });
        // A no-transaction script gets belay's lock_timeout before each statement, which
        // overrides its own; in a transaction, its SET wins over belay's SET LOCAL.
        if step.no_transaction.is_none()
            && let Some(line) = sets_lock_timeout(&step.source)
        {
            self.emit(EventKind::Warning {
                message: format!(
                    "{}:{line}: the script sets lock_timeout itself, so from that line on its lock waits are bounded by its value (0: none), not belay's {}; the lock guard still cancels a statement the application queues behind for longer than max_blocking. On a database in use, delete that line. The next migration starts from belay's settings again",
                    step.source.path.display(),
                    format_duration(self.lock_timeout_for(&step.source, None, false)),
                ),
            });
        }
        let (result, reset_done) = if step.no_transaction.is_some() {
            let r = self
                .execute_without_transaction(conn, step, backend_pid)
                .instrument(span)
                .await;
            (r, false)
        } else {
            match self
                .execute_in_transaction(conn, step, backend_pid, fence)
                .instrument(span)
                .await
            {
                Ok((r, reset_done)) => (Ok(r), reset_done),
                Err(e) => (Err(e), false),
            }
        };
        match &result {
            Ok(r) => self.emit(EventKind::Succeeded {
                version: r.version.clone(),
                script: r.script.clone(),
                direction: r.direction,
                execution_ms: r.execution_ms,
                retries: r.retries,
                lock_wait_ms: r.lock_wait_ms,
            }),
            Err(e) => self.emit(EventKind::Failed {
                version: step.version.clone(),
                script: step.script.clone(),
                direction: step.direction,
                error: e.to_string(),
            }),
        }
        // Also after a failure: belay's statements after it (the lock's release) need
        // their own settings. A migration that committed stays reported as succeeded;
        // the run stops before the next one rather than run it in a session it did not
        // expect. A transactional migration's COMMIT usually carried the reset already.
        if reset_done {
            return result;
        }
        let reset = self.reset_session(conn).await;
        result.and_then(|r| reset.map(|()| r))
    }

    fn result(
        &self,
        step: &Step,
        execution: Duration,
        retries: u32,
        lock_wait: Duration,
    ) -> StepResult {
        StepResult {
            version: step.version.clone(),
            script: step.script.clone(),
            direction: step.direction,
            execution_ms: execution.as_millis() as u64,
            retries,
            lock_wait_ms: lock_wait.as_millis() as u64,
        }
    }

    async fn execute_in_transaction(
        &self,
        conn: &mut PgConnection,
        step: &Step,
        backend_pid: Option<i32>,
        fence: Option<UndoFence<'_>>,
    ) -> Result<(StepResult, bool), MigrateError> {
        let script = &step.source;
        let started = Instant::now();
        let mut attempts = 0u32;
        let mut lock_wait = Duration::ZERO;
        let mut trips = Vec::new();
        let fence_step = fence.as_ref().map(|f| f.lock_step(step));
        let mut batched = fence.is_none() && batchable(conn, script);
        // What the next attempt waits for after its BEGIN (batched only): see
        // `BlockersGone::ripe_wait`.
        let mut ripe_wait: Option<String> = None;
        // The transaction is driven with plain BEGIN/COMMIT rather than sqlx's
        // `Transaction` so that BEGIN, the script, the history row and COMMIT travel in one
        // message (batched: one round trip per migration), or at least BEGIN with its
        // settings and the history row with the COMMIT.
        loop {
            attempts += 1;
            let watch = if batched {
                self.start_watch(backend_pid).await
            } else {
                None
            };
            // Per attempt: the guard may have gone off since the last one.
            let guarded = self.guarded(backend_pid);
            let lock_timeout = format_duration(self.lock_timeout_for(script, None, guarded));
            let begin = self.begin_sql(script, guarded);
            let attempt_started = Instant::now();
            let mut failure = None;
            let mut snapshot = None;
            if batched {
                // The row as this attempt would write it: the trips of earlier attempts,
                // the waits they cost; the server times the attempt.
                let mut row = self.new_row(step, RowState::Success);
                row.retries = (attempts - 1) as i32;
                row.lock_wait_ms = lock_wait.as_millis() as i64;
                row.lock_trips = i32::try_from(trips.len()).unwrap_or(i32::MAX);
                row.notes = self.notes(step, &trips);
                let known_trips = trips.len();
                let ripe = ripe_wait.take();
                match self
                    .run_batch(
                        conn,
                        step,
                        &begin,
                        ripe.as_deref(),
                        &row,
                        watch,
                        attempts,
                        &mut trips,
                    )
                    .await?
                {
                    Batch::Committed { rank, reset_done } => {
                        if trips.len() > known_trips {
                            self.record_late_trips(conn, step, rank, &trips).await;
                        }
                        let execution = attempt_started.elapsed();
                        let result = self.result(step, execution, attempts - 1, lock_wait);
                        return Ok((result, reset_done));
                    }
                    Batch::Failed(f) => failure = Some(f),
                    // Nothing ran: statement by statement, this attempt and the next.
                    Batch::Unparsed if ripe.is_none() => batched = false,
                    // The wait only chooses a moment: the same attempt again, without it
                    // (it cannot have made the script's statements unparsable).
                    Batch::Unparsed | Batch::RipeWaitFailed => {
                        attempts -= 1;
                        continue;
                    }
                }
            }
            if !batched {
                sqlx::raw_sql(sqlx::AssertSqlSafe(begin.clone()))
                    .execute(&mut *conn)
                    .await
                    .map_err(self.db_err("beginning a transaction"))?;
            }
            if let (Some(f), Some(fs)) = (&fence, &fence_step) {
                let st = &fs.source.statements[0];
                let ran = self
                    .run_statement(conn, fs, st, attempts, backend_pid, &mut trips)
                    .await;
                match ran.result {
                    Err(e) => failure = Some((fs, st, e, ran.tripped, ran.last_blockers, 0)),
                    // Fenced: every write to the tables has committed, none can start.
                    Ok(()) => {
                        match self
                            .backup_hook_call(
                                f.hook,
                                std::slice::from_ref(step),
                                f.tables.clone(),
                                "undo",
                            )
                            .await
                        {
                            Ok(id) => snapshot = Some(id),
                            Err(e) => {
                                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
                                let (kind, message) = match e {
                                    MigrateError::BackupFailed { kind, message, .. } => {
                                        (kind, message)
                                    }
                                    other => (other.kind(), other.to_string()),
                                };
                                return Err(MigrateError::UndoSnapshotFailed {
                                    script: step.script.clone(),
                                    kind,
                                    message,
                                });
                            }
                        }
                    }
                }
            }
            if failure.is_none() && !batched {
                for st in &script.statements {
                    let ran = self
                        .run_statement(conn, step, st, attempts, backend_pid, &mut trips)
                        .await;
                    if let Err(e) = ran.result {
                        failure = Some((step, st, e, ran.tripped, ran.last_blockers, 0));
                        break;
                    }
                }
            }
            match failure {
                None => {
                    let execution = attempt_started.elapsed();
                    let mut row = self.new_row(step, RowState::Success);
                    if let Some(id) = snapshot {
                        row.backup_id = id;
                    }
                    row.execution_time_ms = execution.as_millis().min(i32::MAX as u128) as i32;
                    row.retries = (attempts - 1) as i32;
                    row.lock_wait_ms = lock_wait.as_millis() as i64;
                    row.lock_trips = i32::try_from(trips.len()).unwrap_or(i32::MAX);
                    row.notes = self.notes(step, &trips);
                    let commit = self.commit_sql(&row);
                    // The session reset rides in the same message, after the COMMIT: one
                    // round trip ends the migration and readies the session for the
                    // next. The server runs a message's statements in order and stops at
                    // the first error, so counting the completed ones tells whether the
                    // COMMIT went through when something fails.
                    let reset = session_reset_sql(conn);
                    let needed = sql::split(&commit).len();
                    let finish = match &reset {
                        Some(r) => format!("{commit};\n{r}"),
                        None => commit,
                    };
                    let mut completed = 0usize;
                    let sent = {
                        let mut results =
                            sqlx::raw_sql(sqlx::AssertSqlSafe(finish)).fetch_many(&mut *conn);
                        loop {
                            match results.try_next().await {
                                Ok(Some(Either::Left(_))) => completed += 1,
                                Ok(Some(Either::Right(_))) => {}
                                Ok(None) => break Ok(()),
                                Err(e) => break Err(e),
                            }
                        }
                    };
                    let result = self.result(step, execution, attempts - 1, lock_wait);
                    match sent {
                        Ok(()) => return Ok((result, reset.is_some())),
                        Err(e) if completed >= needed => {
                            // Committed; only the reset failed: `execute` resets again and
                            // reports that failure as it does for a separate reset.
                            debug!(error = %e, "the session reset after COMMIT failed");
                            return Ok((result, false));
                        }
                        Err(e) => {
                            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
                            // Deferred constraints are checked at COMMIT: that is the
                            // script's failure, reported at its last statement.
                            return Err(match script.statements.last() {
                                Some(last) => script_error(script, last, &e),
                                None => self.db_err("recording the migration")(e),
                            });
                        }
                    }
                }
                Some((at, st, e, tripped, last_blockers, shift)) => {
                    let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
                    // The fence is gone with the transaction: the retry fences and
                    // snapshots again, as writes may have landed in between.
                    if tripped {
                        // The whole transaction is retried, from BEGIN.
                        lock_wait += attempt_started.elapsed();
                        ripe_wait = self
                            .after_guard_trip(at, st, attempts, started, &mut lock_wait, &trips)
                            .await?;
                        continue;
                    }
                    if !is_lock_timeout(&e) {
                        return Err(script_error_at(&at.source, st, &e, shift));
                    }
                    lock_wait += attempt_started.elapsed();
                    ripe_wait = self
                        .after_lock_timeout(
                            at,
                            st,
                            attempts,
                            started,
                            &mut lock_wait,
                            &lock_timeout,
                            &last_blockers,
                        )
                        .await?;
                }
            }
        }
    }

    /// The trips of the attempt that committed, on its history row (they happened after
    /// the row was sent). A failure only costs the row its note: the migration stands.
    async fn record_late_trips(
        &self,
        conn: &mut PgConnection,
        step: &Step,
        rank: Option<i32>,
        trips: &[TripNote],
    ) {
        let Some(rank) = rank else { return };
        let count = i32::try_from(trips.len()).unwrap_or(i32::MAX);
        let notes = self.notes(step, trips);
        if let Err(e) = self
            .history
            .record_trips(conn, rank, count, notes.as_ref())
            .await
        {
            debug!(error = %e, "recording the lock guard's trips on the history row");
        }
    }

    /// One attempt of a transactional script in one message: BEGIN with its settings, then
    /// every statement, under one watch of the guard. The server runs a message's
    /// statements in order, each under its own `statement_timeout` (PostgreSQL ≥ 13), and
    /// stops at the first error, so the count of completed ones names the statement that
    /// failed; its error position is made relative to that statement (the returned shift,
    /// in characters). A trip is reported at the statement the cancel failed, or at the
    /// script's last statement when it landed on none. After the script, the message
    /// carries the history row, COMMIT and the session reset ([`Batch::Committed`]).
    ///
    /// The server parses a whole message before it runs any of it: a syntax error anywhere
    /// fails it with nothing run, not even BEGIN ([`Batch::Unparsed`]); the caller then
    /// runs the script statement by statement, which names the statement and its line.
    ///
    /// A retry after the guard gave way may wait for a ripe moment right after its BEGIN
    /// (`ripe_wait`, one statement): in the same message, so no client round trip lies
    /// between the moment chosen and the script's first lock request.
    #[allow(clippy::too_many_arguments, reason = "one attempt's whole state")]
    async fn run_batch<'s>(
        &self,
        conn: &mut PgConnection,
        step: &'s Step,
        begin: &str,
        ripe_wait: Option<&str>,
        row: &NewRow,
        watch: Option<Box<dyn LockWatch>>,
        attempt: u32,
        trips: &mut Vec<TripNote>,
    ) -> Result<Batch<'s>, MigrateError> {
        let script = &step.source;
        let prefix = sql::split(begin).len() + usize::from(ripe_wait.is_some());
        // After the script: the history row (as the role belay connected as), COMMIT, and
        // the session reset for the next migration (PostgreSQL ≥ 14, as batching is); the
        // session authorization set for the row stays set past COMMIT.
        let tail = format!(
            "{HISTORY_AS_SESSION_USER};\n{};\nCOMMIT;\nRESET ALL; DISCARD TEMP;\n{SESSION_SETTINGS_SQL}",
            self.history.insert_statement_timed_here(row)
        );
        let mut text = String::with_capacity(begin.len() + script.text.len() + 8);
        text.push_str(begin);
        text.push_str(";\n");
        if let Some(wait) = ripe_wait {
            text.push_str(wait);
            text.push_str(";\n");
        }
        let mut chars = text.chars().count();
        let mut shifts = Vec::with_capacity(script.statements.len());
        for st in &script.statements {
            shifts.push(chars);
            let body = st.text(&script.text);
            // A last statement without `;` may end in a line comment (even one ending
            // in `;`).
            let sep = if sql::ends_with_terminator(body) {
                "\n"
            } else {
                "\n;\n"
            };
            text.push_str(body);
            text.push_str(sep);
            chars += body.chars().count() + sep.len();
        }
        text.push_str(&tail);
        let statements = script.statements.len();
        // Completed statements before the row's insert, and once COMMIT is through.
        let before_insert = prefix + statements + 1;
        let committed_at = prefix + statements + 3;
        let mut completed = 0usize;
        let mut rank = None;
        let sent = {
            let mut results = sqlx::raw_sql(sqlx::AssertSqlSafe(text)).fetch_many(&mut *conn);
            loop {
                match results.try_next().await {
                    Ok(Some(Either::Left(_))) => completed += 1,
                    Ok(Some(Either::Right(r))) if completed == before_insert => {
                        rank = r.try_get::<i32, _>(0).ok();
                    }
                    Ok(Some(Either::Right(_))) => {}
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            }
        };
        let last = statements.saturating_sub(1);
        let at = completed.saturating_sub(prefix).min(last);
        let st = &script.statements[at];
        // A cancel that lands after COMMIT (on the session reset) cancelled nothing of the
        // migration: the trip is reported as one the statement finished before.
        let cancel_failed =
            matches!(&sent, Err(e) if is_query_canceled(e)) && completed < committed_at;
        let line = sql::line_of_offset(&script.text, st.start);
        let (tripped, last_blockers) = self
            .end_watch(step, watch, cancel_failed, line, attempt, trips)
            .await;
        match sent {
            Ok(()) => Ok(Batch::Committed {
                rank,
                reset_done: true,
            }),
            Err(e) if completed >= committed_at => {
                // Committed; only the reset failed: `execute` resets again and reports
                // that failure as it does for a separate reset.
                debug!(error = %e, "the session reset after COMMIT failed");
                Ok(Batch::Committed {
                    rank,
                    reset_done: false,
                })
            }
            Err(e) if completed == 0 && matches!(e, sqlx::Error::Database(_)) => {
                debug!(error = %e, "the batch did not parse; statement by statement");
                Ok(Batch::Unparsed)
            }
            // Not the guard's cancel (nothing queues behind a session holding no lock but
            // its own transaction's; should it, the retry goes as for any trip).
            Err(e) if ripe_wait.is_some() && completed + 1 == prefix && !tripped => {
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
                debug!(error = %e, "waiting for a ripe moment failed; retrying without");
                Ok(Batch::RipeWaitFailed)
            }
            Err(e) if completed < prefix && !tripped => {
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
                Err(self.db_err("beginning a transaction")(e))
            }
            // The row's insert failed (not the guard's cancel, which is retried as a
            // statement's): belay's own write, not the script's.
            Err(e)
                if completed >= prefix + statements
                    && completed < before_insert + 1
                    && !tripped =>
            {
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
                Err(self.db_err("recording the migration")(e))
            }
            // A statement failed, or COMMIT did (deferred constraints: the script's failure,
            // at its last statement).
            Err(e) => Ok(Batch::Failed((
                step,
                st,
                e,
                tripped,
                last_blockers,
                shifts[at],
            ))),
        }
    }

    /// Reports a lock timeout naming whom the statement waited for, then waits for them to
    /// finish their transactions and retries at once (when the guard saw them), or sleeps
    /// the backoff; fails naming them when the budget is spent. Returns what a batched
    /// retry waits for first ([`BlockersGone::ripe_wait`]).
    #[allow(clippy::too_many_arguments, reason = "the attempt's whole state")]
    async fn after_lock_timeout(
        &self,
        step: &Step,
        st: &Statement,
        attempts: u32,
        started: Instant,
        lock_wait: &mut Duration,
        lock_timeout: &str,
        blockers: &[SessionBrief],
    ) -> Result<Option<String>, MigrateError> {
        let line = sql::line_of_offset(&step.source.text, st.start);
        let exhausted = |lock_wait: Duration, blockers: &[SessionBrief], still: bool| {
            let who = if blockers.is_empty() {
                "the application holds conflicting locks too long — find the blocker with `belay locks` or pg_stat_activity, or raise --max-attempts / --max-lock-wait".to_string()
            } else {
                let named: Vec<String> = blockers.iter().map(ToString::to_string).collect();
                format!(
                    "the statement was waiting for {}{}; end or commit that transaction, then run migrate again (or raise --max-attempts / --max-lock-wait)",
                    named.join("; "),
                    if still {
                        ", still in the same transaction when the budget ran out"
                    } else {
                        ""
                    }
                )
            };
            MigrateError::LockRetriesExhausted {
                path: step.source.path.clone(),
                line,
                attempts,
                waited_ms: lock_wait.as_millis() as u64,
                lock_timeout: lock_timeout.to_string(),
                who,
            }
        };
        if let Some(hook) = &self.lock_guard
            && !blockers.is_empty()
            && self.guard_off().is_none()
        {
            if attempts >= self.config.max_attempts
                || started.elapsed() >= self.config.max_lock_wait
            {
                return Err(exhausted(*lock_wait, blockers, false));
            }
            self.emit(EventKind::LockTimeout {
                version: step.version.clone(),
                script: step.script.clone(),
                line,
                attempt: attempts,
                waited_ms: lock_wait.as_millis() as u64,
                backoff_ms: 0,
                blocked_by: blockers.to_vec(),
            });
            let pids: Vec<i32> = blockers.iter().map(|b| b.pid).collect();
            let budget = self.config.max_lock_wait.saturating_sub(started.elapsed());
            let waiting = Instant::now();
            let outcome = hook
                .wait_until_gone(&pids, budget)
                .instrument(info_span!("wait_for_blockers", pids = ?pids))
                .await;
            *lock_wait += waiting.elapsed();
            match outcome {
                Ok(gone) if !gone.remaining.is_empty() => {
                    return Err(exhausted(
                        *lock_wait,
                        &still_held(gone.remaining, blockers),
                        true,
                    ));
                }
                Ok(BlockersGone { ripe_wait, .. }) => return Ok(ripe_wait),
                Err(e) => self.guard_unavailable(&e.message),
            }
        }
        let Some(backoff) = self.next_backoff(attempts, started) else {
            return Err(exhausted(*lock_wait, blockers, false));
        };
        self.emit(EventKind::LockTimeout {
            version: step.version.clone(),
            script: step.script.clone(),
            line,
            attempt: attempts,
            waited_ms: lock_wait.as_millis() as u64,
            backoff_ms: backoff.as_millis() as u64,
            blocked_by: blockers.to_vec(),
        });
        tokio::time::sleep(backoff).await;
        Ok(None)
    }

    /// A migration that cannot run in a transaction (`CREATE INDEX CONCURRENTLY`, its own
    /// `BEGIN`/`COMMIT`): statement by statement, its history row committed as `running`
    /// first, so a crash leaves a visible `failed` state rather than a silent half-change.
    async fn execute_without_transaction(
        &self,
        conn: &mut PgConnection,
        step: &Step,
        backend_pid: Option<i32>,
    ) -> Result<StepResult, MigrateError> {
        let script = &step.source;
        let rank = self
            .history
            .insert(conn, &self.new_row(step, RowState::Running))
            .await?;
        let started = Instant::now();
        let mut trips = Vec::new();
        let outcome = self
            .run_statements(conn, step, backend_pid, &mut trips)
            .await;
        // belay's settings off, and back to the role belay connected as for the history
        // row (see `commit_sql`).
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "RESET lock_timeout; RESET statement_timeout; {HISTORY_AS_SESSION_USER}"
        )))
        .execute(&mut *conn)
        .await;
        let (state, stats, error) = match &outcome {
            Ok(stats) => (RowState::Success, *stats, None),
            Err((stats, e)) => (RowState::Failed, *stats, Some(e.to_string())),
        };
        let execution = started.elapsed();
        self.history
            .finish(
                conn,
                rank,
                &Outcome {
                    state,
                    execution_time_ms: execution.as_millis().min(i32::MAX as u128) as i32,
                    lock_wait_ms: stats.1.as_millis() as i64,
                    retries: stats.0 as i32,
                    error,
                    lock_trips: i32::try_from(trips.len()).unwrap_or(i32::MAX),
                    notes: self.notes(step, &trips),
                },
            )
            .await?;
        debug!(script = %script.path.display(), ?state, "no-transaction migration finished");
        match outcome {
            Ok((retries, lock_wait)) => Ok(self.result(step, execution, retries, lock_wait)),
            Err((_, e)) => Err(e),
        }
    }

    /// Runs each statement on its own; a lock timeout retries the statement, or the whole
    /// `BEGIN ... COMMIT` block it sits in. Returns (retries, lock wait).
    async fn run_statements(
        &self,
        conn: &mut PgConnection,
        step: &Step,
        backend_pid: Option<i32>,
        trips: &mut Vec<TripNote>,
    ) -> Result<(u32, Duration), ((u32, Duration), MigrateError)> {
        let script = &step.source;
        let started = Instant::now();
        let mut attempts = 1u32;
        let mut lock_wait = Duration::ZERO;
        let mut block_start: Option<usize> = None;
        let mut i = 0;
        if let Some(set) = self.statement_timeout_sql(script)
            && let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(set))
                .execute(&mut *conn)
                .await
        {
            return Err(((0, lock_wait), self.db_err("setting statement_timeout")(e)));
        }
        while i < script.statements.len() {
            let st = &script.statements[i];
            if st.opens_transaction() {
                block_start = Some(i);
            }
            let guarded = self.guarded(backend_pid);
            let lock_timeout = format_duration(self.lock_timeout_for(script, Some(st), guarded));
            let sql_text = self.lock_timeout_sql(script, st, guarded);
            let attempt_started = Instant::now();
            let (res, tripped, last_blockers) = match sqlx::raw_sql(sqlx::AssertSqlSafe(sql_text))
                .execute(&mut *conn)
                .await
            {
                Ok(_) => {
                    let ran = self
                        .run_statement(conn, step, st, attempts, backend_pid, trips)
                        .await;
                    (ran.result, ran.tripped, ran.last_blockers)
                }
                Err(e) => (Err(e), false, Vec::new()),
            };
            match res {
                Ok(()) => {
                    if st.closes_transaction() {
                        block_start = None;
                    }
                    i += 1;
                }
                Err(e) => {
                    if block_start.is_some() {
                        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
                    }
                    if st.concurrently {
                        self.drop_invalid_index(conn, step, st).await;
                    }
                    if tripped {
                        // The statement (or the BEGIN ... COMMIT block it is in) again.
                        lock_wait += attempt_started.elapsed();
                        if let Err(err) = self
                            .after_guard_trip(step, st, attempts, started, &mut lock_wait, trips)
                            .await
                        {
                            return Err(((attempts - 1, lock_wait), err));
                        }
                        attempts += 1;
                        if let Some(b) = block_start.take() {
                            i = b;
                        }
                        continue;
                    }
                    if !is_lock_timeout(&e) {
                        return Err(((attempts - 1, lock_wait), script_error(script, st, &e)));
                    }
                    lock_wait += attempt_started.elapsed();
                    if let Err(err) = self
                        .after_lock_timeout(
                            step,
                            st,
                            attempts,
                            started,
                            &mut lock_wait,
                            &lock_timeout,
                            &last_blockers,
                        )
                        .await
                    {
                        return Err(((attempts - 1, lock_wait), err));
                    }
                    attempts += 1;
                    if let Some(b) = block_start.take() {
                        i = b;
                    }
                }
            }
        }
        if let Some(b) = block_start {
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
            let st = &script.statements[b];
            return Err((
                (attempts - 1, lock_wait),
                MigrateError::ScriptFailed(Box::new(ScriptFailure {
                    path: script.path.clone(),
                    line: sql::line_of_offset(&script.text, st.start),
                    column: None,
                    sqlstate: None,
                    message: "transaction opened here is never committed; add COMMIT at the end (it was rolled back)".into(),
                    detail: None,
                    hint: None,
                })),
            ));
        }
        Ok((attempts - 1, lock_wait))
    }

    /// A failed `CREATE INDEX CONCURRENTLY` leaves an INVALID index that blocks a retry and
    /// slows every write; drop it (concurrently, so the table stays available).
    async fn drop_invalid_index(&self, conn: &mut PgConnection, step: &Step, st: &Statement) {
        let Some(name) = st.concurrent_index_name() else {
            return;
        };
        let (schema, rel) = match name.rsplit_once('.') {
            Some((s, r)) if !name.starts_with('"') => (Some(s.to_string()), r.to_string()),
            _ => (None, name.clone()),
        };
        let found: Option<String> = sqlx::query_scalar(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE NOT i.indisvalid AND c.relname = $1 AND ($2::text IS NULL OR n.nspname = $2) \
               AND ($2::text IS NOT NULL OR pg_catalog.pg_table_is_visible(c.oid)) LIMIT 1",
        )
        .bind(&rel)
        .bind(&schema)
        .fetch_optional(&mut *conn)
        .await
        .ok()
        .flatten();
        if let Some(qualified) = found {
            // Two round trips: in one multi-statement query the DROP would run inside an
            // implicit transaction block, where CONCURRENTLY is not allowed.
            let _ = sqlx::raw_sql("SET lock_timeout = 0")
                .execute(&mut *conn)
                .await;
            let drop = format!("DROP INDEX CONCURRENTLY IF EXISTS {qualified}");
            if sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
                .execute(&mut *conn)
                .await
                .is_ok()
            {
                self.emit(EventKind::InvalidIndexDropped {
                    script: step.script.clone(),
                    index: qualified,
                });
            }
        }
    }

    /// Compares files with history; each problem names its file.
    pub async fn validate(&self) -> Result<Vec<String>, MigrateError> {
        let statuses = self.status().await?;
        Ok(statuses
            .iter()
            .filter_map(|s| {
                let v = s.version.as_deref().unwrap_or("R");
                let path = self.set.dir.join(&s.script);
                match s.state {
                    State::ChecksumMismatch => Some(format!(
                        "{}: changed after it was applied (version {v}); restore the applied text, or run `belay repair` if the change is deliberate",
                        path.display()
                    )),
                    State::Failed => Some(format!(
                        "{}: version {v} failed or was interrupted; inspect the database, then `belay repair`",
                        path.display()
                    )),
                    State::Missing => Some(format!(
                        "{}: version {v} is applied but the file is missing from {}",
                        s.script,
                        self.set.dir.display()
                    )),
                    _ => None,
                }
            })
            .collect())
    }

    /// Sets failed rows aside and realigns checksums of deliberately edited migrations,
    /// within `scope`. Each row changed says so in its notes (`notes.repairs`: when, what,
    /// and for a checksum the recorded and the new one).
    pub async fn repair(&self, scope: &RepairScope) -> Result<Vec<RepairAction>, MigrateError> {
        if scope.checksums_only && scope.failed_only {
            return Err(MigrateError::Refused {
                action: "repair",
                reason: "--checksums-only and --failed-only exclude each other: give one, or neither for both".into(),
            });
        }
        let only = match &scope.version {
            Some(v) => {
                Some(Version::parse(v).map_err(|_| MigrateError::UnknownVersion(v.clone()))?)
            }
            None => None,
        };
        let mut conn = self.connect().await?;
        if let Some(holder) = self.acquire_runner_lock(&mut conn).await? {
            return Err(MigrateError::RunnerBusy {
                holder: Box::new(holder),
                waited_s: self.config.runner_wait.as_secs(),
            });
        }
        let result = async {
            let rows = self.history.rows(&mut conn).await?;
            let statuses = status::compute(&self.set, &rows, false);
            if let Some(v) = &only
                && !statuses.iter().any(|s| {
                    s.version.as_deref().and_then(|x| Version::parse(x).ok()).as_ref() == Some(v)
                })
            {
                return Err(MigrateError::UnknownVersion(v.to_string()));
            }
            let mut actions = Vec::new();
            for s in &statuses {
                let Some(rank) = s.installed_rank else { continue };
                if let Some(v) = &only
                    && s.version.as_deref().and_then(|x| Version::parse(x).ok()).as_ref() != Some(v)
                {
                    continue;
                }
                match s.state {
                    State::Failed if !scope.checksums_only => {
                        // Every failed or interrupted row of this script, not just the last.
                        for r in rows.iter().filter(|r| {
                            r.script == s.script && matches!(r.state, RowState::Failed | RowState::Running)
                        }) {
                            let note = serde_json::json!({
                                "action": "set_aside",
                                "was": r.state.as_str(),
                            });
                            self.history.mark_repaired(&mut conn, r.installed_rank, &note).await?;
                        }
                        actions.push(RepairAction {
                            version: s.version.clone(),
                            script: s.script.clone(),
                            action: "marked the failed attempt as repaired; it is pending again (check for objects it may have left half-made)".into(),
                        });
                    }
                    State::ChecksumMismatch if !scope.failed_only => {
                        let v = s.version.as_deref().and_then(|v| Version::parse(v).ok());
                        if let Some(m) = v.and_then(|v| self.set.find(&v)) {
                            let recorded = rows
                                .iter()
                                .find(|r| r.installed_rank == rank)
                                .and_then(|r| r.checksum.clone());
                            let note = serde_json::json!({
                                "action": "checksum_realigned",
                                "from": recorded,
                                "to": m.checksum.as_str(),
                            });
                            self.history.update_checksum(&mut conn, rank, m.checksum.as_str(), &note).await?;
                            actions.push(RepairAction {
                                version: s.version.clone(),
                                script: s.script.clone(),
                                action: format!("realigned the recorded checksum to the file ({})", m.checksum.short()),
                            });
                        }
                    }
                    _ => {}
                }
            }
            Ok(actions)
        }
        .await;
        self.release_runner_lock(&mut conn).await;
        result
    }

    /// Records that the database already contains everything up to `version`.
    pub async fn baseline(&self, version: &str, description: &str) -> Result<(), MigrateError> {
        let v = Version::parse(version)
            .map_err(|_| MigrateError::UnknownVersion(version.to_string()))?;
        let mut conn = self.connect().await?;
        if let Some(holder) = self.acquire_runner_lock(&mut conn).await? {
            return Err(MigrateError::RunnerBusy {
                holder: Box::new(holder),
                waited_s: self.config.runner_wait.as_secs(),
            });
        }
        let result = async {
            self.history.ensure(&mut conn).await?;
            let rows = self.history.rows(&mut conn).await?;
            if rows.iter().any(|r| r.state != RowState::Repaired) {
                return Err(MigrateError::Refused {
                    action: "baseline",
                    reason: format!(
                        "{} already has {} row(s); baseline only adopts a database belay has not migrated",
                        self.history.table_name(),
                        rows.len()
                    ),
                });
            }
            self.history
                .insert(
                    &mut conn,
                    &NewRow {
                        version: Some(v.to_string()),
                        description: description.to_string(),
                        entry_type: EntryType::Baseline,
                        script: "<< baseline >>".into(),
                        checksum: None,
                        execution_time_ms: 0,
                        deployment_id: Some(self.deployment_id),
                        backup_id: None,
                        lock_wait_ms: 0,
                        retries: 0,
                        state: RowState::Success,
                        error: None,
                        lock_trips: 0,
                        notes: None,
                    },
                )
                .await?;
            Ok(())
        }
        .await;
        self.release_runner_lock(&mut conn).await;
        result
    }

    /// A connection to the target set up as the runner's own, holding no lock: for read-only
    /// work outside the executor (`belay adopt --dry-run`).
    pub async fn session(&self) -> Result<PgConnection, MigrateError> {
        self.connect().await
    }

    /// Records that `versions` were reverted by something other than their undo scripts
    /// (a rollback restored a backup): one `UNDO_SQL` row per version whose latest row is
    /// an applied forward migration, under the runner lock, with `note` as the row's
    /// notes and `backup_id` the backup restored. The forward rows stay: the history still
    /// shows what was applied, and `status` shows each version `undone`. Versions not
    /// applied are skipped; the versions recorded are returned.
    pub async fn record_reverted(
        &self,
        versions: &[String],
        backup_id: Option<&str>,
        note: serde_json::Value,
    ) -> Result<Vec<String>, MigrateError> {
        let mut session = self.lock_runner().await?;
        let result = async {
            let conn = session.conn();
            self.history.ensure(conn).await?;
            let rows = self.history.rows(conn).await?;
            let mut recorded = Vec::new();
            for version in versions {
                let latest = rows
                    .iter()
                    .filter(|r| r.version.as_deref() == Some(version.as_str()))
                    .filter(|r| r.state != RowState::Repaired)
                    .max_by_key(|r| r.installed_rank);
                let Some(row) = latest.filter(|r| r.entry_type.is_forward() && r.success) else {
                    continue;
                };
                let new = NewRow {
                    version: row.version.clone(),
                    description: row.description.clone(),
                    entry_type: EntryType::UndoSql,
                    script: row.script.clone(),
                    checksum: row.checksum.clone(),
                    execution_time_ms: 0,
                    deployment_id: Some(self.deployment_id),
                    backup_id: backup_id.map(str::to_string),
                    lock_wait_ms: 0,
                    retries: 0,
                    state: RowState::Success,
                    error: None,
                    lock_trips: 0,
                    notes: Some(note.clone()),
                };
                self.history.insert(conn, &new).await?;
                recorded.push(version.clone());
            }
            Ok::<_, MigrateError>(recorded)
        }
        .await;
        session.release().await;
        result
    }

    /// A connection holding the runner lock, for work outside the executor that writes
    /// history and must not race a run (`belay adopt`). Waits `runner_wait` for another
    /// runner, then fails as `migrate` would, naming it.
    pub async fn lock_runner(&self) -> Result<RunnerSession, MigrateError> {
        let mut conn = self.connect().await?;
        if let Some(holder) = self.acquire_runner_lock(&mut conn).await? {
            return Err(MigrateError::RunnerBusy {
                holder: Box::new(holder),
                waited_s: self.config.runner_wait.as_secs(),
            });
        }
        Ok(RunnerSession {
            conn,
            schema: self.history.schema().to_string(),
        })
    }

    // The SQL around a script's own statements, built once for the executor and for
    // `plan --sql`, which promises to print exactly what runs.

    /// BEGIN with the script's settings: one round trip before a transactional script.
    fn begin_sql(&self, script: &Script, guarded: bool) -> String {
        let mut sql = format!(
            "BEGIN;\nSET LOCAL lock_timeout = '{}'",
            format_duration(self.lock_timeout_for(script, None, guarded))
        );
        if let Some(t) = self.statement_timeout_for(script) {
            sql.push_str(&format!(
                ";\nSET LOCAL statement_timeout = '{}'",
                format_duration(t)
            ));
        }
        sql
    }

    /// The history row and COMMIT: one round trip after a transactional script.
    /// The history row and the commit, written as the role belay connected as: a script's
    /// `SET ROLE` (to own what it creates) need not reach belay's history schema.
    fn commit_sql(&self, row: &NewRow) -> String {
        format!(
            "{HISTORY_AS_SESSION_USER};\n{};\nCOMMIT",
            self.history.insert_statement(row)
        )
    }

    /// Session `statement_timeout` for a no-transaction script, when it has one.
    fn statement_timeout_sql(&self, script: &Script) -> Option<String> {
        self.statement_timeout_for(script)
            .map(|t| format!("SET statement_timeout = '{}'", format_duration(t)))
    }

    /// `lock_timeout` before each statement of a no-transaction script.
    fn lock_timeout_sql(&self, script: &Script, st: &Statement, guarded: bool) -> String {
        format!(
            "SET lock_timeout = '{}'",
            format_duration(self.lock_timeout_for(script, Some(st), guarded))
        )
    }

    /// The SQL a plan would execute, in order, directives applied (`plan --sql`).
    pub fn render_sql(&self, plan: &Plan) -> String {
        let mut out = String::new();
        if !plan.history_exists {
            out.push_str("-- history table (created on first use)\n");
            out.push_str(&self.history.create_sql());
            out.push_str("\n\n");
        }
        for (n, step) in plan.steps.iter().enumerate() {
            if n > 0 {
                out.push_str(&format!(
                    "-- the session reset for the next migration\n{RESET_SESSION_SQL};\n{SESSION_SETTINGS_SQL};\n\n"
                ));
            }
            let script = &step.source;
            let row = self.new_row(
                step,
                if step.no_transaction.is_some() {
                    RowState::Running
                } else {
                    RowState::Success
                },
            );
            match step.no_transaction {
                None => {
                    out.push_str(&format!(
                        "-- {} (in one transaction with its history row)\n{};\n",
                        step.script,
                        self.begin_sql(script, self.lock_guard.is_some())
                    ));
                    for st in &script.statements {
                        render_statement(&mut out, script, st);
                    }
                    out.push_str(&self.commit_sql(&row));
                    out.push_str(";\n\n");
                }
                Some(reason) => {
                    out.push_str(&format!(
                        "-- {} (no transaction: {}; statement by statement)\n",
                        step.script,
                        serde_json::to_value(reason)
                            .ok()
                            .and_then(|v| v.as_str().map(String::from))
                            .unwrap_or_default()
                    ));
                    out.push_str(&self.history.insert_statement(&row));
                    out.push(';');
                    out.push('\n');
                    if let Some(set) = self.statement_timeout_sql(script) {
                        out.push_str(&format!("{set};\n"));
                    }
                    for st in &script.statements {
                        out.push_str(&format!(
                            "{};\n",
                            self.lock_timeout_sql(script, st, self.lock_guard.is_some())
                        ));
                        render_statement(&mut out, script, st);
                    }
                    out.push_str(&format!(
                        "-- then: UPDATE {} SET state = 'success' for this row\n\n",
                        self.history.table_name()
                    ));
                }
            }
        }
        out
    }
}

/// One statement as `plan --sql` shows it; a COPY's inline data is summarised, since a
/// dump's can run to gigabytes.
fn render_statement(out: &mut String, script: &Script, st: &Statement) {
    out.push_str(st.text(&script.text).trim());
    out.push('\n');
    if let Some(data) = &st.copy_data {
        let rows = data.lines().count();
        let first = copy_data_line(script, st, 1);
        out.push_str(&format!(
            "-- then {rows} data line(s), {} bytes, streamed to this COPY (lines {first}-{} of the file)\n",
            data.len(),
            first + rows,
        ));
    }
}

/// Before belay writes a migration's history row: the script may have changed its role.
const HISTORY_AS_SESSION_USER: &str = "SET SESSION AUTHORIZATION DEFAULT";

/// What every migration session is reset with after a migration (see
/// `Migrator::reset_session`): the role and every setting back to the session's start
/// (what the connection string gave), its temporary tables gone.
const RESET_SESSION_SQL: &str = "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DISCARD TEMP";

/// If belay dies mid-statement, the server notices within a second and rolls the statement
/// back instead of finishing work nobody will record (PostgreSQL ≥ 14; older servers refuse
/// the setting, and go without).
const SESSION_SETTINGS_SQL: &str = "SET client_connection_check_interval = '1s'";

/// [`RESET_SESSION_SQL`] and [`SESSION_SETTINGS_SQL`] as one message, for a server that
/// takes both (PostgreSQL ≥ 14); `None`: reset with [`Migrator::reset_session`], which
/// lets an older server refuse the setting alone.
fn session_reset_sql(conn: &PgConnection) -> Option<String> {
    conn.server_version_num()
        .filter(|v| *v >= 140_000)
        .map(|_| format!("{RESET_SESSION_SQL};\n{SESSION_SETTINGS_SQL}"))
}

/// Settings belay gives every migration session, at connect and after each migration.
async fn apply_session_settings(conn: &mut PgConnection) {
    let _ = sqlx::raw_sql(SESSION_SETTINGS_SQL)
        .execute(&mut *conn)
        .await;
}

/// How much of a COPY's inline data goes into one CopyData message: bounds the copy
/// sqlx makes of it in its write buffer, whatever the size of the dump.
const COPY_CHUNK: usize = 1 << 20;

/// Runs a `COPY … FROM stdin` with its inline data on the migration's connection (so
/// inside its transaction, if it has one).
async fn copy_in(conn: &mut PgConnection, statement: &str, data: &str) -> Result<(), sqlx::Error> {
    let mut copy = conn.copy_in_raw(statement).await?;
    for chunk in data.as_bytes().chunks(COPY_CHUNK) {
        // On a failed send the connection is gone; dropping `copy` sends CopyFail to
        // whatever is left of it.
        copy.send(chunk).await?;
    }
    copy.finish().await.map(|_rows| ())
}

/// The 1-based line of the script where a COPY's `n`-th data line is (its data starts on
/// the line after the statement's `;`).
fn copy_data_line(script: &Script, st: &Statement, n: usize) -> usize {
    sql::line_of_offset(&script.text, st.end) + n
}

/// The data line number in a COPY error's context (`COPY people, line 3, column x: …`,
/// below the lines of any trigger function the row was in).
fn copy_context_line(context: &str) -> Option<usize> {
    context.lines().find_map(|l| {
        let (_, after) = l.strip_prefix("COPY ")?.split_once(", line ")?;
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

/// The blockers still there, as described now, with the lock each held when the
/// migration gave way (a description read between attempts cannot know which lock the
/// migration wanted).
fn still_held(remaining: Vec<SessionBrief>, seen: &[SessionBrief]) -> Vec<SessionBrief> {
    remaining
        .into_iter()
        .map(|mut r| {
            if let Some(b) = seen.iter().find(|b| b.pid == r.pid)
                && r.mode.is_none()
            {
                r.mode.clone_from(&b.mode);
                r.relation.clone_from(&b.relation);
            }
            r
        })
        .collect()
}

/// The first line where a script sets `lock_timeout` itself (pg_dump writes `SET
/// lock_timeout = 0`): from there on belay's `lock_timeout` no longer bounds the script's
/// lock waits.
fn sets_lock_timeout(script: &Script) -> Option<usize> {
    script
        .statements
        .iter()
        .find(|st| {
            let w: Vec<String> = st.words.iter().map(|w| w.to_ascii_lowercase()).collect();
            matches!(
                w.iter().map(String::as_str).collect::<Vec<_>>().as_slice(),
                ["set", "lock_timeout", ..] | ["set", "session" | "local", "lock_timeout", ..]
            ) || (w.first().is_some_and(|f| f == "select")
                && st.text(&script.text).contains("'lock_timeout'"))
        })
        .map(|st| sql::line_of_offset(&script.text, st.start))
}

fn newest_applied(statuses: &[MigrationStatus]) -> Option<Version> {
    statuses
        .iter()
        .filter(|s| s.entry_type.is_forward() && s.state == State::Success)
        .filter_map(|s| Version::parse(s.version.as_deref()?).ok())
        .max()
}

/// Maps a PostgreSQL error back to the script's file, line and column.
fn script_error(script: &Script, st: &Statement, e: &sqlx::Error) -> MigrateError {
    script_error_at(script, st, e, 0)
}

/// [`script_error`] for a statement sent after `shift` characters of other SQL in the
/// same message: the server's error position counts from the message's start.
fn script_error_at(script: &Script, st: &Statement, e: &sqlx::Error, shift: usize) -> MigrateError {
    let base_line = sql::line_of_offset(&script.text, st.start);
    let line_start = script.text[..st.start].rfind('\n').map_or(0, |i| i + 1);
    let start_col = script.text[line_start..st.start].chars().count();
    if let sqlx::Error::Database(db) = e
        && let Some(pg) = db.try_downcast_ref::<PgDatabaseError>()
    {
        let copy_line = st
            .copy_data
            .as_ref()
            .and_then(|_| copy_context_line(pg.r#where()?))
            .map(|n| copy_data_line(script, st, n));
        let (line, column) = match (pg.position(), copy_line) {
            // A bad data row: point at it rather than at the COPY.
            (_, Some(line)) => (line, None),
            (Some(PgErrorPosition::Original(p)), None) if p > shift => {
                let (l, c) = sql::line_col(st.text(&script.text), p - shift);
                (
                    base_line + l - 1,
                    Some(if l == 1 { start_col + c } else { c }),
                )
            }
            _ => (base_line, None),
        };
        return MigrateError::ScriptFailed(Box::new(ScriptFailure {
            path: script.path.clone(),
            line,
            column,
            sqlstate: Some(pg.code().to_string()),
            message: pg.message().to_string(),
            detail: pg.detail().map(String::from),
            hint: pg.hint().map(String::from),
        }));
    }
    MigrateError::ScriptFailed(Box::new(ScriptFailure {
        path: script.path.clone(),
        line: base_line,
        column: None,
        sqlstate: None,
        message: e.to_string(),
        detail: None,
        hint: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::{copy_context_line, is_plain_name};

    #[test]
    fn only_names_to_regclass_parses_go_in_the_one_lookup() {
        for plain in [
            "items",
            "public.items",
            "\"Order Items\"",
            "s.\"T\"",
            "_a$1",
        ] {
            assert!(is_plain_name(plain), "{plain}");
        }
        // Each would make `to_regclass` raise (a syntax error, another database), or
        // holds a dot or quote inside quotes: looked up alone.
        for odd in [
            "",
            "a b",
            "db.s.t",
            "\"a.b\".c",
            "\"\"",
            "1abc",
            "a..b",
            "\"x\"\"y\"",
        ] {
            assert!(!is_plain_name(odd), "{odd}");
        }
    }

    #[test]
    fn finds_the_copy_data_line_in_an_error_context() {
        assert_eq!(
            copy_context_line("COPY t, line 2, column n: \"x\""),
            Some(2)
        );
        assert_eq!(
            copy_context_line("PL/pgSQL function f() line 3 at RAISE\nCOPY t, line 17"),
            Some(17)
        );
        assert_eq!(copy_context_line("SQL statement \"select 1\""), None);
    }
}
