//! The incident report sent out: generic JSON webhooks (the report and its Markdown when
//! a rollback ends) and PagerDuty Events v2 (`trigger` when a rollback starts or
//! escalates, `resolve` when it is rolled back and verified, one dedup key per deployment
//! and target so the resolve closes the trigger).
//!
//! Delivery is bounded: retries with backoff for 5xx and transport errors, none for 4xx
//! (the receiver said the request itself is wrong), all within the notifier's timeout, so a
//! failing receiver never fails the rollback nor delays it past that timeout. A URL is only
//! ever shown by its host (a webhook's path or userinfo often is its secret), and the
//! secrets (a routing key, a bearer token) come from a file or the environment.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::report::{IncidentReport, Severity};

/// The event kind a delivery's result is recorded as on the deployment: payload
/// [`Delivery`].
pub const KIND_NOTIFY: &str = "notify";

/// What a notifier sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyFormat {
    /// The report (JSON and Markdown), posted once the rollback ended.
    Json,
    /// PagerDuty Events v2: trigger, then trigger again (escalated) or resolve.
    Pagerduty,
}

impl NotifyFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyFormat::Json => "json",
            NotifyFormat::Pagerduty => "pagerduty",
        }
    }
}

/// `[[rollback.notify]]` as a configuration file writes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifierSetting {
    /// Where to POST (`https://events.pagerduty.com/v2/enqueue` for PagerDuty).
    pub url: String,
    /// `json` or `pagerduty`.
    pub format: NotifyFormat,
    /// The most one delivery may take, retries included [10s].
    pub timeout: Option<String>,
    /// Attempts of a delivery that met a 5xx or a transport error [3].
    pub attempts: Option<u32>,
    /// `pagerduty`: the file holding the integration's routing key.
    pub routing_key_file: Option<PathBuf>,
    /// `pagerduty`: the environment variable holding it.
    pub routing_key_env: Option<String>,
    /// `json`: the file holding a bearer token, sent as `Authorization: Bearer …`.
    pub bearer_token_file: Option<PathBuf>,
    /// `json`: the environment variable holding it.
    pub bearer_token_env: Option<String>,
}

/// A secret read from a file or the environment; never shown.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// One notifier, checked: its secret read, its timeout parsed.
#[derive(Clone, PartialEq, Eq)]
pub struct Notifier {
    url: String,
    /// `host[:port]` of the URL: all that is ever shown of it.
    pub host: String,
    pub format: NotifyFormat,
    pub timeout: Duration,
    pub attempts: u32,
    secret: Option<Secret>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("host", &self.host)
            .field("format", &self.format)
            .field("timeout", &self.timeout)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// A secret from `file` (its first line) or the environment variable `env`; `key` names
/// the setting in errors (`notify[0].routing_key`).
fn read_secret(
    key: &str,
    file: &Option<PathBuf>,
    env: &Option<String>,
) -> Result<Option<Secret>, (String, String)> {
    match (file, env) {
        (Some(_), Some(_)) => Err((
            format!("{key}_file"),
            format!("and `{key}_env` are both set: keep one"),
        )),
        (Some(path), None) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                (
                    format!("{key}_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let line = text.lines().next().unwrap_or_default().trim().to_string();
            if line.is_empty() {
                return Err((
                    format!("{key}_file"),
                    format!("{} is empty: its first line is the secret", path.display()),
                ));
            }
            Ok(Some(Secret(line)))
        }
        (None, Some(var)) => match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Ok(Some(Secret(v.trim().to_string()))),
            _ => Err((
                format!("{key}_env"),
                format!("the environment variable {var} is not set (or empty)"),
            )),
        },
        (None, None) => Ok(None),
    }
}

impl NotifierSetting {
    /// Checked; `Err((key within the notifier, what is wrong))`.
    pub fn resolve(&self) -> Result<Notifier, (String, String)> {
        let parsed = reqwest::Url::parse(&self.url).map_err(|e| {
            (
                "url".to_string(),
                format!("is not a URL ({e}): {}", belay_core::redact_url(&self.url)),
            )
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err((
                "url".into(),
                format!("must be http:// or https://, not {}://", parsed.scheme()),
            ));
        }
        let Some(host) = parsed.host_str() else {
            return Err(("url".into(), "names no host".into()));
        };
        let host = match parsed.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let timeout = match &self.timeout {
            Some(t) => {
                let d = belay_core::parse_duration(t)
                    .map_err(|e| ("timeout".to_string(), e.to_string()))?;
                if d.is_zero() {
                    return Err(("timeout".into(), "must be greater than zero".into()));
                }
                d
            }
            None => Duration::from_secs(10),
        };
        let attempts = match self.attempts {
            Some(0) => return Err(("attempts".into(), "must be at least 1".into())),
            Some(n) => n,
            None => 3,
        };
        let secret = match self.format {
            NotifyFormat::Pagerduty => {
                if self.bearer_token_file.is_some() || self.bearer_token_env.is_some() {
                    return Err((
                        "bearer_token_file".into(),
                        "is for `format = \"json\"`; PagerDuty authenticates by `routing_key_file` (or `routing_key_env`)".into(),
                    ));
                }
                let key =
                    read_secret("routing_key", &self.routing_key_file, &self.routing_key_env)?;
                if key.is_none() {
                    return Err((
                        "routing_key_file".into(),
                        "is required for `format = \"pagerduty\"`: the file holding the integration's routing key (or `routing_key_env`, an environment variable holding it); never in the URL or the config".into(),
                    ));
                }
                key
            }
            NotifyFormat::Json => {
                if self.routing_key_file.is_some() || self.routing_key_env.is_some() {
                    return Err((
                        "routing_key_file".into(),
                        "is for `format = \"pagerduty\"`; a JSON webhook takes `bearer_token_file` (or `bearer_token_env`)".into(),
                    ));
                }
                read_secret(
                    "bearer_token",
                    &self.bearer_token_file,
                    &self.bearer_token_env,
                )?
            }
        };
        Ok(Notifier {
            url: self.url.clone(),
            host,
            format: self.format,
            timeout,
            attempts,
            secret,
        })
    }
}

/// Why a message is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyAction {
    /// The report, once the rollback ended (generic JSON).
    Report,
    /// PagerDuty: a rollback started or escalated.
    Trigger,
    /// PagerDuty: the rollback ended rolled back and verified.
    Resolve,
}

impl NotifyAction {
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyAction::Report => "report",
            NotifyAction::Trigger => "trigger",
            NotifyAction::Resolve => "resolve",
        }
    }
}

