//! The store's records and the deployment lifecycle.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// Which database holds the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state name the store does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} state {value:?}; expected one of: {expected}")]
pub struct UnknownState {
    pub what: &'static str,
    pub value: String,
    pub expected: String,
}

/// Where a deployment is in its lifecycle:
/// `planned → preflight → backing_up → migrating → validating → watching → succeeded`,
/// or, from any step before that, `→ failed → rolling_back → rolled_back | escalated`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentState {
    Planned,
    Preflight,
    BackingUp,
    Migrating,
    Validating,
    Watching,
    Succeeded,
    Failed,
    RollingBack,
    RolledBack,
    Escalated,
}

impl DeploymentState {
    pub const ALL: [DeploymentState; 11] = [
        DeploymentState::Planned,
        DeploymentState::Preflight,
        DeploymentState::BackingUp,
        DeploymentState::Migrating,
        DeploymentState::Validating,
        DeploymentState::Watching,
        DeploymentState::Succeeded,
        DeploymentState::Failed,
        DeploymentState::RollingBack,
        DeploymentState::RolledBack,
        DeploymentState::Escalated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentState::Planned => "planned",
            DeploymentState::Preflight => "preflight",
            DeploymentState::BackingUp => "backing_up",
            DeploymentState::Migrating => "migrating",
            DeploymentState::Validating => "validating",
            DeploymentState::Watching => "watching",
            DeploymentState::Succeeded => "succeeded",
            DeploymentState::Failed => "failed",
            DeploymentState::RollingBack => "rolling_back",
            DeploymentState::RolledBack => "rolled_back",
            DeploymentState::Escalated => "escalated",
        }
    }

    /// The deployment's run is over and it stands as it ended: `succeeded`, `rolled_back`,
    /// `escalated`. `failed` is not terminal, because a rollback may follow it; of the
    /// terminal states only `succeeded` may still move, to `rolling_back`, when an
    /// operator rolls the whole fleet deployment back.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            DeploymentState::Succeeded | DeploymentState::RolledBack | DeploymentState::Escalated
        )
    }

    /// The forward run is over: the terminal states and `failed`.
    pub fn is_finished(self) -> bool {
        self.is_terminal() || self == DeploymentState::Failed
    }

    /// Position on the forward path, if the state is on it.
    fn forward_rank(self) -> Option<u8> {
        Some(match self {
            DeploymentState::Planned => 0,
            DeploymentState::Preflight => 1,
            DeploymentState::BackingUp => 2,
            DeploymentState::Migrating => 3,
            DeploymentState::Validating => 4,
            DeploymentState::Watching => 5,
            DeploymentState::Succeeded => 6,
            _ => return None,
        })
    }

    /// Whether the lifecycle allows moving from `self` to `to`:
    /// - forward along `planned → … → succeeded`, skipping optional steps (`planned →
    ///   migrating`, `migrating → succeeded`);
    /// - from any state that is not finished to `failed` (including `rolling_back`, so a
    ///   rollback that fails can be tried again by another path);
    /// - `failed → rolling_back`, `failed → escalated` (no rollback possible),
    ///   `rolling_back → rolled_back | escalated`;
    /// - `succeeded → rolling_back` (an operator's rollback of a whole deployment).
    ///
    /// Staying in the same state is not a move.
    pub fn can_move_to(self, to: DeploymentState) -> bool {
        use DeploymentState::*;
        if let (Some(a), Some(b)) = (self.forward_rank(), to.forward_rank()) {
            return b > a;
        }
        match (self, to) {
            (from, Failed) => !from.is_finished(),
            (Failed, RollingBack | Escalated) => true,
            (Succeeded, RollingBack) => true,
            (RollingBack, RolledBack | Escalated) => true,
            _ => false,
        }
    }
}

impl fmt::Display for DeploymentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeploymentState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeploymentState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState {
                what: "deployment",
                value: s.to_string(),
                expected: DeploymentState::ALL.map(|s| s.as_str()).join(", "),
            })
    }
}

/// One target's progress within a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Skipped,
    Unknown,
}

impl TargetState {
    pub const ALL: [TargetState; 6] = [
        TargetState::Pending,
        TargetState::Running,
        TargetState::Succeeded,
        TargetState::Failed,
        TargetState::Skipped,
        TargetState::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TargetState::Pending => "pending",
            TargetState::Running => "running",
            TargetState::Succeeded => "succeeded",
            TargetState::Failed => "failed",
            TargetState::Skipped => "skipped",
            TargetState::Unknown => "unknown",
        }
    }
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TargetState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TargetState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState {
                what: "target",
                value: s.to_string(),
                expected: TargetState::ALL.map(|s| s.as_str()).join(", "),
            })
    }
}

/// What an agent tells the controller when it registers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRegistration {
    pub name: String,
    /// Where the controller reaches the agent (its gRPC address).
    pub address: String,
    /// The agent's belay version.
    pub version: String,
    pub targets: Vec<TargetRegistration>,
}

