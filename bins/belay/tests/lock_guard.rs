//! `migrate` with the lock guard (`--max-blocking`, `--no-lock-guard`, `[execution]`) and
//! the notes every history row keeps (allowed lint, overridden checks, guard trips),
//! through the real binary.

mod support;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::*;

const SOON: Duration = Duration::from_secs(20);

/// Polls `sql` until it returns `want` (20 s at most): waiting for a state the server
/// shows, not for time to pass.
fn until(url: &str, sql: &str, want: &str) {
    let deadline = Instant::now() + SOON;
    while psql(url, sql) != want {
        assert!(Instant::now() < deadline, "{sql} never returned {want}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `status --output json` of the migration with `version`.
fn status_of(url: &str, dir: &std::path::Path, version: &str) -> serde_json::Value {
    belay_ok(url, dir, &["status", "--output", "json"])
        .json()
        .as_array()
        .and_then(|a| a.iter().find(|m| m["version"] == version).cloned())
        .unwrap_or_else(|| panic!("no status for {version}"))
}

#[test]
fn migrate_max_blocking_releases_the_application_and_records_the_trip() {
    let db = db();
    psql(
        &db.url,
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10);",
    );
    let dir = migrations(&[(
        "V1__c.sql",
        "-- belay:lock-timeout=30s\nALTER TABLE t ADD COLUMN c int;\n",
    )]);
    let mut blocker = Session::open(&db.url);
    let blocker_pid = blocker.pid();
    blocker.run("BEGIN; SELECT count(*) FROM t;");

    let mut child = belay_cmd(&db.url, dir.path())
        .args([
            "migrate",
            "--backup",
            "none",
            "--no-preflight",
            "--max-blocking",
            "300ms",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start belay");
    let (lines_tx, lines) = mpsc::channel();
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });

    // The migration queues behind the blocker; then an application query queues behind
    // the migration, and only the guard can let it through (the lock timeout is 30 s).
    until(
        &db.url,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'belay' AND wait_event_type = 'Lock'",
        "1",
    );
    let (app_tx, app_done) = mpsc::channel();
    let url = db.url.clone();
    std::thread::spawn(move || {
        let mut app = Session::open(&url);
        let _ = app_tx.send(app.run("SELECT count(*) FROM t;"));
    });
    let trip = loop {
        let line = lines
            .recv_timeout(SOON)
            .expect("belay printed no lock guard line");
        if line.contains("lock guard") {
            break line;
        }
    };
    assert!(trip.contains("V1__c.sql:2"), "{trip}");
    assert!(trip.contains(&format!("pid {blocker_pid}")), "{trip}");
    assert_eq!(
        app_done
            .recv_timeout(SOON)
            .expect("the application query stayed stuck"),
        vec!["10"]
    );
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 't' AND column_name = 'c'"
        ),
        "0",
        "nothing applied while the blocker holds its lock"
    );

    blocker.run("COMMIT;");
    let status = child.wait().expect("belay exits");
    assert!(status.success(), "belay migrate failed: {status}");
    let v1 = status_of(&db.url, dir.path(), "1");
    assert_eq!(v1["state"], "success");
    assert!(v1["lock_trips"].as_i64().is_some_and(|n| n >= 1), "{v1}");
    assert!(v1["retries"].as_i64().is_some_and(|n| n >= 1), "{v1}");
    let trip = &v1["notes"]["lock_guard_trips"][0];
    assert_eq!(trip["blockers"][0]["pid"], blocker_pid, "{v1}");
    assert!(
        // Polled every 60 ms (a fifth of 300 ms), tripped at the last poll before a wait
        // would pass the budget.
        trip["longest_wait_ms"].as_u64().is_some_and(|ms| ms > 240),
        "{v1}"
    );
    assert_eq!(
        psql(
            &db.url,
            "SELECT lock_trips > 0 AND jsonb_array_length(notes->'lock_guard_trips') = lock_trips FROM belay.schema_history"
        ),
        "t"
    );
}

