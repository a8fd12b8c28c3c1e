//! Every behaviour runs against both backends: a SQLite file in a temp dir and a fresh
//! database on the shared throwaway PostgreSQL cluster.

use belay_store::{
    AgentRegistration, Backend, BackupRecord, DeploymentState, NewDeployment, NewEvent, Store,
    StoreError, TargetRegistration, TargetState,
};
use chrono::{Duration as ChronoDuration, Utc};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use uuid::Uuid;

/// One store to test against: how to open it, and what keeps it alive.
struct Fixture {
    backend: Backend,
    spec: String,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    async fn open(&self) -> Store {
        match Store::open(&self.spec).await {
            Ok(s) => {
                assert_eq!(s.backend(), self.backend);
                s
            }
            Err(e) => panic!("{}: open {}: {e}", self.backend, self.spec),
        }
    }
}

async fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    // A directory that does not exist yet: open creates it.
    let spec = format!(
        "sqlite://{}",
        dir.path().join("ctl/controller.db").display()
    );
    Fixture {
        backend: Backend::Sqlite,
        spec,
        _dir: Some(dir),
    }
}

async fn postgres() -> Fixture {
    let db = belay_testkit::Cluster::shared()
        .create_database()
        .await
        .expect("test database");
    Fixture {
        backend: Backend::Postgres,
        spec: db.url,
        _dir: None,
    }
}

async fn both() -> [Fixture; 2] {
    [sqlite().await, postgres().await]
}

fn agent(name: &str, targets: &[(&str, Option<&str>)]) -> AgentRegistration {
    AgentRegistration {
        name: name.into(),
        address: format!("https://{name}.internal:7443"),
        version: "0.1.0".into(),
        targets: targets
            .iter()
            .map(|(t, env)| TargetRegistration {
                name: (*t).into(),
                environment: env.map(Into::into),
                labels: BTreeMap::from([("team".to_string(), "payments".to_string())]),
            })
            .collect(),
    }
}

fn deployment(targets: &[&str], env: Option<&str>, version: Option<&str>) -> NewDeployment {
    NewDeployment {
        id: Uuid::new_v4(),
        to_version: version.map(Into::into),
        targets: targets.iter().map(|t| (*t).to_string()).collect(),
        environment: env.map(Into::into),
        params: json!({ "strategy": "waves", "canary": 1 }),
        skip_promotion_reason: None,
        requested_by: Some("alice".into()),
    }
}

fn event(id: Uuid, n: usize) -> NewEvent {
    NewEvent {
        deployment_id: id,
        target: Some("orders".into()),
        kind: "progress".into(),
        message: format!("step {n}"),
        payload: json!({ "n": n, "nested": { "ok": true } }),
    }
}

#[tokio::test]
async fn register_heartbeat_and_targets() {
    for f in both().await {
        let b = f.backend;
        let store = f.open().await;
        assert!(store.agents().await.unwrap().is_empty(), "{b}");
        let before = Utc::now() - ChronoDuration::seconds(1);
        store
            .register_agent(&agent(
                "db1",
                &[("orders", Some("production")), ("billing", None)],
            ))
            .await
            .unwrap();
        store
            .register_agent(&agent("db2", &[("users", Some("staging"))]))
            .await
            .unwrap();

        let agents = store.agents().await.unwrap();
        assert_eq!(agents.len(), 2, "{b}");
        assert_eq!(agents[0].name, "db1");
        assert_eq!(agents[0].address, "https://db1.internal:7443");
        assert_eq!(agents[0].targets, ["billing", "orders"], "{b}");
        assert_eq!(agents[1].targets, ["users"], "{b}");
        assert!(agents[0].registered_at > before, "{b}");
        assert_eq!(agents[0].registered_at, agents[0].last_heartbeat, "{b}");

        let targets = store.targets().await.unwrap();
        let names: Vec<_> = targets.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["billing", "orders", "users"], "{b}");
        let orders = store.target("orders").await.unwrap().expect("orders");
        assert_eq!(orders.agent, "db1");
        assert_eq!(orders.environment.as_deref(), Some("production"));
        assert_eq!(
            orders.labels.get("team").map(String::as_str),
            Some("payments")
        );
        assert_eq!(
            store.target("billing").await.unwrap().unwrap().environment,
            None
        );
        assert!(store.target("nope").await.unwrap().is_none(), "{b}");

        // Heartbeats move forward only; an unknown agent is reported.
        let later = Utc::now() + ChronoDuration::seconds(30);
        assert!(store.heartbeat("db1", later).await.unwrap(), "{b}");
        assert!(
            store
                .heartbeat("db1", later - ChronoDuration::seconds(10))
                .await
                .unwrap()
        );
        assert!(!store.heartbeat("ghost", later).await.unwrap(), "{b}");
        let db1 = store.agents().await.unwrap().remove(0);
        assert_eq!(
            db1.last_heartbeat.timestamp_micros(),
            later.timestamp_micros(),
            "{b}"
        );

        // Registering again replaces the agent's targets and updates its details.
        let mut again = agent("db1", &[("orders", Some("production")), ("ledger", None)]);
        again.version = "0.2.0".into();
        store.register_agent(&again).await.unwrap();
        let db1 = store.agents().await.unwrap().remove(0);
        assert_eq!(db1.version, "0.2.0");
        assert_eq!(db1.targets, ["ledger", "orders"], "{b}");
        assert!(store.target("billing").await.unwrap().is_none(), "{b}");

        // Bad registrations are refused before anything is written.
        let dup = agent("db3", &[("x", None), ("x", None)]);
        let err = store.register_agent(&dup).await.unwrap_err();
        assert!(matches!(err, StoreError::Invalid { .. }), "{b}: {err}");
        assert!(err.to_string().contains("twice"), "{err}");
        assert!(store.register_agent(&agent(" ", &[])).await.is_err());
        assert_eq!(store.agents().await.unwrap().len(), 2, "{b}");
    }
}

