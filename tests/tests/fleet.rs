//! Fleet end to end: a real controller, real agents and the real CLI, against real
//! PostgreSQL databases from the testkit.

use anyhow::Result;
use belay_e2e::{
    Daemon, TargetDef, agent, agent_config, belay, belay_local, controller, examples, psql,
    wait_agents, wait_for,
};
use belay_testkit::{Cluster, TestDb};
use std::path::Path;

async fn dbs(n: usize) -> Result<Vec<TestDb>> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(Cluster::shared().create_database().await?);
    }
    Ok(v)
}

/// Whether any migration ran: the history table exists. (The `belay` schema alone does
/// not say: the agent's pipeline records the deployment there before anything runs.)
fn has_history(url: &str) -> bool {
    psql(
        url,
        "SELECT to_regclass('belay.schema_history') IS NOT NULL",
    ) == "t"
}

fn def<'a>(name: &'a str, db: &'a TestDb, migrations: &'a Path) -> TargetDef<'a> {
    TargetDef {
        name,
        url: &db.url,
        migrations,
        environment: None,
    }
}

fn store_path(dir: &Path) -> String {
    dir.join("controller.db").to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn deploy_reaches_every_target_and_history_agrees_with_events() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let db = dbs(3).await?;
    let ex = examples();
    let c = controller(&store_path(tmp.path()), &[]).await?;
    let a1 = agent_config(
        tmp.path(),
        "agent-1",
        &c.addr,
        &[def("shop_1", &db[0], &ex), def("shop_2", &db[1], &ex)],
    )?;
    let a2 = agent_config(
        tmp.path(),
        "agent-2",
        &c.addr,
        &[def("shop_3", &db[2], &ex)],
    )?;
    let (_a1, _a2) = (agent(&a1).await?, agent(&a2).await?);
    wait_agents(&c.addr, 2).await?;

    let r = belay(
        &c.addr,
        &[
            "deploy",
            "--targets",
            "shop_*",
            "--canary",
            "1",
            "--batch",
            "50%",
            "--output",
            "json",
        ],
    )
    .await?;
    assert_eq!(r.code, 0, "{r:?}");
    let doc = r.json();
    assert_eq!(doc["state"], "succeeded", "{doc}");
    let id = doc["id"].as_str().expect("id").to_string();
    for (name, d) in [("shop_1", &db[0]), ("shop_2", &db[1]), ("shop_3", &db[2])] {
        // History on the target and the controller's events tell the same story.
        assert_eq!(
            psql(
                &d.url,
                "SELECT count(*), count(DISTINCT deployment_id), min(deployment_id::text) FROM belay.schema_history WHERE success"
            ),
            format!("4|1|{id}"),
            "{name}"
        );
        let succeeded: Vec<&str> = doc["events"]
            .as_array()
            .expect("events")
            .iter()
            .filter(|e| e["target"] == name && e["kind"] == "succeeded")
            .map(|e| e["message"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(succeeded.len(), 4, "{name}: {succeeded:?}");
        assert!(
            succeeded[0].contains("V001__create_users.sql"),
            "{succeeded:?}"
        );
    }
    assert!(
        doc["targets"]
            .as_array()
            .expect("targets")
            .iter()
            .all(|t| t["state"] == "succeeded"),
        "{doc}"
    );

    // The same command gives the same answer locally and through the controller.
    let remote = belay(
        &c.addr,
        &["--target", "shop_2", "status", "--output", "json"],
    )
    .await?;
    let local = belay_local(&db[1].url, &ex, &["status", "--output", "json"]).await?;
    assert_eq!(remote.code, 0, "{remote:?}");
    assert_eq!(remote.json(), local.json());
    let remote = belay(&c.addr, &["--target", "shop_2", "status"]).await?;
    let local = belay_local(&db[1].url, &ex, &["status"]).await?;
    assert_eq!(remote.stdout, local.stdout);

    let listed = belay(&c.addr, &["deployments", "list", "--output", "json"]).await?;
    assert_eq!(listed.json()[0]["id"], id.as_str());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_targets_and_unreachable_agents_fail_before_anything_runs() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let db = dbs(3).await?;
    let ex = examples();
    let c = controller(&store_path(tmp.path()), &[]).await?;
    let a1 = agent_config(
        tmp.path(),
        "agent-1",
        &c.addr,
        &[def("u_1", &db[0], &ex), def("u_2", &db[1], &ex)],
    )?;
    let a2 = agent_config(tmp.path(), "agent-2", &c.addr, &[def("u_3", &db[2], &ex)])?;
    let (_a1, mut a2d) = (agent(&a1).await?, agent(&a2).await?);
    wait_agents(&c.addr, 2).await?;

    let r = belay(&c.addr, &["deploy", "--targets", "u_1,nope"]).await?;
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("unknown target \"nope\""), "{r:?}");
    let r = belay(&c.addr, &["--target", "nope", "status"]).await?;
    assert_eq!(r.code, 64, "{r:?}");
    let r = belay(&c.addr, &["status"]).await?;
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("--target"), "{r:?}");

    a2d.kill().await?;
    wait_for("agent-2 to be reported unreachable", || async {
        let r = belay(&c.addr, &["agents", "--output", "json"]).await?;
        Ok(r.json().as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x["name"] == "agent-2" && x["state"] == "unreachable")
        }))
    })
    .await?;
    let r = belay(&c.addr, &["deploy", "--targets", "u_*"]).await?;
    assert_eq!(r.code, 69, "{r:?}");
    assert!(
        r.stderr.contains("agent agent-2") && r.stderr.contains("u_3"),
        "{r:?}"
    );
    for d in &db {
        assert!(!has_history(&d.url), "something was applied by surprise");
    }
    let r = belay(&c.addr, &["--target", "u_3", "migrate"]).await?;
    assert_eq!(r.code, 69, "{r:?}");

    // A controller nobody listens on.
    let r = belay("127.0.0.1:1", &["agents"]).await?;
    assert_eq!(r.code, 69, "{r:?}");
    assert!(r.stderr.contains("controller at 127.0.0.1:1"), "{r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn waves_halt_after_the_failing_wave_and_leave_the_rest_untouched() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let db = dbs(8).await?;
    let ex = examples();
    // tenant_3 already has a `users` table: its first migration fails.
    psql(&db[2].url, "CREATE TABLE users (x int)");
    let c = controller(&store_path(tmp.path()), &[]).await?;
    let names: Vec<String> = (1..=8).map(|i| format!("tenant_{i}")).collect();
    let defs: Vec<TargetDef> = names
        .iter()
        .zip(&db)
        .map(|(n, d)| TargetDef {
            name: n,
            url: &d.url,
            migrations: &ex,
            environment: None,
        })
        .collect();
    let a = agent_config(tmp.path(), "agent-1", &c.addr, &defs)?;
    let _a = agent(&a).await?;
    wait_agents(&c.addr, 1).await?;

    let r = belay(
        &c.addr,
        &[
            "deploy",
            "--targets",
            "tenant_*",
            "--canary",
            "1",
            "--batch",
            "50%",
            "--parallel",
            "4",
        ],
    )
    .await?;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("halted after wave 2/3"), "{r:?}");
    assert!(
        r.stdout.contains("untouched: tenant_6, tenant_7, tenant_8"),
        "{r:?}"
    );
    let id = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("deployment "))
        .and_then(|l| l.split(':').next())
        .expect("id");
    let doc = belay(&c.addr, &["deployments", "show", id, "--output", "json"])
        .await?
        .json();
    assert_eq!(doc["state"], "failed");
    let state = |t: &str| {
        doc["targets"]
            .as_array()
            .expect("targets")
            .iter()
            .find(|x| x["target"] == t)
            .map(|x| x["state"].as_str().unwrap_or("").to_string())
    };
    for (i, want) in [
        "succeeded",
        "succeeded",
        "failed",
        "succeeded",
        "succeeded",
        "skipped",
        "skipped",
        "skipped",
    ]
    .iter()
    .enumerate()
    {
        assert_eq!(
            state(&names[i]).as_deref(),
            Some(*want),
            "{}: {doc}",
            names[i]
        );
    }
    for d in &db[5..] {
        assert!(!has_history(&d.url), "an untouched target was migrated");
    }
    assert_eq!(
        psql(
            &db[0].url,
            "SELECT count(*) FROM belay.schema_history WHERE success"
        ),
        "4"
    );
    Ok(())
}

