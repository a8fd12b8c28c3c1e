//! Support for the end-to-end tests in `tests/*.rs`: builds the real binaries once, starts
//! controllers and agents as real processes on free ports, and runs the real CLI.

use anyhow::{Context, Result, anyhow, ensure};
use sqlx::{Connection, PgConnection};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// Path of a freshly built executable of the workspace (`belay`, `belay-agent`,
/// `belay-controller`). `cargo test` builds a package's binaries only for that package's
/// own tests, so this runs `cargo build` once per test process and reads the paths from
/// cargo's JSON messages (which also honours a custom target dir).
pub fn binary(name: &str) -> Result<PathBuf> {
    static BUILT: OnceLock<Result<Vec<(String, PathBuf)>, String>> = OnceLock::new();
    let built = BUILT
        .get_or_init(|| build().map_err(|err| format!("{err:#}")))
        .as_ref()
        .map_err(|err| anyhow!("building the binaries failed: {err}"))?;
    built
        .iter()
        .find(|(bin, _)| bin == name)
        .map(|(_, path)| path.clone())
        .ok_or_else(|| anyhow!("cargo built no executable named {name}"))
}

fn build() -> Result<Vec<(String, PathBuf)>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = std::process::Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "build",
            "--quiet",
            "--message-format=json-render-diagnostics",
            "-p",
            "belay",
            "-p",
            "belay-agent",
            "-p",
            "belay-controller",
            "--bins",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build for the binaries")?;
    ensure!(
        output.status.success(),
        "cargo build failed: {}",
        output.status
    );
    let mut built = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        if let (Some(name), Some(exe)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) {
            built.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    Ok(built)
}

