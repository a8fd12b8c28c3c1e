//! `agent.toml`: the agent's name, its controller, and the targets it owns. Read here,
//! not in the agent, so that `belay config check --agent` reads it exactly as the agent
//! does.

use crate::ConfigError;
use belay_core::{DatabaseUrl, parse_duration};
use belay_migrate::{ExecConfig, TargetSpec};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often each target's locks are sampled for the `/metrics` gauges by default.
/// Prometheus scrapes every 15 to 60 s; one sample per 10 s keeps a scrape at most 10 s
/// behind for the cost of one connection and one catalog query per target.
pub const DEFAULT_LOCK_SAMPLE_PERIOD: Duration = Duration::from_secs(10);
/// Faster sampling shows nothing a scrape would see and only adds load on the target.
pub const MIN_LOCK_SAMPLE_PERIOD: Duration = Duration::from_secs(1);

/// How long a stop (SIGTERM) lets the agent's work in flight finish by default, from the
/// signal on: deployments, rollbacks, migration runs, backups and restores share it; what
/// is still running then is cancelled and recorded so (`shutdown_grace`). Below the
/// shipped unit's `TimeoutStopSec` (40 s) with the time the recording takes and a margin.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Reads a `shutdown_grace` (agent.toml) or `--shutdown-grace` value: a duration greater
/// than zero (`"20s"`, `"1m"`).
pub fn parse_shutdown_grace(value: &str) -> Result<Duration, String> {
    match parse_duration(value) {
        Ok(d) if d.is_zero() => Err(
            "must be greater than zero: a stop always lets work in flight record where it stood"
                .to_string(),
        ),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// A period in `agent.toml`: a duration (`"10s"`, `"500ms"`; a bare number is seconds), or
/// `0`/`"off"` for none.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum PeriodSetting {
    Seconds(u64),
    Text(String),
}

impl PeriodSetting {
    /// `None` when off; a period under the minimum is a mistake, not a wish to disable.
    fn resolve(&self, key: &str) -> Result<Option<Duration>, Problem> {
        let period = match self {
            PeriodSetting::Seconds(n) => Duration::from_secs(*n),
            PeriodSetting::Text(t) if t.trim().eq_ignore_ascii_case("off") => Duration::ZERO,
            PeriodSetting::Text(t) => parse_duration(t).map_err(|e| Problem::new(key, e))?,
        };
        if period.is_zero() {
            return Ok(None);
        }
        if period < MIN_LOCK_SAMPLE_PERIOD {
            return Err(Problem::new(
                key,
                format!(
                    "must be at least {} (or 0 / \"off\" to turn sampling off), not {}",
                    belay_core::format_duration(MIN_LOCK_SAMPLE_PERIOD),
                    belay_core::format_duration(period)
                ),
            ));
        }
        Ok(Some(period))
    }
}

/// What is wrong, and under which key (relative to the table being read).
#[derive(Debug)]
struct Problem {
    key: String,
    message: String,
}

impl Problem {
    fn new(key: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Problem {
            key: key.into(),
            message: message.to_string(),
        }
    }

    /// The same problem one table further out (`probes[0].` + key).
    fn within(mut self, prefix: &str) -> Self {
        self.key = if self.key.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}.{}", self.key)
        };
        self
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Defaults to the host name. With `[tls]`, the controller accepts it only when the
    /// agent's certificate carries it (a DNS SAN, or the CN when it has no DNS SAN).
    pub name: Option<String>,
    /// Controller address (host:port); without one the agent serves standalone.
    pub controller: Option<String>,
    /// Address the controller uses to reach this agent; defaults to the bound address.
    pub advertise: Option<String>,
    /// Bearer token presented to the controller and required from callers (else
    /// BELAY_TOKEN; else none).
    pub token_file: Option<PathBuf>,
    /// mTLS with the controller: this agent's identity and the CA both sides trust.
    pub tls: Option<TlsConfig>,
    /// How long a stop (SIGTERM) lets work in flight finish before cancelling it and
    /// recording it so, e.g. `"20s"` [default: 20s]; `--shutdown-grace` overrides it. Keep
    /// it below the unit's `TimeoutStopSec` by 15 s or more.
    pub shutdown_grace: Option<String>,
    /// How often every target's locks are sampled for the `/metrics` gauges (blocked
    /// sessions, longest lock wait, ...; served with `--metrics-listen`); a target may
    /// say otherwise. `0` or `"off"` turns sampling off [default: 10s].
    pub lock_sample_period: Option<PeriodSetting>,
    /// `[limits]`: what the agent may take from the database servers it works on.
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
}

