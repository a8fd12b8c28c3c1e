//! The work a daemon runs in tasks of its own, detached from the call that started it
//! (migration runs, deployments, rollbacks, backups and restores): tracked, so a stop
//! waits for it to finish and be recorded, and cancellable, so a stop whose grace runs out
//! ends it at once instead of being killed by its supervisor half-way through a write.

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What a caller is told when its work is cancelled at a stop ([`InFlight::cancel`]).
pub const CANCELLED_AT_STOP: &str = "the daemon is stopping and its shutdown grace ran out: \
     this work was cancelled where it stood (an open transaction rolled back, a deployment is \
     recorded failed at its step); see the target's history for what committed, and run it \
     again to resume";

/// Tasks in flight; cheap to clone (clones share the tasks).
#[derive(Clone, Debug, Default)]
pub struct InFlight {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl InFlight {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `work` in its own task. When [`InFlight::cancel`] is called first, `work` is
    /// dropped where it waits (a database session it holds closes, so an open transaction
    /// rolls back) and `cancelled` runs instead, to tell the caller.
    pub fn spawn<W, C, CF>(&self, work: W, cancelled: C)
    where
        W: Future<Output = ()> + Send + 'static,
        C: FnOnce() -> CF + Send + 'static,
        CF: Future<Output = ()> + Send + 'static,
    {
        let token = self.cancel.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = work => {}
                () = token.cancelled() => cancelled().await,
            }
        });
    }

    /// Accepts no more work: [`InFlight::wait`] ends once what runs has ended.
    pub fn close(&self) {
        self.tracker.close();
    }

    /// Cancels every task in flight (see [`InFlight::spawn`]).
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Waits until the tracker is closed and every task has ended.
    pub async fn wait(&self) {
        self.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cancel_ends_work_that_would_never_end_and_says_so() {
        let inflight = InFlight::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<&str>();
        inflight.spawn(std::future::pending(), move || async move {
            let _ = tx.send("cancelled");
        });
        inflight.spawn(async {}, || async {});
        inflight.close();
        assert!(!inflight.is_empty());
        inflight.cancel();
        inflight.wait().await;
        assert_eq!(rx.await.ok(), Some("cancelled"));
        assert!(inflight.is_empty());
    }
}
