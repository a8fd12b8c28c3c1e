//! `migrate` in remote mode is as safe as in local mode, end to end: a real controller, a
//! real agent and the real CLI against a real PostgreSQL. The preflight checklist runs on
//! the target's agent with belay.toml's thresholds and refuses as local mode does; an
//! override is recorded in the target's history; `--watch` probes through the controller
//! and exits with the failing probe's evidence. The agent lints the pending scripts and
//! refuses an unallowed lint error as local mode does.

use anyhow::{Context, Result};
use belay_e2e::{
    Daemon, belay, belay_local, conflict, session, show, steps, target, target_toml, wait_agents,
    wait_for,
};
use belay_testkit::{Cluster, TestDb};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// A controller and one agent owning `target` on `db` (the examples as its migrations).
struct Fleet {
    tmp: tempfile::TempDir,
    controller: Daemon,
    _agent: Daemon,
}

async fn fleet(target: &str, db: &TestDb) -> Result<Fleet> {
    fleet_with(target, db, &belay_e2e::examples(), "").await
}

/// [`fleet`] with the agent's migrations in `migrations`, and `extra` TOML in the
/// target's agent.toml entry (its `[[targets.probes]]`, `[targets.preflight]`, …).
async fn fleet_with(target: &str, db: &TestDb, migrations: &Path, extra: &str) -> Result<Fleet> {
    let tmp = tempfile::tempdir()?;
    let store = tmp
        .path()
        .join("controller.db")
        .to_string_lossy()
        .into_owned();
    let controller = belay_e2e::controller(&store, &[]).await?;
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"agent-1\"\ncontroller = \"{}\"\n{}",
            controller.addr,
            target_toml(target, db, migrations, extra)
        ),
    )?;
    let agent = belay_e2e::agent(&config).await?;
    wait_agents(&controller.addr, 1).await?;
    Ok(Fleet {
        tmp,
        controller,
        _agent: agent,
    })
}

impl Fleet {
    /// Writes `text` as a belay.toml and returns its path.
    fn config(&self, text: &str) -> Result<String> {
        let path = self.tmp.path().join("belay.toml");
        std::fs::write(&path, text).context("writing belay.toml")?;
        Ok(path.to_string_lossy().into_owned())
    }
}

/// The target's history rows, oldest first: (version, state, notes as JSON).
async fn history(db: &TestDb) -> Result<Vec<(String, String, Value)>> {
    let (mut c, _) = session(&db.url).await?;
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('belay.schema_history') IS NOT NULL")
        .fetch_one(&mut c)
        .await?;
    if !exists {
        return Ok(Vec::new());
    }
    let rows: Vec<(Option<String>, String, Option<String>)> = sqlx::query_as(
        "SELECT version, state, notes::text FROM belay.schema_history ORDER BY installed_rank",
    )
    .fetch_all(&mut c)
    .await?;
    rows.into_iter()
        .map(|(v, state, notes)| {
            let notes = match notes {
                Some(n) => serde_json::from_str(&n).context("notes are JSON")?,
                None => Value::Null,
            };
            Ok((v.unwrap_or_default(), state, notes))
        })
        .collect()
}

