//! The Alertmanager webhook over a real store (a SQLite file, and a PostgreSQL database on
//! the throwaway cluster): the payload parser (property-tested), how an alert's labels
//! resolve to a deployment, and at-most-once rollback requests under repeated deliveries.

// Helpers outside #[test] functions unwrap too: a panic there is the failure report.
#![allow(clippy::unwrap_used)]

use belay_core::{ApiError, ErrorKind};
use belay_fleet::webhook::{AlertTrigger, RollbackTrigger, Unavailable, Webhook, parse_payload};
use belay_fleet::{Fleet, FleetConfig};
use belay_store::{DeploymentState, NewDeployment, RollbackRequestState, Store, TargetState};
use proptest::prelude::*;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

// ---------------------------------------------------------------- fixtures

struct Fixture {
    name: &'static str,
    spec: String,
    _dir: Option<tempfile::TempDir>,
}

async fn both() -> Vec<Fixture> {
    let dir = tempfile::tempdir().expect("temp dir");
    let sqlite = Fixture {
        name: "sqlite",
        spec: format!("sqlite://{}", dir.path().join("ctl.db").display()),
        _dir: Some(dir),
    };
    let db = belay_testkit::Cluster::shared()
        .create_database()
        .await
        .expect("test database");
    let pg = Fixture {
        name: "postgres",
        spec: db.url,
        _dir: None,
    };
    vec![sqlite, pg]
}

/// A trigger that counts its calls and fails the first `fail` of them with `kind`.
#[derive(Default)]
struct Counting {
    calls: Mutex<Vec<(Uuid, String, String)>>,
    fail: Mutex<Vec<ErrorKind>>,
}

impl Counting {
    fn failing(kinds: &[ErrorKind]) -> Arc<Counting> {
        Arc::new(Counting {
            calls: Mutex::default(),
            fail: Mutex::new(kinds.to_vec()),
        })
    }
    fn calls(&self) -> Vec<(Uuid, String, String)> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl RollbackTrigger for Counting {
    async fn rollback(
        &self,
        deployment: Uuid,
        target: &str,
        trigger: &AlertTrigger,
    ) -> Result<(), ApiError> {
        self.calls.lock().unwrap().push((
            deployment,
            target.to_string(),
            trigger.fingerprint.clone(),
        ));
        let mut fail = self.fail.lock().unwrap();
        if fail.is_empty() {
            Ok(())
        } else {
            let kind = fail.remove(0);
            Err(ApiError::new(kind, format!("simulated {kind:?}")))
        }
    }
}

async fn fleet(spec: &str) -> Fleet {
    let store = Store::open(spec).await.expect("store");
    Fleet::new(store, FleetConfig::default())
        .await
        .expect("fleet")
}

async fn deploy(fleet: &Fleet, id: Uuid, targets: &[&str]) -> Uuid {
    fleet
        .store()
        .create_deployment(&NewDeployment {
            id,
            to_version: Some("3".into()),
            targets: targets.iter().map(|t| (*t).to_string()).collect(),
            environment: None,
            params: json!({}),
            skip_promotion_reason: None,
            requested_by: Some("test".into()),
        })
        .await
        .expect("deployment");
    for t in targets {
        fleet
            .store()
            .set_target_state(id, t, TargetState::Running, "running")
            .await
            .expect("target state");
    }
    id
}

fn alert(name: &str, fingerprint: &str, labels: &[(&str, &str)]) -> Value {
    let mut l = serde_json::Map::new();
    l.insert("alertname".into(), json!(name));
    for (k, v) in labels {
        l.insert((*k).into(), json!(v));
    }
    json!({
        "status": "firing",
        "labels": l,
        "annotations": { "summary": format!("{name} fired") },
        "startsAt": "2026-12-02T05:00:00.123Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus:9090/graph",
        "fingerprint": fingerprint,
    })
}

fn payload(alerts: &[Value]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "receiver": "belay-controller",
        "status": "firing",
        "alerts": alerts,
        "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "version": "4",
        "groupKey": "{}:{alertname=\"x\"}",
        "truncatedAlerts": 0,
    }))
    .unwrap()
}

