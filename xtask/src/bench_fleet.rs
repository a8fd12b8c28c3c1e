//! `cargo xtask bench fleet`: a deployment through controller + agent against local-mode
//! `belay migrate` run target by target, and the controller's cost of many heartbeating
//! agents.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use belay_proto::v1 as pb;
use belay_testkit::Cluster;
use pb::controller_service_client::ControllerServiceClient;
use tonic::transport::Endpoint;

use crate::bench_fleet_steps;
use crate::pg::ensure_postgres;
use crate::util::{capture, cargo, describe, heading, step, target_dir};

/// The three migrations of the change every tenant receives.
const CHANGE: &[(&str, &str)] = &[
    (
        "V1__create_items.sql",
        "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL);\n",
    ),
    (
        "V2__add_created_at.sql",
        "ALTER TABLE items ADD COLUMN created_at timestamptz NOT NULL DEFAULT now();\n",
    ),
    (
        "V3__index_items_name.sql",
        "CREATE INDEX items_name_idx ON items (name);\n",
    ),
];

/// HTTP/2 connections the simulated agents share (each carries many concurrent streams).
const SIM_CHANNELS: usize = 16;

/// Environment that would change what the daemons and the CLI do (credentials, listen
/// addresses, a controller or database from the caller's shell).
const SCRUBBED_ENV: &[&str] = &[
    "BELAY_TOKEN",
    "BELAY_CONTROLLER",
    "BELAY_CONTROLLER_LISTEN",
    "BELAY_CONTROLLER_STORE",
    "BELAY_AGENT_LISTEN",
    "BELAY_DATABASE_URL",
    "DATABASE_URL",
    "BELAY_TARGET",
    "BELAY_LOG_FORMAT",
];

#[derive(Debug)]
struct Bins {
    belay: PathBuf,
    agent: PathBuf,
    controller: PathBuf,
}

/// The binaries in `given`, or release builds of the CLI, the agent and the controller.
fn release_bins(given: Option<PathBuf>) -> Result<Bins> {
    if let Some(dir) = given {
        let bins = Bins {
            belay: dir.join("belay"),
            agent: dir.join("belay-agent"),
            controller: dir.join("belay-controller"),
        };
        for bin in [&bins.belay, &bins.agent, &bins.controller] {
            ensure!(bin.is_file(), "{} is not a file", bin.display());
        }
        return Ok(bins);
    }
    step(cargo().args([
        "build",
        "--release",
        "-p",
        "belay",
        "-p",
        "belay-agent",
        "-p",
        "belay-controller",
        "--bins",
    ]))?;
    let dir = target_dir().join("release");
    let bins = Bins {
        belay: dir.join("belay"),
        agent: dir.join("belay-agent"),
        controller: dir.join("belay-controller"),
    };
    for bin in [&bins.belay, &bins.agent, &bins.controller] {
        ensure!(bin.is_file(), "{} was not built", bin.display());
    }
    Ok(bins)
}

pub(crate) fn scrubbed(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null());
    cmd
}

