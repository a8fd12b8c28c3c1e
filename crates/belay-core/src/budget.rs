//! A budget of database connections per server, shared by everything one process does on
//! that server (migrations, lock guards, samplers, probes, checks, backups).
//!
//! PostgreSQL refuses connections past `max_connections` ("sorry, too many clients
//! already"), and the application shares that limit: a process that opens a connection
//! per database it owns, or per operation without bound, can lock the application out of
//! its own server. Every operation therefore *reserves* the connections it may hold at
//! once (`slots`) before it opens any, and gives them back when it is done; work waits for
//! slots, it never fails for lack of them.
//!
//! An operation reserves everything it may hold at once in one step (a migration run: its
//! session, the lock guard's and the backup's), so two runs can never each hold part of
//! what they need and wait for the rest (no deadlock). Work an operation does inside its
//! reservation — a deployment's preflight, run and probes, on the same server — is covered
//! by it: [`ConnectionBudget::scope`] marks the task as holding a reservation for the
//! server, and a nested `scope` for that server runs at once without reserving again.
//! This holds within one task; work spawned onto another task reserves its own.
//!
//! Here only the counting, no database code: callers say which server (see
//! [`crate::DatabaseUrl::server`]) and how many connections.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections per server when the configuration says nothing: well below PostgreSQL's
/// default `max_connections` of 100 (three of which are reserved for superusers), so the
/// application keeps most of them even while belay works on many databases at once.
pub const DEFAULT_CONNECTIONS_PER_SERVER: u32 = 10;

/// A wait longer than this is reported (a tracing event), once per wait.
pub const SLOW_WAIT: Duration = Duration::from_secs(5);

tokio::task_local! {
    /// The servers the current task holds a reservation for.
    static HELD: BTreeSet<String>;
}

/// Connections per database server, shared by clones.
#[derive(Clone)]
pub struct ConnectionBudget {
    per_server: u32,
    servers: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

impl std::fmt::Debug for ConnectionBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionBudget")
            .field("per_server", &self.per_server)
            .finish_non_exhaustive()
    }
}

/// Slots held on one server; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    _permit: Option<OwnedSemaphorePermit>,
}

impl ConnectionBudget {
    /// At most `per_server` connections to each server (at least one).
    pub fn new(per_server: u32) -> Self {
        ConnectionBudget {
            per_server: per_server.max(1),
            servers: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn per_server(&self) -> u32 {
        self.per_server
    }

    fn semaphore(&self, server: &str) -> Arc<Semaphore> {
        let mut servers = self.servers.lock().unwrap_or_else(PoisonError::into_inner);
        servers
            .entry(server.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_server as usize)))
            .clone()
    }

    /// Slots free on `server` now.
    pub fn available(&self, server: &str) -> usize {
        self.semaphore(server).available_permits()
    }

    /// Waits for `slots` connections on `server` (at most the whole budget: an operation
    /// wanting more gets the whole budget, so it can start) and holds them until the
    /// reservation is dropped. `what` names the work in the event a long wait emits.
    pub async fn reserve(&self, server: &str, slots: u32, what: &str) -> Reservation {
        let slots = slots.clamp(1, self.per_server);
        let semaphore = self.semaphore(server);
        // The semaphore is fair: the slots go to waiters in order, each getting all it
        // asked for before the next gets any, so no reservation starves behind smaller ones.
        let permit = match semaphore.clone().try_acquire_many_owned(slots) {
            Ok(p) => Ok(p),
            Err(_) => {
                let started = Instant::now();
                let acquire = semaphore.clone().acquire_many_owned(slots);
                tokio::pin!(acquire);
                let permit = match tokio::time::timeout(SLOW_WAIT, &mut acquire).await {
                    Ok(p) => p,
                    Err(_) => {
                        tracing::info!(
                            server,
                            slots,
                            budget = self.per_server,
                            what,
                            "waiting for database connections: the agent's budget for this server is in use"
                        );
                        acquire.await
                    }
                };
                let waited = started.elapsed();
                if waited >= SLOW_WAIT {
                    tracing::info!(
                        server,
                        slots,
                        what,
                        waited_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                        "got database connections after a wait"
                    );
                }
                permit
            }
        };
        // The semaphore is never closed, so there is always a permit; if there were
        // none, running unreserved would beat failing the work.
        Reservation {
            _permit: permit.ok(),
        }
    }

    /// Runs `work` holding `slots` connections on `server`, unless this task already holds
    /// a reservation for that server (then `work` runs within it, reserving nothing more).
    pub async fn scope<F: Future>(
        &self,
        server: &str,
        slots: u32,
        what: &str,
        work: F,
    ) -> F::Output {
        if Self::holds(server) {
            return work.await;
        }
        let mut servers = HELD.try_with(Clone::clone).unwrap_or_default();
        servers.insert(server.to_string());
        let _reservation = self.reserve(server, slots, what).await;
        HELD.scope(servers, work).await
    }

    /// Whether the current task holds a reservation for `server`.
    pub fn holds(server: &str) -> bool {
        HELD.try_with(|h| h.contains(server)).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_hold_slots_until_dropped() {
        let budget = ConnectionBudget::new(3);
        let a = budget.reserve("h:5432", 2, "a").await;
        assert_eq!(budget.available("h:5432"), 1);
        assert_eq!(
            budget.available("other:5432"),
            3,
            "servers are counted apart"
        );
        drop(a);
        assert_eq!(budget.available("h:5432"), 3);
        // More than the budget gets the whole budget rather than waiting forever.
        let all = budget.reserve("h:5432", 10, "big").await;
        assert_eq!(budget.available("h:5432"), 0);
        drop(all);
    }

    #[tokio::test]
    async fn a_waiter_gets_its_slots_when_they_are_given_back() {
        let budget = ConnectionBudget::new(2);
        let held = budget.reserve("h:1", 2, "first").await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let b = budget.clone();
        let waiter = tokio::spawn(async move {
            let r = b.reserve("h:1", 2, "second").await;
            let _ = tx.send(());
            r
        });
        tokio::task::yield_now().await;
        assert_eq!(budget.available("h:1"), 0);
        drop(held);
        rx.await.expect("the waiter got its slots");
        let r = waiter.await.expect("no panic");
        assert_eq!(budget.available("h:1"), 0);
        drop(r);
        assert_eq!(budget.available("h:1"), 2);
    }

    #[tokio::test]
    async fn nested_scopes_on_one_server_reserve_once() {
        let budget = ConnectionBudget::new(2);
        let b = budget.clone();
        budget
            .scope("h:1", 2, "outer", async {
                assert!(ConnectionBudget::holds("h:1"));
                assert_eq!(b.available("h:1"), 0);
                // Would wait forever if it reserved again.
                b.scope("h:1", 1, "inner", async {
                    assert_eq!(b.available("h:1"), 0);
                })
                .await;
                // Another server is reserved on its own.
                b.scope("h:2", 1, "elsewhere", async {
                    assert_eq!(b.available("h:2"), 1);
                    assert!(ConnectionBudget::holds("h:1") && ConnectionBudget::holds("h:2"));
                })
                .await;
            })
            .await;
        assert!(!ConnectionBudget::holds("h:1"));
        assert_eq!(budget.available("h:1"), 2);
        assert_eq!(budget.available("h:2"), 2);
    }
}
