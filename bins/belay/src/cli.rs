//! Command-line arguments. Flags beat environment, environment beats `belay.toml`.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

pub const EXIT_CODES_HELP: &str = "\
Database URL:
  Give it by environment (BELAY_DATABASE_URL, or DATABASE_URL), by file (--url-file),
  or in belay.toml. A password on the command line is visible to every user of the
  machine in the process list: belay warns when it sees one there. URLs are shown with
  their password replaced by ***.

Exit codes:
  0   success (also: nothing to do)
  1   a migration failed: SQL error (file:line shown), lock retries exhausted, or the
      lock guard's retries exhausted (its blockers named);
      migrations before it stay applied and recorded, the failing one is not
  2   refused: history needs attention (checksum drift, a failed migration), an undo
      is impossible, `validate` found problems, or a preflight/postflight check blocks;
      nothing was changed. `lint`: an `error` finding no `-- belay:allow=` accepts;
      `migrate` refuses pending scripts with such findings (--no-lint skips linting)
  3   another belay runner holds this database's migration lock past --runner-wait
  4   a probe crossed its failure threshold (probe, migrate --watch); evidence printed
  64  bad usage or configuration (flags, belay.toml, URL)
  65  invalid migration files (names, duplicates, directives, layouts); nothing applied
  69  the database, the controller or the target's agent is unreachable
  77  the controller refused the credentials
  70  unexpected database or internal error
  backup commands also: 1 `backup verify` found the backup bad (each problem names its
      file); 2 refused (restore of a backup failing verification without --force, pg_dump
      missing or older than the server, a remote target without `backup_dir`); 66 no such
      backup; 69 prune cannot read the history to protect unfinished deployments'
      backups; 73 out of disk space or over the size limit (the partial backup is
      removed, the catalog unchanged)
  backfill also: 130 stopped by SIGINT (143 SIGTERM) between batches; the same command
      resumes from the last committed batch
  deployments show also: 66 no deployment matches the id (or prefix); 64 the prefix
      matches several
  init also: 73 belay.toml already exists (it is never overwritten)
  A reader that closes early (`belay status | head`) changes nothing: output stops, the
      work goes on, the exit code is the work's
  adopt also: 2 refused (no other tool's table or several, a failed or dirty state, a
      version without its file, a checksum difference, a belay history that disagrees);
      nothing written. 0 when belay's history already matches (nothing to do)

Environment:
  BELAY_DATABASE_URL / DATABASE_URL   target database
  BELAY_CONTROLLER, BELAY_TARGET      remote mode: controller address and target name
  BELAY_TOKEN                         remote mode: bearer token (or --token-file)
  BELAY_LOG                           log filter for diagnostics on stderr (e.g. debug)";

