//! [`LockGuardAdapter`]: `belay_migrate::LockGuardHook` over `belay_locks::LockGuard`.

use belay_core::DatabaseUrl;
use belay_locks::{Blocker, LockGuard, LocksError, QueueObserver, SessionInfo, WaitOutcome};
use belay_migrate::{
    ApiError, BlockersGone, ErrorKind, LockGuardHook, LockTrip, LockWatch, SessionBrief, WatchEnd,
};
use sqlx::PgConnection;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tracing::Instrument;

/// The lock guard around a target's migration statements: watches the lock queue behind
/// the migration's session from a session of its own (`belay-lock-guard` in
/// `pg_stat_activity`, needing `pg_monitor` or the migration's own role to see and cancel
/// it), cancels the statement when the application has queued behind it past the budget,
/// and waits out the migration's blockers before the executor retries — with the sessions
/// its last cancel released, which hold the table's lock until their transactions end.
///
/// One connection serves the whole run: handed from one statement's watch to the next
/// (a guard connecting per statement would cost a connection setup per statement), and
/// closed when the run ends (`release`), so no target keeps an idle guard session.
#[derive(Clone)]
pub struct LockGuardAdapter {
    url: DatabaseUrl,
    /// The guard's connection between watches; `None` while a watch holds it, or before
    /// the first.
    idle: Arc<Mutex<Option<PgConnection>>>,
    /// The migration session the last watch was for: what a wait for its blockers
    /// announces.
    migration_pid: Arc<Mutex<Option<i32>>>,
    /// Told what each of the guard's polls sees (the agent's lock gauges).
    observer: Option<Arc<dyn QueueObserver>>,
    /// What the last trip left for [`LockGuardHook::wait_until_gone`] below.
    last_trip: Arc<Mutex<LastTrip>>,
}

/// What the trip of the statement watched last tells the wait after it.
#[derive(Debug, Default)]
struct LastTrip {
    /// The sessions its cancel released (they were queued behind the migration).
    released: Vec<i32>,
    /// The relations its blockers held their locks on: what the retry's wait for a ripe
    /// moment watches.
    relations: Vec<String>,
    /// The budget of the watch it ended.
    budget: Duration,
}

impl std::fmt::Debug for LockGuardAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuardAdapter")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// How long the guard may take to get its session. A healthy server answers in
/// milliseconds; the guard connects before the run's first statement, but after a lost
/// connection it reconnects at a statement, while the migration may hold its locks and the
/// application queues behind them — an unguarded stall this bounds. On timeout or failure
/// the executor runs the rest of the run under `lock_timeout` alone.
pub const GUARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

fn api_error(e: LocksError) -> ApiError {
    let kind = if e.is_connection() {
        ErrorKind::Unavailable
    } else {
        ErrorKind::Internal
    };
    ApiError::new(kind, format!("lock guard: {e}"))
}

/// How often the guard looks at the queue: a fifth of the budget, between 10 ms (the queue
/// query's cost stays negligible) and 100 ms. The guard trips at the last poll before a
/// wait would pass the budget, so a trip comes up to one period early, never late.
fn period_for(max_blocking: Duration) -> Duration {
    (max_blocking / 5).clamp(Duration::from_millis(10), Duration::from_millis(100))
}

fn brief(s: SessionInfo) -> SessionBrief {
    SessionBrief {
        pid: s.pid,
        user: s.user,
        application: s.application,
        client: s.client_addr,
        state: s.state,
        xact_ms: s.xact_ms,
        query: s.query,
        mode: None,
        relation: None,
    }
}

fn brief_of(b: Blocker) -> SessionBrief {
    let mode = match (b.held, b.waiting) {
        (Some(h), _) => Some(h),
        (None, Some(w)) => Some(format!("waiting for {w}")),
        (None, None) => None,
    };
    SessionBrief {
        pid: b.pid,
        user: b.user,
        application: b.application,
        client: b.client_addr,
        state: b.state,
        xact_ms: b.xact_ms,
        query: b.query,
        mode,
        relation: b.relation,
    }
}

