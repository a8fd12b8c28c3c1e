use std::collections::HashSet;
use std::time::Duration;

use belay_core::DatabaseUrl;
use sqlx::{Connection, PgConnection};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;

use crate::LocksError;
use crate::guard::GUARD_APPLICATION;
use crate::model::{LockSnapshot, SnapshotOptions};
use crate::sample::{SAMPLE_SESSION_SETTINGS, snapshot_on_own_session};

/// `application_name` of belay's monitoring sessions, so they are easy to tell apart in
/// `pg_stat_activity`.
pub const MONITOR_APPLICATION: &str = "belay-locks";

/// How often a watch looks for a new lock wait between its samples. A chain is reported
/// at most this long (plus one sample) after it forms, whatever the watch's period: the
/// issue's bound is 60 ms, and a probe is one read of the backends' status array, cheap
/// enough for 50 a second (`cargo xtask bench locks` measures what it costs pgbench).
pub const PROBE_PERIOD: Duration = Duration::from_millis(20);

/// The probe: who waits for a heavyweight lock now, and whether a belay run is on the
/// server (its guard's session, announcing a pending DDL or not). `pg_stat_get_activity`
/// straight, not the `pg_stat_activity` view: no join with `pg_database`/`pg_authid`, so no
/// catalog is opened or locked, and not `pg_locks`, whose read takes the lock manager's
/// partition locks. A wait is keyed by its statement's start, so a new wait of the same
/// session is new too; row-level waits (`transactionid`, `tuple`) are keyed apart (`x`),
/// see [`worth_a_sample`].
const PROBE_SQL: &str = r#"
SELECT pid, CASE WHEN application_name LIKE 'belay-lock-guard%' THEN application_name
                 WHEN wait_event IN ('transactionid', 'tuple')
                 THEN 'x' || (extract(epoch FROM query_start) * 1000000)::bigint
                 ELSE 'w' || (extract(epoch FROM query_start) * 1000000)::bigint END
FROM pg_stat_get_activity(NULL)
WHERE (wait_event_type = 'Lock' OR application_name LIKE 'belay-lock-guard%')
  AND pid <> pg_backend_pid()
"#;

type ProbeKeys = HashSet<(i32, String)>;

pub(crate) async fn connect(url: &DatabaseUrl, app: &str) -> Result<PgConnection, LocksError> {
    use std::str::FromStr;
    let opts = sqlx::postgres::PgConnectOptions::from_str(url.expose())
        .map_err(|source| LocksError::Connect {
            url: url.redacted().to_string(),
            source,
        })?
        .application_name(app);
    let conn = PgConnection::connect_with(&opts)
        .await
        .map_err(|source| LocksError::Connect {
            url: url.redacted().to_string(),
            source,
        })?;
    belay_core::send_without_delay();
    Ok(conn)
}

/// The watch's own session: the sample's timeouts set once for the session, so a sample
/// is one round trip instead of a transaction of five.
async fn watch_session(url: &DatabaseUrl) -> Result<PgConnection, LocksError> {
    let mut conn = connect(url, MONITOR_APPLICATION).await?;
    sqlx::raw_sql(SAMPLE_SESSION_SETTINGS)
        .execute(&mut conn)
        .await
        .map_err(LocksError::query("session settings"))?;
    Ok(conn)
}

async fn probe(conn: &mut PgConnection) -> Result<ProbeKeys, LocksError> {
    let rows: Vec<(i32, Option<String>)> = sqlx::query_as(PROBE_SQL)
        .fetch_all(conn)
        .await
        .map_err(LocksError::query("probe"))?;
    Ok(worth_a_sample(
        rows.into_iter()
            .map(|(pid, key)| (pid, key.unwrap_or_default()))
            .collect(),
    ))
}

/// The probe's findings that call for a sample at once when new. Waits for a row lock are
/// an OLTP application's everyday contention (pgbench's writers queue on one branch row
/// all the time): sampling at each would sample every probe period and cost the
/// application throughput, so without a belay run on the server they wait for the next
/// periodic sample. The waits DDL queues are made of (`relation`, `object`, `virtualxid`,
/// …) always count, and while a belay run's guard is connected every wait counts, since a
/// migration's own row locks can queue the application too.
fn worth_a_sample(mut keys: ProbeKeys) -> ProbeKeys {
    let run = keys.iter().any(|(_, k)| k.starts_with(GUARD_APPLICATION));
    if !run {
        keys.retain(|(_, k)| !k.starts_with('x'));
    }
    keys
}

/// A probe, then a sample: what the next probes are compared with. A wait that begins
/// between the two is in the sample and counts once more as new (one extra sample).
async fn probe_and_sample(
    conn: &mut PgConnection,
    opts: &SnapshotOptions,
) -> Result<(ProbeKeys, LockSnapshot), LocksError> {
    let keys = probe(conn).await?;
    let snap = snapshot_on_own_session(conn, opts).await?;
    Ok((keys, snap))
}

/// Samples every `period` on one long-lived connection and yields each snapshot; between
/// samples, probes every [`PROBE_PERIOD`] and samples at once when a session has begun to
/// wait for a lock (or a belay guard to announce a pending DDL) since the last look, so a
/// new chain is reported within a probe period whatever `period` is.
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
        let period = period.max(Duration::from_millis(10));
        let mut conn: Option<PgConnection> = None;
        // The waits seen by the last look; `None` until a look succeeds.
        let mut known: Option<ProbeKeys> = None;
        let mut next_sample = Instant::now();
        loop {
            let now = Instant::now();
            let probing = known.is_some() && conn.is_some() && period > PROBE_PERIOD;
            let wake = if probing {
                next_sample.min(now + PROBE_PERIOD)
            } else {
                next_sample
            };
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                () = tx.closed() => break,
            }
            let due = Instant::now() >= next_sample;
            // A probe that found something new has just looked: the sample follows at once.
            let mut looked = false;
            if !due {
                let Some(c) = conn.as_mut() else { continue };
                match probe(c).await {
                    Ok(keys) => {
                        let new = known.as_ref().is_none_or(|k| !keys.is_subset(k));
                        known = Some(keys);
                        if !new {
                            continue;
                        }
                        looked = true;
                    }
                    // Said by the sample taken now, which reconnects if it must.
                    Err(e) => {
                        if e.is_connection() {
                            conn = None;
                        }
                    }
                }
            } else {
                // Missed ticks are skipped, not bunched.
                next_sample += period;
                if next_sample < Instant::now() {
                    next_sample = Instant::now() + period;
                }
            }
            let result = match conn.as_mut() {
                Some(c) if looked => snapshot_on_own_session(c, &opts)
                    .await
                    .map(|snap| (known.clone().unwrap_or_default(), snap)),
                Some(c) => probe_and_sample(c, &opts).await,
                None => match watch_session(&url).await {
                    Ok(mut c) => {
                        let r = probe_and_sample(&mut c, &opts).await;
                        conn = Some(c);
                        r
                    }
                    Err(e) => Err(e),
                },
            };
            let result = match result {
                Ok((keys, snap)) => {
                    known = Some(keys);
                    Ok(snap)
                }
                Err(e) => {
                    if e.is_connection() {
                        conn = None;
                    }
                    known = None;
                    Err(e)
                }
            };
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