pub fn fleet(
    tenants: usize,
    agents: usize,
    seconds: u64,
    parallel: u32,
    budget: u32,
    no_preflight: bool,
    bin_dir: Option<PathBuf>,
) -> Result<()> {
    ensure!(
        (1..=2000).contains(&tenants),
        "--tenants must be within 1..=2000"
    );
    ensure!(
        (1..=20_000).contains(&agents),
        "--agents must be within 1..=20000"
    );
    ensure!(
        (1..=600).contains(&seconds),
        "--seconds must be within 1..=600"
    );
    ensure!(parallel >= 1, "--parallel must be at least 1");
    ensure!(
        budget >= 3,
        "--budget must be at least 3 (a guarded deployment holds 3)"
    );
    let pg_bin = ensure_postgres()?;
    let bins = release_bins(bin_dir)?;
    let work = tempfile::tempdir().context("could not create a temp dir")?;

    let deploy_line = {
        heading("starting a throwaway PostgreSQL cluster");
        let cluster = Cluster::start().context("could not start a PostgreSQL cluster")?;
        deploy_vs_sequential(
            &cluster,
            &pg_bin,
            &bins,
            work.path(),
            &Shape {
                tenants,
                parallel,
                budget,
                no_preflight,
            },
        )?
    };
    let heartbeat_line = heartbeats(&bins, work.path(), agents, seconds)?;

    heading(&format!(
        "results ({} CPUs; the bench's clients share them with the daemons)",
        thread::available_parallelism().map_or(0, usize::from)
    ));
    println!("{deploy_line}");
    println!("{heartbeat_line}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// (a) deploy through controller + agent vs. (b) local-mode migrate, target by target

/// What the deploy-vs-sequential comparison runs.
struct Shape {
    tenants: usize,
    parallel: u32,
    budget: u32,
    no_preflight: bool,
}

fn deploy_vs_sequential(
    cluster: &Cluster,
    pg_bin: &Path,
    bins: &Bins,
    work: &Path,
    shape: &Shape,
) -> Result<String> {
    let &Shape {
        tenants,
        parallel,
        budget,
        no_preflight,
    } = shape;
    let migrations = work.join("migrations");
    fs::create_dir(&migrations).context("could not create the migrations dir")?;
    for (name, sql) in CHANGE {
        fs::write(migrations.join(name), sql).with_context(|| format!("could not write {name}"))?;
    }

    // Same work on both sides: N fresh databases each, plus one to warm up on.
    let fleet_dbs: Vec<String> = (1..=tenants).map(|i| format!("tenant_{i:04}")).collect();
    let seq_dbs: Vec<String> = (1..=tenants).map(|i| format!("seq_{i:04}")).collect();
    let warmup = "warmup_0".to_owned();
    heading(&format!("creating {} databases", 2 * tenants + 1));
    let created = Instant::now();
    let mut script = String::new();
    for db in fleet_dbs.iter().chain(&seq_dbs).chain([&warmup]) {
        let _ = writeln!(script, "CREATE DATABASE {db} TEMPLATE template0;");
    }
    let script_path = work.join("create_databases.sql");
    fs::write(&script_path, script).context("could not write the CREATE DATABASE script")?;
    capture(
        Command::new(pg_bin.join("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(cluster.url("postgres"))
            .arg("-f")
            .arg(&script_path),
    )?;
    println!(
        "created in {:.1}s (one psql session)",
        created.elapsed().as_secs_f64()
    );

    let local_migrate = local_migrate_command(&bins.belay, &migrations, no_preflight)?;
    // One untimed run: the first migrations after a cluster starts pay for cold caches.
    capture(&mut local_migrate(&cluster.url(&warmup)))?;

    heading("starting a controller and one agent owning every tenant");
    let controller = Daemon::start(
        "belay-controller",
        scrubbed(&bins.controller)
            .args(["--listen", "127.0.0.1:0", "--store"])
            .arg(work.join("deploy-store.db"))
            .args(["--heartbeat-interval", "1s"]),
        &work.join("controller-deploy.log"),
    )?;
    let mut config = format!(
        "name = \"bench-agent\"\ncontroller = \"{}\"\n\n[limits]\nmax_connections_per_server = {budget}\n",
        controller.addr
    );
    for db in &fleet_dbs {
        let _ = write!(
            config,
            "\n[[targets]]\nname = \"{db}\"\nurl = \"{}\"\nmigrations = \"{}\"\n",
            cluster.url(db),
            migrations.display()
        );
    }
    let config_path = work.join("agent.toml");
    fs::write(&config_path, config).context("could not write agent.toml")?;
    let agent = Daemon::start(
        "belay-agent",
        scrubbed(&bins.agent)
            .args(["--listen", "127.0.0.1:0", "--config"])
            .arg(&config_path),
        &work.join("agent.log"),
    )?;
    wait_for_agent(&bins.belay, &controller, tenants)?;

    heading(&format!(
        "(a) deploy to {tenants} targets through controller + agent"
    ));
    let mut deploy = scrubbed(&bins.belay);
    deploy
        .arg("--controller")
        .arg(&controller.addr)
        .args(["deploy", "--targets", "tenant_*", "--canary", "1"])
        .args(["--batch", "25%", "--parallel", &parallel.to_string()])
        .args(["--output", "json"]);
    if no_preflight {
        deploy.arg("--no-preflight");
    }
    println!("$ {}", describe(&deploy));
    println!("{}", same_work(no_preflight));
    // Every client session on the server during the deployment is the agent's: the
    // controller's store is SQLite and the CLI talks to the controller only.
    let sessions = SessionSampler::start(cluster.url("postgres"))?;
    let cpu_before = Cpu::read(cluster.pid(), Some((&agent, &controller)))?;
    let started = Instant::now();
    let out = deploy.output().context("could not run belay deploy")?;
    let fleet_time = started.elapsed();
    let fleet_cpu = Cpu::read(cluster.pid(), Some((&agent, &controller)))?.since(&cpu_before);
    let sessions = sessions.stop()?;
    let deployment_id = check_deploy(&out, tenants, &controller)?;
    println!(
        "peak server sessions during the deployment: {} open, {} listed with those closing ({} samples), budget {budget}",
        sessions.open, sessions.listed, sessions.samples
    );
    println!(
        "deployment succeeded on {tenants} targets in {:.2}s",
        fleet_time.as_secs_f64()
    );
    let (_, controller_peak) = controller.memory()?;

    heading(&format!(
        "(b) local-mode `belay migrate` on {tenants} databases, one after another"
    ));
    println!(
        "$ {} (per database)",
        describe(&local_migrate(&cluster.url(&seq_dbs[0])))
    );
    let cpu_before = Cpu::read(cluster.pid(), None)?;
    let started = Instant::now();
    let mut walls = std::collections::BTreeMap::new();
    for db in &seq_dbs {
        let one = Instant::now();
        capture(&mut local_migrate(&cluster.url(db)))
            .with_context(|| format!("local migrate of {db} failed"))?;
        walls.insert(db.clone(), one.elapsed().as_secs_f64());
    }
    let seq_time = started.elapsed();
    let seq_cpu = Cpu::read(cluster.pid(), None)?.since(&cpu_before);
    println!(
        "{tenants} databases migrated in {:.2}s",
        seq_time.as_secs_f64()
    );

    heading("checking every database's history; reading where each target's time went");
    let urls: Vec<(String, String)> = fleet_dbs
        .iter()
        .chain(&seq_dbs)
        .map(|db| (db.clone(), cluster.url(db)))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start a tokio runtime")?;
    let local_steps = runtime.block_on(bench_fleet_steps::check_databases(
        &urls,
        CHANGE.len(),
        &walls,
    ))?;
    println!(
        "all {} databases record {} migrations",
        2 * tenants,
        CHANGE.len()
    );
    let fleet_steps = runtime.block_on(bench_fleet_steps::fleet_from_store(
        &work.join("deploy-store.db"),
        &deployment_id,
    ))?;
    print!(
        "{}",
        bench_fleet_steps::render(
            &fleet_steps,
            &local_steps,
            fleet_time.as_secs_f64(),
            seq_time.as_secs_f64()
        )
    );

    let (f, s) = (fleet_time.as_secs_f64(), seq_time.as_secs_f64());
    let n = tenants as f64;
    println!("{}", fleet_cpu.render("fleet", n, f));
    println!("{}", seq_cpu.render("local", n, s));
    let held = if sessions.open <= i64::from(budget) {
        "held"
    } else {
        "EXCEEDED"
    };
    Ok(format!(
        "fleet {tenants} targets x {} migrations: controller+agent {f:.2}s (--parallel {parallel}), \
         sequential local {s:.2}s, speed-up {:.2}x (target >= 4x), per target {:.0} ms vs {:.0} ms, \
         controller peak RSS {} (target < 200 MiB), peak server sessions {} open / {} listed \
         (agent budget {budget}: {held})",
        CHANGE.len(),
        s / f,
        f * 1000.0 / n,
        s * 1000.0 / n,
        mib(controller_peak),
        sessions.open,
        sessions.listed
    ))
}

/// CPU time (clock ticks) spent so far, per party: the server (the postmaster and its
/// exited backends: every session of a phase has closed by its end), the daemons, and the
/// bench's own child processes (the CLI runs).
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    server: u64,
    agent: u64,
    controller: u64,
    cli: u64,
}

impl Cpu {
    fn read(postmaster: u32, daemons: Option<(&Daemon, &Daemon)>) -> Result<Cpu> {
        let (agent, controller) = match daemons {
            Some((a, c)) => (cpu_ticks(a.pid)?, cpu_ticks(c.pid)?),
            None => (0, 0),
        };
        Ok(Cpu {
            server: stat_ticks(postmaster, 11..=14)?,
            agent,
            controller,
            cli: stat_ticks(std::process::id(), 13..=14)?,
        })
    }

    fn since(&self, before: &Cpu) -> Cpu {
        Cpu {
            server: self.server.saturating_sub(before.server),
            agent: self.agent.saturating_sub(before.agent),
            controller: self.controller.saturating_sub(before.controller),
            cli: self.cli.saturating_sub(before.cli),
        }
    }

    /// Milliseconds of CPU per target, per party, and the share of the machine's cores
    /// the phase kept busy.
    fn render(&self, side: &str, targets: f64, wall_secs: f64) -> String {
        let ms = 1000.0 / clock_ticks_per_second();
        let per = |ticks: u64| ticks as f64 * ms / targets;
        let total = self.server + self.agent + self.controller + self.cli;
        let cores = thread::available_parallelism().map_or(1, usize::from) as f64;
        format!(
            "{side} CPU per target: {:.1} ms total = server {:.1} + agent {:.1} + controller {:.1} \
             + CLI {:.1}; {:.0}% of {cores} cores busy over the phase",
            per(total),
            per(self.server),
            per(self.agent),
            per(self.controller),
            per(self.cli),
            total as f64 * ms / 1000.0 / wall_secs / cores * 100.0
        )
    }
}

/// Counts the server's client sessions (other than its own) every few milliseconds, on a
/// thread of its own, until stopped.
struct SessionSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: thread::JoinHandle<Result<Sessions>>,
}

/// What a [`SessionSampler`] saw.
#[derive(Debug, Clone, Copy)]
struct Sessions {
    /// The most sessions at once, leaving out those whose client had already hung up
    /// (`idle` and no longer waiting for it: the server removes them a moment later).
    open: i64,
    /// The most at once, those included.
    listed: i64,
    samples: u64,
}

impl SessionSampler {
    fn start(url: String) -> Result<SessionSampler> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let stopping = stop.clone();
        let handle = thread::spawn(move || -> Result<Sessions> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("could not start a tokio runtime")?;
            runtime.block_on(async move {
                use sqlx::Connection as _;
                let mut conn = match sqlx::PgConnection::connect(&url).await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("sampler: {e}")));
                        bail!("sampler could not connect: {e}");
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let mut seen = Sessions {
                    open: 0,
                    listed: 0,
                    samples: 0,
                };
                while !stopping.load(Ordering::Relaxed) {
                    let (open, listed): (i64, i64) = sqlx::query_as(
                        "SELECT count(*) FILTER (WHERE NOT (state = 'idle' AND wait_event IS NULL)), \
                                count(*) \
                         FROM pg_stat_activity \
                         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
                    )
                    .fetch_one(&mut conn)
                    .await
                    .context("sampling pg_stat_activity")?;
                    seen.open = seen.open.max(open);
                    seen.listed = seen.listed.max(listed);
                    seen.samples += 1;
                    // A sample every few milliseconds: often enough to catch every
                    // connection (each lives far longer), without taking a core from the
                    // daemons being measured.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Ok(seen)
            })
        });
        ready_rx
            .recv()
            .context("the session sampler died before connecting")??;
        Ok(SessionSampler { stop, handle })
    }

    fn stop(self) -> Result<Sessions> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("the session sampler panicked"))?
    }
}

