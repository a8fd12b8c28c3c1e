//! `belay rollback` and `migrate --on-failure rollback` through the real binary on real
//! PostgreSQL: the undo path after a probe fails in the watch window (schema back, rows
//! kept, dropped data recoverable with one command), the restore paths for migrations
//! without undo (history kept and marked), a release across an irreversible migration,
//! lock-bounded restores, and each refusal.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::*;

fn config(dir: &Path, body: &str) -> String {
    let p = dir.join("belay.toml");
    std::fs::write(&p, body).expect("write belay.toml");
    p.to_string_lossy().into_owned()
}

/// Polls `cond` until it holds or `limit` passes (then fails naming `what`).
fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

const ACCOUNTS: &str = "CREATE TABLE chaos (id int);
     CREATE TABLE accounts (id serial PRIMARY KEY, name text NOT NULL, balance int NOT NULL DEFAULT 10);
     INSERT INTO accounts (name) VALUES ('a'), ('b');";

/// The deployment's migration: a column and a table, with an undo dropping both.
const V1: (&str, &str) = (
    "V1__email.sql",
    "ALTER TABLE accounts ADD COLUMN email text;\nCREATE TABLE sessions (id serial PRIMARY KEY, account_id int REFERENCES accounts (id), token text);\n",
);
const U1: (&str, &str) = (
    "U1__email.sql",
    "DROP TABLE sessions;\nALTER TABLE accounts DROP COLUMN email;\n",
);

/// A probe that fails once `chaos` has a row while `accounts.email` exists: the
/// application "breaks" on the new schema, and is healthy again once it is undone.
fn probe_config(url: &str, extra: &str) -> String {
    format!(
        "[[probes]]\nname = \"app\"\nperiod = \"100ms\"\nfailure_threshold = 3\n[probes.sql]\nurl = \"{url}\"\n\
         query = \"SELECT count(*) FROM chaos WHERE EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'accounts' AND column_name = 'email')\"\n\
         expect = \"zero\"\n\n[rollback]\nsettle = \"500ms\"\n{extra}"
    )
}

fn deployments(url: &str, dir: &Path) -> serde_json::Value {
    belay_ok(url, dir, &["rollback", "list", "--output", "json"]).json()["deployments"].clone()
}

#[test]
fn a_probe_failing_in_the_watch_rolls_back_by_undo_keeping_rows_and_dropped_data() {
    let db = db();
    psql(&db.url, ACCOUNTS);
    let before = schema(&db.url);
    let dir = migrations(&[V1, U1]);
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config(cfg_dir.path(), &probe_config(&db.url, ""));

    let child = belay_cmd(&db.url, dir.path())
        .args([
            "--config",
            &cfg,
            "migrate",
            "--watch",
            "60s",
            "--on-failure",
            "rollback",
            "--release",
            "1.1.0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start belay migrate");
    wait_for("the watch window", Duration::from_secs(60), || {
        // The log's tables appear with the deployment: until then, not yet.
        belay_testkit::psql(
            &db.url,
            "SELECT count(*) FROM belay.deployments WHERE step = 'watching'",
        )
        .is_ok_and(|s| s.trim() == "1")
    });
    // The application writes during the window, then breaks.
    psql(
        &db.url,
        "INSERT INTO accounts (name, email) VALUES ('c', 'c@example.com');
         INSERT INTO sessions (account_id, token) VALUES (1, 'tok-1');
         INSERT INTO chaos VALUES (1);",
    );
    let out = child.wait_with_output().expect("wait for belay");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stdout}\n{stderr}");
    assert!(stdout.contains("undo: possible"), "{stdout}");
    assert!(stdout.contains("rolled_back: deployment"), "{stdout}");
    assert!(
        stderr.contains("the deployment was then rolled_back (undo)"),
        "{stderr}"
    );

    // The schema is as before the deployment; rows written meanwhile are kept.
    assert_eq!(schema(&db.url), before);
    assert_eq!(
        psql(
            &db.url,
            "SELECT string_agg(name, ',' ORDER BY id) FROM accounts"
        ),
        "a,b,c"
    );
    let listed = deployments(&db.url, dir.path());
    assert_eq!(listed[0]["state"], "rolled_back", "{listed:#}");
    let id = listed[0]["id"].as_str().unwrap().to_string();

    // The report is stored with the deployment and names the one command.
    let status = belay_ok(
        &db.url,
        dir.path(),
        &["rollback", "status", "--output", "json"],
    )
    .json();
    assert_eq!(status["state"], "rolled_back");
    let report = &status["report"];
    assert_eq!(report["strategy"], "undo");
    assert_eq!(report["result"], "rolled_back");
    assert_eq!(report["severity"], "P2");
    assert_eq!(report["release"], "1.1.0");
    assert_eq!(report["trigger"]["kind"], "probe_threshold");
    assert_eq!(report["trigger"]["evidence"]["probe"], "app");
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "emergency_backup",
            "undo",
            "verify_history",
            "verify_postflight",
            "verify_probes"
        ]
    );
    assert!(report["backups"]["emergency"].is_string(), "{report:#}");
    let recover = report["backups"]["recover_command"]
        .as_str()
        .expect("a recover command");
    let md = belay_ok(
        &db.url,
        dir.path(),
        &["deployments", "show", &id[..8], "--report"],
    );
    assert!(
        md.stdout.starts_with("# Incident: deployment"),
        "{}",
        md.stdout
    );
    assert!(md.stdout.contains(recover), "{}", md.stdout);

    // The one command brings the dropped column and table back, beside the live database.
    let args: Vec<&str> = recover.split_whitespace().skip(1).collect();
    belay_ok(&db.url, dir.path(), &args);
    let recovered = db.url.replace(
        &format!("/{}", db.name),
        &format!("/{}", args.last().unwrap()),
    );
    assert_eq!(
        psql(&recovered, "SELECT email FROM accounts WHERE name = 'c'"),
        "c@example.com"
    );
    assert_eq!(psql(&recovered, "SELECT token FROM sessions"), "tok-1");

    // A second rollback of the same deployment is refused.
    let again = belay(
        &db.url,
        dir.path(),
        &["rollback", "execute", &id[..8], "--yes"],
    );
    assert_eq!(again.code, 2, "{again:?}");
    assert!(again.stderr.contains("already rolled back"), "{again:?}");
}

