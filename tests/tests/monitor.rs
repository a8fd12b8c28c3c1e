//! Lock monitoring and health checks in remote mode, end to end: a real controller, a real
//! agent and the real CLI against a real PostgreSQL, with sessions in conflict set up by
//! the test and a local HTTP server for probes.

use anyhow::{Context, Result};
use belay_e2e::{
    Conflict, Daemon, Run, TargetDef, agent_config, belay, belay_local, conflict, session,
    wait_agents, wait_for,
};
use belay_testkit::{Cluster, TestDb};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// A controller (with a metrics endpoint) and one agent owning `target` on `db`.
struct Fleet {
    _tmp: tempfile::TempDir,
    controller: Daemon,
    _agent: Daemon,
    /// The agent's `/metrics`: probes are counted where they run.
    metrics: String,
    controller_metrics: String,
}

async fn fleet(target: &str, db: &TestDb) -> Result<Fleet> {
    let tmp = tempfile::tempdir()?;
    let store = tmp
        .path()
        .join("controller.db")
        .to_string_lossy()
        .into_owned();
    let (metrics, controller_metrics) = {
        let (a, c) = (
            std::net::TcpListener::bind("127.0.0.1:0")?,
            std::net::TcpListener::bind("127.0.0.1:0")?,
        );
        (a.local_addr()?.to_string(), c.local_addr()?.to_string())
    };
    let controller =
        belay_e2e::controller(&store, &["--metrics-listen", &controller_metrics]).await?;
    let ex = belay_e2e::examples();
    let config = agent_config(
        tmp.path(),
        "agent-1",
        &controller.addr,
        &[TargetDef {
            name: target,
            url: &db.url,
            migrations: &ex,
            environment: None,
        }],
    )?;
    let config = config.to_string_lossy().into_owned();
    let agent = belay_e2e::Daemon::start(
        "belay-agent",
        &[
            "--listen",
            "127.0.0.1:0",
            "--config",
            &config,
            "--metrics-listen",
            &metrics,
        ],
        &[],
    )
    .await?;
    wait_agents(&controller.addr, 1).await?;
    Ok(Fleet {
        _tmp: tmp,
        controller,
        _agent: agent,
        metrics,
        controller_metrics,
    })
}

fn lines(r: &Run) -> Vec<Value> {
    r.stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{r:?}")))
        .collect()
}