/// `belay --dir D migrate` for a database URL, doing what the agent's pipeline does for a
/// fleet target: the agent's targets here have no `backup_dir` (no pre-deployment backup),
/// so `--backup none`; preflight, the lint gate, the lock guard, postflight validation and
/// the deployment log in the database run on both sides, unless `no_preflight`, which
/// skips preflight on both.
fn local_migrate_command(
    belay: &Path,
    migrations: &Path,
    no_preflight: bool,
) -> Result<impl Fn(&str) -> Command> {
    let help = capture(scrubbed(belay).args(["migrate", "--help"]))?;
    let help = String::from_utf8_lossy(&help.stdout);
    ensure!(
        help.contains("--backup") && help.contains("--no-preflight"),
        "{} migrate has no --backup or --no-preflight: too old for this bench",
        belay.display()
    );
    let (belay, migrations) = (belay.to_path_buf(), migrations.to_path_buf());
    Ok(move |url: &str| {
        let mut cmd = scrubbed(&belay);
        cmd.arg("--dir").arg(&migrations).arg("migrate");
        cmd.args(["--backup", "none"]);
        if no_preflight {
            cmd.arg("--no-preflight");
        }
        cmd.env("BELAY_DATABASE_URL", url);
        cmd
    })
}

fn wait_for_agent(belay: &Path, controller: &Daemon, targets: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = scrubbed(belay)
            .arg("--controller")
            .arg(&controller.addr)
            .args(["agents", "--output", "json"])
            .output()
            .context("could not run belay agents")?;
        if out.status.success() {
            let doc: serde_json::Value =
                serde_json::from_slice(&out.stdout).context("belay agents: not JSON")?;
            let ready = doc.as_array().is_some_and(|agents| {
                agents.iter().any(|a| {
                    a["state"] == "connected"
                        && a["targets"].as_array().map(Vec::len) == Some(targets)
                })
            });
            if ready {
                println!("agent connected with {targets} targets");
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "the agent did not connect with {targets} targets within 60 s; last `belay agents`: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Fails, naming the targets that did not succeed, unless the deployment succeeded on
/// every target.
fn check_deploy(out: &std::process::Output, tenants: usize, controller: &Daemon) -> Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let failed = |why: String| -> anyhow::Error {
        anyhow::anyhow!(
            "the fleet deployment failed: {why}\n--- belay deploy stderr\n{stderr}\n--- controller log (tail)\n{}",
            controller.log_tail(30)
        )
    };
    let doc: serde_json::Value = match serde_json::from_str(stdout.trim()) {
        Ok(doc) => doc,
        Err(_) => {
            return Err(failed(format!(
                "exit {}, output is not JSON:\n{}",
                out.status,
                stdout.chars().take(4000).collect::<String>()
            )));
        }
    };
    let targets = doc["targets"].as_array().cloned().unwrap_or_default();
    let not_ok: Vec<String> = targets
        .iter()
        .filter(|t| t["state"] != "succeeded")
        .take(10)
        .map(|t| format!("{} {}: {}", t["target"], t["state"], t["message"]))
        .collect();
    if !out.status.success() || doc["state"] != "succeeded" || !not_ok.is_empty() {
        return Err(failed(format!(
            "exit {}, deployment state {}; targets not succeeded (first 10): {not_ok:?}",
            out.status, doc["state"]
        )));
    }
    if targets.len() != tenants {
        return Err(failed(format!(
            "the deployment covers {} targets, expected {tenants}",
            targets.len()
        )));
    }
    doc["id"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| failed("the deployment document has no id".into()))
}

/// What each side does per database, printed beside the commands.
fn same_work(no_preflight: bool) -> String {
    format!(
        "same work per database on both sides: {}the runner lock, the lint gate, the lock \
         guard's session, the 3 migrations, postflight validation, the deployment log in the \
         database; no backup (the agent's targets have no backup_dir; locally --backup none). \
         The fleet side also streams every event to the controller, which stores it",
        if no_preflight {
            "no preflight (--no-preflight on both), "
        } else {
            "preflight, "
        }
    )
}

// ---------------------------------------------------------------------------------------
// heartbeats: many simulated agents against one controller

fn heartbeats(bins: &Bins, work: &Path, agents: usize, seconds: u64) -> Result<String> {
    heading(&format!(
        "{agents} simulated agents heartbeating every second for {seconds}s against a fresh controller"
    ));
    let controller = Daemon::start(
        "belay-controller",
        scrubbed(&bins.controller)
            .args(["--listen", "127.0.0.1:0", "--store"])
            .arg(work.join("heartbeat-store.db"))
            .args(["--heartbeat-interval", "1s"]),
        &work.join("controller-heartbeat.log"),
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("could not start a tokio runtime")?;
    let stats = runtime.block_on(simulate(&controller, agents, seconds))?;
    let (rss, peak) = controller.memory()?;
    ensure!(
        stats.failed == 0,
        "{} of {} heartbeats failed or were not recognised; controller log (tail):\n{}",
        stats.failed,
        stats.sent,
        controller.log_tail(30)
    );
    ensure!(
        stats.connected == agents,
        "the controller lists {} of {agents} agents as connected",
        stats.connected
    );
    println!(
        "{} heartbeats in the window, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        stats.sent, stats.p50_ms, stats.p99_ms, stats.max_ms
    );
    Ok(format!(
        "heartbeats {agents} agents @1s for {seconds}s: controller CPU {:.1}% of a core, \
         RSS {} (peak {}); {:.0} heartbeats/s, latency p99 {:.1} ms",
        stats.cpu_percent,
        mib(rss),
        mib(peak),
        stats.sent as f64 / stats.window.as_secs_f64(),
        stats.p99_ms
    ))
}

#[derive(Debug)]
struct HeartbeatStats {
    sent: u64,
    failed: u64,
    connected: usize,
    cpu_percent: f64,
    window: Duration,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

async fn simulate(controller: &Daemon, agents: usize, seconds: u64) -> Result<HeartbeatStats> {
    let uri = format!("http://{}", controller.addr);
    let mut channels = Vec::new();
    for _ in 0..SIM_CHANNELS.min(agents) {
        let channel = Endpoint::from_shared(uri.clone())
            .context("bad controller address")?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("could not connect to the controller at {uri}"))?;
        channels.push(channel);
    }

    // Registration, a few at a time per channel.
    let registered = Instant::now();
    let mut registering = tokio::task::JoinSet::new();
    for (c, channel) in channels.iter().enumerate() {
        let channel = channel.clone();
        let names: Vec<usize> = (c..agents).step_by(channels.len()).collect();
        registering.spawn(async move {
            let mut client = ControllerServiceClient::new(channel);
            for i in names {
                client
                    .register_agent(pb::RegisterAgentRequest {
                        name: format!("sim-agent-{i}"),
                        // Never dialled: nothing is deployed to the simulated targets.
                        address: "127.0.0.1:9".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        targets: vec![pb::TargetInfo {
                            name: format!("sim_{i}"),
                            ..Default::default()
                        }],
                    })
                    .await
                    .with_context(|| format!("registering sim-agent-{i}"))?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(joined) = registering.join_next().await {
        joined.context("a registration task panicked")??;
    }
    println!(
        "{agents} agents registered in {:.2}s over {} connections",
        registered.elapsed().as_secs_f64(),
        channels.len()
    );

    // Heartbeats, spread evenly over each second as independent agents' would be.
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let start = tokio::time::Instant::now();
    for i in 0..agents {
        let mut client = ControllerServiceClient::new(channels[i % channels.len()].clone());
        let offset = Duration::from_micros((i as u64 * 1_000_000) / agents as u64);
        let (sent, failed, measuring, latencies) = (
            sent.clone(),
            failed.clone(),
            measuring.clone(),
            latencies.clone(),
        );
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval_at(start + offset, Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let name = format!("sim-agent-{i}");
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                let t = Instant::now();
                let ok = matches!(
                    client.heartbeat(pb::HeartbeatRequest { name: name.clone() }).await,
                    Ok(r) if r.get_ref().known
                );
                if measuring.load(Ordering::Relaxed) {
                    sent.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    let us = u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX);
                    if let Ok(mut l) = latencies.lock() {
                        l.push(us);
                    }
                }
            }
        });
    }

    // Two seconds to settle (first heartbeats, connection warm-up), then the window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = controller.pid;
    let (cpu0, t0) = (cpu_ticks(pid)?, Instant::now());
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let (cpu1, window) = (cpu_ticks(pid)?, t0.elapsed());

    // Whether the controller sees every agent alive, asked while they still heartbeat.
    let listed = ControllerServiceClient::new(channels[0].clone())
        .list_agents(pb::ListAgentsRequest {})
        .await
        .context("ListAgents")?;
    let connected = listed
        .get_ref()
        .agents
        .iter()
        .filter(|a| a.state == "connected")
        .count();
    let _ = stop_tx.send(true);
    while let Some(joined) = tasks.join_next().await {
        joined.context("a heartbeat task panicked")?;
    }

    let ticks_per_sec = clock_ticks_per_second();
    let cpu_percent = (cpu1 - cpu0) as f64 / ticks_per_sec / window.as_secs_f64() * 100.0;
    let mut lat = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    lat.sort_unstable();
    let pct = |p: usize| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = (lat.len() * p).div_ceil(100).saturating_sub(1);
        f64::from(lat[i]) / 1000.0
    };
    Ok(HeartbeatStats {
        sent: sent.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        connected,
        cpu_percent,
        window,
        p50_ms: pct(50),
        p99_ms: pct(99),
        max_ms: lat.last().map_or(0.0, |&us| f64::from(us) / 1000.0),
    })
}

/// utime + stime of a process, in clock ticks (`/proc/<pid>/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> Result<u64> {
    stat_ticks(pid, 11..=12)
}

/// The sum of `fields` of `/proc/<pid>/stat`, counted after the command name: 11..=12
/// utime and stime, 13..=14 the reaped children's (a postmaster's backends, the bench's
/// own CLI runs).
fn stat_ticks(pid: u32, fields: std::ops::RangeInclusive<usize>) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("could not read /proc/{pid}/stat"))?;
    stat_fields(&stat, fields).with_context(|| format!("unexpected /proc/{pid}/stat: {stat}"))
}

