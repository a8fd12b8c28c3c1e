//! The controller's Alertmanager webhook (`POST /webhooks/alertmanager`): an alert whose
//! labels name a deployment (`belay_deployment`: an id or a unique prefix) or a target
//! (`belay_target`: that target's newest deployment, while it runs or for `grace` after it
//! ended) requests a rollback of that deployment's target(s), at most once per
//! (deployment, target) however often Alertmanager delivers it (see
//! `belay_store::Store::claim_rollback`).
//!
//! The rollback itself goes through the [`RollbackTrigger`] seam; the controller wires
//! it to whatever executes rollbacks: [`RoutedRollback`] on the controller (the routed
//! `RollbackService`), [`Unavailable`] where none can run.
//!
//! Status codes, as Alertmanager reads them (it retries 5xx, and gives up on 4xx):
//! - 200: every alert handled (requested, already requested, or ignored);
//! - 400: the payload cannot be read (not JSON, not version "4", no `alerts`, a field of
//!   the wrong type); nothing is recorded;
//! - 401: a token is configured and the request does not carry it;
//! - 422: an alert names something that can never be rolled back (an id matching no
//!   deployment, an ambiguous prefix, a target with no recent deployment, a refusal);
//! - 503: a transient fault (store unavailable, agent unreachable): a redelivery retries.
//!
//! Each alert is handled on its own; the status is the worst of them (503 over 422 over
//! 200), and the body lists each alert's result.

use crate::Fleet;
use belay_core::{ApiError, ErrorKind};
use belay_store::{
    AlertEvidence, DeploymentRecord, NewEvent, RollbackClaim, RollbackRequestState, StoreError,
    TargetState,
};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{Instrument, info, warn};
use uuid::Uuid;

/// Where the webhook is served.
pub const ALERTMANAGER_PATH: &str = "/webhooks/alertmanager";
/// The label naming a deployment (an id or a unique prefix of one).
pub const DEPLOYMENT_LABEL: &str = "belay_deployment";
/// The label naming a target.
pub const TARGET_LABEL: &str = "belay_target";
/// How long after a target's deployment ended an alert naming only the target still
/// rolls it back, unless configured (`--alert-grace`).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);

// ---------------------------------------------------------------- the payload

/// Alertmanager's webhook payload, version 4. Fields belay does not use are tolerated
/// (Alertmanager adds some over time) and not kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Payload {
    pub receiver: String,
    /// The group's status, `firing` or `resolved`.
    pub status: String,
    pub group_key: String,
    /// Alerts Alertmanager left out (`max_alerts`).
    pub truncated_alerts: u64,
    pub alerts: Vec<Alert>,
}

/// One alert of a payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub status: AlertStatus,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub starts_at: Option<DateTime<Utc>>,
    pub ends_at: Option<DateTime<Utc>>,
    pub fingerprint: String,
}

