//! `cargo xtask demo`: the whole story on a throwaway PostgreSQL, through the real CLI and
//! daemons. A controller and an agent (token auth, loopback, free ports) own the sample
//! shop's database; the demo deploys a release through them, saves the application from a
//! held lock, lets a bad release trip its probe and be rolled back by undo with the dropped
//! data kept, shows the incident report, and brings the kept data back.
//!
//! Every step checks its outcome (exit codes, the controller's record, the rollback's
//! report, the schema, the recovered rows): the demo exits non-zero when one is not what
//! the story says, which is how `cargo xtask test` keeps it from rotting. Everything it
//! started (daemons, psql sessions, the cluster, the work directory) is removed at the end,
//! on failure, and on Ctrl-C.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use belay_testkit::Cluster;
use serde_json::Value;

use crate::pg::{ensure_build_deps, ensure_postgres};
use crate::util::{cargo, root, step, target_dir};

/// How often the demo's application places an order during the bad release.
const CHECKOUT_EVERY: Duration = Duration::from_millis(250);

/// Environment from the caller's shell that would point the demo's commands elsewhere.
const SCRUBBED_ENV: &[&str] = &[
    "BELAY_TOKEN",
    "BELAY_CONTROLLER",
    "BELAY_CONTROLLER_LISTEN",
    "BELAY_CONTROLLER_STORE",
    "BELAY_AGENT_LISTEN",
    "BELAY_DATABASE_URL",
    "DATABASE_URL",
    "BELAY_TARGET",
    "BELAY_CA",
    "BELAY_LOG_FORMAT",
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PGSERVICE",
];

/// What the demo started, so that one place stops it all: the end of the demo, a failed
/// step, or Ctrl-C (from another thread, while a step is still running).
struct Stage {
    children: Vec<(String, Child)>,
    cluster: Option<Cluster>,
    work: Option<tempfile::TempDir>,
}

static STAGE: Mutex<Stage> = Mutex::new(Stage {
    children: Vec::new(),
    cluster: None,
    work: None,
});

fn stage() -> std::sync::MutexGuard<'static, Stage> {
    STAGE.lock().unwrap_or_else(|p| p.into_inner())
}

fn keep_child(name: &str, child: Child) {
    stage().children.push((name.to_owned(), child));
}

fn take_child(name: &str) -> Option<Child> {
    let mut s = stage();
    let i = s.children.iter().position(|(n, _)| n == name)?;
    Some(s.children.remove(i).1)
}

/// Set once Ctrl-C or SIGTERM arrived: the signal watcher tears down and exits 130.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Kills every process the demo started, stops and removes the cluster and the work
/// directory; says what it removed. Holds the stage throughout, so a teardown started by a
/// signal while the demo's own is under way (or the reverse) waits for it to finish.
fn teardown() {
    let mut s = stage();
    let mut stopped = Vec::new();
    for (name, mut child) in std::mem::take(&mut s.children) {
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
            stopped.push(name);
        }
        let _ = child.wait();
    }
    if !stopped.is_empty() {
        println!("stopped {}", stopped.join(", "));
    }
    if let Some(cluster) = s.cluster.take() {
        let dir = cluster.data_dir().display().to_string();
        drop(cluster);
        println!("stopped PostgreSQL and removed {dir}");
    }
    if let Some(work) = s.work.take() {
        let dir = work.path().display().to_string();
        drop(work);
        println!("removed {dir}");
    }
}

/// On Ctrl-C (SIGINT) or SIGTERM: tear everything down and exit 130, whatever step runs.
fn on_interrupt_tear_down() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start the signal watcher")?;
    thread::spawn(move || {
        rt.block_on(async {
            let term = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = term => {}
            }
        });
        INTERRUPTED.store(true, Ordering::SeqCst);
        eprintln!("\ninterrupted: cleaning up");
        teardown();
        std::process::exit(130);
    });
    Ok(())
}