/// The snapshot without what changes from one sample to the next (times, wait and
/// transaction ages), to compare two samples of the same situation.
fn shape(mut v: Value) -> Value {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                for k in ["at", "waiting_ms", "xact_ms", "query_ms", "state_ms"] {
                    if let Some(x) = m.get_mut(k)
                        && !x.is_null()
                    {
                        *x = Value::from("<time>");
                    }
                }
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_locks_show_the_blocking_tree_as_local_mode_does() -> Result<()> {
    let db = Cluster::shared().create_database().await?;
    let f = fleet("locks_1", &db).await?;
    let c = conflict(&db.url).await?;
    let remote = |args: &'static [&'static str]| {
        let mut all = vec!["--target", "locks_1", "locks"];
        all.extend_from_slice(args);
        let addr = f.controller.addr.clone();
        async move { belay(&addr, &all).await }
    };

    let r = remote(&["--output", "json"]).await?;
    assert_eq!(r.code, 0, "{r:?}");
    let snap = r.json();
    let trees = snap["trees"].as_array().context("trees")?;
    assert_eq!(trees.len(), 1, "{snap:#}");
    let root = &trees[0];
    assert_eq!(root["pid"], c.a_pid, "{snap:#}");
    assert_eq!(root["mode"], "RowExclusiveLock", "{snap:#}");
    assert_eq!(root["relation"], "t", "{snap:#}");
    assert_eq!(root["database"], db.name.as_str(), "{snap:#}");
    assert_eq!(root["state"], "idle in transaction", "{snap:#}");
    assert!(root["waiting_ms"].is_null(), "{snap:#}");
    let child = &root["children"][0];
    assert_eq!(child["pid"], c.b_pid, "{snap:#}");
    assert_eq!(child["mode"], "AccessExclusiveLock", "{snap:#}");
    assert_eq!(child["relation"], "t", "{snap:#}");
    assert_eq!(child["lock_type"], "relation", "{snap:#}");
    assert_eq!(child["wait_event"], "Lock:relation", "{snap:#}");
    assert_eq!(
        child["blocked_by"],
        serde_json::json!([c.a_pid]),
        "{snap:#}"
    );
    assert!(child["waiting_ms"].is_u64(), "{snap:#}");
    assert!(
        child["query"]
            .as_str()
            .is_some_and(|q| q.contains("ALTER TABLE t")),
        "{snap:#}"
    );

    // Local mode prints the same document for the same situation.
    let local = belay_local(
        &db.url,
        &belay_e2e::examples(),
        &["locks", "--output", "json"],
    )
    .await?;
    assert_eq!(local.code, 0, "{local:?}");
    assert_eq!(shape(local.json()), shape(snap));

    let r = remote(&[]).await?;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("blocking trees: 1 (1 session(s) waiting"),
        "{r:?}"
    );
    assert!(
        r.stdout.contains(&format!("pid {} · user=", c.a_pid))
            && r.stdout.contains("holds RowExclusiveLock on t"),
        "{r:?}"
    );
    assert!(r.stdout.contains("for AccessExclusiveLock on t"), "{r:?}");

    // The options travel: a tree younger than --min-wait is left out.
    let r = remote(&["--min-wait", "1h", "--output", "json"]).await?;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["trees"], serde_json::json!([]), "{r:?}");

    // --watch streams one snapshot per period, here bounded by --count.
    let r = remote(&[
        "--watch", "--period", "100ms", "--count", "3", "--output", "json",
    ])
    .await?;
    assert_eq!(r.code, 0, "{r:?}");
    let snaps = lines(&r);
    assert_eq!(snaps.len(), 3, "{r:?}");
    for s in &snaps {
        assert_eq!(s["trees"][0]["pid"], c.a_pid, "{r:?}");
        assert_eq!(s["trees"][0]["children"][0]["pid"], c.b_pid, "{r:?}");
    }
    let times: Vec<&str> = snaps.iter().filter_map(|s| s["at"].as_str()).collect();
    assert!(
        times.windows(2).all(|w| w[0] < w[1]),
        "each line is a new sample: {times:?}"
    );
    let r = remote(&["--watch", "--period", "100ms", "--count", "2"]).await?;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout.matches("── ").count(), 2, "{r:?}");
    assert_eq!(r.stdout.matches("blocking trees: 1 ").count(), 2, "{r:?}");

    c.end().await?;
    let r = remote(&["--output", "json"]).await?;
    assert_eq!(r.json()["trees"], serde_json::json!([]), "{r:?}");
    Ok(())
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name} in {report:#}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_preflight_blocks_while_a_lock_is_held() -> Result<()> {
    let db = Cluster::shared().create_database().await?;
    let f = fleet("pre_1", &db).await?;
    let addr = f.controller.addr.clone();
    let preflight = |extra: &'static [&'static str]| {
        let mut all = vec![
            "--target",
            "pre_1",
            "check",
            "preflight",
            "--output",
            "json",
        ];
        all.extend_from_slice(extra);
        let addr = addr.clone();
        async move { belay(&addr, &all).await }
    };

    let r = preflight(&[]).await?;
    assert_eq!(r.code, 0, "{r:?}");
    let report = r.json();
    for c in report.as_array().context("an array of checks")? {
        for field in ["name", "status", "value", "threshold", "remedy"] {
            assert!(c[field].is_string(), "{field} in {c}");
        }
    }
    assert_eq!(check(&report, "lock_waits")["status"], "pass", "{report:#}");
    // The migration state is the agent's: the examples are all pending there.
    assert_eq!(
        check(&report, "pending_migrations")["status"],
        "pass",
        "{report:#}"
    );
    assert!(
        check(&report, "pending_migrations")["value"]
            .as_str()
            .is_some_and(|v| v.contains('4')),
        "{report:#}"
    );

    let c = conflict(&db.url).await?;
    // Blocks once B has waited longer than the default lock_wait_block (1s), and goes on
    // blocking while B waits.
    wait_for("preflight to block on the lock wait", || async {
        let r = preflight(&[]).await?;
        Ok(r.code == 2 && check(&r.json(), "lock_waits")["status"] == "block")
    })
    .await?;
    let r = preflight(&[]).await?;
    assert_eq!(r.code, 2, "{r:?}");
    let report = r.json();
    let lock_waits = check(&report, "lock_waits");
    assert!(
        lock_waits["value"]
            .as_str()
            .is_some_and(|v| v.contains(&c.b_pid.to_string())),
        "{lock_waits}"
    );
    assert!(
        lock_waits["threshold"]
            .as_str()
            .is_some_and(|t| t.contains("block > 1s")),
        "{lock_waits}"
    );
    assert!(
        !lock_waits["remedy"].as_str().unwrap_or("").is_empty(),
        "{lock_waits}"
    );

    // Local mode runs the same checklist.
    let local = belay_local(
        &db.url,
        &belay_e2e::examples(),
        &["check", "preflight", "--output", "json"],
    )
    .await?;
    assert_eq!(local.code, 2, "{local:?}");
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|c| c["name"].to_string()).collect())
            .unwrap_or_default()
    };
    assert_eq!(names(&local.json()), names(&report));
    assert_eq!(check(&local.json(), "lock_waits")["status"], "block");

    // Text mode says what blocks and what to do.
    let r = belay(&addr, &["--target", "pre_1", "check", "preflight"]).await?;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stdout.contains("BLOCK lock_waits"), "{r:?}");
    assert!(r.stdout.contains("remedy: "), "{r:?}");

    // An override and its reason travel to the agent and come back recorded.
    let r = preflight(&["--override-check", "lock_waits", "--reason", "owner agreed"]).await?;
    assert_eq!(r.code, 0, "{r:?}");
    let lock_waits = check(&r.json(), "lock_waits").clone();
    assert_eq!(lock_waits["status"], "warn", "{lock_waits}");
    assert_eq!(lock_waits["overridden"], "owner agreed", "{lock_waits}");
    let r = preflight(&["--override-check", "lock_wait", "--reason", "typo"]).await?;
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("lock_waits"), "{r:?}");

    // So do the caller's thresholds (belay.toml).
    let tmp = tempfile::tempdir()?;
    let config = tmp.path().join("belay.toml");
    std::fs::write(&config, "[preflight]\nlock_wait_block = \"1h\"\n")?;
    let config = config.to_string_lossy().into_owned();
    let r = belay(
        &addr,
        &[
            "--config",
            &config,
            "--target",
            "pre_1",
            "check",
            "preflight",
            "--output",
            "json",
        ],
    )
    .await?;
    assert_eq!(r.code, 0, "{r:?}");
    let lock_waits = check(&r.json(), "lock_waits").clone();
    assert_eq!(lock_waits["status"], "warn", "{lock_waits}");
    assert!(
        lock_waits["threshold"]
            .as_str()
            .is_some_and(|t| t.contains("block > 1h")),
        "{lock_waits}"
    );

    c.end().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_postflight_names_the_failing_objects_and_queries() -> Result<()> {
    let db = Cluster::shared().create_database().await?;
    let f = fleet("post_1", &db).await?;
    let (mut c, _) = session(&db.url).await?;
    sqlx::raw_sql("CREATE TABLE dup (v int); INSERT INTO dup VALUES (1), (1)")
        .execute(&mut c)
        .await?;
    // A failed CREATE INDEX CONCURRENTLY leaves an INVALID index behind.
    let failed = sqlx::raw_sql("CREATE UNIQUE INDEX CONCURRENTLY dup_v ON dup (v)")
        .execute(&mut c)
        .await;
    assert!(failed.is_err(), "duplicates must fail the unique index");

    let tmp = tempfile::tempdir()?;
    let config = tmp.path().join("belay.toml");
    std::fs::write(
        &config,
        "[[checks]]\nname = \"no duplicates\"\nquery = \"SELECT count(*) - count(DISTINCT v) FROM dup\"\nexpect = \"zero\"\n",
    )?;
    let config = config.to_string_lossy().into_owned();
    let r = belay(
        &f.controller.addr,
        &[
            "--config",
            &config,
            "--target",
            "post_1",
            "check",
            "postflight",
            "--output",
            "json",
        ],
    )
    .await?;
    assert_eq!(r.code, 2, "{r:?}");
    let report = r.json();
    let invalid = check(&report, "invalid_indexes");
    assert_eq!(invalid["status"], "block", "{report:#}");
    assert!(
        invalid["value"]
            .as_str()
            .is_some_and(|v| v.contains("dup_v")),
        "{report:#}"
    );
    let mine = check(&report, "no duplicates");
    assert_eq!(mine["status"], "block", "{report:#}");
    assert_eq!(
        mine["query"], "SELECT count(*) - count(DISTINCT v) FROM dup",
        "{report:#}"
    );
    // The history check is the agent's: it holds the migrations and their history.
    assert_eq!(check(&report, "history")["status"], "pass", "{report:#}");

    sqlx::raw_sql("DROP INDEX dup_v; DELETE FROM dup")
        .execute(&mut c)
        .await?;
    let r = belay(
        &f.controller.addr,
        &[
            "--config",
            &config,
            "--target",
            "post_1",
            "check",
            "postflight",
        ],
    )
    .await?;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("pass  no duplicates"), "{r:?}");
    Ok(())
}