/// Deploys V1 (the base), then V2 (the deployment to roll back); returns V2's id.
fn deploy_two(url: &str, dir: &Path) -> String {
    belay_ok(
        url,
        dir,
        &[
            "migrate",
            "--to",
            "1",
            "--backup",
            "none",
            "--no-lint",
            "--release",
            "1.0.0",
        ],
    );
    belay_ok(url, dir, &["migrate", "--no-lint", "--release", "1.1.0"]);
    let listed = deployments(url, dir);
    listed[0]["id"]
        .as_str()
        .expect("a deployment id")
        .to_string()
}

const BASE: (&str, &str) = (
    "V1__accounts.sql",
    "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL);\nINSERT INTO accounts VALUES (1, 10), (2, 20);\n",
);

#[test]
fn a_migration_without_undo_is_rolled_back_by_restoring_its_tables() {
    let db = db();
    let dir = migrations(&[
        BASE,
        (
            "V2__reset.sql",
            "-- belay:tables=accounts\nALTER TABLE accounts ADD COLUMN note text;\nUPDATE accounts SET balance = 0, note = 'reset';\n",
        ),
    ]);
    belay_ok(
        &db.url,
        dir.path(),
        &["migrate", "--to", "1", "--backup", "none"],
    );
    let before_schema = schema(&db.url);
    belay_ok(
        &db.url,
        dir.path(),
        &["migrate", "--no-lint", "--release", "1.1.0"],
    );
    let id = deployments(&db.url, dir.path())[0]["id"]
        .as_str()
        .unwrap()
        .to_string();

    let plan = belay_ok(
        &db.url,
        dir.path(),
        &["rollback", "plan", &id[..8], "--output", "json"],
    )
    .json();
    let plan = &plan["plan"];
    assert_eq!(plan["strategy"], "table_restore", "{plan:#}");
    assert_eq!(plan["tables"], serde_json::json!(["accounts"]));
    let undo = &plan["reasons"][0];
    assert_eq!(undo["possible"], false);
    assert!(
        undo["why"]
            .as_str()
            .unwrap()
            .contains("V2 (V2__reset.sql) has no undo script"),
        "{plan:#}"
    );
    assert!(
        plan["losses"][0]["items"][0]
            .as_str()
            .unwrap()
            .contains("accounts: 2 rows"),
        "{plan:#}"
    );

    let r = belay_ok(&db.url, dir.path(), &["rollback", "execute", "1", "--yes"]);
    assert!(r.stdout.contains("rolled_back"), "{r:?}");
    assert_eq!(schema(&db.url), before_schema);
    assert_eq!(
        psql(
            &db.url,
            "SELECT string_agg(id || ':' || balance, ',' ORDER BY id) FROM accounts"
        ),
        "1:10,2:20"
    );
    // The history still shows what happened: V2 applied, then reverted by the restore.
    assert_eq!(
        psql(
            &db.url,
            "SELECT string_agg(type, ',' ORDER BY installed_rank) FROM belay.schema_history WHERE version = '2'"
        ),
        "SQL,UNDO_SQL"
    );
    assert_eq!(
        psql(
            &db.url,
            "SELECT notes->'rolled_back'->>'strategy' FROM belay.schema_history WHERE version = '2' AND type = 'UNDO_SQL'"
        ),
        "table_restore"
    );
    assert_eq!(
        states(&db.url, dir.path()),
        [
            ("1".into(), "success".into()),
            ("2".into(), "undone".into())
        ]
    );
    assert_eq!(deployments(&db.url, dir.path())[0]["state"], "rolled_back");
}