pub fn run() -> Result<()> {
    ensure_postgres()?;
    ensure_build_deps()?;
    let bins = build_bins()?;
    on_interrupt_tear_down()?;
    let started = Instant::now();
    let result = Demo::new(bins).and_then(|mut demo| demo.story());
    if INTERRUPTED.load(Ordering::SeqCst) {
        // The step failed because its processes were interrupted too: the signal watcher
        // is tearing down and exits 130 when it is done.
        loop {
            thread::park();
        }
    }
    heading("cleaning up");
    teardown();
    let done = result?;
    println!(
        "\ndemo finished in {:.1} s; every step ended as the story says:",
        started.elapsed().as_secs_f64()
    );
    for line in done {
        println!("  ok  {line}");
    }
    Ok(())
}

struct Bins {
    belay: PathBuf,
    agent: PathBuf,
    controller: PathBuf,
    psql: PathBuf,
}

/// The debug builds of the CLI and both daemons (a no-op when `cargo xtask test` has just
/// built them).
fn build_bins() -> Result<Bins> {
    step(cargo().args([
        "build",
        "-p",
        "belay",
        "-p",
        "belay-agent",
        "-p",
        "belay-controller",
        "--bins",
    ]))?;
    let dir = target_dir().join("debug");
    let bins = Bins {
        belay: dir.join("belay"),
        agent: dir.join("belay-agent"),
        controller: dir.join("belay-controller"),
        psql: belay_testkit::bin_dir()
            .context("could not find PostgreSQL's programs")?
            .join("psql"),
    };
    for bin in [&bins.belay, &bins.agent, &bins.controller, &bins.psql] {
        ensure!(bin.is_file(), "{} was not built", bin.display());
    }
    Ok(bins)
}

fn heading(text: &str) {
    println!("\n==> {text}");
}

/// Explanation under a heading, wrapped at 92 columns.
fn say(text: &str) {
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > 92 {
            println!("{line}");
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        println!("{line}");
    }
}

/// A command line as the user would type it.
fn shown(cmd: &str) {
    println!("$ {cmd}");
}

/// A line the demo itself adds while a command's output streams.
fn aside(text: &str) {
    println!("   >> {text}");
}

fn quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%,+".contains(c))
    {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout).with_context(|| {
            format!(
                "not JSON: {}{}",
                self.stdout.chars().take(400).collect::<String>(),
                self.stderr
            )
        })
    }
}

struct Demo {
    bins: Bins,
    work: PathBuf,
    examples: PathBuf,
    /// `postgres://postgres@127.0.0.1:PORT/` (trust auth: no password to hide).
    server: String,
    shop_url: String,
    controller: String,
    token: String,
    milestones: Vec<String>,
}

impl Demo {
    fn new(bins: Bins) -> Result<Demo> {
        let examples = root().join("examples/shop");
        ensure!(
            examples.join("migrations").is_dir(),
            "{} does not exist",
            examples.join("migrations").display()
        );
        let work = tempfile::Builder::new()
            .prefix("belay-demo-")
            .tempdir()
            .context("could not create a work directory")?;
        let path = work.path().to_path_buf();
        stage().work = Some(work);
        Ok(Demo {
            bins,
            work: path,
            examples,
            server: String::new(),
            shop_url: String::new(),
            controller: String::new(),
            token: String::new(),
            milestones: Vec::new(),
        })
    }

    fn story(&mut self) -> Result<Vec<String>> {
        self.setup()?;
        self.first_deployment()?;
        self.lock_guard_save()?;
        let snapshot_cmd = self.bad_release()?;
        self.recover(&snapshot_cmd)?;
        Ok(std::mem::take(&mut self.milestones))
    }

    fn milestone(&mut self, text: String) {
        self.milestones.push(text);
    }

    // ---- commands ----------------------------------------------------------------------

    fn scrubbed(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        for var in SCRUBBED_ENV {
            cmd.env_remove(var);
        }
        cmd.current_dir(&self.work).stdin(Stdio::null());
        cmd
    }

    /// `belay ARGS` against the demo's controller.
    fn belay(&self, args: &[&str]) -> Command {
        let mut cmd = self.scrubbed(&self.bins.belay);
        cmd.args(args)
            .env("BELAY_CONTROLLER", &self.controller)
            .env("BELAY_TOKEN", &self.token);
        cmd
    }

