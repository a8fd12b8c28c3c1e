//! `cargo xtask bench backup`: belay's backups (`belay-backup`, in process) against the raw
//! PostgreSQL tools they wrap, on a pgbench database of a throwaway cluster.
//!
//! Per repetition, interleaved (the order of each pair alternates between repetitions):
//! a full custom-format backup by belay vs. `pg_dump --format=custom`; a directory-format
//! `--jobs 2` backup by belay; verification of the custom backup (sha256 of every file
//! and `pg_restore --list`), then verification with a restore test into a scratch
//! database; a restore of the custom backup into a new database by belay vs.
//! `CREATE DATABASE` + `pg_restore` of the same archive with the flags belay uses. Every
//! backup and restored database is deleted within its repetition, so the disk never holds
//! more than the database, one restored copy and one backup.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use belay_backup::{BackupFormat, BackupManager, BackupRequest, BackupScope, RestoreRequest};
use belay_core::DatabaseUrl;
use belay_health::{disk_space, format_bytes};
use belay_testkit::{Cluster, psql};

use crate::pg::ensure_postgres;
use crate::util::{capture, cargo, describe, heading, step};

/// The catalog target the bench backs up to.
const TARGET: &str = "bench";
/// Bytes per pgbench scale unit once initialised (tables and indexes), for the disk check
/// before the database exists: scale 60 is about 0.9 GiB.
const BYTES_PER_SCALE: u64 = 16 * 1024 * 1024;
/// Free space required, as a multiple of the database size.
const DISK_FACTOR: u64 = 3;

/// Set in the optimised re-run, so it does not re-run itself again.
const RELEASE_ENV: &str = "BELAY_XTASK_BENCH_RELEASE";

pub fn backup(scale: u32, reps: usize) -> Result<()> {
    anyhow::ensure!(reps > 0, "--reps must be at least 1");
    anyhow::ensure!(scale > 0, "--scale must be at least 1");
    if cfg!(debug_assertions) && std::env::var_os(RELEASE_ENV).is_none() {
        // belay's side runs in this process (sha256 of every file, row counts): measured
        // unoptimised it would be charged for the debug build, not for its work.
        let mut cmd = cargo();
        cmd.args(["run", "--release", "--quiet", "-p", "xtask", "--"])
            .args(["bench", "backup", "--scale", &scale.to_string()])
            .args(["--reps", &reps.to_string()])
            .env(RELEASE_ENV, "1");
        return step(&mut cmd).context("the optimised bench run failed");
    }
    let bin = ensure_postgres()?;
    let tmp = std::env::temp_dir();
    // Before anything is written: the estimate of the database to be created.
    check_disk(&tmp, u64::from(scale) * BYTES_PER_SCALE, "estimated")?;

    heading("starting a throwaway PostgreSQL cluster");
    let cluster = Cluster::start().context("could not start a PostgreSQL cluster")?;
    let db = cluster.create_database_blocking()?;
    let mut init = Command::new(bin.join("pgbench"));
    init.args(["-i", "-q", "-s", &scale.to_string(), "-d", &db.url]);
    heading(&describe(&init));
    let started = Instant::now();
    capture(&mut init)?;
    println!("initialised in {:.1}s", started.elapsed().as_secs_f64());
    let db_size: u64 = psql(&db.url, "SELECT pg_database_size(current_database())")?
        .trim()
        .parse()
        .context("could not read the database size")?;
    println!("database size {}", format_bytes(db_size));
    check_disk(&tmp, db_size, "actual")?;

    let work = tempfile::tempdir().context("could not create a temp dir")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start a tokio runtime")?;
    let bench = Bench {
        bin: bin.clone(),
        url: DatabaseUrl::parse(&db.url).context("could not parse the database URL")?,
        admin_url: cluster.url("postgres"),
        // Both sides run the same PostgreSQL programs.
        manager: BackupManager::new(work.path().join("backups")).with_bin_dir(&bin),
        work: work.path().to_path_buf(),
        runtime,
    };

    let mut t = Times::default();
    heading(&format!("{reps} interleaved repetitions (scale {scale})"));
    for rep in 1..=reps {
        bench.rep(rep, &mut t)?;
    }

    heading(&format!(
        "results (pgbench scale {scale}, database {}, {reps} repetitions, medians)",
        format_bytes(db_size)
    ));
    let ratio = |a: &[Duration], b: &[Duration]| median(a) / median(b);
    let create = ratio(&t.belay_custom, &t.raw_custom);
    println!(
        "backup create, custom, full: belay {:.2}s, pg_dump {:.2}s, ratio {create:.3} (target ≤ 1.05: {}); archive {}",
        median(&t.belay_custom),
        median(&t.raw_custom),
        if create <= 1.05 { "met" } else { "MISSED" },
        format_bytes(t.custom_size)
    );
    println!(
        "backup create, belay directory --jobs 2 vs custom: {:.2}s vs {:.2}s, ratio {:.3}; directory {}",
        median(&t.belay_dir),
        median(&t.belay_custom),
        ratio(&t.belay_dir, &t.belay_custom),
        format_bytes(t.dir_size)
    );
    println!(
        "verify (sha256 + pg_restore --list): {:.2}s; with restore test into a scratch database: {:.2}s",
        median(&t.verify),
        median(&t.restore_test)
    );
    println!(
        "restore into a new database: belay {:.2}s, CREATE DATABASE + pg_restore --single-transaction {:.2}s, ratio {:.3}",
        median(&t.belay_restore),
        median(&t.raw_restore),
        ratio(&t.belay_restore, &t.raw_restore)
    );
    Ok(())
}

