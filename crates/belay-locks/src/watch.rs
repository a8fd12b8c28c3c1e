use std::time::Duration;

use belay_core::DatabaseUrl;
use sqlx::{Connection, PgConnection};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;

use crate::model::{LockSnapshot, SnapshotOptions};
use crate::{LocksError, snapshot};

/// `application_name` of belay's monitoring sessions, so they are easy to tell apart in
/// `pg_stat_activity`.
pub const MONITOR_APPLICATION: &str = "belay-locks";

pub(crate) async fn connect(url: &DatabaseUrl, app: &str) -> Result<PgConnection, LocksError> {
    use std::str::FromStr;
    let opts = sqlx::postgres::PgConnectOptions::from_str(url.expose())
        .map_err(|source| LocksError::Connect {
            url: url.redacted().to_string(),
            source,
        })?
        .application_name(app);
    PgConnection::connect_with(&opts)
        .await
        .map_err(|source| LocksError::Connect {
            url: url.redacted().to_string(),
            source,
        })
}

/// Samples every `period` on one long-lived connection and yields each snapshot.
///
/// The first sample is taken at once. A failed sample is yielded as an error and the
/// stream goes on; after a connection failure the next tick reconnects. Ticks missed
/// because a sample was slow are skipped, not bunched. The stream ends when dropped.
pub fn watch(
    url: DatabaseUrl,
    period: Duration,
    opts: SnapshotOptions,
) -> impl Stream<Item = Result<LockSnapshot, LocksError>> + Send + 'static {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut conn: Option<PgConnection> = None;
        let mut tick = tokio::time::interval(period.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = tx.closed() => break,
            }
            let result = match conn.as_mut() {
                Some(c) => snapshot(c, &opts).await,
                None => match connect(&url, MONITOR_APPLICATION).await {
                    Ok(mut c) => {
                        let r = snapshot(&mut c, &opts).await;
                        conn = Some(c);
                        r
                    }
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = &result
                && e.is_connection()
            {
                conn = None;
            }
            if tx.send(result).await.is_err() {
                break;
            }
        }
        if let Some(c) = conn {
            let _ = c.close().await;
        }
    });
    ReceiverStream::new(rx)
}
