//! Backups through the controller: every call goes to the agent owning the target (its
//! catalog lives beside the database), and what comes back is mirrored into the store, so
//! the controller knows which backup precedes each deployment without asking the agent.
//! Retention through the controller also keeps the backups of deployments the store has
//! not seen finish, on top of what the agent's own history protects.

use crate::Fleet;
use belay_backup::{
    BackupApi, BackupRequest, CatalogEntry, KeepReason, Manifest, ProgressSink, PruneReport,
    PruneRequest, RestoreReport, RestoreRequest, VerifyReport,
};
use belay_core::{ApiError, ErrorKind};
use belay_rpc::BackupClient;
use belay_store::{BackupRecord, DeploymentState};
use std::collections::HashMap;
use std::path::PathBuf;
use tracing::{Instrument, info_span, warn};

/// The mirror row of a catalog entry.
pub(crate) fn mirror_record(e: &CatalogEntry) -> BackupRecord {
    BackupRecord {
        target: e.target.clone(),
        id: e.id.clone(),
        created_at: e.created_at,
        format: e.format.name().to_owned(),
        scope: e.scope.name().to_owned(),
        verified: e.verified,
        size: e.size,
        deployment_id: e.deployment_id,
        manifest: serde_json::to_value(e).unwrap_or_else(|_| serde_json::json!({})),
        mirrored_at: chrono::Utc::now(),
    }
}

/// A deployment whose backups a rollback may still need: anything but a success or a
/// completed rollback (a failed one awaits its rollback; an escalated one, a human).
fn needs_its_backup(state: DeploymentState) -> bool {
    !matches!(
        state,
        DeploymentState::Succeeded | DeploymentState::RolledBack
    )
}

impl Fleet {
    async fn backup_client(&self, target: &str) -> Result<BackupClient, ApiError> {
        let (conn, _) = self.connection_for(target).await?;
        Ok(BackupClient::new(&conn))
    }

    /// The mirror is a convenience for the controller, never a reason to fail a backup
    /// the agent took: a store error is logged, and the next listing repairs it.
    async fn mirror_entry(&self, e: &CatalogEntry) {
        if let Err(err) = self.store().upsert_backup(&mirror_record(e)).await {
            warn!(target = %e.target, id = %e.id, error = %err, "could not mirror a backup");
        }
    }

    async fn mirror_listing(&self, target: &str, entries: &[CatalogEntry]) {
        let records: Vec<BackupRecord> = entries.iter().map(mirror_record).collect();
        if let Err(err) = self.store().mirror_backups(target, &records).await {
            warn!(target, error = %err, "could not mirror the backup catalog");
        }
    }

    /// Lists through the agent and refreshes the mirror.
    async fn refresh(&self, target: &str) -> Result<Vec<CatalogEntry>, ApiError> {
        let entries = self.backup_client(target).await?.list(target).await?;
        self.mirror_listing(target, &entries).await;
        Ok(entries)
    }

    /// Refreshes the mirror of `target` from its agent (after a run or a restore took a
    /// backup); a failure is logged, and the next listing repairs the mirror.
    pub(crate) async fn mirror_catalog(&self, target: &str) {
        if let Err(err) = self.refresh(target).await {
            warn!(target, error = %err, "could not refresh the backup mirror after a run");
        }
    }

    /// Backups in `entries` whose deployment the store has not seen finish, with why.
    async fn protected_by_store(&self, entries: &[CatalogEntry]) -> Vec<(String, String)> {
        // Per deployment: why its backups are kept, or `None` when they need not be.
        let mut notes: HashMap<uuid::Uuid, Option<String>> = HashMap::new();
        let mut out = Vec::new();
        for e in entries {
            let Some(d) = e.deployment_id else { continue };
            let note = match notes.get(&d) {
                Some(n) => n.clone(),
                None => {
                    let n = match self.store().deployment(d).await {
                        Ok(Some(rec)) if needs_its_backup(rec.state) => Some(format!(
                            "deployment {d} is {} in the controller; a rollback may need this backup",
                            rec.state.as_str()
                        )),
                        // Settled, or a run the controller did not drive (the agent's
                        // history speaks for those).
                        Ok(_) => None,
                        // Deleting blind is the mistake retention must not make.
                        Err(err) => {
                            warn!(deployment = %d, error = %err, "cannot read a deployment; keeping its backup");
                            Some(format!(
                                "the controller cannot read deployment {d} ({err}); kept to be safe"
                            ))
                        }
                    };
                    notes.insert(d, n.clone());
                    n
                }
            };
            if let Some(note) = note {
                out.push((e.id.clone(), note));
            }
        }
        out
    }

    /// What the controller last saw of `target`'s backups, for an error saying the agent
    /// cannot be asked.
    async fn mirror_summary(&self, target: &str) -> Option<String> {
        let records = self.store().backups(target).await.ok()?;
        let newest = records.first()?;
        let seen = records.iter().map(|r| r.mirrored_at).max()?;
        Some(format!(
            "the controller last saw {} backup(s) of {target} (newest {}, {}) as of {}",
            records.len(),
            newest.id,
            if newest.verified {
                "verified"
            } else {
                "not verified"
            },
            seen.format("%Y-%m-%d %H:%M:%S UTC")
        ))
    }
}

