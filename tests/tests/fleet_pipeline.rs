//! Fleet deployments through the pipeline: each target's agent runs belay-deploy's steps
//! (preflight, backup and migrations, validation, the watch window) with what its
//! agent.toml says, and the controller records every target's lifecycle. Real controller
//! and agent processes, the real CLI, real PostgreSQL.

use anyhow::{Context, Result};
use belay_e2e::{
    Daemon, agent, belay, belay_local, conflict, controller, examples, psql, show, steps, target,
    target_toml, wait_agents, wait_for,
};
use belay_testkit::Cluster;
use serde_json::Value;
use std::path::Path;

/// A controller and one agent owning `targets` (TOML from [`target_toml`]).
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

/// A controller and one agent per target (`agent-1` owning the first, `agent-2` the
/// second, …): a fleet of several agents.
async fn fleet_of_agents(dir: &Path, targets: &[String]) -> Result<(Daemon, Vec<Daemon>)> {
    let c = controller(&dir.join("controller.db").to_string_lossy(), &[]).await?;
    let mut agents = Vec::new();
    for (n, t) in targets.iter().enumerate() {
        let path = dir.join(format!("agent-{}.toml", n + 1));
        std::fs::write(
            &path,
            format!(
                "name = \"agent-{}\"\ncontroller = \"{}\"\n{t}",
                n + 1,
                c.addr
            ),
        )?;
        agents.push(agent(&path).await?);
    }
    wait_agents(&c.addr, targets.len()).await?;
    Ok((c, agents))
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

/// A migrations directory of one script creating `t` with a NULL in `x`.
fn null_row_migrations(dir: &Path) -> Result<std::path::PathBuf> {
    let m = dir.join("m");
    std::fs::create_dir_all(&m)?;
    std::fs::write(
        m.join("V1__t.sql"),
        "CREATE TABLE t (id int PRIMARY KEY, x int);\nINSERT INTO t VALUES (1, NULL);\n",
    )?;
    Ok(m)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_target_goes_through_the_same_steps_as_local_migrate() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let cluster = Cluster::shared();
    let (d1, d2, local) = (
        cluster.create_database().await?,
        cluster.create_database().await?,
        cluster.create_database().await?,
    );
    let ex = examples();
    let (c, _agents) = fleet_of_agents(
        tmp.path(),
        &[
            target_toml("life_1", &d1, &ex, ""),
            target_toml("life_2", &d2, &ex, ""),
        ],
    )
    .await?;
    let r = belay(
        &c.addr,
        &["deploy", "--targets", "life_*", "--output", "json"],
    )
    .await?;
    assert_eq!(r.code, 0, "{r:?}");
    let id = r.json()["id"].as_str().context("id")?.to_string();

    let l = belay_local(
        &local.url,
        &ex,
        &["migrate", "--backup", "none", "--output", "json"],
    )
    .await?;
    assert_eq!(l.code, 0, "{l:?}");
    let local_steps = steps(&l.json()["deployment"]["events"]);
    assert_eq!(
        local_steps,
        [
            "planned",
            "preflight",
            "backing_up",
            "migrating",
            "validating",
            "succeeded"
        ],
        "{l:?}"
    );

    let doc = show(&c.addr, &id).await?;
    assert_eq!(doc["state"], "succeeded", "{doc}");
    for name in ["life_1", "life_2"] {
        let t = target(&doc, name);
        assert_eq!(t["state"], "succeeded", "{t}");
        assert_eq!(t["step"], "succeeded", "{t}");
        assert_eq!(steps(&t["events"]), local_steps, "{name}: {t}");
        // Every executor event is there, in the step it happened in, and the checks of
        // each step with theirs.
        let events = t["events"].as_array().context("events")?;
        let applied: Vec<&Value> = events.iter().filter(|e| e["kind"] == "succeeded").collect();
        assert_eq!(applied.len(), 4, "{name}: {t}");
        assert!(applied.iter().all(|e| e["step"] == "migrating"), "{t}");
        for (check, step) in [("preflight", "preflight"), ("postflight", "validating")] {
            assert!(
                events.iter().any(|e| e["kind"] == "check"
                    && e["payload"]["check"] == check
                    && e["step"] == step),
                "{name}: no {check} check in {step}: {t}"
            );
        }
        // The agent's record of the target's pipeline is gap-free, as the controller's log.
        let seqs: Vec<i64> = events
            .iter()
            .filter_map(|e| e["payload"]["target_seq"].as_i64())
            .collect();
        assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "{t}");
    }
    // The target keeps its own record too, under the fleet deployment's id; the agent
    // reads its files for it as local `migrate` does: the same checksums, undos and
    // `irreversible` flags, and no note that it could not.
    let local_applied: Value = serde_json::from_str(&psql(
        &local.url,
        "SELECT applied FROM belay.deployments ORDER BY started_at DESC LIMIT 1",
    ))?;
    assert_eq!(
        local_applied.as_array().map(Vec::len),
        Some(4),
        "{local_applied}"
    );
    for d in [&d1, &d2] {
        assert_eq!(
            psql(
                &d.url,
                &format!("SELECT step FROM belay.deployments WHERE id = '{id}'")
            ),
            "succeeded"
        );
        let applied: Value = serde_json::from_str(&psql(
            &d.url,
            &format!("SELECT applied FROM belay.deployments WHERE id = '{id}'"),
        ))?;
        assert_eq!(applied, local_applied);
        assert!(
            applied
                .as_array()
                .is_some_and(|a| a.iter().all(|m| m["checksum"].is_string())),
            "{applied}"
        );
    }
    for name in ["life_1", "life_2"] {
        let t = target(&doc, name);
        assert!(
            !t["events"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["kind"] == "note"),
            "{t}"
        );
    }
    // Text names each target's step.
    let text = belay(&c.addr, &["deployments", "show", &id]).await?;
    let line = text
        .stdout
        .lines()
        .find(|l| l.contains("life_1"))
        .unwrap_or_else(|| panic!("{text:?}"));
    assert!(
        line.contains("succeeded") && line.contains("every step passed"),
        "{line}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blocking_lock_queue_refuses_the_target_at_preflight_and_halts_the_wave() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let cluster = Cluster::shared();
    let (d1, d2) = (
        cluster.create_database().await?,
        cluster.create_database().await?,
    );
    let ex = examples();
    // A threshold from agent.toml, under the default (1s): the agent's own is what judges.
    let (c, _a) = fleet(
        tmp.path(),
        &[
            target_toml(
                "pre_1",
                &d1,
                &ex,
                "[targets.preflight]\nlock_wait_block = \"300ms\"\n",
            ),
            target_toml("pre_2", &d2, &ex, ""),
        ],
    )
    .await?;
    let held = conflict(&d1.url).await?;
    let b_pid = held.b_pid;
    wait_for("the queued ALTER to wait past 300ms", || {
        let url = d1.url.clone();
        async move {
            Ok(psql(
                &url,
                &format!(
                    "SELECT now() - state_change > interval '400ms' FROM pg_stat_activity WHERE pid = {b_pid}"
                ),
            ) == "t")
        }
    })
    .await?;

    let r = belay(&c.addr, &["deploy", "--targets", "pre_*", "--canary", "1"]).await?;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("halted after wave 1/2"), "{r:?}");
    assert!(r.stdout.contains("untouched: pre_2"), "{r:?}");
    let pre_1 = r
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("pre_1"))
        .context("pre_1 line")?;
    assert!(
        pre_1.contains("failed")
            && pre_1.contains("failed at preflight: preflight blocked by: lock_waits"),
        "{pre_1}"
    );
    let id = deployment_id(&r.stdout);
    held.end().await?;

    let doc = show(&c.addr, &id).await?;
    assert_eq!(doc["state"], "failed", "{doc}");
    let t = target(&doc, "pre_1");
    assert_eq!(t["state"], "failed", "{t}");
    assert_eq!(t["failed_step"], "preflight", "{t}");
    assert_eq!(
        steps(&t["events"]),
        ["planned", "preflight", "failed"],
        "{t}"
    );
    let blocked = t["evidence"]["blocked"].as_array().context("blocked")?;
    let lock = blocked
        .iter()
        .find(|b| b["name"] == "lock_waits")
        .context("lock_waits")?;
    assert_eq!(lock["status"], "block", "{lock}");
    assert!(
        lock["threshold"]
            .as_str()
            .unwrap_or("")
            .contains("block > 300ms"),
        "{lock}"
    );
    let p2 = target(&doc, "pre_2");
    assert_eq!(p2["state"], "skipped", "{p2}");
    assert!(p2["step"].is_null(), "{p2}");
    // Nothing was applied anywhere.
    for d in [&d1, &d2] {
        assert_eq!(
            psql(&d.url, "SELECT to_regclass('public.users') IS NULL"),
            "t"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_assertion_in_agent_toml_fails_the_target_at_validating() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let db = Cluster::shared().create_database().await?;
    let m = null_row_migrations(tmp.path())?;
    let query = "SELECT count(*) FROM t WHERE x IS NULL";
    let (c, _a) = fleet(
        tmp.path(),
        &[target_toml(
            "val_1",
            &db,
            &m,
            &format!(
                "[[targets.checks]]\nname = \"x_filled\"\nquery = \"{query}\"\nexpect = \"zero\"\n"
            ),
        )],
    )
    .await?;
    let r = belay(&c.addr, &["deploy", "--targets", "val_1"]).await?;
    assert_eq!(r.code, 1, "{r:?}");
    let id = deployment_id(&r.stdout);
    let doc = show(&c.addr, &id).await?;
    assert_eq!(doc["state"], "failed", "{doc}");
    let t = target(&doc, "val_1");
    assert_eq!(t["failed_step"], "validating", "{t}");
    assert_eq!(
        steps(&t["events"]),
        [
            "planned",
            "preflight",
            "backing_up",
            "migrating",
            "validating",
            "failed"
        ],
        "{t}"
    );
    let failed = t["evidence"]["failed"].as_array().context("failed")?;
    let check = failed
        .iter()
        .find(|f| f["name"] == "x_filled")
        .context("x_filled")?;
    assert_eq!(check["query"], query, "{check}");
    assert!(
        check["value"].as_str().unwrap_or("").contains('1'),
        "{check}"
    );
    assert!(
        t["reason"].as_str().unwrap_or("").contains("x_filled"),
        "{t}"
    );
    // The migration stays applied (on_failure = stop).
    assert_eq!(psql(&db.url, "SELECT count(*) FROM t"), "1");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_probe_crossing_its_threshold_fails_the_target_at_watching() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let db = Cluster::shared().create_database().await?;
    let m = null_row_migrations(tmp.path())?;
    let (c, _a) = fleet(
        tmp.path(),
        &[target_toml(
            "watch_1",
            &db,
            &m,
            "[[targets.probes]]\nname = \"x_filled\"\nperiod = \"100ms\"\nfailure_threshold = 2\n\
             sql = { query = \"SELECT count(*) FROM t WHERE x IS NULL\", expect = \"zero\" }\n",
        )],
    )
    .await?;
    // The probe reads the row the migration left NULL: it fails from its first attempt.
    let r = belay(
        &c.addr,
        &["deploy", "--targets", "watch_1", "--watch", "5m"],
    )
    .await?;
    assert_eq!(r.code, 1, "{r:?}");
    let id = deployment_id(&r.stdout);
    let doc = show(&c.addr, &id).await?;
    assert_eq!(doc["state"], "failed", "{doc}");
    let t = target(&doc, "watch_1");
    assert_eq!(t["failed_step"], "watching", "{t}");
    assert_eq!(
        steps(&t["events"]),
        [
            "planned",
            "preflight",
            "backing_up",
            "migrating",
            "validating",
            "watching",
            "failed"
        ],
        "{t}"
    );
    assert_eq!(t["evidence"]["probe"], "x_filled", "{t}");
    assert_eq!(t["evidence"]["triggered"], true, "{t}");
    let probes = t["events"]
        .as_array()
        .context("events")?
        .iter()
        .filter(|e| e["kind"] == "probe" && e["step"] == "watching")
        .count();
    assert!(probes >= 2, "{t}");
    // The deployment itself watched while its last wave did.
    let r = belay(&c.addr, &["deployments", "watch", &id, "--output", "json"]).await?;
    let states: Vec<String> = r.json()["events"]
        .as_array()
        .context("events")?
        .iter()
        .filter(|e| e["kind"] == "state")
        .filter_map(|e| e["payload"]["to"].as_str().map(String::from))
        .collect();
    assert_eq!(
        states,
        ["planned", "migrating", "watching", "failed"],
        "{r:?}"
    );

    // --watch on a target without probes is refused by its agent, naming the key.
    let tmp2 = tempfile::tempdir()?;
    let db2 = Cluster::shared().create_database().await?;
    let (c2, _a2) = fleet(tmp2.path(), &[target_toml("bare_1", &db2, &m, "")]).await?;
    let r = belay(
        &c2.addr,
        &["deploy", "--targets", "bare_1", "--watch", "1m"],
    )
    .await?;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("[[targets.probes]]"), "{r:?}");
    assert_eq!(
        psql(&db2.url, "SELECT to_regclass('public.t') IS NULL"),
        "t"
    );
    Ok(())
}

