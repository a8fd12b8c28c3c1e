//! A rollback survives kill -9 at every step: the agent running it is killed (SIGKILL) at
//! each step boundary (failpoints, `BELAY_FAILPOINTS`), restarted, and `rollback status`
//! shows the step under way and what `execute` does next; `execute` then resumes and ends
//! `rolled_back` with the schema as before the deployment. Two processes executing one
//! deployment's rollback give exactly one rollback. Real controller, agents and CLI, real
//! PostgreSQL and pg_dump.

use anyhow::{Context, Result};
use belay_e2e::{Daemon, belay, belay_local, binary, controller, psql, target_toml, wait_for};
use belay_testkit::{Cluster, TestDb};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};

const ACCOUNTS: &str = "CREATE TABLE accounts (id serial PRIMARY KEY, name text NOT NULL);
     INSERT INTO accounts (name) VALUES ('a'), ('b');";
const V1: &str = "ALTER TABLE accounts ADD COLUMN email text;\nCREATE TABLE sessions (id serial PRIMARY KEY, token text);\n";
const U1: &str = "DROP TABLE sessions;\nALTER TABLE accounts DROP COLUMN email;\n";
/// No undo: the planner restores the table from the pre-deployment backup.
const V1_NO_UNDO: &str = "ALTER TABLE accounts ADD COLUMN email text;\n";

