//! The backup catalog mirror: each target's backups as the controller last saw them
//! through the agent that owns the target. The agent's catalog is the truth; the mirror
//! answers "which backup precedes deployment D" when the agent is not asked (a rollback
//! deciding what to restore, a listing while the agent is down) and lets retention
//! through the controller protect the backups of unfinished deployments.

use crate::db::{self, Row, Val};
use crate::{Store, StoreError};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// One mirrored backup.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupRecord {
    pub target: String,
    pub id: String,
    pub created_at: DateTime<Utc>,
    /// `custom` | `directory`.
    pub format: String,
    /// `full` | `schema_only` | `tables`.
    pub scope: String,
    pub verified: bool,
    pub size: u64,
    /// The deployment this backup was taken before.
    pub deployment_id: Option<Uuid>,
    /// The catalog entry as JSON (label, files with sha256, verified_at, ...).
    pub manifest: serde_json::Value,
    /// When the controller last wrote this row (set by the store).
    pub mirrored_at: DateTime<Utc>,
}

const UPSERT: &str = "INSERT INTO belay_controller.backups
        (target, id, created_at, format, scope, verified, size, deployment_id, manifest, mirrored_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
     ON CONFLICT (target, id) DO UPDATE SET created_at = excluded.created_at,
         format = excluded.format, scope = excluded.scope, verified = excluded.verified,
         size = excluded.size, deployment_id = excluded.deployment_id,
         manifest = excluded.manifest, mirrored_at = excluded.mirrored_at";

fn size_i64(r: &BackupRecord) -> Result<i64, StoreError> {
    i64::try_from(r.size).map_err(|_| StoreError::Invalid {
        what: "backup record",
        reason: format!(
            "backup {} of {} has an impossible size {}",
            r.id, r.target, r.size
        ),
    })
}

fn check(r: &BackupRecord) -> Result<(), StoreError> {
    if r.target.trim().is_empty() || r.id.trim().is_empty() {
        return Err(StoreError::Invalid {
            what: "backup record",
            reason: "a backup record needs a target and an id".into(),
        });
    }
    if !r.manifest.is_object() {
        return Err(StoreError::Invalid {
            what: "backup record",
            reason: format!("the manifest of backup {} is not a JSON object", r.id),
        });
    }
    Ok(())
}

fn record(r: &Row) -> Result<BackupRecord, sqlx::Error> {
    Ok(BackupRecord {
        target: r.text("target")?,
        id: r.text("id")?,
        created_at: r.ts("created_at")?,
        format: r.text("format")?,
        scope: r.text("scope")?,
        verified: r.bool("verified")?,
        size: u64::try_from(r.i64("size")?).unwrap_or(0),
        deployment_id: r.opt_uuid("deployment_id")?,
        manifest: r.json("manifest")?,
        mirrored_at: r.ts("mirrored_at")?,
    })
}

impl Store {
    /// Replaces the mirror of `target` with `records` (a full listing from its agent):
    /// backups no longer in the catalog disappear from the mirror too.
    pub async fn mirror_backups(
        &self,
        target: &str,
        records: &[BackupRecord],
    ) -> Result<(), StoreError> {
        const DOING: &str = "mirroring a backup catalog";
        if let Some(other) = records.iter().find(|r| r.target != target) {
            return Err(StoreError::Invalid {
                what: "backup record",
                reason: format!(
                    "backup {} belongs to {}, not {target}",
                    other.id, other.target
                ),
            });
        }
        let err = self.db(DOING);
        let now = db::now();
        let mut tx = self.begin(DOING).await?;
        tx.execute(
            "DELETE FROM belay_controller.backups WHERE target = $1",
            &[Val::Text(target)],
        )
        .await
        .map_err(&err)?;
        for r in records {
            check(r)?;
            tx.execute(UPSERT, &values(r, size_i64(r)?, now))
                .await
                .map_err(&err)?;
        }
        tx.commit().await.map_err(&err)
    }

    /// Adds or updates one mirrored backup (after a create, a verify, a snapshot).
    pub async fn upsert_backup(&self, r: &BackupRecord) -> Result<(), StoreError> {
        check(r)?;
        self.pool
            .execute(UPSERT, &values(r, size_i64(r)?, db::now()))
            .await
            .map_err(self.db("mirroring a backup"))?;
        Ok(())
    }

    /// Removes backups the agent deleted (prune).
    pub async fn delete_backups(&self, target: &str, ids: &[String]) -> Result<(), StoreError> {
        const DOING: &str = "removing pruned backups from the mirror";
        let err = self.db(DOING);
        let mut tx = self.begin(DOING).await?;
        for id in ids {
            tx.execute(
                "DELETE FROM belay_controller.backups WHERE target = $1 AND id = $2",
                &[Val::Text(target), Val::Text(id)],
            )
            .await
            .map_err(&err)?;
        }
        tx.commit().await.map_err(&err)
    }

    /// The mirrored backups of `target`, newest first.
    pub async fn backups(&self, target: &str) -> Result<Vec<BackupRecord>, StoreError> {
        let err = self.db("listing mirrored backups");
        let rows = self
            .pool
            .fetch_all(
                "SELECT target, id, created_at, format, scope, verified, size, deployment_id,
                     manifest, mirrored_at
                 FROM belay_controller.backups WHERE target = $1
                 ORDER BY created_at DESC, id DESC",
                &[Val::Text(target)],
            )
            .await
            .map_err(&err)?;
        rows.iter()
            .map(record)
            .collect::<Result<_, _>>()
            .map_err(&err)
    }

    /// The backups taken before deployment `id` (one per target it reached, normally),
    /// by target: what a rollback of that deployment restores.
    pub async fn backups_before(&self, id: Uuid) -> Result<Vec<BackupRecord>, StoreError> {
        let err = self.db("finding a deployment's backups");
        let rows = self
            .pool
            .fetch_all(
                "SELECT target, id, created_at, format, scope, verified, size, deployment_id,
                     manifest, mirrored_at
                 FROM belay_controller.backups WHERE deployment_id = $1
                 ORDER BY target, created_at DESC, id DESC",
                &[Val::Uuid(id)],
            )
            .await
            .map_err(&err)?;
        rows.iter()
            .map(record)
            .collect::<Result<_, _>>()
            .map_err(&err)
    }
}

fn values<'a>(r: &'a BackupRecord, size: i64, now: DateTime<Utc>) -> [Val<'a>; 10] {
    [
        Val::Text(&r.target),
        Val::Text(&r.id),
        Val::Ts(db::micros(r.created_at)),
        Val::Text(&r.format),
        Val::Text(&r.scope),
        Val::Bool(r.verified),
        Val::I64(size),
        Val::OptUuid(r.deployment_id),
        Val::Json(&r.manifest),
        Val::Ts(now),
    ]
}
