//! Resolves flags, environment and `belay.toml` into one validated configuration.

use crate::cli::{Cli, ExecArgs};
use anyhow::{Context, Result, anyhow, bail};
use belay_core::{DatabaseUrl, parse_duration};
use belay_migrate::ExecConfig;
use std::path::{Path, PathBuf};

/// `belay.toml`'s `url`, kept as written (it is parsed only when no flag or environment
/// variable overrides it) and shown redacted by `Debug`.
#[derive(Default, serde::Deserialize)]
#[serde(transparent)]
pub struct FileUrl(pub String);

impl std::fmt::Debug for FileUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileUrl({})", belay_core::redact_url(&self.0))
    }
}

/// `belay.toml`. Unknown keys are errors: a misspelt setting silently ignored is a
/// setting that does not protect you.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub url: Option<FileUrl>,
    pub url_file: Option<PathBuf>,
    pub dir: Option<PathBuf>,
    pub history_schema: Option<String>,
    /// Where local backups are kept (`--backup-dir`).
    pub backup_dir: Option<PathBuf>,
    /// `migrate`'s default `--backup`: full, schema, tables or none.
    pub backup: Option<crate::backup_cmd::BackupMode>,
    #[serde(default)]
    pub execution: FileExec,
    /// `[lint]`: when a table is small enough for its lock findings to be downgraded.
    #[serde(default)]
    pub lint: FileLint,
    /// Preflight thresholds.
    pub preflight: Option<belay_health::Thresholds>,
    /// Postflight settings (`not_valid_constraints`, `statement_timeout`).
    pub postflight: Option<belay_health::PostflightSpec>,
    /// `[[checks]]`: postflight assertions.
    #[serde(default)]
    pub checks: Vec<belay_health::UserCheck>,
    /// `[[smoke]]`: postflight smoke queries.
    #[serde(default)]
    pub smoke: Vec<belay_health::SmokeQuery>,
    /// `[[probes]]`: watched by `migrate --watch`.
    #[serde(default)]
    pub probes: Vec<belay_health::ProbeSpec>,
    #[serde(default)]
    pub deploy: FileDeploy,
    /// `[rollback]`: how rollbacks run (policy, settle period, hooks, restore bounds).
    #[serde(default)]
    pub rollback: FileRollback,
}

/// `[rollback]` in belay.toml.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRollback {
    /// `stop` or `rollback`: the same as `[deploy] on_failure` (set one of them).
    pub on_failure: Option<crate::cli::OnFailureArg>,
    /// `auto` (default), `ask` (plan, then wait for `belay rollback execute`), `never`.
    pub policy: Option<belay_rollback::Mode>,
    /// How long probes must pass again before a rollback counts as verified [5s].
    pub settle: Option<String>,
    /// Run before the rollback changes anything (maintenance mode on).
    pub before: Option<FileHook>,
    /// Run once it is verified (maintenance mode off).
    pub after: Option<FileHook>,
    /// `escalate` (default) or `continue`.
    pub on_hook_failure: Option<belay_rollback::HookFailure>,
    /// Bound on each lock wait of a restore [2s]; a restore that waits longer is one
    /// transaction that changed nothing, and is retried.
    pub restore_lock_timeout: Option<String>,
    /// Attempts of a restore that timed out on a lock [5].
    pub restore_attempts: Option<u32>,
}

/// A command run around a rollback.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHook {
    /// Run by `sh -c`.
    pub command: String,
    /// Killed after this long [30s].
    pub timeout: Option<String>,
}

/// `[deploy]`: what `migrate`'s pipeline does beyond its checks.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDeploy {
    /// `stop` (default) or `rollback`.
    pub on_failure: Option<crate::cli::OnFailureArg>,
    /// Lock guard trips a run may take before the deployment fails at `migrating`.
    pub lock_trip_budget: Option<u32>,
    /// `deploy --canary-soak`'s default (`"5m"`; absent or `"0s"`: no soak).
    pub canary_soak: Option<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileExec {
    pub lock_timeout: Option<String>,
    pub max_attempts: Option<u32>,
    pub max_lock_wait: Option<String>,
    pub statement_timeout: Option<String>,
    pub concurrent_lock_timeout: Option<String>,
    pub runner_wait: Option<String>,
    /// The lock guard's budget (`--max-blocking`).
    pub max_blocking: Option<String>,
    /// `false` runs without the lock guard (`--no-lock-guard`).
    pub lock_guard: Option<bool>,
}

/// `[lint]` in `belay.toml`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLint {
    /// At most this many estimated rows (`pg_class.reltuples`) [default: 10000].
    pub small_table_rows: Option<u64>,
    /// At most this size, with TOAST and indexes: bytes, or `"16MiB"` [default: 16MiB].
    pub small_table_bytes: Option<ByteSize>,
}

/// A byte size as operators write it: `16777216` or `"16MiB"`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum ByteSize {
    Bytes(u64),
    Text(String),
}

