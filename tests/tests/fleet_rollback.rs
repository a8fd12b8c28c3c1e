//! Rolling back a whole fleet deployment: `deploy --rollback-scope deployment` (the failed
//! target rolled back by its agent, then every target of the earlier waves by the
//! controller through theirs, last wave first), today's `wave` scope leaving earlier waves
//! deployed, and an operator's `rollback plan|execute <fleet deployment>` without
//! `--target`. Real controller and agent processes, the real CLI, real PostgreSQL (one
//! database per target), real pg_dump.

use anyhow::{Context, Result};
use belay_e2e::{Daemon, agent, belay, controller, psql, show, target, target_toml, wait_agents};
use belay_testkit::{Cluster, TestDb};
use serde_json::Value;
use std::path::PathBuf;

const ACCOUNTS: &str = "CREATE TABLE chaos (id int);
     CREATE TABLE accounts (id serial PRIMARY KEY, name text NOT NULL, balance int NOT NULL DEFAULT 10);
     INSERT INTO accounts (name) VALUES ('a'), ('b');";

/// A column and a table, with an undo dropping both.
const V1: &str = "ALTER TABLE accounts ADD COLUMN email text;\nCREATE TABLE sessions (id serial PRIMARY KEY, account_id int REFERENCES accounts (id), token text);\n";
const U1: &str = "DROP TABLE sessions;\nALTER TABLE accounts DROP COLUMN email;\n";

/// Fails while `accounts.email` exists and `chaos` has a row: the target whose `chaos`
/// has a row "breaks" on the new schema.
const BROKEN: &str = "SELECT count(*) FROM chaos WHERE EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'accounts' AND column_name = 'email')";

/// Targets `names` on one agent, each its own database with `accounts`; the last one's
/// application breaks on the new schema when `last_fails` (a postflight check in its
/// agent.toml fails it at `validating`).
struct Fleet {
    _tmp: tempfile::TempDir,
    _c: Daemon,
    _a: Daemon,
    addr: String,
    dbs: Vec<(String, TestDb, String)>,
}

async fn fleet(names: &[&str], last_fails: bool) -> Result<Fleet> {
    let tmp = tempfile::tempdir()?;
    let m: PathBuf = tmp.path().join("m");
    std::fs::create_dir_all(&m)?;
    std::fs::write(m.join("V1__email.sql"), V1)?;
    std::fs::write(m.join("U1__email.sql"), U1)?;
    let mut dbs = Vec::new();
    let mut toml = String::new();
    for (i, name) in names.iter().enumerate() {
        let db = Cluster::shared().create_database().await?;
        psql(&db.url, ACCOUNTS);
        let breaks = last_fails && i + 1 == names.len();
        let check = if breaks {
            psql(&db.url, "INSERT INTO chaos VALUES (1)");
            format!(
                "[[targets.checks]]\nname = \"app_ok\"\nquery = \"{BROKEN}\"\nexpect = \"zero\"\n"
            )
        } else {
            String::new()
        };
        toml.push_str(&target_toml(
            name,
            &db,
            &m,
            &format!(
                "backup_dir = \"{}\"\n{check}\n[targets.rollback]\nsettle = \"300ms\"\n",
                tmp.path().join(format!("backups-{name}")).display()
            ),
        ));
        let before = belay_e2e::schema(&db.url)?;
        dbs.push((name.to_string(), db, before));
    }
    let c = controller(&tmp.path().join("controller.db").to_string_lossy(), &[]).await?;
    let path = tmp.path().join("agent.toml");
    std::fs::write(
        &path,
        format!("name = \"agent-1\"\ncontroller = \"{}\"\n{toml}", c.addr),
    )?;
    let a = agent(&path).await?;
    wait_agents(&c.addr, 1).await?;
    Ok(Fleet {
        addr: c.addr.clone(),
        _tmp: tmp,
        _c: c,
        _a: a,
        dbs,
    })
}

/// The id `deploy` printed (`deployment ID: state`).
fn deployment_id(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("deployment "))
        .and_then(|l| l.split(':').next())
        .unwrap_or_else(|| panic!("no deployment line in {stdout}"))
        .to_string()
}

/// The seq of `name`'s first `rollback_step` event in `doc`.
fn first_rollback_step(doc: &Value, name: &str) -> i64 {
    target(doc, name)["events"]
        .as_array()
        .and_then(|es| es.iter().find(|e| e["kind"] == "rollback_step"))
        .and_then(|e| e["seq"].as_i64())
        .unwrap_or_else(|| panic!("{name} has no rollback_step event: {doc}"))
}

