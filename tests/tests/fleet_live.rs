//! Fleet deployments kept honest over time and across crashes: the canary soak gates the
//! waves after it, and a deployment whose agent or controller is killed (SIGKILL) at a
//! step ends in a definite state with its reason. Real controller and agent processes,
//! the real CLI, real PostgreSQL.

use anyhow::{Context, Result};
use belay_e2e::{
    Daemon, agent, belay, controller, psql, show, steps, target, target_toml, wait_agents, wait_for,
};
use belay_testkit::Cluster;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A SQL probe named `name` every 100 ms, failed after two failures in a row.
fn probe(name: &str, query: &str) -> String {
    format!(
        "[[targets.probes]]\nname = \"{name}\"\nperiod = \"100ms\"\nfailure_threshold = 2\n\
         sql = {{ query = \"{query}\", expect = \"zero\" }}\n"
    )
}

/// Writes `agent.toml` for `agent-1` of the controller at `addr`, owning `targets`.
fn agent_toml(dir: &Path, addr: &str, targets: &[String]) -> Result<PathBuf> {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"agent-1\"\ncontroller = \"{addr}\"\n{}",
            targets.concat()
        ),
    )?;
    Ok(path)
}

/// A migrations directory `name` under `dir` with the given scripts.
fn migrations(dir: &Path, name: &str, scripts: &[(&str, &str)]) -> Result<PathBuf> {
    let m = dir.join(name);
    std::fs::create_dir_all(&m)?;
    for (file, sql) in scripts {
        std::fs::write(m.join(file), sql)?;
    }
    Ok(m)
}

/// The newest deployment's id, once the controller lists one.
async fn newest_deployment(addr: &str) -> Result<String> {
    let id = std::sync::Mutex::new(String::new());
    wait_for("the deployment to be created", || async {
        let r = belay(addr, &["deployments", "list", "--output", "json"]).await?;
        match (r.json()[0]["id"].as_str(), id.lock()) {
            (Some(found), Ok(mut id)) => {
                *id = found.to_string();
                Ok(true)
            }
            _ => Ok(false),
        }
    })
    .await?;
    Ok(id.into_inner().unwrap_or_default())
}

/// Waits until the controller shows `name`'s pipeline at `step`.
async fn wait_step(addr: &str, id: &str, name: &str, step: &str) -> Result<()> {
    wait_for(&format!("{name} to reach {step}"), || async {
        let doc = show(addr, id).await?;
        Ok(target(&doc, name)["step"] == step)
    })
    .await
}

