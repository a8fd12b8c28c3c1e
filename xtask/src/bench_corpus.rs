//! `cargo xtask bench runner`, on real corpora: a public project's migrations applied
//! (`up`) on a fresh database and reverted (`down`), belay against one psql session doing
//! the same work, and diesel/sqlx when they are on PATH. Then one more run per side with
//! every statement logged by the server, to show where belay's time goes per migration.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use belay_testkit::{Cluster, TestDb};

use crate::bench::{Script, baseline_script, forward_scripts, median};
use crate::util::{capture, describe, heading};

/// The corpora measured when none is given: a ≥ 300-migration folder-layout project whose
/// downs round-trip (kratos), and a 233-migration diesel project (up only: its downs are
/// broken upstream, which the warm-up round finds and says).
const DEFAULT_CORPORA: [&str; 2] = ["kratos", "lemmy-0.19.20"];

/// `BENCH_HOME/corpus/<name>` as `/work/shared/bench/runners/build-corpus.sh` lays it out.
pub fn default_corpora() -> Vec<PathBuf> {
    let home = std::env::var_os("BENCH_HOME")
        .map_or_else(|| PathBuf::from("/tmp/belay-bench"), PathBuf::from);
    DEFAULT_CORPORA
        .iter()
        .map(|name| home.join("corpus").join(name))
        .collect()
}

/// One tool's way of running a corpus up and down.
#[derive(Clone)]
enum Side {
    Belay(PathBuf),
    Psql { up: PathBuf, down: PathBuf },
    Diesel { bin: PathBuf, dir: PathBuf },
    Sqlx { bin: PathBuf, dir: PathBuf },
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Phase {
    Up,
    Down,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Up => "up",
            Phase::Down => "down",
        }
    }
}

impl Side {
    fn name(&self) -> &'static str {
        match self {
            Side::Belay(_) => "belay",
            Side::Psql { .. } => "psql",
            Side::Diesel { .. } => "diesel",
            Side::Sqlx { .. } => "sqlx",
        }
    }

    fn command(&self, phase: Phase, pg_bin: &Path, dir: &Path, db: &TestDb) -> Command {
        match (self, phase) {
            (Side::Belay(bin), _) => {
                let mut cmd = Command::new(bin);
                cmd.arg("--dir").arg(dir);
                match phase {
                    Phase::Up => cmd.arg("migrate"),
                    Phase::Down => cmd.args(["undo", "--all"]),
                };
                // The executor itself is measured against psql: the pre-deployment backup
                // (`bench backup`), the preflight checklist and the lint pass are separate
                // costs.
                cmd.args(["--backup", "none"]);
                if phase == Phase::Up {
                    cmd.args(["--no-preflight", "--no-lint"]);
                }
                cmd.env("BELAY_DATABASE_URL", &db.url);
                cmd
            }
            (Side::Psql { up, down }, _) => {
                let mut cmd = Command::new(pg_bin.join("psql"));
                cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &db.url, "-f"])
                    .arg(if phase == Phase::Up { up } else { down });
                cmd
            }
            (Side::Diesel { bin, dir }, _) => {
                let mut cmd = Command::new(bin);
                cmd.arg("migration");
                match phase {
                    Phase::Up => cmd.arg("run"),
                    Phase::Down => cmd.args(["revert", "--all"]),
                };
                cmd.arg("--migration-dir")
                    .arg(dir)
                    .args(["--database-url", &db.url]);
                cmd
            }
            (Side::Sqlx { bin, dir }, _) => {
                let mut cmd = Command::new(bin);
                cmd.arg("migrate");
                match phase {
                    Phase::Up => cmd.arg("run"),
                    Phase::Down => cmd.args(["revert", "--target-version", "0"]),
                };
                cmd.arg("--source")
                    .arg(dir)
                    .args(["--database-url", &db.url]);
                cmd
            }
        }
    }
}

/// The `migrations` folder of a corpus directory, or the directory itself.
fn migrations_dir(corpus: &Path) -> PathBuf {
    let inner = corpus.join("migrations");
    if inner.is_dir() {
        inner
    } else {
        corpus.to_path_buf()
    }
}