#[test]
fn notes_record_allowed_lint_and_overridden_checks() {
    let db = db();
    psql(&db.url, "CREATE TABLE t (a int);");
    let dir = migrations(&[
        (
            "V1__rename.sql",
            "-- belay:allow=rename a view keeps the old name for old readers\nALTER TABLE t RENAME COLUMN a TO b;\n",
        ),
        ("V2__plain.sql", "CREATE TABLE u (id int);\n"),
    ]);
    // Every connection counts against max_connections: with these thresholds the
    // `connections` check always blocks, so the run needs an override.
    let cfg_dir = tempfile::tempdir().expect("tempdir");
    let cfg = cfg_dir.path().join("belay.toml");
    std::fs::write(
        &cfg,
        "[execution]\nmax_blocking = \"2s\"\n[preflight]\nconnections_warn_percent = 0.0\nconnections_block_percent = 0.0\n",
    )
    .expect("write belay.toml");
    let cfg = cfg.to_string_lossy().into_owned();
    let r = belay(
        &db.url,
        dir.path(),
        &["--config", &cfg, "migrate", "--backup", "none"],
    );
    assert_eq!(r.code, 2, "the check blocks without an override: {r:?}");
    belay_ok(
        &db.url,
        dir.path(),
        &[
            "--config",
            &cfg,
            "migrate",
            "--backup",
            "none",
            "--override-check",
            "connections",
            "--reason",
            "pooler rollout, see OPS-12 (it's \"fine\")",
        ],
    );
    let override_note = serde_json::json!([{
        "check": "connections",
        "reason": "pooler rollout, see OPS-12 (it's \"fine\")",
    }]);
    let v1 = status_of(&db.url, dir.path(), "1");
    assert_eq!(
        v1["notes"]["allowed_lint"]["rename"], "a view keeps the old name for old readers",
        "{v1}"
    );
    assert_eq!(v1["notes"]["overrides"], override_note, "{v1}");
    assert_eq!(v1["lock_trips"], 0);
    assert!(v1["notes"].get("lock_guard_trips").is_none(), "{v1}");
    let v2 = status_of(&db.url, dir.path(), "2");
    assert_eq!(
        v2["notes"]["overrides"], override_note,
        "every row of the run"
    );
    assert!(v2["notes"].get("allowed_lint").is_none(), "{v2}");

    // A run with nothing to say leaves notes NULL.
    std::fs::write(
        dir.path().join("V3__more.sql"),
        "CREATE TABLE w (id int);\n",
    )
    .expect("write V3");
    belay_ok(&db.url, dir.path(), &["migrate", "--backup", "none"]);
    assert_eq!(
        psql(
            &db.url,
            "SELECT notes IS NULL FROM belay.schema_history WHERE version = '3'"
        ),
        "t"
    );
    assert!(status_of(&db.url, dir.path(), "3")["notes"].is_null());
}

#[test]
fn lock_guard_flags_are_checked() {
    let db = db();
    let dir = migrations(&[("V1__t.sql", "CREATE TABLE t (id int);\n")]);
    for (args, want) in [
        (
            &["migrate", "--max-blocking", "0s"][..],
            "--max-blocking: must be greater than zero",
        ),
        (&["migrate", "--max-blocking", "soon"][..], "--max-blocking"),
        (
            &["migrate", "--no-lock-guard", "--max-blocking", "1s"][..],
            "cannot be used with",
        ),
    ] {
        let r = belay(&db.url, dir.path(), args);
        assert_eq!(r.code, 64, "{args:?}: {r:?}");
        assert!(r.stderr.contains(want), "{args:?}: {r:?}");
    }
    assert_eq!(
        psql(&db.url, "SELECT to_regclass('t') IS NULL"),
        "t",
        "nothing ran"
    );
    // Without the guard the migration runs as before.
    belay_ok(
        &db.url,
        dir.path(),
        &["migrate", "--backup", "none", "--no-lock-guard"],
    );
    assert_eq!(
        states(&db.url, dir.path()),
        vec![("1".into(), "success".into())]
    );
}