/// `pids` described as `pg_stat_activity` shows them now, in their order; a session that
/// has gone, or a failed lookup, leaves just the pid.
async fn describe(conn: Option<&mut PgConnection>, pids: &[i32]) -> Vec<SessionBrief> {
    let mut known = match conn {
        Some(c) => belay_locks::describe_sessions(c, pids)
            .await
            .unwrap_or_default(),
        None => Vec::new(),
    };
    pids.iter()
        .map(|p| match known.iter().position(|s| s.pid == *p) {
            Some(i) => brief(known.swap_remove(i)),
            None => SessionBrief::pid(*p),
        })
        .collect()
}

/// `belay-lock-guard: 1234 waits for 4242,4243`: as many pids as fit in
/// `application_name` (63 bytes; the server would cut a pid in half), which `belay locks`
/// reads back.
fn announcement(migration_pid: i32, blockers: &[i32]) -> String {
    let mut name = format!(
        "{}: {migration_pid} waits for ",
        belay_locks::GUARD_APPLICATION
    );
    let mut first = true;
    for p in blockers {
        let part = if first {
            p.to_string()
        } else {
            format!(",{p}")
        };
        if name.len() + part.len() > 63 {
            break;
        }
        name.push_str(&part);
        first = false;
    }
    name
}

impl LockGuardAdapter {
    pub fn new(url: DatabaseUrl) -> Self {
        LockGuardAdapter {
            url,
            idle: Arc::new(Mutex::new(None)),
            migration_pid: Arc::new(Mutex::new(None)),
            observer: None,
            last_trip: Arc::new(Mutex::new(LastTrip::default())),
        }
    }

    /// Tells `observer` what every poll of the guard sees while a statement runs: the
    /// target's lock waits at the guard's rate (10 ms at the default budget), where a
    /// sample of its own would come once per sampling period.
    pub fn with_observer(mut self, observer: Arc<dyn QueueObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The idle connection, or a new one.
    async fn session(&self) -> Result<PgConnection, ApiError> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match idle {
            Some(c) => Ok(c),
            None => {
                match tokio::time::timeout(
                    GUARD_CONNECT_TIMEOUT,
                    belay_locks::guard_session(&self.url),
                )
                .instrument(tracing::info_span!("lock_guard_connect"))
                .await
                {
                    Ok(conn) => conn.map_err(api_error),
                    Err(_) => Err(ApiError::new(
                        ErrorKind::Unavailable,
                        format!(
                            "lock guard: no session from {} within {}",
                            self.url,
                            belay_core::format_duration(GUARD_CONNECT_TIMEOUT)
                        ),
                    )),
                }
            }
        }
    }
}

fn give_back(idle: &Mutex<Option<PgConnection>>, conn: PgConnection) {
    *idle.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn);
}

/// One statement's watch.
struct Watch {
    guard: LockGuard,
    idle: Arc<Mutex<Option<PgConnection>>>,
    last_trip: Arc<Mutex<LastTrip>>,
    budget: Duration,
}

/// The longest a retry waits for a ripe moment, in budgets (2 s at the default 50 ms);
/// then it goes ahead anyway.
const RIPE_WAIT_BUDGETS: u32 = 40;

/// How far into their transactions the lock holders must be for a retry to queue less
/// than the guard's trip point (`budget` less one poll period: see `period_for`) behind them,
/// judged by the longest the sessions the last cancel released held the lock it gave
/// them (the application's own traffic, which had queued behind the migration; not the
/// blockers, whose one long transaction says nothing of the rest): `None` when those fit
/// in the budget, or none ended. Never less than the budget: by hand under scenario
/// (b)'s writers, ages from the few holds one trip measures ranged 16–66 ms, and those
/// under the budget waited for next to nothing.
fn ripe_age(released: &[i32], ended_ms: &[(i32, u64)], budget: Duration) -> Option<Duration> {
    let longest = ended_ms
        .iter()
        .filter(|(pid, _)| released.contains(pid))
        .map(|(_, ms)| Duration::from_millis(*ms))
        .max()?;
    if longest <= budget {
        return None;
    }
    let age = longest.saturating_sub(budget.saturating_sub(period_for(budget)));
    Some(age.max(budget))
}

