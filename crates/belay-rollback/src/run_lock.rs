//! "Is this rollback still running somewhere?" across processes: a session advisory lock
//! per deployment on the target database, held for the rollback's whole run. It dies with
//! the session — with the process, however it ends (kill -9 included) — so a restarted
//! agent, a second agent or a local `belay` can tell an interrupted rollback (lock free)
//! from one running elsewhere (lock held), and two `execute`s of one deployment never both
//! run.

use belay_core::{ApiError, DatabaseUrl, ErrorKind};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

/// First key of the lock ("brlb"); the second is the hash of the deployment id.
const LOCK_CLASS: i32 = 0x6272_6c62;

/// Shown in `pg_stat_activity` for the session holding the lock.
pub const APPLICATION_NAME: &str = "belay-rollback";

/// A held lock: released when dropped (its session closes).
pub trait Held: Send + Sync {}

/// Takes the run lock of a target's deployments.
#[async_trait::async_trait]
pub trait RunLock: Send + Sync {
    /// Takes the lock of every deployment in `ids` without waiting: `Ok(Err(why))` when
    /// another session holds one of them, `why` naming it.
    async fn try_acquire(
        &self,
        target: &str,
        ids: &[Uuid],
    ) -> Result<Result<Box<dyn Held>, String>, ApiError>;

    /// Whether another session holds deployment `id`'s lock now, and who.
    async fn holder(&self, target: &str, id: Uuid) -> Result<Option<String>, ApiError>;
}

/// [`RunLock`] on the target database at a URL.
#[derive(Debug, Clone)]
pub struct PgRunLock {
    url: DatabaseUrl,
}

impl PgRunLock {
    pub fn new(url: DatabaseUrl) -> Self {
        PgRunLock { url }
    }

    async fn connect(&self, target: &str) -> Result<PgConnection, ApiError> {
        let mut conn = PgConnection::connect(self.url.expose())
            .await
            .map_err(|e| unavailable(target, "connecting for the rollback's run lock", e))?;
        belay_core::send_without_delay();
        sqlx::query("SELECT set_config('application_name', $1, false)")
            .bind(APPLICATION_NAME)
            .execute(&mut conn)
            .await
            .map_err(|e| unavailable(target, "naming the run lock's session", e))?;
        Ok(conn)
    }
}

/// The session is the lock: kept open until dropped.
struct PgHeld {
    _session: PgConnection,
}

impl Held for PgHeld {}

fn unavailable(target: &str, what: &str, e: sqlx::Error) -> ApiError {
    ApiError::new(
        ErrorKind::Unavailable,
        belay_core::redact_url(&format!("{what} on {target:?}: {e}")),
    )
}

#[async_trait::async_trait]
impl RunLock for PgRunLock {
    async fn try_acquire(
        &self,
        target: &str,
        ids: &[Uuid],
    ) -> Result<Result<Box<dyn Held>, String>, ApiError> {
        let mut conn = self.connect(target).await?;
        for id in ids {
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
                .bind(LOCK_CLASS)
                .bind(id.to_string())
                .fetch_one(&mut conn)
                .await
                .map_err(|e| unavailable(target, "taking the rollback's run lock", e))?;
            if !got {
                let who = describe_holder(&mut conn, *id)
                    .await
                    .map_err(|e| unavailable(target, "finding the rollback's runner", e))?;
                // Closing the session releases the locks taken so far.
                let _ = conn.close().await;
                return Ok(Err(format!(
                    "deployment {id}'s rollback is running in another process ({}): it holds the rollback's lock on the database",
                    who.unwrap_or_else(|| "a session belay cannot see".into())
                )));
            }
        }
        Ok(Ok(Box::new(PgHeld { _session: conn })))
    }

    async fn holder(&self, target: &str, id: Uuid) -> Result<Option<String>, ApiError> {
        let mut conn = self.connect(target).await?;
        let who = describe_holder(&mut conn, id)
            .await
            .map_err(|e| unavailable(target, "finding the rollback's runner", e))?;
        let _ = conn.close().await;
        Ok(who)
    }
}

/// The session holding deployment `id`'s lock, described (`pid N (app), since T`).
async fn describe_holder(conn: &mut PgConnection, id: Uuid) -> Result<Option<String>, sqlx::Error> {
    let holder: Option<(i32, String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT a.pid, coalesce(a.application_name, ''), a.backend_start \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND l.classid = $1::int4::oid AND l.objid = hashtext($2)::oid \
           AND l.pid <> pg_backend_pid()",
    )
    .bind(LOCK_CLASS)
    .bind(id.to_string())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(holder.map(|(pid, app, since)| {
        format!(
            "pid {pid}{}, since {}",
            if app.is_empty() {
                String::new()
            } else {
                format!(" ({app})")
            },
            since.format("%Y-%m-%d %H:%M:%S UTC")
        )
    }))
}
