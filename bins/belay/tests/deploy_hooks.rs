//! `[deploy.before]`/`[deploy.after]` around local `migrate`'s pipeline, through the real
//! binary on real PostgreSQL: where each hook runs in the deployment's order, what its
//! failure does (a `before` refuses with nothing changed, an `after` warns with the
//! migrations in), and the file's keys checked.

mod support;

use std::path::Path;
use support::*;

fn config(dir: &Path, body: &str) -> String {
    let p = dir.join("belay.toml");
    std::fs::write(&p, body).expect("write belay.toml");
    p.to_string_lossy().into_owned()
}

const V1: (&str, &str) = ("V1__widgets.sql", "CREATE TABLE widgets (id int);\n");

fn events(doc: &serde_json::Value) -> Vec<serde_json::Value> {
    doc["deployment"]["events"]
        .as_array()
        .expect("deployment events")
        .clone()
}

/// Where in `events` the first one matching `pred` is (fails naming `what`).
fn index_of(
    events: &[serde_json::Value],
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> usize {
    events
        .iter()
        .position(pred)
        .unwrap_or_else(|| panic!("no {what} event in {events:#?}"))
}

#[test]
fn hooks_run_before_the_backup_and_after_the_deployment_succeeded() {
    let db = db();
    let dir = migrations(&[V1]);
    let cfg_dir = tempfile::tempdir().unwrap();
    let backups = tempfile::tempdir().unwrap();
    let before_file = cfg_dir.path().join("before.env");
    let after_file = cfg_dir.path().join("after.env");
    let cfg = config(
        cfg_dir.path(),
        &format!(
            "[deploy.before]\ncommand = \"env | grep ^BELAY_ | sort > '{}'\"\ntimeout = \"10s\"\n\n\
             [deploy.after]\ncommand = \"env | grep ^BELAY_ | sort > '{}'\"\n",
            before_file.display(),
            after_file.display()
        ),
    );
    let r = belay_b(
        &db.url,
        dir.path(),
        backups.path(),
        &["--config", &cfg, "migrate", "--to", "1", "--output", "json"],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let doc = r.json();
    let id = doc["deployment"]["id"].as_str().expect("id").to_string();
    let before = std::fs::read_to_string(&before_file).expect("the before hook ran");
    assert!(
        before.contains(&format!("BELAY_DEPLOYMENT_ID={id}\n")),
        "{before}"
    );
    assert!(before.contains("BELAY_DEPLOY_PHASE=before\n"), "{before}");
    assert!(before.contains("BELAY_TARGET="), "{before}");
    assert!(before.contains("BELAY_TARGET_VERSION=1\n"), "{before}");
    let after = std::fs::read_to_string(&after_file).expect("the after hook ran");
    assert!(after.contains("BELAY_DEPLOY_PHASE=after\n"), "{after}");
    assert!(
        after.contains(&format!("BELAY_DEPLOYMENT_ID={id}\n")),
        "{after}"
    );

    // The order, from the deployment's own log: preflight passed, then the before hook,
    // then the backup and the migration; the after hook once every step passed.
    let ev = events(&doc);
    let preflight = index_of(&ev, "preflight check", |e| {
        e["kind"] == "check" && e["payload"]["check"] == "preflight"
    });
    let before_hook = index_of(&ev, "before hook", |e| {
        e["kind"] == "hook" && e["payload"]["phase"] == "before"
    });
    let backing_up = index_of(&ev, "backing_up", |e| {
        e["kind"] == "transition" && e["payload"]["to"] == "backing_up"
    });
    let backup = index_of(&ev, "backup_taken", |e| {
        e["kind"] == "migration" && e["payload"]["event"] == "backup_taken"
    });
    let migrated = index_of(&ev, "migration succeeded", |e| {
        e["kind"] == "migration" && e["payload"]["event"] == "succeeded"
    });
    let after_hook = index_of(&ev, "after hook", |e| {
        e["kind"] == "hook" && e["payload"]["phase"] == "after"
    });
    let succeeded = index_of(&ev, "succeeded", |e| {
        e["kind"] == "transition" && e["payload"]["to"] == "succeeded"
    });
    assert!(
        preflight < before_hook
            && before_hook < backing_up
            && backing_up < backup
            && backup < migrated
            && migrated < after_hook
            && after_hook < succeeded,
        "{ev:#?}"
    );
    assert_eq!(ev[before_hook]["step"], "preflight");
    assert_eq!(ev[before_hook]["payload"]["ok"], true);
    assert_eq!(ev[after_hook]["payload"]["ok"], true);
    assert_eq!(ev[after_hook]["payload"]["warning"], false);
    // The record keeps which hooks the deployment ran with.
    assert!(
        doc["deployment"]["policy"]["hooks"]["before"]["command"]
            .as_str()
            .is_some_and(|c| c.contains("before.env")),
        "{doc:#}"
    );
}

#[test]
fn a_failing_before_hook_refuses_the_deployment_with_nothing_changed() {
    let db = db();
    let dir = migrations(&[V1]);
    let cfg_dir = tempfile::tempdir().unwrap();
    let backups = tempfile::tempdir().unwrap();
    let cfg = config(
        cfg_dir.path(),
        "[deploy.before]\ncommand = \"echo starting; echo maintenance page unavailable >&2; exit 3\"\n",
    );
    let r = belay_b(
        &db.url,
        dir.path(),
        backups.path(),
        &["--config", &cfg, "migrate"],
    );
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("before hook"), "{r:?}");
    assert!(r.stderr.contains("exit status: 3"), "{r:?}");
    assert!(r.stderr.contains("maintenance page unavailable"), "{r:?}");
    // Nothing changed: no table, no migration in history, no backup taken.
    assert_eq!(psql(&db.url, "SELECT to_regclass('widgets') IS NULL"), "t");
    assert_eq!(
        states(&db.url, dir.path()),
        [("1".into(), "pending".into())]
    );
    assert_eq!(
        std::fs::read_dir(backups.path())
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "a backup was taken"
    );
    // The deployment is on record as failed at preflight, the hook's run as evidence.
    let list = belay_ok(
        &db.url,
        dir.path(),
        &["deployments", "list", "--output", "json"],
    )
    .json();
    let rec = &list[0];
    assert_eq!(rec["state"], "failed", "{list:#}");
    let shown = belay_ok(
        &db.url,
        dir.path(),
        &[
            "deployments",
            "show",
            rec["id"].as_str().expect("id"),
            "--output",
            "json",
        ],
    )
    .json();
    let outcome = &shown["outcome"];
    assert_eq!(outcome["failed_step"], "preflight", "{shown:#}");
    assert_eq!(outcome["evidence"]["hook"]["phase"], "before", "{shown:#}");
    assert!(
        outcome["evidence"]["hook"]["output"]
            .as_str()
            .is_some_and(|o| o.contains("maintenance page unavailable")),
        "{shown:#}"
    );
}

#[test]
fn a_before_hook_that_times_out_is_killed_and_refuses_the_deployment() {
    let db = db();
    let dir = migrations(&[V1]);
    let cfg_dir = tempfile::tempdir().unwrap();
    let backups = tempfile::tempdir().unwrap();
    let cfg = config(
        cfg_dir.path(),
        "[deploy.before]\ncommand = \"sleep 60\"\ntimeout = \"200ms\"\n",
    );
    let r = belay_b(
        &db.url,
        dir.path(),
        backups.path(),
        &["--config", &cfg, "migrate"],
    );
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("timed out after"), "{r:?}");
    assert_eq!(psql(&db.url, "SELECT to_regclass('widgets') IS NULL"), "t");
}