/// How one delivery ended: recorded as the deployment's `notify` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The URL's host (never the URL).
    pub host: String,
    pub format: NotifyFormat,
    pub action: NotifyAction,
    pub ok: bool,
    /// The last HTTP status received, if any.
    pub status: Option<u16>,
    pub attempts: u32,
    /// Why it failed (status or transport error), the URL left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub ms: u64,
}

impl Delivery {
    /// One line for people.
    pub fn line(&self) -> String {
        let status = self
            .status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "no response".into());
        let tail = match &self.error {
            Some(e) if !self.ok => format!(" — failed: {e}"),
            _ => String::new(),
        };
        format!(
            "notify {} {} to {}: {} after {} attempt(s) in {} ms{tail}",
            self.format.as_str(),
            self.action.as_str(),
            self.host,
            status,
            self.attempts,
            self.ms
        )
    }
}

/// PagerDuty's dedup key of a rollback: the same for its trigger and its resolve, so the
/// resolve closes the alert the trigger opened (at most 255 characters).
pub fn dedup_key(deployment: Uuid, target: &str) -> String {
    let mut key = format!("belay-rollback/{target}/{deployment}");
    if key.len() > 255 {
        // The id is what makes it unique; a very long target name is cut, not the id.
        let keep = 255 - deployment.to_string().len() - "belay-rollback//".len();
        let cut: String = target.chars().take(keep).collect();
        key = format!("belay-rollback/{cut}/{deployment}");
        while key.len() > 255 {
            key.remove("belay-rollback/".len());
        }
    }
    key
}

/// PagerDuty's severity of an incident report's.
pub fn pagerduty_severity(s: Severity) -> &'static str {
    match s {
        Severity::P0 => "critical",
        Severity::P1 => "error",
        Severity::P2 => "warning",
    }
}

/// What a rollback in progress is, for the trigger sent when it starts.
#[derive(Debug, Clone)]
pub struct Started {
    pub deployment: Uuid,
    pub target: String,
    pub environment: Option<String>,
    pub strategy: String,
    pub trigger: String,
    pub reason: String,
    pub at: chrono::DateTime<chrono::Utc>,
}

impl Notifier {
    fn routing_key(&self) -> &str {
        self.secret
            .as_ref()
            .map(|s| s.0.as_str())
            .unwrap_or_default()
    }

    /// The PagerDuty trigger sent when a rollback starts: severity `error` (a failed
    /// deployment being rolled back: degraded until it is verified).
    pub fn started_body(&self, s: &Started) -> Value {
        json!({
            "routing_key": self.routing_key(),
            "event_action": "trigger",
            "dedup_key": dedup_key(s.deployment, &s.target),
            "client": "belay",
            "payload": {
                "summary": truncate(&format!(
                    "belay is rolling back deployment {} on {} ({}): {}",
                    short(s.deployment), s.target, s.strategy, s.reason
                )),
                "source": s.target,
                "severity": "error",
                "timestamp": s.at.to_rfc3339(),
                "component": "database",
                "group": s.environment,
                "class": "rollback_started",
                "custom_details": {
                    "deployment_id": s.deployment,
                    "strategy": s.strategy,
                    "trigger": s.trigger,
                    "reason": s.reason,
                },
            },
        })
    }

