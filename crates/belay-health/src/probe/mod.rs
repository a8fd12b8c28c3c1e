//! Probes: HTTP and SQL checks repeated every `period`, judged by [`ProbeMachine`], and
//! streamed as [`ProbeEvent`]s.

mod machine;
mod runner;

use std::time::Duration;

use belay_core::{DatabaseUrl, format_duration};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use machine::{ProbeMachine, ProbeResult, ProbeState, Transition};
pub(crate) use runner::record_metrics;
pub use runner::{ProbeStream, WatchOutcome, run_probe, run_probes, watch};

use crate::postflight::Expectation;
use crate::{HealthError, units};

/// One probe: `[[probes]]` in `belay.toml`, or built by the CLI from flags.
///
/// ```toml
/// [[probes]]
/// name = "api"
/// period = "1s"
/// failure_threshold = 3
/// http = { url = "http://app:8080/health", expect_status = 200, json_pointer = "/db", equals = "ok" }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawProbe")]
pub struct ProbeSpec {
    pub name: String,
    #[serde(flatten)]
    pub kind: ProbeKind,
    /// Time between the starts of two attempts.
    #[serde(default = "defaults::period", with = "units::duration")]
    pub period: Duration,
    /// An attempt that takes longer fails (as an error).
    #[serde(default = "defaults::timeout", with = "units::duration")]
    pub timeout: Duration,
    /// Consecutive failures that trigger.
    #[serde(default = "defaults::failure_threshold")]
    pub failure_threshold: u32,
    /// Consecutive passes that recover from triggered.
    #[serde(default = "defaults::success_threshold")]
    pub success_threshold: u32,
    /// Wait before the first attempt.
    #[serde(default, with = "units::duration")]
    pub initial_delay: Duration,
}

/// `[[probes]]` as written: both kinds optional, so that a probe with neither or both
/// gets a message naming the two accepted forms rather than serde's "no variant of enum
/// ProbeKind found in flattened data"; and every key known, so that a misspelt one is an
/// error (a flattened enum cannot deny unknown fields).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    name: String,
    http: Option<HttpProbe>,
    sql: Option<SqlProbe>,
    #[serde(default = "defaults::period", with = "units::duration")]
    period: Duration,
    #[serde(default = "defaults::timeout", with = "units::duration")]
    timeout: Duration,
    #[serde(default = "defaults::failure_threshold")]
    failure_threshold: u32,
    #[serde(default = "defaults::success_threshold")]
    success_threshold: u32,
    #[serde(default, with = "units::duration")]
    initial_delay: Duration,
}

/// The two shapes a probe takes, for error messages.
pub const PROBE_FORMS: &str = "`http = { url = \"http://app:8080/health\" }` or `sql = { url = \"postgres://…\", query = \"SELECT …\", expect = \"no_rows\" }`";

impl TryFrom<RawProbe> for ProbeSpec {
    type Error = String;

    fn try_from(r: RawProbe) -> Result<Self, String> {
        let kind = match (r.http, r.sql) {
            (Some(h), None) => ProbeKind::Http(h),
            (None, Some(q)) => ProbeKind::Sql(q),
            (None, None) => {
                return Err(format!(
                    "probe {:?} says neither what to probe: give exactly one of {PROBE_FORMS}",
                    r.name
                ));
            }
            (Some(_), Some(_)) => {
                return Err(format!(
                    "probe {:?} gives both `http` and `sql`: give exactly one of {PROBE_FORMS} (two probes for both)",
                    r.name
                ));
            }
        };
        Ok(ProbeSpec {
            name: r.name,
            kind,
            period: r.period,
            timeout: r.timeout,
            failure_threshold: r.failure_threshold,
            success_threshold: r.success_threshold,
            initial_delay: r.initial_delay,
        })
    }
}

pub(crate) mod defaults {
    use std::time::Duration;
    pub fn period() -> Duration {
        Duration::from_secs(10)
    }
    pub fn timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn failure_threshold() -> u32 {
        3
    }
    pub fn success_threshold() -> u32 {
        1
    }
    pub fn method() -> String {
        "GET".into()
    }
}

/// What a probe checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeKind {
    Http(HttpProbe),
    Sql(SqlProbe),
}

/// An HTTP request and what its answer must be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    #[serde(default = "defaults::method")]
    pub method: String,
    pub url: String,
    /// `None`: any 2xx or 3xx passes (Kubernetes `httpGet`). Redirects are not followed.
    #[serde(default)]
    pub expect_status: Option<u16>,
    /// RFC 6901 pointer into the JSON body (`/status`, `/checks/0/ok`); the body must be
    /// JSON and the pointer must resolve.
    #[serde(default)]
    pub json_pointer: Option<String>,
    /// The value the pointer must resolve to.
    #[serde(default)]
    pub equals: Option<serde_json::Value>,
}