impl ByteSize {
    pub fn resolve(&self, key: &str) -> Result<u64> {
        match self {
            ByteSize::Bytes(n) => Ok(*n),
            ByteSize::Text(t) => belay_health::parse_bytes(t).ok_or_else(|| {
                anyhow!("`{key}`: invalid size {t:?}: expected bytes or a unit (kB, MB, GB, KiB, MiB, GiB)")
            }),
        }
    }
}

#[derive(Debug)]
pub struct Settings {
    pub url: Option<DatabaseUrl>,
    pub url_from_argv_with_password: bool,
    pub dir: PathBuf,
    pub exec: ExecConfig,
    /// Whether `migrate` and `undo` run under the lock guard (with `exec.max_blocking`).
    pub lock_guard: bool,
    pub backup_dir: PathBuf,
    pub backup: Option<crate::backup_cmd::BackupMode>,
    pub thresholds: belay_health::Thresholds,
    pub postflight: belay_health::PostflightSpec,
    pub probes: Vec<belay_health::ProbeSpec>,
    /// When a table is small enough for its lock findings to be downgraded (`[lint]`).
    pub small_table: belay_lint::SmallTable,
    /// `[deploy]`: `migrate`'s failure action and lock-trip budget.
    pub deploy: FileDeploy,
    /// `[rollback]`, validated.
    pub rollback: belay_rollback::RollbackPolicy,
    /// `[rollback] restore_lock_timeout`.
    pub restore_lock_timeout: std::time::Duration,
}

/// `[rollback]` checked: every duration parses and is positive, hooks name a command —
/// by the same rules as agent.toml's `[targets.rollback]`.
fn rollback_policy(
    file: &FileRollback,
) -> Result<(belay_rollback::RollbackPolicy, std::time::Duration)> {
    let hook = |h: &Option<FileHook>| {
        h.as_ref().map(|h| belay_rollback::HookSetting {
            command: h.command.clone(),
            timeout: h.timeout.clone(),
        })
    };
    belay_rollback::RollbackSettings {
        policy: file.policy,
        settle: file.settle.clone(),
        before: hook(&file.before),
        after: hook(&file.after),
        on_hook_failure: file.on_hook_failure,
        restore_lock_timeout: file.restore_lock_timeout.clone(),
        restore_attempts: file.restore_attempts,
    }
    .resolve("belay.toml [rollback]")
    .map_err(|e| anyhow!(e))
}

/// belay.toml's path and text; `None` when no `--config` was given and there is no
/// `belay.toml` here.
fn read_file(cli: &Cli) -> Result<Option<(PathBuf, String)>> {
    let (path, required) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("belay.toml"), false),
    };
    match std::fs::read_to_string(&path) {
        Ok(t) => Ok(Some((path, t))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(None),
        Err(e) => Err(anyhow!("cannot read config {}: {e}", path.display())),
    }
}

/// Parses belay.toml's text as `T`. The parser's message quotes the offending line,
/// which may be a `url =` line: it is redacted.
fn parse_file<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    toml::from_str(text).map_err(|e| {
        anyhow!(
            "config {}: {}",
            path.display(),
            belay_core::redact_url(&e.to_string())
        )
    })
}

pub fn load_file(cli: &Cli) -> Result<FileConfig> {
    match read_file(cli)? {
        Some((path, text)) => parse_file(&path, &text),
        None => Ok(FileConfig::default()),
    }
}

/// The keys belay.toml's `[preflight]` sets, with their values as written: what a remote
/// `migrate` asks the target's agent to tighten its own thresholds with (a key not set
/// here leaves the target's threshold alone, rather than its default tightening it).
pub fn preflight_keys(cli: &Cli) -> Result<std::collections::BTreeMap<String, serde_json::Value>> {
    // Checked in full first, so an unknown key is refused with the usual message.
    load_file(cli)?;
    let Some((path, text)) = read_file(cli)? else {
        return Ok(Default::default());
    };
    let table: toml::Table = parse_file(&path, &text)?;
    let Some(preflight) = table.get("preflight").and_then(toml::Value::as_table) else {
        return Ok(Default::default());
    };
    preflight
        .iter()
        .map(|(k, v)| {
            let v = serde_json::to_value(v)
                .with_context(|| format!("config {}: [preflight] {k}", path.display()))?;
            Ok((k.clone(), v))
        })
        .collect()
}

fn duration(flag: &str, v: &str) -> Result<std::time::Duration> {
    parse_duration(v).with_context(|| format!("--{flag}"))
}

fn read_url_file(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --url-file {}", path.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(String::from)
        .ok_or_else(|| anyhow!("--url-file {} is empty", path.display()))
}