#[test]
fn a_migration_writing_unknown_tables_is_rolled_back_by_a_full_restore_that_keeps_history() {
    let db = db();
    let dir = migrations(&[BASE, ("V2__zero.sql", "UPDATE accounts SET balance = 0;\n")]);
    let id = deploy_two(&db.url, dir.path());
    let plan = belay_ok(
        &db.url,
        dir.path(),
        &["rollback", "plan", &id, "--output", "json"],
    )
    .json();
    assert_eq!(plan["plan"]["strategy"], "full_restore", "{plan:#}");
    let table = &plan["plan"]["reasons"][1]["why"];
    assert!(
        table
            .as_str()
            .unwrap()
            .contains("V2 (V2__zero.sql) writes are unknown"),
        "{plan:#}"
    );
    belay_ok(&db.url, dir.path(), &["rollback", "execute", &id, "--yes"]);
    assert_eq!(
        psql(
            &db.url,
            "SELECT string_agg(id || ':' || balance, ',' ORDER BY id) FROM accounts"
        ),
        "1:10,2:20"
    );
    // Both deployments are still on record; the history shows V2 and its revert.
    let listed = deployments(&db.url, dir.path());
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed:#}");
    assert_eq!(listed[0]["state"], "rolled_back");
    assert_eq!(listed[1]["state"], "succeeded");
    assert_eq!(
        states(&db.url, dir.path()),
        [
            ("1".into(), "success".into()),
            ("2".into(), "undone".into())
        ]
    );
}

#[test]
fn a_rollback_to_a_release_across_an_irreversible_migration_refuses_undo_naming_it() {
    let db = db();
    let dir = migrations(&[
        BASE,
        (
            "V2__drop_balance.sql",
            "-- belay:irreversible\nALTER TABLE accounts DROP COLUMN balance;\n",
        ),
        (
            "U2__drop_balance.sql",
            "ALTER TABLE accounts ADD COLUMN balance int;\n",
        ),
    ]);
    deploy_two(&db.url, dir.path());
    let r = belay(
        &db.url,
        dir.path(),
        &["rollback", "plan", "--release", "1.0.0"],
    );
    assert!(
        r.stdout
            .contains("undo: refused: V2 (V2__drop_balance.sql) is marked `-- belay:irreversible`"),
        "{r:?}"
    );
    let doc = belay(
        &db.url,
        dir.path(),
        &["rollback", "plan", "--release", "1.0.0", "--output", "json"],
    )
    .json();
    assert_ne!(doc["plan"]["strategy"], "undo", "{doc:#}");
    assert_eq!(doc["plan"]["to_version"], "1");
    // An unknown release is named as such.
    let r = belay(
        &db.url,
        dir.path(),
        &["rollback", "plan", "--release", "9.9.9"],
    );
    assert_eq!(r.code, 66, "{r:?}");
    assert!(r.stderr.contains("recorded: 1.1.0, 1.0.0"), "{r:?}");
}