impl Alert {
    pub fn alertname(&self) -> &str {
        self.labels
            .get("alertname")
            .map_or("(no alertname)", String::as_str)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertStatus {
    Firing,
    Resolved,
}

/// Why a payload cannot be read; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Alertmanager webhook payload: {0}")]
pub struct PayloadError(pub String);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawAlert {
    status: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    starts_at: Option<String>,
    #[serde(default)]
    ends_at: Option<String>,
    #[serde(default)]
    fingerprint: String,
}

/// Reads a webhook body. Strict where belay acts on a field (version, alerts, each
/// alert's status, labels and times), tolerant of fields it does not use.
pub fn parse_payload(body: &[u8]) -> Result<Payload, PayloadError> {
    let err = |m: String| PayloadError(m);
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| err(format!("the body is not JSON: {e}")))?;
    let obj = value.as_object().ok_or_else(|| {
        err(format!(
            "the body is JSON but {}, not an object",
            kind(&value)
        ))
    })?;
    let text = |key: &str| -> Result<String, PayloadError> {
        match obj.get(key) {
            None | Some(serde_json::Value::Null) => Ok(String::new()),
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(err(format!("`{key}` is {}, not a string", kind(other)))),
        }
    };
    match obj.get("version") {
        None => {
            return Err(err(
                "no `version`: expected Alertmanager's webhook payload version \"4\"".into(),
            ));
        }
        Some(serde_json::Value::String(v)) if v == "4" => {}
        Some(other) => {
            return Err(err(format!(
                "`version` is {other}; belay reads Alertmanager's webhook payload version \"4\""
            )));
        }
    }
    let alerts = match obj.get("alerts") {
        None => return Err(err("no `alerts` array".into())),
        Some(serde_json::Value::Array(a)) => a,
        Some(other) => return Err(err(format!("`alerts` is {}, not an array", kind(other)))),
    };
    let truncated_alerts = match obj.get("truncatedAlerts") {
        None | Some(serde_json::Value::Null) => 0,
        Some(v) => v.as_u64().ok_or_else(|| {
            err(format!(
                "`truncatedAlerts` is {v}, not a non-negative integer"
            ))
        })?,
    };
    let mut out = Vec::with_capacity(alerts.len());
    for (i, a) in alerts.iter().enumerate() {
        let raw: RawAlert =
            serde_json::from_value(a.clone()).map_err(|e| err(format!("alerts[{i}]: {e}")))?;
        let status = match raw.status.as_str() {
            "firing" => AlertStatus::Firing,
            "resolved" => AlertStatus::Resolved,
            other => {
                return Err(err(format!(
                    "alerts[{i}].status is {other:?}; expected \"firing\" or \"resolved\""
                )));
            }
        };
        let time = |field: &str, v: Option<String>| -> Result<_, PayloadError> {
            v.filter(|s| !s.is_empty())
                .map(|s| {
                    DateTime::parse_from_rfc3339(&s)
                        .map(|t| t.with_timezone(&Utc))
                        .map_err(|e| {
                            err(format!(
                                "alerts[{i}].{field} is {s:?}, not an RFC 3339 time: {e}"
                            ))
                        })
                })
                .transpose()
        };
        out.push(Alert {
            status,
            starts_at: time("startsAt", raw.starts_at)?,
            ends_at: time("endsAt", raw.ends_at)?,
            labels: raw.labels,
            annotations: raw.annotations,
            fingerprint: raw.fingerprint,
        });
    }
    Ok(Payload {
        receiver: text("receiver")?,
        status: text("status")?,
        group_key: text("groupKey")?,
        truncated_alerts,
        alerts: out,
    })
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

// ---------------------------------------------------------------- the seam

/// The alert that asked for a rollback: the rollback's evidence.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertTrigger {
    pub alertname: String,
    pub fingerprint: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub starts_at: Option<DateTime<Utc>>,
}

/// What executes a rollback the webhook asked for. The webhook has recorded the request
/// (at most once per deployment and target) before calling it.
///
/// Errors: kinds `Unavailable`, `AgentUnreachable`, `Busy` and `Internal` are transient
/// (the request becomes `failed`, the webhook answers 503, and the next delivery calls
/// again); any other kind is a refusal for good (`refused`, 422).
#[async_trait::async_trait]
pub trait RollbackTrigger: Send + Sync {
    /// Why this controller cannot execute rollbacks at all, if it cannot: requests are
    /// then recorded as `unavailable` with this reason, and `rollback` is not called.
    fn unavailable(&self) -> Option<String> {
        None
    }

    /// Starts the rollback of `target` in `deployment`; returns once it has started (or
    /// was already running).
    async fn rollback(
        &self,
        deployment: Uuid,
        target: &str,
        trigger: &AlertTrigger,
    ) -> Result<(), ApiError>;
}

/// A controller that cannot execute rollbacks (no `RollbackService` is wired): every
/// request is recorded as `unavailable` with this reason.
#[derive(Debug, Clone)]
pub struct Unavailable(pub String);

impl Unavailable {
    /// The reason while the controller has no routed `RollbackService`.
    pub fn no_rollback_service() -> Self {
        Unavailable(
            "this controller cannot execute rollbacks yet (no RollbackService is wired); the request is recorded: roll the target back by hand (`belay rollback execute <deployment>`)"
                .into(),
        )
    }
}

#[async_trait::async_trait]
impl RollbackTrigger for Unavailable {
    fn unavailable(&self) -> Option<String> {
        Some(self.0.clone())
    }

