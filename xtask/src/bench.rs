//! `cargo xtask bench runner|lock`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use belay_testkit::{Cluster, TestDb, psql};

use crate::pg::ensure_postgres;
use crate::util::{build_belay, capture, describe, heading, root};

/// The given binary, or a fresh release build: benchmarks measure optimised code.
fn release_belay(given: Option<PathBuf>) -> Result<PathBuf> {
    match given {
        Some(path) if path.is_file() => Ok(path),
        Some(path) => bail!("{} is not a file", path.display()),
        None => build_belay(true),
    }
}

// ---------------------------------------------------------------------------------------
// runner: per-migration overhead of belay against the cheapest honest baseline

pub fn runner(reps: usize, migrations: usize, belay_bin: Option<PathBuf>) -> Result<()> {
    anyhow::ensure!(reps > 0, "--reps must be at least 1");
    let bin = ensure_postgres()?;
    let belay = release_belay(belay_bin)?;
    heading("starting a throwaway PostgreSQL cluster");
    let cluster = Cluster::start().context("could not start a PostgreSQL cluster")?;

    let generated = tempfile::tempdir().context("could not create a temp dir")?;
    for i in 1..=migrations {
        fs::write(
            generated.path().join(format!("V{i}__bench_{i}.sql")),
            format!("CREATE TABLE bench_{i} (id bigint primary key, v text);\nCREATE INDEX ON bench_{i}(v);\n"),
        )
        .context("could not write a generated migration")?;
    }

    let mut lines = Vec::new();
    let label = format!("runner {migrations} migrations");
    lines.push(compare(
        &label,
        &cluster,
        &bin,
        &belay,
        generated.path(),
        reps,
    )?);

    let examples = root().join("examples/migrations");
    if examples.is_dir() {
        match compare(
            "runner examples/migrations",
            &cluster,
            &bin,
            &belay,
            &examples,
            reps,
        ) {
            Ok(line) => lines.push(line),
            Err(err) => lines.push(format!("runner examples/migrations: skipped ({err:#})")),
        }
    }
    heading("results");
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

fn compare(
    label: &str,
    cluster: &Cluster,
    bin: &Path,
    belay: &Path,
    dir: &Path,
    reps: usize,
) -> Result<String> {
    let scripts = forward_scripts(dir)?;
    anyhow::ensure!(
        !scripts.is_empty(),
        "no migrations found in {}",
        dir.display()
    );
    let work = tempfile::tempdir().context("could not create a temp dir")?;
    let script = work.path().join("baseline.sql");
    fs::write(&script, baseline_script(&scripts)?)
        .context("could not write the psql baseline script")?;

    heading(&format!("{label}: {reps} interleaved repetitions"));
    // One untimed run of each first: the first databases after a cluster starts pay for
    // cold caches, and that cost belongs to neither side.
    time_belay(belay, dir, &cluster.create_database_blocking()?)?;
    time_psql(bin, &script, &cluster.create_database_blocking()?)?;
    let (mut belay_times, mut psql_times) = (Vec::new(), Vec::new());
    for rep in 1..=reps {
        // Alternating which side goes first cancels out warm-cache and ordering effects.
        let belay_first = rep % 2 == 1;
        for run_belay in [belay_first, !belay_first] {
            let db = cluster.create_database_blocking()?;
            if run_belay {
                let took = time_belay(belay, dir, &db)?;
                println!("rep {rep}: belay {:.3}s", took.as_secs_f64());
                belay_times.push(took);
            } else {
                let took = time_psql(bin, &script, &db)?;
                println!("rep {rep}: psql  {:.3}s", took.as_secs_f64());
                psql_times.push(took);
            }
        }
    }
    let (b, p) = (median(&belay_times), median(&psql_times));
    Ok(format!(
        "{label}: belay median {b:.3}s, psql median {p:.3}s, ratio {:.2}",
        b / p
    ))
}

/// The history table of the baseline, close to what a runner records per migration.
const BENCH_HISTORY_DDL: &str = "CREATE TABLE bench_history (installed_rank serial PRIMARY KEY, \
     version text NOT NULL, script text NOT NULL, checksum bigint NOT NULL, \
     installed_on timestamptz NOT NULL DEFAULT now(), success boolean NOT NULL)";

fn time_belay(belay: &Path, dir: &Path, db: &TestDb) -> Result<Duration> {
    let mut cmd = Command::new(belay);
    cmd.arg("--dir")
        .arg(dir)
        .arg("migrate")
        // The executor itself is measured against psql: the pre-deployment backup
        // (`bench backup`), the preflight checklist and the lint pass are separate costs.
        .args(["--backup", "none", "--no-preflight", "--no-lint"])
        .env("BELAY_DATABASE_URL", &db.url);
    let start = Instant::now();
    capture(&mut cmd)?;
    Ok(start.elapsed())
}

fn time_psql(bin: &Path, script: &Path, db: &TestDb) -> Result<Duration> {
    let mut cmd = Command::new(bin.join("psql"));
    cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &db.url, "-f"])
        .arg(script);
    let start = Instant::now();
    capture(&mut cmd)?;
    Ok(start.elapsed())
}

