//! `cargo xtask bench locks`: what the application feels while a migration meets a lock
//! conflict, and what the lock monitor costs and how fast it sees a queue.
//!
//! Three parts, in one run on one throwaway cluster:
//! 1. **Application latency.** pgbench (8 clients, rate-limited, on a ~1M-row table) runs
//!    while a long transaction holds a read lock on `pgbench_accounts` and `ALTER TABLE …
//!    ADD COLUMN` is issued against it: with no migration (the baseline), by naive `psql`,
//!    and by `belay migrate`, interleaved. Printed per run: max and p99 latency,
//!    transactions over 1 s, and TPS in the blocking window as a ratio of the baseline's.
//! 2. **Monitor latency.** `belay locks --watch --output json` runs at its default period
//!    while an ALTER is queued behind a holder, repeatedly; the latency is the waiting time
//!    the monitor reports for the ALTER in the first sample that shows it (how long it had
//!    been in the queue before the monitor saw the chain).
//! 3. **Monitor overhead.** Unthrottled pgbench TPS with `belay locks --watch` sampling at
//!    its default period vs without, interleaved.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use belay_testkit::{Cluster, TestDb, psql};

use crate::bench::release_belay;
use crate::pg::ensure_postgres;
use crate::util::{capture, describe, heading};

const ALTER: &str = "ALTER TABLE pgbench_accounts ADD COLUMN bench_col int;";
/// When, after pgbench starts, the long transaction begins and the migration is issued.
const HOLDER_AT: Duration = Duration::from_secs(2);
const MIGRATE_AT: Duration = Duration::from_secs(3);
const HOLD_FOR_SECS: u64 = 5;
/// belay's default `lock_timeout`: the target for the application's max latency is this
/// plus 50 ms.
const BELAY_LOCK_TIMEOUT_MS: f64 = 100.0;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Baseline,
    Naive,
    Belay,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Baseline => "no migration",
            Mode::Naive => "naive psql",
            Mode::Belay => "belay",
        }
    }
}

pub fn locks(
    seconds: u64,
    trials: usize,
    overhead_secs: u64,
    belay_bin: Option<std::path::PathBuf>,
) -> Result<()> {
    anyhow::ensure!(
        seconds >= 10,
        "--seconds must be at least 10 to cover the blocking window"
    );
    anyhow::ensure!(trials > 0, "--trials must be at least 1");
    anyhow::ensure!(overhead_secs >= 2, "--overhead-secs must be at least 2");
    let bin = ensure_postgres()?;
    let belay = release_belay(belay_bin)?;
    heading("starting a throwaway PostgreSQL cluster");
    let cluster = Cluster::start().context("could not start a PostgreSQL cluster")?;

    let mut runs = Vec::new();
    for mode in [Mode::Baseline, Mode::Naive, Mode::Belay] {
        runs.push(app_run(mode, &cluster, &bin, &belay, seconds)?);
    }
    let monitor = monitor_latency(&cluster, &bin, &belay, trials)?;
    let overhead = monitor_overhead(&cluster, &bin, &belay, overhead_secs)?;

    heading(
        "results (latency = pgbench log `time`, measured from each transaction's scheduled start, so it includes schedule lag: what the application perceives)",
    );
    let baseline_tps = runs
        .iter()
        .find(|r| r.mode == Mode::Baseline)
        .map_or(0.0, |r| r.window_tps);
    for r in &runs {
        let mut line = format!(
            "locks {}: {} transactions, max {:.1} ms, p99 {:.1} ms, {} over 1 s, TPS in window {:.0}",
            r.mode.label(),
            r.stats.count,
            r.stats.max_ms,
            r.stats.p99_ms,
            r.stats.over_1s,
            r.window_tps
        );
        if baseline_tps > 0.0 && r.mode != Mode::Baseline {
            let _ = write!(line, " ({:.2}× baseline)", r.window_tps / baseline_tps);
        }
        if r.stats.failed > 0 {
            let _ = write!(line, ", {} failed", r.stats.failed);
        }
        if let Some(m) = &r.migration {
            let _ = write!(line, "; {m}");
        }
        println!("{line}");
    }
    if let Some(b) = runs.iter().find(|r| r.mode == Mode::Belay) {
        let target_ms = BELAY_LOCK_TIMEOUT_MS + 50.0;
        let tps_ratio = if baseline_tps > 0.0 {
            b.window_tps / baseline_tps
        } else {
            0.0
        };
        println!(
            "targets (belay): max ≤ {target_ms:.0} ms: {}; no transaction over 1 s: {}; TPS in window ≥ 0.90× baseline: {}",
            verdict(b.stats.max_ms <= target_ms),
            verdict(b.stats.over_1s == 0),
            verdict(tps_ratio >= 0.90)
        );
    }
    println!(
        "monitor latency (ALTER queued → chain reported, default sampling, {} trials): median {:.0} ms, max {:.0} ms; target ≤ 250 ms: {}",
        monitor.len(),
        median_ms(&monitor),
        monitor.iter().copied().fold(0.0, f64::max),
        verdict(monitor.iter().all(|&ms| ms <= 250.0))
    );
    println!(
        "monitor overhead: pgbench TPS with `belay locks --watch` {:.0} vs without {:.0} (median of {} interleaved runs each) → {:.3}×; target ≥ 0.99: {}",
        overhead.with,
        overhead.without,
        overhead.reps,
        overhead.with / overhead.without,
        verdict(overhead.with / overhead.without >= 0.99)
    );
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

struct AppRun {
    mode: Mode,
    stats: Latencies,
    window_tps: f64,
    migration: Option<String>,
}

/// Connection arguments for pgbench against `db`.
fn pg_args(cmd: &mut Command, cluster: &Cluster, db: &TestDb) {
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &cluster.port().to_string(),
        "-U",
        "postgres",
        &db.name,
    ]);
}

