//! Where each migration stands: local files compared with the history rows. Pure: the same
//! inputs always give the same answer, so every state has a unit test.

use crate::source::MigrationSet;
use belay_core::Version;
use belay_history::{EntryType, HistoryRow, RowState};
use chrono::{DateTime, Utc};
use std::collections::{HashMap, HashSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Success,
    Pending,
    /// A migration failed, or a no-transaction migration was interrupted; `repair` resolves.
    Failed,
    /// A no-transaction migration whose runner is still alive.
    Running,
    /// Applied, but its file is gone from the migrations directory.
    Missing,
    /// Applied, newer than every local migration (the database is ahead of this checkout).
    Future,
    /// Applied, then reverted by its undo.
    Undone,
    /// Applied, but the file changed since (`validate` names it; `repair` realigns).
    ChecksumMismatch,
    /// At or below the baseline: treated as applied, never run.
    Baseline,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Success => "success",
            State::Pending => "pending",
            State::Failed => "failed",
            State::Running => "running",
            State::Missing => "missing",
            State::Future => "future",
            State::Undone => "undone",
            State::ChecksumMismatch => "checksum_mismatch",
            State::Baseline => "baseline",
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MigrationStatus {
    pub version: Option<String>,
    pub description: String,
    #[serde(rename = "type")]
    pub entry_type: EntryType,
    pub script: String,
    pub state: State,
    pub installed_on: Option<DateTime<Utc>>,
    pub execution_time_ms: Option<i32>,
    pub retries: Option<i32>,
    pub lock_wait_ms: Option<i64>,
    pub installed_rank: Option<i32>,
    pub error: Option<String>,
    /// Whether an undo script exists locally.
    pub undoable: bool,
    /// Times the lock guard cancelled the migration on the way to this row.
    pub lock_trips: Option<i32>,
    /// The row's notes (allowed lint findings, overridden checks, lock guard trips).
    pub notes: Option<serde_json::Value>,
    /// The deployment that wrote the row (its record is in the deployment log).
    pub deployment_id: Option<uuid::Uuid>,
    /// The backup taken before that deployment, to restore if undoing is not enough.
    pub backup_id: Option<String>,
}

impl MigrationStatus {
    fn from_row(row: Option<&HistoryRow>) -> Self {
        MigrationStatus {
            version: row.and_then(|r| r.version.clone()),
            description: row.map(|r| r.description.clone()).unwrap_or_default(),
            entry_type: row.map_or(EntryType::Sql, |r| r.entry_type),
            script: row.map(|r| r.script.clone()).unwrap_or_default(),
            state: State::Pending,
            installed_on: row.map(|r| r.installed_on),
            execution_time_ms: row.map(|r| r.execution_time_ms),
            retries: row.map(|r| r.retries),
            lock_wait_ms: row.map(|r| r.lock_wait_ms),
            installed_rank: row.map(|r| r.installed_rank),
            error: row.and_then(|r| r.error.clone()),
            undoable: false,
            lock_trips: row.map(|r| r.lock_trips),
            notes: row.and_then(|r| r.notes.clone()),
            deployment_id: row.and_then(|r| r.deployment_id),
            backup_id: row.and_then(|r| r.backup_id.clone()),
        }
    }
}

/// The version recorded by a successful baseline, if any.
pub fn baseline(rows: &[HistoryRow]) -> Option<Version> {
    rows.iter()
        .filter(|r| r.entry_type == EntryType::Baseline && r.state == RowState::Success)
        .filter_map(|r| r.version.as_deref().and_then(|v| Version::parse(v).ok()))
        .next_back()
}

fn row_state(row: &HistoryRow, runner_active: bool) -> State {
    match (row.entry_type, row.state) {
        (_, RowState::Running) if runner_active => State::Running,
        (_, RowState::Running | RowState::Failed) => State::Failed,
        (EntryType::UndoSql, _) => State::Undone,
        _ => State::Success,
    }
}

/// `runner_active`: whether some runner holds the lock right now (a `running` row is then
/// really running, not the remains of a crash).
pub fn compute(
    set: &MigrationSet,
    rows: &[HistoryRow],
    runner_active: bool,
) -> Vec<MigrationStatus> {
    let live: Vec<&HistoryRow> = rows
        .iter()
        .filter(|r| r.state != RowState::Repaired)
        .collect();
    let baseline = baseline(rows);
    // The latest forward-or-undo row of each version, indexed once: a history of
    // thousands of rows must not cost thousands of scans.
    let mut latest: HashMap<Version, &HistoryRow> = HashMap::new();
    for r in live.iter().filter(|r| {
        matches!(
            r.entry_type,
            EntryType::Sql | EntryType::Adopted | EntryType::UndoSql
        )
    }) {
        let Some(v) = r.version.as_deref().and_then(|t| Version::parse(t).ok()) else {
            continue;
        };
        let e = latest.entry(v).or_insert(r);
        if r.installed_rank > e.installed_rank {
            *e = r;
        }
    }
    let latest_for = |v: &Version| latest.get(v).copied();
    let mut out = Vec::new();

    if let Some(b) = live.iter().find(|r| r.entry_type == EntryType::Baseline) {
        let mut s = MigrationStatus::from_row(Some(b));
        s.state = State::Success;
        out.push(s);
    }

    for m in &set.migrations {
        let row = latest_for(&m.version);
        let mut s = MigrationStatus::from_row(row);
        s.version = Some(m.version.to_string());
        s.description = m.description.clone();
        // An adopted migration keeps its type, so status shows where it came from.
        s.entry_type = match row {
            Some(r) if r.entry_type == EntryType::Adopted => EntryType::Adopted,
            _ => EntryType::Sql,
        };
        s.script = m.script_name.clone();
        s.undoable = m.down.is_some() && !m.up.directives.irreversible;
        s.state = match row {
            None if baseline.as_ref().is_some_and(|b| &m.version <= b) => State::Baseline,
            None => State::Pending,
            Some(r) => match row_state(r, runner_active) {
                State::Success if r.checksum.as_deref() != Some(m.checksum.as_str()) => {
                    State::ChecksumMismatch
                }
                st => st,
            },
        };
        out.push(s);
    }

    // Applied versions with no local file.
    let newest_local = set.migrations.last().map(|m| m.version.clone());
    let mut seen: HashSet<Version> = set.migrations.iter().map(|m| m.version.clone()).collect();
    for r in &live {
        if !matches!(
            r.entry_type,
            EntryType::Sql | EntryType::Adopted | EntryType::UndoSql
        ) {
            continue;
        }
        let Some(v) = r.version.as_deref().and_then(|t| Version::parse(t).ok()) else {
            continue;
        };
        if seen.contains(&v) {
            continue;
        }
        seen.insert(v.clone());
        let Some(latest) = latest_for(&v) else {
            continue;
        };
        let mut s = MigrationStatus::from_row(Some(latest));
        if latest.entry_type != EntryType::Adopted {
            s.entry_type = EntryType::Sql;
        }
        s.state = match row_state(latest, runner_active) {
            State::Undone => continue, // reverted and removed: nothing to report
            State::Success if newest_local.as_ref().is_none_or(|n| &v > n) => State::Future,
            State::Success => State::Missing,
            st => st,
        };
        out.push(s);
    }

    for r in &set.repeatables {
        let row = live
            .iter()
            .filter(|h| h.entry_type == EntryType::Repeatable && h.description == r.description)
            .max_by_key(|h| h.installed_rank)
            .copied();
        let mut s = MigrationStatus::from_row(row);
        s.description = r.description.clone();
        s.entry_type = EntryType::Repeatable;
        s.script = r.script_name.clone();
        s.state = match row {
            None => State::Pending,
            Some(h) => match row_state(h, runner_active) {
                State::Success if h.checksum.as_deref() != Some(r.script.checksum.as_str()) => {
                    State::Pending
                }
                st => st,
            },
        };
        out.push(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source;

    fn set(files: &[(&str, &str)]) -> (tempfile::TempDir, MigrationSet) {
        let d = tempfile::tempdir().unwrap();
        for (n, b) in files {
            std::fs::write(d.path().join(n), b).unwrap();
        }
        let s = source::load(d.path()).unwrap();
        (d, s)
    }

    fn row(rank: i32, version: &str, t: EntryType, state: RowState, checksum: &str) -> HistoryRow {
        HistoryRow {
            installed_rank: rank,
            version: (!version.is_empty()).then(|| version.to_string()),
            description: "d".into(),
            entry_type: t,
            script: format!("V{version}__d.sql"),
            checksum: Some(checksum.to_string()),
            installed_by: "t".into(),
            installed_on: Utc::now(),
            execution_time_ms: 1,
            success: state == RowState::Success,
            deployment_id: None,
            backup_id: None,
            lock_wait_ms: 0,
            retries: 0,
            state,
            error: None,
            lock_trips: 0,
            notes: None,
        }
    }

    fn states(st: &[MigrationStatus]) -> Vec<(String, State)> {
        st.iter()
            .map(|s| {
                (
                    s.version.clone().unwrap_or_else(|| s.description.clone()),
                    s.state,
                )
            })
            .collect()
    }

    #[test]
    fn each_state_from_files_and_rows() {
        let (_d, s) = set(&[
            ("V1__a.sql", "select 1;"),
            ("V2__b.sql", "select 2;"),
            ("U2__b.sql", "select -2;"),
            ("V3__c.sql", "select 3;"),
            ("V4__d.sql", "select 4;"),
            ("V5__e.sql", "select 5;"),
            ("V6__f.sql", "select 6;"),
            ("R__views.sql", "select 'r';"),
        ]);
        let ck = |v: &str| {
            s.find(&Version::parse(v).unwrap())
                .unwrap()
                .checksum
                .to_string()
        };
        let rows = vec![
            row(1, "1", EntryType::Sql, RowState::Success, &ck("1")),
            row(2, "2", EntryType::Sql, RowState::Success, &ck("2")),
            row(3, "2", EntryType::UndoSql, RowState::Success, "x"),
            row(4, "3", EntryType::Sql, RowState::Success, "edited"),
            row(5, "4", EntryType::Sql, RowState::Running, &ck("4")),
            row(6, "5", EntryType::Sql, RowState::Failed, &ck("5")),
            row(7, "5", EntryType::Sql, RowState::Repaired, &ck("5")),
            row(8, "0.5", EntryType::Sql, RowState::Success, "gone"),
            row(9, "9", EntryType::Sql, RowState::Success, "ahead"),
        ];
        let got = states(&compute(&s, &rows, false));
        use State::*;
        let want: Vec<(String, State)> = [
            ("1", Success),
            ("2", Undone),
            ("3", ChecksumMismatch),
            ("4", Failed),
            ("5", Failed),
            ("6", Pending),
            ("0.5", Missing),
            ("9", Future),
            ("views", Pending),
        ]
        .iter()
        .map(|(v, s)| (v.to_string(), *s))
        .collect();
        assert_eq!(got, want);
        // The same running row is Running while its runner holds the lock.
        assert_eq!(compute(&s, &rows, true)[3].state, Running);
    }

    #[test]
    fn adopted_rows_read_as_applied_and_keep_their_type() {
        let (_d, s) = set(&[
            ("V1__a.sql", "select 1;"),
            ("V2__b.sql", "select 2;"),
            ("U2__b.sql", "select -2;"),
            ("V3__c.sql", "select 3;"),
            ("V4__d.sql", "select 4;"),
        ]);
        let ck = |v: &str| {
            s.find(&Version::parse(v).unwrap())
                .unwrap()
                .checksum
                .to_string()
        };
        let rows = vec![
            row(1, "1", EntryType::Adopted, RowState::Success, &ck("1")),
            row(2, "2", EntryType::Adopted, RowState::Success, &ck("2")),
            row(
                3,
                "3",
                EntryType::Adopted,
                RowState::Success,
                "edited since",
            ),
            row(4, "0.5", EntryType::Adopted, RowState::Success, "gone"),
            row(5, "2", EntryType::UndoSql, RowState::Success, "x"),
        ];
        let got = compute(&s, &rows, false);
        let seen: Vec<(String, EntryType, State, bool)> = got
            .iter()
            .map(|m| {
                (
                    m.version.clone().unwrap_or_default(),
                    m.entry_type,
                    m.state,
                    m.undoable,
                )
            })
            .collect();
        use EntryType::{Adopted, Sql};
        use State::*;
        assert_eq!(
            seen,
            [
                ("1".to_string(), Adopted, Success, false),
                ("2".to_string(), Sql, Undone, true),
                ("3".to_string(), Adopted, ChecksumMismatch, false),
                ("4".to_string(), Sql, Pending, false),
                ("0.5".to_string(), Adopted, Missing, false),
            ]
        );
    }

    #[test]
    fn repaired_failure_becomes_pending_and_baseline_covers_older() {
        let (_d, s) = set(&[
            ("V1__a.sql", "select 1;"),
            ("V2__b.sql", "select 2;"),
            ("V3__c.sql", ""),
        ]);
        let rows = vec![
            row(1, "2", EntryType::Baseline, RowState::Success, ""),
            row(2, "3", EntryType::Sql, RowState::Repaired, ""),
        ];
        let got = states(&compute(&s, &rows, false));
        assert_eq!(
            got,
            [
                ("2".to_string(), State::Success),
                ("1".to_string(), State::Baseline),
                ("2".to_string(), State::Baseline),
                ("3".to_string(), State::Pending)
            ]
        );
    }
}