/// The `error: …` line of a failed run.
fn error_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_migrate_is_refused_by_preflight_and_records_an_override() -> Result<()> {
    let db = Cluster::shared().create_database().await?;
    let f = fleet("mig_1", &db).await?;
    // A threshold of the caller's belay.toml, lower than the default (1s): if it did not
    // travel to the agent, the threshold shown would be the default.
    let config = f.config("[preflight]\nlock_wait_block = \"300ms\"\n")?;
    let addr = f.controller.addr.clone();
    let remote = |args: &[&str]| {
        let mut all = vec!["--config", config.as_str(), "--target", "mig_1"];
        all.extend_from_slice(args);
        let all: Vec<String> = all.into_iter().map(String::from).collect();
        let addr = addr.clone();
        async move {
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            belay(&addr, &all).await
        }
    };

    let c = conflict(&db.url).await?;
    wait_for("preflight to block on the lock wait", || async {
        let r = remote(&["check", "preflight", "--output", "json"]).await?;
        Ok(r.code == 2
            && r.json().as_array().is_some_and(|a| {
                a.iter()
                    .any(|c| c["name"] == "lock_waits" && c["status"] == "block")
            }))
    })
    .await?;

    // Refused as local mode refuses: exit 2, the blocking check with its value, remedy and
    // the caller's threshold, and how to go ahead knowingly. Nothing applied.
    let r = remote(&["migrate"]).await?;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stdout.contains("preflight:"), "{r:?}");
    let block = r
        .stdout
        .lines()
        .find(|l| l.starts_with("BLOCK lock_waits"))
        .unwrap_or_else(|| panic!("no BLOCK lock_waits line: {r:?}"));
    assert!(block.contains("block > 300ms"), "{r:?}");
    assert_eq!(
        error_line(&r.stderr),
        "error: migrate refused: preflight blocked by: lock_waits",
        "{r:?}"
    );
    assert!(
        r.stderr
            .contains("pass --override-check NAME --reason \"…\" to go ahead knowingly"),
        "{r:?}"
    );
    assert!(
        history(&db).await?.is_empty(),
        "a refused migrate applies nothing"
    );
    let status = remote(&["status", "--output", "json"]).await?;
    assert_eq!(status.code, 0, "{status:?}");
    let doc = status.json();
    let migrations = doc.as_array().context("status is an array")?;
    assert!(
        !migrations.is_empty() && migrations.iter().all(|m| m["state"] == "pending"),
        "{status:?}"
    );

    // Local mode refuses the same way, with the same exit code and message.
    let local = belay_local(
        &db.url,
        &belay_e2e::examples(),
        &["--config", &config, "migrate"],
    )
    .await?;
    assert_eq!(local.code, r.code, "{local:?}");
    assert_eq!(
        error_line(&local.stderr),
        error_line(&r.stderr),
        "{local:?}"
    );
    assert!(history(&db).await?.is_empty(), "{local:?}");

    // --no-preflight skips the checklist, with the same warning as local mode.
    let r = remote(&["migrate", "--no-preflight", "--to", "1"]).await?;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stderr
            .contains("warning: --no-preflight: migrating without the preflight checklist"),
        "{r:?}"
    );
    assert!(!r.stdout.contains("preflight:"), "{r:?}");

    // An unknown check name is a usage error, before anything is applied.
    let r = remote(&[
        "migrate",
        "--override-check",
        "lock_wait",
        "--reason",
        "typo",
    ])
    .await?;
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("lock_waits"), "{r:?}");
    assert_eq!(history(&db).await?.len(), 1);

    // Overridden: applied, warned about, and recorded in every row of the run. (Up to 3:
    // V004's CREATE INDEX CONCURRENTLY would wait for the queued ALTER's snapshot.)
    let reason = "owner agreed: the report holding t ends at noon";
    let r = remote(&[
        "migrate",
        "--to",
        "3",
        "--override-check",
        "lock_waits",
        "--reason",
        reason,
    ])
    .await?;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("WARN  lock_waits"), "{r:?}");
    assert!(
        r.stderr.contains(&format!(
            "warning: preflight check lock_waits overridden: {reason}"
        )),
        "{r:?}"
    );
    let rows = history(&db).await?;
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(
        rows.iter().all(|(_, state, _)| state == "success"),
        "{rows:?}"
    );
    // The run without preflight overrode nothing.
    assert!(rows[0].2.get("overrides").is_none(), "{rows:?}");
    for (version, _, notes) in &rows[1..] {
        assert_eq!(
            notes["overrides"],
            serde_json::json!([{ "check": "lock_waits", "reason": reason }]),
            "version {version}: {notes}"
        );
    }

    c.end().await?;
    Ok(())
}

/// A local HTTP endpoint whose answer `status` decides on each request.
async fn http_server(
    status: impl Fn() -> u16 + Send + Sync + 'static,
) -> Result<(String, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let status = Arc::new(status);
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let status = status.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let code = status();
                let body = if code < 400 {
                    r#"{"db":"ok"}"#
                } else {
                    r#"{"db":"down"}"#
                };
                let reply = format!(
                    "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
            });
        }
    });
    Ok((format!("http://{addr}/health"), task))
}