/// Client sessions on the cluster other than the asking one, with their client ports:
/// with a cluster of the test's own, every one of them is the agent's (the controller's
/// store is SQLite, the CLI talks to the controller only).
const AGENT_SESSIONS: &str = "SELECT client_port FROM pg_stat_activity \
     WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND client_port > 0";

/// Local ports of the TCP connections to `server_port` this machine's clients still hold
/// open (ESTABLISHED in `/proc/net/tcp`, seen from the client's side).
fn open_client_ports(server_port: u16) -> Result<std::collections::HashSet<i32>> {
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    let port_of = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    Ok(table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, remote, state) = (port_of(f.get(1)?)?, port_of(f.get(2)?)?, *f.get(3)?);
            (remote == server_port && state == "01").then_some(i32::from(local))
        })
        .collect())
}

/// The sessions the agent holds open now: listed by the server, and whose client end is
/// still open. A session the agent has closed can stay listed for a moment, until its
/// backend is scheduled to notice the goodbye (longer on a busy machine); the client
/// end shows it closed at once.
async fn agent_sessions(conn: &mut sqlx::PgConnection, server_port: u16) -> Result<usize> {
    let ports: Vec<i32> = sqlx::query_scalar(AGENT_SESSIONS)
        .fetch_all(&mut *conn)
        .await?;
    let open = open_client_ports(server_port)?;
    Ok(ports.iter().filter(|p| open.contains(p)).count())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_stays_within_its_connection_budget_and_keeps_no_idle_session() -> Result<()> {
    const BUDGET: usize = 5;
    const TENANTS: usize = 30;
    let tmp = tempfile::tempdir()?;
    // A cluster of its own: its sessions are this test's and the agent's alone.
    let cluster = Cluster::start()?;
    let m = tmp.path().join("m");
    std::fs::create_dir_all(&m)?;
    for (name, sql) in [
        (
            "V1__items.sql",
            "CREATE TABLE items (id bigint PRIMARY KEY, name text);\n",
        ),
        (
            "V2__created.sql",
            "ALTER TABLE items ADD COLUMN created_at timestamptz;\n",
        ),
        (
            "V3__index.sql",
            "CREATE INDEX items_name_idx ON items (name);\n",
        ),
    ] {
        std::fs::write(m.join(name), sql)?;
    }
    let (mut targets, mut dbs) = (String::new(), Vec::new());
    for i in 0..TENANTS {
        let db = cluster.create_database().await?;
        // A third of the tenants take a pre-deployment backup (pg_dump and its snapshot
        // session count too); every one is lock-guarded and its locks sampled.
        let extra = if i % 3 == 0 {
            format!(
                "backup_dir = \"{}\"\n",
                tmp.path().join(format!("backups_{i}")).display()
            )
        } else {
            String::new()
        };
        targets.push_str(&target_toml(&format!("conn_{i:02}"), &db, &m, &extra));
        dbs.push(db);
    }
    let c = controller(&tmp.path().join("controller.db").to_string_lossy(), &[]).await?;
    let path = tmp.path().join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"agent-1\"\ncontroller = \"{}\"\nlock_sample_period = \"1s\"\n\n[limits]\nmax_connections_per_server = {BUDGET}\n{targets}",
            c.addr
        ),
    )?;
    let config = path.to_string_lossy().into_owned();
    let _agent = Daemon::start(
        "belay-agent",
        &[
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--config",
            &config,
        ],
        &[],
    )
    .await?;
    wait_agents(&c.addr, 1).await?;

    // Counted from the test's side for as long as the deployment runs.
    let (url, port) = (cluster.url("postgres"), cluster.port());
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sampler = tokio::spawn(async move {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await?;
        let (mut max, mut samples) = (0usize, 0u64);
        loop {
            let n = agent_sessions(&mut conn, port).await?;
            max = max.max(n);
            samples += 1;
            match stop_rx.try_recv() {
                // A sample every millisecond or so: every connection lives far longer, and
                // the daemons under test keep the machine's cores.
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                _ => return anyhow::Ok((max, samples)),
            }
        }
    });
    let r = belay(
        &c.addr,
        &[
            "deploy",
            "--targets",
            "conn_*",
            "--canary",
            "1",
            "--batch",
            "100%",
            "--parallel",
            "30",
            "--output",
            "json",
        ],
    )
    .await?;
    let _ = stop_tx.send(());
    let (max, samples) = sampler.await??;
    eprintln!("peak agent sessions {max} (budget {BUDGET}) in {samples} samples");
    assert_eq!(r.code, 0, "{r:?}");
    let doc = r.json();
    assert_eq!(doc["state"], "succeeded", "{doc}");
    assert_eq!(
        doc["targets"].as_array().map(Vec::len),
        Some(TENANTS),
        "{doc}"
    );
    // The deployment connected (the count saw it) and never held more than its budget.
    assert!(max >= 1, "no agent session seen in {samples} samples");
    assert!(
        max <= BUDGET,
        "the agent held {max} sessions at once on one server, over its budget of {BUDGET} ({samples} samples)"
    );
    // Nothing stays behind once the work is done: no idle guard, log or migration session
    // per target (the lock sampler's come and go, one per sample, so wait for a quiet
    // moment between samples).
    let admin = cluster.url("postgres");
    wait_for("no agent session left on the server", || {
        let admin = admin.clone();
        async move {
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin).await?;
            let listed: Vec<i32> = sqlx::query_scalar(AGENT_SESSIONS)
                .fetch_all(&mut conn)
                .await?;
            Ok(listed.is_empty())
        }
    })
    .await?;
    for db in &dbs {
        assert_eq!(
            psql(
                &db.url,
                "SELECT count(*) FROM belay.schema_history WHERE success"
            ),
            "3",
            "{}",
            db.name
        );
    }
    Ok(())
}