#[derive(Debug)]
struct Script {
    version: Vec<u64>,
    version_text: String,
    /// Repeatable scripts run after all versioned ones, by name.
    repeatable: bool,
    name: String,
    path: PathBuf,
    no_transaction: bool,
}

/// The forward scripts of a migrations directory in apply order, for the Flyway
/// (`V1__x.sql`, `R__x.sql`), paired (`1_x.up.sql`) and folder (`1_x/up.sql`) layouts.
fn forward_scripts(dir: &Path) -> Result<Vec<Script>> {
    let mut scripts = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("could not list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("could not list {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let (version_text, repeatable, path) = if path.is_dir() {
            let up = path.join("up.sql");
            match name.split_once('_') {
                Some((v, _)) if up.is_file() => (v.to_owned(), false, up),
                _ => continue,
            }
        } else if let Some(rest) = name.strip_prefix('V').filter(|_| name.ends_with(".sql")) {
            match rest.split_once("__") {
                Some((v, _)) => (v.to_owned(), false, path),
                None => continue,
            }
        } else if name.starts_with("R__") && name.ends_with(".sql") {
            (String::new(), true, path)
        } else if name.ends_with(".up.sql") {
            match name.split_once('_') {
                Some((v, _)) => (v.to_owned(), false, path),
                None => continue,
            }
        } else {
            continue;
        };
        let version = if repeatable {
            Vec::new()
        } else {
            version_text
                .split(['.', '_'])
                .map(str::parse::<u64>)
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("unparsable version in {}", path.display()))?
        };
        let text = fs::read_to_string(&path)
            .with_context(|| format!("could not read {}", path.display()))?;
        scripts.push(Script {
            version,
            version_text,
            repeatable,
            name,
            no_transaction: text.lines().any(|l| l.trim() == "-- belay:no-transaction"),
            path,
        });
    }
    scripts.sort_by(|a, b| {
        (a.repeatable, &a.version, &a.name).cmp(&(b.repeatable, &b.version, &b.name))
    });
    Ok(scripts)
}

/// One psql session applying every script in its own transaction with its history row,
/// the way a careful hand-rolled runner would.
fn baseline_script(scripts: &[Script]) -> Result<String> {
    // Creating the history table is part of the timed work, as it is for belay.
    let mut out = format!("{BENCH_HISTORY_DDL};\n");
    for script in scripts {
        let bytes = fs::read(&script.path)
            .with_context(|| format!("could not read {}", script.path.display()))?;
        let path = script.path.to_string_lossy().replace('\'', "''");
        let insert = format!(
            "INSERT INTO bench_history (version, script, checksum, success) VALUES ('{}', '{}', {}, true);",
            script.version_text.replace('\'', "''"),
            script.name.replace('\'', "''"),
            crc32(&bytes)
        );
        if script.no_transaction {
            let _ = writeln!(out, "\\i '{path}'\n{insert}");
        } else {
            let _ = writeln!(out, "BEGIN;\n\\i '{path}'\n{insert}\nCOMMIT;");
        }
    }
    Ok(out)
}

/// CRC-32 (IEEE), the checksum Flyway records.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn median(times: &[Duration]) -> f64 {
    let mut secs: Vec<f64> = times.iter().map(Duration::as_secs_f64).collect();
    secs.sort_by(f64::total_cmp);
    let mid = secs.len() / 2;
    if secs.len().is_multiple_of(2) {
        (secs[mid - 1] + secs[mid]) / 2.0
    } else {
        secs[mid]
    }
}

// ---------------------------------------------------------------------------------------
// lock: what the application feels while an ALTER TABLE waits behind a long transaction

const ALTER: &str = "ALTER TABLE pgbench_accounts ADD COLUMN bench_col int;";
/// When, after pgbench starts, the long transaction begins and the migration is issued.
const HOLDER_AT: Duration = Duration::from_secs(2);
const MIGRATE_AT: Duration = Duration::from_secs(3);
const HOLD_FOR_SECS: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Naive,
    Belay,
}

