//! `cargo xtask bench rollback`: time from a probe crossing its failure threshold to the
//! verified end of the undo rollback `migrate --on-failure rollback` runs, read from the
//! timestamps the deployment log records (the probe event with `triggered`, then each
//! rollback step, then the `rolled_back` transition).
//!
//! Each repetition, on a fresh database: `belay migrate --watch 120s --on-failure
//! rollback` with one SQL probe (period 1 s, failure threshold 3, `[rollback] settle =
//! "1s"`); once the log shows `watching`, the bench makes the probe fail (a row in
//! `chaos` while `accounts.email` exists), so it crosses its threshold three periods
//! later and the rollback undoes the migration, which makes the probe pass again.

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use belay_testkit::Cluster;
use chrono::{DateTime, FixedOffset};
use serde_json::Value;

use crate::bench::{median, release_belay};
use crate::pg::ensure_postgres;
use crate::util::heading;

const TARGET: Duration = Duration::from_secs(5);

pub fn rollback(reps: usize, belay_bin: Option<std::path::PathBuf>) -> Result<()> {
    anyhow::ensure!(reps > 0, "--reps must be at least 1");
    ensure_postgres()?;
    let belay = release_belay(belay_bin)?;
    heading("starting a throwaway PostgreSQL cluster");
    let cluster = Cluster::start().context("could not start a PostgreSQL cluster")?;
    let work = tempfile::tempdir().context("could not create a work directory")?;
    let dir = work.path().join("migrations");
    fs::create_dir_all(&dir)?;
    fs::write(
        dir.join("V1__email.sql"),
        "ALTER TABLE accounts ADD COLUMN email text;\nCREATE TABLE sessions (id serial PRIMARY KEY, account_id int REFERENCES accounts (id));\n",
    )?;
    fs::write(
        dir.join("U1__email.sql"),
        "DROP TABLE sessions;\nALTER TABLE accounts DROP COLUMN email;\n",
    )?;
    heading(&format!(
        "rollback: probe period 1s, threshold 3, settle 1s; trigger → verified end of the undo rollback, {reps} repetition(s)"
    ));
    let mut totals = Vec::new();
    for rep in 1..=reps {
        let db = cluster.create_database_blocking()?;
        belay_testkit::psql(
            &db.url,
            "CREATE TABLE chaos (id int);
             CREATE TABLE accounts (id serial PRIMARY KEY, name text);
             INSERT INTO accounts (name) SELECT 'a' || g FROM generate_series(1, 1000) g;",
        )?;
        let config = work.path().join("belay.toml");
        fs::write(
            &config,
            format!(
                "[[probes]]\nname = \"app\"\nperiod = \"1s\"\nfailure_threshold = 3\n[probes.sql]\nurl = \"{}\"\n\
                 query = \"SELECT count(*) FROM chaos WHERE EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'accounts' AND column_name = 'email')\"\n\
                 expect = \"zero\"\n\n[rollback]\nsettle = \"1s\"\n",
                db.url
            ),
        )?;
        let mut child = Command::new(&belay)
            .arg("--dir")
            .arg(&dir)
            .arg("--config")
            .arg(&config)
            .arg("--backup-dir")
            .arg(work.path().join("backups"))
            .args([
                "migrate",
                "--watch",
                "120s",
                "--on-failure",
                "rollback",
                "--output",
                "json",
            ])
            .env("BELAY_DATABASE_URL", &db.url)
            .current_dir(work.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("could not start belay migrate")?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while !belay_testkit::psql(
            &db.url,
            "SELECT count(*) FROM belay.deployments WHERE step = 'watching'",
        )
        .is_ok_and(|s| s.trim() == "1")
        {
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("the deployment never reached its watch window");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        belay_testkit::psql(&db.url, "INSERT INTO chaos VALUES (1)")?;
        let status = child.wait().context("could not wait for belay")?;
        if status.code() != Some(4) {
            bail!("belay migrate exited {status}, not 4 (probe failed)");
        }
        let events: Value = serde_json::from_str(&belay_testkit::psql(
            &db.url,
            "SELECT json_agg(json_build_object('kind', kind, 'at', at, 'payload', payload) ORDER BY seq) FROM belay.deployment_events",
        )?)?;
        let events = events.as_array().context("no events")?;
        let at = |e: &Value| -> Result<DateTime<FixedOffset>> {
            let t = e["at"].as_str().context("no timestamp")?;
            DateTime::parse_from_rfc3339(t).with_context(|| format!("not RFC 3339: {t}"))
        };
        let triggered = events
            .iter()
            .find(|e| e["kind"] == "probe" && e["payload"]["triggered"] == true)
            .context("no triggered probe event")?;
        let done = events
            .iter()
            .find(|e| e["kind"] == "transition" && e["payload"]["to"] == "rolled_back")
            .context("the deployment was not rolled back")?;
        let t0 = at(triggered)?;
        let total = (at(done)? - t0).to_std().unwrap_or_default();
        let mut line = format!(
            "rep {rep}: trigger → rolled_back {:.2}s (",
            total.as_secs_f64()
        );
        let started = events
            .iter()
            .find(|e| e["kind"] == "transition" && e["payload"]["to"] == "rolling_back")
            .context("no rolling_back transition")?;
        line.push_str(&format!(
            "to rolling_back {:.2}s",
            (at(started)? - t0)
                .to_std()
                .unwrap_or_default()
                .as_secs_f64()
        ));
        for step in events.iter().filter(|e| e["kind"] == "rollback_step") {
            let p = &step["payload"];
            let s = DateTime::parse_from_rfc3339(p["started_at"].as_str().unwrap_or_default())?;
            let f = DateTime::parse_from_rfc3339(p["finished_at"].as_str().unwrap_or_default())?;
            line.push_str(&format!(
                ", {} {:.2}s",
                p["step"].as_str().unwrap_or("?"),
                (f - s).to_std().unwrap_or_default().as_secs_f64()
            ));
        }
        line.push(')');
        println!("{line}");
        totals.push(total);
        let _ = fs::remove_dir_all(work.path().join("backups"));
    }
    let med = median(&totals);
    let max = totals.iter().max().copied().unwrap_or_default();
    heading("results");
    println!(
        "rollback: trigger → verified end median {med:.2}s, max {:.2}s (target ≤ {}s: {})",
        max.as_secs_f64(),
        TARGET.as_secs(),
        if max <= TARGET { "met" } else { "MISSED" }
    );
    Ok(())
}