async fn restart_keeps_deployments(store: &str) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let db = dbs(1).await?;
    let ex = examples();
    let mut c = controller(store, &[]).await?;
    let addr = c.addr.clone();
    let a = agent_config(
        tmp.path(),
        "agent-1",
        &addr,
        &[TargetDef {
            name: "r_1",
            url: &db[0].url,
            migrations: &ex,
            environment: None,
        }],
    )?;
    let _a = agent(&a).await?;
    wait_agents(&addr, 1).await?;
    let r = belay(&addr, &["deploy", "--targets", "r_1", "--output", "json"]).await?;
    assert_eq!(r.code, 0, "{r:?}");
    let before = r.json();
    let id = before["id"].as_str().expect("id").to_string();

    let (code, _) = c.stop().await?;
    assert_eq!(code, Some(0));
    // Same address, so the running agent finds it again.
    let c2 = controller(store, &["--listen", &addr]).await?;
    assert_eq!(c2.addr, addr);
    let shown = belay(&addr, &["deployments", "watch", &id, "--output", "json"]).await?;
    assert_eq!(shown.code, 0, "{shown:?}");
    let after = shown.json();
    assert_eq!(after["state"], "succeeded");
    assert_eq!(
        after["events"], before["events"],
        "events changed across the restart"
    );
    wait_agents(&addr, 1).await?;
    let r = belay(&addr, &["--target", "r_1", "status", "--output", "json"]).await?;
    assert_eq!(r.code, 0, "{r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn deployments_survive_a_controller_restart_on_sqlite() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    restart_keeps_deployments(&store_path(tmp.path())).await
}