/// belay: safe PostgreSQL schema migrations.
///
/// Applies versioned SQL migrations (Flyway V1__x.sql, paired 1_x.up.sql/1_x.down.sql,
/// or one folder per migration with up.sql/down.sql) so that the application keeps
/// running: one runner per database, each migration in its own transaction together
/// with its history row, and each lock waited for only while no application query queues
/// behind it (past `max_blocking`, 50 ms by default, belay gives way, names the blocker and
/// retries the moment it leaves).
#[derive(Debug, Parser)]
#[command(name = "belay", version, after_help = EXIT_CODES_HELP, max_term_width = 100)]
pub struct Cli {
    /// Target database URL, e.g. postgres://app@db:5432/shop (prefer the environment)
    #[arg(
        long,
        global = true,
        env = "BELAY_DATABASE_URL",
        hide_env_values = true
    )]
    pub url: Option<String>,

    /// Read the database URL from this file (first line), e.g. a mounted secret
    #[arg(long, global = true, value_name = "PATH")]
    pub url_file: Option<PathBuf>,

    /// Migrations directory [default: ./migrations]
    #[arg(long, global = true, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Configuration file [default: ./belay.toml when present]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Output format
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,

    /// Remote mode: run against the controller at ADDR (host:port) instead of a local URL
    #[arg(long, global = true, value_name = "ADDR", env = "BELAY_CONTROLLER")]
    pub controller: Option<String>,

    /// Remote mode: the target (database) to act on, by its registered name
    #[arg(long, global = true, value_name = "NAME", env = "BELAY_TARGET")]
    pub target: Option<String>,

    /// Remote mode: CA certificate (PEM) to verify a TLS controller with
    #[arg(long, global = true, value_name = "PATH", env = "BELAY_CA")]
    pub ca: Option<PathBuf>,

    /// Remote mode: name the controller's certificate must carry
    #[arg(long, global = true, value_name = "NAME", default_value = "localhost")]
    pub tls_server_name: String,

    /// Remote mode: file holding the bearer token for the controller (or BELAY_TOKEN)
    #[arg(long, global = true, value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Schema of the history table in the target database [default: belay]
    #[arg(long, global = true, value_name = "SCHEMA")]
    pub history_schema: Option<String>,

    /// Where local backups are kept [default: ./.belay/backups, or `backup_dir` in belay.toml]
    #[arg(long, global = true, value_name = "DIR", env = "BELAY_BACKUP_DIR")]
    pub backup_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what `migrate` would apply, in order, with directives and each step's lint
    /// findings
    Plan {
        /// Print exactly the SQL that would run, transactions and history rows included
        #[arg(long)]
        sql: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Deploy pending migrations (each in its own transaction, lock-safely), checked before
    /// and after
    ///
    /// A deployment of the target, step by step: planned → preflight (the checklist;
    /// --override-check, --no-preflight) → backing_up (runner lock, lint gate, --backup) →
    /// migrating (each migration in its own transaction, lock-safely) → validating
    /// (postflight: [[checks]] assertions, [[smoke]] queries, verify.sql, invalid indexes,
    /// NOT VALID constraints) → watching (--watch: [[probes]]) → succeeded, or failed naming
    /// the step and the evidence. Exit 2 refused (nothing applied), 4 a probe crossed its
    /// threshold, 5 validation or the lock-trip budget failed (the migrations stay applied).
    /// With --controller: run by the target's agent, judged by its agent.toml
    /// ([targets.preflight] tightened by belay.toml's [preflight], [[targets.checks]],
    /// [[targets.smoke]], [[targets.probes]]), and recorded by the controller
    Migrate {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        exec: ExecArgs,
        /// Backup taken (and verified) before the first statement; its id is recorded in
        /// the history rows [default: full, or `backup` in belay.toml]
        #[arg(long, value_enum, value_name = "SCOPE")]
        backup: Option<crate::backup_cmd::BackupMode>,
        #[command(flatten)]
        checks: MigrateChecks,
        /// The application release this deployment ships, semver (e.g. 1.6.0 or
        /// 2.0.0-rc.1); recorded in the deployment log, so a rollback knows which release
        /// the schema went with
        #[arg(long, value_name = "VERSION", value_parser = parse_release)]
        release: Option<String>,
    },
    /// Revert applied migrations with their undo scripts, newest first [default: one]
    Undo {
        /// Undo every applied migration newer than VERSION
        #[arg(long, value_name = "VERSION", conflicts_with_all = ["steps", "all"])]
        to: Option<String>,
        /// Undo the N newest applied migrations
        #[arg(long, value_name = "N", conflicts_with = "all")]
        steps: Option<usize>,
        /// Undo every applied migration
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        exec: ExecArgs,
        /// Backup taken before the undo scripts run [default: tables, a snapshot of the
        /// tables the undos drop, truncate or drop columns of; none when there are none]
        #[arg(long, value_enum, value_name = "SCOPE")]
        backup: Option<crate::backup_cmd::BackupMode>,
    },
    /// Show every migration's state: success, pending, failed, missing, future, undone,
    /// checksum_mismatch, baseline
    Status,
    /// Check applied migrations against the files: edits, failures, missing files
    Validate,
    /// Set failed or interrupted migrations aside (kept in history as `repaired`) and
    /// realign checksums of deliberately edited migrations
    ///
    /// Without flags, every failed migration and every drifted checksum. Each row changed
    /// records the repair in its history notes (`notes.repairs`: when, what, and for a
    /// checksum the recorded and the new value; `belay history --output json` and the
    /// `belay.schema_history` table show them). Nothing else is touched
    Repair {
        /// Only this migration (the others stay as they are); exit 2 when no migration has
        /// this version
        #[arg(long, value_name = "VERSION")]
        version: Option<String>,
        /// Only realign the recorded checksums of edited migrations to their files; failed
        /// migrations stay failed (and `migrate` keeps refusing them)
        #[arg(long, conflicts_with = "failed_only")]
        checksums_only: bool,
        /// Only set failed or interrupted migrations aside (pending again); edited
        /// migrations keep their drift (and `migrate` keeps refusing it)
        #[arg(long)]
        failed_only: bool,
        #[command(flatten)]
        exec: ExecArgs,
    },
    /// Health checklists: preflight before a migration, postflight after
    Check {
        #[command(subcommand)]
        command: CheckCommand,
    },
    /// Probe an HTTP endpoint or a SQL query until it crosses its failure threshold (exit
    /// 4, with the evidence) or --for elapses; in remote mode the target's agent probes
    Probe {
        #[command(subcommand)]
        command: ProbeCommand,
    },
    /// Remote mode: migrate many targets in waves (canary first), halting on the first
    /// failing wave
    Deploy {
        /// Target names or glob patterns, comma-separated (e.g. 'tenant_*')
        #[arg(long, value_name = "LIST", value_delimiter = ',', required = true)]
        targets: Vec<String>,
        /// Migrate up to this version [default: latest]
        #[arg(long, value_name = "VERSION")]
        to: Option<String>,
        /// Targets in the first wave
        #[arg(long, default_value_t = 1)]
        canary: u32,
        /// Size of each later wave: a percentage (25%) or a count (10)
        #[arg(long, default_value = "25%")]
        batch: String,
        /// Targets migrated at once within a wave
        #[arg(long, default_value_t = 4)]
        parallel: u32,
        /// Environment of the targets, for the promotion gate
        #[arg(long, value_name = "NAME")]
        environment: Option<String>,
        /// Deploy even though the version has not succeeded in the previous environment
        #[arg(long, requires = "reason")]
        skip_promotion: bool,
        /// Why the promotion gate is skipped or the checks overridden (recorded in the
        /// deployment and in every target's history rows)
        #[arg(long)]
        reason: Option<String>,
        /// Go ahead on every target although preflight check NAME blocks (repeatable;
        /// needs --reason)
        #[arg(long = "override-check", value_name = "NAME", requires = "reason")]
        override_check: Vec<String>,
        /// Skip every target's preflight checklist (a warning says so)
        #[arg(long, conflicts_with = "override_check")]
        no_preflight: bool,
        /// After validating, each target's agent watches its probes ([[targets.probes]] in
        /// its agent.toml) for this long; a probe crossing its failure threshold fails the
        /// target at `watching` and halts the deployment
        #[arg(long, value_name = "DURATION")]
        watch: Option<String>,
        /// After the canary wave succeeds and before the next wave starts, each canary
        /// target's agent watches its probes again for this long and then re-runs its
        /// postflight (both at `watching`); a failure there fails the canary and stops the
        /// deployment: later waves never start [default: `canary_soak` in belay.toml's
        /// [deploy], else 0 = no soak]. Needs --canary ≥ 1 and [[targets.probes]] on the
        /// canary targets
        #[arg(long, value_name = "DURATION")]
        canary_soak: Option<String>,
        /// What a failed step leads to [default: stop, or `on_failure` in belay.toml's
        /// [deploy]]: stop (the failure is recorded, what was applied stays applied) or
        /// rollback (each failed target rolled back by its agent, per the target's
        /// `[targets.rollback] policy` in agent.toml)
        #[arg(long, value_enum, value_name = "ACTION")]
        on_failure: Option<OnFailureArg>,
        /// With --on-failure rollback, what a failed target's rollback takes along
        /// [default: `rollback_scope` in belay.toml's [deploy], else wave]: wave (only the
        /// failed targets, each by its agent; earlier waves stay deployed) or deployment
        /// (then every target that succeeded in this deployment, by the controller through
        /// its agent, last wave first; the deployment ends rolled_back only if every target
        /// rolled back, else escalated naming the others)
        #[arg(long, value_enum, value_name = "SCOPE")]
        rollback_scope: Option<RollbackScopeArg>,
    },
    /// Roll a deployment back (local mode, or with --controller and --target through the
    /// target's agent; with --controller and no --target, `plan ID` and `execute ID` act on
    /// every target of fleet deployment ID still deployed, last wave first): `list` the
    /// deployments a rollback can act on,
    /// `plan TO` (the strategy, one reason per branch, the steps, the backups, what each
    /// path would lose, an estimate), `execute TO` (asks unless --yes), `status [ID]` (the
    /// incident report), `abort [ID]` (stop a running rollback between steps). TO is a deployment id (a unique prefix of 4+ characters), a
    /// schema version, or --release VERSION. Exit: 0 rolled back (or shown) · 1 the
    /// rollback escalated (a step failed; everything kept; the report says why) · 2
    /// refused (already rolled back or in progress, no automatic path, `abort` with no
    /// rollback running) · 64 usage, or no
    /// --yes without a terminal · 66 no deployment or release matches · 69 unreachable
    Rollback {
        #[command(subcommand)]
        command: RollbackCommand,
    },
    /// Deployments: with --controller, those the controller recorded; locally, the
    /// database's own deployment log (`list`, `show ID` with a unique prefix of the id)
    Deployments {
        #[command(subcommand)]
        command: Option<DeploymentsCommand>,
    },
    /// Local mode: this database's deployments, newest first, from its deployment log:
    /// state, failed step and reason, the migrations applied, and every failed attempt
    /// with its error (file:line), including failed migrations the log does not have.
    /// With --target NAME, only the deployments recorded for that target
    History {
        /// How many deployments to show
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Remote mode: agents registered with the controller and their targets, each with its
    /// environment (agent.toml's `environment`)
    Agents,
    /// Backups of the database with pg_dump: create, list, verify, restore, prune
    ///
    /// Remotely (--controller, --target): all five subcommands — create, list, verify,
    /// restore, prune — work; the catalog is the agent's, beside the database (the
    /// target's backup_dir in agent.toml; a target without one is refused, exit 2), and
    /// dumps never cross the network. Locally the catalog is under --backup-dir. Local
    /// mode only: `migrate --backup` and `undo --backup` (remotely the agent's `backup`
    /// setting decides)
    Backup {
        #[command(subcommand)]
        command: crate::backup_cmd::BackupCommand,
    },
    /// Lint migration scripts with PostgreSQL's own parser: the lock each statement takes,
    /// table rewrites, unsafe patterns and their safe rewrites. Exit 2 when an `error`
    /// finding is not accepted by a `-- belay:allow=<rule> <reason>` directive
    Lint {
        /// Migration files or directories [default: the migrations directory, --dir]
        #[arg(value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Output format [default: text, or json with --output json]
        #[arg(long, value_enum)]
        format: Option<crate::lint_cmd::LintFormat>,
        /// Lint statically even when a database URL is configured. With a URL (and
        /// without this flag) lock findings on tables the database shows small are
        /// downgraded, with the reason; an unreachable database falls back to static
        #[arg(long)]
        offline: bool,
    },
    /// Live lock monitor: blocking trees (root blocker → waiters, with lock modes, relations
    /// and waiting times), long-running queries, idle-in-transaction sessions, replication
    /// lag; in remote mode sampled by the target's agent
    Locks {
        #[command(flatten)]
        args: crate::locks_cmd::LocksArgs,
    },
    #[command(
        about = crate::backfill_cmd::ABOUT,
        long_about = crate::backfill_cmd::LONG_ABOUT
    )]
    Backfill {
        #[command(flatten)]
        args: crate::backfill_cmd::BackfillArgs,
    },
    #[command(
        about = crate::adopt_cmd::ABOUT,
        long_about = crate::adopt_cmd::LONG_ABOUT
    )]
    Adopt {
        /// The tool that managed the database [default: detected from the tables present]
        #[arg(long, value_enum, value_name = "TOOL")]
        from: Option<crate::adopt_cmd::FromTool>,
        /// Show what would be recorded; write nothing
        #[arg(long)]
        dry_run: bool,
        /// How long to wait for another belay runner on the same database [default: 60s]
        #[arg(long, value_name = "DURATION")]
        runner_wait: Option<String>,
    },
    /// Configuration files: `check` validates belay.toml (--config, else ./belay.toml) and,
    /// with --agent FILE, an agent.toml, and prints the effective configuration with every
    /// default filled in (passwords redacted). Exit 0 valid, 64 invalid (the error names
    /// the file, the line, the key and what is accepted there)
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Write a commented starter belay.toml into --dir (default: the current directory):
    /// every section, each setting at its default. Never overwrites: exit 73 when the file
    /// exists
    Init,
    /// Adopt an existing database: record that everything up to VERSION is already there
    Baseline {
        #[arg(long, value_name = "VERSION")]
        version: String,
        #[arg(long, default_value = "<< baseline >>")]
        description: String,
        #[command(flatten)]
        exec: ExecArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate belay.toml (and agent.toml with --agent) as a run would read it, and print
    /// the effective configuration (text: TOML; --output json)
    Check {
        /// Also validate this agent.toml, exactly as belay-agent reads it (its url_env
        /// variables and url_file files must be readable here)
        #[arg(long, value_name = "FILE")]
        agent: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RollbackCommand {
    /// Deployments on record, newest first, and whether a rollback can act on them
    List {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// What a rollback would do, and why, without changing anything
    Plan {
        #[command(flatten)]
        to: RollbackToArgs,
        /// The data is suspect (corrupt rows): prefer a restore over undo scripts
        #[arg(long)]
        data_corrupted: bool,
    },
    /// Roll back: emergency backup, hooks, the planned strategy, verification, report
    Execute {
        #[command(flatten)]
        to: RollbackToArgs,
        /// The data is suspect (corrupt rows): prefer a restore over undo scripts
        #[arg(long)]
        data_corrupted: bool,
        /// Why (recorded as the trigger)
        #[arg(long)]
        reason: Option<String>,
        /// Do not ask for confirmation
        #[arg(long)]
        yes: bool,
    },
    /// A deployment's rollback: state, steps and incident report [default: the newest
    /// rolled back, escalated or rolling back]
    Status { id: Option<String> },
    /// Stop a running rollback before its next step (the step under way finishes); the
    /// deployment ends `escalated`, its record naming the steps done and the one not
    /// started [default: the rollback running on the target]
    Abort { id: Option<String> },
}

/// What a rollback returns to.
#[derive(Debug, Clone, clap::Args)]
pub struct RollbackToArgs {
    /// A deployment id (unique prefix of 4+ characters) or a schema version
    #[arg(
        value_name = "TO",
        required_unless_present = "release",
        conflicts_with = "release"
    )]
    pub to: Option<String>,
    /// Back to the schema this application release ran on (`migrate --release`)
    #[arg(long, value_name = "VERSION", value_parser = parse_release)]
    pub release: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum DeploymentsCommand {
    /// The newest deployments
    List {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One deployment: state and per-target outcome (locally: its steps, events, reason
    /// and evidence; a unique prefix of the id is enough; exit 66 when none matches)
    Show {
        id: String,
        /// Only the incident report of its rollback (Markdown; JSON with --output json)
        #[arg(long)]
        report: bool,
    },
    /// Follow a deployment's events until it finishes
    Watch { id: String },
}

/// `--release`: a SemVer 2.0.0 version (`MAJOR.MINOR.PATCH`, optional `-prerelease` and
/// `+build`), refused otherwise rather than guessed at: the record must compare exactly
/// with the release a rollback is asked to return to. `v1.6.0` and `1.6` are refused
/// with the spelling to use.
pub fn parse_release(s: &str) -> Result<String, String> {
    fn numeric(p: &str) -> bool {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && (p == "0" || !p.starts_with('0'))
    }
    fn ident(p: &str) -> bool {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    }
    let hint = "use MAJOR.MINOR.PATCH (SemVer), e.g. 1.6.0 or 2.0.0-rc.1";
    if let Some(rest) = s.strip_prefix(['v', 'V'])
        && parse_release(rest).is_ok()
    {
        return Err(format!(
            "{s:?} is not a SemVer version: drop the leading v ({rest})"
        ));
    }
    let (rest, build) = match s.split_once('+') {
        Some((r, b)) => (r, Some(b)),
        None => (s, None),
    };
    let (core, pre) = match rest.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (rest, None),
    };
    let parts: Vec<&str> = core.split('.').collect();
    if parts.len() != 3 || !parts.iter().all(|p| numeric(p)) {
        if parts.len() < 3 && parts.iter().all(|p| numeric(p)) {
            let padded = [parts.clone(), vec!["0"; 3 - parts.len()]]
                .concat()
                .join(".");
            return Err(format!(
                "{s:?} is not a SemVer version: it needs three numbers ({padded})"
            ));
        }
        return Err(format!("{s:?} is not a SemVer version: {hint}"));
    }
    let pre_ok = pre.is_none_or(|p| {
        p.split('.')
            .all(|i| ident(i) && (!i.bytes().all(|b| b.is_ascii_digit()) || numeric(i)))
    });
    let build_ok = build.is_none_or(|b| b.split('.').all(ident));
    if !pre_ok || !build_ok {
        return Err(format!("{s:?} is not a SemVer version: {hint}"));
    }
    Ok(s.to_string())
}

/// Checks around `migrate` (both modes; lint in local mode only).
#[derive(Debug, Clone, Default, Args)]
pub struct MigrateChecks {
    /// Go ahead although preflight check NAME blocks (repeatable; needs --reason)
    #[arg(long = "override-check", value_name = "NAME", requires = "reason")]
    pub override_check: Vec<String>,
    /// Why the checks are overridden (printed and kept in the run's events)
    #[arg(long)]
    pub reason: Option<String>,
    /// Skip the preflight checklist entirely (a warning says so)
    #[arg(long, conflicts_with = "override_check")]
    pub no_preflight: bool,
    /// Apply pending scripts even if they have lint errors (a warning says so); prefer a
    /// `-- belay:allow=<rule> <reason>` directive in the script, which names what is accepted.
    /// Local mode: through a controller the agent's `lint` setting for the target decides
    #[arg(long)]
    pub no_lint: bool,
    /// After applying, keep probing ([[probes]] in belay.toml; with --controller the
    /// target's [[targets.probes]] in agent.toml) for this long; exit 4 with the evidence
    /// if a probe crosses its failure threshold
    #[arg(long, value_name = "DURATION")]
    pub watch: Option<String>,
    /// What a failed step leads to [default: stop, or `on_failure` in belay.toml's
    /// [deploy]]: stop (the failure is recorded, what was applied stays applied) or
    /// rollback (the rollback controller's; refused where none is installed)
    #[arg(long, value_enum, value_name = "ACTION")]
    pub on_failure: Option<OnFailureArg>,
}

/// `deploy --rollback-scope`, `[deploy] rollback_scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RollbackScopeArg {
    Wave,
    Deployment,
}

/// `--on-failure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailureArg {
    Stop,
    Rollback,
}

#[derive(Debug, Subcommand)]
pub enum CheckCommand {
    /// Before a migration: connectivity, size, disk for the backup, connections, long
    /// queries, idle transactions, lock waits, replication lag, failed or drifted
    /// migrations. Each check passes, warns or blocks; exit 2 when any blocks
    Preflight {
        /// Treat a blocking check NAME as a warning (repeatable; needs --reason)
        #[arg(long = "override-check", value_name = "NAME", requires = "reason")]
        override_check: Vec<String>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// After a migration: history, verify.sql of applied migrations, invalid indexes,
    /// NOT VALID constraints, [[checks]] assertions and [[smoke]] queries; exit 2 when any
    /// blocks. A [[smoke]] query passes when it succeeds and returns at least one row
    /// (zero rows block unless it sets allow_no_rows = true); a query that must return no
    /// rows or a value is a [[checks]] assertion with `expect`
    Postflight,
}

/// Probe settings (Kubernetes probe semantics).
#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// Time between attempts [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub period: Option<String>,
    /// An attempt slower than this fails [default: 1s]
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// Consecutive failures that trigger [default: 3]
    #[arg(long, value_name = "N")]
    pub failure_threshold: Option<u32>,
    /// Consecutive passes that recover [default: 1]
    #[arg(long, value_name = "N")]
    pub success_threshold: Option<u32>,
    /// Stop after this long without a trigger (exit 0) [default: until triggered]
    #[arg(long = "for", value_name = "DURATION")]
    pub r#for: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ProbeCommand {
    /// Probe an HTTP endpoint: status (any 2xx/3xx unless --expect-status), optionally a
    /// JSON field; refused connections and timeouts count as failures
    Http {
        /// The endpoint, e.g. http://app:8080/health
        #[arg(value_name = "URL")]
        endpoint: String,
        #[arg(long, value_name = "N")]
        expect_status: Option<u16>,
        /// RFC 6901 pointer into the JSON body, e.g. /status
        #[arg(long, value_name = "POINTER", requires = "equals")]
        json_pointer: Option<String>,
        /// Value the pointer must resolve to (JSON, or a bare string)
        #[arg(long, value_name = "VALUE")]
        equals: Option<String>,
        #[command(flatten)]
        args: ProbeArgs,
    },
    /// Probe the database with a query: --expect no_rows | zero | equals=N | at_most=N
    Sql {
        query: String,
        #[arg(long, default_value = "no_rows")]
        expect: String,
        #[command(flatten)]
        args: ProbeArgs,
    },
}

#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// Stop after this version
    #[arg(long, value_name = "VERSION", conflicts_with = "steps")]
    pub to: Option<String>,
    /// Apply at most N migrations
    #[arg(long, value_name = "N")]
    pub steps: Option<usize>,
}