fn migrations(dir: &Path, with_undo: bool) -> Result<PathBuf> {
    let m = dir.join(if with_undo { "m-undo" } else { "m-restore" });
    std::fs::create_dir_all(&m)?;
    if with_undo {
        std::fs::write(m.join("V1__email.sql"), V1)?;
        std::fs::write(m.join("U1__email.sql"), U1)?;
    } else {
        std::fs::write(m.join("V1__email.sql"), V1_NO_UNDO)?;
    }
    Ok(m)
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

/// The step names of a `rollback status --output json`, in order.
fn step_names(status: &Value) -> Vec<String> {
    status["steps"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter_map(|s| s["step"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn paused(fp: &str) -> String {
    format!("belay failpoint {fp}: paused")
}

/// One kill: where the agent stops, and what `status` must say afterwards.
struct Case {
    failpoint: &'static str,
    /// Undo (with an undo script) or table restore (without).
    undo: bool,
    /// The step `status` shows started and not ended.
    under_way: Option<&'static str>,
    /// Where `execute` resumes.
    from: &'static str,
}

const CASES: &[Case] = &[
    Case {
        failpoint: "rollback.before_before_hook",
        undo: true,
        under_way: Some("before_hook"),
        from: "before_hook",
    },
    Case {
        failpoint: "rollback.after_emergency_backup",
        undo: true,
        under_way: Some("emergency_backup"),
        from: "emergency_backup",
    },
    Case {
        failpoint: "rollback.before_undo",
        undo: true,
        under_way: Some("undo"),
        from: "undo",
    },
    Case {
        failpoint: "rollback.after_undo",
        undo: true,
        under_way: Some("undo"),
        from: "undo",
    },
    Case {
        failpoint: "rollback.before_verify_history",
        undo: true,
        under_way: Some("verify_history"),
        from: "verify_history",
    },
    Case {
        failpoint: "rollback.after_after_hook",
        undo: true,
        under_way: Some("after_hook"),
        from: "verify_history",
    },
    Case {
        failpoint: "rollback.after_incident_report",
        undo: true,
        under_way: None,
        from: "verify_history",
    },
    Case {
        failpoint: "rollback.before_table_restore",
        undo: false,
        under_way: Some("table_restore"),
        from: "table_restore",
    },
    Case {
        failpoint: "rollback.after_table_restore",
        undo: false,
        under_way: Some("table_restore"),
        from: "table_restore",
    },
    Case {
        failpoint: "rollback.after_record_history",
        undo: false,
        under_way: Some("record_history"),
        from: "record_history",
    },
];

/// An agent's config: one target with backups, hooks and a short settle.
fn agent_toml(path: &Path, name: &str, controller: &str, db: &TestDb, m: &Path) -> Result<()> {
    let dir = path.parent().context("config dir")?;
    let target = target_toml(
        name,
        db,
        m,
        &format!(
            "backup_dir = \"{}\"\n[targets.rollback]\nsettle = \"200ms\"\n[targets.rollback.before]\ncommand = \"true\"\n[targets.rollback.after]\ncommand = \"true\"\n",
            dir.join(format!("backups-{name}")).display()
        ),
    );
    std::fs::write(
        path,
        format!("name = \"agent-{name}\"\ncontroller = \"{controller}\"\n{target}"),
    )?;
    Ok(())
}

async fn start_agent(config: &Path, failpoint: Option<&str>) -> Result<Daemon> {
    let config = config.to_string_lossy().into_owned();
    let armed = failpoint.map(|f| format!("{f}=pause"));
    let env: Vec<(&str, &str)> = armed
        .as_deref()
        .map(|a| vec![("BELAY_FAILPOINTS", a)])
        .unwrap_or_default();
    Daemon::start(
        "belay-agent",
        &["--listen", "127.0.0.1:0", "--config", &config],
        &env,
    )
    .await
}

/// `rollback status ID --output json` through the controller, once the target's agent
/// answers.
async fn status(addr: &str, target: &str, id: &str) -> Result<Value> {
    let doc = std::sync::Arc::new(std::sync::Mutex::new(Value::Null));
    wait_for("the target's agent to answer rollback status", || {
        let doc = doc.clone();
        async move {
            let r = belay(
                addr,
                &[
                    "--target", target, "rollback", "status", id, "--output", "json",
                ],
            )
            .await?;
            if r.code == 0
                && let Ok(mut d) = doc.lock()
            {
                *d = r.json();
            }
            Ok(r.code == 0)
        }
    })
    .await?;
    let doc = doc.lock().map(|d| d.clone()).unwrap_or_default();
    Ok(doc)
}

async fn kill_at(c: &Daemon, tmp: &Path, i: usize, case: &Case) -> Result<()> {
    let fp = case.failpoint;
    let db = Cluster::shared().create_database().await?;
    psql(&db.url, ACCOUNTS);
    let before = belay_e2e::schema(&db.url)?;
    let m = migrations(tmp, case.undo)?;
    let name = format!("rs_{i}");
    let config = tmp.join(format!("agent-{i}.toml"));
    agent_toml(&config, &name, &c.addr, &db, &m)?;
    let mut a = start_agent(&config, Some(fp)).await?;
    wait_for("the agent to own its target", || async {
        Ok(belay(&c.addr, &["--target", &name, "rollback", "list"])
            .await?
            .code
            == 0)
    })
    .await?;
    let r = belay(&c.addr, &["deploy", "--targets", &name]).await?;
    assert_eq!(r.code, 0, "{fp}: {r:?}");
    let id = deployment_id(&r.stdout);
    let short = id[..8].to_string();

    let execute = {
        let (addr, name, short) = (c.addr.clone(), name.clone(), short.clone());
        tokio::spawn(async move {
            belay(
                &addr,
                &["--target", &name, "rollback", "execute", &short, "--yes"],
            )
            .await
        })
    };
    wait_for(&format!("the agent to pause at {fp}"), || async {
        Ok(a.log_so_far().contains(&paused(fp)))
    })
    .await?;
    a.kill().await?;
    let cut = execute.await??;
    assert_ne!(cut.code, 0, "{fp}: the execute whose agent died: {cut:?}");

    // Restarted without failpoints: the record says exactly where it stopped.
    let _a = start_agent(&config, None).await?;
    let st = status(&c.addr, &name, &short).await?;
    assert_eq!(st["state"], "rolling_back", "{fp}: {st}");
    assert_eq!(st["running"], false, "{fp}: {st}");
    assert_eq!(
        st["under_way"].as_str(),
        case.under_way,
        "{fp}: the step under way: {st}"
    );
    let next = st["next"].as_str().unwrap_or_default();
    assert!(
        next.contains("interrupted") && next.contains(&format!("from {}", case.from)),
        "{fp}: next should resume from {}: {next}",
        case.from
    );
    let emergency_before = st["steps"]
        .as_array()
        .and_then(|s| {
            s.iter()
                .find(|s| s["step"] == "emergency_backup" && s["result"] == "ok")
        })
        .and_then(|s| s["detail"].as_str())
        .map(String::from);

    // `plan` shows the recorded plan and what execute does with it.
    let p = belay(
        &c.addr,
        &[
            "--target", &name, "rollback", "plan", &short, "--output", "json",
        ],
    )
    .await?;
    assert_eq!(p.code, 0, "{fp}: {p:?}");
    let resume = p.json()["plan"]["resume"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        resume.contains(&format!("from {}", case.from)),
        "{fp}: {resume}"
    );

    let r = belay(
        &c.addr,
        &[
            "--target", &name, "rollback", "execute", &short, "--yes", "--output", "json",
        ],
    )
    .await?;
    assert_eq!(r.code, 0, "{fp}: the resumed execute: {r:?}");
    let out = r.json();
    assert_eq!(out["state"], "rolled_back", "{fp}: {out}");
    assert_eq!(
        belay_e2e::schema(&db.url)?,
        before,
        "{fp}: the schema is as before the deployment"
    );

    let st = status(&c.addr, &name, &short).await?;
    assert_eq!(st["state"], "rolled_back", "{fp}: {st}");
    let steps = step_names(&st);
    let resumed = st["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["step"] == "resumed"))
        .and_then(|s| s["detail"].as_str())
        .unwrap_or_default();
    assert!(
        resumed.contains(&format!("resuming at {}", case.from)),
        "{fp}: the resumed step names where: {resumed}; steps {steps:?}"
    );
    // The strategy ran to its end once, as recorded (a re-run undo finds nothing left).
    let strategy = if case.undo { "undo" } else { "table_restore" };
    let ok_runs = st["steps"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter(|s| s["step"] == strategy && s["result"] == "ok")
                .count()
        })
        .unwrap_or_default();
    assert_eq!(ok_runs, 1, "{fp}: {steps:?}");
    // A verified emergency backup of the first attempt is reused, not taken again.
    if let Some(detail) = emergency_before {
        let taken = st["steps"]
            .as_array()
            .map(|s| s.iter().filter(|s| s["step"] == "emergency_backup").count())
            .unwrap_or_default();
        assert_eq!(taken, 1, "{fp}: {detail}; {steps:?}");
        let id = detail
            .trim_start_matches("backup ")
            .split(' ')
            .next()
            .unwrap_or_default();
        assert_eq!(out["report"]["backups"]["emergency"], id, "{fp}: {out}");
    }
    // Rolled back once: a further execute is refused as done.
    let again = belay(
        &c.addr,
        &["--target", &name, "rollback", "execute", &short, "--yes"],
    )
    .await?;
    assert_eq!(again.code, 2, "{fp}: {again:?}");
    assert!(
        again.stderr.contains("already rolled back"),
        "{fp}: {again:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_at_each_rollback_step_resumes_to_rolled_back() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let c = controller(&tmp.path().join("controller.db").to_string_lossy(), &[]).await?;
    for (i, case) in CASES.iter().enumerate() {
        kill_at(&c, tmp.path(), i, case).await?;
    }
    Ok(())
}

/// A local `belay rollback execute` that pauses at `failpoint`; returns once it did.
async fn paused_local(
    url: &str,
    m: &Path,
    args: &[&str],
    failpoint: &str,
) -> Result<tokio::process::Child> {
    let mut child = tokio::process::Command::new(binary("belay")?)
        .arg("--dir")
        .arg(m)
        .args(args)
        .env("BELAY_DATABASE_URL", url)
        .env("BELAY_FAILPOINTS", format!("{failpoint}=pause"))
        .env_remove("DATABASE_URL")
        .env_remove("BELAY_CONTROLLER")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let want = paused(failpoint);
    let found = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if line.contains(&want) {
                return Ok::<_, anyhow::Error>(true);
            }
        }
        Ok(false)
    })
    .await
    .context("the first execute did not reach its failpoint within 60 s")??;
    anyhow::ensure!(found, "the first execute ended before its failpoint");
    // Keep draining so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(child)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_executing_one_rollback_give_exactly_one() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let db = Cluster::shared().create_database().await?;
    psql(&db.url, ACCOUNTS);
    let before = belay_e2e::schema(&db.url)?;
    let m = migrations(tmp.path(), true)?;
    let cfg = tmp.path().join("belay.toml");
    std::fs::write(&cfg, "[rollback]\nsettle = \"200ms\"\n")?;
    let cfg = cfg.to_string_lossy().into_owned();
    let backups = tmp.path().join("backups").to_string_lossy().into_owned();
    let base = ["--config", cfg.as_str(), "--backup-dir", backups.as_str()];
    let with = |extra: &[&'static str]| -> Vec<String> {
        base.iter()
            .chain(extra.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let run = |a: Vec<String>| {
        let (url, m) = (db.url.clone(), m.clone());
        async move {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            belay_local(&url, &m, &a).await
        }
    };
    let r = run(with(&["migrate", "--output", "json"])).await?;
    assert_eq!(r.code, 0, "{r:?}");
    let id = r.json()["deployment"]["id"]
        .as_str()
        .context("deployment id")?
        .to_string();
    let short = id[..8].to_string();

    // Process A is mid-rollback (its undo started), holding the deployment's lock.
    let mut first: Vec<String> = with(&["rollback", "execute"]);
    first.extend([short.clone(), "--yes".into()]);
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    let mut a = paused_local(&db.url, &m, &first, "rollback.before_undo").await?;

    // Process B: refused, naming the other process; status says it runs elsewhere.
    let mut second = with(&["rollback", "execute"]);
    second.extend([short.clone(), "--yes".into()]);
    let b = run(second.clone()).await?;
    assert_eq!(b.code, 2, "{b:?}");
    assert!(
        b.stderr.contains("running in another process"),
        "the refusal names the other process: {b:?}"
    );
    let mut st = with(&["rollback", "status"]);
    st.extend([short.clone(), "--output".into(), "json".into()]);
    let s = run(st.clone()).await?;
    assert_eq!(s.code, 0, "{s:?}");
    let s = s.json();
    assert_eq!(s["state"], "rolling_back", "{s}");
    assert_eq!(s["under_way"], "undo", "{s}");
    assert!(
        s["next"]
            .as_str()
            .is_some_and(|n| n.contains("running in another process")),
        "{s}"
    );

    // A dies (kill -9): its session, and so its lock, goes with it; C resumes.
    a.kill().await?;
    let c = run(second.clone()).await?;
    assert_eq!(c.code, 0, "the resumed execute: {c:?}");
    assert_eq!(belay_e2e::schema(&db.url)?, before);
    let d = run(second).await?;
    assert_eq!(d.code, 2, "{d:?}");
    assert!(d.stderr.contains("already rolled back"), "{d:?}");

    // Exactly one rollback: one plan recorded, one undo that ran.
    let s = run(st).await?.json();
    assert_eq!(s["state"], "rolled_back", "{s}");
    let steps = step_names(&s);
    assert_eq!(
        steps.iter().filter(|s| *s == "undo").count(),
        1,
        "{steps:?}"
    );
    assert_eq!(
        steps.iter().filter(|s| *s == "resumed").count(),
        1,
        "{steps:?}"
    );
    let undone = psql(
        &db.url,
        "SELECT count(*) FROM belay.schema_history WHERE type = 'UNDO_SQL'",
    );
    assert_eq!(undone, "1", "one undo in the history");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_killed_during_a_routed_rollback_takes_the_agents_outcome_after_restart()
-> Result<()> {
    let tmp = tempfile::tempdir()?;
    let db = Cluster::shared().create_database().await?;
    psql(&db.url, ACCOUNTS);
    let before = belay_e2e::schema(&db.url)?;
    let m = migrations(tmp.path(), true)?;
    let store = tmp
        .path()
        .join("controller.db")
        .to_string_lossy()
        .into_owned();
    let mut c = controller(&store, &[]).await?;
    // The `before` hook (maintenance mode on) says it started, then waits on a FIFO the
    // test writes to once the controller is dead: the rollback is held there, no sleeps.
    let (started, gate) = (tmp.path().join("hook-started"), tmp.path().join("gate"));
    let made = std::process::Command::new("mkfifo").arg(&gate).status()?;
    anyhow::ensure!(made.success(), "mkfifo failed");
    let hook = format!(
        "touch '{}' && read line < '{}'",
        started.display(),
        gate.display()
    );
    let config = tmp.path().join("agent.toml");
    let target = target_toml(
        "rc_1",
        &db,
        &m,
        &format!(
            "backup_dir = \"{}\"\n[targets.rollback]\nsettle = \"200ms\"\n[targets.rollback.before]\ncommand = \"{}\"\ntimeout = \"60s\"\n",
            tmp.path().join("backups").display(),
            hook.replace('\\', "\\\\").replace('"', "\\\"")
        ),
    );
    std::fs::write(
        &config,
        format!("name = \"agent-rc\"\ncontroller = \"{}\"\n{target}", c.addr),
    )?;
    let _a = start_agent(&config, None).await?;
    belay_e2e::wait_agents(&c.addr, 1).await?;
    let r = belay(&c.addr, &["deploy", "--targets", "rc_1"]).await?;
    assert_eq!(r.code, 0, "{r:?}");
    let id = deployment_id(&r.stdout);

    let execute = {
        let (addr, id) = (c.addr.clone(), id.clone());
        tokio::spawn(async move {
            belay(
                &addr,
                &["--target", "rc_1", "rollback", "execute", &id, "--yes"],
            )
            .await
        })
    };
    wait_for("the before hook to start", || async {
        Ok(started.exists())
    })
    .await?;
    // The agent's events reach the controller's store through a stream: kill it once it
    // recorded the target rolling back, as a controller dying mid-rollback would have.
    wait_for(
        "the controller to record the rollback under way",
        || async {
            let doc = belay_e2e::show(&c.addr, &id).await?;
            Ok(belay_e2e::target(&doc, "rc_1")["step"] == "rolling_back")
        },
    )
    .await?;
    c.kill().await?;
    let cut = execute.await??;
    assert_ne!(cut.code, 0, "the caller lost its controller: {cut:?}");
    let shown_before: Value = {
        // The store as the dead controller left it: the target still rolling back.
        let mut c_read = controller(&store, &[]).await?;
        let doc = belay_e2e::show(&c_read.addr, &id).await;
        c_read.kill().await?;
        doc?
    };
    assert_eq!(
        belay_e2e::target(&shown_before, "rc_1")["step"],
        "rolling_back",
        "{shown_before}"
    );
    // The rollback goes on on the agent, without any controller.
    let gate_w = gate.clone();
    tokio::task::spawn_blocking(move || std::fs::write(gate_w, "go\n")).await??;
    wait_for("the agent to finish the rollback", || async {
        Ok(psql(
            &db.url,
            &format!("SELECT step FROM belay.deployments WHERE id = '{id}'"),
        ) == "rolled_back")
    })
    .await?;
    assert_eq!(belay_e2e::schema(&db.url)?, before);

    // Restarted at the same address over the same store: the agent registers again and
    // the controller's record takes the agent's outcome, with the steps it missed.
    let c2 = controller(&store, &["--listen", &c.addr]).await?;
    wait_for("the controller's record to say rolled_back", || async {
        let doc = belay_e2e::show(&c2.addr, &id).await?;
        Ok(belay_e2e::target(&doc, "rc_1")["step"] == "rolled_back")
    })
    .await?;
    let doc = belay_e2e::show(&c2.addr, &id).await?;
    let events = belay_e2e::target(&doc, "rc_1")["events"].clone();
    let rollback_steps: Vec<String> = events
        .as_array()
        .map(|es| {
            es.iter()
                .filter(|e| e["kind"] == "rollback_step")
                .filter_map(|e| e["payload"]["rollback_step"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    for step in [
        "before_hook",
        "emergency_backup",
        "undo",
        "verify_history",
        "verify_probes",
    ] {
        assert_eq!(
            rollback_steps.iter().filter(|s| *s == step).count(),
            1,
            "{step} once in {rollback_steps:?}"
        );
    }
    assert!(
        events
            .as_array()
            .is_some_and(|es| es.iter().any(|e| e["kind"] == "incident_report")),
        "the incident report is stored too"
    );
    assert!(
        events
            .as_array()
            .is_some_and(|es| es.iter().any(|e| e["message"]
                .as_str()
                .is_some_and(|m| m.contains("reconciled from agent agent-rc's record")))),
        "{events}"
    );
    let r = belay(&c2.addr, &["deployments", "show", &id, "--report"]).await?;
    assert_eq!(r.code, 0, "the report through the controller: {r:?}");
    Ok(())
}