#[test]
fn execute_without_yes_and_without_a_terminal_is_refused_and_changes_nothing() {
    let db = db();
    let dir = migrations(&[V1, U1]);
    psql(&db.url, ACCOUNTS);
    belay_ok(&db.url, dir.path(), &["migrate"]);
    let r = belay(&db.url, dir.path(), &["rollback", "execute", "0"]);
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("pass --yes"), "{r:?}");
    assert_eq!(deployments(&db.url, dir.path())[0]["state"], "succeeded");
    assert_eq!(
        states(&db.url, dir.path()),
        [("1".into(), "success".into())]
    );
}

#[test]
fn a_failing_before_hook_escalates_before_anything_changes() {
    let db = db();
    let dir = migrations(&[V1, U1]);
    psql(&db.url, ACCOUNTS);
    belay_ok(&db.url, dir.path(), &["migrate"]);
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config(
        cfg_dir.path(),
        "[rollback]\n[rollback.before]\ncommand = \"echo maintenance unavailable >&2; exit 3\"\ntimeout = \"10s\"\n",
    );
    let r = belay(
        &db.url,
        dir.path(),
        &["--config", &cfg, "rollback", "execute", "0", "--yes"],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("maintenance unavailable"), "{r:?}");
    assert_eq!(deployments(&db.url, dir.path())[0]["state"], "escalated");
    assert_eq!(
        states(&db.url, dir.path()),
        [("1".into(), "success".into())]
    );
    let status = belay_ok(
        &db.url,
        dir.path(),
        &["rollback", "status", "--output", "json"],
    )
    .json();
    assert_eq!(status["report"]["severity"], "P1");
    assert_eq!(status["report"]["steps"][0]["step"], "before_hook");
    assert_eq!(status["report"]["steps"][0]["result"], "failed");
    // An escalated deployment waits for a person.
    let again = belay(&db.url, dir.path(), &["rollback", "plan", "0"]);
    assert_eq!(again.code, 2, "{again:?}");
    assert!(
        again.stderr.contains("escalated: a person must decide"),
        "{again:?}"
    );
}

#[test]
fn a_restore_waits_for_locks_only_up_to_its_timeout_and_retries() {
    let db = db();
    let dir = migrations(&[
        BASE,
        (
            "V2__reset.sql",
            "-- belay:tables=accounts\nUPDATE accounts SET balance = 0;\n",
        ),
    ]);
    let id = deploy_two(&db.url, dir.path());
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config(
        cfg_dir.path(),
        "[rollback]\nrestore_lock_timeout = \"100ms\"\nrestore_attempts = 1000\n",
    );
    // A long transaction holds a lock on the table the restore must drop.
    let mut holder = Session::open(&db.url);
    holder.run("BEGIN; SELECT count(*) FROM accounts;");
    let child = belay_cmd(&db.url, dir.path())
        .args(["--config", &cfg, "rollback", "execute", &id, "--yes"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start rollback");
    wait_for(
        "a restore attempt to time out on the lock",
        Duration::from_secs(60),
        || {
            psql(
                &db.url,
                "SELECT count(*) FROM belay.deployment_events WHERE kind = 'restore_retry'",
            ) != "0"
        },
    );
    // The application is not queued behind the restore: a reader gets through.
    assert_eq!(psql(&db.url, "SELECT count(*) FROM accounts"), "2");
    holder.run("COMMIT;");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        psql(
            &db.url,
            "SELECT string_agg(id || ':' || balance, ',' ORDER BY id) FROM accounts"
        ),
        "1:10,2:20"
    );
}

#[test]
fn bad_rollback_settings_and_targets_are_refused_naming_them() {
    let db = db();
    let dir = migrations(&[BASE]);
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config(cfg_dir.path(), "[rollback]\nsettle = \"0s\"\n");
    let r = belay(&db.url, dir.path(), &["--config", &cfg, "rollback", "list"]);
    assert_eq!(r.code, 64, "{r:?}");
    assert!(
        r.stderr
            .contains("`rollback.settle`: must be greater than zero"),
        "{r:?}"
    );
    let cfg = config(cfg_dir.path(), "[rollback]\npolicy = \"sometimes\"\n");
    let r = belay(&db.url, dir.path(), &["--config", &cfg, "rollback", "list"]);
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("policy"), "{r:?}");

    belay_ok(&db.url, dir.path(), &["migrate", "--backup", "none"]);
    let r = belay(&db.url, dir.path(), &["rollback", "plan", "ffffffff"]);
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("neither a deployment id"), "{r:?}");
    let r = belay(&db.url, dir.path(), &["rollback", "plan", "5"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("nothing to roll back"), "{r:?}");
    // Remote mode acts on one target, named.
    let r = belay(
        &db.url,
        dir.path(),
        &["--controller", "http://127.0.0.1:1", "rollback", "list"],
    );
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("pass --target NAME"), "{r:?}");
    // No backup, no undo: nothing automatic is safe.
    let r = belay(&db.url, dir.path(), &["rollback", "plan", "0"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stdout.contains("escalate"), "{r:?}");
    assert!(r.stdout.contains("no pre-deployment backup"), "{r:?}");
}