#[test]
fn a_failing_after_hook_warns_and_leaves_the_migrations_applied() {
    let db = db();
    let dir = migrations(&[V1]);
    let cfg_dir = tempfile::tempdir().unwrap();
    let backups = tempfile::tempdir().unwrap();
    let cfg = config(
        cfg_dir.path(),
        "[deploy.after]\ncommand = \"echo traffic switch refused >&2; exit 1\"\n",
    );
    let text = belay_b(
        &db.url,
        dir.path(),
        backups.path(),
        &["--config", &cfg, "migrate"],
    );
    assert_eq!(text.code, 0, "{text:?}");
    assert!(text.stderr.contains("warning: after hook"), "{text:?}");
    assert!(text.stderr.contains("traffic switch refused"), "{text:?}");
    assert!(text.stderr.contains("stay applied"), "{text:?}");
    assert_eq!(
        states(&db.url, dir.path()),
        [("1".into(), "success".into())]
    );
    assert_eq!(
        psql(&db.url, "SELECT to_regclass('widgets') IS NOT NULL"),
        "t"
    );
    let list = belay_ok(
        &db.url,
        dir.path(),
        &["deployments", "list", "--output", "json"],
    )
    .json();
    assert_eq!(list[0]["state"], "succeeded", "{list:#}");
    let shown = belay_ok(
        &db.url,
        dir.path(),
        &[
            "deployments",
            "show",
            list[0]["id"].as_str().expect("id"),
            "--output",
            "json",
        ],
    )
    .json();
    let ev = shown["events"].as_array().expect("events").clone();
    let hook = &ev[index_of(&ev, "after hook", |e| e["kind"] == "hook")];
    assert_eq!(hook["payload"]["ok"], false, "{hook:#}");
    assert_eq!(hook["payload"]["warning"], true, "{hook:#}");
}

#[test]
fn deploy_hook_keys_are_checked_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str)] = &[
        (
            "[deploy]\n[deploy.before]\ncommand = \"true\"\ntimout = \"5s\"\n",
            ":4: `deploy.before.timout`: unknown key `timout`",
        ),
        (
            "[deploy.after]\ncommand = \"true\"\ntimeout = \"0s\"\n",
            ":3: `deploy.after.timeout`: must be greater than zero",
        ),
        (
            "[deploy.before]\ncommand = \" \"\n",
            ":2: `deploy.before.command`: is empty",
        ),
    ];
    let migrations = migrations(&[V1]);
    for (i, (body, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case{i}.toml"));
        std::fs::write(&path, body).unwrap();
        let r = belay(
            "postgres://app@db.invalid/shop",
            migrations.path(),
            &["--config", path.to_str().unwrap(), "migrate"],
        );
        assert_eq!(r.code, 64, "{body}: {r:?}");
        let shown = format!("{}{}", path.display(), want);
        assert!(r.stderr.contains(&shown), "{body}\nwant {shown}\n{r:?}");
    }
}

#[test]
fn remote_migrate_refuses_deploy_hooks_before_contacting_anything() {
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config(
        cfg_dir.path(),
        "[deploy.before]\ncommand = \"./maintenance-mode.sh enable\"\n",
    );
    let dir = migrations(&[V1]);
    let r = belay(
        "postgres://app@db.invalid/shop",
        dir.path(),
        &[
            "--controller",
            "127.0.0.1:1",
            "--target",
            "shop",
            "--config",
            &cfg,
            "migrate",
        ],
    );
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("[deploy.before]"), "{r:?}");
    assert!(r.stderr.contains("nothing was run"), "{r:?}");
}