fn claims(body: &Value) -> Vec<String> {
    body["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{}:{}",
                r["target"].as_str().unwrap(),
                r["claim"].as_str().unwrap()
            )
        })
        .collect()
}

fn errors(body: &Value) -> String {
    body["errors"].to_string()
}

async fn requested_events(fleet: &Fleet, id: Uuid) -> Vec<String> {
    fleet
        .store()
        .events(id, 0)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "rollback_requested")
        .map(|e| e.message)
        .collect()
}

/// Moves a finished deployment's end `ago` into the past, as if it had ended then.
async fn ended_ago(spec: &str, id: Uuid, ago: chrono::Duration) {
    let at = chrono::Utc::now() - ago;
    if spec.starts_with("sqlite") {
        let path = spec.trim_start_matches("sqlite://");
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{path}"))
            .await
            .unwrap();
        let text = at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        sqlx::query("UPDATE deployments SET finished_at = $1, updated_at = $1 WHERE id = $2")
            .bind(text)
            .bind(id.to_string())
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(spec).await.unwrap();
        sqlx::query(
            "UPDATE belay_controller.deployments SET finished_at = $1, updated_at = $1 WHERE id = $2",
        )
        .bind(at)
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
}

// ---------------------------------------------------------------- the parser

/// Payloads from Alertmanager's grammar, then damaged: a field removed, retyped or set to
/// a generated value.
fn payloads() -> impl Strategy<Value = Value> {
    let scalar = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "[ -~]{0,12}".prop_map(Value::String),
        Just(json!("4")),
        Just(json!("firing")),
        Just(json!("resolved")),
        Just(json!("2026-12-02T05:00:00Z")),
    ];
    let value = scalar.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z_]{1,10}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    let labels = prop::collection::btree_map(
        prop_oneof![
            Just("alertname".to_string()),
            Just("belay_target".to_string()),
            Just("belay_deployment".to_string()),
            "[a-z_]{1,8}"
        ],
        "[ -~]{0,10}",
        0..4,
    );
    let alert = (
        prop_oneof![
            Just("firing".to_string()),
            Just("resolved".to_string()),
            "[a-z]{0,8}"
        ],
        labels,
        "[0-9a-f]{0,16}",
    )
        .prop_map(|(status, labels, fp)| {
            json!({ "status": status, "labels": labels, "annotations": {},
                    "startsAt": "2026-12-02T05:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
                    "fingerprint": fp })
        });
    let base = (
        prop::collection::vec(alert, 0..4),
        prop_oneof![Just("4".to_string()), "[0-9]{1,2}"],
    )
        .prop_map(|(alerts, version)| {
            json!({ "version": version, "groupKey": "{}:{}", "status": "firing",
                    "receiver": "belay", "alerts": alerts, "truncatedAlerts": 0 })
        });
    let keys = prop_oneof![
        Just("version"),
        Just("alerts"),
        Just("receiver"),
        Just("status"),
        Just("groupKey"),
        Just("truncatedAlerts"),
        Just("extra"),
    ];
    (
        base,
        prop::option::of((keys, prop::option::of(value))),
        any::<prop::sample::Index>(),
        prop::option::of(("[a-zA-Z]{1,10}", value_strategy_leaf())),
    )
        .prop_map(|(mut p, damage, idx, alert_damage)| {
            if let Some((key, v)) = damage {
                match v {
                    None => {
                        p.as_object_mut().unwrap().remove(key);
                    }
                    Some(v) => {
                        p[key] = v;
                    }
                }
            }
            if let (Some((field, v)), Some(alerts)) = (alert_damage, p["alerts"].as_array_mut())
                && !alerts.is_empty()
            {
                let i = idx.index(alerts.len());
                if let Some(a) = alerts[i].as_object_mut() {
                    a.insert(field, v);
                }
            }
            p
        })
}

fn value_strategy_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(|n| json!(n)),
        "[ -~]{0,12}".prop_map(Value::String),
        Just(json!({})),
        Just(json!([])),
    ]
}

