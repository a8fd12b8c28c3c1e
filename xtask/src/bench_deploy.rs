//! `cargo xtask bench deploy`: what each step of a local `belay migrate` deployment costs,
//! read from the transition timestamps the deployment records, against a bare `psql`
//! apply of the same forward scripts.
//!
//! Per migration set (`examples/migrations`, then a real corpus), three sides run
//! interleaved on fresh databases, the order rotating every repetition:
//! - belay with every step on: lint gate, preflight, a full backup, the lock guard,
//!   postflight with a `[[checks]]` assertion, and a `--watch` of [`WATCH`] with one SQL
//!   probe every [`PROBE_PERIOD`] (a chosen wait, reported on its own row);
//! - belay with steps off: `--no-preflight --backup none --no-lint`, no `--watch` (the
//!   lock guard and postflight stay: they cannot be turned off by those flags);
//! - psql: one session applying every script in its own transaction with a history row,
//!   exactly as `bench runner`'s baseline does.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use belay_testkit::{Cluster, TestDb};
use chrono::{DateTime, FixedOffset};
use serde_json::Value;

use crate::bench::{baseline_script, forward_scripts, median, release_belay, time_psql};
use crate::pg::ensure_postgres;
use crate::util::{capture, heading, root};

/// The watch window of the all-steps run: long enough for a few probe attempts.
const WATCH: &str = "2s";
const WATCH_SECS: f64 = 2.0;
/// The SQL probe's period during the watch.
const PROBE_PERIOD: &str = "500ms";
/// Where `build-corpus.sh` puts the kratos migrations.
const DEFAULT_CORPUS: &str = "/tmp/belay-bench/corpus/kratos/migrations";

/// The recorded steps, in order, as `belay_deploy::Step` spells them.
pub(crate) const STEPS: [&str; 6] = [
    "planned",
    "preflight",
    "backing_up",
    "migrating",
    "validating",
    "watching",
];

pub fn deploy(reps: usize, corpus: Option<PathBuf>, belay_bin: Option<PathBuf>) -> Result<()> {
    anyhow::ensure!(reps > 0, "--reps must be at least 1");
    let bin = ensure_postgres()?;
    let belay = release_belay(belay_bin)?;
    heading("starting a throwaway PostgreSQL cluster");
    let cluster = Cluster::start().context("could not start a PostgreSQL cluster")?;
    let bench = Bench {
        cluster: &cluster,
        bin: &bin,
        belay: &belay,
        reps,
    };

    let mut tables = vec![bench.set("examples/migrations", &root().join("examples/migrations"))?];
    let corpus = corpus.unwrap_or_else(|| PathBuf::from(DEFAULT_CORPUS));
    let skipped = if corpus.is_dir() {
        let label = corpus.display().to_string();
        // Absolute: belay runs in the bench's work directory.
        let corpus = corpus
            .canonicalize()
            .with_context(|| format!("could not resolve {}", corpus.display()))?;
        tables.push(bench.set(&label, &corpus)?);
        None
    } else {
        Some(format!(
            "corpus: skipped, {} does not exist. Build it with \
             `../shared/bench/runners/build-corpus.sh MIRROR_DIR` (see \
             ../shared/bench/runners/README.md: bare snapshots of ory/kratos and others, \
             migrations copied to /tmp/belay-bench/corpus only), or pass --corpus DIR",
            corpus.display()
        ))
    };

    heading(&format!(
        "results ({reps} interleaved repetitions, medians; steps from the deployment's \
         recorded transition timestamps)"
    ));
    for table in tables {
        println!("{table}");
    }
    if let Some(message) = skipped {
        println!("{message}");
    }
    Ok(())
}

struct Bench<'a> {
    cluster: &'a Cluster,
    bin: &'a Path,
    belay: &'a Path,
    reps: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Every step on, with the watch.
    Full,
    /// `--no-preflight --backup none --no-lint`, no watch.
    Off,
    Psql,
}