#[async_trait::async_trait]
impl BackupApi for Fleet {
    async fn create(
        &self,
        target: &str,
        req: &BackupRequest,
        progress: ProgressSink,
    ) -> Result<Manifest, ApiError> {
        async {
            let m = self
                .backup_client(target)
                .await?
                .create(target, req, progress)
                .await?;
            self.mirror_entry(&CatalogEntry::from_manifest(m.clone(), PathBuf::new()))
                .await;
            Ok(m)
        }
        .instrument(info_span!("backup_create", target))
        .await
    }

    async fn list(&self, target: &str) -> Result<Vec<CatalogEntry>, ApiError> {
        match self
            .refresh(target)
            .instrument(info_span!("backup_list", target))
            .await
        {
            Err(mut e) if e.kind == ErrorKind::AgentUnreachable => {
                if let Some(summary) = self.mirror_summary(target).await {
                    e.message = format!("{}; {summary}", e.message);
                }
                Err(e)
            }
            other => other,
        }
    }

    async fn verify(
        &self,
        target: &str,
        id: &str,
        restore_test: bool,
    ) -> Result<VerifyReport, ApiError> {
        async {
            let report = self
                .backup_client(target)
                .await?
                .verify(target, id, restore_test)
                .await?;
            let mirrored = self
                .store()
                .backups(target)
                .await
                .ok()
                .and_then(|rs| rs.into_iter().find(|r| r.id == id));
            match mirrored {
                Some(mut r) => {
                    r.verified = report.ok;
                    if let Some(m) = r.manifest.as_object_mut() {
                        m.insert("verified".into(), report.ok.into());
                        m.insert(
                            "verified_at".into(),
                            serde_json::to_value(report.verified_at).unwrap_or_default(),
                        );
                        m.insert(
                            "restore_tested".into(),
                            (report.ok && report.restore_test.is_some()).into(),
                        );
                    }
                    if let Err(err) = self.store().upsert_backup(&r).await {
                        warn!(target, id, error = %err, "could not mirror a verification");
                    }
                }
                // Not mirrored yet (taken before the controller saw it): mirror it all.
                None => self.mirror_catalog(target).await,
            }
            Ok(report)
        }
        .instrument(info_span!("backup_verify", target, id))
        .await
    }

    async fn restore(
        &self,
        target: &str,
        id: &str,
        req: &RestoreRequest,
        progress: ProgressSink,
    ) -> Result<RestoreReport, ApiError> {
        async {
            let report = self
                .backup_client(target)
                .await?
                .restore(target, id, req, progress)
                .await?;
            // The emergency backup is new in the catalog.
            if report.emergency_backup.is_some() {
                self.mirror_catalog(target).await;
            }
            Ok(report)
        }
        .instrument(info_span!("backup_restore", target, id))
        .await
    }

    async fn prune(&self, target: &str, req: &PruneRequest) -> Result<PruneReport, ApiError> {
        async {
            let entries = self.refresh(target).await?;
            let store_notes: HashMap<String, String> = self
                .protected_by_store(&entries)
                .await
                .into_iter()
                .collect();
            let mut request = req.clone();
            for id in store_notes.keys() {
                if !request.protect.contains(id) {
                    request.protect.push(id.clone());
                }
            }
            let mut report = self
                .backup_client(target)
                .await?
                .prune(target, &request)
                .await?;
            // The agent explains what its history protects; the controller what its store does.
            for k in &mut report.kept {
                if k.reason == KeepReason::Protected && k.note.is_none() {
                    k.note = store_notes.get(&k.id).cloned();
                }
            }
            if !report.dry_run {
                let gone: Vec<String> = report.deleted.iter().map(|e| e.id.clone()).collect();
                if let Err(err) = self.store().delete_backups(target, &gone).await {
                    warn!(target, error = %err, "could not remove pruned backups from the mirror");
                }
            }
            Ok(report)
        }
        .instrument(info_span!("backup_prune", target))
        .await
    }

    async fn snapshot_tables(
        &self,
        target: &str,
        tables: &[String],
        reason: &str,
    ) -> Result<Manifest, ApiError> {
        async {
            let m = self
                .backup_client(target)
                .await?
                .snapshot_tables(target, tables, reason)
                .await?;
            self.mirror_entry(&CatalogEntry::from_manifest(m.clone(), PathBuf::new()))
                .await;
            Ok(m)
        }
        .instrument(info_span!("backup_snapshot_tables", target))
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_settled_deployments_release_their_backups() {
        for s in DeploymentState::ALL {
            let released = matches!(s, DeploymentState::Succeeded | DeploymentState::RolledBack);
            assert_eq!(needs_its_backup(s), !released, "{s:?}");
        }
    }
}