/// `[[probes]]` with a `{name}` probe of `url`, in belay.toml's or (`prefix = "targets."`)
/// agent.toml's shape.
fn probe_toml(prefix: &str, name: &str, url: &str, threshold: u32) -> String {
    format!(
        "[[{prefix}probes]]\nname = \"{name}\"\nperiod = \"100ms\"\nfailure_threshold = {threshold}\n\
         http = {{ url = \"{url}\" }}\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_migrate_watch_exits_with_the_failing_probes_evidence() -> Result<()> {
    let db = Cluster::shared().create_database().await?;
    // `api` answers 503 only once `web` has been probed twice: it can only trigger if both
    // probes are watched at the same time.
    let web_hits = Arc::new(AtomicUsize::new(0));
    let hits = web_hits.clone();
    let (web, _web) = http_server(move || {
        hits.fetch_add(1, Ordering::SeqCst);
        200
    })
    .await?;
    let hits = web_hits.clone();
    let (api, _api) = http_server(move || {
        if hits.load(Ordering::SeqCst) >= 2 {
            503
        } else {
            200
        }
    })
    .await?;
    // The probes are the target's, in its agent.toml: the agent watches them.
    let f = fleet_with(
        "watch_1",
        &db,
        &belay_e2e::examples(),
        &format!(
            "{}{}",
            probe_toml("targets.", "api", &api, 2),
            probe_toml("targets.", "web", &web, 3)
        ),
    )
    .await?;
    let empty = f.config("")?;

    let r = belay(
        &f.controller.addr,
        &[
            "--config", &empty, "--target", "watch_1", "migrate", "--watch", "5m",
        ],
    )
    .await?;
    assert_eq!(r.code, 4, "{r:?}");
    // Applied first, then watched.
    let applied = r
        .stdout
        .find("migrate: 4 migration(s) in deployment")
        .unwrap_or_else(|| panic!("no run report: {r:?}"));
    let watching = r
        .stdout
        .find("watching 2 probe(s) for 5min")
        .unwrap_or_else(|| panic!("no watch line: {r:?}"));
    assert!(applied < watching, "{r:?}");
    let rows = history(&db).await?;
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(
        rows.iter().all(|(_, state, _)| state == "success"),
        "{rows:?}"
    );
    // Both probes' events, then the failing one's evidence.
    assert!(r.stdout.contains("web: pass (status 200"), "{r:?}");
    assert!(r.stdout.contains("api: fail 2/2 (status 503"), "{r:?}");
    assert!(
        r.stderr
            .contains("probe api crossed its failure threshold (2 consecutive failures)")
            && r.stderr.contains("status 503"),
        "{r:?}"
    );

    // Local mode's watch, with the same probes in belay.toml, ends the same way (nothing
    // left to apply).
    let local_config = f.config(&format!(
        "{}\n{}",
        probe_toml("", "api", &api, 2),
        probe_toml("", "web", &web, 3)
    ))?;
    let local = belay_local(
        &db.url,
        &belay_e2e::examples(),
        &["--config", &local_config, "migrate", "--watch", "5m"],
    )
    .await?;
    assert_eq!(local.code, 4, "{local:?}");
    assert!(
        local
            .stdout
            .contains("nothing to migrate: database is up to date")
            && local.stdout.contains("watching 2 probe(s) for 5min"),
        "{local:?}"
    );
    assert!(
        local
            .stderr
            .contains("probe api crossed its failure threshold (2 consecutive failures)"),
        "{local:?}"
    );
    Ok(())
}

/// belay.toml's `[[probes]]`, `[[checks]]`, `[[smoke]]` and `[postflight]` mean nothing on
/// an agent: remote `migrate` refuses them before anything runs, naming where they go in
/// agent.toml. `--watch` on a target without probes is refused by the agent, naming
/// agent.toml.
#[tokio::test(flavor = "multi_thread")]
async fn remote_migrate_refuses_caller_side_checks_and_probes() -> Result<()> {
    let db = Cluster::shared().create_database().await?;
    let f = fleet("refuse_1", &db).await?;
    let addr = f.controller.addr.clone();
    let list = || belay(&addr, &["deployments", "list", "--output", "json"]);
    for (toml, section, there) in [
        (
            probe_toml("", "api", "http://127.0.0.1:1/health", 3),
            "[[probes]]",
            "[[targets.probes]]",
        ),
        (
            "[[checks]]\nname = \"no_orphans\"\nquery = \"SELECT 0\"\nexpect = \"zero\"\n".into(),
            "[[checks]]",
            "[[targets.checks]]",
        ),
        (
            "[[smoke]]\nname = \"users\"\nquery = \"SELECT 1\"\n".into(),
            "[[smoke]]",
            "[[targets.smoke]]",
        ),
        (
            "[postflight]\nnot_valid_constraints = \"warn\"\n".into(),
            "[postflight]",
            "[targets.postflight]",
        ),
    ] {
        let config = f.config(&toml)?;
        let r = belay(
            &addr,
            &["--config", &config, "--target", "refuse_1", "migrate"],
        )
        .await?;
        assert_eq!(r.code, 64, "{section}: {r:?}");
        let error = error_line(&r.stderr);
        assert!(
            error.contains(&format!("belay.toml sets {section}"))
                && error.contains(there)
                && error.contains("agent.toml")
                && error.contains("nothing was run"),
            "{section}: {r:?}"
        );
    }
    // A target without probes: --watch is refused by its agent, naming agent.toml.
    let empty = f.config("")?;
    let r = belay(
        &addr,
        &[
            "--config", &empty, "--target", "refuse_1", "migrate", "--watch", "1m",
        ],
    )
    .await?;
    assert_eq!(r.code, 64, "{r:?}");
    let error = error_line(&r.stderr);
    assert!(
        error.contains("--watch needs probes on target refuse_1")
            && error.contains("[[targets.probes]]")
            && error.contains("agent.toml"),
        "{r:?}"
    );
    assert!(history(&db).await?.is_empty(), "nothing was applied");
    // Only the agent's refusal of --watch reached the target; it is on record as failed
    // at `planned`, with the reason.
    let r = list().await?;
    let ds = r.json();
    let ds = ds.as_array().context("a list")?;
    assert_eq!(ds.len(), 1, "{r:?}");
    let t = target(&ds[0], "refuse_1");
    assert_eq!(ds[0]["state"], "failed", "{r:?}");
    assert_eq!(t["failed_step"], "planned", "{t}");
    assert!(
        t["reason"]
            .as_str()
            .is_some_and(|m| m.contains("--watch needs probes")),
        "{t}"
    );
    Ok(())
}

/// A remote `migrate` is a one-target deployment run by the agent and recorded on the
/// controller (`deployments list|show`) and beside the target, with the same ordered
/// lifecycle as a local one, the release it ships, and history rows linked to it.
#[tokio::test(flavor = "multi_thread")]
async fn remote_migrate_is_recorded_on_the_controller_with_the_lifecycle_of_a_local_one()
-> Result<()> {
    let cluster = Cluster::shared();
    let (db, local_db) = (
        cluster.create_database().await?,
        cluster.create_database().await?,
    );
    let f = fleet("rec_1", &db).await?;
    let addr = f.controller.addr.clone();
    let empty = f.config("")?;
    let r = belay(
        &addr,
        &[
            "--config",
            &empty,
            "--target",
            "rec_1",
            "migrate",
            "--release",
            "1.6.0",
            "--output",
            "json",
        ],
    )
    .await?;
    assert_eq!(r.code, 0, "{r:?}");
    let doc = r.json();
    assert_eq!(doc["ok"], true, "{r:?}");
    let record = &doc["deployment"];
    let id = record["id"]
        .as_str()
        .context("the record's id")?
        .to_string();
    assert_eq!(record["release"], "1.6.0", "{record}");
    assert_eq!(record["target"], "rec_1", "{record}");
    assert_eq!(doc["report"]["deployment_id"], id.as_str(), "{doc}");
    let remote_steps = steps(&record["events"]);

    let l = belay_local(
        &local_db.url,
        &belay_e2e::examples(),
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
    assert_eq!(remote_steps, local_steps, "{r:?}");
    // The same document keys in both modes.
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        k.sort();
        k
    };
    assert_eq!(keys(&doc), keys(&l.json()), "{r:?}");
    assert_eq!(keys(record), keys(&l.json()["deployment"]), "{r:?}");

    // On the controller: a one-target deployment with the target's events, step by step.
    let shown = show(&addr, &id).await?;
    assert_eq!(shown["state"], "succeeded", "{shown}");
    assert_eq!(shown["release"], "1.6.0", "{shown}");
    assert_eq!(shown["requested_by"], record["requested_by"], "{shown}");
    let t = target(&shown, "rec_1");
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["step"], "succeeded", "{t}");
    assert_eq!(steps(&t["events"]), local_steps, "{t}");
    let applied = t["events"]
        .as_array()
        .context("events")?
        .iter()
        .filter(|e| e["kind"] == "succeeded" && e["step"] == "migrating")
        .count();
    assert_eq!(applied, 4, "{t}");
    let list = belay(&addr, &["deployments", "list", "--output", "json"]).await?;
    assert!(
        list.json().as_array().is_some_and(|ds| ds
            .iter()
            .any(|d| d["id"] == id.as_str() && d["release"] == "1.6.0")),
        "{list:?}"
    );
    let text = belay(&addr, &["deployments", "show", &id]).await?;
    assert!(text.stdout.contains("release 1.6.0"), "{text:?}");

    // Beside the target: the agent's record with the release, and every history row
    // linked to the deployment.
    let beside = belay_local(
        &db.url,
        &belay_e2e::examples(),
        &["deployments", "list", "--output", "json"],
    )
    .await?;
    assert!(
        beside
            .json()
            .as_array()
            .is_some_and(|ds| ds.iter().any(|d| d["id"] == id.as_str()
                && d["release"] == "1.6.0"
                && d["state"] == "succeeded")),
        "{beside:?}"
    );
    let status = belay(&addr, &["--target", "rec_1", "status", "--output", "json"]).await?;
    assert_eq!(status.code, 0, "{status:?}");
    let rows = status.json();
    let rows = rows.as_array().context("status rows")?;
    assert_eq!(rows.len(), 4, "{status:?}");
    assert!(
        rows.iter().all(|m| m["deployment_id"] == id.as_str()),
        "{status:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_migrate_is_refused_by_the_agents_lint_gate_until_a_directive_allows_it()
-> Result<()> {
    let db = Cluster::shared().create_database().await?;
    let migrations = tempfile::tempdir()?;
    std::fs::write(
        migrations.path().join("V1__t.sql"),
        "CREATE TABLE t (a int);\nCREATE TABLE e (a int);\n",
    )?;
    let f = fleet_with("lint_1", &db, migrations.path(), "").await?;
    let migrate = || belay(&f.controller.addr, &["--target", "lint_1", "migrate"]);
    let r = migrate().await?;
    assert_eq!(r.code, 0, "{r:?}");
    // t is live and over the small-table threshold; e stays empty.
    let (mut c, _) = session(&db.url).await?;
    sqlx::query("INSERT INTO t SELECT generate_series(1, 20000)")
        .execute(&mut c)
        .await?;
    sqlx::query("ANALYZE t").execute(&mut c).await?;

    // The script is on the agent, not here: the agent's gate finds the error.
    let v2 = migrations.path().join("V2__idx.sql");
    std::fs::write(&v2, "-- lookups\nCREATE INDEX t_a_idx ON t (a);\n")?;
    let r = migrate().await?;
    assert_eq!(
        r.code, 2,
        "the exit code of local mode's lint refusal: {r:?}"
    );
    assert!(
        r.stderr
            .contains("V2__idx.sql:2:1: error[create-index-concurrently]"),
        "{r:?}"
    );
    assert!(r.stderr.contains("nothing was applied"), "{r:?}");
    assert!(
        r.stderr
            .contains("-- belay:allow=create-index-concurrently <why it is safe>"),
        "says how to allow it: {r:?}"
    );
    assert!(r.stderr.contains("`lint = false`"), "{r:?}");
    let versions = |h: Vec<(String, String, Value)>| -> Vec<(String, String)> {
        h.into_iter().map(|(v, s, _)| (v, s)).collect()
    };
    assert_eq!(
        versions(history(&db).await?),
        [("1".to_string(), "success".to_string())],
        "nothing applied, history untouched"
    );
    let indexed = "SELECT count(*) FROM pg_indexes WHERE indexname = 't_a_idx'";
    let n: i64 = sqlx::query_scalar(indexed).fetch_one(&mut c).await?;
    assert_eq!(n, 0);

    std::fs::write(
        &v2,
        "-- lookups\n-- belay:allow=create-index-concurrently small table\nCREATE INDEX t_a_idx ON t (a);\n",
    )?;
    let r = migrate().await?;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        versions(history(&db).await?),
        [
            ("1".to_string(), "success".to_string()),
            ("2".to_string(), "success".to_string())
        ]
    );
    let n: i64 = sqlx::query_scalar(indexed).fetch_one(&mut c).await?;
    assert_eq!(n, 1);

    // The agent reads the facts on its run's session: e is empty, so the index on it is
    // downgraded, with the reason in the run's events, and applied.
    std::fs::write(
        migrations.path().join("V3__idx.sql"),
        "CREATE INDEX e_a_idx ON e (a);\n",
    )?;
    let r = migrate().await?;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout
            .contains("warning: lint: V3__idx.sql:1:1: warning[create-index-concurrently]")
            && r.stdout
                .contains("downgraded: table public.e is empty: the SHARE lock is brief"),
        "{r:?}"
    );
    Ok(())
}