/// Waits until the controller shows `name` in a state other than `unknown`/`running`,
/// and returns the deployment.
async fn wait_settled(addr: &str, id: &str, name: &str) -> Result<Value> {
    wait_for(&format!("{name} to be settled"), || async {
        let doc = show(addr, id).await?;
        let state = &target(&doc, name)["state"];
        Ok(state != "unknown" && state != "running")
    })
    .await?;
    show(addr, id).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_canary_soak_gates_the_next_wave_and_a_failing_canary_stops_the_deployment()
-> Result<()> {
    let tmp = tempfile::tempdir()?;
    let cluster = Cluster::shared();
    let mut dbs = Vec::new();
    for _ in 0..4 {
        dbs.push(cluster.create_database().await?);
    }
    // Passing targets: their probe reads an empty table. Failing ones: the migration
    // leaves a NULL the probe counts, so it fails from its first attempt in the soak.
    let good = migrations(
        tmp.path(),
        "good",
        &[("V1__gate.sql", "CREATE TABLE gate (id int);\n")],
    )?;
    let bad = migrations(
        tmp.path(),
        "bad",
        &[(
            "V1__t.sql",
            "CREATE TABLE t (id int PRIMARY KEY, x int);\nINSERT INTO t VALUES (1, NULL);\n",
        )],
    )?;
    let gate = probe("gate_empty", "SELECT count(*) FROM gate");
    let filled = probe("x_filled", "SELECT count(*) FROM t WHERE x IS NULL");
    let c = controller(&tmp.path().join("c.db").to_string_lossy(), &[]).await?;
    let config = agent_toml(
        tmp.path(),
        &c.addr,
        &[
            target_toml("pass_1", &dbs[0], &good, &gate),
            target_toml("pass_2", &dbs[1], &good, &gate),
            target_toml("soak_1", &dbs[2], &bad, &filled),
            target_toml("soak_2", &dbs[3], &bad, &filled),
        ],
    )?;
    let _a = agent(&config).await?;
    wait_agents(&c.addr, 1).await?;

    // A soak that passes: the canary watches its probes and re-runs its postflight, the
    // controller records that, and only then does wave 2 start.
    let r = belay(
        &c.addr,
        &[
            "deploy",
            "--targets",
            "pass_*",
            "--canary",
            "1",
            "--batch",
            "1",
            "--canary-soak",
            "1s",
            "--output",
            "json",
        ],
    )
    .await?;
    assert_eq!(r.code, 0, "{r:?}");
    let doc = r.json();
    assert_eq!(doc["state"], "succeeded", "{doc}");
    let events = doc["events"].as_array().context("events")?;
    let soaked = events
        .iter()
        .find(|e| e["kind"] == "canary_soaked")
        .with_context(|| format!("no canary_soaked event in {doc}"))?;
    assert!(
        soaked["message"]
            .as_str()
            .is_some_and(|m| m.contains("pass_1")),
        "{soaked}"
    );
    let first_of_wave_2 = events
        .iter()
        .find(|e| e["target"] == "pass_2")
        .with_context(|| format!("no pass_2 event in {doc}"))?;
    assert!(
        soaked["seq"].as_i64() < first_of_wave_2["seq"].as_i64(),
        "wave 2 started before the soak ended: {doc}"
    );
    let id = doc["id"].as_str().context("id")?;
    let shown = show(&c.addr, id).await?;
    let canary = target(&shown, "pass_1");
    let canary_events = canary["events"].as_array().context("events")?;
    assert!(
        canary_events
            .iter()
            .any(|e| e["kind"] == "probe" && e["payload"]["phase"] == "canary_soak"),
        "{canary}"
    );
    assert!(
        canary_events.iter().any(|e| e["kind"] == "check"
            && e["step"] == "watching"
            && e["payload"]["phase"] == "canary_soak"),
        "the postflight was not re-run at the end of the soak: {canary}"
    );
    // Only the canary soaks.
    let later = target(&shown, "pass_2");
    assert!(
        !steps(&later["events"]).contains(&"watching".to_string()),
        "{later}"
    );

    // A canary whose probe fails during the soak: the deployment stops there.
    let r = belay(
        &c.addr,
        &[
            "deploy",
            "--targets",
            "soak_*",
            "--canary",
            "1",
            "--batch",
            "1",
            "--canary-soak",
            "5m",
        ],
    )
    .await?;
    assert_eq!(r.code, 1, "{r:?}");
    let id = newest_deployment(&c.addr).await?;
    let doc = show(&c.addr, &id).await?;
    assert_eq!(doc["state"], "failed", "{doc}");
    let canary = target(&doc, "soak_1");
    assert_eq!(canary["state"], "failed", "{canary}");
    assert_eq!(canary["failed_step"], "watching", "{canary}");
    assert!(
        canary["reason"]
            .as_str()
            .is_some_and(|m| m.contains("canary soak") && m.contains("x_filled")),
        "{canary}"
    );
    assert_eq!(canary["evidence"]["phase"], "canary_soak", "{canary}");
    assert_eq!(canary["evidence"]["probe"], "x_filled", "{canary}");
    assert_eq!(canary["evidence"]["triggered"], true, "{canary}");
    let later = target(&doc, "soak_2");
    assert_eq!(later["state"], "skipped", "{later}");
    // Its only event is being skipped: its pipeline never started.
    assert!(steps(&later["events"]).is_empty(), "{later}");
    assert_eq!(later["step"], Value::Null, "{later}");
    // Wave 2's database was never touched: no history, no deployment record.
    assert_eq!(
        psql(
            &dbs[3].url,
            "SELECT to_regclass('belay.schema_history') IS NULL AND to_regclass('belay.deployments') IS NULL AND to_regclass('public.t') IS NULL"
        ),
        "t"
    );

    // A soak needs a canary wave: refused before anything runs.
    let r = belay(
        &c.addr,
        &[
            "deploy",
            "--targets",
            "pass_*",
            "--canary",
            "0",
            "--canary-soak",
            "1m",
        ],
    )
    .await?;
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("--canary-soak"), "{r:?}");
    Ok(())
}