#[async_trait::async_trait]
impl LockWatch for Watch {
    async fn stop(self: Box<Self>) -> Result<WatchEnd, ApiError> {
        let Watch {
            guard,
            idle,
            last_trip,
            budget,
        } = *self;
        let last_blockers = guard.last_blockers().into_iter().map(brief_of).collect();
        let (trips, mut conn) = guard.stop_keeping_connection().await.map_err(api_error)?;
        if let Some(last) = trips.last() {
            let mut relations: Vec<String> = Vec::new();
            for r in last.blockers.iter().filter_map(|b| b.relation.clone()) {
                if !relations.contains(&r) {
                    relations.push(r);
                }
            }
            *last_trip.lock().unwrap_or_else(PoisonError::into_inner) = LastTrip {
                released: last.blocked_sessions.clone(),
                relations,
                budget,
            };
        }
        let mut out = Vec::with_capacity(trips.len());
        for t in trips {
            // The poll that tripped described them; only when it could not (they left
            // between the two reads of one query) are they looked up again.
            let blockers = if !t.blockers.is_empty() || t.blockers_of_migration.is_empty() {
                t.blockers.into_iter().map(brief_of).collect()
            } else {
                describe(conn.as_mut(), &t.blockers_of_migration).await
            };
            out.push(LockTrip {
                at: t.at,
                blocked_sessions: u32::try_from(t.blocked_sessions.len()).unwrap_or(u32::MAX),
                longest_wait_ms: t.longest_wait_ms,
                blockers,
            });
        }
        if let Some(c) = conn {
            give_back(&idle, c);
        }
        Ok(WatchEnd {
            trips: out,
            last_blockers,
        })
    }
}

#[async_trait::async_trait]
impl LockGuardHook for LockGuardAdapter {
    async fn prepare(&self) -> Result<(), ApiError> {
        let conn = self.session().await?;
        give_back(&self.idle, conn);
        Ok(())
    }

    async fn release(&self) {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(conn) = idle {
            // A clean goodbye: the server ends the session now rather than when it
            // notices the socket is gone.
            let _ = sqlx::Connection::close(conn).await;
        }
    }

    async fn watch(
        &self,
        backend_pid: i32,
        max_blocking: Duration,
    ) -> Result<Box<dyn LockWatch>, ApiError> {
        *self
            .migration_pid
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(backend_pid);
        // Only the trip of the statement watched last releases anyone worth waiting for.
        *self
            .last_trip
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = LastTrip::default();
        let conn = self.session().await?;
        let guard = LockGuard::start_on(
            conn,
            backend_pid,
            max_blocking,
            period_for(max_blocking),
            self.observer.clone(),
        );
        Ok(Box::new(Watch {
            guard,
            idle: self.idle.clone(),
            last_trip: self.last_trip.clone(),
            budget: max_blocking,
        }))
    }