    async fn rollback(&self, _: Uuid, _: &str, _: &AlertTrigger) -> Result<(), ApiError> {
        Err(ApiError::new(ErrorKind::Refused, self.0.clone()))
    }
}

/// The trigger a controller with a routed `RollbackService` uses: the rollback of the
/// deployment's target runs on the agent owning it (`RollbackApi` over [`Fleet`]), with
/// the alert as its trigger and evidence. It returns once the agent has accepted the
/// rollback (its first event) and lets it run on in the background, so Alertmanager's
/// call is answered in time; a rollback the agent refuses (already rolled back, or being
/// rolled back by the deployment's own `--on-failure rollback`) comes back as its error.
#[derive(Debug, Clone)]
pub struct RoutedRollback {
    pub fleet: Fleet,
}

impl AlertTrigger {
    /// The alert as the rollback's evidence.
    pub fn evidence(&self) -> serde_json::Value {
        serde_json::json!({
            "alertname": self.alertname,
            "fingerprint": self.fingerprint,
            "labels": self.labels,
            "annotations": self.annotations,
            "starts_at": self.starts_at,
        })
    }
}

#[async_trait::async_trait]
impl RollbackTrigger for RoutedRollback {
    async fn rollback(
        &self,
        deployment: Uuid,
        target: &str,
        alert: &AlertTrigger,
    ) -> Result<(), ApiError> {
        let trigger = belay_rollback::Trigger::alert(
            format!(
                "alert {} ({}) fired for this deployment",
                alert.alertname, alert.fingerprint
            ),
            alert.evidence(),
        );
        let (started_tx, mut started_rx) = tokio::sync::oneshot::channel::<()>();
        let started = Arc::new(std::sync::Mutex::new(Some(started_tx)));
        let sink: belay_deploy::DeploySink = Arc::new(move |_: &belay_deploy::DeployEvent| {
            if let Ok(mut s) = started.lock()
                && let Some(tx) = s.take()
            {
                let _ = tx.send(());
            }
        });
        let fleet = self.fleet.clone();
        let target = target.to_string();
        let what = belay_rollback::Execute::To(belay_rollback::RollbackTo::Deployment(
            deployment.to_string(),
        ));
        let span = tracing::info_span!("alert_rollback", %deployment, target = %target);
        let mut run = tokio::spawn(
            async move {
                let result =
                    belay_rollback::RollbackApi::execute(&fleet, &target, what, trigger, sink)
                        .await;
                match &result {
                    Ok(o) => {
                        tracing::info!(state = %o.state, "rollback asked by an alert ended")
                    }
                    Err(e) => tracing::warn!(error = %e, "rollback asked by an alert did not run"),
                }
                result.map(|_| ())
            }
            .instrument(span),
        );
        tokio::select! {
            biased;
            // The agent recorded the rollback's first step: it runs on, and its end is in
            // the deployment's log.
            started = &mut started_rx => match started {
                Ok(()) => Ok(()),
                Err(_) => join(run.await),
            },
            // Over before its first event: refused, or the agent unreachable.
            ended = &mut run => join(ended),
        }
    }
}

fn join(r: Result<Result<(), ApiError>, tokio::task::JoinError>) -> Result<(), ApiError> {
    r.unwrap_or_else(|e| {
        Err(ApiError::new(
            ErrorKind::Internal,
            format!("the rollback's task ended abnormally: {e}"),
        ))
    })
}

fn transient(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Unavailable
            | ErrorKind::AgentUnreachable
            | ErrorKind::Busy
            | ErrorKind::Internal
    )
}

// ---------------------------------------------------------------- handling