/// A controller over a store in `dir` and one agent owning `targets`, the agent's
/// config kept so it can be started again.
async fn crash_fleet(dir: &Path, targets: &[String]) -> Result<(Daemon, Daemon, PathBuf)> {
    let c = controller(
        &dir.join("c.db").to_string_lossy(),
        &["--agent-keepalive", "1s"],
    )
    .await?;
    let config = agent_toml(dir, &c.addr, targets)?;
    let a = agent(&config).await?;
    wait_agents(&c.addr, 1).await?;
    Ok((c, a, config))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_while_watching_leaves_its_target_failed_at_watching_after_restart()
-> Result<()> {
    let tmp = tempfile::tempdir()?;
    let db = Cluster::shared().create_database().await?;
    let m = migrations(
        tmp.path(),
        "m",
        &[("V1__gate.sql", "CREATE TABLE gate (id int);\n")],
    )?;
    let (c, mut a, config) = crash_fleet(
        tmp.path(),
        &[target_toml(
            "kw_1",
            &db,
            &m,
            &probe("gate_empty", "SELECT count(*) FROM gate"),
        )],
    )
    .await?;
    let addr = c.addr.clone();
    let deploy = tokio::spawn(async move {
        belay(&addr, &["deploy", "--targets", "kw_1", "--watch", "10m"]).await
    });
    let id = newest_deployment(&c.addr).await?;
    wait_step(&c.addr, &id, "kw_1", "watching").await?;
    a.kill().await?;

    // The stream broke: the deployment ends at once, the target says where it stopped.
    let r = deploy.await??;
    assert_eq!(r.code, 1, "{r:?}");
    let doc = show(&c.addr, &id).await?;
    assert_eq!(doc["state"], "failed", "{doc}");
    let t = target(&doc, "kw_1");
    assert_eq!(t["state"], "unknown", "{t}");
    assert_eq!(t["step"], "watching", "{t}");
    assert!(
        t["message"]
            .as_str()
            .is_some_and(|m| m.contains("agent agent-1 lost during watching")),
        "{t}"
    );

    // The agent comes back: it settles its own record, and the controller takes it.
    let _a = agent(&config).await?;
    let doc = wait_settled(&c.addr, &id, "kw_1").await?;
    assert_eq!(doc["state"], "failed", "{doc}");
    let t = target(&doc, "kw_1");
    assert_eq!(t["state"], "failed", "{t}");
    assert_eq!(t["failed_step"], "watching", "{t}");
    assert!(
        t["reason"]
            .as_str()
            .is_some_and(|m| m.contains("the agent stopped during watching")),
        "{t}"
    );
    assert!(
        t["message"]
            .as_str()
            .is_some_and(|m| m.contains("reconciled from agent agent-1's record")
                && m.contains("1 applied, 0 pending, 0 failed")),
        "{t}"
    );
    // The target's own log says the same: nothing beside it is left running.
    assert_eq!(
        psql(
            &db.url,
            &format!(
                "SELECT step, failed_step, finished_at IS NOT NULL FROM belay.deployments WHERE id = '{id}'"
            )
        ),
        "failed|watching|t"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_killed_while_watching_takes_the_agents_outcome_after_restart() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let db = Cluster::shared().create_database().await?;
    let m = migrations(
        tmp.path(),
        "m",
        &[("V1__gate.sql", "CREATE TABLE gate (id int);\n")],
    )?;
    let (mut c, _a, _) = crash_fleet(
        tmp.path(),
        &[target_toml(
            "kc_1",
            &db,
            &m,
            &probe("gate_empty", "SELECT count(*) FROM gate"),
        )],
    )
    .await?;
    let addr = c.addr.clone();
    let deploy = {
        let addr = addr.clone();
        tokio::spawn(async move {
            belay(&addr, &["deploy", "--targets", "kc_1", "--watch", "10m"]).await
        })
    };
    let id = newest_deployment(&addr).await?;
    wait_step(&addr, &id, "kc_1", "watching").await?;
    c.kill().await?;
    let r = deploy.await??;
    assert_ne!(r.code, 0, "{r:?}");

    // Without its controller the agent's run goes on; the probe now fails, so the run
    // ends failed at watching, on the agent, with the probe's evidence.
    psql(&db.url, "INSERT INTO gate VALUES (1)");
    wait_for("the agent to finish the run", || async {
        Ok(psql(
            &db.url,
            &format!("SELECT finished_at IS NOT NULL FROM belay.deployments WHERE id = '{id}'"),
        ) == "t")
    })
    .await?;

    // Same address and store, so the running agent finds it again.
    let c2 = controller(
        &tmp.path().join("c.db").to_string_lossy(),
        &["--listen", &addr, "--agent-keepalive", "1s"],
    )
    .await?;
    let doc = wait_settled(&c2.addr, &id, "kc_1").await?;
    assert_eq!(doc["state"], "failed", "{doc}");
    let t = target(&doc, "kc_1");
    assert_eq!(t["state"], "failed", "{t}");
    assert_eq!(t["failed_step"], "watching", "{t}");
    assert_eq!(t["evidence"]["probe"], "gate_empty", "{t}");
    assert!(
        t["message"]
            .as_str()
            .is_some_and(|m| m.contains("reconciled from agent agent-1's record")
                && m.contains("gate_empty")),
        "{t}"
    );
    let events = t["events"].as_array().context("events")?;
    assert!(
        events.iter().any(|e| e["kind"] == "target_state"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("the controller restarted during watching"))),
        "{t}"
    );
    let r = belay(&c2.addr, &["deployments", "watch", &id, "--output", "json"]).await?;
    let stated: Vec<String> = r.json()["events"]
        .as_array()
        .context("events")?
        .iter()
        .filter(|e| e["kind"] == "state")
        .filter_map(|e| e["message"].as_str().map(String::from))
        .collect();
    assert!(
        stated
            .iter()
            .any(|m| m.contains("the controller restarted during watching")),
        "{stated:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigterm_while_watching_stops_the_agent_after_its_shutdown_grace_and_records_the_cancel()
-> Result<()> {
    let tmp = tempfile::tempdir()?;
    let db = Cluster::shared().create_database().await?;
    let m = migrations(
        tmp.path(),
        "m",
        &[("V1__gate.sql", "CREATE TABLE gate (id int);\n")],
    )?;
    let c = controller(&tmp.path().join("c.db").to_string_lossy(), &[]).await?;
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"agent-1\"\ncontroller = \"{}\"\nshutdown_grace = \"1s\"\n{}",
            c.addr,
            target_toml(
                "sg_1",
                &db,
                &m,
                &probe("gate_empty", "SELECT count(*) FROM gate")
            )
        ),
    )?;
    let mut a = agent(&config).await?;
    wait_agents(&c.addr, 1).await?;
    let addr = c.addr.clone();
    let deploy = tokio::spawn(async move {
        belay(&addr, &["deploy", "--targets", "sg_1", "--watch", "10m"]).await
    });
    let id = newest_deployment(&c.addr).await?;
    wait_step(&c.addr, &id, "sg_1", "watching").await?;

    // A ten-minute watch is under way: the stop does not wait for it past the grace.
    let (code, log) = a.stop().await?;
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains("shutdown grace ran out: cancelling deployments in flight"),
        "{log}"
    );
    assert!(
        log.contains("recorded a deployment cancelled by the stop"),
        "{log}"
    );
    let r = deploy.await??;
    assert_ne!(r.code, 0, "{r:?}");

    // Beside the target the record is final and says why, before any restart.
    assert_eq!(
        psql(
            &db.url,
            &format!(
                "SELECT step, failed_step, finished_at IS NOT NULL, evidence->>'settled', \
                 evidence->>'shutdown_grace_ms' FROM belay.deployments WHERE id = '{id}'"
            )
        ),
        "failed|watching|t|agent_stop|1000"
    );
    let reason = psql(
        &db.url,
        &format!("SELECT reason FROM belay.deployments WHERE id = '{id}'"),
    );
    assert!(
        reason
            .contains("the agent was stopped during watching and its shutdown grace (1s) ran out"),
        "{reason}"
    );
    // What committed stays committed: deploying again resumes from it.
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*) FROM belay.schema_history WHERE version = '1' AND success"
        ),
        "1"
    );
    Ok(())
}