/// One belay run, read back from its deployment document.
#[derive(Debug, Default)]
struct Run {
    /// `started_at` (the record's start) to the `planned` transition: the log's `begin`.
    begin: f64,
    /// Seconds in each of [`STEPS`], from a transition to the next.
    steps: [f64; STEPS.len()],
    /// `started_at` to the final transition.
    pipeline: f64,
    /// The process, start to exit.
    wall: f64,
}

impl Bench<'_> {
    fn set(&self, label: &str, dir: &Path) -> Result<String> {
        let scripts = forward_scripts(dir)?;
        anyhow::ensure!(
            !scripts.is_empty(),
            "no migrations found in {}",
            dir.display()
        );
        let versioned = scripts.iter().filter(|s| !s.repeatable).count();
        let no_tx = scripts.iter().filter(|s| s.no_transaction).count();
        let work = tempfile::tempdir().context("could not create a temp dir")?;
        let script = work.path().join("baseline.sql");
        fs::write(&script, baseline_script(&scripts)?)
            .context("could not write the psql baseline script")?;
        let ctx = SetCtx {
            dir,
            work: work.path(),
            script: &script,
            versioned,
        };

        heading(&format!(
            "{label}: {} migrations ({no_tx} without a transaction), {} interleaved \
             repetitions",
            scripts.len(),
            self.reps
        ));
        // One untimed run of each first: the first databases after a cluster starts pay
        // for cold caches, and that cost belongs to no side.
        for side in [Side::Full, Side::Off, Side::Psql] {
            self.run(side, &ctx)?;
        }
        let (mut full, mut off, mut psql) = (Vec::new(), Vec::new(), Vec::new());
        let order = [Side::Full, Side::Off, Side::Psql];
        for rep in 1..=self.reps {
            // Rotating which side goes first cancels out ordering and warm-cache effects.
            for i in 0..order.len() {
                let side = order[(i + rep - 1) % order.len()];
                let (wall, run) = self.run(side, &ctx)?;
                match (side, run) {
                    (Side::Psql, _) => {
                        println!("rep {rep}: psql            {wall:.3}s");
                        psql.push(Duration::from_secs_f64(wall));
                    }
                    (Side::Full, Some(r)) => {
                        println!("rep {rep}: belay all steps {wall:.3}s ({})", step_line(&r));
                        full.push(r);
                    }
                    (Side::Off, Some(r)) => {
                        println!("rep {rep}: belay steps off {wall:.3}s ({})", step_line(&r));
                        off.push(r);
                    }
                    (_, None) => bail!("a belay run returned no deployment"),
                }
            }
        }
        Ok(table(
            label,
            scripts.len(),
            no_tx,
            self.reps,
            &full,
            &off,
            median(&psql),
        ))
    }

    /// Runs one side on a fresh database: its wall-clock seconds and, for belay, the
    /// deployment's recorded steps.
    fn run(&self, side: Side, ctx: &SetCtx<'_>) -> Result<(f64, Option<Run>)> {
        let db = self.cluster.create_database_blocking()?;
        if side == Side::Psql {
            let took = time_psql(self.bin, ctx.script, &db)?;
            return Ok((took.as_secs_f64(), None));
        }
        let config = ctx.work.join("belay.toml");
        fs::write(&config, belay_toml(&db, ctx.versioned))
            .context("could not write the bench's belay.toml")?;
        let backups = ctx.work.join("backups");
        let mut cmd = Command::new(self.belay);
        cmd.arg("--dir")
            .arg(ctx.dir)
            .arg("--config")
            .arg(&config)
            .arg("--backup-dir")
            .arg(&backups)
            .args(["--output", "json", "migrate"])
            .env("BELAY_DATABASE_URL", &db.url)
            // Preflight's disk check and the backup look at the working directory's disk.
            .current_dir(ctx.work);
        match side {
            Side::Full => cmd.args(["--backup", "full", "--watch", WATCH]),
            Side::Off => cmd.args(["--no-preflight", "--backup", "none", "--no-lint"]),
            Side::Psql => unreachable!("handled above"),
        };
        let start = Instant::now();
        let out = capture(&mut cmd)?;
        let wall = start.elapsed().as_secs_f64();
        // One backup per repetition is enough to keep on disk: none.
        if backups.exists() {
            fs::remove_dir_all(&backups)
                .with_context(|| format!("could not remove {}", backups.display()))?;
        }
        let doc: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "belay migrate --output json printed no JSON document:\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        let mut run = read_run(&doc, side == Side::Full)?;
        run.wall = wall;
        Ok((wall, Some(run)))
    }
}