/// `[limits]` in `agent.toml`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// The most connections the agent holds at once on one database server (host:port of
    /// the targets' URLs), shared by migrations, lock guards, lock sampling, checks,
    /// probes and backups; work waits for a free one [default: 10].
    pub max_connections_per_server: Option<u32>,
}

impl Limits {
    pub fn connections_per_server(&self) -> u32 {
        self.max_connections_per_server
            .unwrap_or(belay_core::DEFAULT_CONNECTIONS_PER_SERVER)
    }
}

/// A byte size in `agent.toml`: `16777216` or `"16MiB"`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum ByteSize {
    Bytes(u64),
    Text(String),
}

impl ByteSize {
    fn resolve(&self, key: &str) -> Result<u64, Problem> {
        match self {
            ByteSize::Bytes(n) => Ok(*n),
            ByteSize::Text(t) => belay_health::parse_bytes(t).ok_or_else(|| {
                Problem::new(
                    key,
                    format!(
                        "invalid size {t:?}: expected bytes or a unit (kB, MB, GB, KiB, MiB, GiB)"
                    ),
                )
            }),
        }
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Name the controller's certificate must carry.
    #[serde(default = "default_server_name")]
    pub server_name: String,
}

fn default_server_name() -> String {
    "localhost".to_string()
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub name: String,
    /// Name of an environment variable holding the URL (preferred: no secret in files).
    pub url_env: Option<String>,
    /// File whose first line is the URL (e.g. a mounted secret).
    pub url_file: Option<PathBuf>,
    /// The URL itself; keep passwords out of it (use a .pgpass or url_env). Parsed as
    /// it is read, so `Debug` shows it redacted.
    pub url: Option<DatabaseUrl>,
    /// Migrations directory, relative to this file.
    pub migrations: PathBuf,
    pub environment: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where this target's backups go; with it, every deployment starts with a verified
    /// backup (see `backup`), its id recorded in the history rows.
    pub backup_dir: Option<PathBuf>,
    /// What the pre-deployment backup holds: full (default), schema, tables or none.
    pub backup: Option<belay_guards::BackupMode>,
    pub lock_timeout: Option<String>,
    pub max_attempts: Option<u32>,
    pub max_lock_wait: Option<String>,
    pub history_schema: Option<String>,
    /// The lock guard's budget: how long the application may queue behind a migration
    /// statement before the guard cancels and retries it [default: 500ms].
    pub max_blocking: Option<String>,
    /// `false` runs this target's migrations without the lock guard [default: true].
    pub lock_guard: Option<bool>,
    /// `false` lets this target's deployments apply scripts with unallowed lint `error`
    /// findings; by default the agent lints the pending scripts and refuses them
    /// [default: true].
    pub lint: Option<bool>,
    /// The lint gate downgrades lock findings on tables with at most this many
    /// estimated rows (and at most `small_table_bytes`) [default: 10000].
    pub small_table_rows: Option<u64>,
    /// ... and at most this size with TOAST and indexes: bytes or `"16MiB"`
    /// [default: 16MiB].
    pub small_table_bytes: Option<ByteSize>,
    /// This target's lock sampling period, over the agent's `lock_sample_period`.
    pub lock_sample_period: Option<PeriodSetting>,
    /// `[targets.preflight]`: the thresholds of this target's preflight checklist before
    /// each fleet deployment, the same keys as belay.toml's `[preflight]`.
    pub preflight: Option<belay_health::Thresholds>,
    /// `[targets.postflight]`: `not_valid_constraints`, `statement_timeout`, as in
    /// belay.toml.
    pub postflight: Option<belay_health::PostflightSpec>,
    /// `[[targets.checks]]`: postflight assertions after each fleet deployment, as
    /// belay.toml's `[[checks]]`.
    #[serde(default)]
    pub checks: Vec<belay_health::UserCheck>,
    /// `[[targets.smoke]]`: postflight smoke queries, as belay.toml's `[[smoke]]`.
    #[serde(default)]
    pub smoke: Vec<belay_health::SmokeQuery>,
    /// `[[targets.probes]]`: watched during a fleet deployment's `--watch` window. As
    /// belay.toml's `[[probes]]`, but a `sql` probe names no URL: it runs on this target.
    #[serde(default)]
    pub probes: Vec<ProbeConfig>,
    /// `[targets.rollback]`: how this target's rollbacks run — `policy` (auto, ask,
    /// never) for a deployment with `on_failure = rollback`, `settle`, `before`/`after`
    /// hooks, `on_hook_failure`, `restore_lock_timeout`, `restore_attempts` — the same
    /// keys as belay.toml's `[rollback]` but `on_failure` (the deployer chooses that);
    /// `[[targets.rollback.notify]]` the webhooks its incident reports go to.
    pub rollback: Option<belay_rollback::RollbackSettings>,
}

/// `[[targets.probes]]`: belay.toml's `[[probes]]` shape, with a `sql` probe that names
/// no URL (it runs on the target's own database).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    pub name: String,
    /// `{ url, method, expect_status, json_pointer, equals }`.
    pub http: Option<belay_health::HttpProbe>,
    /// `{ query, expect }`.
    pub sql: Option<SqlProbeConfig>,
    /// [default: 10s]
    pub period: Option<String>,
    /// [default: 1s]
    pub timeout: Option<String>,
    /// Consecutive failures that trigger [default: 3].
    pub failure_threshold: Option<u32>,
    /// Consecutive passes that recover [default: 1].
    pub success_threshold: Option<u32>,
    /// [default: 0s]
    pub initial_delay: Option<String>,
}