fn pgbench_init(cluster: &Cluster, bin: &Path, db: &TestDb) -> Result<()> {
    let mut init = Command::new(bin.join("pgbench"));
    init.args(["-i", "-s", "10", "-q"]);
    pg_args(&mut init, cluster, db);
    println!("$ {}", describe(&init));
    capture(&mut init)?;
    Ok(())
}

fn app_run(
    mode: Mode,
    cluster: &Cluster,
    bin: &Path,
    belay: &Path,
    seconds: u64,
) -> Result<AppRun> {
    heading(&format!("application latency: {}", mode.label()));
    // A fresh database per run gives fresh pgbench tables and no migration history.
    let db = cluster.create_database_blocking()?;
    pgbench_init(cluster, bin, &db)?;

    let work = tempfile::tempdir().context("could not create a temp dir")?;
    let migrations = work.path().join("migrations");
    fs::create_dir(&migrations).context("could not create the migrations dir")?;
    fs::write(migrations.join("V1__add_col.sql"), format!("{ALTER}\n"))
        .context("could not write V1__add_col.sql")?;

    let prefix = work.path().join("pgbench");
    let mut pgbench = Command::new(bin.join("pgbench"));
    pgbench
        .args([
            "-c",
            "8",
            "-j",
            "2",
            "-R",
            "400",
            "-T",
            &seconds.to_string(),
            "-n",
            "-l",
            "--log-prefix",
        ])
        .arg(&prefix);
    pg_args(&mut pgbench, cluster, &db);
    let bench_out = work.path().join("pgbench.out");
    let out_file = fs::File::create(&bench_out).context("could not create pgbench.out")?;
    pgbench
        .stdout(
            out_file
                .try_clone()
                .context("could not duplicate a file handle")?,
        )
        .stderr(out_file);
    println!("$ {}", describe(&pgbench));
    let t0 = Instant::now();
    let t0_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs_f64();
    let bench = Killed(pgbench.spawn().context("could not start pgbench")?);

    sleep_until(t0 + HOLDER_AT);
    let mut holder = Command::new(bin.join("psql"));
    holder
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &db.url])
        .args([
            "-c",
            "BEGIN",
            "-c",
            "SELECT 1 FROM pgbench_accounts LIMIT 1",
        ])
        .args([
            "-c",
            &format!("SELECT pg_sleep({HOLD_FOR_SECS})"),
            "-c",
            "COMMIT",
        ])
        .stdout(Stdio::null());
    println!("t=2s: long transaction holds pgbench_accounts for {HOLD_FOR_SECS}s");
    let holder = Killed(holder.spawn().context("could not start the holder psql")?);

    sleep_until(t0 + MIGRATE_AT);
    let migration = match mode {
        Mode::Baseline => None,
        Mode::Naive | Mode::Belay => {
            let mut migrate = if mode == Mode::Naive {
                let mut cmd = Command::new(bin.join("psql"));
                cmd.args([
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-d",
                    &db.url,
                    "-c",
                    ALTER,
                ]);
                cmd
            } else {
                let mut cmd = Command::new(belay);
                cmd.arg("--dir")
                    .arg(&migrations)
                    .arg("migrate")
                    .args(["--backup", "none"])
                    .env("BELAY_DATABASE_URL", &db.url);
                cmd
            };
            println!("t=3s: {}", describe(&migrate));
            let started = Instant::now();
            let out = migrate.output().context("could not run the migration")?;
            let took = started.elapsed();
            let code = out
                .status
                .code()
                .map_or_else(|| out.status.to_string(), |c| c.to_string());
            println!("migration exited {code} after {:.2}s", took.as_secs_f64());
            if !out.status.success() {
                print!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Some((code, took))
        }
    };

    let deadline = t0 + Duration::from_secs(seconds + 30);
    if !holder.wait_until(deadline).context("the holder session")? {
        println!("warning: the holder session failed");
    }
    if !bench.wait_until(deadline).context("pgbench")? {
        bail!(
            "pgbench failed:\n{}",
            fs::read_to_string(&bench_out).unwrap_or_default()
        );
    }

    // The blocking window: from the migration's start to the holder's end.
    let window = (
        t0_epoch + MIGRATE_AT.as_secs_f64(),
        t0_epoch + HOLDER_AT.as_secs_f64() + HOLD_FOR_SECS as f64,
    );
    let (stats, window_tps) = latencies(work.path(), "pgbench", window)?;
    let migration = match migration {
        None => None,
        Some((code, took)) => {
            let landed = psql(
                &db.url,
                "SELECT count(*) FROM information_schema.columns WHERE table_name = 'pgbench_accounts' AND column_name = 'bench_col'",
            )?
            .trim()
                == "1";
            Some(format!(
                "migration {} (exit code {code}, {:.2}s)",
                if landed { "landed" } else { "did NOT land" },
                took.as_secs_f64()
            ))
        }
    };
    Ok(AppRun {
        mode,
        stats,
        window_tps,
        migration,
    })
}