#[tokio::test]
async fn a_target_owned_by_another_live_agent_is_refused() {
    for f in both().await {
        let b = f.backend;
        // An agent timeout too large for a timestamp is "forever", not a panic.
        let store = f.open().await.with_agent_timeout(Duration::MAX);
        store
            .register_agent(&agent("db1", &[("orders", None)]))
            .await
            .unwrap();
        let err = store
            .register_agent(&agent("db2", &[("users", None), ("orders", None)]))
            .await
            .unwrap_err();
        match &err {
            StoreError::TargetOwned { target, agent } => {
                assert_eq!((target.as_str(), agent.as_str()), ("orders", "db1"), "{b}");
            }
            other => panic!("{b}: expected TargetOwned, got {other}"),
        }
        assert!(err.to_string().contains("\"db1\""), "{err}");
        // Nothing of the refused registration was kept.
        assert_eq!(store.agents().await.unwrap().len(), 1, "{b}");
        assert!(store.target("users").await.unwrap().is_none(), "{b}");

        // Once the owner has been silent past the agent timeout, the target can move.
        let store = store.with_agent_timeout(Duration::from_millis(1));
        tokio::time::sleep(Duration::from_millis(20)).await;
        store
            .register_agent(&agent("db2", &[("users", None), ("orders", None)]))
            .await
            .unwrap();
        assert_eq!(store.target("orders").await.unwrap().unwrap().agent, "db2");
        let agents = store.agents().await.unwrap();
        assert!(agents[0].targets.is_empty(), "{b}: {agents:?}");
        assert_eq!(agents[1].targets, ["orders", "users"], "{b}");
    }
}