/// The parts of a payload an error may name.
const NAMED: &[&str] = &[
    "not JSON",
    "not an object",
    "`version`",
    "`alerts`",
    "alerts[",
    "`receiver`",
    "`status`",
    "`groupKey`",
    "`truncatedAlerts`",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Never a panic; an error always says it is the payload and names what is wrong.
    #[test]
    fn generated_payloads_parse_or_name_what_is_wrong(p in payloads()) {
        let body = serde_json::to_vec(&p).unwrap();
        match parse_payload(&body) {
            Ok(parsed) => {
                prop_assert_eq!(p["version"].as_str(), Some("4"));
                prop_assert_eq!(parsed.alerts.len(), p["alerts"].as_array().map_or(0, Vec::len));
            }
            Err(e) => {
                let m = e.to_string();
                prop_assert!(m.starts_with("invalid Alertmanager webhook payload: "), "{}", m);
                prop_assert!(NAMED.iter().any(|n| m.contains(n)), "{} names nothing in {}", m, p);
            }
        }
    }

    /// Arbitrary bytes: never a panic, never accepted unless they are a version-4 payload.
    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Err(e) = parse_payload(&body) {
            let m = e.to_string();
            prop_assert!(NAMED.iter().any(|n| m.contains(n)), "{}", m);
        }
    }
}

// ---------------------------------------------------------------- handling

#[tokio::test]
async fn malformed_payloads_are_400_and_record_nothing() {
    for f in both().await {
        let fleet = fleet(&f.spec).await;
        let id = deploy(&fleet, Uuid::new_v4(), &["orders"]).await;
        let trigger = Arc::new(Counting::default());
        let hook = Webhook::new(fleet.clone(), trigger.clone(), Duration::from_secs(3600));
        let good = alert(
            "BelayProbeUnhealthy",
            "aa",
            &[("belay_deployment", &id.to_string())],
        );
        let mut bad_version =
            serde_json::from_slice::<Value>(&payload(std::slice::from_ref(&good))).unwrap();
        bad_version["version"] = json!("3");
        let mut bad_alert =
            serde_json::from_slice::<Value>(&payload(std::slice::from_ref(&good))).unwrap();
        // A valid alert first, then a broken one: the whole payload is refused.
        bad_alert["alerts"] = json!([good, { "status": "firing", "labels": [] }]);
        for body in [
            b"{".to_vec(),
            serde_json::to_vec(&bad_version).unwrap(),
            serde_json::to_vec(&bad_alert).unwrap(),
            br#"{"version":"4"}"#.to_vec(),
        ] {
            let r = hook.handle(&body).await;
            assert_eq!(r.status, 400, "{}: {}", f.name, r.body);
            assert!(
                r.body["error"]
                    .as_str()
                    .unwrap()
                    .contains("invalid Alertmanager webhook payload"),
                "{}",
                r.body
            );
        }
        assert!(trigger.calls().is_empty(), "{}", f.name);
        assert!(
            fleet
                .store()
                .rollback_requests(id)
                .await
                .unwrap()
                .is_empty(),
            "{}",
            f.name
        );
        assert!(requested_events(&fleet, id).await.is_empty(), "{}", f.name);
    }
}