/// A SQL probe on the target: the query and what its result must be.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlProbeConfig {
    pub query: String,
    pub expect: belay_health::Expectation,
}

impl ProbeConfig {
    fn resolve(&self, url: &DatabaseUrl) -> Result<belay_health::TargetProbe, Problem> {
        let mut probe = match (&self.http, &self.sql) {
            (Some(h), None) => {
                let mut probe = belay_health::TargetProbe::http(&self.name, &h.url);
                probe.check = belay_health::ProbeCheck::Http(h.clone());
                probe
            }
            (None, Some(q)) => belay_health::TargetProbe::sql(&self.name, &q.query, q.expect),
            _ => {
                return Err(Problem::new(
                    "",
                    format!(
                        "probe {:?}: give exactly one of http or sql: `http = {{ url = \"http://app:8080/health\" }}` or `sql = {{ query = \"SELECT …\", expect = \"no_rows\" }}` (it runs on this target)",
                        self.name
                    ),
                ));
            }
        };
        let d = |key: &str, v: &Option<String>| -> Result<Option<Duration>, Problem> {
            v.as_deref()
                .map(|t| parse_duration(t).map_err(|e| Problem::new(key, e)))
                .transpose()
        };
        if let Some(v) = d("period", &self.period)? {
            probe.period = v;
        }
        if let Some(v) = d("timeout", &self.timeout)? {
            probe.timeout = v;
        }
        if let Some(v) = d("initial_delay", &self.initial_delay)? {
            probe.initial_delay = v;
        }
        if let Some(v) = self.failure_threshold {
            probe.failure_threshold = v;
        }
        if let Some(v) = self.success_threshold {
            probe.success_threshold = v;
        }
        // The same validation a belay.toml probe gets (thresholds, timeout under the
        // period, a well-formed HTTP URL), on the target's own URL for a SQL probe.
        probe
            .clone()
            .into_spec(Some(url))
            .and_then(|spec| spec.validate().map(|()| spec))
            .map_err(|e| Problem::new("", e))?;
        Ok(probe)
    }
}

