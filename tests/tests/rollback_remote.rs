//! The rollback controller in remote mode: `belay --controller … --target T rollback …`
//! through the controller to the agent owning the target, which plans and runs the
//! rollback beside the database; and fleet deployments with `--on-failure rollback`, each
//! failed target rolled back by its agent and recorded so on the controller. Real
//! controller and agent processes, the real CLI, real PostgreSQL, real pg_dump.

use anyhow::{Context, Result};
use belay_e2e::{
    Daemon, agent, belay, belay_local, controller, psql, show, steps, target, target_toml,
    wait_agents, wait_for,
};
use belay_testkit::{Cluster, TestDb};
use serde_json::Value;
use std::path::Path;
use std::process::Stdio;

const ACCOUNTS: &str = "CREATE TABLE chaos (id int);
     CREATE TABLE accounts (id serial PRIMARY KEY, name text NOT NULL, balance int NOT NULL DEFAULT 10);
     INSERT INTO accounts (name) VALUES ('a'), ('b');";

/// A column and a table, with an undo dropping both.
const V1: &str = "ALTER TABLE accounts ADD COLUMN email text;\nCREATE TABLE sessions (id serial PRIMARY KEY, account_id int REFERENCES accounts (id), token text);\n";
const U1: &str = "DROP TABLE sessions;\nALTER TABLE accounts DROP COLUMN email;\n";

/// Fails while `accounts.email` exists and `chaos` has a row: the application "breaks"
/// on the new schema and is healthy again once it is undone.
const BROKEN: &str = "SELECT count(*) FROM chaos WHERE EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'accounts' AND column_name = 'email')";

fn migrations(dir: &Path) -> Result<std::path::PathBuf> {
    let m = dir.join("m");
    std::fs::create_dir_all(&m)?;
    std::fs::write(m.join("V1__email.sql"), V1)?;
    std::fs::write(m.join("U1__email.sql"), U1)?;
    Ok(m)
}

/// A controller and one agent owning `targets`.
async fn fleet(dir: &Path, targets: &[String]) -> Result<(Daemon, Daemon)> {
    let c = controller(&dir.join("controller.db").to_string_lossy(), &[]).await?;
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"agent-1\"\ncontroller = \"{}\"\n{}",
            c.addr,
            targets.concat()
        ),
    )?;
    let a = agent(&path).await?;
    wait_agents(&c.addr, 1).await?;
    Ok((c, a))
}