fn check_disk(dir: &Path, db_size: u64, what: &str) -> Result<()> {
    let free = disk_space(dir)
        .with_context(|| format!("could not read the free space of {}", dir.display()))?
        .available;
    let need = db_size * DISK_FACTOR;
    if free < need {
        bail!(
            "not enough free disk space in {}: {} free, the bench needs {} ({DISK_FACTOR}× the {what} database size of {}); free some space or lower --scale",
            dir.display(),
            format_bytes(free),
            format_bytes(need),
            format_bytes(db_size)
        );
    }
    println!(
        "disk: {} free in {}, {} needed ({DISK_FACTOR}× the {what} database size)",
        format_bytes(free),
        dir.display(),
        format_bytes(need)
    );
    Ok(())
}

#[derive(Debug, Default)]
struct Times {
    belay_custom: Vec<Duration>,
    raw_custom: Vec<Duration>,
    belay_dir: Vec<Duration>,
    verify: Vec<Duration>,
    restore_test: Vec<Duration>,
    belay_restore: Vec<Duration>,
    raw_restore: Vec<Duration>,
    custom_size: u64,
    dir_size: u64,
}

struct Bench {
    bin: PathBuf,
    url: DatabaseUrl,
    /// The cluster's `postgres` database, for creating and dropping databases.
    admin_url: String,
    manager: BackupManager,
    work: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl Bench {
    fn rep(&self, rep: usize, t: &mut Times) -> Result<()> {
        let first = rep % 2 == 1;

        // Create: belay custom vs. pg_dump custom, alternating which goes first.
        let mut custom_id = None;
        for belay in [first, !first] {
            if belay {
                let (took, id, size) = self.belay_create(BackupFormat::Custom)?;
                report_rep(rep, "belay create custom", took, Some(size));
                t.belay_custom.push(took);
                t.custom_size = size;
                custom_id = Some(id);
            } else {
                let file = self.work.join("raw.pgdump");
                let mut cmd = Command::new(self.bin.join("pg_dump"));
                cmd.args(["--format=custom", "--no-password", "-f"])
                    .arg(&file)
                    .arg(format!("--dbname={}", self.url.expose()));
                let took = timed(&mut cmd)?;
                let size = std::fs::metadata(&file).map_or(0, |m| m.len());
                std::fs::remove_file(&file)
                    .with_context(|| format!("could not remove {}", file.display()))?;
                report_rep(rep, "pg_dump custom", took, Some(size));
                t.raw_custom.push(took);
            }
        }
        let custom_id = custom_id.context("no custom backup was taken")?;

        let (took, id, size) = self.belay_create(BackupFormat::Directory { jobs: 2 })?;
        report_rep(rep, "belay create directory -j2", took, Some(size));
        t.belay_dir.push(took);
        t.dir_size = size;
        self.delete_backup(&id)?;

        let started = Instant::now();
        let report = self
            .runtime
            .block_on(self.manager.verify(TARGET, &custom_id, None))
            .context("belay verify failed")?;
        let took = started.elapsed();
        anyhow::ensure!(report.ok, "verification failed: {:?}", report.problems);
        report_rep(rep, "belay verify", took, None);
        t.verify.push(took);

        let started = Instant::now();
        let report = self
            .runtime
            .block_on(self.manager.verify(TARGET, &custom_id, Some(&self.url)))
            .context("belay verify with restore test failed")?;
        let took = started.elapsed();
        anyhow::ensure!(
            report.ok && report.restore_test.is_some(),
            "verification with restore test failed: {:?}",
            report.problems
        );
        report_rep(rep, "belay verify restore-test", took, None);
        t.restore_test.push(took);

        // Restore the same archive: belay into a new database vs. CREATE DATABASE +
        // pg_restore, alternating; each restored database is dropped at once.
        let archive = self
            .manager
            .catalog(TARGET)?
            .backup_dir(&custom_id)?
            .join(BackupFormat::Custom.dump_path());
        for belay in [first, !first] {
            // Untimed: the WAL of the previous restore (or of the restore test) is
            // flushed first, so neither side pays for the other's checkpoint.
            psql(&self.admin_url, "CHECKPOINT")?;
            if belay {
                let name = format!("bench_belay_{rep}");
                let req = RestoreRequest {
                    into: Some(name.clone()),
                    ..RestoreRequest::default()
                };
                let started = Instant::now();
                let report = self
                    .runtime
                    .block_on(
                        self.manager
                            .restore(&self.url, TARGET, &custom_id, &req, &|_| {}),
                    )
                    .context("belay restore failed")?;
                let took = started.elapsed();
                self.drop_database(&name)?;
                anyhow::ensure!(
                    report.mismatches.is_empty(),
                    "row counts differ after the restore: {:?}",
                    report.mismatches
                );
                report_rep(rep, "belay restore --into", took, None);
                t.belay_restore.push(took);
            } else {
                let name = format!("bench_raw_{rep}");
                let started = Instant::now();
                psql(
                    &self.admin_url,
                    &format!("CREATE DATABASE {name} TEMPLATE template0"),
                )?;
                let mut cmd = Command::new(self.bin.join("pg_restore"));
                cmd.args([
                    "--no-password",
                    "--exit-on-error",
                    "--single-transaction",
                    &format!("--dbname={}", self.db_url(&name)),
                ])
                .arg(&archive);
                capture(&mut cmd)?;
                let took = started.elapsed();
                self.drop_database(&name)?;
                report_rep(rep, "pg_restore", took, None);
                t.raw_restore.push(took);
            }
        }
        self.delete_backup(&custom_id)
    }

    /// A full backup by belay: its wall time, id and size on disk.
    fn belay_create(&self, format: BackupFormat) -> Result<(Duration, String, u64)> {
        let req = BackupRequest {
            format,
            scope: BackupScope::Full,
            label: Some("bench".to_owned()),
            deployment_id: None,
            kind: None,
        };
        let started = Instant::now();
        let manifest = self
            .runtime
            .block_on(self.manager.create(&self.url, TARGET, &req, &|_| {}))
            .with_context(|| format!("belay backup create ({}) failed", format.name()))?;
        Ok((
            started.elapsed(),
            manifest.id.clone(),
            manifest.total_size(),
        ))
    }

    fn delete_backup(&self, id: &str) -> Result<()> {
        let dir = self.manager.catalog(TARGET)?.backup_dir(id)?;
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("could not remove the backup {}", dir.display()))
    }

    fn db_url(&self, name: &str) -> String {
        match self.admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => self.admin_url.clone(),
        }
    }

    fn drop_database(&self, name: &str) -> Result<()> {
        psql(
            &self.admin_url,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        )?;
        Ok(())
    }
}

fn report_rep(rep: usize, label: &str, took: Duration, size: Option<u64>) {
    let size = size
        .map(|s| format!(" ({})", format_bytes(s)))
        .unwrap_or_default();
    println!("rep {rep}: {label:<27}{:>7.2}s{size}", took.as_secs_f64());
}

fn timed(cmd: &mut Command) -> Result<Duration> {
    let started = Instant::now();
    capture(cmd)?;
    Ok(started.elapsed())
}

fn median(times: &[Duration]) -> f64 {
    let mut secs: Vec<f64> = times.iter().map(Duration::as_secs_f64).collect();
    secs.sort_by(f64::total_cmp);
    let mid = secs.len() / 2;
    if secs.is_empty() {
        0.0
    } else if secs.len().is_multiple_of(2) {
        f64::midpoint(secs[mid - 1], secs[mid])
    } else {
        secs[mid]
    }
}