/// The webhook: the fleet (its store), the trigger, the grace period, and the token
/// callers must present (when the controller has one).
#[derive(Clone)]
pub struct Webhook {
    fleet: Fleet,
    trigger: Arc<dyn RollbackTrigger>,
    grace: Duration,
    token: Option<belay_auth::TokenCheck>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

/// The webhook's answer: an HTTP status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: serde_json::Value,
}

/// How one alert went, for the reply.
enum Fault {
    /// Can never succeed (422).
    Permanent(String),
    /// May succeed when delivered again (503).
    Transient(String),
}

fn store_fault(e: StoreError) -> Fault {
    match e {
        StoreError::NoSuchDeployment(_)
        | StoreError::NoSuchTarget { .. }
        | StoreError::Invalid { .. } => Fault::Permanent(e.to_string()),
        other => Fault::Transient(other.to_string()),
    }
}

impl Webhook {
    pub fn new(fleet: Fleet, trigger: Arc<dyn RollbackTrigger>, grace: Duration) -> Webhook {
        Webhook {
            fleet,
            trigger,
            grace,
            token: None,
        }
    }

    /// Requires `Authorization: Bearer <token>` on every call.
    pub fn with_token(mut self, token: Option<belay_auth::TokenCheck>) -> Webhook {
        self.token = token;
        self
    }