/// A query and its expectation (as postflight `[[checks]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlProbe {
    #[serde(serialize_with = "ser_url", deserialize_with = "de_url")]
    pub url: DatabaseUrl,
    pub query: String,
    pub expect: Expectation,
}

fn ser_url<S: Serializer>(url: &DatabaseUrl, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(url.redacted())
}

fn de_url<'de, D: Deserializer<'de>>(d: D) -> Result<DatabaseUrl, D::Error> {
    let text = String::deserialize(d)?;
    DatabaseUrl::parse(&text).map_err(serde::de::Error::custom)
}

impl ProbeSpec {
    /// An HTTP GET probe with the defaults (period 10 s, timeout 1 s, failure threshold 3,
    /// success threshold 1, any 2xx/3xx passes).
    pub fn http(name: impl Into<String>, url: impl Into<String>) -> Self {
        Self::with_kind(
            name,
            ProbeKind::Http(HttpProbe {
                method: defaults::method(),
                url: url.into(),
                expect_status: None,
                json_pointer: None,
                equals: None,
            }),
        )
    }

    /// A SQL probe with the defaults.
    pub fn sql(
        name: impl Into<String>,
        url: DatabaseUrl,
        query: impl Into<String>,
        expect: Expectation,
    ) -> Self {
        Self::with_kind(
            name,
            ProbeKind::Sql(SqlProbe {
                url,
                query: query.into(),
                expect,
            }),
        )
    }

    fn with_kind(name: impl Into<String>, kind: ProbeKind) -> Self {
        ProbeSpec {
            name: name.into(),
            kind,
            period: defaults::period(),
            timeout: defaults::timeout(),
            failure_threshold: defaults::failure_threshold(),
            success_threshold: defaults::success_threshold(),
            initial_delay: Duration::ZERO,
        }
    }

    /// What the probe looks at, safe to print (URLs redacted).
    pub fn target(&self) -> String {
        match &self.kind {
            ProbeKind::Http(h) => format!("{} {}", h.method, belay_core::redact_url(&h.url)),
            ProbeKind::Sql(s) => {
                format!("{} on {}", crate::preflight::one_line(&s.query, 80), s.url)
            }
        }
    }

    /// Refuses specs that cannot work: empty name, zero thresholds or durations, a URL
    /// that is not http(s), an unknown method, `equals` without `json_pointer`.
    pub fn validate(&self) -> Result<(), HealthError> {
        let what = || format!("probe {:?}", self.name);
        if self.name.trim().is_empty() {
            return Err(HealthError::invalid("probe", "a probe needs a name"));
        }
        if self.failure_threshold == 0 || self.success_threshold == 0 {
            return Err(HealthError::invalid(
                what(),
                "thresholds must be at least 1",
            ));
        }
        if self.period.is_zero() || self.timeout.is_zero() {
            return Err(HealthError::invalid(
                what(),
                "period and timeout must be above zero",
            ));
        }
        if let ProbeKind::Http(h) = &self.kind {
            let url = url::Url::parse(&h.url).map_err(|e| {
                HealthError::invalid(
                    what(),
                    format!("URL {}: {e}", belay_core::redact_url(&h.url)),
                )
            })?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(HealthError::invalid(
                    what(),
                    "the URL must be http:// or https://",
                ));
            }
            if reqwest::Method::from_bytes(h.method.as_bytes()).is_err() {
                return Err(HealthError::invalid(
                    what(),
                    format!("method {:?}", h.method),
                ));
            }
            if h.equals.is_some() && h.json_pointer.is_none() {
                return Err(HealthError::invalid(
                    what(),
                    "`equals` needs a `json_pointer`",
                ));
            }
            if let Some(p) = &h.json_pointer
                && !(p.is_empty() || p.starts_with('/'))
            {
                return Err(HealthError::invalid(
                    what(),
                    format!("JSON pointer {p:?} must start with '/'"),
                ));
            }
        }
        Ok(())
    }
}

/// What one attempt saw: the evidence an operator (or an incident report) needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// HTTP status code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The start of the body (HTTP) or the rows seen (SQL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Why the attempt failed: the mismatch, the connection error, the timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub elapsed_ms: u64,
}

impl std::fmt::Display for Evidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(s) = self.status {
            parts.push(format!("status {s}"));
        }
        if let Some(e) = &self.error {
            parts.push(e.clone());
        }
        if let Some(b) = &self.body
            && !b.is_empty()
        {
            parts.push(format!("body {b:?}"));
        }
        parts.push(format!("{}ms", self.elapsed_ms));
        f.write_str(&parts.join(", "))
    }
}