#[tokio::test]
async fn deployment_lifecycle_and_events() {
    use DeploymentState::*;
    for f in both().await {
        let b = f.backend;
        let store = f.open().await;
        let new = deployment(
            &["canary", "orders", "billing"],
            Some("staging"),
            Some("42"),
        );
        let created = store.create_deployment(&new).await.unwrap();
        assert_eq!(created.state, Planned, "{b}");
        assert_eq!(created.last_seq, 1, "{b}");
        let targets: Vec<_> = created.targets.iter().map(|t| t.target.as_str()).collect();
        assert_eq!(
            targets,
            ["canary", "orders", "billing"],
            "{b}: deployment order kept"
        );
        assert!(
            created
                .targets
                .iter()
                .all(|t| t.state == TargetState::Pending)
        );
        assert_eq!(
            store.deployment(new.id).await.unwrap().as_ref(),
            Some(&created),
            "{b}: what create returns is what is stored"
        );

        let err = store.create_deployment(&new).await.unwrap_err();
        assert!(
            matches!(err, StoreError::DeploymentExists(id) if id == new.id),
            "{b}: {err}"
        );
        let mut dup = deployment(&["a", "a"], None, None);
        dup.id = Uuid::new_v4();
        assert!(matches!(
            store.create_deployment(&dup).await,
            Err(StoreError::Invalid { .. })
        ));

        store
            .transition(new.id, Preflight, "preflight")
            .await
            .unwrap();
        store
            .transition(new.id, Migrating, "no backup configured")
            .await
            .unwrap();
        let err = store.transition(new.id, Planned, "back").await.unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::BadTransition {
                    from: Migrating,
                    to: Planned
                }
            ),
            "{b}: {err}"
        );
        assert!(err.to_string().contains("migrating to planned"), "{err}");
        assert!(matches!(
            store.transition(new.id, RolledBack, "x").await,
            Err(StoreError::BadTransition { .. })
        ));
        store
            .set_target_state(new.id, "canary", TargetState::Running, "applying V42")
            .await
            .unwrap();
        store
            .set_target_state(new.id, "canary", TargetState::Succeeded, "applied")
            .await
            .unwrap();
        let err = store
            .set_target_state(new.id, "ghost", TargetState::Running, "?")
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NoSuchTarget { .. }), "{b}: {err}");
        let appended = store.append_event(&event(new.id, 1)).await.unwrap();
        assert_eq!(appended.seq, 6, "{b}");
        store
            .transition(new.id, Failed, "orders: lock timeout")
            .await
            .unwrap();
        let d = store.deployment(new.id).await.unwrap().unwrap();
        assert_eq!(d.state, Failed);
        assert_eq!(d.finished_at, None, "{b}: failed is not terminal");
        store.transition(new.id, RollingBack, "undo").await.unwrap();
        store
            .transition(new.id, RolledBack, "undone")
            .await
            .unwrap();
        let err = store.transition(new.id, Failed, "again").await.unwrap_err();
        assert!(matches!(
            err,
            StoreError::BadTransition {
                from: RolledBack,
                to: Failed
            }
        ));

        let d = store.deployment(new.id).await.unwrap().unwrap();
        assert_eq!(d.state, RolledBack, "{b}");
        assert!(d.finished_at.is_some(), "{b}");
        assert!(d.updated_at >= d.created_at);
        assert_eq!(d.targets[0].state, TargetState::Succeeded, "{b}");
        assert_eq!(d.targets[0].message, "applied");
        assert_eq!(d.targets[1].state, TargetState::Pending, "{b}");
        assert_eq!(d.params, new.params, "{b}");
        assert_eq!(d.requested_by.as_deref(), Some("alice"));

        let events = store.events(new.id, 0).await.unwrap();
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=9).collect::<Vec<_>>(), "{b}: gap-free");
        assert_eq!(d.last_seq, 9, "{b}");
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "state",
                "state",
                "state",
                "target_state",
                "target_state",
                "progress",
                "state",
                "state",
                "state"
            ],
            "{b}: refused changes leave no event"
        );
        assert_eq!(events[0].payload["to"], "planned");
        assert_eq!(
            events[2].payload,
            json!({ "from": "preflight", "to": "migrating" })
        );
        assert_eq!(events[2].message, "no backup configured");
        assert_eq!(events[3].target.as_deref(), Some("canary"));
        assert_eq!(
            events[5], appended,
            "{b}: what append returns is what is stored"
        );
        assert!(events.windows(2).all(|w| w[0].at <= w[1].at), "{b}");
        let tail = store.events(new.id, 7).await.unwrap();
        assert_eq!(tail.iter().map(|e| e.seq).collect::<Vec<_>>(), [8, 9]);

        // Unknown deployments.
        let ghost = Uuid::new_v4();
        assert!(store.deployment(ghost).await.unwrap().is_none());
        assert!(store.events(ghost, 0).await.unwrap().is_empty());
        for result in [
            store.transition(ghost, Preflight, "").await,
            store
                .set_target_state(ghost, "x", TargetState::Running, "")
                .await,
            store.append_event(&event(ghost, 0)).await.map(|_| ()),
        ] {
            assert!(
                matches!(result, Err(StoreError::NoSuchDeployment(id)) if id == ghost),
                "{b}: {result:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_are_gap_free() {
    const TASKS: usize = 8;
    const EACH: usize = 25;
    for f in both().await {
        let b = f.backend;
        let store = f.open().await;
        let d = store
            .create_deployment(&deployment(&["orders"], None, None))
            .await
            .unwrap();
        let other = store
            .create_deployment(&deployment(&["orders"], None, None))
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let store = store.clone();
            // Most writers on one deployment, a few on another at the same time.
            let id = if t % 4 == 3 { other.id } else { d.id };
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for n in 0..EACH {
                    seqs.push(store.append_event(&event(id, n)).await.unwrap().seq);
                }
                (id, seqs)
            }));
        }
        let mut returned: BTreeMap<Uuid, Vec<i64>> = BTreeMap::new();
        for t in tasks {
            let (id, seqs) = t.await.unwrap();
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "{b}: one writer's seqs rise"
            );
            returned.entry(id).or_default().extend(seqs);
        }
        for (id, writers) in [(d.id, TASKS - TASKS / 4), (other.id, TASKS / 4)] {
            let stored: Vec<i64> = store
                .events(id, 0)
                .await
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect();
            let last = (1 + writers * EACH) as i64;
            assert_eq!(stored, (1..=last).collect::<Vec<_>>(), "{b}: gap-free");
            let mut handed_out = returned.remove(&id).unwrap_or_default();
            handed_out.sort_unstable();
            assert_eq!(
                handed_out,
                (2..=last).collect::<Vec<_>>(),
                "{b}: each seq once"
            );
            assert_eq!(store.deployment(id).await.unwrap().unwrap().last_seq, last);
        }
    }
}

