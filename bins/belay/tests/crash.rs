//! Fault injection on a dedicated cluster: belay killed with SIGKILL mid-migration.

mod support;
use belay_testkit::Cluster;
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::*;

/// Polls an observable condition (not a fixed sleep) with a deadline.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kill_9_during_a_no_transaction_migration_is_failed_refused_then_repaired() {
    let cluster = Cluster::start().expect("dedicated cluster");
    let db = cluster.create_database_blocking().expect("database");
    let dir = migrations(&[
        ("V1__ok.sql", "CREATE TABLE ok (id int);"),
        (
            "V2__slow_index.sql",
            "-- belay:no-transaction\nSELECT pg_sleep(60);\n",
        ),
    ]);
    let mut child = belay_cmd(&db.url, dir.path())
        .arg("migrate")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn belay");
    wait_for("the running row of V2", || {
        psql(
            &db.url,
            "SELECT (to_regclass('belay.schema_history') IS NOT NULL)::int",
        ) == "1"
            && psql(
                &db.url,
                "SELECT count(*) FROM belay.schema_history WHERE version = '2' AND state = 'running'",
            ) == "1"
    });
    child.kill().expect("SIGKILL belay");
    child.wait().expect("reap belay");

    // The server notices the dead client (client_connection_check_interval) and frees the
    // runner lock; from then on the interrupted migration reads as failed, not running.
    wait_for("status to show V2 failed", || {
        states(&db.url, dir.path())
            .get(1)
            .is_some_and(|(_, s)| s == "failed")
    });
    let s = states(&db.url, dir.path());
    assert_eq!(s[0], ("1".into(), "success".into()));

    // `check preflight` reports it; `migrate` refuses it in the executor.
    let r = belay(&db.url, dir.path(), &["check", "preflight"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stdout.contains("BLOCK failed_migrations") && r.stdout.contains("V2__slow_index.sql"),
        "{r:?}"
    );
    let r = belay(&db.url, dir.path(), &["migrate"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .contains("migration 2 (V2__slow_index.sql) failed or was interrupted"),
        "{r:?}"
    );
    assert!(r.stderr.contains("belay repair"), "{r:?}");

    let r = belay_ok(&db.url, dir.path(), &["repair"]);
    assert!(
        r.stdout.contains("repaired 2 (V2__slow_index.sql)"),
        "{r:?}"
    );
    assert_eq!(states(&db.url, dir.path())[1].1, "pending");
    std::fs::write(
        dir.path().join("V2__slow_index.sql"),
        "-- belay:no-transaction\nCREATE INDEX CONCURRENTLY ok_id_idx ON ok (id);\n",
    )
    .unwrap();
    belay_ok(&db.url, dir.path(), &["migrate"]);
    assert_eq!(states(&db.url, dir.path())[1].1, "success");
    // The interrupted attempt stays on record.
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*) FROM belay.schema_history WHERE state = 'repaired'"
        ),
        "1"
    );
}

#[test]
fn failed_concurrent_index_build_leaves_no_invalid_index() {
    let cluster = Cluster::start().expect("dedicated cluster");
    let db = cluster.create_database_blocking().expect("database");
    psql(
        &db.url,
        "CREATE TABLE dup (v int); INSERT INTO dup VALUES (1), (1)",
    );
    let dir = migrations(&[(
        "V1__unique.sql",
        "-- belay:no-transaction\nCREATE UNIQUE INDEX CONCURRENTLY dup_v_key ON dup (v);\n",
    )]);
    let r = belay(&db.url, dir.path(), &["migrate"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("V1__unique.sql:2") && r.stderr.contains("could not create unique index"),
        "{r:?}"
    );
    assert!(
        r.stdout.contains("dropped INVALID index public.dup_v_key"),
        "{r:?}"
    );
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*) FROM pg_index WHERE NOT indisvalid"
        ),
        "0"
    );
    assert_eq!(states(&db.url, dir.path())[0].1, "failed");
}