#[tokio::test]
async fn same_alert_three_times_and_two_other_alerts_roll_back_once() {
    for f in both().await {
        let fleet = fleet(&f.spec).await;
        let id = deploy(&fleet, Uuid::new_v4(), &["orders"]).await;
        let other = deploy(&fleet, Uuid::new_v4(), &["billing"]).await;
        let trigger = Arc::new(Counting::default());
        let hook = Webhook::new(fleet.clone(), trigger.clone(), Duration::from_secs(3600));
        let same = payload(&[alert(
            "BelayProbeUnhealthy",
            "f1",
            &[("belay_deployment", &id.to_string())],
        )]);
        let mut statuses = Vec::new();
        let mut all_claims = Vec::new();
        for _ in 0..3 {
            let r = hook.handle(&same).await;
            statuses.push(r.status);
            all_claims.extend(claims(&r.body));
        }
        // Two different alerts for the same deployment: one by id prefix, one by target.
        let prefix = &id.to_string()[..8];
        let r = hook
            .handle(&payload(&[
                alert(
                    "BelayMigrationFailed",
                    "f2",
                    &[("belay_deployment", prefix)],
                ),
                alert("BelayLongLockWait", "f3", &[("belay_target", "orders")]),
            ]))
            .await;
        statuses.push(r.status);
        all_claims.extend(claims(&r.body));
        assert_eq!(statuses, [200, 200, 200, 200], "{}", f.name);
        assert_eq!(
            all_claims,
            [
                "orders:first",
                "orders:duplicate",
                "orders:duplicate",
                "orders:duplicate",
                "orders:duplicate"
            ],
            "{}",
            f.name
        );
        assert_eq!(
            trigger.calls(),
            [(id, "orders".to_string(), "f1".to_string())],
            "{}",
            f.name
        );
        let reqs = fleet.store().rollback_requests(id).await.unwrap();
        assert_eq!(reqs.len(), 1, "{}", f.name);
        assert_eq!(reqs[0].state, RollbackRequestState::Started, "{}", f.name);
        assert_eq!((reqs[0].deliveries, reqs[0].attempts), (5, 1), "{}", f.name);
        assert_eq!(reqs[0].alert.alertname, "BelayProbeUnhealthy");
        assert_eq!(
            reqs[0].alert.annotations["summary"],
            "BelayProbeUnhealthy fired"
        );
        let deliveries = fleet
            .store()
            .rollback_deliveries(id, "orders")
            .await
            .unwrap();
        let who: Vec<(String, String)> = deliveries
            .iter()
            .map(|d| (d.fingerprint.clone(), d.outcome.clone()))
            .collect();
        assert_eq!(
            who,
            [
                ("f1", "first"),
                ("f1", "duplicate"),
                ("f1", "duplicate"),
                ("f2", "duplicate"),
                ("f3", "duplicate")
            ]
            .map(|(a, b)| (a.to_string(), b.to_string())),
            "{}",
            f.name
        );
        assert_eq!(
            requested_events(&fleet, id).await,
            ["rollback requested by alert BelayProbeUnhealthy (f1)"],
            "{}",
            f.name
        );
        assert!(
            fleet
                .store()
                .rollback_requests(other)
                .await
                .unwrap()
                .is_empty()
        );
    }
}

#[tokio::test]
async fn concurrent_deliveries_still_roll_back_once() {
    for f in both().await {
        let fleet = fleet(&f.spec).await;
        let id = deploy(&fleet, Uuid::new_v4(), &["orders", "billing"]).await;
        let trigger = Arc::new(Counting::default());
        let hook = Webhook::new(fleet.clone(), trigger.clone(), Duration::from_secs(3600));
        let body = payload(&[alert(
            "BelayProbeUnhealthy",
            "f1",
            &[("belay_deployment", &id.to_string())],
        )]);
        let replies = futures::future::join_all((0..6).map(|_| hook.handle(&body))).await;
        assert!(
            replies.iter().all(|r| r.status == 200),
            "{}: {replies:?}",
            f.name
        );
        let mut calls: Vec<String> = trigger.calls().into_iter().map(|c| c.1).collect();
        calls.sort();
        // The deployment's two targets, each once.
        assert_eq!(calls, ["billing", "orders"], "{}", f.name);
        let reqs = fleet.store().rollback_requests(id).await.unwrap();
        assert_eq!(
            reqs.iter().map(|r| r.deliveries).collect::<Vec<_>>(),
            [6, 6],
            "{}",
            f.name
        );
    }
}