#[tokio::test]
async fn the_store_survives_a_controller_restart() {
    for f in both().await {
        let b = f.backend;
        let (id, events, agents) = {
            let store = f.open().await;
            store
                .register_agent(&agent("db1", &[("orders", Some("production"))]))
                .await
                .unwrap();
            let d = store
                .create_deployment(&deployment(&["orders"], Some("production"), Some("7")))
                .await
                .unwrap();
            store
                .transition(d.id, DeploymentState::Preflight, "checks")
                .await
                .unwrap();
            store.append_event(&event(d.id, 1)).await.unwrap();
            let events = store.events(d.id, 0).await.unwrap();
            let agents = store.agents().await.unwrap();
            store.close().await;
            (d.id, events, agents)
        };
        // Twice: opening a store that is already migrated changes nothing.
        for _ in 0..2 {
            let store = f.open().await;
            assert_eq!(store.events(id, 0).await.unwrap(), events, "{b}");
            assert_eq!(store.agents().await.unwrap(), agents, "{b}");
            let d = store.deployment(id).await.unwrap().unwrap();
            assert_eq!(d.state, DeploymentState::Preflight, "{b}");
            let unfinished = store.unfinished().await.unwrap();
            assert_eq!(unfinished.len(), 1, "{b}");
            assert_eq!(unfinished[0].id, id);
            store.close().await;
        }
        // And it keeps counting where it left off.
        let store = f.open().await;
        let next = store.append_event(&event(id, 2)).await.unwrap();
        assert_eq!(next.seq, events.len() as i64 + 1, "{b}");
    }
}

#[tokio::test]
async fn unfinished_lists_non_terminal_deployments_oldest_first() {
    use DeploymentState::*;
    for f in both().await {
        let b = f.backend;
        let store = f.open().await;
        let mut ids = Vec::new();
        for path in [
            &[Preflight][..],
            &[Migrating, Succeeded],
            &[Migrating, Failed],
            &[Failed, RollingBack],
            &[Failed, Escalated],
            &[Failed, RollingBack, RolledBack],
            &[],
        ] {
            let d = store
                .create_deployment(&deployment(&["orders", "billing"], None, None))
                .await
                .unwrap();
            for to in path {
                store.transition(d.id, *to, "").await.unwrap();
            }
            ids.push(d.id);
        }
        let unfinished = store.unfinished().await.unwrap();
        let got: Vec<_> = unfinished.iter().map(|d| d.id).collect();
        assert_eq!(got, [ids[0], ids[2], ids[3], ids[6]], "{b}");
        assert!(
            unfinished
                .iter()
                .all(|d| d.targets.len() == 2 && d.finished_at.is_none())
        );

        let newest = store.deployments(3).await.unwrap();
        let got: Vec<_> = newest.iter().map(|d| d.id).collect();
        assert_eq!(got, [ids[6], ids[5], ids[4]], "{b}: newest first");
        assert!(newest.iter().all(|d| d.targets.len() == 2));
        assert_eq!(newest[1].state, RolledBack);
        assert_eq!(store.deployments(100).await.unwrap().len(), 7, "{b}");
        assert!(store.deployments(0).await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn succeeded_in_is_the_promotion_gate() {
    use DeploymentState::*;
    for f in both().await {
        let b = f.backend;
        let store = f.open().await;
        assert!(!store.succeeded_in("staging", "42").await.unwrap(), "{b}");
        let failed = store
            .create_deployment(&deployment(&["s1"], Some("staging"), Some("42")))
            .await
            .unwrap();
        store.transition(failed.id, Failed, "boom").await.unwrap();
        let running = store
            .create_deployment(&deployment(&["s1"], Some("staging"), Some("42")))
            .await
            .unwrap();
        store.transition(running.id, Watching, "").await.unwrap();
        assert!(!store.succeeded_in("staging", "42").await.unwrap(), "{b}");
        store.transition(running.id, Succeeded, "").await.unwrap();
        assert!(store.succeeded_in("staging", "42").await.unwrap(), "{b}");
        assert!(!store.succeeded_in("staging", "43").await.unwrap(), "{b}");
        assert!(
            !store.succeeded_in("production", "42").await.unwrap(),
            "{b}"
        );
        assert!(!store.succeeded_in("ci", "42").await.unwrap(), "{b}");
    }
}

#[tokio::test]
async fn bad_specs_fail_clearly() {
    let err = Store::open("mysql://root:hunter2@x/db").await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::UnsupportedSpec { .. }), "{msg}");
    assert!(
        msg.contains("mysql://root:***@x/db") && msg.contains("sqlite://"),
        "{msg}"
    );

    // A path whose "directory" is a file cannot be created by anyone, root included.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let spec = file.join("ctl/controller.db");
    let err = Store::open(&spec.display().to_string()).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Open { .. }), "{msg}");
    assert!(
        msg.contains("plain-file") && msg.contains("writable"),
        "{msg}"
    );

    // A file that is not a SQLite database.
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![0x42u8; 8192]).unwrap();
    let err = Store::open(&junk.display().to_string()).await.unwrap_err();
    assert!(err.to_string().contains("junk.db"), "{err}");

    // Nothing listens on port 1; the password stays hidden.
    let err = Store::open("postgres://belay:hunter2@127.0.0.1:1/ctl")
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Connect { .. }), "{msg}");
    assert!(
        !msg.contains("hunter2") && msg.contains("127.0.0.1:1"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_tampered_sqlite_schema_history_is_refused() {
    let f = sqlite().await;
    f.open().await.close().await;
    let path = f.spec.trim_start_matches("sqlite://").to_string();
    let raw = sqlx::SqlitePool::connect(&format!("sqlite://{path}"))
        .await
        .unwrap();
    sqlx::query("UPDATE store_schema_history SET checksum = 'deadbeef' WHERE version = 1")
        .execute(&raw)
        .await
        .unwrap();
    let err = Store::open(&f.spec).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::SchemaDrift { .. }), "{msg}");
    assert!(
        msg.contains("V1__init.sql") && msg.contains("deadbeef"),
        "{msg}"
    );

    // A store written by a newer belay is refused too, rather than half understood.
    sqlx::query("DELETE FROM store_schema_history WHERE version = 1")
        .execute(&raw)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO store_schema_history (version, script, checksum, installed_on)
         VALUES (99, 'V99__future.sql', 'x', '2030-01-01T00:00:00.000000Z')",
    )
    .execute(&raw)
    .await
    .unwrap();
    let err = Store::open(&f.spec).await.unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
    raw.close().await;
}

