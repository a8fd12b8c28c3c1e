//! Resolves flags, environment and `belay.toml` into one validated configuration.

use crate::cli::{Cli, ExecArgs};
use anyhow::{Context, Result, anyhow};
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
    /// `[[rollback.notify]]`: webhooks the incident report goes to.
    #[serde(default)]
    pub notify: Vec<belay_rollback::NotifierSetting>,
}

/// A command run around a rollback or a deployment.
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
    /// `deploy --rollback-scope`'s default: `wave` (default) or `deployment`.
    pub rollback_scope: Option<crate::cli::RollbackScopeArg>,
    /// `[deploy.before]`: run once preflight passed, before the backup (local `migrate`).
    pub before: Option<FileHook>,
    /// `[deploy.after]`: run once the deployment succeeded (local `migrate`).
    pub after: Option<FileHook>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileExec {
    pub lock_timeout: Option<String>,
    pub max_attempts: Option<u32>,
    pub max_lock_wait: Option<String>,
    pub statement_timeout: Option<String>,
    pub concurrent_lock_timeout: Option<String>,
    /// `lock_timeout` of a statement the lock guard watches (the outer safety net).
    pub guarded_lock_timeout: Option<String>,
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
    pub fn resolve(&self) -> Result<u64> {
        match self {
            ByteSize::Bytes(n) => Ok(*n),
            ByteSize::Text(t) => belay_health::parse_bytes(t).ok_or_else(|| {
                anyhow!("invalid size {t:?}: expected bytes or a unit (kB, MB, GB, KiB, MiB, GiB)")
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
    /// `[deploy.before]`/`[deploy.after]`, validated.
    pub deploy_hooks: belay_deploy::DeployHooks,
}

/// Where belay.toml came from, for errors naming its file, line and key.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

impl Source {
    /// An error about `key` (dotted, e.g. `rollback.settle`) of this file.
    pub fn err(&self, key: &str, message: impl std::fmt::Display) -> anyhow::Error {
        belay_config::ConfigError::at(&self.path, &self.text, key, message).into()
    }
}

/// An error about belay.toml's `key`: at its line when the file is known.
fn file_err(src: Option<&Source>, key: &str, message: impl std::fmt::Display) -> anyhow::Error {
    match src {
        Some(s) => s.err(key, message),
        None => anyhow!("belay.toml `{key}`: {message}"),
    }
}

/// `[rollback]` checked: every duration parses and is positive, hooks name a command —
/// by the same rules as agent.toml's `[targets.rollback]`.
fn rollback_policy(
    file: &FileRollback,
    src: Option<&Source>,
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
        notify: file.notify.clone(),
    }
    .resolve_keyed()
    .map_err(|(key, message)| file_err(src, &format!("rollback.{key}"), message))
}

/// `[deploy.before]`/`[deploy.after]` checked as the rollback hooks are: a command, and a
/// positive timeout [30s].
fn deploy_hooks(file: &FileDeploy, src: Option<&Source>) -> Result<belay_deploy::DeployHooks> {
    let hook = |key: &str, h: &Option<FileHook>| -> Result<Option<belay_deploy::DeployHook>> {
        let Some(h) = h else { return Ok(None) };
        if h.command.trim().is_empty() {
            return Err(file_err(
                src,
                &format!("deploy.{key}.command"),
                "is empty: name the command to run (`command = \"./maintenance on\"`), or remove the section",
            ));
        }
        let timeout = match &h.timeout {
            Some(t) => {
                let key = format!("deploy.{key}.timeout");
                let d = parse_duration(t).map_err(|e| file_err(src, &key, e))?;
                if d.is_zero() {
                    return Err(file_err(src, &key, "must be greater than zero"));
                }
                d
            }
            None => std::time::Duration::from_secs(30),
        };
        Ok(Some(belay_deploy::DeployHook {
            command: h.command.clone(),
            timeout,
        }))
    };
    Ok(belay_deploy::DeployHooks {
        before: hook("before", &file.before)?,
        after: hook("after", &file.after)?,
    })
}

pub fn load_file(cli: &Cli) -> Result<FileConfig> {
    load_source(cli).map(|(file, _)| file)
}

/// belay.toml (`--config`, else `./belay.toml` when present) and where it came from;
/// errors name the file, the line, the key and what is accepted there.
pub fn load_source(cli: &Cli) -> Result<(FileConfig, Option<Source>)> {
    let (path, required) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("belay.toml"), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
            return Ok((FileConfig::default(), None));
        }
        Err(e) => {
            return Err(belay_config::ConfigError::file(&path, format!("cannot read: {e}")).into());
        }
    };
    let file = belay_config::parse(&path, &text)?;
    Ok((file, Some(Source { path, text })))
}

/// The keys belay.toml's `[preflight]` sets, with their values as written: what a remote
/// `migrate` asks the target's agent to tighten its own thresholds with (a key not set
/// here leaves the target's threshold alone, rather than its default tightening it).
pub fn preflight_keys(cli: &Cli) -> Result<std::collections::BTreeMap<String, serde_json::Value>> {
    // Checked in full first, so an unknown key is refused with the usual message.
    let Some(src) = load_source(cli)?.1 else {
        return Ok(Default::default());
    };
    let table: toml::Table = toml::from_str(&src.text).map_err(|e| {
        anyhow!(
            "config {}: {}",
            src.path.display(),
            belay_core::redact_url(&e.to_string())
        )
    })?;
    let Some(preflight) = table.get("preflight").and_then(toml::Value::as_table) else {
        return Ok(Default::default());
    };
    preflight
        .iter()
        .map(|(k, v)| {
            let v = serde_json::to_value(v)
                .with_context(|| format!("config {}: [preflight] {k}", src.path.display()))?;
            Ok((k.clone(), v))
        })
        .collect()
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
    let (file, src) = load_source(cli)?;
    let src = src.as_ref();
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
    // A value from a flag is that flag's error; from the file, the file's (with its line).
    let bad = |flag_given: bool, flag: &str, key: &str, message: String| -> anyhow::Error {
        if flag_given {
            anyhow!("--{flag}: {message}")
        } else {
            file_err(src, &format!("execution.{key}"), message)
        }
    };
    let dur = |flag_v: Option<&String>, file_v: Option<&String>, flag: &str, key: &str| {
        let Some(v) = flag_v.or(file_v) else {
            return Ok(None);
        };
        parse_duration(v)
            .map(Some)
            .map_err(|e| bad(flag_v.is_some(), flag, key, e.to_string()))
    };
    if let Some(d) = dur(
        ea.lock_timeout.as_ref(),
        fe.lock_timeout.as_ref(),
        "lock-timeout",
        "lock_timeout",
    )? {
        if d.is_zero() {
            return Err(bad(
                ea.lock_timeout.is_some(),
                "lock-timeout",
                "lock_timeout",
                "must be greater than zero: without it, application queries queue behind a waiting migration indefinitely".into(),
            ));
        }
        exec.lock_timeout = d;
    }
    if let Some(v) = ea.max_attempts.or(fe.max_attempts) {
        if v == 0 {
            return Err(bad(
                ea.max_attempts.is_some(),
                "max-attempts",
                "max_attempts",
                "must be at least 1".into(),
            ));
        }
        exec.max_attempts = v;
    }
    if let Some(d) = dur(
        ea.max_lock_wait.as_ref(),
        fe.max_lock_wait.as_ref(),
        "max-lock-wait",
        "max_lock_wait",
    )? {
        exec.max_lock_wait = d;
    }
    if let Some(d) = dur(
        ea.statement_timeout.as_ref(),
        fe.statement_timeout.as_ref(),
        "statement-timeout",
        "statement_timeout",
    )? {
        exec.statement_timeout = Some(d);
    }
    if let Some(d) = dur(
        None,
        fe.concurrent_lock_timeout.as_ref(),
        "",
        "concurrent_lock_timeout",
    )? {
        exec.concurrent_lock_timeout = d;
    }
    if let Some(d) = dur(
        None,
        fe.guarded_lock_timeout.as_ref(),
        "",
        "guarded_lock_timeout",
    )? {
        if d.is_zero() {
            return Err(bad(
                false,
                "",
                "guarded_lock_timeout",
                "must be greater than zero: it is what bounds a guarded statement's wait if the guard stops".into(),
            ));
        }
        exec.guarded_lock_timeout = d;
    }
    if let Some(d) = dur(
        ea.runner_wait.as_ref(),
        fe.runner_wait.as_ref(),
        "runner-wait",
        "runner_wait",
    )? {
        exec.runner_wait = d;
    }
    if let Some(d) = dur(
        ea.max_blocking.as_ref(),
        fe.max_blocking.as_ref(),
        "max-blocking",
        "max_blocking",
    )? {
        if d.is_zero() {
            return Err(bad(
                ea.max_blocking.is_some(),
                "max-blocking",
                "max_blocking",
                "must be greater than zero (it would cancel a migration the moment anything queued behind it); use --no-lock-guard (or lock_guard = false) to run without the guard".into(),
            ));
        }
        exec.max_blocking = d;
    }
    let lock_guard = !ea.no_lock_guard && fe.lock_guard.unwrap_or(true);
    belay_history::History::new(&exec.history_schema).map_err(|e| {
        if cli.history_schema.is_some() {
            anyhow!("--history-schema: {e}")
        } else {
            file_err(src, "history_schema", e)
        }
    })?;
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
            .resolve()
            .map_err(|e| file_err(src, "lint.small_table_bytes", e))?;
    }
    let mut probe_names = std::collections::BTreeSet::new();
    for (i, p) in file.probes.iter().enumerate() {
        if !probe_names.insert(p.name.as_str()) {
            return Err(file_err(
                src,
                &format!("probes[{i}].name"),
                format!("two probes are named {:?}", p.name),
            ));
        }
        p.validate()
            .map_err(|e| file_err(src, &format!("probes[{i}]"), e))?;
    }
    if let Some(soak) = &file.deploy.canary_soak {
        parse_duration(soak).map_err(|e| file_err(src, "deploy.canary_soak", e))?;
    }
    let (rollback, restore_lock_timeout) = rollback_policy(&file.rollback, src)?;
    let deploy_hooks = deploy_hooks(&file.deploy, src)?;
    let mut deploy = file.deploy;
    match (deploy.on_failure, file.rollback.on_failure) {
        (Some(a), Some(b)) if a != b => {
            return Err(file_err(
                src,
                "rollback.on_failure",
                format!(
                    "the file sets on_failure twice, differently ([deploy] \"{}\", [rollback] \"{}\"): keep one",
                    format!("{a:?}").to_lowercase(),
                    format!("{b:?}").to_lowercase()
                ),
            ));
        }
        (None, b) => deploy.on_failure = b,
        _ => {}
    }
    Ok(Settings {
        deploy_hooks,
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