/// Lock-safety settings; defaults explained in ARCHITECTURE.md ("Lock-safe execution").
#[derive(Debug, Clone, Default, Args)]
pub struct ExecArgs {
    /// Longest a statement the lock guard does not watch (--no-lock-guard) may wait for a
    /// lock before retrying; also the longest an application query queues behind it
    /// [default: 100ms]. A watched statement waits while nobody queues behind it, up to
    /// `guarded_lock_timeout` in belay.toml [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub lock_timeout: Option<String>,
    /// Attempts per migration before giving up on locks [default: 60]
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Time budget per migration for lock waits and backoff [default: 2min]
    #[arg(long, value_name = "DURATION")]
    pub max_lock_wait: Option<String>,
    /// statement_timeout for migrations without a directive [default: server's]
    #[arg(long, value_name = "DURATION")]
    pub statement_timeout: Option<String>,
    /// How long to wait for another belay runner on the same database [default: 60s]
    #[arg(long, value_name = "DURATION")]
    pub runner_wait: Option<String>,
    /// Lock guard budget: longest an application session may queue behind a migration
    /// statement (waiting for its lock or holding it) before the guard cancels it (rolled
    /// back) and retries once the migration's blockers are gone [default: 50ms]
    #[arg(long, value_name = "DURATION")]
    pub max_blocking: Option<String>,
    /// Run without the lock guard: lock_timeout alone bounds how long the application
    /// queues behind a migration waiting for its lock (not behind one holding it)
    #[arg(long, conflicts_with = "max_blocking")]
    pub no_lock_guard: bool,
}