    /// `POST /webhooks/alertmanager` as a router, to merge into the daemon's HTTP listener.
    pub fn router(self) -> axum::Router {
        use axum::body::Bytes;
        use axum::http::{HeaderMap, StatusCode, header};
        use axum::response::IntoResponse;
        let hook = Arc::new(self);
        axum::Router::new().route(
            ALERTMANAGER_PATH,
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let hook = hook.clone();
                async move {
                    let auth = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
                    let reply = hook.handle_authorized(auth, &body).await;
                    let status = StatusCode::from_u16(reply.status)
                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    (
                        status,
                        [(header::CONTENT_TYPE, "application/json")],
                        format!("{}\n", reply.body),
                    )
                        .into_response()
                }
            }),
        )
    }

    /// [`Webhook::handle`] after the token check (`authorization`: the header's value).
    pub async fn handle_authorized(&self, authorization: Option<&[u8]>, body: &[u8]) -> Reply {
        if let Some(check) = &self.token
            && let Err(message) = check.check_http(authorization)
        {
            return Reply {
                status: 401,
                body: serde_json::json!({ "status": "unauthenticated", "error": message }),
            };
        }
        self.handle(body).await
    }

    /// Handles one delivery: parses it (400 and nothing recorded when it cannot be read),
    /// then each firing alert with belay labels in turn.
    #[tracing::instrument(name = "alert_webhook", skip_all, fields(alerts = tracing::field::Empty))]
    pub async fn handle(&self, body: &[u8]) -> Reply {
        let payload = match parse_payload(body) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "refused an Alertmanager webhook payload");
                return Reply {
                    status: 400,
                    body: serde_json::json!({ "status": "bad_request", "error": e.to_string() }),
                };
            }
        };
        tracing::Span::current().record("alerts", payload.alerts.len());
        if payload.truncated_alerts > 0 {
            warn!(
                truncated = payload.truncated_alerts,
                group = %payload.group_key,
                "Alertmanager left alerts out of this notification (max_alerts); they arrive with the next one"
            );
        }
        let (mut resolved, mut unlabelled) = (0u64, 0u64);
        let mut requests = Vec::new();
        let mut errors = Vec::new();
        let (mut any_transient, mut any_permanent) = (false, false);
        for alert in &payload.alerts {
            if alert.status == AlertStatus::Resolved {
                resolved += 1;
                continue;
            }
            let deployment = alert.labels.get(DEPLOYMENT_LABEL).map(|s| s.trim());
            let target = alert.labels.get(TARGET_LABEL).map(|s| s.trim());
            if deployment.is_none_or(str::is_empty) && target.is_none_or(str::is_empty) {
                unlabelled += 1;
                continue;
            }
            match self.one(alert, deployment, target).await {
                Ok(mut done) => requests.append(&mut done),
                Err((fault, mut done)) => {
                    requests.append(&mut done);
                    let (transient, message) = match fault {
                        Fault::Transient(m) => (true, m),
                        Fault::Permanent(m) => (false, m),
                    };
                    any_transient |= transient;
                    any_permanent |= !transient;
                    warn!(alert = alert.alertname(), fingerprint = %alert.fingerprint, transient, error = %message, "alert not acted on");
                    errors.push(serde_json::json!({
                        "alert": alert.alertname(),
                        "fingerprint": alert.fingerprint,
                        "transient": transient,
                        "error": message,
                    }));
                }
            }
        }
        let (status, word) = if any_transient {
            (503, "retry")
        } else if any_permanent {
            (422, "unprocessable")
        } else {
            (200, "ok")
        };
        Reply {
            status,
            body: serde_json::json!({
                "status": word,
                "requests": requests,
                "ignored": { "resolved": resolved, "without_belay_labels": unlabelled },
                "errors": errors,
            }),
        }
    }

    /// One firing alert: resolve, claim each target, trigger the first claims. On a fault,
    /// also returns what was done before it.
    async fn one(
        &self,
        alert: &Alert,
        deployment: Option<&str>,
        target: Option<&str>,
    ) -> Result<Vec<serde_json::Value>, (Fault, Vec<serde_json::Value>)> {
        let mut done = Vec::new();
        let (id, targets) = self
            .resolve(
                deployment.filter(|s| !s.is_empty()),
                target.filter(|s| !s.is_empty()),
            )
            .await
            .map_err(|f| (f, Vec::new()))?;
        let evidence = AlertEvidence {
            alertname: alert.alertname().to_string(),
            fingerprint: alert.fingerprint.clone(),
            labels: serde_json::to_value(&alert.labels).unwrap_or_default(),
            annotations: serde_json::to_value(&alert.annotations).unwrap_or_default(),
            starts_at: alert.starts_at,
        };
        let trigger = AlertTrigger {
            alertname: evidence.alertname.clone(),
            fingerprint: alert.fingerprint.clone(),
            labels: alert.labels.clone(),
            annotations: alert.annotations.clone(),
            starts_at: alert.starts_at,
        };
        let mut fault = None;
        for t in targets {
            let claim = match self.fleet.store().claim_rollback(id, &t, &evidence).await {
                Ok(c) => c,
                Err(e) => {
                    fault.get_or_insert(store_fault(e));
                    continue;
                }
            };
            self.fleet.notify();
            let (word, record) = match claim {
                RollbackClaim::Duplicate(r) => ("duplicate", r),
                RollbackClaim::First(r) => ("first", r),
                RollbackClaim::Retry(r) => ("retry", r),
            };
            if word == "duplicate" {
                info!(deployment = %id, target = %t, alert = %evidence.alertname, state = %record.state, "rollback already requested; delivery counted");
                done.push(serde_json::json!({
                    "deployment": id, "target": t, "claim": word,
                    "state": record.state, "message": record.message,
                    "deliveries": record.deliveries,
                }));
                continue;
            }
            info!(deployment = %id, target = %t, alert = %evidence.alertname, fingerprint = %evidence.fingerprint, "rollback requested by alert");
            let (state, message) = match self.trigger.unavailable() {
                Some(reason) => (RollbackRequestState::Unavailable, reason),
                None => match self.trigger.rollback(id, &t, &trigger).await {
                    Ok(()) => (RollbackRequestState::Started, String::new()),
                    Err(e) if transient(e.kind) => {
                        fault.get_or_insert(Fault::Transient(format!(
                            "rollback of {t} in deployment {id}: {}",
                            e.message
                        )));
                        (RollbackRequestState::Failed, e.message)
                    }
                    Err(e) => {
                        fault.get_or_insert(Fault::Permanent(format!(
                            "rollback of {t} in deployment {id} refused: {}",
                            e.message
                        )));
                        (RollbackRequestState::Refused, e.message)
                    }
                },
            };
            if let Err(e) = self.settle(id, &t, state, &message).await {
                fault.get_or_insert(store_fault(e));
            }
            done.push(serde_json::json!({
                "deployment": id, "target": t, "claim": word,
                "state": state, "message": message,
                "deliveries": record.deliveries,
            }));
        }
        match fault {
            None => Ok(done),
            Some(f) => Err((f, done)),
        }
    }

    async fn settle(
        &self,
        id: Uuid,
        target: &str,
        state: RollbackRequestState,
        message: &str,
    ) -> Result<(), StoreError> {
        let store = self.fleet.store();
        store.settle_rollback(id, target, state, message).await?;
        let text = if message.is_empty() {
            format!("rollback request {state}")
        } else {
            format!("rollback request {state}: {message}")
        };
        store
            .append_event(&NewEvent {
                deployment_id: id,
                target: Some(target.to_string()),
                kind: "rollback_request".into(),
                message: text,
                payload: serde_json::json!({ "state": state, "message": message }),
            })
            .await?;
        self.fleet.notify();
        Ok(())
    }

    /// The deployment and targets an alert names.
    async fn resolve(
        &self,
        deployment: Option<&str>,
        target: Option<&str>,
    ) -> Result<(Uuid, Vec<String>), Fault> {
        let store = self.fleet.store();
        let d = match deployment {
            Some(prefix) => {
                let ids =
                    store
                        .deployment_ids_with_prefix(prefix, 3)
                        .await
                        .map_err(|e| match e {
                            StoreError::Invalid { reason, .. } => {
                                Fault::Permanent(format!("label {DEPLOYMENT_LABEL}: {reason}"))
                            }
                            other => store_fault(other),
                        })?;
                let id = match ids.as_slice() {
                    [] => {
                        return Err(Fault::Permanent(format!(
                            "label {DEPLOYMENT_LABEL}={prefix:?} matches no deployment in the controller store"
                        )));
                    }
                    [one] => *one,
                    many => {
                        let list: Vec<String> = many.iter().map(Uuid::to_string).collect();
                        return Err(Fault::Permanent(format!(
                            "label {DEPLOYMENT_LABEL}={prefix:?} is ambiguous: it starts {}{}; give more of the id",
                            list.join(", "),
                            if many.len() > 2 { ", …" } else { "" }
                        )));
                    }
                };
                store
                    .deployment(id)
                    .await
                    .map_err(store_fault)?
                    .ok_or_else(|| {
                        Fault::Transient(format!("deployment {id} vanished while read"))
                    })?
            }
            None => {
                let t = target.unwrap_or_default();
                let d = store.latest_deployment_of(t).await.map_err(store_fault)?.ok_or_else(|| {
                    Fault::Permanent(format!(
                        "label {TARGET_LABEL}={t:?}: no deployment in the controller store includes this target"
                    ))
                })?;
                self.in_window(&d, t)?;
                d
            }
        };
        let ran = |s: TargetState| !matches!(s, TargetState::Pending | TargetState::Skipped);
        let targets: Vec<String> =
            match target {
                Some(t) => {
                    let status = d.targets.iter().find(|s| s.target == t).ok_or_else(|| {
                    Fault::Permanent(format!(
                        "deployment {} has no target {t:?} (label {TARGET_LABEL}); its targets: {}",
                        d.id,
                        d.targets.iter().map(|s| s.target.as_str()).collect::<Vec<_>>().join(", ")
                    ))
                })?;
                    if !ran(status.state) {
                        return Err(Fault::Permanent(format!(
                            "deployment {} never ran on {t:?} (it is {}): nothing to roll back",
                            d.id, status.state
                        )));
                    }
                    vec![t.to_string()]
                }
                None => d
                    .targets
                    .iter()
                    .filter(|s| ran(s.state))
                    .map(|s| s.target.clone())
                    .collect(),
            };
        if targets.is_empty() {
            return Err(Fault::Permanent(format!(
                "deployment {} never ran on any target: nothing to roll back",
                d.id
            )));
        }
        Ok((d.id, targets))
    }

    /// A deployment found by its target is rolled back while it runs (its watch window
    /// included) and for `grace` after it ended; later, naming the target is not enough.
    fn in_window(&self, d: &DeploymentRecord, target: &str) -> Result<(), Fault> {
        if !d.state.is_finished() {
            return Ok(());
        }
        // `failed` is not terminal, so it has no finished_at: its last change is its end.
        let ended = d.finished_at.unwrap_or(d.updated_at);
        let age = Utc::now().signed_duration_since(ended);
        let grace = chrono::Duration::from_std(self.grace)
            .unwrap_or_else(|_| chrono::Duration::days(36_500));
        if age <= grace {
            return Ok(());
        }
        Err(Fault::Permanent(format!(
            "label {TARGET_LABEL}={target:?}: its latest deployment {} ended ({}) at {}, more than the alert grace period ({}) ago; name it with {DEPLOYMENT_LABEL} to roll it back anyway",
            d.id,
            d.state,
            ended.format("%Y-%m-%d %H:%M:%S UTC"),
            humantime(self.grace)
        )))
    }
}