struct SetCtx<'a> {
    dir: &'a Path,
    work: &'a Path,
    script: &'a Path,
    versioned: usize,
}

/// The bench's belay.toml: one assertion (every versioned migration is applied) and one
/// SQL probe on the target (no failed history row) for `--watch`.
fn belay_toml(db: &TestDb, versioned: usize) -> String {
    let url = db.url.replace('"', "\\\"");
    format!(
        "[[checks]]\n\
         name = \"every_migration_applied\"\n\
         query = \"SELECT count(*) FROM belay.schema_history WHERE success AND version IS NOT NULL\"\n\
         expect = {{ equals = {versioned} }}\n\
         \n\
         [[probes]]\n\
         name = \"history_clean\"\n\
         period = \"{PROBE_PERIOD}\"\n\
         [probes.sql]\n\
         url = \"{url}\"\n\
         query = \"SELECT count(*) FROM belay.schema_history WHERE NOT success\"\n\
         expect = \"zero\"\n"
    )
}

/// The steps of a succeeded deployment from its document's transition events.
fn read_run(doc: &Value, watched: bool) -> Result<Run> {
    if doc["ok"] != Value::Bool(true) {
        bail!("the deployment did not succeed: {}", doc["error"]);
    }
    let d = &doc["deployment"];
    let started = timestamp(&d["started_at"]).context("deployment.started_at")?;
    let mut transitions = Vec::new();
    for e in d["events"].as_array().into_iter().flatten() {
        if e["kind"] == "transition" {
            let to = e["payload"]["to"].as_str().unwrap_or_default().to_owned();
            transitions.push((to, timestamp(&e["at"]).context("event.at")?));
        }
    }
    let names: Vec<&str> = transitions.iter().map(|(s, _)| s.as_str()).collect();
    let mut expected: Vec<&str> = STEPS.to_vec();
    if !watched {
        expected.retain(|s| *s != "watching");
    }
    expected.push("succeeded");
    if names != expected {
        bail!("unexpected transitions {names:?} (expected {expected:?})");
    }
    let secs = |a: DateTime<FixedOffset>, b: DateTime<FixedOffset>| {
        (b - a).num_microseconds().unwrap_or_default() as f64 / 1e6
    };
    let mut run = Run {
        begin: secs(started, transitions[0].1),
        pipeline: secs(started, transitions[transitions.len() - 1].1),
        ..Run::default()
    };
    for pair in transitions.windows(2) {
        if let Some(i) = STEPS.iter().position(|s| *s == pair[0].0) {
            run.steps[i] = secs(pair[0].1, pair[1].1);
        }
    }
    Ok(run)
}

fn timestamp(v: &Value) -> Result<DateTime<FixedOffset>> {
    let text = v.as_str().context("not a string")?;
    DateTime::parse_from_rfc3339(text).with_context(|| format!("not RFC 3339: {text}"))
}

fn step_line(r: &Run) -> String {
    let mut out = format!("begin {:.3}", r.begin);
    for (name, secs) in STEPS.iter().zip(r.steps) {
        let _ = write!(out, ", {name} {secs:.3}");
    }
    out
}

fn med(runs: &[Run], f: impl Fn(&Run) -> f64) -> f64 {
    median(
        &runs
            .iter()
            .map(|r| Duration::from_secs_f64(f(r).max(0.0)))
            .collect::<Vec<_>>(),
    )
}

