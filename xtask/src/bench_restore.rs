//! `cargo xtask bench restore`: belay's table restore of one large table against what a DBA
//! runs by hand, `TRUNCATE` then `pg_restore --data-only -t`, from the same archive.
//!
//! One throwaway cluster, one table generated server-side (`generate_series`: a bigint
//! primary key, an int with its own index, a text column, a timestamp), one belay backup
//! (`belay backup create`, custom format). Then, interleaved with the order alternating per
//! repetition: (a) `belay backup restore <id> --tables public.t --no-emergency-backup`, the
//! path a rollback's `table_restore` takes (its emergency backup is an earlier step of the
//! rollback, of the whole database, so the restore itself takes none): verification of the
//! archive, then DROP + CREATE + COPY + primary key + index in one transaction, then row
//! counts; (b) `psql -c 'TRUNCATE t'` then `pg_restore --data-only -t t`, which keeps the
//! table and its indexes and maintains them row by row. Same end state: the same rows (a
//! fingerprint of count, sums and text hashes compared after every run, untimed) and the
//! same two indexes. A CHECKPOINT before each timed run (untimed) keeps either side from
//! paying for the other's WAL.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use belay_health::{disk_space, format_bytes};
use belay_testkit::{Cluster, psql};
use serde_json::Value;

use crate::bench::{median, release_belay};
use crate::pg::ensure_postgres;
use crate::util::{capture, describe, heading};

/// The target: belay's table restore at most this many times the hand-run one.
const TARGET_RATIO: f64 = 1.2;
/// Heap bytes per generated row (tuple header, bigint, int, 96-byte text, timestamptz),
/// measured on PostgreSQL 15; the table's real size is printed after it is made.
const ROW_BYTES: u64 = 150;
/// Free space needed, as a multiple of the table: the table and its WAL, the archive,
/// and the new table a restore writes before the old one's files go.
const DISK_FACTOR: u64 = 4;

/// The fingerprint of the table's rows, compared after every restore.
const FINGERPRINT: &str = "SELECT count(*) || ' ' || coalesce(sum(id), 0) || ' ' || coalesce(sum(account), 0) || ' ' \
     || coalesce(sum(hashtext(note)::bigint), 0) || ' ' || coalesce(sum(extract(epoch FROM created)::bigint), 0) FROM t";
const INDEXES: &str = "SELECT string_agg(indexdef, '; ' ORDER BY indexname) FROM pg_indexes WHERE schemaname = 'public' AND tablename = 't'";

