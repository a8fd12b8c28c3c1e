//! Rollback requests from alerts, at most one per (deployment, target).
//!
//! Alertmanager delivers a notification at least once, and several alerts may name one
//! deployment. [`Store::claim_rollback`] records the request *before* anything is
//! triggered, in one transaction with the deployment's event: the first delivery wins
//! ([`RollbackClaim::First`]); later ones are counted as duplicate deliveries and cause
//! nothing, except after a transient failure of the trigger (state `failed`), when the
//! next delivery claims it again ([`RollbackClaim::Retry`]).
//!
//! States: `requested` (recorded, the trigger is being called; a controller restart turns
//! it `failed`) → `started` (accepted) |
//! `failed` (transient; retried by the next delivery) | `refused` (for good, with the
//! reason) | `unavailable` (this controller cannot execute rollbacks, with the reason).

use crate::db::{self, Row, Val};
use crate::model::NewEvent;
use crate::{DeploymentRecord, Store, StoreError};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// Where a rollback request stands (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackRequestState {
    Requested,
    Started,
    Failed,
    Refused,
    Unavailable,
}

impl RollbackRequestState {
    pub const ALL: [RollbackRequestState; 5] = [
        RollbackRequestState::Requested,
        RollbackRequestState::Started,
        RollbackRequestState::Failed,
        RollbackRequestState::Refused,
        RollbackRequestState::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RollbackRequestState::Requested => "requested",
            RollbackRequestState::Started => "started",
            RollbackRequestState::Failed => "failed",
            RollbackRequestState::Refused => "refused",
            RollbackRequestState::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for RollbackRequestState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RollbackRequestState {
    type Err = crate::UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| crate::UnknownState {
                what: "rollback request",
                value: s.to_string(),
                expected: Self::ALL.map(|s| s.as_str()).join(", "),
            })
    }
}

/// The alert asking for a rollback: the request's evidence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertEvidence {
    pub alertname: String,
    pub fingerprint: String,
    /// The alert's labels, a JSON object of strings.
    pub labels: serde_json::Value,
    /// The alert's annotations, a JSON object of strings.
    pub annotations: serde_json::Value,
    pub starts_at: Option<DateTime<Utc>>,
}

/// A recorded rollback request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RollbackRequestRecord {
    pub deployment_id: Uuid,
    pub target: String,
    pub state: RollbackRequestState,
    /// The alert of the first delivery (or of the one that retried it).
    pub alert: AlertEvidence,
    /// Why the request is `failed`, `refused` or `unavailable`; empty otherwise.
    pub message: String,
    /// How many times the trigger was (or is being) called.
    pub attempts: i64,
    /// How many deliveries named this request, the first one included.
    pub deliveries: i64,
    pub requested_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One delivery that named a request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RollbackDelivery {
    pub n: i64,
    pub at: DateTime<Utc>,
    pub alertname: String,
    pub fingerprint: String,
    /// `first`, `retry` or `duplicate`.
    pub outcome: String,
}

/// What [`Store::claim_rollback`] decided for one delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum RollbackClaim {
    /// The first delivery: recorded as `requested`; the caller triggers the rollback.
    First(RollbackRequestRecord),
    /// A delivery after a transient failure: back to `requested`; the caller triggers it
    /// again.
    Retry(RollbackRequestRecord),
    /// Already requested: counted, nothing to do.
    Duplicate(RollbackRequestRecord),
}

fn record(r: &Row) -> Result<RollbackRequestRecord, sqlx::Error> {
    Ok(RollbackRequestRecord {
        deployment_id: r.uuid("deployment_id")?,
        target: r.text("target")?,
        state: r.parsed("state")?,
        alert: AlertEvidence {
            alertname: r.text("alertname")?,
            fingerprint: r.text("fingerprint")?,
            labels: r.json("labels")?,
            annotations: r.json("annotations")?,
            starts_at: r.opt_ts("starts_at")?,
        },
        message: r.text("message")?,
        attempts: r.i64("attempts")?,
        deliveries: r.i64("deliveries")?,
        requested_at: r.ts("requested_at")?,
        updated_at: r.ts("updated_at")?,
    })
}