fn table(
    label: &str,
    migrations: usize,
    no_tx: usize,
    reps: usize,
    full: &[Run],
    off: &[Run],
    psql: f64,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{label}: {migrations} migrations ({no_tx} without a transaction), {reps} reps, medians"
    );
    let _ = writeln!(out, "  {:<56} {:>10} {:>10}", "", "all steps", "steps off");
    let mut row = |name: &str, a: f64, b: Option<f64>| {
        let b = b.map_or_else(|| "—".to_owned(), |v| format!("{v:.3}s"));
        let _ = writeln!(out, "  {name:<56} {:>9.3}s {b:>10}", a);
    };
    row(
        "record begun (started_at → planned)",
        med(full, |r| r.begin),
        Some(med(off, |r| r.begin)),
    );
    let titles = [
        "planned → preflight",
        "preflight",
        "backing_up (runner lock, lint gate, backup)",
        "migrating",
        "validating (postflight, 1 [[checks]])",
    ];
    for (i, title) in titles.iter().enumerate() {
        row(
            title,
            med(full, |r| r.steps[i]),
            Some(med(off, |r| r.steps[i])),
        );
    }
    row(
        &format!("watching (chosen: --watch {WATCH}, probe every {PROBE_PERIOD})"),
        med(full, |r| r.steps[5]),
        None,
    );
    row(
        "pipeline (started_at → succeeded)",
        med(full, |r| r.pipeline),
        Some(med(off, |r| r.pipeline)),
    );
    row(
        "outside the pipeline (process, files, finish, output)",
        med(full, |r| r.wall - r.pipeline),
        Some(med(off, |r| r.wall - r.pipeline)),
    );
    let total = med(full, |r| r.wall);
    let no_watch = med(full, |r| r.wall - r.steps[5]);
    let total_off = med(off, |r| r.wall);
    row("total (belay migrate, wall clock)", total, Some(total_off));
    row("total without watching", no_watch, Some(total_off));
    let _ = writeln!(
        out,
        "  {:<56} {psql:>9.3}s",
        "psql total (one session, BEGIN/\\i/history row/COMMIT)"
    );
    let _ = writeln!(
        out,
        "  {:<56} {:>10.2} {:>10.2}",
        "ratio total / psql",
        total / psql,
        total_off / psql
    );
    let _ = writeln!(
        out,
        "  {:<56} {:>10.2} {:>10.2}",
        "ratio total without watching / psql",
        no_watch / psql,
        total_off / psql
    );
    let _ = write!(
        out,
        "  (watch overhead over the chosen {WATCH_SECS:.1}s window: {:.3}s)",
        med(full, |r| r.steps[5]) - WATCH_SECS
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_read_from_the_transitions() -> Result<()> {
        let t = |s: &str, at: &str| serde_json::json!({"kind": "transition", "at": at, "payload": {"to": s}});
        let doc = serde_json::json!({
            "ok": true,
            "deployment": {
                "started_at": "2026-01-01T00:00:00Z",
                "events": [
                    t("planned", "2026-01-01T00:00:00.010Z"),
                    t("preflight", "2026-01-01T00:00:00.020Z"),
                    {"kind": "check", "at": "2026-01-01T00:00:00.050Z", "payload": {}},
                    t("backing_up", "2026-01-01T00:00:00.120Z"),
                    t("migrating", "2026-01-01T00:00:00.420Z"),
                    t("validating", "2026-01-01T00:00:01.420Z"),
                    t("succeeded", "2026-01-01T00:00:01.440Z"),
                ],
            },
        });
        let run = read_run(&doc, false)?;
        assert_eq!(run.begin, 0.01);
        assert_eq!(run.steps, [0.01, 0.1, 0.3, 1.0, 0.02, 0.0]);
        assert_eq!(run.pipeline, 1.44);
        assert!(read_run(&doc, true).is_err(), "a watch was expected");
        Ok(())
    }
}