    /// Runs `belay ARGS`, printing the command and its output as it comes; `on_line` sees
    /// every line of stdout as it is printed.
    fn belay_shown(&self, args: &[&str], mut on_line: impl FnMut(&str)) -> Result<Run> {
        shown(&format!(
            "belay {}",
            args.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
        ));
        let mut child = self
            .belay(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("could not run belay")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let err_reader = thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        let mut stdout = String::new();
        for line in BufReader::new(child.stdout.take().context("no stdout")?)
            .lines()
            .map_while(Result::ok)
        {
            println!("{line}");
            on_line(&line);
            stdout.push_str(&line);
            stdout.push('\n');
        }
        let status = child.wait().context("waiting for belay")?;
        let stderr = err_reader.join().unwrap_or_default();
        Ok(Run {
            code: status.code(),
            stdout,
            stderr,
        })
    }

    /// Runs `belay ARGS` without printing: the demo's own checks.
    fn belay_quiet(&self, args: &[&str]) -> Result<Run> {
        let out = self.belay(args).output().context("could not run belay")?;
        Ok(Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// One query with psql (tuples only, unaligned); an error is an error.
    fn sql(&self, url: &str, sql: &str) -> Result<String> {
        let out = self
            .scrubbed(&self.bins.psql)
            .args([
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                url,
                "-c",
                sql,
            ])
            .output()
            .context("could not run psql")?;
        ensure!(
            out.status.success(),
            "psql `{sql}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// A psql session the demo keeps open and types into (the report holding a lock, the
    /// application), registered for teardown under `name`.
    fn session(&self, name: &str, app: &str) -> Result<ChildStdin> {
        let mut child = self
            .scrubbed(&self.bins.psql)
            .args(["-X", "-q", "-d", &self.shop_url])
            .env("PGAPPNAME", app)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("could not start psql")?;
        let stdin = child.stdin.take().context("no stdin for psql")?;
        keep_child(name, child);
        Ok(stdin)
    }

    /// Polls `sql` until it returns `want`, for at most 30 s.
    fn wait_until(&self, what: &str, sql: &str, want: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.sql(&self.shop_url, sql)? == want {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{what} did not happen within 30 s"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    // ---- 1 -------------------------------------------------------------------------------

    fn setup(&mut self) -> Result<()> {
        heading("1/5  A throwaway PostgreSQL, the shop's database, a controller and an agent");
        say(
            "Everything runs on this machine and is removed at the end (also on Ctrl-C): a \
             PostgreSQL cluster of its own on a free port, and the sample shop of \
             examples/shop with some accounts and orders. belay-controller keeps the \
             deployment record; belay-agent runs beside the database and does the work. \
             They talk gRPC on 127.0.0.1 and every call carries a bearer token.",
        );
        let cluster = Cluster::start().context("could not start a PostgreSQL cluster")?;
        self.server = cluster.url("");
        let port = cluster.port();
        let data = cluster.data_dir().display().to_string();
        stage().cluster = Some(cluster);
        println!("PostgreSQL on 127.0.0.1:{port} (data directory {data})");
        let postgres = format!("{}postgres", self.server);
        shown(&format!("psql {postgres} -c 'CREATE DATABASE shop'"));
        self.sql(&postgres, "CREATE DATABASE shop")?;
        self.shop_url = format!("{}shop", self.server);
        let seed = self.examples.join("seed.sql");
        shown(&format!("psql {} -f examples/shop/seed.sql", self.shop_url));
        let out = self
            .scrubbed(&self.bins.psql)
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.shop_url,
                "-f",
            ])
            .arg(&seed)
            .output()
            .context("could not run psql")?;
        ensure!(
            out.status.success(),
            "seeding the shop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!(
            "the shop: {} accounts, {} orders",
            self.sql(&self.shop_url, "SELECT count(*) FROM accounts")?,
            self.sql(&self.shop_url, "SELECT count(*) FROM orders")?
        );

        println!();
        shown(&format!("cd {}", self.work.display()));
        say(
            "A random token in a file only its owner reads; the controller and the agent \
             read it from there, the CLI from BELAY_TOKEN. It is never on a command line.",
        );
        self.token = random_token()?;
        let token_file = self.work.join("token");
        write_private(&token_file, &format!("{}\n", self.token))?;
        println!("(the demo wrote 24 random bytes, hex, to ./token, mode 0600)");

        let controller = start_daemon(
            "belay-controller",
            self.scrubbed(&self.bins.controller).args([
                "--listen",
                "127.0.0.1:0",
                "--store",
                "controller.db",
                "--token-file",
                "token",
            ]),
            &self.work.join("controller.log"),
            "belay-controller --listen 127.0.0.1:0 --store controller.db --token-file token",
        )?;
        self.controller = controller;

        say(
            "The agent's configuration: one target, the shop, with a SQL probe that counts \
             checkout errors logged since the schema last changed, and automatic rollback. \
             The probe period (500ms) and the settle time (2s) are short so the demo fits in \
             a minute; production values are seconds to minutes.",
        );
        let config = agent_toml(&self.controller, &self.work, &self.examples);
        fs::write(self.work.join("agent.toml"), &config).context("could not write agent.toml")?;
        shown("cat agent.toml");
        print!("{config}");
        start_daemon(
            "belay-agent",
            self.scrubbed(&self.bins.agent)
                .args(["--listen", "127.0.0.1:0", "--config", "agent.toml"])
                .env("SHOP_DATABASE_URL", &self.shop_url),
            &self.work.join("agent.log"),
            &format!(
                "SHOP_DATABASE_URL={} belay-agent --listen 127.0.0.1:0 --config agent.toml",
                self.shop_url
            ),
        )?;
        self.wait_for_agent()?;
        self.milestone("a throwaway PostgreSQL, a controller and an agent started".into());
        Ok(())
    }

    fn wait_for_agent(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self.belay_quiet(&["agents", "--output", "json"])?;
            if r.code == Some(0)
                && r.json()?.as_array().is_some_and(|agents| {
                    agents.iter().any(|a| {
                        a["state"] == "connected"
                            && a["targets"].as_array().is_some_and(|t| t.len() == 1)
                    })
                })
            {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the agent did not connect within 30 s: {}{}",
                r.stdout,
                r.stderr
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    // ---- 2 -------------------------------------------------------------------------------

    fn first_deployment(&mut self) -> Result<()> {
        heading("2/5  A deployment through the controller");
        say(
            "The CLI talks to the controller only. `belay agents` lists who is connected and \
             which databases they own. Then release 1.1 (V1, a nullable column on accounts) \
             is deployed to the shop: its agent runs the pipeline beside the database, \
             preflight → backup → migrate → validate → watch (3 s here), and streams each \
             step to the controller, which prints it here and keeps the record.",
        );
        shown(&format!(
            "export BELAY_CONTROLLER={} BELAY_TOKEN=\"$(cat token)\"",
            self.controller
        ));
        let r = self.belay_shown(&["agents"], |_| {})?;
        ensure!(r.code == Some(0), "`belay agents` exited {:?}", r.code);
        println!();
        let r = self.belay_shown(
            &["deploy", "--targets", "shop", "--to", "1", "--watch", "3s"],
            |_| {},
        )?;
        let id = deployment_id(&r)?;
        ensure!(
            r.code == Some(0),
            "the first deployment did not succeed (exit {:?})",
            r.code
        );
        let t = self.target_record(&id)?;
        ensure!(
            t["step"] == "succeeded",
            "the controller records the first deployment at {}, not succeeded: {t}",
            t["step"]
        );
        let steps = transitions(&t);
        for want in [
            "preflight",
            "backing_up",
            "migrating",
            "validating",
            "watching",
        ] {
            ensure!(
                steps.iter().any(|s| s == want),
                "the first deployment never went through {want}: {steps:?}"
            );
        }
        self.milestone(format!(
            "deployment {} succeeded through {}",
            short(&id),
            steps.join(" → ")
        ));
        Ok(())
    }

    /// The shop's record on the controller for deployment `id`.
    fn target_record(&self, id: &str) -> Result<Value> {
        let r = self.belay_quiet(&["deployments", "show", id, "--output", "json"])?;
        ensure!(
            r.code == Some(0),
            "`belay deployments show {id}` exited {:?}: {}",
            r.code,
            r.stderr
        );
        let doc = r.json()?;
        doc["targets"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["target"] == "shop"))
            .cloned()
            .with_context(|| format!("deployment {id} has no record for shop: {doc}"))
    }

    // ---- 3 -------------------------------------------------------------------------------

    fn lock_guard_save(&mut self) -> Result<()> {
        heading("3/5  A lock-guard save: a long transaction holds orders");
        say(
            "A nightly report opens a transaction on orders and keeps it open. Release 1.2 \
             (V2) adds a column to orders, which needs a brief ACCESS EXCLUSIVE lock: it \
             cannot have it while the report runs, and a plain ALTER TABLE would wait, with \
             every application query on orders queued behind it until the report ends. belay \
             waits for its lock only while nobody queues behind it: when the application reads \
             orders, its lock guard sees the read queued behind the migration, cancels the \
             ALTER within 50 ms (max_blocking) naming the session in the way, waits for that \
             session to finish, and retries at once: look for the `lock guard` line.",
        );
        shown(&format!(
            "PGAPPNAME=nightly-report psql {}   # from another terminal",
            self.shop_url
        ));
        let mut report = self.session("the nightly report (psql)", "nightly-report")?;
        println!("shop=# BEGIN; SELECT count(*) FROM orders;   -- and the report keeps going");
        report
            .write_all(b"BEGIN;\nSELECT count(*) FROM orders;\n")
            .context("could not type into the report's psql")?;
        report.flush()?;
        self.wait_until(
            "the report's transaction",
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'nightly-report' AND state = 'idle in transaction'",
            "1",
        )?;
        println!();

        let mut retries_seen = 0;
        let mut app_query: Option<Result<Duration>> = None;
        let mut report = Some(report);
        let psql = self.bins.psql.clone();
        let shop_url = self.shop_url.clone();
        let r = self.belay_shown(&["deploy", "--targets", "shop", "--to", "2"], |line| {
            if line.contains("started V2__") && app_query.is_none() {
                // The application reads orders once the migration waits for its lock, so
                // the read queues behind it and the guard has something to save.
                let waiting = wait_for_sql(
                    &psql,
                    &shop_url,
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND application_name = 'belay' AND query ILIKE '%ALTER TABLE%orders%'",
                    "1",
                );
                if let Err(e) = waiting {
                    app_query = Some(Err(e));
                    return;
                }
                let started = Instant::now();
                let read = Command::new(&psql)
                    .args(["-X", "-q", "-At", "-d", &shop_url])
                    .args(["-c", "SELECT count(*) FROM orders"])
                    .env("PGAPPNAME", "shop-app")
                    .stdin(Stdio::null())
                    .output();
                let took = started.elapsed();
                let answer = match read {
                    Ok(out) if out.status.success() => Ok(took),
                    Ok(out) => Err(anyhow::anyhow!(
                        "{}",
                        String::from_utf8_lossy(&out.stderr).trim().to_owned()
                    )),
                    Err(e) => Err(e.into()),
                };
                match &answer {
                    Ok(took) => aside(&format!(
                        "the application reads orders while the migration waits (psql -c 'SELECT count(*) FROM orders'): answered in {} ms, psql start-up included",
                        took.as_millis()
                    )),
                    Err(e) => aside(&format!("the application's read of orders failed: {e:#}")),
                }
                app_query = Some(answer);
                return;
            }
            if !(line.contains("lock guard:") || line.contains("lock not granted within lock_timeout")) {
                return;
            }
            retries_seen += 1;
            // belay gave way and waits for the report: let it finish so the migration lands.
            if let Some(mut report) = report.take() {
                aside("the nightly report finishes: shop=# COMMIT;");
                let _ = report.write_all(b"COMMIT;\n\\q\n");
            }
        })?;
        drop(report);
        if let Some(mut holder) = take_child("the nightly report (psql)") {
            let _ = holder.wait();
        }
        let id = deployment_id(&r)?;
        ensure!(
            retries_seen >= 1,
            "the migration never gave way while the report held orders (no `lock guard` \
             or `lock not granted` line)"
        );
        ensure!(
            r.code == Some(0),
            "the deployment under the held lock did not succeed (exit {:?})",
            r.code
        );
        match app_query {
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("the application's read during the lock wait failed: {e:#}"),
            None => bail!(
                "the demo never saw the migration start, so the application never read while \
                 it waited"
            ),
        }
        println!();
        say("The history keeps how long the migration waited and how often it retried:");
        let r = self.belay_shown(&["--target", "shop", "status"], |_| {})?;
        ensure!(r.code == Some(0), "`belay status` exited {:?}", r.code);
        let t = self.target_record(&id)?;
        ensure!(
            t["step"] == "succeeded",
            "deployment {id} is at {}",
            t["step"]
        );
        let retries = self.sql(
            &self.shop_url,
            "SELECT retries FROM belay.schema_history WHERE version = '2' AND type = 'SQL' AND success",
        )?;
        ensure!(
            retries.parse::<u32>().is_ok_and(|n| n >= 1),
            "V2's history row records {retries:?} retries, expected at least 1"
        );
        self.milestone(format!(
            "deployment {} gave way to the application and waited out the report: {retries} lock retries",
            short(&id)
        ));
        Ok(())
    }

    // ---- 4 -------------------------------------------------------------------------------

    /// The bad release and its rollback; returns the command the report names to bring the
    /// dropped data back.
    fn bad_release(&mut self) -> Result<String> {
        heading("4/5  A bad release: the probe fails in the watch window, belay rolls back");
        say(
            "Release 1.3 (V3) adds a coupons table and orders.coupon_code. The application \
             keeps taking orders from its own connection, one checkout every 250 ms \
             (examples/shop/checkout.sql). Once the new column exists it takes the new \
             coupon path, which is broken: every checkout also logs an error. The probe \
             sees them; after 3 failures in a row the agent rolls the deployment back at \
             once (policy auto): an emergency backup, the undo script U3 (its dropped \
             column and table snapshotted first), and a check that history, postflight \
             and probes are healthy again. Look for the probe's fail 1/3 … 3/3, then \
             failed → rolling_back → rolled_back.",
        );
        let before = schema(&self.shop_url)?;
        shown(&format!(
            "PGAPPNAME=shop-app psql {}   # the application: fed examples/shop/checkout.sql every 250 ms",
            self.shop_url
        ));
        let checkout = fs::read(self.examples.join("checkout.sql"))
            .context("could not read examples/shop/checkout.sql")?;
        let app = self.session("the shop application (psql)", "shop-app")?;
        let stop = Arc::new(AtomicBool::new(false));
        let app_thread = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || application(app, &checkout, &stop))
        };
        println!();
        let r = self.belay_shown(
            &[
                "deploy",
                "--targets",
                "shop",
                "--to",
                "3",
                "--watch",
                "30s",
                "--on-failure",
                "rollback",
            ],
            |_| {},
        );
        stop.store(true, Ordering::Relaxed);
        let checkouts = app_thread.join().unwrap_or(0);
        if let Some(mut app) = take_child("the shop application (psql)") {
            let _ = app.wait();
        }
        let r = r?;
        let id = deployment_id(&r)?;
        let failed = self.sql(&self.shop_url, "SELECT count(*) FROM checkout_errors")?;
        aside(&format!(
            "the application placed {checkouts} orders during the deploy; {failed} of them \
             took the broken coupon path and logged an error"
        ));
        ensure!(
            r.code == Some(1),
            "the bad release's deploy exited {:?}, expected 1 (the deployment failed)",
            r.code
        );
        let t = self.target_record(&id)?;
        ensure!(
            t["failed_step"] == "watching" && t["step"] == "rolled_back",
            "the controller records the bad release failed at {} and now {}, expected failed \
             at watching and rolled_back: {}",
            t["failed_step"],
            t["step"],
            t["message"]
        );
        ensure!(
            schema(&self.shop_url)? == before,
            "after the rollback the shop's schema differs from before the deployment"
        );
        println!();
        say(
            "The schema is again exactly what it was before the deployment (pg_dump \
             --schema-only, compared by the demo). The incident report, kept with the \
             deployment on the agent's database and shown through the controller:",
        );
        let r = self.belay_shown(&["--target", "shop", "rollback", "status"], |_| {})?;
        ensure!(
            r.code == Some(0),
            "`belay rollback status` exited {:?}",
            r.code
        );
        let st =
            self.belay_quiet(&["--target", "shop", "rollback", "status", "--output", "json"])?;
        ensure!(
            st.code == Some(0),
            "`rollback status --output json` exited {:?}",
            st.code
        );
        let st = st.json()?;
        ensure!(
            st["state"] == "rolled_back" && st["report"]["result"] == "rolled_back",
            "the rollback ended {} (report: {}), expected rolled_back",
            st["state"],
            st["report"]["result"]
        );
        ensure!(
            st["deployment"].as_str().is_some_and(|d| d == id)
                || st["deployment"]["id"].as_str().is_some_and(|d| d == id)
                || st.to_string().contains(&id),
            "the newest rollback is not of deployment {id}: {st}"
        );
        let recover = st["report"]["backups"]["recover_command"]
            .as_str()
            .context("the incident report names no command to bring the dropped data back")?
            .to_owned();
        self.milestone(format!(
            "deployment {} failed at watching and was rolled back by undo: rolled_back, schema as before",
            short(&id)
        ));
        self.milestone("incident report present, naming the snapshot of the dropped data".into());
        Ok(recover)
    }

    // ---- 5 -------------------------------------------------------------------------------

    fn recover(&mut self, recover: &str) -> Result<()> {
        heading("5/5  The data the undo dropped, brought back");
        say(
            "The orders placed during the incident are still in the shop (the undo drops a \
             column, not rows), but their coupon codes went with orders.coupon_code. The \
             report names the one command that restores the snapshot taken just before the \
             undo into a new database, next to the shop, for you to copy back what you need:",
        );
        let kept_orders = self.sql(
            &self.shop_url,
            "SELECT count(*) FROM orders WHERE created_at > (SELECT max(installed_on) FROM belay.schema_history WHERE version = '3' AND type = 'SQL')",
        )?;
        let args = recover
            .strip_prefix("belay ")
            .with_context(|| format!("unexpected recover command: {recover}"))?;
        let mut argv = vec!["--target", "shop"];
        argv.extend(args.split_whitespace());
        let into = argv
            .iter()
            .position(|a| *a == "--into")
            .and_then(|i| argv.get(i + 1))
            .with_context(|| format!("the recover command names no --into database: {recover}"))?
            .to_string();
        let r = self.belay_shown(&argv, |_| {})?;
        ensure!(r.code == Some(0), "`{recover}` exited {:?}", r.code);
        let recovered = format!("{}{into}", self.server);
        let rows_sql = "SELECT id, account_id, total_cents, coupon_code FROM orders WHERE coupon_code IS NOT NULL ORDER BY id LIMIT 3";
        println!();
        shown(&format!("psql {recovered} -c '{rows_sql}'"));
        let out = self
            .scrubbed(&self.bins.psql)
            .args(["-X", "-d", &recovered, "-c", rows_sql])
            .output()
            .context("could not run psql")?;
        ensure!(
            out.status.success(),
            "reading the recovered orders failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        print!("{}", String::from_utf8_lossy(&out.stdout));
        let with_coupon = self.sql(
            &recovered,
            "SELECT count(*) FROM orders WHERE coupon_code IS NOT NULL",
        )?;
        // Each failed checkout wrote its order and its error in one transaction: the shop
        // logged as many errors as orders were placed with a coupon.
        let placed = self.sql(&self.shop_url, "SELECT count(*) FROM checkout_errors")?;
        let (n, of): (u64, u64) = (
            with_coupon
                .parse()
                .context("count of recovered coupon codes")?,
            placed.parse().context("count of checkout errors")?,
        );
        // The undo fenced writes to orders before its snapshot, so every code written
        // before the column went is in it: nothing is lost.
        ensure!(
            n >= 1 && n == of,
            "{n} orders with a coupon code recovered, but {of} were placed with one: the \
             undo's snapshot lost data"
        );
        println!(
            "{n} of the {of} coupon codes placed during the incident recovered into {into}; the \
             shop still has all {kept_orders} orders placed since release 1.3 went out"
        );
        self.milestone(format!(
            "{n} coupon codes the undo dropped restored into {into}"
        ));
        Ok(())
    }
}

/// The application during the bad release: one checkout every [`CHECKOUT_EVERY`] until
/// `stop`; returns how many it sent.
fn application(mut psql: ChildStdin, checkout: &[u8], stop: &AtomicBool) -> u32 {
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) {
        if psql
            .write_all(checkout)
            .and_then(|()| psql.flush())
            .is_err()
        {
            break;
        }
        sent += 1;
        // The application's own pace, not a wait for anything.
        thread::sleep(CHECKOUT_EVERY);
    }
    let _ = psql.write_all(b"\\q\n");
    sent
}

fn agent_toml(controller: &str, work: &Path, examples: &Path) -> String {
    let mut t = String::new();
    let _ = write!(
        t,
        r#"name = "demo-agent"
controller = "{controller}"
token_file = "{token}"

[[targets]]
name = "shop"
url_env = "SHOP_DATABASE_URL"
migrations = "{migrations}"
environment = "demo"
backup_dir = "{backups}"

[[targets.probes]]
name = "checkout_errors"
period = "500ms"
failure_threshold = 3
sql = {{ query = "SELECT count(*) FROM checkout_errors WHERE at > (SELECT max(installed_on) FROM belay.schema_history)", expect = "zero" }}

[targets.rollback]
policy = "auto"
settle = "2s"
"#,
        token = work.join("token").display(),
        migrations = examples.join("migrations").display(),
        backups = work.join("backups").display(),
    );
    t
}

/// Starts a daemon listening on 127.0.0.1:0 and returns the address it announces; its
/// stderr goes to `log`.
fn start_daemon(what: &str, cmd: &mut Command, log: &Path, shown_as: &str) -> Result<String> {
    shown(&format!("{shown_as} &"));
    let log_file =
        fs::File::create(log).with_context(|| format!("could not create {}", log.display()))?;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("could not start {what}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    keep_child(what, child);
    let (tx, rx) = mpsc::channel();
    // Reads the first line, then keeps draining so the daemon never blocks on stdout.
    thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        for _ in lines {}
    });
    let line = rx.recv_timeout(Duration::from_secs(30)).ok().flatten();
    match line
        .and_then(Result::ok)
        .as_deref()
        .and_then(|l| l.strip_prefix("listening on "))
    {
        Some(addr) => {
            println!("{what} listening on {}", addr.trim());
            Ok(addr.trim().to_owned())
        }
        None => {
            let text = fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            bail!(
                "{what} did not announce its address within 30 s; its log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        }
    }
}

/// The id `deploy` printed (`deployment ID: state`).
fn deployment_id(r: &Run) -> Result<String> {
    r.stdout
        .lines()
        .find_map(|l| l.strip_prefix("deployment "))
        .and_then(|l| l.split(':').next())
        .map(str::to_owned)
        .with_context(|| {
            format!(
                "`belay deploy` printed no deployment id (exit {:?}): {}",
                r.code, r.stderr
            )
        })
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// The steps a target's record went through, in order.
fn transitions(target: &Value) -> Vec<String> {
    target["events"]
        .as_array()
        .map(|es| {
            es.iter()
                .filter(|e| e["kind"] == "transition")
                .filter_map(|e| e["payload"]["to"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn schema(url: &str) -> Result<String> {
    belay_testkit::dump_schema(url).context("could not dump the shop's schema")
}

fn random_token() -> Result<String> {
    let mut bytes = [0u8; 24];
    let mut f = fs::File::open("/dev/urandom").context("could not open /dev/urandom")?;
    std::io::Read::read_exact(&mut f, &mut bytes).context("could not read /dev/urandom")?;
    Ok(bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("could not create {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("could not write {}", path.display()))
}

/// Polls `query` with psql until it prints `want`, for at most 30 s.
fn wait_for_sql(psql: &std::path::Path, url: &str, query: &str, want: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(psql)
            .args(["-X", "-q", "-At", "-d", url, "-c", query])
            .stdin(Stdio::null())
            .output()
            .context("could not run psql")?;
        if String::from_utf8_lossy(&out.stdout).trim() == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("waited 30 s for `{query}` to return {want}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_quoted_only_when_a_shell_needs_it() {
        assert_eq!(quote("--targets"), "--targets");
        assert_eq!(quote("127.0.0.1:7400"), "127.0.0.1:7400");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
    }

    #[test]
    fn the_deployment_id_is_read_from_deploys_summary() -> Result<()> {
        let r = Run {
            code: Some(0),
            stdout: "[1] deployment planned for 1 target(s)\ndeployment 62f3ead9-d408: succeeded\n"
                .into(),
            stderr: String::new(),
        };
        assert_eq!(deployment_id(&r)?, "62f3ead9-d408");
        Ok(())
    }
}