/// What a migrations directory holds, for a PATH lookup of a peer tool.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// Applying the undo scripts newest first, each in its own transaction with its history
/// row deleted, the way a careful hand-rolled runner would (what `belay undo --all` does).
fn baseline_down_script(scripts: &[Script]) -> Result<String> {
    let mut out = String::new();
    for script in scripts.iter().rev() {
        let Some(down) = &script.down else { continue };
        let path = down.to_string_lossy().replace('\'', "''");
        let delete = format!(
            "DELETE FROM bench_history WHERE version = '{}';",
            script.version_text.replace('\'', "''")
        );
        if script.no_transaction {
            let _ = writeln!(out, "\\i '{path}'\n{delete}");
        } else {
            let _ = writeln!(out, "BEGIN;\n\\i '{path}'\n{delete}\nCOMMIT;");
        }
    }
    Ok(out)
}

/// A file diesel and sqlx can run: both refuse empty or comment-only files (psql and belay
/// take them), so those become `SELECT 1;` for the peers, as
/// `/work/shared/bench/runners/run.sh` does.
fn peer_text(path: &Path) -> Result<String> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("could not read {}", path.display())),
    };
    let meaningful = text
        .lines()
        .any(|l| !l.split("--").next().unwrap_or("").trim().is_empty());
    Ok(if meaningful {
        text
    } else {
        format!("{text}\nSELECT 1;\n")
    })
}

/// The corpus in diesel's layout (`<version>_<name>/up.sql`, `down.sql`, `metadata.toml`).
fn diesel_copy(scripts: &[Script], into: &Path) -> Result<PathBuf> {
    let dir = into.join("diesel");
    for (i, s) in scripts.iter().enumerate() {
        let folder = dir.join(format!("{}_m{i}", s.version_text));
        fs::create_dir_all(&folder).context("could not write the diesel copy")?;
        fs::write(folder.join("up.sql"), peer_text(&s.path)?)?;
        let down = s.down.clone().unwrap_or_default();
        fs::write(folder.join("down.sql"), peer_text(&down)?)?;
        if s.no_transaction {
            fs::write(folder.join("metadata.toml"), "run_in_transaction = false\n")?;
        }
    }
    Ok(dir)
}

/// The corpus in sqlx's layout, renumbered 1..N so mixed-width versions keep their order.
fn sqlx_copy(scripts: &[Script], into: &Path) -> Result<PathBuf> {
    let dir = into.join("sqlx");
    fs::create_dir_all(&dir).context("could not write the sqlx copy")?;
    for (i, s) in scripts.iter().enumerate() {
        let header = if s.no_transaction {
            "-- no-transaction\n"
        } else {
            ""
        };
        let down = s.down.clone().unwrap_or_default();
        fs::write(
            dir.join(format!("{}_m.up.sql", i + 1)),
            format!("{header}{}", peer_text(&s.path)?),
        )?;
        fs::write(
            dir.join(format!("{}_m.down.sql", i + 1)),
            format!("{header}{}", peer_text(&down)?),
        )?;
    }
    Ok(dir)
}

/// Tables, views, indexes and sequences outside the history tables: the same after each
/// side's run, or the sides did not do the same work.
fn relations(pg_bin: &Path, db: &TestDb) -> Result<String> {
    let out = capture(Command::new(pg_bin.join("psql")).args([
        "-X",
        "-A",
        "-t",
        "-d",
        &db.url,
        "-c",
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', 'belay') \
         AND c.relname NOT LIKE 'bench_history%' AND c.relname NOT LIKE '\\_\\_diesel%' \
         AND c.relname NOT LIKE '\\_sqlx%'",
    ]))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn run(cmd: &mut Command) -> Result<Duration> {
    let start = Instant::now();
    capture(cmd)?;
    Ok(start.elapsed())
}

fn first_line(err: &anyhow::Error) -> String {
    let text = format!("{err:#}");
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let head = lines.next().unwrap_or_default().to_owned();
    // The tool's own complaint is the last line of its stderr.
    match text.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(last) if last != head => format!("{head} … {}", last.trim()),
        _ => head,
    }
}