fn stat_fields(stat: &str, range: std::ops::RangeInclusive<usize>) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces: count from the
    // last ')'. After it, field 3 (state) comes first, so utime is index 11.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    range
        .map(|i| fields.get(i)?.parse::<u64>().ok())
        .sum::<Option<u64>>()
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|&t| t > 0.0)
        .unwrap_or(100.0)
}

/// `VmRSS` and `VmHWM` (peak RSS) of `/proc/<pid>/status`, in KiB.
fn parse_memory(status: &str) -> Option<(u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn mib(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

// ---------------------------------------------------------------------------------------

/// A controller or agent started by the bench: stderr goes to a log file; killed when
/// dropped.
#[derive(Debug)]
pub(crate) struct Daemon {
    child: Child,
    pid: u32,
    pub(crate) addr: String,
    log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` (which listens on 127.0.0.1:0) and waits for its `listening on ADDR`.
    pub(crate) fn start(what: &str, cmd: &mut Command, log: &Path) -> Result<Daemon> {
        let log_file =
            fs::File::create(log).with_context(|| format!("could not create {}", log.display()))?;
        cmd.stdout(Stdio::piped()).stderr(log_file);
        println!("$ {}", describe(cmd));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("could not start {what}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        // Reads the first line, then keeps draining so the daemon never blocks on stdout.
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let pid = child.id();
        let mut daemon = Daemon {
            child,
            pid,
            addr: String::new(),
            log: log.to_path_buf(),
        };
        let line = rx.recv_timeout(Duration::from_secs(30)).ok().flatten();
        match line
            .and_then(Result::ok)
            .as_deref()
            .and_then(|l| l.strip_prefix("listening on "))
        {
            Some(addr) => daemon.addr = addr.trim().to_owned(),
            None => bail!(
                "{what} did not announce its address within 30 s; its log:\n{}",
                daemon.log_tail(30)
            ),
        }
        Ok(daemon)
    }

    /// Current and peak resident memory in KiB.
    fn memory(&self) -> Result<(u64, u64)> {
        let path = format!("/proc/{}/status", self.pid);
        let status = fs::read_to_string(&path).with_context(|| format!("could not read {path}"))?;
        parse_memory(&status).with_context(|| format!("no VmRSS/VmHWM in {path}"))
    }

    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_past_a_command_name_with_spaces() {
        let stat = "1234 (belay (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 7 3 20 0 4 0 99 1000 50";
        assert_eq!(stat_fields(stat, 11..=12), Some(325));
        assert_eq!(stat_fields(stat, 11..=14), Some(335));
    }

    #[test]
    fn memory_fields_are_read() {
        let status = "Name:\tbelay-controller\nVmHWM:\t   43008 kB\nVmRSS:\t   41984 kB\n";
        assert_eq!(parse_memory(status), Some((41984, 43008)));
        assert_eq!(mib(43008), "42 MiB");
    }
}