pub fn resolve(cli: &Cli, url_from_argv: bool, exec_args: Option<&ExecArgs>) -> Result<Settings> {
    let file = load_file(cli)?;
    let raw_url = if let Some(u) = &cli.url {
        Some(u.clone())
    } else if let Some(p) = &cli.url_file {
        Some(read_url_file(p)?)
    } else if let Ok(u) = std::env::var("DATABASE_URL") {
        Some(u)
    } else if let Some(u) = &file.url {
        Some(u.0.clone())
    } else if let Some(p) = &file.url_file {
        Some(read_url_file(p)?)
    } else {
        None
    };
    let url = raw_url
        .map(|u| DatabaseUrl::parse(&u))
        .transpose()
        .map_err(|e| anyhow!("{e}"))?;
    let url_from_argv_with_password =
        url_from_argv && url.as_ref().is_some_and(DatabaseUrl::has_password);

    let mut exec = ExecConfig::default();
    if let Some(s) = cli.history_schema.clone().or(file.history_schema.clone()) {
        exec.history_schema = s;
    }
    let fe = &file.execution;
    let ea = exec_args.cloned().unwrap_or_default();
    if let Some(v) = ea.lock_timeout.as_ref().or(fe.lock_timeout.as_ref()) {
        exec.lock_timeout = duration("lock-timeout", v)?;
        if exec.lock_timeout.is_zero() {
            bail!(
                "--lock-timeout must be greater than zero: without it, application queries queue behind a waiting migration indefinitely"
            );
        }
    }
    if let Some(v) = ea.max_attempts.or(fe.max_attempts) {
        if v == 0 {
            bail!("--max-attempts must be at least 1");
        }
        exec.max_attempts = v;
    }
    if let Some(v) = ea.max_lock_wait.as_ref().or(fe.max_lock_wait.as_ref()) {
        exec.max_lock_wait = duration("max-lock-wait", v)?;
    }
    if let Some(v) = ea
        .statement_timeout
        .as_ref()
        .or(fe.statement_timeout.as_ref())
    {
        exec.statement_timeout = Some(duration("statement-timeout", v)?);
    }
    if let Some(v) = &fe.concurrent_lock_timeout {
        exec.concurrent_lock_timeout = duration("concurrent_lock_timeout", v)?;
    }
    if let Some(v) = ea.runner_wait.as_ref().or(fe.runner_wait.as_ref()) {
        exec.runner_wait = duration("runner-wait", v)?;
    }
    if let Some(v) = ea.max_blocking.as_ref().or(fe.max_blocking.as_ref()) {
        exec.max_blocking = duration("max-blocking", v)?;
        if exec.max_blocking.is_zero() {
            bail!(
                "--max-blocking must be greater than zero (it would cancel a migration the moment anything queued behind it); use --no-lock-guard to run without the guard"
            );
        }
    }
    let lock_guard = !ea.no_lock_guard && fe.lock_guard.unwrap_or(true);
    belay_history::History::new(&exec.history_schema).map_err(|e| anyhow!("{e}"))?;
    let backup_dir = cli
        .backup_dir
        .clone()
        .or(file.backup_dir.clone())
        .unwrap_or_else(|| PathBuf::from(".belay/backups"));
    let mut postflight = file.postflight.unwrap_or_default();
    postflight.checks.extend(file.checks);
    postflight.smoke.extend(file.smoke);
    let mut small_table = belay_lint::SmallTable::default();
    if let Some(rows) = file.lint.small_table_rows {
        small_table.max_rows = rows;
    }
    if let Some(bytes) = &file.lint.small_table_bytes {
        small_table.max_bytes = bytes
            .resolve("[lint] small_table_bytes")
            .map_err(|e| anyhow!("belay.toml: {e}"))?;
    }
    for p in &file.probes {
        p.validate()
            .map_err(|e| anyhow!("belay.toml [[probes]]: {e}"))?;
    }
    let (rollback, restore_lock_timeout) = rollback_policy(&file.rollback)?;
    let mut deploy = file.deploy;
    match (deploy.on_failure, file.rollback.on_failure) {
        (Some(a), Some(b)) if a != b => bail!(
            "belay.toml sets on_failure twice, differently ([deploy] {a:?}, [rollback] {b:?}): keep one"
        ),
        (None, b) => deploy.on_failure = b,
        _ => {}
    }
    Ok(Settings {
        rollback,
        restore_lock_timeout,
        deploy,
        small_table,
        thresholds: file.preflight.unwrap_or_default(),
        postflight,
        probes: file.probes,
        backup_dir,
        backup: file.backup,
        lock_guard,
        url,
        url_from_argv_with_password,
        dir: cli
            .dir
            .clone()
            .or(file.dir)
            .unwrap_or_else(|| PathBuf::from("migrations")),
        exec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_url_is_redacted_in_debug() {
        let file: FileConfig =
            toml::from_str("url = \"postgres://app:s3c/r@t@db/shop\"\n").unwrap();
        let shown = format!("{file:?}");
        assert!(!shown.contains("s3c/r@t"), "{shown}");
        assert!(shown.contains("postgres://app:***@db/shop"), "{shown}");
    }
}