#[test]
fn policy_never_leaves_the_failed_deployment_as_it_is() {
    let db = db();
    psql(&db.url, ACCOUNTS);
    let dir = migrations(&[V1, U1]);
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config(
        cfg_dir.path(),
        "[deploy]\non_failure = \"rollback\"\n[rollback]\npolicy = \"never\"\n\n[[checks]]\nname = \"no_accounts\"\nquery = \"SELECT count(*) FROM accounts\"\nexpect = \"zero\"\n",
    );
    let r = belay(
        &db.url,
        dir.path(),
        &["--config", &cfg, "migrate", "--backup", "none"],
    );
    assert_eq!(r.code, 5, "{r:?}");
    assert!(r.stdout.contains("the rollback policy is `never`"), "{r:?}");
    assert_eq!(deployments(&db.url, dir.path())[0]["state"], "failed");
    assert_eq!(
        states(&db.url, dir.path()),
        [("1".into(), "success".into())]
    );
}

#[test]
fn a_migration_failing_partway_reverts_the_ones_the_deployment_applied() {
    let db = db();
    psql(&db.url, ACCOUNTS);
    let before = schema(&db.url);
    let dir = migrations(&[
        V1,
        U1,
        (
            "V2__broken.sql",
            "ALTER TABLE accounts ADD COLUMN nickname text;\nSELECT 1/0;\n",
        ),
    ]);
    let r = belay(
        &db.url,
        dir.path(),
        &["migrate", "--on-failure", "rollback", "--no-lint"],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("trigger: migration_failed"), "{r:?}");
    assert!(r.stdout.contains("undone U1__email.sql"), "{r:?}");
    assert!(r.stderr.contains("V2__broken.sql"), "{r:?}");
    assert!(r.stderr.contains("was then rolled_back (undo)"), "{r:?}");
    assert_eq!(schema(&db.url), before);
    assert_eq!(deployments(&db.url, dir.path())[0]["state"], "rolled_back");
    assert_eq!(
        states(&db.url, dir.path()),
        [
            ("1".into(), "undone".into()),
            ("2".into(), "pending".into())
        ]
    );
}

#[test]
fn a_failed_validation_with_policy_ask_records_the_plan_and_the_command() {
    let db = db();
    psql(&db.url, ACCOUNTS);
    let dir = migrations(&[V1, U1]);
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config(
        cfg_dir.path(),
        "[rollback]\npolicy = \"ask\"\n\n[[checks]]\nname = \"no_email_yet\"\nquery = \"SELECT count(*) FROM information_schema.columns WHERE table_name = 'accounts' AND column_name = 'email'\"\nexpect = \"zero\"\n",
    );
    let r = belay(
        &db.url,
        dir.path(),
        &[
            "--config",
            &cfg,
            "migrate",
            "--on-failure",
            "rollback",
            "--backup",
            "none",
        ],
    );
    assert_eq!(r.code, 5, "{r:?}");
    assert!(r.stdout.contains("trigger: validation_failed"), "{r:?}");
    assert!(r.stdout.contains("to run this plan: belay --url "), "{r:?}");
    // Nothing was rolled back: the deployment waits, failed, for the operator.
    assert_eq!(deployments(&db.url, dir.path())[0]["state"], "failed");
    assert_eq!(
        states(&db.url, dir.path()),
        [("1".into(), "success".into())]
    );
    let id = deployments(&db.url, dir.path())[0]["id"]
        .as_str()
        .expect("an id")
        .to_string();
    let r = belay_ok(
        &db.url,
        dir.path(),
        &[
            "--config",
            &cfg,
            "rollback",
            "execute",
            &id[..8],
            "--yes",
            "--output",
            "json",
        ],
    );
    let doc = r.json();
    assert_eq!(doc["state"], "rolled_back", "{doc:#}");
    assert_eq!(states(&db.url, dir.path()), [("1".into(), "undone".into())]);
}