#[tokio::test]
async fn a_transient_failure_is_503_and_the_next_delivery_triggers_again_once() {
    for f in both().await {
        let fleet = fleet(&f.spec).await;
        let id = deploy(&fleet, Uuid::new_v4(), &["orders"]).await;
        let trigger = Counting::failing(&[ErrorKind::AgentUnreachable]);
        let hook = Webhook::new(fleet.clone(), trigger.clone(), Duration::from_secs(3600));
        let body = payload(&[alert(
            "BelayProbeUnhealthy",
            "f1",
            &[("belay_target", "orders")],
        )]);
        let r = hook.handle(&body).await;
        assert_eq!(r.status, 503, "{}: {}", f.name, r.body);
        assert!(
            errors(&r.body).contains("simulated AgentUnreachable"),
            "{}",
            r.body
        );
        let req = &fleet.store().rollback_requests(id).await.unwrap()[0];
        assert_eq!(req.state, RollbackRequestState::Failed, "{}", f.name);
        assert_eq!(req.message, "simulated AgentUnreachable");

        let r = hook.handle(&body).await;
        assert_eq!(r.status, 200, "{}: {}", f.name, r.body);
        assert_eq!(claims(&r.body), ["orders:retry"], "{}", f.name);
        let r = hook.handle(&body).await;
        assert_eq!(claims(&r.body), ["orders:duplicate"], "{}", f.name);
        assert_eq!(trigger.calls().len(), 2, "{}", f.name);
        let req = &fleet.store().rollback_requests(id).await.unwrap()[0];
        assert_eq!(
            (req.state, req.attempts, req.deliveries),
            (RollbackRequestState::Started, 2, 3),
            "{}",
            f.name
        );
        assert_eq!(
            requested_events(&fleet, id).await,
            [
                "rollback requested by alert BelayProbeUnhealthy (f1)",
                "rollback requested again by alert BelayProbeUnhealthy (f1)"
            ],
            "{}",
            f.name
        );
    }
}

#[tokio::test]
async fn a_refusal_is_422_and_not_retried() {
    for f in both().await {
        let fleet = fleet(&f.spec).await;
        let id = deploy(&fleet, Uuid::new_v4(), &["orders"]).await;
        let trigger = Counting::failing(&[ErrorKind::Refused]);
        let hook = Webhook::new(fleet.clone(), trigger.clone(), Duration::from_secs(3600));
        let body = payload(&[alert(
            "BelayProbeUnhealthy",
            "f1",
            &[("belay_deployment", &id.to_string())],
        )]);
        let r = hook.handle(&body).await;
        assert_eq!(r.status, 422, "{}: {}", f.name, r.body);
        let r = hook.handle(&body).await;
        assert_eq!(r.status, 200, "{}: {}", f.name, r.body);
        assert_eq!(claims(&r.body), ["orders:duplicate"]);
        assert_eq!(trigger.calls().len(), 1, "{}", f.name);
        assert_eq!(
            fleet.store().rollback_requests(id).await.unwrap()[0].state,
            RollbackRequestState::Refused
        );
    }
}

#[tokio::test]
async fn without_a_rollback_service_requests_are_recorded_unavailable() {
    for f in both().await {
        let fleet = fleet(&f.spec).await;
        let id = deploy(&fleet, Uuid::new_v4(), &["orders"]).await;
        let hook = Webhook::new(
            fleet.clone(),
            Arc::new(Unavailable::no_rollback_service()),
            Duration::from_secs(3600),
        );
        let body = payload(&[alert(
            "BelayProbeUnhealthy",
            "f1",
            &[("belay_target", "orders")],
        )]);
        for _ in 0..3 {
            assert_eq!(hook.handle(&body).await.status, 200, "{}", f.name);
        }
        let reqs = fleet.store().rollback_requests(id).await.unwrap();
        assert_eq!(reqs.len(), 1);
        assert_eq!(
            reqs[0].state,
            RollbackRequestState::Unavailable,
            "{}",
            f.name
        );
        assert!(
            reqs[0].message.contains("no RollbackService"),
            "{}",
            reqs[0].message
        );
        assert_eq!(reqs[0].deliveries, 3);
        let events: Vec<String> = fleet
            .store()
            .events(id, 0)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.message)
            .collect();
        assert!(
            events.iter().any(|m| m.starts_with(
                "rollback request unavailable: this controller cannot execute rollbacks"
            )),
            "{events:?}"
        );
    }
}

