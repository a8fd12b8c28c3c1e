//! `migrate` as a one-target deployment (`belay-deploy`), through the real binary on real
//! PostgreSQL: the lifecycle's order, and each step's failure with its evidence and exit
//! code.

mod support;

use std::path::{Path, PathBuf};
use support::*;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/migrations")
}

fn config(dir: &Path, body: &str) -> String {
    let p = dir.join("belay.toml");
    std::fs::write(&p, body).expect("write belay.toml");
    p.to_string_lossy().into_owned()
}

/// The `to` of every transition, in order.
fn lifecycle(doc: &serde_json::Value) -> Vec<String> {
    doc["deployment"]["events"]
        .as_array()
        .expect("deployment events")
        .iter()
        .filter(|e| e["kind"] == "transition")
        .map(|e| e["payload"]["to"].as_str().expect("to").to_string())
        .collect()
}

fn outcome(doc: &serde_json::Value) -> &serde_json::Value {
    &doc["deployment"]["outcome"]
}

#[test]
fn the_examples_project_deploys_through_every_step_in_order() {
    let db = db();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config(
        cfg_dir.path(),
        &format!(
            "[[checks]]\nname = \"users_have_emails\"\nquery = \"SELECT count(*) FROM users WHERE email IS NULL\"\nexpect = \"zero\"\n\n\
             [[probes]]\nname = \"users_readable\"\nperiod = \"50ms\"\n[probes.sql]\nurl = \"{}\"\nquery = \"SELECT count(*) FROM users\"\nexpect = \"zero\"\n",
            db.url
        ),
    );
    let r = belay(
        &db.url,
        &examples(),
        &[
            "--config", &cfg, "migrate", "--watch", "300ms", "--output", "json",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let doc = r.json();
    assert_eq!(
        lifecycle(&doc),
        [
            "planned",
            "preflight",
            "backing_up",
            "migrating",
            "validating",
            "watching",
            "succeeded"
        ],
        "{doc:#}"
    );
    let deployment = &doc["deployment"];
    assert_eq!(deployment["step"], "succeeded");
    // The record is the run's: its id is in every history row, its backup is the one
    // the executor took, its migrations are the ones history holds, checksums and all.
    let id = deployment["id"].as_str().expect("id");
    assert_eq!(
        psql(
            &db.url,
            "SELECT string_agg(DISTINCT deployment_id::text, ',') FROM belay.schema_history"
        ),
        id
    );
    let backup = psql(
        &db.url,
        "SELECT string_agg(DISTINCT backup_id, ',') FROM belay.schema_history",
    );
    assert_eq!(outcome(&doc)["backup_id"], backup.as_str(), "{doc:#}");
    let applied = outcome(&doc)["applied"].as_array().expect("applied");
    let recorded: Vec<String> = applied
        .iter()
        .map(|m| {
            format!(
                "{}|{}|{}",
                m["version"].as_str().unwrap(),
                m["script"].as_str().unwrap(),
                m["checksum"].as_str().unwrap()
            )
        })
        .collect();
    let history = psql(
        &db.url,
        "SELECT string_agg(version || '|' || script || '|' || checksum, ',' ORDER BY installed_rank) FROM belay.schema_history",
    );
    assert_eq!(recorded.join(","), history);
    assert!(applied.iter().all(|m| m["has_undo"] == true), "{doc:#}");
    assert_eq!(outcome(&doc)["to_version"], "004");
    // Each step left its evidence: the checks, the assertion, the probe verdicts.
    let events = deployment["events"].as_array().unwrap();
    let post = events
        .iter()
        .find(|e| e["kind"] == "check" && e["payload"]["check"] == "postflight")
        .expect("postflight results");
    assert!(
        post["payload"]["results"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "users_have_emails" && c["status"] == "pass"),
        "{post:#}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "probe" && e["step"] == "watching"),
        "{doc:#}"
    );
    // The executor's events, as `migrate --output json` always listed them.
    assert_eq!(
        doc["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == "succeeded")
            .count(),
        4
    );
}

#[test]
fn a_failing_assertion_fails_the_deployment_at_validating_and_leaves_it_applied() {
    let db = db();
    let dir = migrations(&[(
        "V1__accounts.sql",
        "CREATE TABLE accounts (id int PRIMARY KEY, email text);\nINSERT INTO accounts VALUES (1, 'a@example.com'), (2, NULL), (3, NULL);\n",
    )]);
    let cfg_dir = tempfile::tempdir().unwrap();
    let query = "SELECT count(*) FROM accounts WHERE email IS NULL";
    let cfg = config(
        cfg_dir.path(),
        &format!(
            "[[checks]]\nname = \"emails_required\"\nquery = \"{query}\"\nexpect = \"zero\"\n"
        ),
    );
    let r = belay(
        &db.url,
        dir.path(),
        &[
            "--config", &cfg, "migrate", "--backup", "none", "--output", "json",
        ],
    );
    assert_eq!(r.code, 5, "{r:?}");
    let doc = r.json();
    assert_eq!(doc["exit_code"], 5);
    assert_eq!(
        lifecycle(&doc),
        [
            "planned",
            "preflight",
            "backing_up",
            "migrating",
            "validating",
            "failed"
        ]
    );
    let out = outcome(&doc);
    assert_eq!(out["state"], "failed");
    assert_eq!(out["failed_step"], "validating");
    let failed = out["evidence"]["failed"].as_array().expect("evidence");
    assert_eq!(failed.len(), 1, "{out:#}");
    assert_eq!(failed[0]["name"], "emails_required");
    assert_eq!(failed[0]["query"], query);
    assert!(
        failed[0]["value"]
            .as_str()
            .unwrap()
            .contains("first value 2"),
        "the offending count: {out:#}"
    );
    assert_eq!(out["applied"][0]["script"], "V1__accounts.sql");
    // Stop policy: what committed stays.
    assert_eq!(
        states(&db.url, dir.path()),
        [("1".into(), "success".into())]
    );

    // Text: the step lines, and the reason naming the assertion and its query.
    let r = belay(
        &db.url,
        dir.path(),
        &["--config", &cfg, "migrate", "--backup", "none"],
    );
    assert_eq!(r.code, 5, "{r:?}");
    assert!(r.stdout.contains("preflight: "), "{r:?}");
    assert!(r.stdout.contains("BLOCK emails_required"), "{r:?}");
    assert!(
        r.stdout.contains("validating: 0 of 1 assertion(s) passed"),
        "{r:?}"
    );
    assert!(
        r.stderr
            .contains("deployment failed at validating: postflight failed: emails_required"),
        "{r:?}"
    );
    assert!(r.stderr.contains(query), "{r:?}");
}

#[test]
fn a_preflight_block_fails_at_preflight_with_nothing_applied() {
    let db = db();
    let dir = migrations(&[("V1__t.sql", "CREATE TABLE t (id int);")]);
    let cfg_dir = tempfile::tempdir().unwrap();
    // Every database is bigger than a kilobyte.
    let cfg = config(
        cfg_dir.path(),
        "[preflight]\ndatabase_size_block = \"1kB\"\n",
    );
    let r = belay(
        &db.url,
        dir.path(),
        &[
            "--config", &cfg, "migrate", "--backup", "none", "--output", "json",
        ],
    );
    assert_eq!(r.code, 2, "{r:?}");
    let doc = r.json();
    assert_eq!(lifecycle(&doc), ["planned", "preflight", "failed"]);
    let out = outcome(&doc);
    assert_eq!(out["failed_step"], "preflight");
    let blocked = out["evidence"]["blocked"].as_array().expect("evidence");
    assert_eq!(blocked.len(), 1, "{out:#}");
    assert_eq!(blocked[0]["status"], "block");
    let check = blocked[0]["name"].as_str().unwrap();
    assert!(
        doc["error"]
            .as_str()
            .unwrap()
            .contains(&format!("preflight blocked by: {check}")),
        "{doc:#}"
    );
    assert_eq!(
        psql(
            &db.url,
            "SELECT to_regclass('belay.schema_history') IS NULL"
        ),
        "t",
        "nothing ran"
    );
    assert_eq!(psql(&db.url, "SELECT to_regclass('t') IS NULL"), "t");
    // The refusal itself is on record, where the operator looks.
    let listed = belay_ok(&db.url, dir.path(), &["deployments", "--output", "json"]).json();
    assert_eq!(listed[0]["id"], doc["deployment"]["id"], "{listed:#}");
    assert_eq!(
        listed[0]["outcome"]["failed_step"], "preflight",
        "{listed:#}"
    );
}

#[test]
fn a_lint_refusal_comes_from_the_executors_gate_under_the_runner_lock() {
    let db = db();
    let dir = migrations(&[("V1__t.sql", "CREATE TABLE t (a int);\n")]);
    belay_ok(&db.url, dir.path(), &["migrate", "--backup", "none"]);
    // Over the small-table threshold: the finding is not downgraded.
    psql(
        &db.url,
        "INSERT INTO t SELECT generate_series(1, 20000); ANALYZE t;",
    );
    std::fs::write(
        dir.path().join("V2__idx.sql"),
        "-- index for lookups\nCREATE INDEX t_a_idx ON t (a);\n",
    )
    .unwrap();
    let r = belay(
        &db.url,
        dir.path(),
        &["migrate", "--backup", "none", "--output", "json"],
    );
    assert_eq!(r.code, 2, "{r:?}");
    let doc = r.json();
    assert_eq!(doc["exit_code"], 2);
    // Refused inside the executor's run (after preflight, which the CLI's former
    // pre-check preceded), before its first statement: the gate's place.
    assert_eq!(
        lifecycle(&doc),
        ["planned", "preflight", "backing_up", "failed"]
    );
    assert_eq!(outcome(&doc)["failed_step"], "backing_up");
    assert!(
        !doc["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event"] == "started"),
        "{doc:#}"
    );
    let error = doc["error"].as_str().unwrap();
    assert!(error.contains("V2__idx.sql:2:1"), "{error}");
    assert!(error.contains("create-index-concurrently"), "{error}");
    assert!(error.contains("nothing was applied"), "{error}");
    assert!(error.contains("--no-lint"), "{error}");
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*) FROM pg_indexes WHERE indexname = 't_a_idx'"
        ),
        "0"
    );
    // --no-lint: no gate, with the warning it always printed.
    let r = belay_ok(
        &db.url,
        dir.path(),
        &["migrate", "--backup", "none", "--no-lint"],
    );
    assert!(
        r.stderr
            .contains("warning: --no-lint: migrating without linting the pending scripts"),
        "{r:?}"
    );
    assert!(r.stdout.contains("applied V2__idx.sql"), "{r:?}");
    // Starts are on record (`deployments show`), not on the terminal: its end says it all.
    assert!(!r.stdout.contains("started "), "{r:?}");
    let listed = belay_ok(&db.url, dir.path(), &["deployments", "--output", "json"]).json();
    let id = listed[0]["id"].as_str().expect("the run is on record");
    let shown = belay_ok(
        &db.url,
        dir.path(),
        &["deployments", "show", id, "--output", "json"],
    )
    .json();
    assert!(
        shown["events"]
            .as_array()
            .expect("events")
            .iter()
            .any(|e| e["message"] == "started V2__idx.sql (forward)"),
        "{shown:#}"
    );
}