/// Runs one corpus; returns the result lines.
pub fn corpus(
    cluster: &Cluster,
    pg_bin: &Path,
    belay: &Path,
    corpus: &Path,
    reps: usize,
) -> Result<Vec<String>> {
    let label = corpus.file_name().map_or_else(
        || corpus.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let dir = migrations_dir(corpus);
    if !dir.is_dir() {
        return Ok(vec![format!(
            "corpus {label}: skipped, {} not found (build it with /work/shared/bench/runners/build-corpus.sh)",
            dir.display()
        )]);
    }
    let scripts = forward_scripts(&dir)?;
    anyhow::ensure!(
        !scripts.is_empty(),
        "no migrations found in {}",
        dir.display()
    );
    let n = scripts.len();
    let work = tempfile::tempdir().context("could not create a temp dir")?;
    let up = work.path().join("up.sql");
    let down = work.path().join("down.sql");
    fs::write(&up, baseline_script(&scripts)?).context("could not write the psql up script")?;
    fs::write(&down, baseline_down_script(&scripts)?)
        .context("could not write the psql down script")?;

    let mut sides = vec![Side::Belay(belay.to_path_buf()), Side::Psql { up, down }];
    let mut notes = Vec::new();
    match on_path("diesel") {
        Some(bin) => sides.push(Side::Diesel {
            bin,
            dir: diesel_copy(&scripts, work.path())?,
        }),
        None => notes.push("diesel: not found on PATH, no column".to_owned()),
    }
    match on_path("sqlx") {
        Some(bin) => sides.push(Side::Sqlx {
            bin,
            dir: sqlx_copy(&scripts, work.path())?,
        }),
        None => notes.push("sqlx: not found on PATH, no column".to_owned()),
    }

    heading(&format!(
        "corpus {label}: {n} migrations, warm-up round (untimed)"
    ));
    // The first databases after a cluster starts pay for cold caches, which belong to
    // no side; the round also finds out whether the corpus's downs work at all.
    let mut phases = vec![Phase::Up, Phase::Down];
    let mut shapes: Vec<(String, Phase, String)> = Vec::new();
    for side in &sides {
        let db = cluster.create_database_blocking()?;
        run(&mut side.command(Phase::Up, pg_bin, &dir, &db))
            .with_context(|| format!("{label}: {} up failed", side.name()))?;
        shapes.push((side.name().into(), Phase::Up, relations(pg_bin, &db)?));
        if phases.contains(&Phase::Down) {
            match run(&mut side.command(Phase::Down, pg_bin, &dir, &db)) {
                Ok(_) => shapes.push((side.name().into(), Phase::Down, relations(pg_bin, &db)?)),
                Err(e) => {
                    notes.push(format!(
                        "down: not timed, {} could not revert this corpus ({})",
                        side.name(),
                        first_line(&e)
                    ));
                    phases.retain(|p| *p != Phase::Down);
                }
            }
        }
    }
    for phase in &phases {
        let mut of_phase = shapes.iter().filter(|(_, p, _)| p == phase);
        if let Some((_, _, first)) = of_phase.next()
            && of_phase.clone().any(|(_, _, s)| s != first)
        {
            let all: Vec<String> = shapes
                .iter()
                .filter(|(_, p, _)| p == phase)
                .map(|(side, _, s)| format!("{side} {s}"))
                .collect();
            notes.push(format!(
                "{}: the sides left different numbers of relations ({}); compare their schemas",
                phase.name(),
                all.join(", ")
            ));
        }
    }

    heading(&format!(
        "corpus {label}: {reps} interleaved rounds ({})",
        phases
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(" + ")
    ));
    let mut times: BTreeMap<(Phase, &'static str), Vec<Duration>> = BTreeMap::new();
    for rep in 0..reps {
        // Each round rotates which side goes first: warm caches and ordering cancel out.
        let mut order = sides.clone();
        order.rotate_left(rep % sides.len());
        for side in &order {
            let db = cluster.create_database_blocking()?;
            let mut line = format!("round {}: {:<6}", rep + 1, side.name());
            for phase in &phases {
                let took = run(&mut side.command(*phase, pg_bin, &dir, &db))
                    .with_context(|| format!("{label}: {} {} failed", side.name(), phase.name()))?;
                let _ = write!(line, " {} {:.3}s", phase.name(), took.as_secs_f64());
                times.entry((*phase, side.name())).or_default().push(took);
            }
            println!("{line}");
        }
    }

    let mut lines = Vec::new();
    for phase in &phases {
        let base = median(&times[&(*phase, "psql")]);
        let mut line = format!("corpus {label} ({n} migrations) {}:", phase.name());
        for side in &sides {
            let m = median(&times[&(*phase, side.name())]);
            let _ = write!(line, "  {} {m:.3}s ({:.2}×)", side.name(), m / base);
        }
        // Per round, belay against the psql run of the same round: steadier on a busy
        // machine than the ratio of medians.
        let paired: Vec<Duration> = times[&(*phase, "belay")]
            .iter()
            .zip(&times[&(*phase, "psql")])
            .map(|(b, p)| Duration::from_secs_f64(b.as_secs_f64() / p.as_secs_f64()))
            .collect();
        let _ = write!(line, "  belay/psql paired median {:.2}", median(&paired));
        lines.push(line);
    }
    for note in &notes {
        lines.push(format!("corpus {label}: {note}"));
    }
    lines.extend(breakdown(
        cluster,
        pg_bin,
        &sides[..2],
        &dir,
        &phases,
        n,
        &label,
    )?);
    Ok(lines)
}

/// What one logged message to the server was for.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Script,
    Transaction,
    Settings,
    History,
    DeployLog,
    LockAndGuard,
}

impl Class {
    const ALL: [Class; 6] = [
        Class::Script,
        Class::Transaction,
        Class::Settings,
        Class::History,
        Class::DeployLog,
        Class::LockAndGuard,
    ];

    fn label(self) -> &'static str {
        match self {
            Class::Script => "script SQL (belay: + row, COMMIT)",
            Class::Transaction => "BEGIN/COMMIT/ROLLBACK",
            Class::Settings => "SET/RESET/DISCARD",
            Class::History => "history (read, write)",
            Class::DeployLog => "deployment log (events)",
            Class::LockAndGuard => "runner lock, lock guard",
        }
    }

    /// A message as the server logged it. belay's one message per transactional migration
    /// counts as the script's; a history row sent with COMMIT on its own (after a
    /// statement-by-statement script) counts as history.
    fn of(text: &str) -> Class {
        let lower = text.to_ascii_lowercase();
        let first = lower
            .trim_start()
            .split(|c: char| !c.is_ascii_alphabetic())
            .next()
            .unwrap_or("");
        // belay sends a transactional migration as one message: BEGIN with its SET LOCALs,
        // the script, the history row, COMMIT and the session reset. That message is the
        // script's (its history row and COMMIT ride along).
        let batched = matches!(first, "begin")
            && lower.lines().skip(1).any(|l| {
                let l = l.trim();
                !l.is_empty() && !l.starts_with("set local ")
            });
        if batched {
            return Class::Script;
        }
        if [
            "schema_history",
            "bench_history",
            "__diesel_schema",
            "_sqlx_migrations",
        ]
        .iter()
        .any(|t| lower.contains(t))
        {
            Class::History
        } else if lower.contains("deployment") {
            Class::DeployLog
        } else if [
            "advisory_",
            "pg_locks",
            "pg_stat_activity",
            "pg_backend_pid",
            "pg_cancel",
        ]
        .iter()
        .any(|t| lower.contains(t))
        {
            Class::LockAndGuard
        } else if matches!(first, "begin" | "commit" | "rollback" | "start" | "end") {
            Class::Transaction
        } else if matches!(first, "set" | "reset" | "discard" | "show") {
            Class::Settings
        } else {
            Class::Script
        }
    }
}