#[derive(Debug)]
pub struct LoadedTarget {
    pub spec: TargetSpec,
    /// Backups: (directory, mode).
    pub backup: Option<(PathBuf, belay_guards::BackupMode)>,
    pub environment: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Whether the lock guard watches this target's migrations (`exec.max_blocking`).
    pub lock_guard: bool,
    /// Whether the agent's executor lints the pending scripts of each `migrate`.
    pub lint: bool,
    /// When the lint gate counts a table as small.
    pub small_table: belay_lint::SmallTable,
    /// How often the agent samples this target's locks for its gauges; `None`: never.
    pub lock_sample_period: Option<Duration>,
    /// What fleet deployments judge this target by: preflight thresholds, postflight
    /// assertions and smoke queries, probes.
    pub policy: belay_deploy::TargetPolicy,
    /// How its rollbacks run (`[targets.rollback]`), and each restore's lock wait bound.
    pub rollback: (belay_rollback::RollbackPolicy, Duration),
}

/// Reads and checks `agent.toml`: every error names the file, the line and the key. Paths
/// in it are relative to its directory.
pub fn load(path: &Path) -> Result<(AgentConfig, Vec<LoadedTarget>), ConfigError> {
    let text = crate::read(path)?;
    let mut config: AgentConfig = crate::parse(path, &text)?;
    let at = |p: Problem| ConfigError::at(path, &text, &p.key, p.message);
    let base = path.parent().unwrap_or(Path::new("."));
    if let Some(tls) = &mut config.tls {
        tls.ca = base.join(&tls.ca);
        tls.cert = base.join(&tls.cert);
        tls.key = base.join(&tls.key);
    }
    config.token_file = config.token_file.map(|f| base.join(f));
    if let Some(g) = &config.shutdown_grace {
        parse_shutdown_grace(g).map_err(|e| at(Problem::new("shutdown_grace", e)))?;
    }
    let sample_period = match &config.lock_sample_period {
        Some(p) => p.resolve("lock_sample_period").map_err(at)?,
        None => Some(DEFAULT_LOCK_SAMPLE_PERIOD),
    };
    let mut targets = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (i, t) in config.targets.iter().enumerate() {
        let prefix = format!("targets[{i}]");
        if !seen.insert(t.name.clone()) {
            return Err(at(Problem::new(
                format!("{prefix}.name"),
                format!("target {:?} is listed twice", t.name),
            )));
        }
        targets.push(load_target(base, t, sample_period).map_err(|p| {
            let mut e = at(p.within(&prefix));
            e.message = format!("target {:?}: {}", t.name, e.message);
            e
        })?);
    }
    Ok((config, targets))
}