fn humantime(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(3600) && s > 0 {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) && s > 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_alertmanagers_example_and_tolerates_extra_fields() {
        let body = br#"{
          "receiver": "belay-controller", "status": "firing",
          "alerts": [{
            "status": "firing",
            "labels": {"alertname": "BelayProbeUnhealthy", "belay_target": "orders"},
            "annotations": {"summary": "s"},
            "startsAt": "2023-02-06T13:08:45.828Z", "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090/graph", "fingerprint": "1a30ba71cca2921f"
          }],
          "groupLabels": {"alertname": "BelayProbeUnhealthy"}, "commonLabels": {},
          "commonAnnotations": {}, "externalURL": "http://alertmanager:9093",
          "version": "4", "groupKey": "{}:{alertname=\"BelayProbeUnhealthy\"}",
          "truncatedAlerts": 0, "somethingNew": [1, 2]
        }"#;
        let p = parse_payload(body).expect("valid payload");
        assert_eq!(p.receiver, "belay-controller");
        assert_eq!(p.alerts.len(), 1);
        let a = &p.alerts[0];
        assert_eq!(a.status, AlertStatus::Firing);
        assert_eq!(a.alertname(), "BelayProbeUnhealthy");
        assert_eq!(a.fingerprint, "1a30ba71cca2921f");
        assert_eq!(
            a.starts_at.map(|t| t.to_rfc3339()),
            Some("2023-02-06T13:08:45.828+00:00".into())
        );
    }

    #[test]
    fn refuses_what_it_cannot_read_naming_the_field() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "not JSON"),
            (b"[1]", "JSON but an array, not an object"),
            (br#"{"alerts": []}"#, "no `version`"),
            (br#"{"version": "3", "alerts": []}"#, "`version` is \"3\""),
            (br#"{"version": 4, "alerts": []}"#, "`version` is 4"),
            (br#"{"version": "4"}"#, "no `alerts`"),
            (
                br#"{"version": "4", "alerts": {}}"#,
                "`alerts` is an object",
            ),
            (
                br#"{"version": "4", "alerts": [{"labels": {}}]}"#,
                "alerts[0]: missing field `status`",
            ),
            (
                br#"{"version": "4", "alerts": [{"status": "pending"}]}"#,
                "alerts[0].status is \"pending\"",
            ),
            (
                br#"{"version": "4", "alerts": [{"status": "firing", "labels": {"a": 1}}]}"#,
                "alerts[0]:",
            ),
            (
                br#"{"version": "4", "alerts": [{"status": "firing", "startsAt": "yesterday"}]}"#,
                "alerts[0].startsAt is \"yesterday\"",
            ),
            (
                br#"{"version": "4", "alerts": [], "receiver": 3}"#,
                "`receiver` is a number",
            ),
        ];
        for (body, want) in cases {
            let e = parse_payload(body).expect_err(&String::from_utf8_lossy(body));
            assert!(
                e.to_string().contains(want),
                "{}: {e}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
