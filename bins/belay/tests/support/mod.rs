//! Helpers for running the real `belay` binary against throwaway databases.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use belay_testkit::{Cluster, TestDb};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};

pub const BELAY: &str = env!("CARGO_BIN_EXE_belay");

pub fn db() -> TestDb {
    Cluster::shared()
        .create_database_blocking()
        .expect("create a test database")
}

/// A `belay` command aimed at `url` and `dir`, with no ambient configuration.
pub fn belay_cmd(url: &str, dir: &Path) -> Command {
    let mut c = Command::new(BELAY);
    c.env("BELAY_DATABASE_URL", url)
        .env_remove("DATABASE_URL")
        .env_remove("BELAY_LOG")
        .env("BELAY_BACKUP_DIR", default_backup_dir())
        .arg("--dir")
        .arg(dir)
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null());
    c
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn to_run(o: Output) -> Run {
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

pub fn belay(url: &str, dir: &Path, args: &[&str]) -> Run {
    to_run(belay_cmd(url, dir).args(args).output().expect("run belay"))
}

/// Runs belay and asserts it exited 0.
pub fn belay_ok(url: &str, dir: &Path, args: &[&str]) -> Run {
    let r = belay(url, dir, args);
    assert_eq!(r.code, 0, "belay {args:?} failed: {r:?}");
    r
}

pub fn psql(url: &str, sql: &str) -> String {
    belay_testkit::psql(url, sql)
        .unwrap_or_else(|e| panic!("psql {sql}: {e}"))
        .trim()
        .to_string()
}

/// The schema as `pg_dump` prints it, without belay's own history schema and without
/// comments and the random `\restrict` lines of newer pg_dump versions.
pub fn schema(url: &str) -> String {
    let bin: PathBuf = belay_testkit::bin_dir().expect("postgres binaries");
    let out = Command::new(bin.join("pg_dump"))
        .args([
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--exclude-schema=belay",
            "--dbname",
            url,
        ])
        .output()
        .expect("run pg_dump");
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            !l.starts_with("--") && !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Writes `files` (relative path → content) into a fresh temp dir.
pub fn migrations(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    for (name, body) in files {
        let p = d.path().join(name);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, body).expect("write migration");
    }
    d
}

/// `state` of each migration from `status --output json`, as (version, state).
pub fn states(url: &str, dir: &Path) -> Vec<(String, String)> {
    let r = belay_ok(url, dir, &["status", "--output", "json"]);
    r.json()
        .as_array()
        .expect("status array")
        .iter()
        .map(|m| {
            (
                m["version"].as_str().unwrap_or("R").to_string(),
                m["state"].as_str().expect("state").to_string(),
            )
        })
        .collect()
}

pub fn history_schema_exists(url: &str) -> bool {
    psql(
        url,
        "SELECT count(*) FROM pg_namespace WHERE nspname = 'belay'",
    ) == "1"
}

pub fn cluster() -> &'static Cluster {
    Cluster::shared()
}

/// Where backups go when a test names no `--backup-dir` (`migrate` takes one by default):
/// under cargo's per-target temp dir rather than the working directory.
pub fn default_backup_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("belay-backups")
}

/// `belay --backup-dir <backups> ARGS`.
pub fn belay_b(url: &str, dir: &Path, backups: &Path, args: &[&str]) -> Run {
    let mut all = vec!["--backup-dir", backups.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    belay(url, dir, &all)
}

/// Like [`belay_b`], asserting exit 0.
pub fn belay_b_ok(url: &str, dir: &Path, backups: &Path, args: &[&str]) -> Run {
    let r = belay_b(url, dir, backups, args);
    assert_eq!(r.code, 0, "belay {args:?} failed: {r:?}");
    r
}

/// A psql session a test drives line by line: it holds locks, or sends a statement that
/// blocks, while belay looks.
pub struct Session {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<std::process::ChildStdout>,
}

impl Session {
    pub fn open(url: &str) -> Session {
        let bin = belay_testkit::bin_dir().expect("postgres binaries");
        let mut child = Command::new(bin.join("psql"))
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start psql");
        let stdin = child.stdin.take().expect("stdin");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        Session { child, stdin, out }
    }

    /// Runs `sql`, then returns its output lines once the server has answered.
    pub fn run(&mut self, sql: &str) -> Vec<String> {
        writeln!(self.stdin, "{sql}\n\\echo __done__").expect("write to psql");
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            assert!(
                self.out.read_line(&mut line).expect("read psql") > 0,
                "psql exited"
            );
            let line = line.trim_end().to_string();
            if line == "__done__" {
                return lines;
            }
            lines.push(line);
        }
    }

    /// Sends `sql` without waiting for an answer (it is expected to block).
    pub fn send(&mut self, sql: &str) {
        writeln!(self.stdin, "{sql}").expect("write to psql");
        self.stdin.flush().expect("flush psql");
    }

    pub fn pid(&mut self) -> i64 {
        self.run("SELECT pg_backend_pid();")[0]
            .parse()
            .expect("a pid")
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `belay migrate ARGS --output json`, then `belay history --output json`: the run (any
/// exit code) and the deployment log as `belay history` prints it, for end-to-end tests of
/// what a deployment leaves on record.
pub fn migrate_then_history(url: &str, dir: &Path, args: &[&str]) -> (Run, serde_json::Value) {
    let mut all = vec!["migrate", "--output", "json"];
    all.extend_from_slice(args);
    let run = belay(url, dir, &all);
    let history = belay_ok(url, dir, &["history", "--output", "json"]).json();
    (run, history)
}