/// One phase of the breakdown run: its wall time and what the server logged.
type PhaseRun = (Phase, Duration, Logged);

#[derive(Default)]
struct Logged {
    /// (messages, server-side ms) per class.
    by_class: BTreeMap<Class, (usize, f64)>,
    /// Extended-protocol executions (parse/bind/execute count as one message).
    extended: usize,
    sessions: std::collections::BTreeSet<String>,
}

/// The server log lines written since `from`, folded into one entry per logged message:
/// `duration: X ms  statement: …` (simple query) or `… execute <name>: …` (extended).
fn read_log(path: &Path, from: u64) -> Result<Logged> {
    let bytes = fs::read(path).with_context(|| format!("could not read {}", path.display()))?;
    let text = String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default());
    let mut logged = Logged::default();
    let mut entries: Vec<(String, f64, String, bool)> = Vec::new();
    for line in text.lines() {
        if let Some(at) = line.find("LOG:  duration: ") {
            let rest = &line[at + "LOG:  duration: ".len()..];
            let Some((ms, what)) = rest.split_once(" ms  ") else {
                continue;
            };
            let ms: f64 = ms.trim().parse().unwrap_or(0.0);
            let pid = line[..at]
                .split('[')
                .nth(1)
                .and_then(|p| p.split(']').next())
                .unwrap_or("")
                .to_owned();
            let (kind, body) = what.split_once(": ").unwrap_or((what, ""));
            let extended = kind.starts_with("parse") || kind.starts_with("bind");
            let counted = kind.starts_with("statement") || kind.starts_with("execute");
            entries.push((pid, ms, body.to_owned(), counted || !extended));
            if extended || kind.starts_with("execute") {
                logged.extended += usize::from(kind.starts_with("execute"));
            }
        } else if let Some(last) = entries.last_mut()
            && (line.starts_with('\t') || !line.starts_with("20"))
        {
            last.2.push('\n');
            last.2.push_str(line);
        }
    }
    for (pid, ms, body, counted) in entries {
        logged.sessions.insert(pid);
        let e = logged.by_class.entry(Class::of(&body)).or_default();
        e.0 += usize::from(counted);
        e.1 += ms;
    }
    Ok(logged)
}