/// A JSON probe run's events, and the final error document `--output json` prints.
fn probe_lines(r: &Run) -> (Vec<Value>, Value) {
    let mut all = lines(r);
    let verdict = all.pop().unwrap_or_default();
    assert!(verdict["error"].is_string(), "{r:?}");
    (all, verdict)
}

/// A local HTTP endpoint answering every request with `status` and `body`.
async fn http_server(status: u16, body: &'static str) -> Result<(String, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
            });
        }
    });
    Ok((format!("http://{addr}/health"), task))
}

/// The value of one series of a Prometheus text exposition, 0 when absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).map(str::trim))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn scrape(addr: &str) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: belay\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_probe_exits_after_its_failure_threshold_with_the_evidence() -> Result<()> {
    let db = Cluster::shared().create_database().await?;
    let f = fleet("probe_1", &db).await?;
    let (down, _server) = http_server(503, r#"{"db":"down"}"#).await?;

    let r = belay(
        &f.controller.addr,
        &[
            "--target",
            "probe_1",
            "probe",
            "http",
            &down,
            "--period",
            "200ms",
            "--failure-threshold",
            "3",
            "--output",
            "json",
        ],
    )
    .await?;
    assert_eq!(r.code, 4, "{r:?}");
    let (events, verdict) = probe_lines(&r);
    assert_eq!(events.len(), 3, "stops at the triggering event: {r:?}");
    assert_eq!(verdict["exit_code"], 4, "{r:?}");
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["result"], "fail", "{e}");
        assert_eq!(e["seq"], i + 1, "{e}");
        assert_eq!(e["consecutive_failures"], i + 1, "{e}");
        assert_eq!(e["evidence"]["status"], 503, "{e}");
        assert_eq!(e["evidence"]["body"], r#"{"db":"down"}"#, "{e}");
    }
    let last = &events[2];
    assert_eq!(last["triggered"], true, "{last}");
    assert_eq!(last["transition"], "triggered", "{last}");
    assert_eq!(last["state"], "triggered", "{last}");
    assert!(
        r.stderr
            .contains("probe http crossed its failure threshold (3 consecutive failures)")
            && r.stderr.contains("status 503"),
        "{r:?}"
    );

    // The agent counted the attempts it ran; the controller relaying them counts nothing.
    let relayed = scrape(&f.controller_metrics).await?;
    assert!(!relayed.contains("belay_probe_"), "{relayed}");
    let text = scrape(&f.metrics).await?;
    let failures = metric(
        &text,
        r#"belay_probe_failures_total{target="probe_1",probe="http"}"#,
    );
    assert!(failures >= 3.0, "{text}");
    assert_eq!(
        metric(
            &text,
            r#"belay_probe_transitions_total{target="probe_1",probe="http",to="triggered"}"#
        ),
        1.0,
        "{text}"
    );

    // Text mode: one line per attempt, then the evidence.
    let r = belay(
        &f.controller.addr,
        &[
            "--target",
            "probe_1",
            "probe",
            "http",
            &down,
            "--period",
            "100ms",
            "--failure-threshold",
            "2",
        ],
    )
    .await?;
    assert_eq!(r.code, 4, "{r:?}");
    assert!(r.stdout.contains("http: fail 1/2 (status 503"), "{r:?}");
    assert!(
        r.stdout.contains("http: fail 2/2 (status 503")
            && r.stdout.contains("failure threshold crossed"),
        "{r:?}"
    );

    // A healthy endpoint for the whole --for window exits 0.
    let (up, _server) = http_server(200, r#"{"db":"ok"}"#).await?;
    let r = belay(
        &f.controller.addr,
        &[
            "--target",
            "probe_1",
            "probe",
            "http",
            &up,
            "--json-pointer",
            "/db",
            "--equals",
            "ok",
            "--period",
            "100ms",
            "--for",
            "500ms",
        ],
    )
    .await?;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("http: pass (status 200"), "{r:?}");
    assert!(r.stdout.contains("no failure threshold crossed"), "{r:?}");

    // A SQL probe runs on the target's database, through the agent that holds its URL.
    let r = belay(
        &f.controller.addr,
        &[
            "--target",
            "probe_1",
            "probe",
            "sql",
            "SELECT current_database()",
            "--expect",
            "no_rows",
            "--period",
            "100ms",
            "--failure-threshold",
            "1",
            "--output",
            "json",
        ],
    )
    .await?;
    assert_eq!(r.code, 4, "{r:?}");
    let (events, _) = probe_lines(&r);
    assert_eq!(events.len(), 1, "{r:?}");
    assert!(
        events[0]["evidence"]["body"]
            .as_str()
            .is_some_and(|b| b.contains(db.name.as_str())),
        "{r:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_targets_are_usage_errors_for_locks_checks_and_probes() -> Result<()> {
    let db = Cluster::shared().create_database().await?;
    let f = fleet("known_1", &db).await?;
    for args in [
        &["--target", "nope", "locks"][..],
        &["--target", "nope", "locks", "--watch", "--count", "1"],
        &["--target", "nope", "check", "preflight"],
        &["--target", "nope", "check", "postflight"],
        &["--target", "nope", "probe", "http", "http://127.0.0.1:1/"],
    ] {
        let r = belay(&f.controller.addr, args).await?;
        assert_eq!(r.code, 64, "{args:?}: {r:?}");
        assert!(
            r.stderr.contains("unknown target \"nope\""),
            "{args:?}: {r:?}"
        );
    }
    // Remote mode acts on one named target.
    let r = belay(&f.controller.addr, &["locks"]).await?;
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("--target"), "{r:?}");
    Ok(())
}

