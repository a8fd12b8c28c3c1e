//! [`MemoryLog`]: a [`DeploymentLog`] in this process's memory, for unit tests and for
//! callers with nowhere to persist (remote `migrate` in the CLI, until the controller
//! records each target's lifecycle).

use std::collections::BTreeMap;
use std::sync::Mutex;

use uuid::Uuid;

use crate::record::{
    DeployEvent, DeploymentLog, DeploymentOutcome, DeploymentRecord, LogError, NewDeployment, Step,
};

#[derive(Debug, Default)]
struct Entry {
    record: Option<DeploymentRecord>,
    events: Vec<DeployEvent>,
    /// Insertion order, for `list` (newest first).
    order: u64,
}

/// Deployments and their events in memory, with the same rules a persistent log keeps:
/// `seq` gap-free from 1, a `transition` moves the deployment, a finished deployment
/// takes no outcome twice.
#[derive(Debug, Default)]
pub struct MemoryLog {
    inner: Mutex<BTreeMap<Uuid, Entry>>,
}

impl MemoryLog {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, BTreeMap<Uuid, Entry>>, LogError> {
        // A panic while holding the lock leaves a log no caller can trust.
        self.inner
            .lock()
            .map_err(|_| LogError("the in-memory log was poisoned by a panic".into()))
    }
}

fn unknown(id: Uuid) -> LogError {
    LogError(format!("no deployment {id}"))
}

#[async_trait::async_trait]
impl DeploymentLog for MemoryLog {
    async fn begin(&self, deployment: &NewDeployment) -> Result<(), LogError> {
        let mut map = self.lock()?;
        let order = map.len() as u64;
        if map.contains_key(&deployment.id) {
            return Err(LogError(format!(
                "deployment {} is already recorded",
                deployment.id
            )));
        }
        map.insert(
            deployment.id,
            Entry {
                record: Some(DeploymentRecord {
                    start: deployment.clone(),
                    step: Step::Planned,
                    outcome: None,
                }),
                events: Vec::new(),
                order,
            },
        );
        Ok(())
    }

    async fn append(&self, mut event: DeployEvent) -> Result<u64, LogError> {
        let mut map = self.lock()?;
        let entry = map
            .get_mut(&event.deployment_id)
            .ok_or_else(|| unknown(event.deployment_id))?;
        let seq = entry.events.len() as u64 + 1;
        event.seq = seq;
        if event.kind == crate::KIND_TRANSITION
            && let Some(r) = entry.record.as_mut()
        {
            r.step = event.step;
        }
        entry.events.push(event);
        Ok(seq)
    }

    async fn finish(&self, id: Uuid, outcome: &DeploymentOutcome) -> Result<(), LogError> {
        let mut map = self.lock()?;
        let record = map
            .get_mut(&id)
            .and_then(|e| e.record.as_mut())
            .ok_or_else(|| unknown(id))?;
        if record.outcome.is_some() {
            return Err(LogError(format!("deployment {id} is already finished")));
        }
        record.step = outcome.state;
        record.outcome = Some(outcome.clone());
        Ok(())
    }

    async fn get(&self, id: Uuid) -> Result<Option<DeploymentRecord>, LogError> {
        Ok(self.lock()?.get(&id).and_then(|e| e.record.clone()))
    }

    async fn events(&self, id: Uuid) -> Result<Vec<DeployEvent>, LogError> {
        Ok(self
            .lock()?
            .get(&id)
            .map(|e| e.events.clone())
            .unwrap_or_default())
    }

    async fn list(&self, limit: usize) -> Result<Vec<DeploymentRecord>, LogError> {
        let map = self.lock()?;
        let mut entries: Vec<&Entry> = map.values().collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.order));
        Ok(entries
            .into_iter()
            .filter_map(|e| e.record.clone())
            .take(limit)
            .collect())
    }
}