pub fn restore(size_mb: u64, reps: usize, belay_bin: Option<PathBuf>) -> Result<()> {
    anyhow::ensure!(reps > 0, "--reps must be at least 1");
    anyhow::ensure!(size_mb > 0, "--size-mb must be at least 1");
    let bin = ensure_postgres()?;
    let belay = release_belay(belay_bin)?;
    let table_bytes = size_mb * 1024 * 1024;
    let tmp = std::env::temp_dir();
    let free = disk_space(&tmp)
        .with_context(|| format!("could not read the free space of {}", tmp.display()))?
        .available;
    if free < table_bytes * DISK_FACTOR {
        bail!(
            "not enough free disk space in {}: {} free, the bench needs {} ({DISK_FACTOR}× the table); lower --size-mb",
            tmp.display(),
            format_bytes(free),
            format_bytes(table_bytes * DISK_FACTOR)
        );
    }

    heading("starting a throwaway PostgreSQL cluster");
    let cluster = Cluster::start().context("could not start a PostgreSQL cluster")?;
    let db = cluster.create_database_blocking()?;
    let rows = table_bytes / ROW_BYTES;
    heading(&format!(
        "generating table t: {rows} rows (~{size_mb} MB heap)"
    ));
    let started = Instant::now();
    psql(
        &db.url,
        &format!(
            "CREATE TABLE t (id bigint NOT NULL, account int NOT NULL, note text NOT NULL, created timestamptz NOT NULL);
             INSERT INTO t SELECT g, (g::bigint * 7919) % 100000, repeat(md5(g::text), 3),
                    timestamptz '2026-01-01' + g * interval '1 second'
               FROM generate_series(1, {rows}) g;
             ALTER TABLE t ADD PRIMARY KEY (id);
             CREATE INDEX t_account ON t (account);"
        ),
    )?;
    // Its own call: VACUUM cannot run in the transaction `psql -c` wraps around several
    // statements. Hint bits set now, so the first dump does not pay for them.
    psql(&db.url, "VACUUM ANALYZE t")?;
    let sizes = psql(
        &db.url,
        "SELECT pg_relation_size('t') || ' ' || pg_indexes_size('t')",
    )?;
    let (heap, indexes) = sizes
        .trim()
        .split_once(' ')
        .context("could not read the table's size")?;
    let heap: u64 = heap.parse().context("table size")?;
    let indexes: u64 = indexes.parse().context("index size")?;
    println!(
        "generated in {:.1}s: heap {}, indexes {}",
        started.elapsed().as_secs_f64(),
        format_bytes(heap),
        format_bytes(indexes)
    );
    let expected = psql(&db.url, FINGERPRINT)?.trim().to_owned();
    let expected_indexes = psql(&db.url, INDEXES)?.trim().to_owned();

    let work = tempfile::tempdir().context("could not create a work directory")?;
    let backups = work.path().join("backups");
    let belay_cmd = |args: &[&str]| {
        let mut cmd = Command::new(&belay);
        cmd.arg("--backup-dir")
            .arg(&backups)
            .args(["--output", "json"])
            .args(args)
            .env("BELAY_DATABASE_URL", &db.url)
            .current_dir(work.path());
        cmd
    };

    let mut create = belay_cmd(&["backup", "create"]);
    heading(&describe(&create));
    let started = Instant::now();
    let out = capture(&mut create)?;
    let took = started.elapsed();
    let created: Value = serde_json::from_slice(&out.stdout).context("backup create: not JSON")?;
    let id = created["id"]
        .as_str()
        .context("backup create printed no id")?
        .to_owned();
    let archive = PathBuf::from(
        created["path"]
            .as_str()
            .context("backup create printed no path")?,
    )
    .join("dump.pgdump");
    let archive_size = std::fs::metadata(&archive)
        .with_context(|| format!("no archive at {}", archive.display()))?
        .len();
    println!(
        "backup {id}: archive {} in {:.1}s (dump and verification)",
        format_bytes(archive_size),
        took.as_secs_f64()
    );

    heading(&format!(
        "{reps} interleaved repetitions: belay table restore vs TRUNCATE + pg_restore --data-only -t"
    ));
    let (mut belay_times, mut raw_times, mut belay_inner) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 1..=reps {
        let belay_first = rep % 2 == 1;
        for run_belay in [belay_first, !belay_first] {
            // Untimed: flush the previous run's WAL so neither side pays for the other's.
            psql(&db.url, "CHECKPOINT")?;
            if run_belay {
                let mut cmd = belay_cmd(&[
                    "backup",
                    "restore",
                    &id,
                    "--tables",
                    "public.t",
                    "--no-emergency-backup",
                ]);
                let started = Instant::now();
                let out = capture(&mut cmd)?;
                let took = started.elapsed();
                let report: Value =
                    serde_json::from_slice(&out.stdout).context("backup restore: not JSON")?;
                let inner = report["duration_ms"].as_u64().unwrap_or_default();
                println!(
                    "rep {rep}: belay    {:>8.2}s (restore proper {:.2}s; verification and start-up the rest)",
                    took.as_secs_f64(),
                    inner as f64 / 1000.0
                );
                belay_times.push(took);
                belay_inner.push(Duration::from_millis(inner));
            } else {
                let took = by_hand(&bin, &db.url, &archive)?;
                println!("rep {rep}: by hand  {:>8.2}s", took.as_secs_f64());
                raw_times.push(took);
            }
            let now = psql(&db.url, FINGERPRINT)?.trim().to_owned();
            if now != expected {
                bail!(
                    "after the {} restore the rows differ: {now} instead of {expected}",
                    if run_belay { "belay" } else { "hand-run" }
                );
            }
            let now = psql(&db.url, INDEXES)?.trim().to_owned();
            if now != expected_indexes {
                bail!("after a restore the indexes differ: {now} instead of {expected_indexes}");
            }
        }
    }

    let (b, r) = (median(&belay_times), median(&raw_times));
    let ratio = b / r;
    heading(&format!(
        "results (table heap {}, indexes {}, archive {}, {reps} repetitions, medians)",
        format_bytes(heap),
        format_bytes(indexes),
        format_bytes(archive_size)
    ));
    println!(
        "table restore: belay {b:.2}s (restore proper {:.2}s), TRUNCATE + pg_restore --data-only -t {r:.2}s, ratio {ratio:.3} (target ≤ {TARGET_RATIO}: {})",
        median(&belay_inner),
        if ratio <= TARGET_RATIO {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "belay restore rate {:.1} MB/s of archive (archive ÷ restore proper; the rate rates.json records also counts the verification)",
        archive_size as f64 / median(&belay_inner).max(1e-3) / 1e6
    );
    Ok(())
}

/// The DBA's way: empty the table, then load the archive's data for it.
fn by_hand(bin: &Path, url: &str, archive: &Path) -> Result<Duration> {
    let started = Instant::now();
    let mut truncate = Command::new(bin.join("psql"));
    truncate.args([
        "-X",
        "-q",
        "--no-password",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        "TRUNCATE t",
        url,
    ]);
    capture(&mut truncate)?;
    let mut load = Command::new(bin.join("pg_restore"));
    load.args([
        "--no-password",
        "--exit-on-error",
        "--data-only",
        "-t",
        "t",
        &format!("--dbname={url}"),
    ])
    .arg(archive);
    capture(&mut load)?;
    Ok(started.elapsed())
}