/// A target with backups, its rollbacks settling quickly, and `extra` TOML.
fn rb_target(name: &str, db: &TestDb, m: &Path, dir: &Path, extra: &str) -> String {
    target_toml(
        name,
        db,
        m,
        &format!(
            "backup_dir = \"{}\"\n{extra}\n[targets.rollback]\nsettle = \"300ms\"\n",
            dir.join(format!("backups-{name}")).display()
        ),
    )
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

/// What two plans of the same deployment on the same kind of database share (backup ids
/// and live counts aside).
fn plan_shape(plan: &Value) -> Value {
    serde_json::json!({
        "strategy": plan["strategy"],
        "to_version": plan["to_version"],
        "steps": plan["steps"],
        "branches": plan["reasons"].as_array().map(|rs| rs.iter().map(|r| (r["branch"].clone(), r["possible"].clone())).collect::<Vec<_>>()),
        "migrations": plan["migrations"].as_array().map(|ms| ms.iter().map(|m| (m["script"].clone(), m["has_undo"].clone(), m["undo_drops"].clone())).collect::<Vec<_>>()),
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_plan_and_execute_match_local_and_a_second_execute_is_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let cluster = Cluster::shared();
    let (remote_db, local_db) = (
        cluster.create_database().await?,
        cluster.create_database().await?,
    );
    let m = migrations(tmp.path())?;
    for db in [&remote_db, &local_db] {
        psql(&db.url, ACCOUNTS);
    }
    let before = belay_e2e::schema(&remote_db.url)?;
    let (c, _a) = fleet(
        tmp.path(),
        &[rb_target("rb_1", &remote_db, &m, tmp.path(), "")],
    )
    .await?;

    // The same deployment on both: through the fleet (the agent's pipeline and log), and
    // locally.
    let r = belay(&c.addr, &["deploy", "--targets", "rb_1"]).await?;
    assert_eq!(r.code, 0, "{r:?}");
    let remote_id = deployment_id(&r.stdout);
    let backups = tmp.path().join("local-backups");
    let cfg = tmp.path().join("belay.toml");
    std::fs::write(&cfg, "[rollback]\nsettle = \"300ms\"\n")?;
    let cfg = cfg.to_string_lossy().into_owned();
    let backups = backups.to_string_lossy().into_owned();
    let l = belay_local(
        &local_db.url,
        &m,
        &[
            "--config",
            &cfg,
            "--backup-dir",
            &backups,
            "migrate",
            "--output",
            "json",
        ],
    )
    .await?;
    assert_eq!(l.code, 0, "{l:?}");
    let local_id = l.json()["deployment"]["id"]
        .as_str()
        .context("local deployment id")?
        .to_string();
    // Rows written meanwhile, to a table that survives.
    for db in [&remote_db, &local_db] {
        psql(
            &db.url,
            "INSERT INTO accounts (name, email) VALUES ('c', 'c@x'); INSERT INTO sessions (account_id, token) VALUES (1, 't')",
        );
    }

    let remote = ["--target", "rb_1", "rollback"];
    let args = |extra: &[&str]| -> Vec<String> {
        remote
            .iter()
            .chain(extra.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let run = |a: Vec<String>| {
        let addr = c.addr.clone();
        async move {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            belay(&addr, &a).await
        }
    };

    // `list` names the fleet deployment on the target's record.
    let r = run(args(&["list", "--output", "json"])).await?;
    assert_eq!(r.code, 0, "{r:?}");
    let rows = r.json()["deployments"].clone();
    assert_eq!(rows[0]["id"], remote_id, "{rows}");
    assert_eq!(rows[0]["can_roll_back"], true, "{rows}");

    // The same plan in both modes.
    let rp = run(args(&["plan", &remote_id[..8], "--output", "json"])).await?;
    assert_eq!(rp.code, 0, "{rp:?}");
    let lp = belay_local(
        &local_db.url,
        &m,
        &[
            "--config",
            &cfg,
            "--backup-dir",
            &backups,
            "rollback",
            "plan",
            &local_id[..8],
            "--output",
            "json",
        ],
    )
    .await?;
    assert_eq!(lp.code, 0, "{lp:?}");
    let (rplan, lplan) = (rp.json()["plan"].clone(), lp.json()["plan"].clone());
    assert_eq!(rplan["strategy"], "undo", "{rplan}");
    assert_eq!(
        plan_shape(&rplan),
        plan_shape(&lplan),
        "remote {rplan}\nlocal {lplan}"
    );
    // The same text too.
    let rt = run(args(&["plan", &remote_id[..8]])).await?;
    assert_eq!(rt.code, 0, "{rt:?}");
    assert!(rt.stdout.contains("rollback plan for rb_1"), "{rt:?}");
    assert!(rt.stdout.contains("what each path loses:"), "{rt:?}");

    // Execute through the controller: rolled back and verified, as locally.
    let rx = run(args(&[
        "execute",
        &remote_id[..8],
        "--yes",
        "--output",
        "json",
    ]))
    .await?;
    assert_eq!(rx.code, 0, "{rx:?}");
    let lx = belay_local(
        &local_db.url,
        &m,
        &[
            "--config",
            &cfg,
            "--backup-dir",
            &backups,
            "rollback",
            "execute",
            &local_id[..8],
            "--yes",
            "--output",
            "json",
        ],
    )
    .await?;
    assert_eq!(lx.code, 0, "{lx:?}");
    let (rdoc, ldoc) = (rx.json(), lx.json());
    assert_eq!(rdoc["state"], "rolled_back", "{rdoc}");
    assert_eq!(rdoc["state"], ldoc["state"]);
    assert_eq!(rdoc["report"]["strategy"], ldoc["report"]["strategy"]);
    let step_names = |d: &Value| -> Vec<String> {
        d["report"]["steps"]
            .as_array()
            .map(|s| {
                s.iter()
                    .map(|x| format!("{}:{}", x["step"], x["result"]))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(step_names(&rdoc), step_names(&ldoc), "{rdoc}\n{ldoc}");
    // Schema as before the deployment; the rows written meanwhile to accounts kept; the
    // dropped data recoverable from the snapshot the report names.
    assert_eq!(belay_e2e::schema(&remote_db.url)?, before);
    assert_eq!(belay_e2e::schema(&local_db.url)?, before);
    assert_eq!(
        psql(
            &remote_db.url,
            "SELECT string_agg(name, ',' ORDER BY id) FROM accounts"
        ),
        "a,b,c"
    );
    assert!(
        rdoc["report"]["backups"]["recover_command"]
            .as_str()
            .is_some_and(|c| c.starts_with("belay backup restore")),
        "{rdoc}"
    );
    // The text of an execute streams each step as the agent records it.
    let status = run(args(&["status", &remote_id[..8], "--output", "json"])).await?;
    assert_eq!(status.code, 0, "{status:?}");
    let st = status.json();
    assert_eq!(st["state"], "rolled_back", "{st}");
    assert_eq!(st["report"]["result"], "rolled_back", "{st}");
    assert!(
        st["steps"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x["step"] == "undo" && x["result"] == "ok")),
        "{st}"
    );

    // The controller ran this deployment: its record shows the rollback too.
    let doc = show(&c.addr, &remote_id).await?;
    let t = target(&doc, "rb_1");
    assert_eq!(t["step"], "rolled_back", "{t}");
    assert!(
        t["events"].as_array().is_some_and(|es| es
            .iter()
            .any(|e| e["kind"] == "rollback_step" && e["payload"]["rollback_step"] == "undo")),
        "{t}"
    );

    // Never two rollbacks of one deployment: a second is refused, naming it.
    let again = run(args(&["execute", &remote_id[..8], "--yes"])).await?;
    assert_eq!(again.code, 2, "{again:?}");
    assert!(again.stderr.contains(&remote_id), "{again:?}");
    assert!(again.stderr.contains("already rolled back"), "{again:?}");
    let status = run(args(&["status", &remote_id[..8], "--output", "json"])).await?;
    assert_eq!(status.json()["state"], "rolled_back");
    // An unknown target is refused by the controller, naming it.
    let r = belay(&c.addr, &["--target", "nope", "rollback", "list"]).await?;
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("nope"), "{r:?}");
    Ok(())
}

/// A fleet deployment with `--on-failure rollback` whose target fails at `step`: its
/// agent rolls it back, and the controller records it `rolled_back`.
async fn rolled_back_by_its_agent(
    name: &str,
    extra: &str,
    deploy: &[&str],
    step: &str,
) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let db = Cluster::shared().create_database().await?;
    let m = migrations(tmp.path())?;
    psql(&db.url, ACCOUNTS);
    psql(&db.url, "INSERT INTO chaos VALUES (1)");
    let before = belay_e2e::schema(&db.url)?;
    let (c, _a) = fleet(tmp.path(), &[rb_target(name, &db, &m, tmp.path(), extra)]).await?;
    let mut args = vec!["deploy", "--targets", name, "--on-failure", "rollback"];
    args.extend_from_slice(deploy);
    let r = belay(&c.addr, &args).await?;
    assert_eq!(r.code, 1, "{r:?}");
    let id = deployment_id(&r.stdout);
    let doc = show(&c.addr, &id).await?;
    assert_eq!(doc["state"], "failed", "{doc}");
    let t = target(&doc, name);
    assert_eq!(t["failed_step"], step, "{t}");
    assert_eq!(t["step"], "rolled_back", "{t}");
    assert_eq!(t["outcome"]["state"], "rolled_back", "{t}");
    assert!(
        t["message"]
            .as_str()
            .unwrap_or("")
            .contains("rolled back by its agent"),
        "{t}"
    );
    let s = steps(&t["events"]);
    assert_eq!(
        &s[s.len() - 3..],
        ["failed", "rolling_back", "rolled_back"],
        "{t}"
    );
    // The rollback's own steps were recorded on the controller as they streamed.
    let events = t["events"].as_array().context("events")?;
    assert!(
        events.iter().any(|e| e["kind"] == "rollback_step"
            && e["payload"]["rollback_step"] == "undo"
            && e["step"] == "rolling_back"),
        "{t}"
    );
    assert!(events.iter().any(|e| e["kind"] == "incident_report"), "{t}");
    assert_eq!(belay_e2e::schema(&db.url)?, before);
    assert_eq!(psql(&db.url, "SELECT count(*) FROM accounts"), "2");
    // The agent's record says the same, and the rollback's report is there.
    let st = belay(
        &c.addr,
        &[
            "--target",
            name,
            "rollback",
            "status",
            &id[..8],
            "--output",
            "json",
        ],
    )
    .await?;
    assert_eq!(st.code, 0, "{st:?}");
    assert_eq!(st.json()["state"], "rolled_back", "{st:?}");
    assert_eq!(st.json()["report"]["trigger"]["step"], step, "{st:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_target_failing_at_validating_is_rolled_back_by_its_agent() -> Result<()> {
    rolled_back_by_its_agent(
        "val_rb",
        &format!(
            "[[targets.checks]]\nname = \"app_ok\"\nquery = \"{BROKEN}\"\nexpect = \"zero\"\n"
        ),
        &[],
        "validating",
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_target_failing_at_watching_is_rolled_back_by_its_agent() -> Result<()> {
    rolled_back_by_its_agent(
        "watch_rb",
        &format!(
            "[[targets.probes]]\nname = \"app\"\nperiod = \"100ms\"\nfailure_threshold = 3\n[targets.probes.sql]\nquery = \"{BROKEN}\"\nexpect = \"zero\"\n"
        ),
        &["--watch", "60s"],
        "watching",
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn abort_stops_a_remote_rollback_between_steps_and_execute_then_refuses() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let db = Cluster::shared().create_database().await?;
    let m = migrations(tmp.path())?;
    psql(&db.url, ACCOUNTS);
    let gate = tmp.path().join("gate");
    let entered = tmp.path().join("entered");
    // The `before` hook says it started, then waits for the test to open the gate: the
    // abort arrives while a step is under way.
    let hook = format!(
        "[targets.rollback.before]\ncommand = \"touch {}; while [ ! -e {} ]; do sleep 0.05; done\"\ntimeout = \"60s\"\n",
        entered.display(),
        gate.display()
    );
    let t = rb_target("ab_1", &db, &m, tmp.path(), "").replace(
        "[targets.rollback]\nsettle = \"300ms\"\n",
        &format!("[targets.rollback]\nsettle = \"300ms\"\n{hook}"),
    );
    let (c, _a) = fleet(tmp.path(), &[t]).await?;
    let r = belay(&c.addr, &["deploy", "--targets", "ab_1"]).await?;
    assert_eq!(r.code, 0, "{r:?}");
    let id = deployment_id(&r.stdout);
    let with_schema = belay_e2e::schema(&db.url)?;

    let exe = belay_e2e::binary("belay")?;
    let execute = tokio::process::Command::new(&exe)
        .args([
            "--controller",
            &c.addr,
            "--target",
            "ab_1",
            "rollback",
            "execute",
            &id[..8],
            "--yes",
            "--output",
            "json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    wait_for("the before hook to start", || {
        let entered = entered.clone();
        async move { Ok(entered.exists()) }
    })
    .await?;
    // Running now, at its hook: status says so.
    let st = belay(
        &c.addr,
        &[
            "--target",
            "ab_1",
            "rollback",
            "status",
            &id[..8],
            "--output",
            "json",
        ],
    )
    .await?;
    assert_eq!(st.json()["state"], "rolling_back", "{st:?}");
    assert_eq!(st.json()["running"], true, "{st:?}");
    let abort = {
        let addr = c.addr.clone();
        tokio::spawn(async move {
            belay(
                &addr,
                &["--target", "ab_1", "rollback", "abort", "--output", "json"],
            )
            .await
        })
    };
    // The abort is asked for while the hook runs; the hook then ends, and the rollback
    // stops before its next step.
    wait_for("the abort to reach the agent", || {
        let addr = c.addr.clone();
        let id = id.clone();
        async move {
            let st = belay(
                &addr,
                &[
                    "--target",
                    "ab_1",
                    "rollback",
                    "status",
                    &id[..8],
                    "--output",
                    "json",
                ],
            )
            .await?;
            Ok(st.json()["abort_requested"].is_string())
        }
    })
    .await?;
    std::fs::write(&gate, "")?;
    let aborted = abort.await??;
    let out = execute.wait_with_output().await?;
    assert_eq!(aborted.code, 0, "{aborted:?}");
    let a = aborted.json();
    assert_eq!(a["state"], "escalated", "{a}");
    let stop = a["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|x| x["step"] == "aborted"))
        .context("an aborted step")?;
    assert!(
        stop["error"]
            .as_str()
            .unwrap_or("")
            .contains("before_hook (ok)"),
        "{stop}"
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // Nothing past the hook ran: the deployment's schema is as it was.
    assert_eq!(belay_e2e::schema(&db.url)?, with_schema);
    // Execute afterwards refuses, saying why.
    let again = belay(
        &c.addr,
        &["--target", "ab_1", "rollback", "execute", &id[..8], "--yes"],
    )
    .await?;
    assert_eq!(again.code, 2, "{again:?}");
    assert!(again.stderr.contains("escalated"), "{again:?}");
    Ok(())
}

/// What a webhook receiver in the test got: each request's path and JSON body.
type Got = std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>;

/// An HTTP receiver on 127.0.0.1:0 answering 202 to every POST.
async fn receiver() -> Result<(String, Got)> {
    let got: Got = Default::default();
    let state = got.clone();
    let app = axum::Router::new().fallback(axum::routing::post(
        move |uri: axum::http::Uri, body: axum::body::Bytes| {
            let state = state.clone();
            async move {
                let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
                if let Ok(mut g) = state.lock() {
                    g.push((uri.path().to_string(), json));
                }
                axum::http::StatusCode::ACCEPTED
            }
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((format!("http://{addr}"), got))
}

/// Splits a command as `sh` would (plain words and single quotes: what
/// `belay_rollback::shell_quote` writes).
fn sh_words(command: &str) -> Vec<String> {
    let (mut words, mut word, mut quoted, mut any) = (Vec::new(), String::new(), false, false);
    for c in command.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                any = false;
            }
            '\\' if !quoted => {}
            c => word.push(c),
        }
    }
    if any || !word.is_empty() {
        words.push(word);
    }
    words
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_sends_its_targets_reports_and_records_an_ask_command_runnable_as_printed()
-> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (hooks, got) = receiver().await?;
    let key = tmp.path().join("pd.key");
    std::fs::write(&key, "AGENTR0UTING\n")?;
    let m = migrations(tmp.path())?;
    let check =
        format!("[[targets.checks]]\nname = \"app_ok\"\nquery = \"{BROKEN}\"\nexpect = \"zero\"\n");
    // `ntf_rb` rolls back at once and reports to both webhooks; `ask_rb` waits.
    let (auto_db, ask_db) = (
        Cluster::shared().create_database().await?,
        Cluster::shared().create_database().await?,
    );
    for db in [&auto_db, &ask_db] {
        psql(&db.url, ACCOUNTS);
        psql(&db.url, "INSERT INTO chaos VALUES (1)");
    }
    let auto = format!(
        "{}[[targets.rollback.notify]]\nurl = \"{hooks}/report\"\nformat = \"json\"\n\n[[targets.rollback.notify]]\nurl = \"{hooks}/enqueue\"\nformat = \"pagerduty\"\nrouting_key_file = \"pd.key\"\n",
        rb_target("ntf_rb", &auto_db, &m, tmp.path(), &check)
    );
    let ask = format!(
        "{}policy = \"ask\"\n",
        rb_target("ask_rb", &ask_db, &m, tmp.path(), &check)
    );
    let (c, _a) = fleet(tmp.path(), &[auto, ask]).await?;

    // The agent ran the rollback, so the agent sent the report.
    let r = belay(
        &c.addr,
        &["deploy", "--targets", "ntf_rb", "--on-failure", "rollback"],
    )
    .await?;
    assert_eq!(r.code, 1, "{r:?}");
    let id = deployment_id(&r.stdout);
    let got_now = got.lock().map(|g| g.clone()).unwrap_or_default();
    let paths: Vec<&str> = got_now.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths.iter().filter(|p| **p == "/report").count(),
        1,
        "{got_now:?}"
    );
    let report = &got_now
        .iter()
        .find(|(p, _)| p == "/report")
        .context("a report")?
        .1;
    assert_eq!(report["target"], "ntf_rb");
    assert_eq!(report["result"], "rolled_back");
    let pd: Vec<&Value> = got_now
        .iter()
        .filter(|(p, _)| p == "/enqueue")
        .map(|(_, b)| b)
        .collect();
    assert_eq!(pd.len(), 2, "{got_now:?}");
    assert_eq!(pd[0]["event_action"], "trigger");
    assert_eq!(pd[0]["routing_key"], "AGENTR0UTING");
    assert_eq!(pd[0]["payload"]["source"], "ntf_rb");
    assert_eq!(pd[1]["event_action"], "resolve");
    assert_eq!(pd[1]["dedup_key"], pd[0]["dedup_key"]);
    // Recorded by the agent, shown by `rollback status` through the controller.
    let st = belay(
        &c.addr,
        &[
            "--target",
            "ntf_rb",
            "rollback",
            "status",
            &id[..8],
            "--output",
            "json",
        ],
    )
    .await?;
    assert_eq!(st.code, 0, "{st:?}");
    let notes = st.json()["notifications"].clone();
    assert_eq!(notes.as_array().map(Vec::len), Some(3), "{notes}");
    assert!(
        notes
            .as_array()
            .into_iter()
            .flatten()
            .all(|n| n["ok"] == true && n["status"] == 202),
        "{notes}"
    );

    // `ask`: the plan is recorded with a command that reaches this target through the
    // controller; run as printed, it rolls the deployment back.
    let r = belay(
        &c.addr,
        &["deploy", "--targets", "ask_rb", "--on-failure", "rollback"],
    )
    .await?;
    assert_eq!(r.code, 1, "{r:?}");
    let id = deployment_id(&r.stdout);
    let doc = show(&c.addr, &id).await?;
    let t = target(&doc, "ask_rb");
    let command = t["events"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["kind"] == "rollback_plan")
        .and_then(|e| e["payload"]["command"].as_str())
        .with_context(|| format!("no recorded command in {t}"))?
        .to_string();
    let words = sh_words(&command);
    assert_eq!(words[0], "belay", "{command}");
    assert!(
        command.contains(&format!(
            "--controller {} --target ask_rb rollback execute",
            c.addr
        )),
        "{command}"
    );
    let out = tokio::process::Command::new(belay_e2e::binary("belay")?)
        .args(&words[1..])
        .env_remove("BELAY_CONTROLLER")
        .env_remove("BELAY_TARGET")
        .env_remove("BELAY_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .current_dir(tmp.path())
        .stdin(Stdio::null())
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{command}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = belay(
        &c.addr,
        &[
            "--target",
            "ask_rb",
            "rollback",
            "status",
            &id[..8],
            "--output",
            "json",
        ],
    )
    .await?;
    assert_eq!(st.json()["state"], "rolled_back", "{st:?}");
    Ok(())
}
