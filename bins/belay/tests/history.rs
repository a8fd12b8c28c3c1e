//! `belay history` and local `belay deployments list|show` read the deployment log in the
//! database's history schema: as `belay migrate`'s pipeline writes it, and (for the cases
//! a run cannot produce on demand, such as two ids sharing a prefix) as tests write it
//! through `HistoryDeploymentLog`.

mod support;
use belay_deploy::{DeploymentLog, NewDeployment};
use belay_guards::HistoryDeploymentLog;
use chrono::{DateTime, Utc};
use support::*;
use uuid::Uuid;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn log(url: &str) -> HistoryDeploymentLog {
    HistoryDeploymentLog::new(url.parse().expect("url"), "belay").expect("log")
}

fn new_deployment(id: Uuid, at: DateTime<Utc>) -> NewDeployment {
    NewDeployment {
        id,
        target: "local".into(),
        started_at: at,
        environment: Some("staging".into()),
        requested_by: Some("alice".into()),
        release: Some("1.6.0".into()),
        from_version: None,
        to_version: None,
        policy: serde_json::json!({ "backup": "none" }),
    }
}

const BAD: &str = "CREATE TABLE two (id int);\nSELEC 1;\n";

#[test]
fn history_and_deployments_show_a_failed_attempt_with_its_file_and_line() {
    let db = db();
    let dir = migrations(&[
        ("V1__one.sql", "CREATE TABLE one (id int);"),
        ("V2__bad.sql", BAD),
    ]);
    let (run, before) = migrate_then_history(
        &db.url,
        dir.path(),
        &["--no-lint", "--backup", "none", "--release", "1.6.0"],
    );
    assert_eq!(run.code, 1, "{run:?}");
    // The pipeline recorded the run itself, the failed attempt included, although the
    // failed migration's transaction left no history row.
    let id: Uuid = before["deployments"][0]["id"]
        .as_str()
        .expect("the run is on record")
        .parse()
        .expect("uuid");
    let prefix = &id.to_string()[..8];
    // The history row of what the run applied names it, as `status` shows.
    let status = belay_ok(&db.url, dir.path(), &["status", "--output", "json"]).json();
    assert_eq!(status[0]["deployment_id"], id.to_string(), "{status}");
    assert!(
        status[0].get("backup_id").is_some_and(|b| b.is_null()),
        "{status}"
    );
    assert!(status[1]["deployment_id"].is_null(), "pending: no row");
    let want_error = "V2__bad.sql:2:1: syntax error at or near \"SELEC\"";

    let text = belay_ok(&db.url, dir.path(), &["history"]).stdout;
    assert!(
        text.contains(&format!("deployment {id}  failed in migrating")),
        "{text}"
    );
    assert!(text.contains("· release 1.6.0"), "{text}");
    assert!(
        text.contains("  reason: ") && text.contains("V2__bad.sql:2:1: syntax error"),
        "{text}"
    );
    assert!(
        text.contains("V1__one.sql  (checksum ") && text.contains(", no undo)"),
        "{text}"
    );
    assert!(
        text.contains("succeeded   1          V1__one.sql (forward)"),
        "{text}"
    );
    assert!(
        text.contains("failed      2          V2__bad.sql (forward)"),
        "{text}"
    );
    assert!(
        text.contains("        error: /") && text.contains(want_error),
        "{text}"
    );

    let json = belay_ok(&db.url, dir.path(), &["history", "--output", "json"]).json();
    let d = &json["deployments"][0];
    assert_eq!(d["id"], id.to_string());
    assert_eq!(
        (d["state"].as_str(), d["release"].as_str()),
        (Some("failed"), Some("1.6.0"))
    );
    assert_eq!(d["outcome"]["failed_step"], "migrating");
    assert_eq!(d["outcome"]["applied"][0]["script"], "V1__one.sql");
    let attempts = d["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{d}");
    assert_eq!(attempts[1]["outcome"], "failed");
    assert!(
        attempts[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains(want_error)),
        "{d}"
    );
    assert_eq!(json["unrecorded_failures"], serde_json::json!([]));

    // The same log through `deployments`, without a controller.
    let list = belay_ok(&db.url, dir.path(), &["deployments", "list"]).stdout;
    assert!(list.starts_with(&format!("{id}  failed ")), "{list}");
    assert!(
        list.contains("target local  to latest in migrating"),
        "{list}"
    );
    let listed = belay_ok(&db.url, dir.path(), &["deployments", "--output", "json"]).json();
    assert_eq!(listed[0]["id"], id.to_string());

    let show = belay_ok(&db.url, dir.path(), &["deployments", "show", prefix]).stdout;
    assert!(
        show.contains(&format!("deployment {id}  failed in migrating")),
        "{show}"
    );
    for step in ["  planned", "  preflight", "  migrating", "  failed"] {
        assert!(show.contains(step), "{step}: {show}");
    }
    assert!(show.contains("evidence:"), "{show}");
    assert!(show.contains("[1] "), "{show}");
    assert!(show.contains("transition planned → preflight"), "{show}");
    assert!(
        show.contains("        error: /") && show.contains(want_error),
        "{show}"
    );
    let shown = belay_ok(
        &db.url,
        dir.path(),
        &[
            "deployments",
            "show",
            &prefix.to_uppercase(),
            "--output",
            "json",
        ],
    )
    .json();
    let seqs: Vec<u64> = shown["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(
        shown["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .map(|s| s["step"].as_str().unwrap_or_default())
            .collect::<Vec<_>>(),
        vec!["planned", "preflight", "backing_up", "migrating", "failed"]
    );
    assert!(shown["evidence"].is_null() && shown["outcome"]["evidence"]["error"].is_string());

    // Unknown ids are 66, in text and JSON.
    let unknown = belay(&db.url, dir.path(), &["deployments", "show", "ffffffff"]);
    assert_eq!(unknown.code, 66, "{unknown:?}");
    assert!(
        unknown.stderr.contains("no deployment \"ffffffff\""),
        "{unknown:?}"
    );
    let unknown = belay(
        &db.url,
        dir.path(),
        &["deployments", "show", "nope", "--output", "json"],
    );
    assert_eq!(unknown.code, 66, "{unknown:?}");
    assert_eq!(unknown.json()["exit_code"], 66);
}

#[test]
fn a_prefix_must_name_one_deployment() {
    let db = db();
    let dir = migrations(&[]);
    let at = Utc::now();
    let a: Uuid = "abcd0000-0000-4000-8000-000000000001"
        .parse()
        .expect("uuid");
    let b: Uuid = "abcd0000-0000-4000-8000-000000000002"
        .parse()
        .expect("uuid");
    runtime().block_on(async {
        let log = log(&db.url);
        log.begin(&new_deployment(a, at)).await.expect("begin");
        log.begin(&new_deployment(b, at + chrono::Duration::seconds(1)))
            .await
            .expect("begin");
    });
    let r = belay(&db.url, dir.path(), &["deployments", "show", "abcd"]);
    assert_eq!(r.code, 64, "{r:?}");
    assert!(
        r.stderr.contains(&a.to_string()) && r.stderr.contains(&b.to_string()),
        "{r:?}"
    );
    let r = belay_ok(
        &db.url,
        dir.path(),
        &["deployments", "show", &b.to_string()],
    );
    assert!(
        r.stdout
            .contains(&format!("deployment {b}  planned  target local")),
        "{r:?}"
    );
    assert!(
        r.stdout.contains("version none → latest (not finished)"),
        "{r:?}"
    );
    // Newest first; --target filters on the recorded target.
    let h = belay_ok(&db.url, dir.path(), &["history", "--output", "json"]).json();
    let ids: Vec<&str> = h["deployments"]
        .as_array()
        .expect("deployments")
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(ids, vec![b.to_string(), a.to_string()]);
    let one = belay_ok(
        &db.url,
        dir.path(),
        &["history", "--limit", "1", "--output", "json"],
    )
    .json();
    assert_eq!(one["deployments"].as_array().map(Vec::len), Some(1));
    let none = belay_ok(&db.url, dir.path(), &["history", "--target", "other"]);
    assert!(none.stdout.contains("no deployments recorded"), "{none:?}");
}

#[test]
fn a_fresh_database_has_no_history_and_gets_no_tables_from_reading() {
    let db = db();
    let dir = migrations(&[]);
    let r = belay_ok(&db.url, dir.path(), &["history"]);
    assert!(
        r.stdout
            .contains("no deployments recorded in belay.deployments"),
        "{r:?}"
    );
    assert_eq!(
        belay_ok(&db.url, dir.path(), &["deployments"])
            .stdout
            .trim(),
        "no deployments yet"
    );
    let r = belay(&db.url, dir.path(), &["deployments", "show", "abc"]);
    assert_eq!(r.code, 66, "{r:?}");
    assert!(!history_schema_exists(&db.url), "reading created nothing");
}

#[test]
fn failed_migrations_outside_the_log_are_still_shown() {
    // A no-transaction migration that fails leaves a failed history row, whatever wrote
    // (or did not write) the log: `belay history` is where postflight sends the operator.
    let db = db();
    let dir = migrations(&[(
        "V1__idx.sql",
        "-- belay:no-transaction\nCREATE INDEX CONCURRENTLY i ON nope (x);\n",
    )]);
    let r = belay(
        &db.url,
        dir.path(),
        &["migrate", "--no-lint", "--backup", "none"],
    );
    assert_eq!(r.code, 1, "{r:?}");
    // As a belay from before the deployment log left it: the failed row, no record.
    psql(
        &db.url,
        "DELETE FROM belay.deployment_events; DELETE FROM belay.deployments",
    );
    let text = belay_ok(&db.url, dir.path(), &["history"]).stdout;
    assert!(text.contains("outside the deployment log"), "{text}");
    assert!(
        text.contains("failed      1          V1__idx.sql"),
        "{text}"
    );
    assert!(text.contains("V1__idx.sql:2"), "{text}");
    let json = belay_ok(&db.url, dir.path(), &["history", "--output", "json"]).json();
    let row = &json["unrecorded_failures"][0];
    assert_eq!(
        (row["script"].as_str(), row["state"].as_str()),
        (Some("V1__idx.sql"), Some("failed"))
    );
    assert!(row["deployment_id"].is_string());
}

#[test]
fn remote_history_is_refused_and_local_watch_needs_a_controller() {
    let db = db();
    let dir = migrations(&[]);
    let r = belay(
        &db.url,
        dir.path(),
        &["history", "--controller", "127.0.0.1:1"],
    );
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("run it in local mode"), "{r:?}");
    let r = belay(&db.url, dir.path(), &["deployments", "watch", "abc"]);
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("pass --controller"), "{r:?}");
}

