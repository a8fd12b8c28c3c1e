//! A command's calls hand each other their session (`LocalTargets::reusing_sessions`):
//! the plan's read leaves it, the run takes it, and a session the server has dropped
//! meanwhile is replaced, not used.

use belay_core::DatabaseUrl;
use belay_migrate::{ApplyOptions, LocalTargets, MigrationApi, Target, TargetSpec};
use belay_testkit::Cluster;
use sqlx::Connection as _;

/// The belay sessions connected to the test's database (the one left by a read).
async fn belay_sessions(admin: &mut sqlx::PgConnection) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
          WHERE datname = current_database() AND application_name = 'belay' ORDER BY pid",
    )
    .fetch_all(admin)
    .await
    .expect("pg_stat_activity")
}

/// A database, one migration that records the session it ran in (`ran_in`), a target
/// reusing sessions, and an admin session.
async fn setup() -> (
    belay_testkit::TestDb,
    tempfile::TempDir,
    LocalTargets,
    sqlx::PgConnection,
) {
    let db = Cluster::shared().create_database().await.expect("database");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("V1__pid.sql"),
        "CREATE TABLE ran_in AS SELECT pg_backend_pid() AS pid;\n",
    )
    .expect("write");
    let spec = TargetSpec {
        name: "db".into(),
        url: DatabaseUrl::parse(&db.url).expect("url"),
        dir: dir.path().to_path_buf(),
        exec: Default::default(),
    };
    let api = LocalTargets::new([spec]).reusing_sessions();
    let admin = sqlx::PgConnection::connect(&db.url).await.expect("admin");
    (db, dir, api, admin)
}

#[tokio::test]
async fn the_run_takes_the_session_its_plan_read_with() {
    let (_db, _dir, api, mut admin) = setup().await;

    api.plan("db", &Target::default(), false)
        .await
        .expect("plan");
    let left = belay_sessions(&mut admin).await;
    assert_eq!(left.len(), 1, "the plan leaves its session: {left:?}");

    api.apply(
        "db",
        &Target::default(),
        &ApplyOptions::default(),
        belay_migrate::events::discard(),
    )
    .await
    .expect("apply");
    let ran_in: i32 = sqlx::query_scalar("SELECT pid FROM ran_in")
        .fetch_one(&mut admin)
        .await
        .expect("ran_in");
    assert_eq!(ran_in, left[0], "the run used the plan's session");

    // After a run, reads keep no session: what follows it (a watch window) would hold
    // an idle one until the command ends.
    api.status("db").await.expect("status");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let left = belay_sessions(&mut admin).await;
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a session stays after the run: {left:?}"
        );
    }
}

#[tokio::test]
async fn a_kept_session_the_server_dropped_is_replaced() {
    let (_db, _dir, api, mut admin) = setup().await;

    api.status("db").await.expect("status");
    let left = belay_sessions(&mut admin).await;
    assert_eq!(left.len(), 1, "{left:?}");
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 10000)")
        .bind(left[0])
        .fetch_one(&mut admin)
        .await
        .expect("terminate");
    assert!(terminated);

    let report = api
        .apply(
            "db",
            &Target::default(),
            &ApplyOptions::default(),
            belay_migrate::events::discard(),
        )
        .await
        .expect("the run opens a session of its own");
    assert_eq!(report.results.len(), 1);
    let ran_in: i32 = sqlx::query_scalar("SELECT pid FROM ran_in")
        .fetch_one(&mut admin)
        .await
        .expect("ran_in");
    assert_ne!(ran_in, left[0]);
}