#[tokio::test(flavor = "multi_thread")]
async fn deployments_survive_a_controller_restart_on_postgres() -> Result<()> {
    let store = Cluster::shared().create_database().await?;
    restart_keeps_deployments(&store.url).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_mid_deployment_is_never_reported_succeeded_and_is_reconciled() -> Result<()>
{
    let tmp = tempfile::tempdir()?;
    let db = dbs(1).await?;
    let migrations = tmp.path().join("m");
    std::fs::create_dir_all(&migrations)?;
    std::fs::write(migrations.join("V1__ok.sql"), "CREATE TABLE ok (id int);")?;
    std::fs::write(
        migrations.join("V2__slow.sql"),
        "-- belay:no-transaction\nSELECT pg_sleep(30);\n",
    )?;
    let c = controller(&store_path(tmp.path()), &[]).await?;
    let a = agent_config(
        tmp.path(),
        "agent-1",
        &c.addr,
        &[TargetDef {
            name: "k_1",
            url: &db[0].url,
            migrations: &migrations,
            environment: None,
        }],
    )?;
    let mut ad = agent(&a).await?;
    wait_agents(&c.addr, 1).await?;

    let addr = c.addr.clone();
    let deploy = tokio::spawn(async move { belay(&addr, &["deploy", "--targets", "k_1"]).await });
    let url = db[0].url.clone();
    wait_for("V2 to be running", || {
        let url = url.clone();
        async move {
            Ok(has_history(&url)
                && psql(&url, "SELECT count(*) FROM belay.schema_history WHERE version = '2' AND state = 'running'") == "1")
        }
    })
    .await?;
    ad.kill().await?;
    let r = deploy.await??;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains("deployment ") && r.stdout.contains(": failed"),
        "{r:?}"
    );
    assert!(
        r.stdout.contains("k_1") && r.stdout.contains("unknown"),
        "{r:?}"
    );
    // Where it stopped, exactly: the step, and which agent was lost.
    assert!(
        r.stdout.contains("agent agent-1 lost during migrating"),
        "{r:?}"
    );

    // The agent comes back; the controller asks it where k_1 stands and records the truth.
    let _ad = agent(&a).await?;
    let id = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("deployment "))
        .and_then(|l| l.split(':').next())
        .expect("id")
        .to_string();
    wait_for("k_1 to be reconciled", || {
        let (addr, id) = (c.addr.clone(), id.clone());
        async move {
            let d = belay(&addr, &["deployments", "show", &id, "--output", "json"])
                .await?
                .json();
            Ok(d["targets"][0]["state"] != "unknown")
        }
    })
    .await?;
    let d = belay(&c.addr, &["deployments", "show", &id, "--output", "json"])
        .await?
        .json();
    assert_eq!(d["state"], "failed", "{d}");
    assert_eq!(d["targets"][0]["state"], "failed", "{d}");
    let msg = d["targets"][0]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("reconciled") && msg.contains("1 failed (V2__slow.sql)"),
        "{msg}"
    );
    // The agent settled its own record of the run on start, and the controller took it.
    assert_eq!(d["targets"][0]["failed_step"], "migrating", "{d}");
    assert!(
        d["targets"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("the agent stopped during migrating")),
        "{d}"
    );
    assert_eq!(
        psql(
            &db[0].url,
            &format!("SELECT step, failed_step FROM belay.deployments WHERE id = '{id}'")
        ),
        "failed|migrating"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn promotion_gate_refuses_production_before_staging_and_records_overrides() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let db = dbs(2).await?;
    let ex = examples();
    let c = controller(
        &store_path(tmp.path()),
        &["--environments", "staging,production"],
    )
    .await?;
    let a = agent_config(
        tmp.path(),
        "agent-1",
        &c.addr,
        &[
            TargetDef {
                name: "stage_1",
                url: &db[0].url,
                migrations: &ex,
                environment: Some("staging"),
            },
            TargetDef {
                name: "prod_1",
                url: &db[1].url,
                migrations: &ex,
                environment: Some("production"),
            },
        ],
    )?;
    let _a = agent(&a).await?;
    wait_agents(&c.addr, 1).await?;
    // Refused now, accepted once 004 has succeeded in staging.
    const TO_PRODUCTION: [&str; 7] = [
        "deploy",
        "--targets",
        "prod_1",
        "--environment",
        "production",
        "--to",
        "004",
    ];

    let r = belay(&c.addr, &TO_PRODUCTION).await?;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .contains("version 004 has not succeeded in staging"),
        "{r:?}"
    );
    assert!(!has_history(&db[1].url));
    let r = belay(&c.addr, &["deploy", "--targets", "prod_1"]).await?;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("pass --environment"), "{r:?}");
    let r = belay(
        &c.addr,
        &[
            "deploy",
            "--targets",
            "stage_1",
            "--environment",
            "production",
            "--to",
            "004",
        ],
    )
    .await?;
    assert_eq!(
        r.code, 2,
        "a staging target in a production deployment: {r:?}"
    );

    let r = belay(
        &c.addr,
        &[
            "deploy",
            "--targets",
            "prod_1",
            "--environment",
            "production",
            "--to",
            "002",
            "--skip-promotion",
            "--reason",
            "hotfix INC-42",
            "--output",
            "json",
        ],
    )
    .await?;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["skip_promotion_reason"], "hotfix INC-42");

    let r = belay(
        &c.addr,
        &[
            "deploy",
            "--targets",
            "stage_1",
            "--environment",
            "staging",
            "--to",
            "004",
        ],
    )
    .await?;
    assert_eq!(r.code, 0, "{r:?}");
    let r = belay(&c.addr, &TO_PRODUCTION).await?;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        psql(
            &db[1].url,
            "SELECT count(*) FROM belay.schema_history WHERE success"
        ),
        "4"
    );
    Ok(())
}

