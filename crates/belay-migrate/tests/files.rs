//! A target given its files works from them for every call; one without reads its
//! directory at each call.

use std::sync::Arc;

use belay_core::DatabaseUrl;
use belay_migrate::{ApplyOptions, LocalTargets, MigrationApi, Target, TargetSpec};
use belay_testkit::Cluster;

fn scripts(plan: &belay_migrate::PlanView) -> Vec<String> {
    plan.steps.iter().map(|s| s.script.clone()).collect()
}

#[tokio::test]
async fn a_target_given_its_files_runs_them_whatever_the_directory_holds_since() {
    let db = Cluster::shared().create_database().await.expect("database");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("V1__a.sql"), "CREATE TABLE a (x int);\n").expect("write");
    std::fs::write(dir.path().join("V2__b.sql"), "CREATE TABLE b (x int);\n").expect("write");
    let spec = TargetSpec {
        name: "db".into(),
        url: DatabaseUrl::parse(&db.url).expect("url"),
        dir: dir.path().to_path_buf(),
        exec: Default::default(),
    };
    let set = belay_migrate::load(dir.path()).expect("load");
    let given = LocalTargets::new([spec.clone()]).with_files("db", Arc::new(set));
    let reading = LocalTargets::new([spec]);

    // The directory changes after the files were read.
    std::fs::remove_file(dir.path().join("V2__b.sql")).expect("remove");
    std::fs::write(dir.path().join("V3__c.sql"), "CREATE TABLE c (x int);\n").expect("write");

    let target = Target::default();
    let plan = given.plan("db", &target, false).await.expect("plan");
    assert_eq!(scripts(&plan), ["V1__a.sql", "V2__b.sql"]);
    let plan = reading.plan("db", &target, false).await.expect("plan");
    assert_eq!(scripts(&plan), ["V1__a.sql", "V3__c.sql"]);

    let report = given
        .apply(
            "db",
            &target,
            &ApplyOptions::default(),
            belay_migrate::events::discard(),
        )
        .await
        .expect("apply");
    assert_eq!(report.results.len(), 2);
    let tables = belay_testkit::psql(
        &db.url,
        "SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class \
         WHERE relname IN ('a', 'b', 'c') AND relkind = 'r'",
    )
    .expect("psql");
    assert_eq!(tables.trim(), "a,b");
}