/// `DeployService.DeployTarget` through the controller runs on the agent owning the
/// target: the controller routes it (as it routes migration and health calls), the
/// agent's pipeline records it in the target's own deployment log with the release, and
/// a caller that goes away after the first event does not cut it short.
#[tokio::test(flavor = "multi_thread")]
async fn deploy_target_through_the_controller_is_run_and_recorded_by_the_agent() -> Result<()> {
    use belay_proto::v1 as pb;
    let db = Cluster::shared().create_database().await?;
    let f = fleet("route_1", &db).await?;
    let id = "6f1c3a52-8e4b-4d7e-9a1f-2b3c4d5e6f70";
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", f.controller.addr))?
        .connect()
        .await?;
    let mut client = pb::deploy_service_client::DeployServiceClient::new(channel);
    let mut stream = client
        .deploy_target(pb::DeployTargetRequest {
            target: Some(pb::Target {
                name: "route_1".into(),
            }),
            deployment_id: id.into(),
            forward: Some(pb::ForwardTarget::default()),
            environment: None,
            requested_by: Some("e2e".into()),
            release: Some("1.6.0".into()),
            policy: Some(pb::DeployerPolicy::default()),
        })
        .await?
        .into_inner();
    let first = stream.message().await?;
    assert!(
        matches!(
            first.and_then(|m| m.message),
            Some(pb::deploy_target_message::Message::Event(_))
        ),
        "the agent's pipeline streams its events through the controller"
    );
    // The caller goes away; the deployment goes on where the database is.
    drop(stream);
    drop(client);

    let dir = belay_e2e::examples();
    wait_for(
        "the agent to record the deployment as succeeded",
        || async {
            let r =
                belay_local(&db.url, &dir, &["deployments", "list", "--output", "json"]).await?;
            Ok(r.code == 0
                && r.json().as_array().is_some_and(|ds| {
                    ds.iter().any(|d| {
                        d["id"] == id
                            && d["release"] == "1.6.0"
                            && d["requested_by"] == "e2e"
                            && d["state"] == "succeeded"
                    })
                }))
        },
    )
    .await?;
    // Applied by the agent, under the deployment's id.
    let rows = history(&db).await?;
    assert!(!rows.is_empty(), "{rows:?}");
    Ok(())
}