fn free_port() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

async fn scrape(addr: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: belay\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn daemons_export_metrics_and_reflection() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let db = dbs(1).await?;
    let ex = examples();
    let (cm, am) = (free_port()?, free_port()?);
    let c = controller(&store_path(tmp.path()), &["--metrics-listen", &cm]).await?;
    let a = agent_config(tmp.path(), "agent-1", &c.addr, &[def("m_1", &db[0], &ex)])?;
    let a_s = a.to_string_lossy().into_owned();
    let ad = Daemon::start(
        "belay-agent",
        &[
            "--listen",
            "127.0.0.1:0",
            "--config",
            &a_s,
            "--metrics-listen",
            &am,
        ],
        &[],
    )
    .await?;
    wait_agents(&c.addr, 1).await?;
    let r = belay(&c.addr, &["deploy", "--targets", "m_1"]).await?;
    assert_eq!(r.code, 0, "{r:?}");

    let agent_metrics = scrape(&am).await?;
    assert!(
        agent_metrics.contains(r#"belay_migrations_total{target="m_1",status="applied"} 4"#),
        "{agent_metrics}"
    );
    assert!(
        agent_metrics.contains("belay_migration_duration_seconds_bucket"),
        "{agent_metrics}"
    );
    wait_for("the agents gauge", || async {
        Ok(scrape(&cm).await?.contains("belay_agents_connected 1"))
    })
    .await?;
    // Each target's end is counted by the agent that ran its pipeline, not again by the
    // controller.
    assert!(
        agent_metrics.contains(r#"belay_deployments_total{status="succeeded"} 1"#),
        "{agent_metrics}"
    );
    let controller_metrics = scrape(&cm).await?;
    assert!(
        !controller_metrics.contains("belay_deployments_total"),
        "{controller_metrics}"
    );

    // grpcurl-style discovery through server reflection, on both daemons.
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    // Each advertises exactly what it serves: the agent not the controller's own services.
    let common = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ];
    let serves_both = [
        "belay.v1.BackfillService",
        "belay.v1.BackupService",
        "belay.v1.DeployService",
        "belay.v1.HealthService",
        "belay.v1.LockMonitorService",
        "belay.v1.MigrationService",
        "belay.v1.RollbackService",
    ];
    let agent_services: Vec<&str> = serves_both.iter().chain(&common).copied().collect();
    let controller_services: Vec<&str> = serves_both
        .iter()
        .chain(&common)
        .chain(&["belay.v1.ControllerService", "belay.v1.HistoryService"])
        .copied()
        .collect();
    for (addr, want) in [(&ad.addr, agent_services), (&c.addr, controller_services)] {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let mut client = ServerReflectionClient::new(channel);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter([req]))
            .await?
            .into_inner();
        let resp = stream.message().await?.expect("a reflection response");
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("unexpected reflection response");
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(
            names, want,
            "{addr} advertises what it serves, nothing else"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_with_a_backup_dir_backs_up_before_every_deployment() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let db = dbs(1).await?;
    let ex = examples();
    let c = controller(&store_path(tmp.path()), &[]).await?;
    let backups = tmp.path().join("backups");
    let cfg = tmp.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"agent-1\"\ncontroller = \"{}\"\n\n[[targets]]\nname = \"b_1\"\nurl = \"{}\"\nmigrations = \"{}\"\nbackup_dir = \"{}\"\n",
            c.addr,
            db[0].url,
            ex.display(),
            backups.display()
        ),
    )?;
    let _a = agent(&cfg).await?;
    wait_agents(&c.addr, 1).await?;
    let r = belay(&c.addr, &["deploy", "--targets", "b_1", "--output", "json"]).await?;
    assert_eq!(r.code, 0, "{r:?}");
    let doc = r.json();
    let taken: Vec<&serde_json::Value> = doc["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "backup_taken")
        .collect();
    assert_eq!(taken.len(), 1, "{doc}");
    // Every history row of the run names the backup, and the backup is on disk, verified.
    let ids = psql(
        &db[0].url,
        "SELECT count(*), count(DISTINCT backup_id), min(backup_id) FROM belay.schema_history WHERE success",
    );
    let id = ids.rsplit('|').next().expect("id").to_string();
    assert!(ids.starts_with("4|1|") && !id.is_empty(), "{ids}");
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        backups.join("b_1").join(&id).join("manifest.json"),
    )?)?;
    assert_eq!(manifest["verified"], true, "{manifest}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_controller_restart_the_reachable_agents_target_is_reconciled_once_while_another_agent_is_down()
-> Result<()> {
    let tmp = tempfile::tempdir()?;
    let db = dbs(2).await?;
    let m = tmp.path().join("m");
    std::fs::create_dir_all(&m)?;
    std::fs::write(m.join("V1__gate.sql"), "CREATE TABLE gate (id int);\n")?;
    let store = store_path(tmp.path());
    let mut c = controller(&store, &["--agent-keepalive", "1s"]).await?;
    let probe = "[[targets.probes]]\nname = \"gate_empty\"\nperiod = \"100ms\"\nfailure_threshold = 2\n\
                 sql = { query = \"SELECT count(*) FROM gate\", expect = \"zero\" }\n";
    let config = |agent: &str, target: &str, db: &TestDb| -> Result<std::path::PathBuf> {
        let path = tmp.path().join(format!("{agent}.toml"));
        std::fs::write(
            &path,
            format!(
                "name = \"{agent}\"\ncontroller = \"{}\"\n{}",
                c.addr,
                belay_e2e::target_toml(target, db, &m, probe)
            ),
        )?;
        Ok(path)
    };
    let (up_cfg, down_cfg) = (
        config("agent-up", "up_1", &db[0])?,
        config("agent-down", "down_2", &db[1])?,
    );
    let _up = agent(&up_cfg).await?;
    let mut down = agent(&down_cfg).await?;
    wait_agents(&c.addr, 2).await?;

    // Both targets run their pipelines, each on its own agent, and sit in their watch window.
    let addr = c.addr.clone();
    let deploy = tokio::spawn(async move {
        belay(
            &addr,
            &[
                "deploy",
                "--targets",
                "down_2,up_1",
                "--canary",
                "2",
                "--watch",
                "10m",
            ],
        )
        .await
    });
    let id = std::sync::Mutex::new(String::new());
    wait_for("the deployment to be created", || async {
        let r = belay(&c.addr, &["deployments", "list", "--output", "json"]).await?;
        match (r.json()[0]["id"].as_str(), id.lock()) {
            (Some(found), Ok(mut id)) => {
                *id = found.to_string();
                Ok(true)
            }
            _ => Ok(false),
        }
    })
    .await?;
    let id = id.into_inner().unwrap_or_default();
    wait_for("both targets to watch", || async {
        let doc = belay_e2e::show(&c.addr, &id).await?;
        Ok(["up_1", "down_2"]
            .iter()
            .all(|t| belay_e2e::target(&doc, t)["step"] == "watching"))
    })
    .await?;

    // The controller dies; so does one agent. The other's run goes on and ends (its probe
    // now fails) on the agent, without the controller.
    c.kill().await?;
    let r = deploy.await??;
    assert_ne!(r.code, 0, "{r:?}");
    down.kill().await?;
    psql(&db[0].url, "INSERT INTO gate VALUES (1)");
    wait_for("agent-up to finish its run", || async {
        Ok(psql(
            &db[0].url,
            &format!("SELECT finished_at IS NOT NULL FROM belay.deployments WHERE id = '{id}'"),
        ) == "t")
    })
    .await?;

    // Same address and store: agent-up finds the controller again; agent-down stays down.
    let c2 = Daemon::start(
        "belay-controller",
        &[
            "--store",
            &store,
            "--heartbeat-interval",
            "200ms",
            "--listen",
            &c.addr,
            "--agent-keepalive",
            "1s",
        ],
        &[("BELAY_LOG", "info,belay_fleet=debug")],
    )
    .await?;
    wait_for("up_1 to be settled", || async {
        let doc = belay_e2e::show(&c2.addr, &id).await?;
        let state = &belay_e2e::target(&doc, "up_1")["state"];
        Ok(state != "unknown" && state != "running")
    })
    .await?;
    // Some more passes, each of which tries down_2 again, and none records up_1 again.
    let passes = |log: &str| log.matches("reconciliation pass").count();
    let seen = passes(&c2.log_so_far());
    wait_for("two more reconciliation passes", || async {
        Ok(passes(&c2.log_so_far()) >= seen + 2)
    })
    .await?;
    let doc = belay_e2e::show(&c2.addr, &id).await?;
    let up = belay_e2e::target(&doc, "up_1");
    assert_eq!(up["state"], "failed", "{up}");
    assert_eq!(up["failed_step"], "watching", "{up}");
    assert!(
        up["message"]
            .as_str()
            .is_some_and(|m| m.contains("reconciled from agent agent-up's record")),
        "{up}"
    );
    let reconciled = up["events"]
        .as_array()
        .map(|es| es.iter().filter(|e| e["kind"] == "reconciled").count())
        .unwrap_or_default();
    assert_eq!(reconciled, 1, "one reconcile event, not one per pass: {up}");
    let down_2 = belay_e2e::target(&doc, "down_2");
    assert_eq!(down_2["state"], "unknown", "{down_2}");
    Ok(())
}
