//! Errors PostgreSQL raises outside a script are shown with its message only: sqlx's
//! `Display` adds "at line N", the line of PostgreSQL's C source, which users read as a
//! line of their SQL.

use belay_core::DatabaseUrl;
use belay_migrate::{LocalTargets, MigrationApi, TargetSpec};
use belay_testkit::Cluster;

#[tokio::test]
async fn a_server_error_names_no_postgres_source_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("V1__a.sql"), "CREATE TABLE a (x int);\n").expect("write");
    let url = Cluster::shared().url("no_such_database_here");
    let api = LocalTargets::new([TargetSpec {
        name: "db".into(),
        url: DatabaseUrl::parse(&url).expect("url"),
        dir: dir.path().to_path_buf(),
        exec: Default::default(),
    }]);
    let err = api
        .status("db")
        .await
        .expect_err("the database does not exist");
    assert!(
        err.message
            .contains("database \"no_such_database_here\" does not exist"),
        "{}",
        err.message
    );
    assert!(!err.message.contains(" at line "), "{}", err.message);
}