pub fn lock(seconds: u64, belay_bin: Option<PathBuf>) -> Result<()> {
    anyhow::ensure!(
        seconds >= 10,
        "--seconds must be at least 10 to cover the blocking window"
    );
    let bin = ensure_postgres()?;
    let belay = release_belay(belay_bin)?;
    heading("starting a throwaway PostgreSQL cluster");
    let cluster = Cluster::start().context("could not start a PostgreSQL cluster")?;

    let mut lines = Vec::new();
    for mode in [Mode::Naive, Mode::Belay] {
        lines.push(lock_run(mode, &cluster, &bin, &belay, seconds)?);
    }
    heading(
        "results (latency = pgbench log `time`, measured from each transaction's scheduled start, so it includes schedule lag: what the application perceives)",
    );
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

fn lock_run(
    mode: Mode,
    cluster: &Cluster,
    bin: &Path,
    belay: &Path,
    seconds: u64,
) -> Result<String> {
    let label = match mode {
        Mode::Naive => "naive psql",
        Mode::Belay => "belay",
    };
    heading(&format!("lock bench: {label}"));
    // A fresh database per run gives fresh pgbench tables and no migration history.
    let db = cluster.create_database_blocking()?;
    let conn = |cmd: &mut Command| {
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &cluster.port().to_string(),
            "-U",
            "postgres",
            &db.name,
        ]);
    };
    let mut init = Command::new(bin.join("pgbench"));
    init.args(["-i", "-s", "10", "-q"]);
    conn(&mut init);
    println!("$ {}", describe(&init));
    capture(&mut init)?;

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
    conn(&mut pgbench);
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
    let mut migrate = match mode {
        Mode::Naive => {
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
        }
        Mode::Belay => {
            let mut cmd = Command::new(belay);
            cmd.arg("--dir")
                .arg(&migrations)
                .arg("migrate")
                .args(["--backup", "none"])
                .env("BELAY_DATABASE_URL", &db.url);
            cmd
        }
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

    let deadline = t0 + Duration::from_secs(seconds + 30);
    let status = holder.wait_until(deadline).context("the holder session")?;
    if !status {
        println!("warning: the holder session failed");
    }
    if !bench.wait_until(deadline).context("pgbench")? {
        bail!(
            "pgbench failed:\n{}",
            fs::read_to_string(&bench_out).unwrap_or_default()
        );
    }

    let stats = latencies(work.path(), "pgbench")?;
    let landed = psql(
        &db.url,
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'pgbench_accounts' AND column_name = 'bench_col'",
    )?
    .trim()
        == "1";
    let mut line = format!(
        "lock {label}: {} transactions, max {:.1} ms, p99 {:.1} ms, {} over 1 s",
        stats.count, stats.max_ms, stats.p99_ms, stats.over_1s
    );
    if stats.failed > 0 {
        let _ = write!(line, ", {} failed", stats.failed);
    }
    let _ = write!(
        line,
        "; migration {} (exit code {code}, {:.2}s)",
        if landed { "landed" } else { "did NOT land" },
        took.as_secs_f64()
    );
    Ok(line)
}

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
fn latencies(dir: &Path, prefix: &str) -> Result<Latencies> {
    let mut micros = Vec::new();
    let mut failed = 0;
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
        parse_log(&text, &mut micros, &mut failed);
    }
    Ok(summarize(micros, failed))
}

fn parse_log(text: &str, micros: &mut Vec<f64>, failed: &mut usize) {
    for line in text.lines() {
        match line.split_whitespace().nth(2) {
            Some(time) => match time.parse::<f64>() {
                Ok(us) => micros.push(us),
                // "failed" or "skipped"
                Err(_) => *failed += 1,
            },
            None => continue,
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
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn median_of_odd_and_even() {
        let d = |ms| Duration::from_millis(ms);
        assert_eq!(median(&[d(300), d(100), d(200)]), 0.2);
        assert_eq!(median(&[d(400), d(100), d(200), d(300)]), 0.25);
    }

    #[test]
    fn pgbench_logs_are_summarized() {
        let mut micros = Vec::new();
        let mut failed = 0;
        let log = "0 1 1500 0 1700000000 100 20\n1 1 2500000 0 1700000000 200 2400000\n2 1 failed 0 1700000000 300 10\n";
        parse_log(log, &mut micros, &mut failed);
        let stats = summarize(micros, failed);
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
    fn forward_scripts_are_ordered_numerically() -> Result<()> {
        let dir = tempfile::tempdir()?;
        for name in [
            "V10__c.sql",
            "V2__b.sql",
            "V1.1__a.sql",
            "R__view.sql",
            "U2__b.sql",
            "notes.txt",
        ] {
            fs::write(dir.path().join(name), "SELECT 1;\n")?;
        }
        fs::write(
            dir.path().join("V3__conc.sql"),
            "-- belay:no-transaction\nCREATE INDEX CONCURRENTLY x ON t (v);\n",
        )?;
        let names: Vec<(String, bool)> = forward_scripts(dir.path())?
            .into_iter()
            .map(|s| (s.name, s.no_transaction))
            .collect();
        let expected = [
            ("V1.1__a.sql", false),
            ("V2__b.sql", false),
            ("V3__conc.sql", true),
            ("V10__c.sql", false),
            ("R__view.sql", false),
        ];
        let expected: Vec<(String, bool)> = expected
            .iter()
            .map(|(n, t)| ((*n).to_owned(), *t))
            .collect();
        assert_eq!(names, expected);
        Ok(())
    }
}