/// One more run of belay and psql, each on a database where the server logs every message
/// with its duration: what each side sends per migration and what the server spends on it.
/// The rest of the wall time is the client's (process start, reading files, waiting for
/// round trips). Logging slows both sides; compare the rows, not these walls with the
/// timed ones.
fn breakdown(
    cluster: &Cluster,
    pg_bin: &Path,
    sides: &[Side],
    dir: &Path,
    phases: &[Phase],
    n: usize,
    label: &str,
) -> Result<Vec<String>> {
    heading(&format!(
        "corpus {label}: breakdown run (every message logged)"
    ));
    let mut per_side: Vec<(&'static str, Vec<PhaseRun>)> = Vec::new();
    for side in sides {
        let db = cluster.create_database_blocking()?;
        belay_testkit::psql(
            &cluster.url("postgres"),
            &format!(
                "ALTER DATABASE {} SET log_min_duration_statement = 0",
                db.name
            ),
        )?;
        let mut results = Vec::new();
        for phase in phases {
            let from = fs::metadata(cluster.log_path()).map_or(0, |m| m.len());
            let mut cmd = side.command(*phase, pg_bin, dir, &db);
            let took = run(&mut cmd).with_context(|| describe(&cmd))?;
            // The server writes its log lines before it answers; the last is in the file.
            results.push((*phase, took, read_log(cluster.log_path(), from)?));
            if let Some(keep) = std::env::var_os("BENCH_KEEP_LOG") {
                // For a closer look: the server's log of this run, message by message.
                let keep = PathBuf::from(keep).join(format!(
                    "{label}-{}-{}.log",
                    side.name(),
                    phase.name()
                ));
                let all = fs::read(cluster.log_path()).context("could not read the log")?;
                fs::write(&keep, all.get(from as usize..).unwrap_or_default())
                    .with_context(|| format!("could not write {}", keep.display()))?;
            }
        }
        per_side.push((side.name(), results));
    }
    let mut lines = Vec::new();
    for (i, phase) in phases.iter().enumerate() {
        lines.push(format!(
            "corpus {label} {} breakdown, per migration (messages = round trips; ms = server time, all {n} migrations):",
            phase.name()
        ));
        let mut header = format!("  {:<34}", "");
        for (name, _) in &per_side {
            let _ = write!(header, " {name:>22}");
        }
        lines.push(header);
        for class in Class::ALL {
            let mut row = format!("  {:<34}", class.label());
            for (_, results) in &per_side {
                let (count, ms) = results[i]
                    .2
                    .by_class
                    .get(&class)
                    .copied()
                    .unwrap_or_default();
                let _ = write!(row, " {:>8.2} msg {:>8.0} ms", count as f64 / n as f64, ms);
            }
            lines.push(row);
        }
        let mut totals = format!("  {:<34}", "all messages (extended protocol)");
        let mut server = format!("  {:<34}", "server total; wall (logging on)");
        let mut client = format!("  {:<34}", "wall − server: client + latency");
        let mut sessions = format!("  {:<34}", "sessions");
        for (_, results) in &per_side {
            let (_, wall, logged) = &results[i];
            let count: usize = logged.by_class.values().map(|v| v.0).sum();
            let ms: f64 = logged.by_class.values().map(|v| v.1).sum();
            let _ = write!(
                totals,
                " {:>8.2} msg {:>11}",
                count as f64 / n as f64,
                format!("({})", logged.extended)
            );
            let wall_ms = wall.as_secs_f64() * 1000.0;
            let _ = write!(server, " {ms:>8.0} ms {wall_ms:>8.0} ms");
            let _ = write!(
                client,
                " {:>8.0} ms {:>8.2} ms/m",
                wall_ms - ms,
                (wall_ms - ms) / n as f64
            );
            let _ = write!(sessions, " {:>22}", logged.sessions.len());
        }
        lines.extend([totals, server, client, sessions]);
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_classed_by_what_they_do() {
        assert!(Class::of("BEGIN;\nSET LOCAL lock_timeout = '5s'") == Class::Transaction);
        assert!(
            Class::of(
                "BEGIN;\nSET LOCAL lock_timeout = '5s';\nCREATE TABLE a (id int);\n\
                 INSERT INTO belay.schema_history (x) VALUES (1);\nCOMMIT"
            ) == Class::Script
        );
        assert!(
            Class::of(
                "SET SESSION AUTHORIZATION DEFAULT;\nINSERT INTO belay.schema_history (x) VALUES (1);\nCOMMIT"
            ) == Class::History
        );
        assert!(Class::of("SELECT pg_try_advisory_lock($1, hashtext($2))") == Class::LockAndGuard);
        assert!(Class::of("RESET ALL; DISCARD TEMP") == Class::Settings);
        assert!(Class::of("CREATE TABLE t (id int)") == Class::Script);
    }

    #[test]
    fn the_down_baseline_reverts_newest_first_and_skips_missing_downs() -> Result<()> {
        let dir = tempfile::tempdir()?;
        for (folder, notx) in [("1_a", false), ("2_b", true), ("3_c", false)] {
            let path = dir.path().join(folder);
            fs::create_dir(&path)?;
            fs::write(path.join("up.sql"), "SELECT 1;\n")?;
            if folder != "3_c" {
                fs::write(path.join("down.sql"), "SELECT 2;\n")?;
            }
            if notx {
                fs::write(path.join("metadata.toml"), "run_in_transaction = false\n")?;
            }
        }
        let script = baseline_down_script(&forward_scripts(dir.path())?)?;
        let b = script.find("2_b/down.sql").context("2_b missing")?;
        let a = script.find("1_a/down.sql").context("1_a missing")?;
        assert!(b < a, "{script}");
        assert!(!script.contains("3_c"), "{script}");
        assert!(script.contains("DELETE FROM bench_history WHERE version = '1';\nCOMMIT;"));
        // The no-transaction one has no BEGIN around it.
        assert!(script.starts_with("\\i '"), "{script}");
        Ok(())
    }
}