#[tokio::test]
async fn labels_resolve_by_id_prefix_and_target_within_the_grace_period() {
    for f in both().await {
        let fleet = fleet(&f.spec).await;
        let a = deploy(
            &fleet,
            Uuid::parse_str("abcd0000-0000-4000-8000-000000000001").unwrap(),
            &["orders", "billing", "ledger"],
        )
        .await;
        let b = deploy(
            &fleet,
            Uuid::parse_str("abcd1111-0000-4000-8000-000000000002").unwrap(),
            &["search"],
        )
        .await;
        // `ledger` never ran in `a`: not rolled back.
        fleet
            .store()
            .set_target_state(a, "ledger", TargetState::Skipped, "halted")
            .await
            .unwrap();
        let trigger = Arc::new(Counting::default());
        let hook = Webhook::new(fleet.clone(), trigger.clone(), Duration::from_secs(3600));
        let one = |labels: &[(&str, &str)]| payload(&[alert("A", "fp", labels)]);

        let r = hook.handle(&one(&[("belay_deployment", "abcd")])).await;
        assert_eq!(r.status, 422, "{}", f.name);
        assert!(
            errors(&r.body).contains("ambiguous")
                && errors(&r.body).contains(&a.to_string())
                && errors(&r.body).contains(&b.to_string()),
            "{}",
            r.body
        );
        let r = hook.handle(&one(&[("belay_deployment", "ffff")])).await;
        assert_eq!(r.status, 422);
        assert!(
            errors(&r.body).contains("matches no deployment"),
            "{}",
            r.body
        );
        let r = hook.handle(&one(&[("belay_deployment", "not-hex!")])).await;
        assert_eq!(r.status, 422);
        assert!(
            errors(&r.body).contains("not the start of a deployment id"),
            "{}",
            r.body
        );
        let r = hook.handle(&one(&[("belay_target", "nowhere")])).await;
        assert_eq!(r.status, 422);
        assert!(
            errors(&r.body).contains("no deployment in the controller store includes"),
            "{}",
            r.body
        );
        let r = hook
            .handle(&one(&[
                ("belay_deployment", "abcd0"),
                ("belay_target", "search"),
            ]))
            .await;
        assert_eq!(r.status, 422);
        assert!(
            errors(&r.body).contains("has no target \\\"search\\\""),
            "{}",
            r.body
        );
        let r = hook
            .handle(&one(&[
                ("belay_deployment", "abcd0"),
                ("belay_target", "ledger"),
            ]))
            .await;
        assert_eq!(r.status, 422);
        assert!(errors(&r.body).contains("never ran on"), "{}", r.body);
        assert!(trigger.calls().is_empty(), "{}", f.name);

        // A unique prefix: every target that ran.
        let r = hook.handle(&one(&[("belay_deployment", "ABCD0")])).await;
        assert_eq!(r.status, 200, "{}: {}", f.name, r.body);
        assert_eq!(
            claims(&r.body),
            ["orders:first", "billing:first"],
            "{}",
            f.name
        );

        // By target: `search`'s latest deployment, finished a minute ago (within 1 h)...
        fleet
            .store()
            .transition(b, DeploymentState::Succeeded, "done")
            .await
            .unwrap();
        ended_ago(&f.spec, b, chrono::Duration::minutes(1)).await;
        let r = hook.handle(&one(&[("belay_target", "search")])).await;
        assert_eq!(r.status, 200, "{}: {}", f.name, r.body);
        assert_eq!(claims(&r.body), ["search:first"]);
        // ...but not two hours ago.
        let c = deploy(&fleet, Uuid::new_v4(), &["search"]).await;
        fleet
            .store()
            .transition(c, DeploymentState::Failed, "probe failed")
            .await
            .unwrap();
        ended_ago(&f.spec, c, chrono::Duration::hours(2)).await;
        let r = hook.handle(&one(&[("belay_target", "search")])).await;
        assert_eq!(r.status, 422, "{}: {}", f.name, r.body);
        assert!(
            errors(&r.body).contains("more than the alert grace period (1h) ago"),
            "{}",
            r.body
        );
        // Named by id, it is rolled back whenever it ended.
        let r = hook
            .handle(&one(&[("belay_deployment", &c.to_string())]))
            .await;
        assert_eq!(r.status, 200, "{}: {}", f.name, r.body);

        let mut calls: Vec<(Uuid, String)> =
            trigger.calls().into_iter().map(|c| (c.0, c.1)).collect();
        calls.sort();
        let mut want = vec![
            (a, "billing".to_string()),
            (a, "orders".to_string()),
            (b, "search".to_string()),
            (c, "search".to_string()),
        ];
        want.sort();
        assert_eq!(calls, want, "{}", f.name);
    }
}