#[cfg(test)]
mod tests {
    use super::parse_release;

    #[test]
    fn releases_are_semver() {
        for ok in [
            "0.0.0",
            "1.6.0",
            "10.20.30",
            "2.0.0-rc.1",
            "1.0.0-alpha-a.b-c",
            "1.0.0+build.5",
            "1.0.0-0.3.7+exp.sha.5114f85",
        ] {
            assert_eq!(parse_release(ok).as_deref(), Ok(ok), "{ok}");
        }
        for (bad, says) in [
            ("1.6", "three numbers (1.6.0)"),
            ("1", "three numbers (1.0.0)"),
            ("v1.6.0", "drop the leading v (1.6.0)"),
            ("V2.0.0-rc.1", "drop the leading v (2.0.0-rc.1)"),
            ("01.6.0", "e.g. 1.6.0"),
            ("1.6.0.1", "e.g. 1.6.0"),
            ("1.6.0-", "e.g. 1.6.0"),
            ("1.6.0-01", "e.g. 1.6.0"),
            ("1.6.0-a..b", "e.g. 1.6.0"),
            ("1.6.0+", "e.g. 1.6.0"),
            ("1.6.0 ", "e.g. 1.6.0"),
            ("", "e.g. 1.6.0"),
            ("vlatest", "e.g. 1.6.0"),
        ] {
            let e = parse_release(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