/// An unknown target is refused by the controller with the error naming it, and nothing
/// is recorded anywhere.
#[tokio::test(flavor = "multi_thread")]
async fn deploy_target_through_the_controller_refuses_an_unknown_target() -> Result<()> {
    use belay_proto::v1 as pb;
    let db = Cluster::shared().create_database().await?;
    let f = fleet("route_2", &db).await?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", f.controller.addr))?
        .connect()
        .await?;
    let mut client = pb::deploy_service_client::DeployServiceClient::new(channel);
    let r = client
        .deploy_target(pb::DeployTargetRequest {
            target: Some(pb::Target {
                name: "nowhere".into(),
            }),
            deployment_id: "6f1c3a52-8e4b-4d7e-9a1f-2b3c4d5e6f71".into(),
            forward: Some(pb::ForwardTarget::default()),
            release: Some("1.6.0".into()),
            policy: Some(pb::DeployerPolicy::default()),
            ..Default::default()
        })
        .await;
    let status = match r {
        Err(s) => s,
        Ok(resp) => match resp.into_inner().message().await {
            Err(s) => s,
            Ok(m) => panic!("an unknown target was deployed: {m:?}"),
        },
    };
    assert!(status.message().contains("nowhere"), "{status:?}");
    assert!(history(&db).await?.is_empty());
    Ok(())
}