/// The value of one series of a Prometheus text exposition, `None` when absent.
fn series(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).map(str::trim))
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_samples_lock_gauges_per_target() -> Result<()> {
    let db = Cluster::shared().create_database().await?;
    let tmp = tempfile::tempdir()?;
    let metrics = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.to_string()
    };
    // Nothing listens there: every sample of `gone` fails.
    let gone_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let ex = belay_e2e::examples();
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"sampler\"\nlock_sample_period = \"1s\"\n\
             [[targets]]\nname = \"gauged\"\nurl = \"{url}\"\nmigrations = \"{ex}\"\n\
             [[targets]]\nname = \"gone\"\nurl = \"postgres://app:hunter2@127.0.0.1:{gone_port}/x\"\nmigrations = \"{ex}\"\n\
             [[targets]]\nname = \"quiet\"\nurl = \"{url}\"\nmigrations = \"{ex}\"\nlock_sample_period = \"off\"\n",
            url = db.url,
            ex = ex.display(),
        ),
    )?;
    let config = config.to_string_lossy().into_owned();
    let mut agent = Daemon::start(
        "belay-agent",
        &[
            "--listen",
            "127.0.0.1:0",
            "--config",
            &config,
            "--metrics-listen",
            &metrics,
        ],
        &[],
    )
    .await?;
    let blocked = r#"belay_blocked_sessions{target="gauged"}"#;

    // B queues behind A: the next sample shows it.
    let c = conflict(&db.url).await?;
    // A sample taken the instant B queued shows it blocked for 0 s; the next shows it
    // waiting (B waits until A leaves).
    let longest = r#"belay_longest_lock_wait_seconds{target="gauged"}"#;
    wait_for("the gauge to show the blocked session waiting", || async {
        let text = scrape(&metrics).await?;
        Ok(series(&text, blocked).is_some_and(|v| v >= 1.0)
            && series(&text, longest).is_some_and(|s| s > 0.0))
    })
    .await?;
    let text = scrape(&metrics).await?;
    for name in [
        "belay_blocked_sessions",
        "belay_longest_lock_wait_seconds",
        "belay_long_running_queries",
        "belay_idle_in_transaction_sessions",
        "belay_replication_lag_bytes",
    ] {
        let help = text
            .lines()
            .find(|l| l.starts_with(&format!("# HELP {name} ")))
            .with_context(|| format!("no help for {name}: {text}"))?;
        assert!(help.contains("by target"), "{help}");
        assert!(
            text.contains(&format!("{name}{{target=\"gauged\"}}")),
            "{name}: {text}"
        );
        // The target's counters exist from start-up; its lock gauges only when sampled.
        assert!(
            !text.contains(&format!("{name}{{target=\"quiet\"}}")),
            "sampling is off for quiet, yet {name} is exported: {text}"
        );
    }

    // A leaves, B gets its lock and finishes: the gauge drops back to zero.
    let Conflict { a, b, .. } = c;
    drop(a);
    b.await??;
    wait_for("the gauge to drop to zero", || async {
        Ok(series(&scrape(&metrics).await?, blocked) == Some(0.0))
    })
    .await?;

    // An unreachable target: failures are counted, warned about once per streak.
    wait_for("three failed samples of `gone`", || async {
        let text = scrape(&metrics).await?;
        Ok(
            series(&text, r#"belay_lock_sample_failures_total{target="gone"}"#)
                .is_some_and(|v| v >= 3.0),
        )
    })
    .await?;
    let (code, stderr) = agent.stop().await?;
    assert_eq!(code, Some(0), "{stderr}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("lock sample failed"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("gone"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    Ok(())
}
