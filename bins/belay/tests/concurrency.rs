//! Runners racing each other, a runner blocked by another, and a migration waiting on a
//! lock held by the application.

mod support;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use support::*;

#[test]
fn four_concurrent_runners_apply_each_migration_exactly_once() {
    let db = db();
    let files: Vec<(String, String)> = (1..=8)
        .map(|i| {
            (
                format!("V{i}__t{i}.sql"),
                format!("CREATE TABLE t{i} (id int);\nSELECT pg_sleep(0.05);\n"),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let dir = migrations(&refs);
    let children: Vec<Child> = (0..4)
        .map(|_| {
            belay_cmd(&db.url, dir.path())
                .arg("migrate")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn belay")
        })
        .collect();
    let mut applied_total = 0;
    for c in children {
        let o = c.wait_with_output().expect("wait belay");
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{stdout}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        applied_total += stdout
            .lines()
            .filter(|l| l.starts_with("applied V"))
            .count();
    }
    assert_eq!(
        applied_total, 8,
        "each migration applied by exactly one runner"
    );
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*), count(DISTINCT version) FROM belay.schema_history WHERE success"
        ),
        "8|8"
    );
}

#[test]
fn a_second_runner_names_the_holder_or_exits_0_when_nothing_is_left() {
    let db = db();
    let dir = migrations(&[("V1__a.sql", "CREATE TABLE a (id int);")]);
    let mut holder = Session::open(&db.url);
    let pid = holder
        .run("SELECT pg_backend_pid(); SELECT pg_advisory_lock(1650814049, hashtext('belay'));")[0]
        .clone();

    let r = belay(&db.url, dir.path(), &["migrate", "--runner-wait", "300ms"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr.contains(&format!("pid {pid}")),
        "holder pid {pid} not named: {r:?}"
    );
    assert!(r.stderr.contains(" since "), "{r:?}");
    assert!(r.stdout.contains("waiting: another belay runner"), "{r:?}");

    holder.run("SELECT pg_advisory_unlock_all();");
    belay_ok(&db.url, dir.path(), &["migrate"]);
    holder.run("SELECT pg_advisory_lock(1650814049, hashtext('belay'));");
    let r = belay_ok(&db.url, dir.path(), &["migrate", "--runner-wait", "300ms"]);
    assert!(r.stdout.contains("nothing to do"), "{r:?}");
}

#[test]
fn a_migration_blocked_by_a_reader_retries_without_stalling_other_readers() {
    let db = db();
    psql(
        &db.url,
        "CREATE TABLE accounts (id int PRIMARY KEY, balance int); INSERT INTO accounts SELECT g, 0 FROM generate_series(1, 100) g",
    );
    // Two statements, sent to the server in one message with the script's BEGIN.
    let dir = migrations(&[(
        "V1__add_column.sql",
        "CREATE TABLE audit (id int);\n\nALTER TABLE accounts ADD COLUMN note text;\n",
    )]);

    // The application holds ACCESS SHARE on accounts in an open transaction.
    let mut holder = Session::open(&db.url);
    let holder_pid = holder.pid();
    holder.run("BEGIN; SELECT count(*) FROM accounts;");

    let mut migrate = belay_cmd(&db.url, dir.path())
        .arg("migrate")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn belay");
    let mut out = BufReader::new(migrate.stdout.take().expect("stdout"));
    // belay's ALTER waits in the lock queue; with nobody behind it, it keeps its place.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while psql(
        &db.url,
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'accounts'::regclass",
    ) != "1"
    {
        assert!(std::time::Instant::now() < deadline, "belay never queued");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let waiting = psql(
        &db.url,
        "SELECT a.query FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid \
         WHERE NOT l.granted AND l.relation = 'accounts'::regclass",
    );
    assert!(
        waiting.starts_with("BEGIN;")
            && waiting.contains("CREATE TABLE audit")
            && waiting.contains("ALTER TABLE accounts"),
        "one message from BEGIN to the script's last statement: {waiting}"
    );

    // New readers arriving while belay waits are not stuck behind its ALTER: the lock
    // guard gives way as soon as one has queued behind it for max_blocking, so each
    // finishes well inside a 1 s statement_timeout (a naive ALTER would hold them until
    // the holder commits).
    let mut reader = Session::open(&db.url);
    for _ in 0..5 {
        let r = reader.run("SET statement_timeout = '1s'; SELECT count(*) FROM accounts;");
        assert_eq!(r, ["100"]);
    }
    let mut seen = String::new();
    // The event that proves belay's ALTER gave up its place, naming the holder.
    loop {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).expect("read belay") > 0,
            "belay ended early: {seen}"
        );
        seen.push_str(&line);
        if line.contains("lock guard:") {
            break;
        }
    }
    // The trip names the statement the guard's cancel failed, not the message's first.
    assert!(seen.contains("V1__add_column.sql:3"), "{seen}");
    assert!(
        seen.contains(&format!("blocked by pid {holder_pid} (")),
        "{seen}"
    );

    holder.run("COMMIT;");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).expect("read belay");
    let o = migrate.wait_with_output().expect("wait belay");
    assert_eq!(
        o.status.code(),
        Some(0),
        "{:?} {seen}{rest}{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(rest.contains("applied V1__add_column.sql"), "{rest}");
    // The trip reaches the user once, as belay's own line; the guard's log record of it
    // is for daemons' logs, below the CLI's default filter.
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("lock guard cancelled the migration"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let row = psql(
        &db.url,
        "SELECT retries > 0, lock_wait_ms > 0 FROM belay.schema_history WHERE version = '1'",
    );
    assert_eq!(row, "t|t", "retries and lock wait must be recorded");
    let r = belay_ok(&db.url, dir.path(), &["status", "--output", "json"]);
    let m = &r.json()[0];
    assert!(m["retries"].as_i64().unwrap_or(0) > 0, "{m}");
    assert!(m["lock_wait_ms"].as_i64().unwrap_or(0) > 0, "{m}");
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'accounts' AND column_name = 'note'"
        ),
        "1"
    );
}

#[test]
fn lock_retries_are_bounded_and_the_final_error_names_the_budget() {
    let db = db();
    psql(&db.url, "CREATE TABLE busy (id int)");
    let dir = migrations(&[("V1__alter.sql", "ALTER TABLE busy ADD COLUMN x int;")]);
    let mut holder = Session::open(&db.url);
    holder.run("BEGIN; SELECT * FROM busy;");
    let r = belay(
        &db.url,
        dir.path(),
        // Unguarded, lock_timeout is what gives way.
        &[
            "migrate",
            "--no-lock-guard",
            "--lock-timeout",
            "20ms",
            "--max-attempts",
            "3",
        ],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("V1__alter.sql:1: gave up after 3 attempts"),
        "{r:?}"
    );
    assert!(r.stderr.contains("lock_timeout 20ms"), "{r:?}");
    assert_eq!(r.stdout.matches("lock not granted").count(), 2, "{r:?}");
    assert_eq!(states(&db.url, dir.path())[0].1, "pending");
    holder.run("COMMIT;");
}