    async fn wait_until_gone(
        &self,
        pids: &[i32],
        timeout: Duration,
    ) -> Result<BlockersGone, ApiError> {
        let mut conn = self.session().await?;
        let migration = *self
            .migration_pid
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // The sessions the cancel released got the lock they queued for, and hold it until
        // their transactions end: the next attempt's blockers as much as `pids`. Retrying
        // the moment `pids` are gone would queue behind them at once, each with its whole
        // transaction still ahead (under steady short writes, the worst moment to try).
        let LastTrip {
            released,
            relations,
            budget,
        } = std::mem::take(
            &mut *self
                .last_trip
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let started = tokio::time::Instant::now();
        let mut all = pids.to_vec();
        all.extend(released.iter().copied().filter(|p| !pids.contains(p)));
        let pids = all.as_slice();
        // Between attempts nothing waits, so no blocking tree shows the migration; the
        // guard's session says whom it waits for, for `belay locks` in any process.
        let announced = match migration {
            Some(m) => {
                let name = announcement(m, pids);
                sqlx::query("SELECT set_config('application_name', $1, false)")
                    .bind(&name)
                    .execute(&mut conn)
                    .await
                    .is_ok()
            }
            None => false,
        };
        let outcome = belay_locks::wait_until_gone(&mut conn, pids, timeout)
            .instrument(tracing::info_span!("wait_until_gone", ?pids))
            .await
            .map_err(api_error);
        if announced {
            let _ = sqlx::query("SELECT set_config('application_name', $1, false)")
                .bind(belay_locks::GUARD_APPLICATION)
                .execute(&mut conn)
                .await;
        }
        let gone = match outcome? {
            // Gone; but under steady traffic the locks have new holders, and a retry
            // queues behind all of them: when the released sessions held the lock longer
            // than the budget, the retry waits until the holders are far enough in.
            WaitOutcome::Gone { ended_ms, .. } => BlockersGone {
                remaining: Vec::new(),
                ripe_wait: ripe_age(&released, &ended_ms, budget).and_then(|age| {
                    tracing::debug!(age_ms = age.as_millis() as u64, ?relations, "ripe wait");
                    let left = timeout.saturating_sub(started.elapsed());
                    belay_locks::ripe_wait_sql(
                        &relations,
                        age,
                        budget.saturating_mul(RIPE_WAIT_BUDGETS).min(left),
                    )
                }),
            },
            WaitOutcome::TimedOut { remaining } => BlockersGone {
                remaining: describe(Some(&mut conn), &remaining).await,
                ripe_wait: None,
            },
        };
        give_back(&self.idle, conn);
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ripe_moment_is_judged_by_the_released_sessions_alone() {
        let budget = Duration::from_millis(50);
        // 7 was a blocker (a 15 s read); 8 and 9 queued behind the migration.
        let lasted = [(7, 15_000), (8, 95), (9, 30)];
        // 95 ms, less the guard's trip point (40 ms).
        assert_eq!(
            ripe_age(&[8, 9], &lasted, budget),
            Some(Duration::from_millis(55))
        );
        // Released transactions within the budget: retry at once.
        assert_eq!(ripe_age(&[9], &lasted, budget), None);
        assert_eq!(ripe_age(&[8], &[(8, 50)], budget), None);
        // None released, or none ended: at once.
        assert_eq!(ripe_age(&[], &lasted, budget), None);
        assert_eq!(ripe_age(&[8], &[(7, 15_000)], budget), None);
    }

    #[test]
    fn the_announcement_fits_application_name_with_whole_pids() {
        assert_eq!(
            announcement(1234, &[4242, 4243]),
            "belay-lock-guard: 1234 waits for 4242,4243"
        );
        let many: Vec<i32> = (1_000_000..1_000_010).collect();
        let a = announcement(1234, &many);
        assert!(a.len() <= 63, "{a}");
        assert!(a.ends_with("1000000,1000001,1000002"), "{a}");
    }

    #[test]
    fn the_guard_looks_five_times_per_budget_within_bounds() {
        assert_eq!(
            period_for(Duration::from_millis(500)),
            Duration::from_millis(100)
        );
        assert_eq!(
            period_for(Duration::from_millis(200)),
            Duration::from_millis(40)
        );
        assert_eq!(
            period_for(Duration::from_millis(1)),
            Duration::from_millis(10)
        );
        assert_eq!(
            period_for(Duration::from_secs(60)),
            Duration::from_millis(100)
        );
    }
}