// ---------------------------------------------------------------------------------------
// monitor latency: from an ALTER entering the lock queue to the monitor reporting it

fn monitor_latency(cluster: &Cluster, bin: &Path, belay: &Path, trials: usize) -> Result<Vec<f64>> {
    heading(&format!(
        "monitor latency: `belay locks --watch` at its default period, {trials} trials"
    ));
    let db = cluster.create_database_blocking()?;
    psql(&db.url, "CREATE TABLE watched (id int)")?;
    let mut watch = Command::new(belay);
    watch
        .args(["locks", "--watch", "--output", "json"])
        .env("BELAY_DATABASE_URL", &db.url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    println!("$ {}", describe(&watch));
    let mut watch = Killed(
        watch
            .spawn()
            .context("could not start belay locks --watch")?,
    );
    let stdout = watch
        .0
        .stdout
        .take()
        .context("belay locks --watch has no stdout")?;
    // Each sample's ALTER nodes (marker → reported waiting time), sent as they arrive.
    let (tx, rx) = mpsc::channel::<(String, f64)>();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let Ok(sample) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let mut found = Vec::new();
            if let Some(trees) = sample["trees"].as_array() {
                for t in trees {
                    collect_markers(t, &mut found);
                }
            }
            for f in found {
                if tx.send(f).is_err() {
                    return;
                }
            }
        }
    });

    let mut latencies = Vec::with_capacity(trials);
    for trial in 0..trials {
        let marker = format!("bench_marker_{trial}");
        let mut holder = Command::new(bin.join("psql"));
        holder
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &db.url])
            .env("PGAPPNAME", "bench-holder")
            .args([
                "-c",
                "BEGIN",
                "-c",
                "LOCK TABLE watched IN ACCESS SHARE MODE",
                "-c",
                "SELECT pg_sleep(1.5)",
                "-c",
                "COMMIT",
            ])
            .stdout(Stdio::null());
        let holder = Killed(holder.spawn().context("could not start the holder psql")?);
        // The ALTER must queue behind a granted lock, so wait until the holder has it.
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let held = psql(
                &db.url,
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'bench-holder' AND l.granted AND l.relation = 'watched'::regclass",
            )?;
            if held.trim() != "0" {
                break;
            }
            if Instant::now() > until {
                bail!("the holder session never took its lock");
            }
            thread::sleep(Duration::from_millis(10));
        }
        let mut alter = Command::new(bin.join("psql"));
        alter
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &db.url, "-c"])
            .arg(format!(
                "/* {marker} */ ALTER TABLE watched ADD COLUMN c{trial} int"
            ))
            .stdout(Stdio::null());
        let alter = Killed(alter.spawn().context("could not start the ALTER psql")?);
        let reported = loop {
            let (m, waiting_ms) = rx
                .recv_timeout(Duration::from_secs(10))
                .context("the monitor never reported the queued ALTER")?;
            if m == marker {
                break waiting_ms;
            }
        };
        println!("trial {trial}: first reported after {reported:.0} ms in the queue");
        latencies.push(reported);
        let deadline = Instant::now() + Duration::from_secs(20);
        holder.wait_until(deadline).context("the holder session")?;
        alter.wait_until(deadline).context("the ALTER session")?;
    }
    drop(watch);
    Ok(latencies)
}

