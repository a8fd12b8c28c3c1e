//! The health commands and the checks around `migrate`, against real PostgreSQL and a
//! real local HTTP server.

mod support;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use support::*;

/// An HTTP server on a free port that answers every request with `status`.
fn http_server(status: u16) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let body = format!(
                "{{\"status\":\"{}\"}}",
                if status < 400 { "ok" } else { "down" }
            );
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}/health")
}

fn config(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    let p = dir.join("belay.toml");
    std::fs::write(&p, body).expect("write config");
    p
}

#[test]
fn preflight_reports_every_check_and_blocks_migrate_until_overridden() {
    let db = db();
    psql(&db.url, "CREATE TABLE busy (id int)");
    let dir = migrations(&[("V1__other.sql", "CREATE TABLE other (id int);")]);
    let r = belay_ok(
        &db.url,
        dir.path(),
        &["check", "preflight", "--output", "json"],
    );
    let checks = r.json();
    let names: Vec<&str> = checks
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for want in [
        "connectivity",
        "disk_space",
        "connections",
        "long_running_queries",
        "idle_in_transaction",
        "lock_waits",
        "replication_lag",
        "pending_migrations",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for c in checks.as_array().unwrap() {
        for field in ["name", "status", "value", "threshold", "remedy"] {
            assert!(c.get(field).is_some(), "{field} missing in {c}");
        }
    }

    // A session waits on a lock: preflight blocks (threshold lowered for the test).
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config(cfg_dir.path(), "[preflight]\nlock_wait_block = \"50ms\"\n");
    let bin = belay_testkit::bin_dir().unwrap();
    let mut holder = Command::new(bin.join("psql"))
        .args(["-X", "-q", "-At", "-d", &db.url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut hin = holder.stdin.take().unwrap();
    let mut hout = BufReader::new(holder.stdout.take().unwrap());
    writeln!(
        hin,
        "BEGIN; LOCK TABLE busy IN ACCESS EXCLUSIVE MODE; \\echo locked"
    )
    .unwrap();
    let mut line = String::new();
    hout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "locked");
    let mut waiter = Command::new(bin.join("psql"))
        .args([
            "-X",
            "-q",
            "-At",
            "-d",
            &db.url,
            "-c",
            "SELECT count(*) FROM busy",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let cfg_s = cfg.to_string_lossy().into_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let r = loop {
        let r = belay(
            &db.url,
            dir.path(),
            &["--config", &cfg_s, "check", "preflight"],
        );
        if r.code != 0 || std::time::Instant::now() > deadline {
            break r;
        }
    };
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stdout.contains("BLOCK lock_waits"), "{r:?}");

    let r = belay(
        &db.url,
        dir.path(),
        &["--config", &cfg_s, "migrate", "--backup", "none"],
    );
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("preflight blocked by: lock_waits"),
        "{r:?}"
    );
    assert!(r.stderr.contains("--override-check"), "{r:?}");
    assert_eq!(psql(&db.url, "SELECT to_regclass('other') IS NULL"), "t");

    let r = belay(
        &db.url,
        dir.path(),
        &[
            "--config",
            &cfg_s,
            "migrate",
            "--backup",
            "none",
            "--override-check",
            "lock_waits",
        ],
    );
    assert_eq!(r.code, 64, "an override needs a reason: {r:?}");
    let r = belay(
        &db.url,
        dir.path(),
        &[
            "--config",
            &cfg_s,
            "migrate",
            "--backup",
            "none",
            "--override-check",
            "lock_waits",
            "--reason",
            "waiter is a known batch job",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stderr
            .contains("preflight check lock_waits overridden: waiter is a known batch job"),
        "{r:?}"
    );
    writeln!(hin, "COMMIT;").unwrap();
    drop(hin);
    let _ = holder.wait();
    let _ = waiter.wait();
}

#[test]
fn postflight_catches_invalid_indexes_and_failing_assertions() {
    let db = db();
    let dir = migrations(&[(
        "V1__t.sql",
        "CREATE TABLE t (v int);\nINSERT INTO t VALUES (1), (1);",
    )]);
    belay_ok(&db.url, dir.path(), &["migrate", "--backup", "none"]);
    belay_ok(&db.url, dir.path(), &["check", "postflight"]);
    let _ = belay_testkit::psql(&db.url, "CREATE UNIQUE INDEX CONCURRENTLY t_v_key ON t (v)");
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config(
        cfg_dir.path(),
        "[[checks]]\nname = \"no_duplicate_v\"\nquery = \"SELECT v FROM t GROUP BY v HAVING count(*) > 1\"\nexpect = \"no_rows\"\n",
    );
    let r = belay(
        &db.url,
        dir.path(),
        &[
            "--config",
            &cfg.to_string_lossy(),
            "check",
            "postflight",
            "--output",
            "json",
        ],
    );
    assert_eq!(r.code, 2, "{r:?}");
    let doc = r.json();
    let find = |n: &str| {
        doc.as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(find("invalid_indexes")["status"], "block", "{doc}");
    assert!(
        find("invalid_indexes")["value"]
            .as_str()
            .unwrap_or("")
            .contains("t_v_key"),
        "{doc}"
    );
    assert_eq!(find("no_duplicate_v")["status"], "block", "{doc}");
    assert_eq!(find("history")["status"], "pass", "{doc}");
}

#[test]
fn probes_fail_after_the_threshold_with_evidence() {
    let dir = migrations(&[]);
    let ok = http_server(200);
    let r = belay(
        "postgres://unused@127.0.0.1:1/x",
        dir.path(),
        &["probe", "http", &ok, "--period", "50ms", "--for", "300ms"],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let bad = http_server(503);
    let r = belay(
        "postgres://unused@127.0.0.1:1/x",
        dir.path(),
        &[
            "probe",
            "http",
            &bad,
            "--period",
            "50ms",
            "--failure-threshold",
            "3",
        ],
    );
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stderr
            .contains("crossed its failure threshold (3 consecutive failures)"),
        "{r:?}"
    );
    assert!(r.stderr.contains("503"), "evidence: {r:?}");
    // Nothing listens on port 1: a refused connection is a failure, never a pass.
    let r = belay(
        "postgres://unused@127.0.0.1:1/x",
        dir.path(),
        &[
            "probe",
            "http",
            "http://127.0.0.1:1/",
            "--period",
            "50ms",
            "--failure-threshold",
            "2",
        ],
    );
    assert_eq!(r.code, 4, "{r:?}");
}

#[test]
fn migrate_watch_exits_non_zero_when_a_probe_fails_in_the_window() {
    let db = db();
    let dir = migrations(&[("V1__t.sql", "CREATE TABLE t (id int);")]);
    let bad = http_server(500);
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config(
        cfg_dir.path(),
        &format!(
            "[[probes]]\nname = \"api\"\nperiod = \"50ms\"\nfailure_threshold = 2\n[probes.http]\nurl = \"{bad}\"\n"
        ),
    );
    let r = belay(
        &db.url,
        dir.path(),
        &[
            "--config",
            &cfg.to_string_lossy(),
            "migrate",
            "--backup",
            "none",
            "--watch",
            "30s",
        ],
    );
    assert_eq!(r.code, 4, "{r:?}");
    assert!(r.stdout.contains("applied V1__t.sql"), "{r:?}");
    assert!(
        r.stderr.contains("probe api crossed its failure threshold"),
        "{r:?}"
    );
    let ok = http_server(200);
    let cfg = config(
        cfg_dir.path(),
        &format!("[[probes]]\nname = \"api\"\nperiod = \"50ms\"\n[probes.http]\nurl = \"{ok}\"\n"),
    );
    let r = belay(
        &db.url,
        dir.path(),
        &[
            "--config",
            &cfg.to_string_lossy(),
            "migrate",
            "--backup",
            "none",
            "--watch",
            "300ms",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("healthy"), "{r:?}");
}

#[test]
fn preflight_names_a_session_holding_a_table_the_pending_migration_locks() {
    let db = db();
    psql(&db.url, "CREATE TABLE accounts (id int)");
    let dir = migrations(&[("V1__note.sql", "ALTER TABLE accounts ADD COLUMN note text;")]);
    let mut holder = Session::open(&db.url);
    let pid = holder.pid();
    holder.run("BEGIN; SELECT count(*) FROM accounts;");
    let r = belay_ok(
        &db.url,
        dir.path(),
        &["check", "preflight", "--output", "json"],
    );
    let checks = r.json();
    let c = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "table_locks")
        .cloned()
        .unwrap_or_else(|| panic!("no table_locks check: {checks}"));
    assert_eq!(c["status"], "warn", "{c}");
    let value = c["value"].as_str().unwrap_or_default();
    assert!(
        value.contains(&format!("pid {pid}")) && value.contains("AccessShareLock on accounts"),
        "{c}"
    );
    holder.run("COMMIT;");
}