    /// What this notifier sends once the rollback ended: JSON the report, PagerDuty a
    /// resolve (rolled back and verified) or a trigger with the report's severity.
    pub fn ended_body(&self, report: &IncidentReport, markdown: &str) -> (NotifyAction, Value) {
        match self.format {
            NotifyFormat::Json => (
                NotifyAction::Report,
                json!({
                    "kind": "belay.incident_report",
                    "deployment_id": report.deployment_id,
                    "target": report.target,
                    "result": report.result,
                    "severity": report.severity,
                    "report": report,
                    "markdown": markdown,
                }),
            ),
            NotifyFormat::Pagerduty if report.result == "rolled_back" => (
                NotifyAction::Resolve,
                json!({
                    "routing_key": self.routing_key(),
                    "event_action": "resolve",
                    "dedup_key": dedup_key(report.deployment_id, &report.target),
                }),
            ),
            NotifyFormat::Pagerduty => (
                NotifyAction::Trigger,
                json!({
                    "routing_key": self.routing_key(),
                    "event_action": "trigger",
                    "dedup_key": dedup_key(report.deployment_id, &report.target),
                    "client": "belay",
                    "payload": {
                        "summary": truncate(&format!(
                            "belay rollback of deployment {} on {} {} ({:?}): {}",
                            short(report.deployment_id),
                            report.target,
                            report.result,
                            report.severity,
                            report.errors.join("; ")
                        )),
                        "source": report.target,
                        "severity": pagerduty_severity(report.severity),
                        "timestamp": report.rollback_finished_at.to_rfc3339(),
                        "component": "database",
                        "group": report.environment,
                        "class": "rollback_escalated",
                        "custom_details": {
                            "deployment_id": report.deployment_id,
                            "strategy": report.strategy,
                            "result": report.result,
                            "escalation": report.escalation,
                            "errors": report.errors,
                            "backups": report.backups,
                        },
                    },
                }),
            ),
        }
    }

    /// POSTs `body`: retried with backoff on a 5xx or a transport error, not on a 4xx,
    /// all within the timeout.
    pub async fn deliver(&self, action: NotifyAction, body: &Value) -> Delivery {
        let started = Instant::now();
        let mut d = Delivery {
            host: self.host.clone(),
            format: self.format,
            action,
            ok: false,
            status: None,
            attempts: 0,
            error: None,
            ms: 0,
        };
        let client = match client() {
            Ok(c) => c,
            Err(e) => {
                d.error = Some(e);
                return d;
            }
        };
        let deadline = started + self.timeout;
        loop {
            d.attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let mut req = client.post(&self.url).json(body).timeout(left);
            if self.format == NotifyFormat::Json
                && let Some(token) = &self.secret
            {
                req = req.bearer_auth(&token.0);
            }
            let retry = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    d.status = Some(status.as_u16());
                    if status.is_success() {
                        d.ok = true;
                        d.error = None;
                        break;
                    }
                    d.error = Some(format!("the receiver answered {status}"));
                    // 4xx: this request will never succeed; 3xx: redirects are not
                    // followed (a moved webhook is a configuration error).
                    status.is_server_error()
                }
                Err(e) => {
                    d.error = Some(transport_error(&e));
                    true
                }
            };
            if !retry || d.attempts >= self.attempts {
                break;
            }
            let backoff = Duration::from_millis(200 * (1u64 << (d.attempts - 1).min(4)))
                .min(Duration::from_secs(2));
            if Instant::now() + backoff >= deadline {
                d.error = d.error.map(|e| {
                    format!(
                        "{e}; gave up: the next attempt would pass the timeout of {}",
                        belay_core::format_duration(self.timeout)
                    )
                });
                break;
            }
            tokio::time::sleep(backoff).await;
        }
        d.ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        d
    }
}

fn client() -> Result<reqwest::Client, String> {
    // reqwest is built without a default crypto provider; installing ours again is a
    // harmless no-op error.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("belay-rollback/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {}", transport_error(&e)))
}

/// A transport error without its URL (which may carry a secret), redacted anyway.
fn transport_error(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut text = String::from(kind);
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    belay_core::redact_url(&text)
}

fn short(id: Uuid) -> String {
    id.to_string()[..8].to_string()
}