/// Finds nodes whose query carries a `bench_marker_N` comment and is waiting.
fn collect_markers(node: &serde_json::Value, found: &mut Vec<(String, f64)>) {
    if let Some(q) = node["query"].as_str()
        && let Some(start) = q.find("bench_marker_")
    {
        let marker: String = q[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        #[allow(clippy::cast_precision_loss)]
        let waiting = node["waiting_ms"].as_u64().unwrap_or(0) as f64;
        found.push((marker, waiting));
    }
    if let Some(children) = node["children"].as_array() {
        for c in children {
            collect_markers(c, found);
        }
    }
}

fn median_ms(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

// ---------------------------------------------------------------------------------------
// monitor overhead: pgbench throughput with and without the monitor sampling

struct Overhead {
    with: f64,
    without: f64,
    reps: usize,
}

fn monitor_overhead(cluster: &Cluster, bin: &Path, belay: &Path, secs: u64) -> Result<Overhead> {
    const REPS: usize = 3;
    heading(&format!(
        "monitor overhead: unthrottled pgbench {secs}s, with and without `belay locks --watch`, {REPS}× interleaved"
    ));
    let db = cluster.create_database_blocking()?;
    pgbench_init(cluster, bin, &db)?;
    let mut with = Vec::new();
    let mut without = Vec::new();
    for rep in 0..REPS {
        for monitored in [false, true] {
            let watch = if monitored {
                let mut w = Command::new(belay);
                w.args(["locks", "--watch"])
                    .env("BELAY_DATABASE_URL", &db.url)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                Some(Killed(
                    w.spawn().context("could not start belay locks --watch")?,
                ))
            } else {
                None
            };
            let mut pgbench = Command::new(bin.join("pgbench"));
            pgbench.args(["-c", "8", "-j", "2", "-T", &secs.to_string(), "-n"]);
            pg_args(&mut pgbench, cluster, &db);
            let out = capture(&mut pgbench)?;
            drop(watch);
            let tps = parse_tps(&String::from_utf8_lossy(&out.stdout))
                .context("pgbench printed no tps line")?;
            println!(
                "rep {rep}: {} monitor: {tps:.0} tps",
                if monitored { "with" } else { "without" }
            );
            if monitored {
                with.push(tps);
            } else {
                without.push(tps);
            }
        }
    }
    Ok(Overhead {
        with: median_ms(&with),
        without: median_ms(&without),
        reps: REPS,
    })
}

/// The `tps = N (without initial connection time)` line of pgbench's summary.
fn parse_tps(out: &str) -> Option<f64> {
    out.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

// ---------------------------------------------------------------------------------------
// shared helpers

fn sleep_until(when: Instant) {
    let now = Instant::now();
    if when > now {
        thread::sleep(when - now);
    }
}

/// A child process that is killed if we leave early (error or panic), so a failed bench
/// never leaves pgbench hammering a cluster that is being torn down.
struct Killed(Child);

impl Killed {
    /// Waits for exit until `deadline`, then kills; `Ok(true)` if it exited successfully.
    fn wait_until(mut self, deadline: Instant) -> Result<bool> {
        loop {
            if let Some(status) = self
                .0
                .try_wait()
                .context("could not wait for a child process")?
            {
                return Ok(status.success());
            }
            if Instant::now() >= deadline {
                bail!("still running at the deadline; killed");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[derive(Debug, Default, PartialEq)]
struct Latencies {
    count: usize,
    failed: usize,
    max_ms: f64,
    p99_ms: f64,
    over_1s: usize,
}

/// Reads pgbench's per-transaction logs (`<prefix>.<pid>[.<thread>]`), lines of
/// `client_id transaction_no time script_no time_epoch time_us [schedule_lag] ...`.
/// pgbench computes `time` from the transaction's *scheduled* start when `-R` is on, so
/// it already includes `schedule_lag`: it is the latency the application perceives.
/// Also returns the rate of transactions completed inside `window` (Unix seconds).
fn latencies(dir: &Path, prefix: &str, window: (f64, f64)) -> Result<(Latencies, f64)> {
    let mut log = Log::default();
    let wanted = format!("{prefix}.");
    for entry in fs::read_dir(dir).with_context(|| format!("could not list {}", dir.display()))? {
        let entry = entry.context("could not list the pgbench log dir")?;
        if !entry.file_name().to_string_lossy().starts_with(&wanted)
            || entry.path().extension().is_some_and(|e| e == "out")
        {
            continue;
        }
        let text = fs::read_to_string(entry.path())
            .with_context(|| format!("could not read {}", entry.path().display()))?;
        parse_log(&text, &mut log);
    }
    let in_window = log
        .completed_at
        .iter()
        .filter(|&&t| t >= window.0 && t < window.1)
        .count();
    #[allow(clippy::cast_precision_loss)]
    let tps = in_window as f64 / (window.1 - window.0);
    Ok((summarize(log.micros, log.failed), tps))
}

#[derive(Debug, Default)]
struct Log {
    micros: Vec<f64>,
    failed: usize,
    /// Completion time of each successful transaction, Unix seconds.
    completed_at: Vec<f64>,
}

fn parse_log(text: &str, log: &mut Log) {
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(time) = fields.get(2) else { continue };
        match time.parse::<f64>() {
            Ok(us) => {
                log.micros.push(us);
                let epoch = fields.get(4).and_then(|s| s.parse::<f64>().ok());
                let frac = fields.get(5).and_then(|s| s.parse::<f64>().ok());
                if let (Some(s), Some(us)) = (epoch, frac) {
                    log.completed_at.push(s + us / 1e6);
                }
            }
            // "failed" or "skipped"
            Err(_) => log.failed += 1,
        }
    }
}

fn summarize(mut micros: Vec<f64>, failed: usize) -> Latencies {
    micros.sort_by(f64::total_cmp);
    let count = micros.len();
    if count == 0 {
        return Latencies {
            failed,
            ..Latencies::default()
        };
    }
    let p99_index = (count * 99).div_ceil(100).saturating_sub(1);
    Latencies {
        count,
        failed,
        max_ms: micros[count - 1] / 1000.0,
        p99_ms: micros[p99_index] / 1000.0,
        over_1s: micros.iter().filter(|&&us| us > 1_000_000.0).count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbench_logs_are_summarized() {
        let mut log = Log::default();
        let text = "0 1 1500 0 1700000000 100 20\n1 1 2500000 0 1700000002 200 2400000\n2 1 failed 0 1700000000 300 10\n";
        parse_log(text, &mut log);
        let expected = [1_700_000_000.000_1, 1_700_000_002.000_2];
        assert_eq!(log.completed_at.len(), expected.len());
        for (got, want) in log.completed_at.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        let stats = summarize(log.micros, log.failed);
        assert_eq!(
            stats,
            Latencies {
                count: 2,
                failed: 1,
                max_ms: 2500.0,
                p99_ms: 2500.0,
                over_1s: 1
            }
        );
    }

    #[test]
    fn tps_line_is_found() {
        let out = "number of transactions actually processed: 100\nlatency average = 4.1 ms\ntps = 1934.512345 (without initial connection time)\n";
        assert_eq!(parse_tps(out), Some(1934.512345));
        assert_eq!(parse_tps("no summary"), None);
    }

    #[test]
    fn markers_are_found_at_any_depth() {
        let tree = serde_json::json!({
            "query": "SELECT 1 FROM watched",
            "waiting_ms": 0,
            "children": [{"query": "/* bench_marker_3 */ ALTER TABLE watched ADD COLUMN c3 int", "waiting_ms": 120, "children": []}]
        });
        let mut found = Vec::new();
        collect_markers(&tree, &mut found);
        assert_eq!(found, vec![("bench_marker_3".to_string(), 120.0)]);
        assert_eq!(median_ms(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median_ms(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