/// One attempt: its result and evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeOutcome {
    pub result: ProbeResult,
    pub evidence: Evidence,
}

/// One attempt of one probe, after the state machine saw it. Streamed for every attempt;
/// the one with `triggered: true` (exactly one per crossing of `failure_threshold`) is
/// what a rollback controller acts on, with `probe`, `target` and `evidence` saying why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeEvent {
    pub at: DateTime<Utc>,
    pub probe: String,
    pub target: String,
    /// 1-based attempt number of this probe.
    pub seq: u64,
    pub result: ProbeResult,
    pub evidence: Evidence,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
    pub failure_threshold: u32,
    /// The state after this attempt.
    pub state: ProbeState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transition: Option<Transition>,
    /// This attempt crossed `failure_threshold` (`transition == Some(Triggered)`).
    pub triggered: bool,
}

impl ProbeEvent {
    /// One line for a terminal: `api: fail 2/3 (status 503, body "…", 4ms)`.
    pub fn summary(&self) -> String {
        let result = match self.result {
            ProbeResult::Pass => "pass",
            ProbeResult::Fail => "fail",
            ProbeResult::Error => "error",
        };
        let mut line = if self.result.is_failure() {
            format!(
                "{}: {result} {}/{} ({})",
                self.probe, self.consecutive_failures, self.failure_threshold, self.evidence
            )
        } else {
            format!("{}: {result} ({})", self.probe, self.evidence)
        };
        match self.transition {
            Some(Transition::Triggered) => line.push_str(" — failure threshold crossed"),
            Some(Transition::Recovered) => line.push_str(" — recovered"),
            None => {}
        }
        line
    }
}

impl std::fmt::Display for ProbeSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, every {}, timeout {}, failure threshold {})",
            self.name,
            self.target(),
            format_duration(self.period),
            format_duration(self.timeout),
            self.failure_threshold
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_read_from_belay_toml_and_validate() {
        #[derive(Deserialize)]
        struct Config {
            probes: Vec<ProbeSpec>,
        }
        let c: Config = toml::from_str(
            r#"
            [[probes]]
            name = "api"
            period = "1s"
            http = { url = "http://127.0.0.1:8080/health", expect_status = 200, json_pointer = "/db", equals = "ok" }
            [[probes]]
            name = "orders"
            timeout = "500ms"
            failure_threshold = 2
            sql = { url = "postgres://app:secret@db/shop", query = "SELECT count(*) FROM orders WHERE stuck", expect = { at_most = 5 } }
            "#,
        )
        .unwrap();
        let [api, orders] = &c.probes[..] else {
            panic!("two probes")
        };
        assert_eq!(api.period, Duration::from_secs(1));
        assert_eq!(api.failure_threshold, 3);
        let ProbeKind::Http(h) = &api.kind else {
            panic!("http")
        };
        assert_eq!(h.method, "GET");
        assert_eq!(h.equals, Some(serde_json::json!("ok")));
        assert_eq!(orders.timeout, Duration::from_millis(500));
        assert!(!orders.target().contains("secret"));
        assert!(!serde_json::to_string(orders).unwrap().contains("secret"));
        api.validate().unwrap();
        orders.validate().unwrap();

        let mut bad = ProbeSpec::http("x", "ftp://example.com/");
        assert!(bad.validate().is_err());
        bad = ProbeSpec::http("x", "http://example.com/");
        bad.failure_threshold = 0;
        assert!(bad.validate().is_err());
        bad = ProbeSpec::http("x", "http://example.com/");
        if let ProbeKind::Http(h) = &mut bad.kind {
            h.equals = Some(serde_json::json!(1));
        }
        assert!(bad.validate().is_err());
    }

    #[test]
    fn a_probe_without_one_kind_or_with_a_misspelt_key_says_what_is_accepted() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Config {
            probes: Vec<ProbeSpec>,
        }
        for (body, says) in [
            ("[[probes]]\nname = \"p\"\nperiod = \"1s\"\n", "neither"),
            (
                "[[probes]]\nname = \"p\"\nhttp = { url = \"http://a/\" }\nsql = { url = \"postgres://a/b\", query = \"SELECT 1\", expect = \"zero\" }\n",
                "both",
            ),
            (
                "[[probes]]\nname = \"p\"\nhttp = { url = \"http://a/\" }\nfailure_treshold = 2\n",
                "unknown field `failure_treshold`",
            ),
        ] {
            let e = toml::from_str::<Config>(body).unwrap_err().to_string();
            assert!(e.contains(says), "{body}: {e}");
            assert!(!e.contains("no variant"), "{e}");
            if says != "unknown field `failure_treshold`" {
                assert!(e.contains("http = {") && e.contains("sql = {"), "{e}");
            }
        }
    }
}
