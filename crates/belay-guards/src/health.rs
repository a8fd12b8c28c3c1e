//! `belay_health::MigrationFacts` over the migration engine: what preflight and postflight
//! need to know about a target's migrations (pending, failed, drifted; the `verify.sql`
//! of applied ones), so the health checker needs no executor and the CLI and the agent
//! answer the same way.

use belay_health::{MigrationFacts, MigrationSummary, VerifyScript};
use belay_migrate::{
    ApiError, ErrorKind, MigrateError, MigrationApi, MigrationSet, MigrationStatus, SourceError,
    State,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// [`MigrationFacts`] from a [`MigrationApi`] (for states) and each target's migrations
/// directory (for `verify.sql` scripts).
#[derive(Clone)]
pub struct MigrationFactsAdapter {
    api: Arc<dyn MigrationApi>,
    dirs: BTreeMap<String, PathBuf>,
    /// Per target: its files as the caller already read them (else read at each question).
    files: BTreeMap<String, Arc<MigrationSet>>,
}

impl std::fmt::Debug for MigrationFactsAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationFactsAdapter")
            .field("dirs", &self.dirs)
            .finish_non_exhaustive()
    }
}

impl MigrationFactsAdapter {
    pub fn new(
        api: Arc<dyn MigrationApi>,
        dirs: impl IntoIterator<Item = (String, PathBuf)>,
    ) -> Self {
        MigrationFactsAdapter {
            api,
            dirs: dirs.into_iter().collect(),
            files: BTreeMap::new(),
        }
    }

    /// Answers about `target` from `set` instead of reading its directory at each
    /// question (see `LocalTargets::with_files`: a command that reads its files once).
    pub fn with_files(mut self, target: &str, set: Arc<MigrationSet>) -> Self {
        self.files.insert(target.to_string(), set);
        self
    }

    fn files(&self, target: &str, dir: &Path) -> Result<Arc<MigrationSet>, SourceError> {
        match self.files.get(target) {
            Some(set) => Ok(set.clone()),
            None => belay_migrate::load(dir).map(Arc::new),
        }
    }
}

/// Pending, failed and drifted migrations, as preflight and postflight report them.
pub fn summarize(statuses: &[MigrationStatus]) -> MigrationSummary {
    let name = |s: &MigrationStatus| {
        format!(
            "{} ({})",
            s.version.clone().unwrap_or_else(|| "R".into()),
            s.script
        )
    };
    MigrationSummary {
        pending: statuses
            .iter()
            .filter(|s| matches!(s.state, State::Pending | State::Undone))
            .count(),
        failed: statuses
            .iter()
            .filter(|s| s.state == State::Failed)
            .map(name)
            .collect(),
        drift: statuses
            .iter()
            .filter(|s| s.state == State::ChecksumMismatch)
            .map(name)
            .collect(),
        lock_tables: Vec::new(),
    }
}

/// The tables (and indexes) the pending scripts lock, from the linter's lock analysis;
/// a script it cannot parse contributes nothing (the lint gate reports it).
fn lock_tables(set: &MigrationSet, statuses: &[MigrationStatus]) -> Vec<String> {
    let pending: Vec<&str> = statuses
        .iter()
        .filter(|s| matches!(s.state, State::Pending | State::Undone))
        .map(|s| s.script.as_str())
        .collect();
    let scripts = set
        .migrations
        .iter()
        .filter(|m| pending.contains(&m.script_name.as_str()))
        .map(|m| &m.up)
        .chain(
            set.repeatables
                .iter()
                .filter(|r| pending.contains(&r.script_name.as_str()))
                .map(|r| &r.script),
        );
    let mut tables = std::collections::BTreeSet::new();
    for script in scripts {
        if let Ok(statements) = belay_lint::statements(&script.text) {
            tables.extend(
                statements
                    .into_iter()
                    .filter(|st| st.lock.is_some())
                    .filter_map(|st| st.target),
            );
        }
    }
    tables.into_iter().collect()
}

#[async_trait::async_trait]
impl MigrationFacts for MigrationFactsAdapter {
    async fn summary(&self, target: &str) -> Result<MigrationSummary, ApiError> {
        let statuses = self.api.status(target).await?;
        let mut summary = summarize(&statuses);
        if let Some(dir) = self.dirs.get(target)
            && let Ok(set) = self.files(target, dir)
        {
            summary.lock_tables = lock_tables(&set, &statuses);
        }
        Ok(summary)
    }

    async fn verify_scripts(&self, target: &str) -> Result<Vec<VerifyScript>, ApiError> {
        let dir = self.dirs.get(target).ok_or_else(|| {
            ApiError::new(
                ErrorKind::UnknownTarget,
                format!("unknown target {target:?}: no migrations directory"),
            )
        })?;
        let set = self.files(target, dir).map_err(MigrateError::from)?;
        // Without a verify script, which migrations succeeded does not matter: no read.
        if set.migrations.iter().all(|m| m.verify.is_none()) {
            return Ok(Vec::new());
        }
        let statuses = self.api.status(target).await?;
        Ok(set
            .migrations
            .iter()
            .filter(|m| {
                statuses.iter().any(|s| {
                    s.version.as_deref() == Some(m.version.as_str()) && s.state == State::Success
                })
            })
            .filter_map(|m| {
                m.verify
                    .as_ref()
                    .map(|v| VerifyScript::from((v.path.clone(), v.text.clone())))
            })
            .collect())
    }
}
