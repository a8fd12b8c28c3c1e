//! `cargo xtask bench runner`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use belay_testkit::{Cluster, TestDb};

use crate::pg::ensure_postgres;
use crate::util::{build_belay, capture, heading, root};

/// The given binary, or a fresh release build: benchmarks measure optimised code.
pub(crate) fn release_belay(given: Option<PathBuf>) -> Result<PathBuf> {
    match given {
        // Absolute: some benches run it from another working directory.
        Some(path) if path.is_file() => path
            .canonicalize()
            .with_context(|| format!("could not resolve {}", path.display())),
        Some(path) => bail!("{} is not a file", path.display()),
        None => build_belay(true),
    }
}

// ---------------------------------------------------------------------------------------
// runner: per-migration overhead of belay against the cheapest honest baseline

pub fn runner(
    reps: usize,
    migrations: usize,
    belay_bin: Option<PathBuf>,
    corpora: Vec<PathBuf>,
) -> Result<()> {
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
    let corpora = if corpora.is_empty() {
        crate::bench_corpus::default_corpora()
    } else {
        corpora
    };
    for corpus in &corpora {
        lines.extend(crate::bench_corpus::corpus(
            &cluster, &bin, &belay, corpus, reps,
        )?);
    }
    heading("process start-up (`--version`, median of 21)");
    let start_up = |cmd: &Path| -> Result<f64> {
        let runs = (0..21)
            .map(|_| {
                let start = Instant::now();
                capture(Command::new(cmd).arg("--version"))?;
                Ok(start.elapsed())
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(median(&runs) * 1000.0)
    };
    lines.push(format!(
        "process start-up: belay {:.1} ms, psql {:.1} ms",
        start_up(&belay)?,
        start_up(&bin.join("psql"))?
    ));
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
pub(crate) const BENCH_HISTORY_DDL: &str = "CREATE TABLE bench_history (installed_rank serial PRIMARY KEY, \
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

pub(crate) fn time_psql(bin: &Path, script: &Path, db: &TestDb) -> Result<Duration> {
    let mut cmd = Command::new(bin.join("psql"));
    cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &db.url, "-f"])
        .arg(script);
    let start = Instant::now();
    capture(&mut cmd)?;
    Ok(start.elapsed())
}

#[derive(Debug)]
pub(crate) struct Script {
    /// Numeric parts; `u128` because popx versions (kratos) have 20 digits.
    version: Vec<u128>,
    pub(crate) version_text: String,
    /// Repeatable scripts run after all versioned ones, by name.
    pub(crate) repeatable: bool,
    name: String,
    pub(crate) path: PathBuf,
    /// The undo script (folder layout `down.sql`, paired `.down.sql`), when there is one.
    pub(crate) down: Option<PathBuf>,
    pub(crate) no_transaction: bool,
}

/// The forward scripts of a migrations directory in apply order, for the Flyway
/// (`V1__x.sql`, `R__x.sql`), paired (`1_x.up.sql`) and folder (`1_x/up.sql`) layouts.
pub(crate) fn forward_scripts(dir: &Path) -> Result<Vec<Script>> {
    let mut scripts = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("could not list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("could not list {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let mut sidecar_no_transaction = false;
        let mut down = None;
        let (version_text, repeatable, path) = if path.is_dir() {
            down = Some(path.join("down.sql")).filter(|d| d.is_file());
            let up = path.join("up.sql");
            sidecar_no_transaction = diesel_no_transaction(&path.join("metadata.toml"))?;
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
        } else if let Some(stem) = name.strip_suffix(".up.sql") {
            down = Some(dir.join(format!("{stem}.down.sql"))).filter(|d| d.is_file());
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
            // diesel's dashed dates (lemmy: `2019-02-26-002946`) order as their digits.
            version_text
                .replace('-', "")
                .split(['.', '_'])
                .map(str::parse::<u128>)
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
            no_transaction: sidecar_no_transaction
                || text.lines().any(|l| l.trim() == "-- belay:no-transaction"),
            path,
            down,
        });
    }
    scripts.sort_by(|a, b| {
        (a.repeatable, &a.version, &a.name).cmp(&(b.repeatable, &b.version, &b.name))
    });
    Ok(scripts)
}

/// diesel's `metadata.toml` saying `run_in_transaction = false` (as belay reads it; a plain
/// line match is enough for the bench's corpora).
fn diesel_no_transaction(path: &Path) -> Result<bool> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text
            .lines()
            .any(|l| l.split_whitespace().collect::<String>() == "run_in_transaction=false")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("could not read {}", path.display())),
    }
}

/// One psql session applying every script in its own transaction with its history row,
/// the way a careful hand-rolled runner would.
pub(crate) fn baseline_script(scripts: &[Script]) -> Result<String> {
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
pub(crate) fn crc32(bytes: &[u8]) -> u32 {
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

pub(crate) fn median(times: &[Duration]) -> f64 {
    let mut secs: Vec<f64> = times.iter().map(Duration::as_secs_f64).collect();
    secs.sort_by(f64::total_cmp);
    let mid = secs.len() / 2;
    if secs.len().is_multiple_of(2) {
        (secs[mid - 1] + secs[mid]) / 2.0
    } else {
        secs[mid]
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

    #[test]
    fn diesel_folders_with_twenty_digit_versions_and_metadata() -> Result<()> {
        let dir = tempfile::tempdir()?;
        for (folder, metadata) in [
            (
                "20210410175418000001_b",
                Some("run_in_transaction = false\n"),
            ),
            ("20150100000001000000_a", None),
            (
                "20210410175418000000_c",
                Some("run_in_transaction = true\n"),
            ),
        ] {
            let path = dir.path().join(folder);
            fs::create_dir(&path)?;
            fs::write(path.join("up.sql"), "SELECT 1;\n")?;
            if let Some(text) = metadata {
                fs::write(path.join("metadata.toml"), text)?;
            }
        }
        let got: Vec<(String, bool)> = forward_scripts(dir.path())?
            .into_iter()
            .map(|s| (s.version_text, s.no_transaction))
            .collect();
        let expected = [
            ("20150100000001000000", false),
            ("20210410175418000000", false),
            ("20210410175418000001", true),
        ];
        let expected: Vec<(String, bool)> = expected
            .iter()
            .map(|(v, t)| ((*v).to_owned(), *t))
            .collect();
        assert_eq!(got, expected);
        Ok(())
    }
}