#[test]
fn a_probe_crossing_its_threshold_in_the_watch_fails_at_watching() {
    let db = db();
    let dir = migrations(&[(
        "V1__t.sql",
        "CREATE TABLE t (id int);\nINSERT INTO t VALUES (1);",
    )]);
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config(
        cfg_dir.path(),
        &format!(
            "[[probes]]\nname = \"t_empty\"\nperiod = \"50ms\"\nfailure_threshold = 2\n[probes.sql]\nurl = \"{}\"\nquery = \"SELECT count(*) FROM t\"\nexpect = \"zero\"\n",
            db.url
        ),
    );
    let r = belay(
        &db.url,
        dir.path(),
        &[
            "--config", &cfg, "migrate", "--backup", "none", "--watch", "30s", "--output", "json",
        ],
    );
    assert_eq!(r.code, 4, "{r:?}");
    let doc = r.json();
    assert_eq!(
        lifecycle(&doc),
        [
            "planned",
            "preflight",
            "backing_up",
            "migrating",
            "validating",
            "watching",
            "failed"
        ]
    );
    let out = outcome(&doc);
    assert_eq!(out["failed_step"], "watching");
    assert_eq!(out["evidence"]["probe"], "t_empty");
    assert_eq!(out["evidence"]["triggered"], true);
    assert_eq!(out["evidence"]["consecutive_failures"], 2);
    assert!(
        doc["error"]
            .as_str()
            .unwrap()
            .contains("probe t_empty crossed its failure threshold"),
        "{doc:#}"
    );
    assert_eq!(
        states(&db.url, dir.path()),
        [("1".into(), "success".into())]
    );
}

#[test]
fn on_failure_rollback_installs_the_rollback_controller_in_local_mode() {
    // Local `migrate` has the rollback controller (`belay-rollback`): `rollback` is no
    // longer refused, and a deployment that passes records the policy it ran under. (The
    // pipeline still refuses `rollback` where no controller is installed: remote
    // `migrate`, until the rollback service exists.)
    let db = db();
    let dir = migrations(&[("V1__t.sql", "CREATE TABLE t (id int);")]);
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config(cfg_dir.path(), "[deploy]\non_failure = \"rollback\"\n");
    let r = belay(
        &db.url,
        dir.path(),
        &[
            "--config", &cfg, "migrate", "--backup", "none", "--output", "json",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["deployment"]["policy"]["on_failure"], "rollback");
    // belay.toml may say it in `[rollback]` too, but not differently from `[deploy]`.
    let both = config(
        cfg_dir.path(),
        "[deploy]\non_failure = \"rollback\"\n[rollback]\non_failure = \"stop\"\n",
    );
    let r = belay(&db.url, dir.path(), &["--config", &both, "status"]);
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("sets on_failure twice"), "{r:?}");
}