/// A daemon started by a test; killed when dropped.
#[derive(Debug)]
pub struct Daemon {
    pub child: Child,
    pub addr: String,
    stderr: Option<JoinHandle<String>>,
    /// Stderr read so far, for waiting on a log line while the daemon runs.
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Daemon {
    /// Starts `bin` with `args` (which should include `--listen 127.0.0.1:0`) and waits
    /// for its `listening on ADDR` line.
    pub async fn start(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Daemon> {
        let mut cmd = Command::new(binary(bin)?);
        cmd.args(args)
            .env_remove("BELAY_AGENT_LISTEN")
            .env_remove("BELAY_CONTROLLER_LISTEN")
            .env_remove("BELAY_CONTROLLER_STORE")
            .env_remove("BELAY_LOG_FORMAT")
            .env("BELAY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {bin}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let so_far = log.clone();
        let stderr = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(mut l) = so_far.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
            so_far.lock().map(|l| l.clone()).unwrap_or_default()
        });
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .with_context(|| format!("{bin} did not announce its address within 30 s"))??;
        let Some(addr) = line
            .as_deref()
            .and_then(|l| l.strip_prefix("listening on "))
        else {
            let _ = child.kill().await;
            let err = stderr.await.unwrap_or_default();
            return Err(anyhow!("{bin} did not start: {line:?}\n{err}"));
        };
        Ok(Daemon {
            addr: addr.to_string(),
            child,
            stderr: Some(stderr),
            log,
        })
    }

    /// What the daemon has written to stderr so far (its log), while it runs.
    pub fn log_so_far(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// SIGKILL, as a crash would.
    pub async fn kill(&mut self) -> Result<String> {
        self.child.kill().await.context("killing the daemon")?;
        Ok(match self.stderr.take() {
            Some(h) => h.await.unwrap_or_default(),
            None => String::new(),
        })
    }

    /// SIGTERM and wait for a clean exit; returns the exit code and stderr.
    pub async fn stop(&mut self) -> Result<(Option<i32>, String)> {
        let pid = self.child.id().context("already reaped")?;
        std::process::Command::new("sh")
            .args(["-c", "kill -TERM \"$1\"", "sh", &pid.to_string()])
            .status()
            .context("kill -TERM")?;
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .context("the daemon did not stop within 20 s")??;
        let stderr = match self.stderr.take() {
            Some(h) => h.await.unwrap_or_default(),
            None => String::new(),
        };
        Ok((status.code(), stderr))
    }
}

/// One target of an agent's configuration.
#[derive(Debug)]
pub struct TargetDef<'a> {
    pub name: &'a str,
    pub url: &'a str,
    pub migrations: &'a Path,
    pub environment: Option<&'a str>,
}

/// Writes an `agent.toml` into `dir` and returns its path.
pub fn agent_config(
    dir: &Path,
    name: &str,
    controller: &str,
    targets: &[TargetDef],
) -> Result<PathBuf> {
    agent_config_with(dir, name, controller, "", targets)
}

/// [`agent_config`] with extra TOML after the top-level keys (`token_file`, a `[tls]`
/// table): it goes before the `[[targets]]`.
pub fn agent_config_with(
    dir: &Path,
    name: &str,
    controller: &str,
    extra: &str,
    targets: &[TargetDef],
) -> Result<PathBuf> {
    let mut text = format!("name = \"{name}\"\ncontroller = \"{controller}\"\n{extra}\n");
    for t in targets {
        text.push_str(&format!(
            "\n[[targets]]\nname = \"{}\"\nurl = \"{}\"\nmigrations = \"{}\"\n",
            t.name,
            t.url,
            t.migrations.display()
        ));
        if let Some(env) = t.environment {
            text.push_str(&format!("environment = \"{env}\"\n"));
        }
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).context("writing agent config")?;
    Ok(path)
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// Runs the real CLI against `controller`.
pub async fn belay(controller: &str, args: &[&str]) -> Result<Run> {
    let out = Command::new(binary("belay")?)
        .arg("--controller")
        .arg(controller)
        .args(args)
        .env_remove("BELAY_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .env_remove("BELAY_TARGET")
        .env_remove("BELAY_TOKEN")
        .stdin(Stdio::null())
        .output()
        .await
        .context("running belay")?;
    Ok(Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs the real CLI in local mode against `url`.
pub async fn belay_local(url: &str, dir: &Path, args: &[&str]) -> Result<Run> {
    let out = Command::new(binary("belay")?)
        .arg("--dir")
        .arg(dir)
        .args(args)
        .env("BELAY_DATABASE_URL", url)
        .env_remove("DATABASE_URL")
        .env_remove("BELAY_CONTROLLER")
        .stdin(Stdio::null())
        .output()
        .await
        .context("running belay")?;
    Ok(Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Polls `cond` (an observable state, not a fixed delay) until it holds, up to 30 s.
pub async fn wait_for<F, Fut>(what: &str, mut cond: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if cond().await? {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the controller lists `n` connected agents.
pub async fn wait_agents(controller: &str, n: usize) -> Result<()> {
    wait_agents_with(controller, n, &[]).await
}

/// [`wait_agents`] with extra CLI arguments (credentials).
pub async fn wait_agents_with(controller: &str, n: usize, extra: &[&str]) -> Result<()> {
    wait_for(&format!("{n} connected agents"), || async {
        let mut args = extra.to_vec();
        args.extend(["agents", "--output", "json"]);
        let r = belay(controller, &args).await?;
        Ok(r.code == 0
            && r.json()
                .as_array()
                .is_some_and(|a| a.iter().filter(|x| x["state"] == "connected").count() == n))
    })
    .await
}

/// A connection to `url` and its backend pid.
pub async fn session(url: &str) -> Result<(PgConnection, i32)> {
    let mut c = PgConnection::connect(url).await?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut c)
        .await?;
    Ok((c, pid))
}

/// Two sessions in conflict on table `t` (created here): A holds ROW EXCLUSIVE on `t` in an
/// open transaction, B queues behind it for ACCESS EXCLUSIVE (an `ALTER TABLE`). Dropping
/// A's connection, or [`Conflict::end`], ends the conflict.
#[derive(Debug)]
pub struct Conflict {
    pub a: PgConnection,
    pub a_pid: i32,
    pub b_pid: i32,
    pub b: JoinHandle<Result<(), sqlx::Error>>,
}

pub async fn conflict(url: &str) -> Result<Conflict> {
    let (mut setup, _) = session(url).await?;
    sqlx::raw_sql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
        .execute(&mut setup)
        .await?;
    let (mut a, a_pid) = session(url).await?;
    sqlx::raw_sql("BEGIN; INSERT INTO t VALUES (100)")
        .execute(&mut a)
        .await?;
    let (mut b_conn, b_pid) = session(url).await?;
    let b = tokio::spawn(async move {
        sqlx::raw_sql("ALTER TABLE t ADD COLUMN x int")
            .execute(&mut b_conn)
            .await
            .map(|_| ())
    });
    // B is queued once the server says so.
    wait_for("B to wait for its lock", || {
        let url = url.to_string();
        async move {
            let (mut c, _) = session(&url).await?;
            let waiting: bool = sqlx::query_scalar(
                "SELECT coalesce(bool_or(wait_event_type = 'Lock'), false) FROM pg_stat_activity WHERE pid = $1",
            )
            .bind(b_pid)
            .fetch_one(&mut c)
            .await?;
            Ok(waiting)
        }
    })
    .await?;
    Ok(Conflict { a, a_pid, b_pid, b })
}

impl Conflict {
    /// Rolls A back; B's `ALTER TABLE` then goes through.
    pub async fn end(mut self) -> Result<()> {
        sqlx::raw_sql("ROLLBACK").execute(&mut self.a).await?;
        self.b.await??;
        Ok(())
    }
}

/// The repository's example migrations (the seed runbooks' story).
pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/migrations")
}

/// A controller on a free port (unless `extra` names `--listen`) over the store at
/// `store`, expecting heartbeats every 200 ms so a stopped agent is noticed quickly.
pub async fn controller(store: &str, extra: &[&str]) -> Result<Daemon> {
    let mut args = vec!["--store", store, "--heartbeat-interval", "200ms"];
    if !extra.contains(&"--listen") {
        args.extend(["--listen", "127.0.0.1:0"]);
    }
    args.extend_from_slice(extra);
    Daemon::start("belay-controller", &args, &[]).await
}

/// An agent on a free port with the configuration at `config`.
pub async fn agent(config: &Path) -> Result<Daemon> {
    let config = config.to_string_lossy().into_owned();
    Daemon::start(
        "belay-agent",
        &["--listen", "127.0.0.1:0", "--config", &config],
        &[],
    )
    .await
}

/// The schema as `pg_dump --schema-only` prints it, belay's own schema and the
/// `\restrict` lines of newer pg_dumps left out: what a rollback must restore.
pub fn schema(url: &str) -> Result<String> {
    let bin = belay_testkit::bin_dir()?;
    let out = std::process::Command::new(bin.join("pg_dump"))
        .args([
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--exclude-schema=belay",
            "--dbname",
            url,
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            !l.starts_with("--") && !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict")
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

/// `belay deployments show ID --output json` against the controller at `addr`.
pub async fn show(addr: &str, id: &str) -> Result<serde_json::Value> {
    let r = belay(addr, &["deployments", "show", id, "--output", "json"]).await?;
    ensure!(r.code == 0, "deployments show: {r:?}");
    Ok(r.json())
}

/// One target's entry in a `deployments show --output json` document.
pub fn target<'a>(doc: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    doc["targets"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["target"] == name))
        .unwrap_or_else(|| panic!("no target {name} in {doc}"))
}

/// The steps a target's pipeline entered, in order, from its `transition` events.
pub fn steps(events: &serde_json::Value) -> Vec<String> {
    events
        .as_array()
        .map(|es| {
            es.iter()
                .filter(|e| e["kind"] == "transition")
                .filter_map(|e| e["payload"]["to"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// `psql -c SQL` on `url`, its output trimmed; panics naming the SQL when it fails.
pub fn psql(url: &str, sql: &str) -> String {
    belay_testkit::psql(url, sql)
        .unwrap_or_else(|e| panic!("psql {sql}: {e}"))
        .trim()
        .to_string()
}

/// One agent.toml `[[targets]]` entry with `extra` TOML after its keys (its
/// `[targets.preflight]`, `[[targets.checks]]`, `[[targets.probes]]`).
pub fn target_toml(
    name: &str,
    db: &belay_testkit::TestDb,
    migrations: &Path,
    extra: &str,
) -> String {
    format!(
        "\n[[targets]]\nname = \"{name}\"\nurl = \"{}\"\nmigrations = \"{}\"\n{extra}\n",
        db.url,
        migrations.display()
    )
}

/// `belay deployments show ID --output json` through the controller at `addr`, with
/// `auth` (e.g. `["--token-file", path]`) before the command.
pub async fn show_deployment(addr: &str, auth: &[&str], id: &str) -> Result<serde_json::Value> {
    let mut args = auth.to_vec();
    args.extend_from_slice(&["deployments", "show", id, "--output", "json"]);
    let r = belay(addr, &args).await?;
    ensure!(r.code == 0, "deployments show: {r:?}");
    Ok(r.json())
}

/// The messages of a deployment's rollback-request events (the controller's webhook), in
/// order, across its targets.
pub fn rollback_requests(shown: &serde_json::Value) -> Vec<String> {
    shown["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["events"].as_array().cloned().unwrap_or_default())
        .filter(|e| {
            e["kind"]
                .as_str()
                .is_some_and(|k| k.starts_with("rollback_request"))
        })
        .filter_map(|e| e["message"].as_str().map(String::from))
        .collect()
}