#[test]
fn release_must_be_semver() {
    let db = db();
    let dir = migrations(&[("V1__one.sql", "CREATE TABLE one (id int);")]);
    for (bad, says) in [
        ("1.6", "it needs three numbers (1.6.0)"),
        ("v1.6.0", "drop the leading v (1.6.0)"),
        ("1.06.0", "not a SemVer version"),
        ("latest", "not a SemVer version"),
    ] {
        let r = belay(&db.url, dir.path(), &["migrate", "--release", bad]);
        assert_eq!(r.code, 64, "{bad}: {r:?}");
        assert!(r.stderr.contains(says), "{bad}: {r:?}");
    }
    assert!(
        !history_schema_exists(&db.url),
        "refused before touching the database"
    );
    belay_ok(
        &db.url,
        dir.path(),
        &[
            "migrate",
            "--backup",
            "none",
            "--release",
            "2.0.0-rc.1+build.5",
        ],
    );
}

#[test]
fn status_shows_each_migrations_deployment_and_backup() {
    let db = db();
    let dir = migrations(&[("V1__one.sql", "CREATE TABLE one (id int);")]);
    let backups = tempfile::tempdir().expect("tempdir");
    let run = belay_b_ok(
        &db.url,
        dir.path(),
        backups.path(),
        &["migrate", "--output", "json"],
    )
    .json();
    let taken = run["events"]
        .as_array()
        .expect("events")
        .iter()
        .find(|e| e["event"] == "backup_taken")
        .expect("a backup before the run")
        .clone();
    let status = belay_ok(&db.url, dir.path(), &["status", "--output", "json"]).json();
    assert_eq!(status[0]["backup_id"], taken["id"], "{status}");
    assert_eq!(
        status[0]["deployment_id"], run["report"]["deployment_id"],
        "{status}"
    );
}