/// `belay psql`-style one-value query on `db`.
fn one(db: &TestDb, sql: &str) -> String {
    belay_e2e::psql(&db.url, sql)
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_repair_takes_version_checksums_only_and_failed_only_as_local_mode_does()
-> Result<()> {
    let db = Cluster::shared().create_database().await?;
    let m = tempfile::tempdir()?;
    std::fs::write(m.path().join("V1__one.sql"), "CREATE TABLE one (id int);")?;
    std::fs::write(m.path().join("V2__two.sql"), "CREATE TABLE two (id int);")?;
    let f = fleet_with("rep_1", &db, m.path(), "").await?;
    let c = &f.controller.addr;
    let run = |args: &'static [&'static str]| {
        let mut all = vec!["--target", "rep_1"];
        all.extend_from_slice(args);
        async move { belay(c, &all).await }
    };
    let r = run(&["migrate"]).await?;
    assert_eq!(r.code, 0, "{r:?}");
    let checksum = |v: &str| {
        one(
            &db,
            &format!(
                "SELECT checksum FROM belay.schema_history WHERE version = '{v}' AND state = 'success'"
            ),
        )
    };
    let v1_before = checksum("1");
    // Drift on 1 and 2, and a no-transaction migration that fails half-way.
    std::fs::write(
        m.path().join("V1__one.sql"),
        "CREATE TABLE one (id bigint);",
    )?;
    std::fs::write(
        m.path().join("V2__two.sql"),
        "CREATE TABLE two (id bigint);",
    )?;
    std::fs::write(
        m.path().join("V3__three.sql"),
        "-- belay:no-transaction\nCREATE TABLE three (id int);\nSELECT 1/0;\n",
    )?;

    // --version with --checksums-only: only 1 is realigned, and recorded so.
    let r = run(&["repair", "--version", "1", "--checksums-only"]).await?;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("repaired 1 (V1__one.sql): realigned") && !r.stdout.contains("V2__two"),
        "{r:?}"
    );
    let v1_after = checksum("1");
    assert_ne!(v1_after, v1_before);
    assert_eq!(
        one(
            &db,
            "SELECT notes->'repairs'->0->>'action', notes->'repairs'->0->>'from', \
             notes->'repairs'->0->>'to' FROM belay.schema_history WHERE version = '1'"
        ),
        format!("checksum_realigned|{v1_before}|{v1_after}")
    );
    assert_eq!(
        one(
            &db,
            "SELECT notes->'repairs' IS NULL FROM belay.schema_history WHERE version = '2'"
        ),
        "t",
        "2 keeps its drift"
    );

    // --version alone: 2 is realigned; then 3 fails.
    let r = run(&["repair", "--version", "2"]).await?;
    assert_eq!(r.code, 0, "{r:?}");
    let r = run(&["migrate"]).await?;
    assert_ne!(r.code, 0, "3 fails: {r:?}");
    assert_eq!(
        one(
            &db,
            "SELECT state FROM belay.schema_history WHERE version = '3'"
        ),
        "failed"
    );

    // --checksums-only leaves the failed row alone.
    let r = run(&["repair", "--checksums-only"]).await?;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("nothing to repair"), "{r:?}");
    assert_eq!(
        one(
            &db,
            "SELECT state FROM belay.schema_history WHERE version = '3'"
        ),
        "failed"
    );

    // --failed-only sets it aside, recorded, and leaves new drift on 2 alone.
    std::fs::write(m.path().join("V2__two.sql"), "CREATE TABLE two (id text);")?;
    let r = run(&["repair", "--failed-only"]).await?;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout
            .contains("repaired 3 (V3__three.sql): marked the failed attempt")
            && !r.stdout.contains("V2__two"),
        "{r:?}"
    );
    assert_eq!(
        one(
            &db,
            "SELECT state, notes->'repairs'->0->>'action', notes->'repairs'->0->>'was' \
             FROM belay.schema_history WHERE version = '3'"
        ),
        "repaired|set_aside|failed"
    );
    assert_eq!(
        one(
            &db,
            "SELECT jsonb_array_length(notes->'repairs') FROM belay.schema_history \
             WHERE version = '2' AND state = 'success'"
        ),
        "1",
        "2's new drift is not realigned by --failed-only"
    );

    // A version no migration has is refused, naming it, as locally (exit 2).
    let r = run(&["repair", "--version", "9"]).await?;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains('9'), "{r:?}");
    Ok(())
}