#[tokio::test]
async fn resolved_and_unlabelled_alerts_are_ignored_and_counted() {
    for f in both().await {
        let fleet = fleet(&f.spec).await;
        let id = deploy(&fleet, Uuid::new_v4(), &["orders"]).await;
        let trigger = Arc::new(Counting::default());
        let hook = Webhook::new(fleet.clone(), trigger.clone(), Duration::from_secs(3600));
        let mut resolved = alert(
            "BelayProbeUnhealthy",
            "f1",
            &[("belay_deployment", &id.to_string())],
        );
        resolved["status"] = json!("resolved");
        let r = hook
            .handle(&payload(&[
                resolved,
                alert("Other", "f2", &[("target", "orders")]),
            ]))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.body["ignored"],
            json!({ "resolved": 1, "without_belay_labels": 1 })
        );
        assert!(trigger.calls().is_empty());
        assert!(
            fleet
                .store()
                .rollback_requests(id)
                .await
                .unwrap()
                .is_empty(),
            "{}",
            f.name
        );
    }
}

#[tokio::test]
async fn a_configured_token_is_required() {
    let fixtures = both().await;
    let f = &fixtures[0];
    let fleet = fleet(&f.spec).await;
    let id = deploy(&fleet, Uuid::new_v4(), &["orders"]).await;
    let trigger = Arc::new(Counting::default());
    let hook =
        Webhook::new(fleet.clone(), trigger.clone(), Duration::from_secs(3600)).with_token(Some(
            belay_auth::TokenCheck::new(belay_auth::Secret::new("s3cret")),
        ));
    let body = payload(&[alert("A", "f1", &[("belay_deployment", &id.to_string())])]);
    for auth in [None, Some(&b"Bearer wrong"[..])] {
        let r = hook.handle_authorized(auth, &body).await;
        assert_eq!(r.status, 401, "{}", r.body);
        assert!(!r.body.to_string().contains("s3cret"));
    }
    assert!(trigger.calls().is_empty());
    let r = hook.handle_authorized(Some(b"Bearer s3cret"), &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(trigger.calls().len(), 1);
}

#[tokio::test]
async fn a_request_interrupted_by_a_controller_restart_is_retried_by_the_next_delivery() {
    for f in both().await {
        let first = fleet(&f.spec).await;
        let id = deploy(&first, Uuid::new_v4(), &["orders"]).await;
        // The claim is recorded, then the process dies before the trigger's answer.
        let evidence = belay_store::AlertEvidence {
            alertname: "BelayProbeUnhealthy".into(),
            fingerprint: "f1".into(),
            labels: json!({}),
            annotations: json!({}),
            starts_at: None,
        };
        let claim = first
            .store()
            .claim_rollback(id, "orders", &evidence)
            .await
            .unwrap();
        assert!(
            matches!(claim, belay_store::RollbackClaim::First(_)),
            "{}",
            f.name
        );
        drop(first);

        let restarted = fleet(&f.spec).await;
        let req = &restarted.store().rollback_requests(id).await.unwrap()[0];
        assert_eq!(req.state, RollbackRequestState::Failed, "{}", f.name);
        assert!(
            req.message.contains("controller stopped"),
            "{}",
            req.message
        );
        let trigger = Arc::new(Counting::default());
        let hook = Webhook::new(
            restarted.clone(),
            trigger.clone(),
            Duration::from_secs(3600),
        );
        let body = payload(&[alert(
            "BelayProbeUnhealthy",
            "f1",
            &[("belay_target", "orders")],
        )]);
        let r = hook.handle(&body).await;
        assert_eq!(claims(&r.body), ["orders:retry"], "{}: {}", f.name, r.body);
        assert_eq!(trigger.calls().len(), 1, "{}", f.name);
    }
}