/// A target (database) an agent owns.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TargetRegistration {
    pub name: String,
    pub environment: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentRecord {
    pub name: String,
    pub address: String,
    pub version: String,
    /// When the agent last registered (an agent registers again when it restarts).
    pub registered_at: DateTime<Utc>,
    pub last_heartbeat: DateTime<Utc>,
    /// Names of its targets, sorted.
    pub targets: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetRecord {
    pub name: String,
    /// The agent that owns it.
    pub agent: String,
    pub environment: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// A deployment to create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewDeployment {
    pub id: Uuid,
    /// The schema version to reach; `None` means the latest.
    pub to_version: Option<String>,
    /// Target names, in the order they will be deployed (canary first).
    pub targets: Vec<String>,
    pub environment: Option<String>,
    pub params: serde_json::Value,
    /// Why environment promotion was skipped, when an operator overrode it.
    pub skip_promotion_reason: Option<String>,
    pub requested_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetStatus {
    pub target: String,
    pub state: TargetState,
    pub message: String,
    pub updated_at: DateTime<Utc>,
    /// Where the target's own pipeline stands (`planned` … `succeeded` | `failed`);
    /// `None` before it started.
    pub step: Option<DeploymentState>,
    /// How its pipeline ended (`state`, `failed_step`, `reason`, `evidence`, …); null
    /// until then.
    pub outcome: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeploymentRecord {
    pub id: Uuid,
    pub state: DeploymentState,
    pub to_version: Option<String>,
    pub environment: Option<String>,
    pub params: serde_json::Value,
    pub skip_promotion_reason: Option<String>,
    pub requested_by: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Set when the deployment reached a terminal state.
    pub finished_at: Option<DateTime<Utc>>,
    /// The seq of its newest event (0 before any): where a watcher starts following.
    pub last_seq: i64,
    /// In deployment order.
    pub targets: Vec<TargetStatus>,
}

/// An event to append to a deployment's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    pub deployment_id: Uuid,
    pub target: Option<String>,
    pub kind: String,
    pub message: String,
    pub payload: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRecord {
    pub deployment_id: Uuid,
    /// 1, 2, 3, … per deployment, without gaps.
    pub seq: i64,
    pub at: DateTime<Utc>,
    pub target: Option<String>,
    pub kind: String,
    pub message: String,
    pub payload: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeploymentState::*;

    #[test]
    fn states_round_trip_through_their_names() {
        for s in DeploymentState::ALL {
            assert_eq!(s.as_str().parse::<DeploymentState>(), Ok(s));
            assert_eq!(
                serde_json::to_value(s).ok(),
                Some(serde_json::json!(s.as_str()))
            );
        }
        for s in TargetState::ALL {
            assert_eq!(s.as_str().parse::<TargetState>(), Ok(s));
        }
        assert_eq!(BackingUp.as_str(), "backing_up");
        assert_eq!(RollingBack.as_str(), "rolling_back");
        let err = "done".parse::<DeploymentState>().unwrap_err().to_string();
        assert!(
            err.contains("\"done\"") && err.contains("rolled_back"),
            "{err}"
        );
    }

    #[test]
    fn terminal_and_finished() {
        let terminal: Vec<_> = DeploymentState::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(terminal, [Succeeded, RolledBack, Escalated]);
        let finished: Vec<_> = DeploymentState::ALL
            .into_iter()
            .filter(|s| s.is_finished())
            .collect();
        assert_eq!(finished, [Succeeded, Failed, RolledBack, Escalated]);
    }

    #[test]
    fn lifecycle() {
        let path = [
            Planned, Preflight, BackingUp, Migrating, Validating, Watching, Succeeded,
        ];
        for w in path.windows(2) {
            assert!(w[0].can_move_to(w[1]), "{} → {}", w[0], w[1]);
            assert!(!w[1].can_move_to(w[0]), "{} → {}", w[1], w[0]);
        }
        assert!(Planned.can_move_to(Migrating));
        assert!(Migrating.can_move_to(Succeeded));
        for s in [
            Planned,
            Preflight,
            BackingUp,
            Migrating,
            Validating,
            Watching,
            RollingBack,
        ] {
            assert!(s.can_move_to(Failed), "{s} → failed");
        }
        for s in [Succeeded, Failed, RolledBack, Escalated] {
            assert!(!s.can_move_to(Failed), "{s} → failed");
        }
        assert!(Failed.can_move_to(RollingBack));
        assert!(Failed.can_move_to(Escalated));
        assert!(RollingBack.can_move_to(RolledBack));
        assert!(RollingBack.can_move_to(Escalated));
        assert!(Succeeded.can_move_to(RollingBack));
        for s in DeploymentState::ALL {
            assert!(!s.can_move_to(s), "{s} → itself");
            if s.is_terminal() {
                for t in DeploymentState::ALL {
                    if (s, t) == (Succeeded, RollingBack) {
                        continue;
                    }
                    assert!(!s.can_move_to(t), "terminal {s} → {t}");
                }
            }
        }
        assert!(!Planned.can_move_to(RollingBack));
        assert!(!Migrating.can_move_to(RolledBack));
        assert!(!Failed.can_move_to(Succeeded));
        assert!(!Failed.can_move_to(Migrating));
    }
}