/// PagerDuty's summary is at most 1024 characters.
fn truncate(s: &str) -> String {
    if s.chars().count() <= 1024 {
        return s.to_string();
    }
    let mut t: String = s.chars().take(1023).collect();
    t.push('…');
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting(format: NotifyFormat) -> NotifierSetting {
        NotifierSetting {
            url: "https://u:hunter2@hooks.example.com:8443/p/SECRETPATH".into(),
            format,
            timeout: None,
            attempts: None,
            routing_key_file: None,
            routing_key_env: None,
            bearer_token_file: None,
            bearer_token_env: None,
        }
    }

    #[test]
    fn a_notifier_shows_only_its_host_and_needs_its_secret_from_a_file_or_the_environment() {
        let n = setting(NotifyFormat::Json).resolve().unwrap();
        assert_eq!(n.host, "hooks.example.com:8443");
        let shown = format!("{n:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("SECRETPATH"),
            "{shown}"
        );

        let (key, why) = setting(NotifyFormat::Pagerduty).resolve().unwrap_err();
        assert_eq!(key, "routing_key_file");
        assert!(why.contains("required"), "{why}");

        let dir = std::env::temp_dir().join(format!("belay-notify-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        std::fs::write(&file, "R0UTING\n").unwrap();
        let mut s = setting(NotifyFormat::Pagerduty);
        s.routing_key_file = Some(file.clone());
        let n = s.resolve().unwrap();
        assert!(!format!("{n:?}").contains("R0UTING"));
        let body = n.started_body(&Started {
            deployment: Uuid::nil(),
            target: "shop".into(),
            environment: None,
            strategy: "undo".into(),
            trigger: "probe_threshold".into(),
            reason: "probe app".into(),
            at: chrono::Utc::now(),
        });
        assert_eq!(body["routing_key"], "R0UTING");
        assert_eq!(body["event_action"], "trigger");
        assert_eq!(body["payload"]["source"], "shop");
        assert_eq!(body["payload"]["severity"], "error");

        s.routing_key_env = Some("BELAY_TEST_UNSET_ROUTING_KEY".into());
        assert_eq!(s.resolve().unwrap_err().0, "routing_key_file");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn pagerduty_resolves_a_verified_rollback_and_triggers_again_on_escalation() {
        let dir = std::env::temp_dir().join(format!("belay-notify-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        std::fs::write(&file, "K\n").unwrap();
        let mut s = setting(NotifyFormat::Pagerduty);
        s.routing_key_file = Some(file);
        let pd = s.resolve().unwrap();
        let json = setting(NotifyFormat::Json).resolve().unwrap();
        let now = chrono::Utc::now();
        let mut report = IncidentReport {
            deployment_id: Uuid::new_v4(),
            also_rolled_back: vec![],
            target: "shop".into(),
            environment: Some("production".into()),
            release: None,
            requested_by: None,
            from_version: None,
            reached_version: None,
            rolled_back_to: None,
            deployed_at: now,
            rollback_started_at: now,
            rollback_finished_at: now,
            trigger: crate::model::Trigger::operator("test", false),
            strategy: crate::model::Strategy::Undo,
            reasons: vec![],
            steps: vec![],
            result: "escalated".into(),
            errors: vec!["undo: cannot connect".into()],
            backups: Default::default(),
            data: vec![],
            severity: Severity::P0,
            escalation: Severity::P0.escalation_path().into(),
        };
        let key = dedup_key(report.deployment_id, "shop");
        let (action, body) = pd.ended_body(&report, "md");
        assert_eq!(action, NotifyAction::Trigger);
        assert_eq!(body["event_action"], "trigger");
        assert_eq!(body["dedup_key"], key.as_str());
        assert_eq!(body["payload"]["severity"], "critical");
        assert_eq!(body["payload"]["group"], "production");
        report.severity = Severity::P1;
        assert_eq!(
            pd.ended_body(&report, "md").1["payload"]["severity"],
            "error"
        );
        let (action, body) = json.ended_body(&report, "md");
        assert_eq!(action, NotifyAction::Report);
        assert_eq!(body["result"], "escalated");
        assert_eq!(body["markdown"], "md");
        report.result = "rolled_back".into();
        report.severity = Severity::P2;
        let (action, body) = pd.ended_body(&report, "md");
        assert_eq!(action, NotifyAction::Resolve);
        assert_eq!(body["event_action"], "resolve");
        assert_eq!(body["dedup_key"], key.as_str());
        assert_eq!(body["routing_key"], "K");
        assert_eq!(pagerduty_severity(Severity::P2), "warning");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_dedup_key_is_stable_and_within_pagerdutys_limit() {
        let id = Uuid::new_v4();
        assert_eq!(dedup_key(id, "shop"), dedup_key(id, "shop"));
        assert_ne!(dedup_key(id, "shop"), dedup_key(id, "shop2"));
        let long = "t".repeat(400);
        let k = dedup_key(id, &long);
        assert!(k.len() <= 255 && k.ends_with(&id.to_string()), "{k}");
    }
}