impl Store {
    /// Records one delivery of an alert asking to roll back `target` of deployment `id`
    /// (see [`RollbackClaim`]). The first claim and a retry also append the deployment's
    /// `rollback_requested` event, in the same transaction. Fails with
    /// [`StoreError::NoSuchDeployment`] / [`StoreError::NoSuchTarget`] when the deployment
    /// or its target is not in the store.
    pub async fn claim_rollback(
        &self,
        id: Uuid,
        target: &str,
        alert: &AlertEvidence,
    ) -> Result<RollbackClaim, StoreError> {
        const DOING: &str = "recording a rollback request";
        let err = self.db(DOING);
        let now = db::now();
        let mut tx = self.begin(DOING).await?;
        let member = tx
            .fetch_optional(
                "SELECT 1 AS found FROM belay_controller.deployment_targets
                 WHERE deployment_id = $1 AND target = $2",
                &[Val::Uuid(id), Val::Text(target)],
            )
            .await
            .map_err(&err)?;
        if member.is_none() {
            let exists = tx
                .fetch_optional(
                    "SELECT 1 AS found FROM belay_controller.deployments WHERE id = $1",
                    &[Val::Uuid(id)],
                )
                .await
                .map_err(&err)?;
            return Err(match exists {
                None => StoreError::NoSuchDeployment(id),
                Some(_) => StoreError::NoSuchTarget {
                    id,
                    target: target.to_string(),
                },
            });
        }
        // Insert-or-nothing decides the race: on PostgreSQL a second transaction inserting
        // the same key waits for the first to commit, then inserts nothing.
        let inserted = tx
            .execute(
                "INSERT INTO belay_controller.rollback_requests
                     (deployment_id, target, state, alertname, fingerprint, labels, annotations,
                      starts_at, message, attempts, deliveries, requested_at, updated_at)
                 VALUES ($1, $2, 'requested', $3, $4, $5, $6, $7, '', 1, 1, $8, $8)
                 ON CONFLICT (deployment_id, target) DO NOTHING",
                &[
                    Val::Uuid(id),
                    Val::Text(target),
                    Val::Text(&alert.alertname),
                    Val::Text(&alert.fingerprint),
                    Val::Json(&alert.labels),
                    Val::Json(&alert.annotations),
                    Val::OptTs(alert.starts_at.map(db::micros)),
                    Val::Ts(now),
                ],
            )
            .await
            .map_err(&err)?;
        let (outcome, n) = if inserted == 1 {
            ("first", 1)
        } else {
            // The UPDATE locks the row, so the state read is the one this delivery acts on.
            let row = tx
                .fetch_optional(
                    "UPDATE belay_controller.rollback_requests
                     SET deliveries = deliveries + 1, updated_at = $3
                     WHERE deployment_id = $1 AND target = $2
                     RETURNING state, deliveries",
                    &[Val::Uuid(id), Val::Text(target), Val::Ts(now)],
                )
                .await
                .map_err(&err)?
                .ok_or_else(|| StoreError::NoSuchTarget {
                    id,
                    target: target.to_string(),
                })?;
            let state: RollbackRequestState = row.parsed("state").map_err(&err)?;
            let n = row.i64("deliveries").map_err(&err)?;
            if state == RollbackRequestState::Failed {
                tx.execute(
                    "UPDATE belay_controller.rollback_requests
                     SET state = 'requested', message = '', attempts = attempts + 1,
                         alertname = $3, fingerprint = $4, labels = $5, annotations = $6,
                         starts_at = $7
                     WHERE deployment_id = $1 AND target = $2",
                    &[
                        Val::Uuid(id),
                        Val::Text(target),
                        Val::Text(&alert.alertname),
                        Val::Text(&alert.fingerprint),
                        Val::Json(&alert.labels),
                        Val::Json(&alert.annotations),
                        Val::OptTs(alert.starts_at.map(db::micros)),
                    ],
                )
                .await
                .map_err(&err)?;
                ("retry", n)
            } else {
                ("duplicate", n)
            }
        };
        tx.execute(
            "INSERT INTO belay_controller.rollback_request_deliveries
                 (deployment_id, target, n, at, alertname, fingerprint, outcome)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                Val::Uuid(id),
                Val::Text(target),
                Val::I64(n),
                Val::Ts(now),
                Val::Text(&alert.alertname),
                Val::Text(&alert.fingerprint),
                Val::Text(outcome),
            ],
        )
        .await
        .map_err(&err)?;
        if outcome != "duplicate" {
            let again = if outcome == "retry" { " again" } else { "" };
            let event = NewEvent {
                deployment_id: id,
                target: Some(target.to_string()),
                kind: "rollback_requested".into(),
                message: format!(
                    "rollback requested{again} by alert {} ({})",
                    alert.alertname, alert.fingerprint
                ),
                payload: serde_json::json!({ "alert": alert, "delivery": n }),
            };
            self.append_in(&mut tx, &event, now).await?;
        }
        let row = tx
            .fetch_optional(
                "SELECT deployment_id, target, state, alertname, fingerprint, labels, annotations,
                     starts_at, message, attempts, deliveries, requested_at, updated_at
                 FROM belay_controller.rollback_requests WHERE deployment_id = $1 AND target = $2",
                &[Val::Uuid(id), Val::Text(target)],
            )
            .await
            .map_err(&err)?
            .ok_or_else(|| StoreError::NoSuchTarget {
                id,
                target: target.to_string(),
            })?;
        let rec = record(&row).map_err(&err)?;
        tx.commit().await.map_err(&err)?;
        Ok(match outcome {
            "first" => RollbackClaim::First(rec),
            "retry" => RollbackClaim::Retry(rec),
            _ => RollbackClaim::Duplicate(rec),
        })
    }

    /// Records how triggering a claimed request went: `started`, `failed` (transient,
    /// retried by the next delivery), `refused` or `unavailable`, with `message` saying
    /// why. A request not `requested` is left alone (returns `false`): only the claimer
    /// settles it.
    pub async fn settle_rollback(
        &self,
        id: Uuid,
        target: &str,
        state: RollbackRequestState,
        message: &str,
    ) -> Result<bool, StoreError> {
        if state == RollbackRequestState::Requested {
            return Err(StoreError::Invalid {
                what: "rollback request",
                reason: "a request is settled to started, failed, refused or unavailable".into(),
            });
        }
        let n = self
            .pool
            .execute(
                "UPDATE belay_controller.rollback_requests
                 SET state = $3, message = $4, updated_at = $5
                 WHERE deployment_id = $1 AND target = $2 AND state = 'requested'",
                &[
                    Val::Uuid(id),
                    Val::Text(target),
                    Val::Text(state.as_str()),
                    Val::Text(message),
                    Val::Ts(db::now()),
                ],
            )
            .await
            .map_err(self.db("settling a rollback request"))?;
        Ok(n > 0)
    }

    /// Marks every `requested` request `failed` with `reason`: on start-up, a request
    /// still `requested` was being triggered when the previous controller process stopped,
    /// and nobody will settle it; as `failed`, the next delivery of its alert triggers it
    /// again (the trigger refuses a rollback that is already running). Returns how many.
    pub async fn interrupt_rollback_requests(&self, reason: &str) -> Result<u64, StoreError> {
        self.pool
            .execute(
                "UPDATE belay_controller.rollback_requests
                 SET state = 'failed', message = $1, updated_at = $2
                 WHERE state = 'requested'",
                &[Val::Text(reason), Val::Ts(db::now())],
            )
            .await
            .map_err(self.db("settling interrupted rollback requests"))
    }

    /// The rollback requests of deployment `id`, by target.
    pub async fn rollback_requests(
        &self,
        id: Uuid,
    ) -> Result<Vec<RollbackRequestRecord>, StoreError> {
        let err = self.db("reading rollback requests");
        let rows = self
            .pool
            .fetch_all(
                "SELECT deployment_id, target, state, alertname, fingerprint, labels, annotations,
                     starts_at, message, attempts, deliveries, requested_at, updated_at
                 FROM belay_controller.rollback_requests WHERE deployment_id = $1 ORDER BY target",
                &[Val::Uuid(id)],
            )
            .await
            .map_err(&err)?;
        rows.iter()
            .map(record)
            .collect::<Result<_, _>>()
            .map_err(&err)
    }

    /// Every rollback request, newest first (`limit ≤ 0`: none).
    pub async fn all_rollback_requests(
        &self,
        limit: i64,
    ) -> Result<Vec<RollbackRequestRecord>, StoreError> {
        let err = self.db("listing rollback requests");
        let rows = self
            .pool
            .fetch_all(
                "SELECT deployment_id, target, state, alertname, fingerprint, labels, annotations,
                     starts_at, message, attempts, deliveries, requested_at, updated_at
                 FROM belay_controller.rollback_requests
                 ORDER BY requested_at DESC, deployment_id, target LIMIT $1",
                &[Val::I64(limit.max(0))],
            )
            .await
            .map_err(&err)?;
        rows.iter()
            .map(record)
            .collect::<Result<_, _>>()
            .map_err(&err)
    }

    /// Every delivery that named the request of (`id`, `target`), in order.
    pub async fn rollback_deliveries(
        &self,
        id: Uuid,
        target: &str,
    ) -> Result<Vec<RollbackDelivery>, StoreError> {
        let err = self.db("reading rollback request deliveries");
        let rows = self
            .pool
            .fetch_all(
                "SELECT n, at, alertname, fingerprint, outcome
                 FROM belay_controller.rollback_request_deliveries
                 WHERE deployment_id = $1 AND target = $2 ORDER BY n",
                &[Val::Uuid(id), Val::Text(target)],
            )
            .await
            .map_err(&err)?;
        rows.iter()
            .map(|r| {
                Ok(RollbackDelivery {
                    n: r.i64("n")?,
                    at: r.ts("at")?,
                    alertname: r.text("alertname")?,
                    fingerprint: r.text("fingerprint")?,
                    outcome: r.text("outcome")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(&err)
    }

    /// Deployment ids starting with `prefix` (lower-case hex digits and hyphens only,
    /// else [`StoreError::Invalid`]), at most `limit`, in id order.
    pub async fn deployment_ids_with_prefix(
        &self,
        prefix: &str,
        limit: i64,
    ) -> Result<Vec<Uuid>, StoreError> {
        let prefix = prefix.to_ascii_lowercase();
        if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(StoreError::Invalid {
                what: "deployment id prefix",
                reason: format!(
                    "{prefix:?} is not the start of a deployment id (hex digits and hyphens)"
                ),
            });
        }
        // Checked above: no LIKE wildcard can be in the pattern.
        let pattern = format!("{prefix}%");
        let err = self.db("finding deployments by id prefix");
        let rows = self
            .pool
            .fetch_all(
                "SELECT id FROM belay_controller.deployments
                 WHERE CAST(id AS TEXT) LIKE $1 ORDER BY id LIMIT $2",
                &[Val::Text(&pattern), Val::I64(limit.max(0))],
            )
            .await
            .map_err(&err)?;
        rows.iter()
            .map(|r| r.uuid("id"))
            .collect::<Result<_, _>>()
            .map_err(&err)
    }

    /// The newest deployment (by creation) that includes `target`, if any.
    pub async fn latest_deployment_of(
        &self,
        target: &str,
    ) -> Result<Option<DeploymentRecord>, StoreError> {
        let row = self
            .pool
            .fetch_optional(
                "SELECT d.id FROM belay_controller.deployments d
                 JOIN belay_controller.deployment_targets t ON t.deployment_id = d.id
                 WHERE t.target = $1 ORDER BY d.created_at DESC, d.id DESC LIMIT 1",
                &[Val::Text(target)],
            )
            .await
            .map_err(self.db("finding a target's latest deployment"))?;
        match row {
            None => Ok(None),
            Some(r) => {
                let id = r
                    .uuid("id")
                    .map_err(self.db("finding a target's latest deployment"))?;
                self.deployment(id).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip() {
        for s in RollbackRequestState::ALL {
            assert_eq!(s.as_str().parse::<RollbackRequestState>(), Ok(s));
        }
        assert!("done".parse::<RollbackRequestState>().is_err());
    }
}