#[tokio::test]
async fn a_tampered_postgres_schema_history_is_refused() {
    let f = postgres().await;
    f.open().await.close().await;
    let raw = sqlx::PgPool::connect(&f.spec).await.unwrap();
    sqlx::query("UPDATE belay_store.schema_history SET checksum = 'deadbeef'")
        .execute(&raw)
        .await
        .unwrap();
    raw.close().await;
    let err = Store::open(&f.spec).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Migrate { .. }), "{msg}");
    assert!(msg.contains("V1__init.sql"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_of_a_new_target_have_one_winner() {
    for f in both().await {
        let b = f.backend;
        let store = f.open().await;
        for round in 0..5 {
            let target = format!("shared{round}");
            let claims: Vec<_> = (0..4)
                .map(|i| {
                    let store = store.clone();
                    let reg = agent(&format!("agent{i}"), &[(target.as_str(), None)]);
                    tokio::spawn(async move { store.register_agent(&reg).await })
                })
                .collect();
            let mut won = 0;
            for c in claims {
                match c.await.unwrap() {
                    Ok(()) => won += 1,
                    Err(StoreError::TargetOwned { .. }) => {}
                    Err(e) => panic!("{b}: {e}"),
                }
            }
            assert_eq!(won, 1, "{b}: round {round}");
        }
    }
}

#[tokio::test]
async fn sqlite_store_runs_in_wal_mode_with_foreign_keys() {
    let f = sqlite().await;
    f.open().await.close().await;
    let path = f.spec.trim_start_matches("sqlite://").to_string();
    let raw = sqlx::SqlitePool::connect(&format!("sqlite://{path}"))
        .await
        .unwrap();
    // The journal mode is persistent in the file; a plain connection sees it.
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&raw)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let fks: Vec<String> =
        sqlx::query_scalar("SELECT \"table\" FROM pragma_foreign_key_list('deployment_events')")
            .fetch_all(&raw)
            .await
            .unwrap();
    assert_eq!(fks, ["deployments"]);
    raw.close().await;
}

fn backup(target: &str, id: &str, minute: i64, deployment: Option<Uuid>) -> BackupRecord {
    let created_at =
        chrono::DateTime::from_timestamp(1_800_000_000 + minute * 60, 0).expect("valid time");
    BackupRecord {
        target: target.into(),
        id: id.into(),
        created_at,
        format: "custom".into(),
        scope: "full".into(),
        verified: false,
        size: 4096,
        deployment_id: deployment,
        manifest: json!({ "id": id, "files": [{ "path": "dump.pgdump", "size": 4096 }] }),
        mirrored_at: created_at,
    }
}

#[tokio::test]
async fn the_backup_mirror_follows_the_catalog_and_finds_a_deployments_backup() {
    for f in both().await {
        let b = f.backend;
        let store = f.open().await;
        let d = Uuid::new_v4();
        store
            .mirror_backups(
                "shop",
                &[
                    backup("shop", "b1", 1, None),
                    backup("shop", "b2", 2, Some(d)),
                ],
            )
            .await
            .unwrap();
        store
            .upsert_backup(&backup("orders", "o1", 3, Some(d)))
            .await
            .unwrap();
        let listed = store.backups("shop").await.unwrap();
        let ids: Vec<&str> = listed.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["b2", "b1"], "{b}: newest first");
        assert_eq!(listed[0].deployment_id, Some(d), "{b}");
        assert_eq!(listed[0].size, 4096, "{b}");
        assert_eq!(listed[0].manifest["files"][0]["path"], "dump.pgdump", "{b}");
        assert!(!listed[0].verified, "{b}");

        // Verification updates the row in place.
        let mut verified = backup("shop", "b2", 2, Some(d));
        verified.verified = true;
        store.upsert_backup(&verified).await.unwrap();
        assert!(store.backups("shop").await.unwrap()[0].verified, "{b}");

        // Which backups precede deployment d: one per target it reached.
        let before = store.backups_before(d).await.unwrap();
        let found: Vec<(&str, &str)> = before
            .iter()
            .map(|r| (r.target.as_str(), r.id.as_str()))
            .collect();
        assert_eq!(found, [("orders", "o1"), ("shop", "b2")], "{b}");

        // A fresh listing replaces the mirror: b1 was pruned on the agent, b3 is new.
        store
            .mirror_backups("shop", &[backup("shop", "b3", 4, None), verified.clone()])
            .await
            .unwrap();
        let ids: Vec<String> = store
            .backups("shop")
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["b3", "b2"], "{b}");
        store.delete_backups("shop", &["b3".into()]).await.unwrap();
        assert_eq!(store.backups("shop").await.unwrap().len(), 1, "{b}");
        // Other targets' mirrors are untouched.
        assert_eq!(store.backups("orders").await.unwrap().len(), 1, "{b}");

        // The mirror survives a restart of the controller.
        store.close().await;
        let store = f.open().await;
        assert_eq!(store.backups("shop").await.unwrap()[0].id, "b2", "{b}");

        // A record for another target is refused rather than mirrored under the wrong name.
        let err = store
            .mirror_backups("shop", &[backup("orders", "o2", 5, None)])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Invalid { .. }), "{b}: {err}");
    }
}