fn load_target(
    base: &Path,
    t: &TargetConfig,
    sample_period: Option<Duration>,
) -> Result<LoadedTarget, Problem> {
    let (key, raw) = match (&t.url_env, &t.url_file, &t.url) {
        (Some(var), None, None) => (
            "url_env",
            std::env::var(var).map_err(|_| {
                Problem::new("url_env", format!("environment variable {var} is not set"))
            })?,
        ),
        (None, Some(file), None) => {
            let file = base.join(file);
            let text = std::fs::read_to_string(&file).map_err(|e| {
                Problem::new("url_file", format!("cannot read {}: {e}", file.display()))
            })?;
            let first = text.lines().map(str::trim).find(|l| !l.is_empty());
            let first = first
                .ok_or_else(|| Problem::new("url_file", format!("{} is empty", file.display())))?;
            ("url_file", first.to_string())
        }
        (None, None, Some(url)) => ("url", url.expose().to_string()),
        _ => {
            return Err(Problem::new(
                "",
                "give exactly one of url_env, url_file or url (url_env = \"SHOP_DATABASE_URL\" keeps the password out of the file)",
            ));
        }
    };
    let url = DatabaseUrl::parse(&raw).map_err(|e| Problem::new(key, e))?;
    let dur = |key: &str, v: &str| parse_duration(v).map_err(|e| Problem::new(key, e));
    let mut exec = ExecConfig::default();
    if let Some(v) = &t.lock_timeout {
        exec.lock_timeout = dur("lock_timeout", v)?;
        if exec.lock_timeout.is_zero() {
            return Err(Problem::new(
                "lock_timeout",
                "must be greater than zero: without it, application queries queue behind a waiting migration indefinitely",
            ));
        }
    }
    if let Some(v) = t.max_attempts {
        if v == 0 {
            return Err(Problem::new("max_attempts", "must be at least 1"));
        }
        exec.max_attempts = v;
    }
    if let Some(v) = &t.max_lock_wait {
        exec.max_lock_wait = dur("max_lock_wait", v)?;
    }
    if let Some(v) = &t.history_schema {
        exec.history_schema = v.clone();
    }
    if let Some(v) = &t.max_blocking {
        exec.max_blocking = dur("max_blocking", v)?;
        if exec.max_blocking.is_zero() {
            return Err(Problem::new(
                "max_blocking",
                "max_blocking must be greater than zero; set lock_guard = false to run without the guard",
            ));
        }
    }
    let mut small_table = belay_lint::SmallTable::default();
    if let Some(rows) = t.small_table_rows {
        small_table.max_rows = rows;
    }
    if let Some(bytes) = &t.small_table_bytes {
        small_table.max_bytes = bytes.resolve("small_table_bytes")?;
    }
    let mut postflight = t.postflight.clone().unwrap_or_default();
    postflight.checks.extend(t.checks.iter().cloned());
    postflight.smoke.extend(t.smoke.iter().cloned());
    let mut names = std::collections::BTreeSet::new();
    let mut probes = Vec::new();
    for (i, p) in t.probes.iter().enumerate() {
        let at = format!("probes[{i}]");
        if !names.insert(p.name.as_str()) {
            return Err(Problem::new(
                format!("{at}.name"),
                format!("two probes are named {:?}", p.name),
            ));
        }
        probes.push(p.resolve(&url).map_err(|e| e.within(&at))?);
    }
    let backup = match (&t.backup_dir, t.backup) {
        (Some(dir), mode) => Some((
            base.join(dir),
            mode.unwrap_or(belay_guards::BackupMode::Full),
        )),
        (None, Some(_)) => {
            return Err(Problem::new(
                "backup",
                "`backup` needs `backup_dir`: where should the backups go?",
            ));
        }
        (None, None) => None,
    };
    let policy = belay_deploy::TargetPolicy {
        thresholds: t.preflight.clone().unwrap_or_default(),
        postflight,
        probes,
        backup_scope: backup.as_ref().map(|(_, mode)| {
            match mode {
                belay_guards::BackupMode::None => "none",
                belay_guards::BackupMode::Full => "full",
                belay_guards::BackupMode::Schema => "schema",
                belay_guards::BackupMode::Tables => "tables",
            }
            .to_string()
        }),
    };
    let mut rollback = t.rollback.clone().unwrap_or_default();
    // Secret files are named relative to agent.toml, as its other paths are.
    for n in &mut rollback.notify {
        n.routing_key_file = n.routing_key_file.take().map(|f| base.join(f));
        n.bearer_token_file = n.bearer_token_file.take().map(|f| base.join(f));
    }
    let rollback = rollback
        .resolve_keyed()
        .map_err(|(key, message)| Problem::new(format!("rollback.{key}"), message))?;
    Ok(LoadedTarget {
        rollback,
        policy,
        small_table,
        spec: TargetSpec {
            name: t.name.clone(),
            url,
            dir: base.join(&t.migrations),
            exec,
        },
        environment: t.environment.clone(),
        labels: t.labels.clone(),
        lock_guard: t.lock_guard.unwrap_or(true),
        lint: t.lint.unwrap_or(true),
        lock_sample_period: match &t.lock_sample_period {
            Some(p) => p.resolve("lock_sample_period")?,
            None => sample_period,
        },
        backup,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_targets_and_rejects_mistakes() {
        let dir = tempfile::tempdir().unwrap();
        let write = |body: &str| {
            let p = dir.path().join("agent.toml");
            std::fs::write(&p, body).unwrap();
            p
        };
        std::fs::write(dir.path().join("db.url"), "postgres://app:pw@db/shop\n").unwrap();
        let p = write(
            "name = \"a1\"\n[[targets]]\nname = \"shop\"\nurl_file = \"db.url\"\nmigrations = \"m\"\nenvironment = \"staging\"\nlabels = { region = \"eu\" }\nlock_timeout = \"200ms\"\n",
        );
        let (cfg, targets) = load(&p).unwrap();
        assert_eq!(cfg.name.as_deref(), Some("a1"));
        assert_eq!(targets[0].spec.dir, dir.path().join("m"));
        assert_eq!(targets[0].spec.exec.lock_timeout.as_millis(), 200);
        assert!(targets[0].lock_guard, "the guard is on by default");
        assert!(targets[0].lint, "the lint gate is on by default");
        assert_eq!(
            targets[0].lock_sample_period,
            Some(DEFAULT_LOCK_SAMPLE_PERIOD)
        );
        assert_eq!(targets[0].spec.exec.max_blocking.as_millis(), 50);
        // The password read from url_file never shows in Debug output. (Matched with its
        // delimiters: the temp dir's random name may contain the letters "pw".)
        let (cfg_pw, _) = load(&write(
            "[[targets]]\nname = \"x\"\nurl = \"postgres://a:sec@r3t@db/shop\"\nmigrations = \"m\"\n",
        ))
        .unwrap();
        let shown = format!("{:?}", cfg_pw.targets[0]);
        assert!(!shown.contains("sec@r3t"), "{shown}");
        assert!(shown.contains("postgres://a:***@db/shop"), "{shown}");
        let shown = format!("{:?}", targets[0].spec);
        assert!(!shown.contains(":pw@"), "{shown}");
        assert!(shown.contains("app:***@db"), "{shown}");
        let p = write(
            "[[targets]]\nname = \"a\"\nurl = \"postgres://db/a\"\nmigrations = \"m\"\nmax_blocking = \"250ms\"\n[[targets]]\nname = \"b\"\nurl = \"postgres://db/b\"\nmigrations = \"m\"\nlock_guard = false\nlint = false\n",
        );
        let (_, targets) = load(&p).unwrap();
        assert_eq!(targets[0].spec.exec.max_blocking.as_millis(), 250);
        // Lock sampling: the agent's period, a target's own, or off.
        let p = write(
            "lock_sample_period = \"30s\"\n[[targets]]\nname = \"a\"\nurl = \"postgres://db/a\"\nmigrations = \"m\"\n[[targets]]\nname = \"b\"\nurl = \"postgres://db/b\"\nmigrations = \"m\"\nlock_sample_period = \"off\"\n[[targets]]\nname = \"c\"\nurl = \"postgres://db/c\"\nmigrations = \"m\"\nlock_sample_period = 0\n[[targets]]\nname = \"d\"\nurl = \"postgres://db/d\"\nmigrations = \"m\"\nlock_sample_period = \"2s\"\n",
        );
        let (_, sampled) = load(&p).unwrap();
        let periods: Vec<_> = sampled.iter().map(|t| t.lock_sample_period).collect();
        assert_eq!(
            periods,
            [
                Some(Duration::from_secs(30)),
                None,
                None,
                Some(Duration::from_secs(2))
            ]
        );
        assert!(targets[0].lock_guard);
        assert!(!targets[1].lock_guard);
        assert!(targets[0].lint);
        assert!(!targets[1].lint);
        assert_eq!(targets[0].small_table, belay_lint::SmallTable::default());
        // The lint gate's small-table thresholds, per target.
        let p = write(
            "[[targets]]\nname = \"a\"\nurl = \"postgres://db/a\"\nmigrations = \"m\"\nsmall_table_rows = 500\nsmall_table_bytes = \"1MiB\"\n[[targets]]\nname = \"b\"\nurl = \"postgres://db/b\"\nmigrations = \"m\"\nsmall_table_bytes = 4096\n",
        );
        let (_, sized) = load(&p).unwrap();
        assert_eq!(
            sized[0].small_table,
            belay_lint::SmallTable {
                max_rows: 500,
                max_bytes: 1 << 20
            }
        );
        assert_eq!(sized[1].small_table.max_rows, 10_000);
        assert_eq!(sized[1].small_table.max_bytes, 4096);

        // What fleet deployments judge a target by, beside it.
        let p = write(
            "[[targets]]\nname = \"a\"\nurl = \"postgres://db/a\"\nmigrations = \"m\"\nbackup_dir = \"b\"\nbackup = \"schema\"\n\
             [targets.preflight]\nlock_wait_block = \"300ms\"\n\
             [[targets.checks]]\nname = \"filled\"\nquery = \"SELECT count(*) FROM t WHERE x IS NULL\"\nexpect = \"zero\"\n\
             [[targets.smoke]]\nname = \"readable\"\nquery = \"SELECT 1\"\n\
             [[targets.probes]]\nname = \"nulls\"\nperiod = \"200ms\"\nfailure_threshold = 2\nsql = { query = \"SELECT 0\", expect = \"zero\" }\n\
             [[targets.probes]]\nname = \"api\"\nhttp = { url = \"http://app:8080/health\" }\n",
        );
        let (_, judged) = load(&p).unwrap();
        let policy = &judged[0].policy;
        assert_eq!(policy.thresholds.lock_wait_block.as_millis(), 300);
        assert_eq!(policy.postflight.checks[0].name, "filled");
        assert_eq!(policy.postflight.smoke[0].name, "readable");
        assert_eq!(policy.probes.len(), 2);
        assert_eq!(policy.probes[0].period.as_millis(), 200);
        assert_eq!(policy.probes[0].failure_threshold, 2);
        assert!(matches!(
            policy.probes[0].check,
            belay_health::ProbeCheck::Sql { .. }
        ));
        assert_eq!(policy.backup_scope.as_deref(), Some("schema"));
        let (_, plain) = load(&write(
            "[[targets]]\nname = \"a\"\nurl = \"postgres://db/a\"\nmigrations = \"m\"\n",
        ))
        .unwrap();
        assert_eq!(plain[0].policy, belay_deploy::TargetPolicy::default());

        for (body, want) in [
            ("bogus = 1\n", "agent.toml:1: `bogus`: unknown key `bogus`"),
            (
                "[[targets]]\nname = \"x\"\nurl = \"postgres://b/c\"\nmigrations = \"m\"\n[[targets.probes]]\nname = \"p\"\nsql = { url = \"postgres://b/c\", query = \"SELECT 0\", expect = \"zero\" }\n",
                "`targets[0].probes[0].sql.url`: unknown key `url`",
            ),
            (
                "[[targets]]\nname = \"x\"\nurl = \"postgres://b/c\"\nmigrations = \"m\"\n[[targets.probes]]\nname = \"p\"\n",
                "`targets[0].probes[0]`: target \"x\": probe \"p\": give exactly one of http or sql: `http = {",
            ),
            (
                "[[targets]]\nname = \"x\"\nurl = \"postgres://b/c\"\nmigrations = \"m\"\n[[targets.checks]]\nname = \"c\"\nquery = \"SELECT 0\"\nexpect = \"zero\"\nseverity = \"warn\"\n",
                "unknown key `severity`",
            ),
            (
                "[[targets]]\nname = \"x\"\nurl = \"postgres://b/c\"\nmigrations = \"m\"\n[targets.preflight]\nlock_wait = \"1s\"\n",
                "unknown key `lock_wait`; the keys accepted here are",
            ),
            (
                "[[targets]]\nname = \"x\"\nmigrations = \"m\"\n",
                "exactly one of url_env",
            ),
            (
                "[[targets]]\nname = \"x\"\nurl_env = \"BELAY_TEST_NOPE_UNSET\"\nmigrations = \"m\"\n",
                "BELAY_TEST_NOPE_UNSET",
            ),
            (
                "[[targets]]\nname = \"x\"\nurl = \"mysql://a:secret@b/c\"\nmigrations = \"m\"\n",
                "unsupported database URL scheme",
            ),
            // A TOML error quoting a `url =` line: a password with unescaped
            // delimiters stays hidden, and so does the whole target in Debug.
            (
                "[[targets]]\nname = \"x\"\nurl = \"postgres://a:sec/r?e#t@secret@b/c\" oops\nmigrations = \"m\"\n",
                "agent.toml:3",
            ),
            (
                "[[targets]]\nname = \"x\"\nurl = \"postgres://b/c\"\nmigrations = \"m\"\n[[targets]]\nname = \"x\"\nurl = \"postgres://b/c\"\nmigrations = \"m\"\n",
                "agent.toml:6: `targets[1].name`: target \"x\" is listed twice",
            ),
            (
                "[[targets]]\nname = \"x\"\nurl = \"postgres://b/c\"\nmigrations = \"m\"\nmax_blocking = \"0s\"\n",
                "agent.toml:5: `targets[0].max_blocking`: target \"x\": max_blocking must be greater than zero",
            ),
            (
                "[[targets]]\nname = \"x\"\nurl = \"postgres://b/c\"\nmigrations = \"m\"\nsmall_table_bytes = \"lots\"\n",
                "invalid size \"lots\"",
            ),
            (
                "[[targets]]\nname = \"x\"\nurl = \"postgres://b/c\"\nmigrations = \"m\"\nsmall_table_row = 5\n",
                "agent.toml:5: `targets[0].small_table_row`: unknown key `small_table_row`",
            ),
            (
                "lock_sample_period = \"10ms\"\n",
                "agent.toml:1: `lock_sample_period`: must be at least 1s",
            ),
            (
                "name = \"a\"\nshutdown_grace = \"0s\"\n",
                "agent.toml:2: `shutdown_grace`: must be greater than zero",
            ),
            (
                "shutdown_grace = \"soon\"\n",
                "agent.toml:1: `shutdown_grace`: invalid duration \"soon\"",
            ),
            (
                "[[targets]]\nname = \"x\"\nurl = \"postgres://b/c\"\nmigrations = \"m\"\nlock_sample_period = \"often\"\n",
                "invalid duration \"often\"",
            ),
        ] {
            let err = format!("{:#}", load(&write(body)).unwrap_err());
            assert!(err.contains(want), "{body}: {err}");
            assert!(!err.contains("secret") && !err.contains("sec/r"), "{err}");
        }
    }

    #[test]
    fn targets_rollback_is_read_and_checked_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let write = |body: &str| {
            let p = dir.path().join("agent.toml");
            std::fs::write(&p, body).unwrap();
            p
        };
        let base = "[[targets]]\nname = \"a\"\nurl = \"postgres://db/a\"\nmigrations = \"m\"\n";
        let (_, t) = load(&write(&format!(
            "{base}[targets.rollback]\npolicy = \"ask\"\nsettle = \"2s\"\nrestore_lock_timeout = \"750ms\"\n[targets.rollback.before]\ncommand = \"echo on\"\n"
        )))
        .unwrap();
        let (policy, lock_timeout) = &t[0].rollback;
        assert_eq!(policy.mode, belay_rollback::Mode::Ask);
        assert_eq!(policy.settle, Duration::from_secs(2));
        assert_eq!(*lock_timeout, Duration::from_millis(750));
        assert_eq!(
            policy.before.as_ref().map(|h| h.command.as_str()),
            Some("echo on")
        );
        // Without the section: auto, the defaults.
        let (_, t) = load(&write(base)).unwrap();
        assert_eq!(t[0].rollback.0, belay_rollback::RollbackPolicy::default());
        for (body, want) in [
            (
                "[targets.rollback]\nsettle = \"0s\"\n",
                "rollback.settle`: target \"a\": must be greater than zero",
            ),
            ("[targets.rollback]\npolicy = \"sometimes\"\n", "policy"),
            (
                "[targets.rollback]\non_failure = \"rollback\"\n",
                "on_failure",
            ),
            ("[targets.rollback.after]\ncommand = \" \"\n", "after"),
        ] {
            let err = format!("{:#}", load(&write(&format!("{base}{body}"))).unwrap_err());
            assert!(err.contains(want), "{body}: {err}");
            // Checked values name their target (the parser's errors name the line).
            if want == "after" || want.starts_with("rollback.settle") {
                assert!(err.contains("\"a\""), "names the target: {err}");
            }
        }
    }
}