#[test]
fn a_rollback_killed_mid_step_leaves_an_exact_record_and_execute_resumes_it_once() {
    let db = db();
    let dir = migrations(&[V1, U1]);
    psql(&db.url, ACCOUNTS);
    belay_ok(&db.url, dir.path(), &["migrate"]);
    let cfg_dir = tempfile::tempdir().unwrap();
    let marker = cfg_dir.path().join("hook.pid");
    let cfg = config(
        cfg_dir.path(),
        &format!(
            // Blocks the first run only: the resumed rollback runs the hook again.
            "[rollback]\n[rollback.before]\ncommand = \"test -f {m} || {{ echo $$ > {m}; exec sleep 60; }}\"\ntimeout = \"120s\"\n",
            m = marker.display()
        ),
    );
    let mut child = belay_cmd(&db.url, dir.path())
        .args(["--config", &cfg, "rollback", "execute", "0", "--yes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start rollback");
    // Killed while its `before` hook runs: after `rolling_back` is recorded.
    wait_for("the before hook to start", Duration::from_secs(60), || {
        std::fs::read_to_string(&marker).is_ok_and(|s| s.trim().parse::<i32>().is_ok())
    });
    child.kill().expect("kill -9 belay");
    child.wait().expect("reap belay");
    let hook: i32 = std::fs::read_to_string(&marker)
        .expect("marker")
        .trim()
        .parse()
        .expect("a pid");
    let _ = std::process::Command::new("kill")
        .arg("-9")
        .arg(hook.to_string())
        .status();

    // The record says exactly where it stopped: rolling back, nothing changed yet.
    assert_eq!(deployments(&db.url, dir.path())[0]["state"], "rolling_back");
    assert_eq!(
        states(&db.url, dir.path()),
        [("1".into(), "success".into())]
    );
    let status = belay_ok(
        &db.url,
        dir.path(),
        &["--config", &cfg, "rollback", "status"],
    );
    assert!(
        status
            .stdout
            .contains("a rollback started and has not ended (or was interrupted)")
            && status
                .stdout
                .contains("under way (started, not ended): before_hook")
            && status.stdout.contains("would resume")
            && status.stdout.contains("from before_hook"),
        "{status:?}"
    );
    // `execute` resumes it (no process holds its lock any more) and it ends rolled back.
    let again = belay(
        &db.url,
        dir.path(),
        &["--config", &cfg, "rollback", "execute", "0", "--yes"],
    );
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(states(&db.url, dir.path()), [("1".into(), "undone".into())]);
    assert_eq!(deployments(&db.url, dir.path())[0]["state"], "rolled_back");
    // Once: a further execute is refused as done.
    let third = belay(&db.url, dir.path(), &["rollback", "execute", "0", "--yes"]);
    assert_eq!(third.code, 2, "{third:?}");
    assert!(
        third.stderr.contains("already rolled back")
            || third.stderr.contains("nothing to roll back"),
        "{third:?}"
    );
}

#[test]
fn an_undo_of_two_scripts_dropping_data_names_both_snapshots_and_recovers_each() {
    let db = db();
    let dir = migrations(&[
        BASE,
        (
            "V2__email.sql",
            "ALTER TABLE accounts ADD COLUMN email text;\n",
        ),
        ("U2__email.sql", "ALTER TABLE accounts DROP COLUMN email;\n"),
        (
            "V3__sessions.sql",
            "CREATE TABLE sessions (id int PRIMARY KEY, token text);\n",
        ),
        ("U3__sessions.sql", "DROP TABLE sessions;\n"),
    ]);
    belay_ok(
        &db.url,
        dir.path(),
        &["migrate", "--to", "1", "--backup", "none"],
    );
    let before = schema(&db.url);
    belay_ok(
        &db.url,
        dir.path(),
        &["migrate", "--no-lint", "--release", "1.1.0"],
    );
    psql(
        &db.url,
        "UPDATE accounts SET email = 'a' || id || '@example.com'; INSERT INTO sessions VALUES (1, 'tok-1');",
    );
    let id = deployments(&db.url, dir.path())[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = belay_ok(
        &db.url,
        dir.path(),
        &["rollback", "execute", &id[..8], "--yes"],
    );
    assert!(r.stdout.contains("rolled_back"), "{r:?}");
    assert_eq!(schema(&db.url), before);

    let status = belay_ok(
        &db.url,
        dir.path(),
        &["rollback", "status", "--output", "json"],
    )
    .json();
    let backups = &status["report"]["backups"];
    let recover = backups["recover_command"]
        .as_str()
        .expect("a recover command");
    // U3 and U2 each snapshotted what they dropped: two snapshots, two commands.
    let commands: Vec<&str> = recover.split(" && ").collect();
    assert_eq!(commands.len(), 2, "{backups:#}");
    assert_eq!(
        backups["undo_snapshot"]
            .as_str()
            .unwrap()
            .split(", ")
            .count(),
        2,
        "{backups:#}"
    );
    let mut recovered = Vec::new();
    for c in commands {
        let args: Vec<&str> = c.split_whitespace().skip(1).collect();
        belay_ok(&db.url, dir.path(), &args);
        recovered.push(db.url.replace(
            &format!("/{}", db.name),
            &format!("/{}", args.last().unwrap()),
        ));
    }
    assert_eq!(psql(&recovered[0], "SELECT token FROM sessions"), "tok-1");
    assert_eq!(
        psql(
            &recovered[1],
            "SELECT string_agg(email, ',' ORDER BY id) FROM accounts"
        ),
        "a1@example.com,a2@example.com"
    );
}

#[test]
fn the_plan_estimates_from_the_rates_measured_on_the_target_once_there_are_some() {
    let db = db();
    let backups = tempfile::tempdir().unwrap();
    // Enough data that the archive (over 1 MiB) tells a rate rather than start-up time.
    let dir = migrations(&[
        (
            "V1__accounts.sql",
            "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL);\nINSERT INTO accounts VALUES (1, 10), (2, 20);\n\
             CREATE TABLE filler AS SELECT g AS id, md5(g::text) || md5((g + 1)::text) AS v FROM generate_series(1, 100000) g;\n",
        ),
        (
            "V2__reset.sql",
            "-- belay:tables=accounts\nUPDATE accounts SET balance = 0;\n",
        ),
    ]);
    let b = backups.path();
    belay_b_ok(
        &db.url,
        dir.path(),
        b,
        &["migrate", "--to", "1", "--backup", "none"],
    );
    // The pre-deployment backup is the target's first measured backup.
    belay_b_ok(&db.url, dir.path(), b, &["migrate", "--no-lint"]);
    let plan = |what: &str| {
        let listed = belay_b_ok(
            &db.url,
            dir.path(),
            b,
            &["rollback", "list", "--output", "json"],
        )
        .json();
        let id = listed["deployments"][0]["id"].as_str().unwrap().to_string();
        let plan = belay_b_ok(
            &db.url,
            dir.path(),
            b,
            &["rollback", "plan", &id, "--output", "json"],
        )
        .json();
        assert_eq!(
            plan["plan"]["strategy"], "table_restore",
            "{what}: {plan:#}"
        );
        plan["plan"].clone()
    };
    let first = plan("before any restore");
    let basis = first["estimate_basis"].as_str().unwrap();
    assert!(
        basis.contains("emergency backup at ")
            && basis.contains(" MB/s measured on this target (1 backup)")
            && basis
                .contains("restore at an assumed 20 MB/s (no restore measured on this target yet)"),
        "{basis}"
    );

    // One restore of the whole archive (into a new database, leaving the target as it is).
    let backup_id = first["backups"][0]["id"].as_str().unwrap().to_string();
    let copy = format!("{}_copy", db.name);
    belay_b_ok(
        &db.url,
        dir.path(),
        b,
        &["backup", "restore", &backup_id, "--into", &copy],
    );
    psql(&db.url, &format!("DROP DATABASE {copy}"));

    let second = plan("after one restore");
    let basis = second["estimate_basis"].as_str().unwrap();
    assert!(
        basis.contains("restore at ")
            && basis.contains(" MB/s measured on this target (1 restore)"),
        "{basis}"
    );
    assert!(!basis.contains("assumed"), "{basis}");
}
