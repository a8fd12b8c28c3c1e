//! A controller that stopped while an agent ran a rollback routed through it: the agent
//! ran on without it, so once the agent registers again the controller takes the outcome
//! from the agent's record (the steps it missed, the incident report, the end).

use crate::{Fleet, store_err};
use belay_core::ApiError;
use belay_deploy::DeployEvent;
use belay_rollback::RollbackApi;
use belay_rpc::RollbackClient;
use belay_store::DeploymentState;
use tracing::{Instrument, info_span, warn};
use uuid::Uuid;

/// How long a restarted controller keeps asking (a heartbeat apart) an agent that does
/// not answer yet about a rollback it was recording, before leaving it to the agent's
/// next registration.
const RECONCILE_FOR: std::time::Duration = std::time::Duration::from_secs(300);

impl Fleet {
    /// Settles, once their agents answer, the targets among `targets` whose rollback this
    /// controller was recording when it stopped (their step on record is still
    /// `rolling_back`): the agent ran the rollback on without it, so its record beside the
    /// target says how it went. Waits while the agent still runs it; records the steps
    /// the controller missed, the incident report, and the end (`rolled_back`,
    /// `escalated`). One left interrupted on the agent stays `rolling_back` here too:
    /// `rollback status` through the controller says what `execute` would do. `None`:
    /// every target (at start-up, when an agent may simply resume its heartbeats with the
    /// restarted controller instead of registering again). One pass per (deployment,
    /// target) at a time, so the start-up pass and a registration's never both record.
    pub(crate) async fn reconcile_rollbacks(
        &self,
        targets: Option<&std::collections::HashSet<String>>,
    ) -> Result<(), ApiError> {
        let deployments = self.store.rolling_back().await.map_err(store_err)?;
        for d in deployments {
            for t in d.targets.iter().filter(|t| {
                t.step == Some(DeploymentState::RollingBack)
                    && targets.is_none_or(|ts| ts.contains(&t.target))
            }) {
                let fleet = self.clone();
                let (id, target) = (d.id, t.target.clone());
                let key = (id, format!("rollback:{target}"));
                let claimed = self
                    .reconciling
                    .lock()
                    .is_ok_and(|mut r| r.insert(key.clone()));
                if !claimed {
                    continue;
                }
                tokio::spawn(
                    async move {
                        // Just after a registration the agent may not answer yet (its
                        // first heartbeat, a connection being set up): try again a few
                        // heartbeats later rather than leave the record rolling back.
                        let give_up = tokio::time::Instant::now() + RECONCILE_FOR;
                        loop {
                            match fleet.reconcile_rollback(id, &target).await {
                                Ok(()) => break,
                                Err(e) if tokio::time::Instant::now() < give_up => {
                                    tracing::debug!(target = %target, error = %e, "cannot reconcile the rollback yet");
                                    tokio::time::sleep(fleet.config.heartbeat_interval).await;
                                }
                                Err(e) => {
                                    warn!(target = %target, error = %e, "gave up reconciling the rollback until its agent registers again");
                                    break;
                                }
                            }
                        }
                        if let Ok(mut r) = fleet.reconciling.lock() {
                            r.remove(&key);
                        }
                    }
                    .instrument(info_span!("reconcile_rollback", deployment = %id)),
                );
            }
        }
        Ok(())
    }

    async fn reconcile_rollback(&self, id: Uuid, target: &str) -> Result<(), ApiError> {
        let status = loop {
            let (conn, _) = self.connection_for(target).await?;
            let s = RollbackClient::new(&conn)
                .status(target, Some(&id.to_string()))
                .await?;
            let elsewhere = s.next.as_deref().is_some_and(|n| n.starts_with("running"));
            if !s.running && !elsewhere {
                break s;
            }
            tokio::time::sleep(self.config.heartbeat_interval).await;
        };
        if status.record.step == belay_deploy::Step::RollingBack {
            // Interrupted on the agent too: nothing ended, nothing to take over.
            return Ok(());
        }
        let stored = self.store.events(id, 0).await.map_err(store_err)?;
        let seen = stored
            .iter()
            .filter(|e| e.target.as_deref() == Some(target))
            .filter_map(|e| e.payload["target_seq"].as_u64())
            .max()
            .unwrap_or(0);
        if stored.iter().any(|e| {
            e.target.as_deref() == Some(target) && e.kind == belay_deploy::KIND_TRANSITION && {
                let to = e.payload["to"].as_str().unwrap_or_default();
                to == "rolled_back" || to == "escalated"
            }
        }) {
            return Ok(());
        }
        let agent = self
            .store
            .target(target)
            .await
            .map_err(store_err)?
            .map(|t| t.agent)
            .unwrap_or_default();
        for e in status.steps.iter().filter(|e| e.seq > seen) {
            self.record_target_event(id, target, e.clone()).await?;
        }
        let at = chrono::Utc::now();
        let event = |kind: &str, step: belay_deploy::Step, message: String, payload| DeployEvent {
            deployment_id: id,
            target: target.to_string(),
            seq: 0,
            at,
            step,
            kind: kind.to_string(),
            message,
            payload,
        };
        if let (Some(report), Some(markdown)) = (&status.report, &status.markdown) {
            self.record_target_event(
                id,
                target,
                event(
                    belay_rollback::KIND_INCIDENT_REPORT,
                    belay_deploy::Step::RollingBack,
                    format!("incident report, from agent {agent}'s record"),
                    serde_json::json!({ "report": report, "markdown": markdown }),
                ),
            )
            .await?;
        }
        let to = status.record.step;
        let reason = format!(
            "reconciled from agent {agent}'s record: the rollback went on without the controller and ended {to}{}",
            status
                .record
                .outcome
                .as_ref()
                .and_then(|o| o.reason.as_deref())
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
        self.record_target_event(
            id,
            target,
            event(
                belay_deploy::KIND_TRANSITION,
                to,
                format!("rolling_back → {to}: {reason}"),
                serde_json::json!({ "from": belay_deploy::Step::RollingBack, "to": to, "reason": reason }),
            ),
        )
        .await
    }
}