const THREE_WAVES: [&str; 6] = ["--canary", "1", "--batch", "1", "--on-failure", "rollback"];

#[tokio::test(flavor = "multi_thread")]
async fn rollback_scope_deployment_rolls_back_every_earlier_wave_last_first() -> Result<()> {
    let f = fleet(&["fw_a", "fw_b", "fw_c"], true).await?;
    let mut args = vec!["deploy", "--targets", "fw_*"];
    args.extend_from_slice(&THREE_WAVES);
    args.extend_from_slice(&["--rollback-scope", "deployment"]);
    let r = belay(&f.addr, &args).await?;
    assert_eq!(r.code, 1, "{r:?}");
    let id = deployment_id(&r.stdout);
    let doc = show(&f.addr, &id).await?;
    assert_eq!(doc["state"], "rolled_back", "{doc}");
    // The last wave's target failed and its agent rolled it back; the controller then
    // rolled back the two earlier waves, each through the agent.
    assert_eq!(target(&doc, "fw_c")["failed_step"], "validating", "{doc}");
    for (name, db, before) in &f.dbs {
        let t = target(&doc, name);
        assert_eq!(t["step"], "rolled_back", "{name}: {t}");
        assert_eq!(
            &belay_e2e::schema(&db.url)?,
            before,
            "{name}'s schema is the pre-deployment one"
        );
        assert_eq!(
            psql(&db.url, "SELECT count(*) FROM accounts"),
            "2",
            "{name}"
        );
        let events = t["events"].as_array().context("events")?;
        assert!(
            events
                .iter()
                .any(|e| e["kind"] == "rollback_step" && e["payload"]["rollback_step"] == "undo"),
            "{name}: {t}"
        );
    }
    // Reverse wave order: wave 2 (fw_b) before the canary (fw_a), both after fw_c.
    let (a, b, c) = (
        first_rollback_step(&doc, "fw_a"),
        first_rollback_step(&doc, "fw_b"),
        first_rollback_step(&doc, "fw_c"),
    );
    assert!(c < b && b < a, "fw_c {c}, fw_b {b}, fw_a {a}: {doc}");
    // The earlier targets' rollbacks were triggered by fw_c's failure (a pipeline kind),
    // as the agents' records say.
    let st = belay(
        &f.addr,
        &[
            "--target",
            "fw_a",
            "rollback",
            "status",
            &id[..8],
            "--output",
            "json",
        ],
    )
    .await?;
    assert_eq!(st.code, 0, "{st:?}");
    let report = &st.json()["report"];
    assert_eq!(st.json()["state"], "rolled_back", "{st:?}");
    assert_eq!(report["trigger"]["kind"], "validation_failed", "{report}");
    assert_eq!(
        report["trigger"]["evidence"]["failed_target"], "fw_c",
        "{report}"
    );
    // Nothing is left to roll back: an operator's whole rollback is refused, naming why.
    let again = belay(&f.addr, &["rollback", "execute", &id, "--yes"]).await?;
    assert_eq!(again.code, 2, "{again:?}");
    assert!(again.stderr.contains("rolled back already"), "{again:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn wave_scope_leaves_earlier_waves_deployed_until_an_operator_rolls_back_the_deployment()
-> Result<()> {
    let f = fleet(&["fv_a", "fv_b", "fv_c"], true).await?;
    let mut args = vec!["deploy", "--targets", "fv_*"];
    args.extend_from_slice(&THREE_WAVES);
    let r = belay(&f.addr, &args).await?;
    assert_eq!(r.code, 1, "{r:?}");
    let id = deployment_id(&r.stdout);
    let doc = show(&f.addr, &id).await?;
    // Today's behaviour: only the failed target is rolled back (by its agent).
    assert_eq!(doc["state"], "failed", "{doc}");
    assert_eq!(target(&doc, "fv_c")["step"], "rolled_back", "{doc}");
    for (name, db, before) in &f.dbs[..2] {
        assert_eq!(target(&doc, name)["step"], "succeeded", "{name}: {doc}");
        assert_ne!(
            &belay_e2e::schema(&db.url)?,
            before,
            "{name} is still deployed"
        );
    }

    // The operator's plan: the two targets still deployed, last wave first; the failed
    // one left out as rolled back.
    let plan = belay(&f.addr, &["rollback", "plan", &id[..8], "--output", "json"]).await?;
    assert_eq!(plan.code, 0, "{plan:?}");
    let plan = plan.json();
    let planned: Vec<&str> = plan["plans"]
        .as_array()
        .context("plans")?
        .iter()
        .filter_map(|p| p["target"].as_str())
        .collect();
    assert_eq!(planned, ["fv_b", "fv_a"], "{plan}");
    assert!(
        plan["plans"]
            .as_array()
            .is_some_and(|ps| ps.iter().all(|p| p["strategy"] == "undo")),
        "{plan}"
    );
    assert_eq!(
        plan["left_out"],
        serde_json::json!(["fv_c: already rolled back"]),
        "{plan}"
    );
    // Without --yes and no terminal: refused, nothing changed.
    let unasked = belay(&f.addr, &["rollback", "execute", &id]).await?;
    assert_eq!(unasked.code, 64, "{unasked:?}");
    assert_ne!(belay_e2e::schema(&f.dbs[0].1.url)?, f.dbs[0].2);

    let run = belay(&f.addr, &["rollback", "execute", &id[..8], "--yes"]).await?;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("rolling back 1/2: fv_b"), "{run:?}");
    let doc = show(&f.addr, &id).await?;
    assert_eq!(doc["state"], "rolled_back", "{doc}");
    for (name, db, before) in &f.dbs {
        assert_eq!(target(&doc, name)["step"], "rolled_back", "{name}: {doc}");
        assert_eq!(
            &belay_e2e::schema(&db.url)?,
            before,
            "{name}'s schema is the pre-deployment one"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_rolls_back_a_succeeded_fleet_deployment_and_other_ids_are_refused()
-> Result<()> {
    // fo_m is not in the fleet deployment: a remote `migrate` of it is.
    let f = fleet(&["fo_a", "fo_b", "fo_m"], false).await?;
    // Without --on-failure rollback, the deployment scope has nothing to follow: refused
    // before anything runs.
    let r = belay(
        &f.addr,
        &[
            "deploy",
            "--targets",
            "fo_a,fo_b",
            "--rollback-scope",
            "deployment",
        ],
    )
    .await?;
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("--on-failure rollback"), "{r:?}");
    assert_eq!(belay_e2e::schema(&f.dbs[0].1.url)?, f.dbs[0].2);

    let r = belay(
        &f.addr,
        &["deploy", "--targets", "fo_a,fo_b", "--canary", "1"],
    )
    .await?;
    assert_eq!(r.code, 0, "{r:?}");
    let id = deployment_id(&r.stdout);
    // A remote migrate is a one-target deployment of this controller, not a fleet one.
    let name = &f.dbs[2].0;
    let m = belay(&f.addr, &["--target", name, "migrate"]).await?;
    assert_eq!(m.code, 0, "{m:?}");
    let list = belay(&f.addr, &["deployments", "list", "--output", "json"]).await?;
    let migrate_id = list
        .json()
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["id"] != id.as_str()))
        .and_then(|d| d["id"].as_str())
        .map(String::from)
        .with_context(|| format!("the migrate's deployment in {list:?}"))?;
    let refused = belay(&f.addr, &["rollback", "plan", &migrate_id]).await?;
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(
        refused.stderr.contains("not a fleet deployment")
            && refused.stderr.contains(&format!("--target {name}")),
        "{refused:?}"
    );
    let unknown = belay(
        &f.addr,
        &[
            "rollback",
            "execute",
            "00000000-0000-0000-0000-000000000000",
            "--yes",
        ],
    )
    .await?;
    assert_eq!(unknown.code, 66, "{unknown:?}");
    let release = belay(&f.addr, &["rollback", "plan", "--release", "1.0.0"]).await?;
    assert_eq!(release.code, 64, "{release:?}");
    assert!(release.stderr.contains("--target"), "{release:?}");

    let run = belay(
        &f.addr,
        &[
            "rollback",
            "execute",
            &id,
            "--yes",
            "--reason",
            "bad release",
        ],
    )
    .await?;
    assert_eq!(run.code, 0, "{run:?}");
    let doc = show(&f.addr, &id).await?;
    assert_eq!(doc["state"], "rolled_back", "{doc}");
    for (name, db, before) in &f.dbs[..2] {
        assert_eq!(target(&doc, name)["step"], "rolled_back", "{name}: {doc}");
        assert_eq!(
            &belay_e2e::schema(&db.url)?,
            before,
            "{name}'s schema is the pre-deployment one"
        );
    }
    Ok(())
}