#[tokio::test]
async fn each_targets_step_moves_with_its_transition_events_and_keeps_its_outcome() {
    use DeploymentState::*;
    for f in both().await {
        let b = f.backend;
        let store = f.open().await;
        let new = deployment(&["orders", "billing"], None, None);
        store.create_deployment(&new).await.unwrap();
        let step_of = |d: &belay_store::DeploymentRecord, t: &str| {
            d.targets.iter().find(|x| x.target == t).map(|x| x.step)
        };
        let transition = |to: &str| NewEvent {
            deployment_id: new.id,
            target: Some("orders".into()),
            kind: "transition".into(),
            message: format!("→ {to}"),
            payload: json!({ "to": to, "step": to }),
        };
        for (to, state) in [
            ("planned", Planned),
            ("preflight", Preflight),
            ("failed", Failed),
        ] {
            let e = store
                .append_target_event(&transition(to), Some(state))
                .await
                .unwrap();
            let d = store.deployment(new.id).await.unwrap().unwrap();
            assert_eq!(step_of(&d, "orders"), Some(Some(state)), "{b}");
            assert_eq!(d.last_seq, e.seq, "{b}: the event is in the log");
        }
        // An event that is not a transition leaves the step alone.
        store
            .append_target_event(&event(new.id, 1), None)
            .await
            .unwrap();
        let d = store.deployment(new.id).await.unwrap().unwrap();
        assert_eq!(step_of(&d, "orders"), Some(Some(Failed)), "{b}");
        assert_eq!(step_of(&d, "billing"), Some(None), "{b}: not started");
        let outcome = json!({ "state": "failed", "failed_step": "preflight", "evidence": { "blocked": [{ "name": "lock_waits" }] } });
        store
            .finish_target(
                new.id,
                "orders",
                TargetState::Failed,
                "failed at preflight",
                &outcome,
            )
            .await
            .unwrap();
        let d = store.deployment(new.id).await.unwrap().unwrap();
        let orders = d.targets.iter().find(|t| t.target == "orders").unwrap();
        assert_eq!(orders.state, TargetState::Failed, "{b}");
        assert_eq!(orders.outcome, outcome, "{b}");
        assert!(d.targets[1].outcome.is_null(), "{b}");
        // A target the deployment does not have is refused, and nothing is appended.
        let mut stray = transition("preflight");
        stray.target = Some("nope".into());
        let before = d.last_seq;
        assert!(matches!(
            store.append_target_event(&stray, Some(Preflight)).await,
            Err(StoreError::NoSuchTarget { .. })
        ));
        let d = store.deployment(new.id).await.unwrap().unwrap();
        assert_eq!(
            d.last_seq, before,
            "{b}: a refused append takes its seq back"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_target_events_is_stored_in_order_all_or_nothing_beside_other_writers() {
    use DeploymentState::*;
    const TARGETS: usize = 12;
    const BURSTS: usize = 5;
    for f in both().await {
        let b = f.backend;
        let store = f.open().await;
        let names: Vec<String> = (0..TARGETS).map(|i| format!("tenant_{i:02}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let new = deployment(&refs, None, None);
        store.create_deployment(&new).await.unwrap();
        let id = new.id;
        let ev = move |target: &str, kind: &str, n: usize| NewEvent {
            deployment_id: id,
            target: Some(target.into()),
            kind: kind.into(),
            message: format!("{target} {n}"),
            payload: json!({ "n": n }),
        };
        // Every target's recorder writes its bursts at once: on SQLite all of them queue
        // on the store's one writer.
        let mut tasks = Vec::new();
        for t in names.clone() {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for burst in 0..BURSTS {
                    let rows: Vec<(NewEvent, Option<DeploymentState>)> = (0..3)
                        .map(|i| {
                            let n = burst * 3 + i;
                            if i == 0 {
                                (ev(&t, "transition", n), Some(Preflight))
                            } else {
                                (ev(&t, "check", n), None)
                            }
                        })
                        .collect();
                    let stored = store.append_target_events(&rows).await.unwrap();
                    assert_eq!(stored.len(), 3);
                    assert!(
                        stored.windows(2).all(|w| w[1].seq == w[0].seq + 1),
                        "a burst's events are consecutive: {stored:?}"
                    );
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let events = store.events(new.id, 0).await.unwrap();
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        let last = (1 + TARGETS * BURSTS * 3) as i64;
        assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "{b}: gap-free");
        for t in &names {
            let mine: Vec<i64> = events
                .iter()
                .filter(|e| e.target.as_deref() == Some(t))
                .map(|e| e.payload["n"].as_i64().unwrap())
                .collect();
            assert_eq!(
                mine,
                (0..(BURSTS * 3) as i64).collect::<Vec<_>>(),
                "{b}: {t} in order"
            );
        }
        let d = store.deployment(new.id).await.unwrap().unwrap();
        assert!(
            d.targets.iter().all(|t| t.step == Some(Preflight)),
            "{b}: each burst's transition moved its target's step"
        );
        // A burst naming a target the deployment does not have stores none of its events.
        let before = d.last_seq;
        let bad = [
            (ev("tenant_00", "check", 99), None),
            (ev("nope", "transition", 100), Some(Migrating)),
        ];
        assert!(matches!(
            store.append_target_events(&bad).await,
            Err(StoreError::NoSuchTarget { .. })
        ));
        let after = store.events(new.id, before).await.unwrap();
        assert!(
            after.is_empty(),
            "{b}: nothing of a refused burst: {after:?}"
        );
        assert_eq!(
            store.deployment(new.id).await.unwrap().unwrap().last_seq,
            before,
            "{b}"
        );
    }
}

#[tokio::test]
async fn unsettled_lists_every_lost_target_however_old_and_settles_it_once() {
    for f in both().await {
        let b = f.backend;
        let store = f.open().await;
        // More than any page of recent deployments: the oldest lost target still counts.
        let mut lost = Vec::new();
        for i in 0..230 {
            let d = store
                .create_deployment(&deployment(&["orders", "billing"], None, None))
                .await
                .unwrap();
            store
                .set_target_state(d.id, "billing", TargetState::Succeeded, "done")
                .await
                .unwrap();
            if i % 100 == 0 {
                store
                    .set_target_state(d.id, "orders", TargetState::Unknown, "agent lost")
                    .await
                    .unwrap();
                lost.push(d.id);
            } else {
                store
                    .set_target_state(d.id, "orders", TargetState::Failed, "failed")
                    .await
                    .unwrap();
            }
        }
        let unsettled = store.unsettled().await.unwrap();
        let got: Vec<_> = unsettled.iter().map(|d| d.id).collect();
        assert_eq!(
            got, lost,
            "{b}: every deployment with a lost target, oldest first"
        );
        assert!(unsettled.iter().all(|d| d.targets.len() == 2), "{b}");

        let first = lost[0];
        let outcome = json!({ "state": "failed" });
        let before = store.events(first, 0).await.unwrap().len();
        assert!(
            store
                .settle_target(first, "orders", TargetState::Failed, "reconciled", &outcome)
                .await
                .unwrap(),
            "{b}"
        );
        // A second pass that read the list before the first settled it writes nothing.
        assert!(
            !store
                .settle_target(first, "orders", TargetState::Succeeded, "again", &outcome)
                .await
                .unwrap(),
            "{b}"
        );
        let events = store.events(first, 0).await.unwrap();
        assert_eq!(
            events.len(),
            before + 1,
            "{b}: one event for one settlement"
        );
        let d = store.deployment(first).await.unwrap().unwrap();
        assert_eq!(d.targets[0].state, TargetState::Failed, "{b}");
        assert_eq!(d.targets[0].message, "reconciled", "{b}");
        assert_eq!(d.targets[0].outcome, outcome, "{b}");
        // The seq stays gap-free after the refused settlement.
        let next = store.append_event(&event(first, 1)).await.unwrap();
        assert_eq!(next.seq, events.last().unwrap().seq + 1, "{b}");
        let got: Vec<_> = store
            .unsettled()
            .await
            .unwrap()
            .iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(got, lost[1..], "{b}");
    }
}

#[tokio::test]
async fn deployments_are_found_by_id_prefix_in_the_store() {
    for f in both().await {
        let b = f.backend;
        let store = f.open().await;
        // Two ids sharing their first eight characters, one apart, and noise.
        let twin_a = Uuid::parse_str("abcd1234-0000-4000-8000-000000000001").unwrap();
        let twin_b = Uuid::parse_str("abcd1234-0000-4000-8000-000000000002").unwrap();
        let lone = Uuid::parse_str("0123abcd-0000-4000-8000-000000000003").unwrap();
        for id in [twin_a, twin_b, lone] {
            let mut d = deployment(&["orders"], None, None);
            d.id = id;
            store.create_deployment(&d).await.unwrap();
        }
        for _ in 0..5 {
            store
                .create_deployment(&deployment(&["orders"], None, None))
                .await
                .unwrap();
        }
        // A unique prefix, in either case, finds exactly its deployment.
        assert_eq!(
            store
                .deployment_ids_with_prefix("0123ab", 10)
                .await
                .unwrap(),
            [lone],
            "{b}"
        );
        assert_eq!(
            store
                .deployment_ids_with_prefix("0123ABCD-", 10)
                .await
                .unwrap(),
            [lone],
            "{b}"
        );
        // An ambiguous one lists the candidates, in id order, up to the limit.
        assert_eq!(
            store
                .deployment_ids_with_prefix("abcd1234", 10)
                .await
                .unwrap(),
            [twin_a, twin_b],
            "{b}"
        );
        assert_eq!(
            store
                .deployment_ids_with_prefix("abcd1234", 1)
                .await
                .unwrap(),
            [twin_a],
            "{b}"
        );
        // A full id is a prefix of itself.
        assert_eq!(
            store
                .deployment_ids_with_prefix(&twin_b.to_string(), 10)
                .await
                .unwrap(),
            [twin_b],
            "{b}"
        );
        // Unknown: nothing.
        assert!(
            store
                .deployment_ids_with_prefix("ffff0000", 10)
                .await
                .unwrap()
                .is_empty(),
            "{b}"
        );
        // A LIKE wildcard or anything but hex and hyphens is refused, never matched.
        for bad in ["%", "ab_d", "abcd'", ""] {
            let err = store
                .deployment_ids_with_prefix(bad, 10)
                .await
                .expect_err("not a prefix");
            assert!(
                matches!(err, StoreError::Invalid { .. }),
                "{b}: {bad:?}: {err}"
            );
        }
    }
}

#[tokio::test]
async fn every_target_rolling_back_is_listed_however_old() {
    for f in both().await {
        let b = f.backend;
        let store = f.open().await;
        // Older than any page of recent deployments: a restarted controller still takes
        // over its rollback from the agent.
        let old = deployment(&["orders", "billing"], None, None);
        store.create_deployment(&old).await.unwrap();
        store
            .append_target_event(
                &NewEvent {
                    deployment_id: old.id,
                    target: Some("orders".into()),
                    kind: "transition".into(),
                    message: "→ rolling_back".into(),
                    payload: json!({ "to": "rolling_back", "step": "rolling_back" }),
                },
                Some(DeploymentState::RollingBack),
            )
            .await
            .unwrap();
        for _ in 0..210 {
            store
                .create_deployment(&deployment(&["orders"], None, None))
                .await
                .unwrap();
        }
        let listed = store.rolling_back().await.unwrap();
        let got: Vec<_> = listed.iter().map(|d| d.id).collect();
        assert_eq!(got, vec![old.id], "{b}");
        assert_eq!(listed[0].targets.len(), 2, "{b}: with all its targets");
    }
}
