//! The catalog of one target: `<root>/<target>/<id>/manifest.json`, and retention.
//!
//! A backup is written into `<id>.partial/` and renamed to `<id>/` after its manifest, so
//! a directory named like an id always holds a complete backup; anything else (an abandoned
//! `.partial`, a directory without manifest) is incomplete, ignored by `list`, and removed
//! by `prune`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};

use crate::BackupError;
use crate::files::{MANIFEST, read_manifest};
use crate::model::{BackupKind, CatalogEntry, KeepReason, KeptBackup, Manifest, PruneReport};

pub(crate) const PARTIAL_SUFFIX: &str = ".partial";
/// A `.partial` directory older than this belongs to a run that died; prune removes it.
const ABANDONED_AFTER: Duration = Duration::from_secs(6 * 3600);

/// Target names and backup ids become directory names: letters, digits, `-`, `_`, `.`,
/// not starting with a dot.
pub fn validate_name(what: &str, name: &str) -> Result<(), BackupError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(BackupError::Invalid(format!(
            "{what} {name:?} must be 1-128 letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

/// A new backup id: `20260422T101530.123Z-3f9a1c`, ordered by creation time.
pub fn new_id(at: DateTime<Utc>) -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{}-{}", at.format("%Y%m%dT%H%M%S%.3fZ"), &random[..6])
}

/// The backups of one target.
#[derive(Debug, Clone)]
pub struct Catalog {
    target: String,
    dir: PathBuf,
}

impl Catalog {
    /// The catalog of `target` under the backup root `root` (it need not exist yet).
    pub fn open(root: &Path, target: &str) -> Result<Catalog, BackupError> {
        validate_name("target name", target)?;
        Ok(Catalog {
            target: target.to_owned(),
            dir: root.join(target),
        })
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    /// `<root>/<target>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Directory of backup `id` (whether or not it exists).
    pub fn backup_dir(&self, id: &str) -> Result<PathBuf, BackupError> {
        validate_name("backup id", id)?;
        Ok(self.dir.join(id))
    }

    /// Complete backups, newest first.
    pub fn list(&self) -> Result<Vec<CatalogEntry>, BackupError> {
        let mut entries: Vec<CatalogEntry> = self
            .scan()?
            .into_iter()
            .filter_map(|slot| match slot {
                Slot::Complete(m, path) => Some(entry(*m, path)),
                Slot::Incomplete(..) => None,
            })
            .collect();
        entries.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| b.id.cmp(&a.id))
        });
        Ok(entries)
    }

    /// Complete backups' manifests, newest first.
    pub fn manifests(&self) -> Result<Vec<Manifest>, BackupError> {
        let mut out: Vec<Manifest> = self
            .scan()?
            .into_iter()
            .filter_map(|slot| match slot {
                Slot::Complete(m, _) => Some(*m),
                Slot::Incomplete(..) => None,
            })
            .collect();
        out.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| b.id.cmp(&a.id))
        });
        Ok(out)
    }

    /// The manifest of backup `id`.
    pub fn get(&self, id: &str) -> Result<Manifest, BackupError> {
        let dir = self.backup_dir(id)?;
        if !dir.is_dir() {
            return Err(BackupError::BackupNotFound {
                target: self.target.clone(),
                id: id.to_owned(),
                dir: self.dir.clone(),
            });
        }
        if !dir.join(MANIFEST).is_file() {
            return Err(BackupError::Incomplete {
                target: self.target.clone(),
                id: id.to_owned(),
                dir,
            });
        }
        read_manifest(&dir)
    }

    /// The newest verified backup, if any.
    pub fn latest_verified(&self) -> Result<Option<CatalogEntry>, BackupError> {
        Ok(self.list()?.into_iter().find(|e| e.verified))
    }

    /// Directories of incomplete backups (no manifest, or `.partial`).
    pub fn incomplete(&self) -> Result<Vec<PathBuf>, BackupError> {
        Ok(self
            .scan()?
            .into_iter()
            .filter_map(|slot| match slot {
                Slot::Incomplete(path, _) => Some(path),
                Slot::Complete(..) => None,
            })
            .collect())
    }

    /// Retention, kind by kind ([`BackupKind`]: pre-deployment, pre-undo snapshot,
    /// emergency, manual — so emergency backups never push a deployment's backup or an
    /// undo's snapshot out): of each kind it keeps the newest `keep` verified backups, the
    /// newest verified one even when `keep` is 0, and unverified backups newer than every
    /// verified one of their kind (nothing supersedes them yet); and every id in `protect`.
    /// Deletes the rest, and incomplete backups (a `.partial` directory only once abandoned
    /// for hours, so a running backup is safe). With `dry_run` nothing is deleted; the
    /// report says what would be.
    pub fn prune(
        &self,
        keep: usize,
        protect: &[String],
        dry_run: bool,
    ) -> Result<PruneReport, BackupError> {
        let entries = self.list()?;
        let kinds: std::collections::HashMap<String, BackupKind> = self
            .manifests()?
            .into_iter()
            .map(|m| (m.id.clone(), m.kind()))
            .collect();
        let flags: Vec<(String, bool, BackupKind)> = entries
            .iter()
            .map(|e| {
                let kind = kinds.get(&e.id).copied().unwrap_or(BackupKind::Manual);
                (e.id.clone(), e.verified, kind)
            })
            .collect();
        let decisions = plan_prune_by_kind(&flags, keep, protect);
        let mut report = PruneReport {
            target: self.target.clone(),
            dry_run,
            deleted: Vec::new(),
            kept: Vec::new(),
            incomplete_removed: Vec::new(),
        };
        for (entry, decision) in entries.into_iter().zip(decisions) {
            match decision {
                Some(reason) => report.kept.push(KeptBackup {
                    id: entry.id,
                    reason,
                    note: None,
                }),
                None => {
                    if !dry_run {
                        remove_backup_dir(&entry.path)?;
                    }
                    report.deleted.push(entry);
                }
            }
        }
        for slot in self.scan()? {
            if let Slot::Incomplete(path, abandoned) = slot
                && abandoned
            {
                if !dry_run {
                    remove_backup_dir(&path)?;
                }
                report.incomplete_removed.push(path);
            }
        }
        Ok(report)
    }

    fn scan(&self) -> Result<Vec<Slot>, BackupError> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(BackupError::Io {
                    action: "could not read the catalog".into(),
                    path: self.dir.clone(),
                    source: e,
                });
            }
        };
        let mut slots = Vec::new();
        for de in rd {
            let de = de.map_err(BackupError::io("could not read the catalog", &self.dir))?;
            let path = de.path();
            if !path.is_dir() {
                continue;
            }
            let name = de.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if name.ends_with(PARTIAL_SUFFIX) {
                let age = de
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .unwrap_or_default();
                slots.push(Slot::Incomplete(path, age > ABANDONED_AFTER));
                continue;
            }
            if !path.join(MANIFEST).is_file() {
                slots.push(Slot::Incomplete(path, true));
                continue;
            }
            match read_manifest(&path) {
                Ok(m) if m.id == name && m.target == self.target => {
                    slots.push(Slot::Complete(Box::new(m), path));
                }
                Ok(m) => tracing::warn!(
                    dir = %path.display(),
                    manifest_id = %m.id,
                    "manifest does not match its directory; ignored"
                ),
                // An unreadable manifest is not deleted automatically: someone should look.
                Err(err) => tracing::warn!(%err, "unreadable manifest; ignored"),
            }
        }
        Ok(slots)
    }
}

enum Slot {
    Complete(Box<Manifest>, PathBuf),
    /// Path, and whether it may be removed.
    Incomplete(PathBuf, bool),
}

fn entry(m: Manifest, path: PathBuf) -> CatalogEntry {
    CatalogEntry::from_manifest(m, path)
}

fn remove_backup_dir(path: &Path) -> Result<(), BackupError> {
    std::fs::remove_dir_all(path).map_err(BackupError::io("could not delete", path))
}

/// For `(id, verified, kind)` newest first: [`plan_prune`] within each kind.
pub(crate) fn plan_prune_by_kind(
    backups: &[(String, bool, BackupKind)],
    keep: usize,
    protect: &[String],
) -> Vec<Option<KeepReason>> {
    let mut out = vec![None; backups.len()];
    let mut kinds: Vec<BackupKind> = backups.iter().map(|b| b.2).collect();
    kinds.sort();
    kinds.dedup();
    for kind in kinds {
        let (at, of_kind): (Vec<usize>, Vec<(String, bool)>) = backups
            .iter()
            .enumerate()
            .filter(|(_, b)| b.2 == kind)
            .map(|(i, b)| (i, (b.0.clone(), b.1)))
            .unzip();
        for (i, decision) in at.into_iter().zip(plan_prune(&of_kind, keep, protect)) {
            out[i] = decision;
        }
    }
    out
}

/// For `(id, verified)` newest first: why each is kept, or `None` to delete it.
pub(crate) fn plan_prune(
    backups: &[(String, bool)],
    keep: usize,
    protect: &[String],
) -> Vec<Option<KeepReason>> {
    let protect: HashSet<&str> = protect.iter().map(String::as_str).collect();
    let mut verified_seen = 0usize;
    backups
        .iter()
        .map(|(id, verified)| {
            let reason = if protect.contains(id.as_str()) {
                Some(KeepReason::Protected)
            } else if *verified && verified_seen < keep {
                Some(KeepReason::Retained)
            } else if *verified && verified_seen == 0 {
                Some(KeepReason::LatestVerified)
            } else if !*verified && verified_seen == 0 {
                Some(KeepReason::AwaitingVerification)
            } else {
                None
            };
            if *verified {
                verified_seen += 1;
            }
            reason
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(id: &str, verified: bool) -> (String, bool) {
        (id.to_owned(), verified)
    }

    #[test]
    fn ids_sort_by_time_and_are_valid_names() {
        let t1 = DateTime::parse_from_rfc3339("2026-04-22T10:15:30.123Z")
            .unwrap()
            .with_timezone(&Utc);
        let t2 = t1 + chrono::Duration::milliseconds(1);
        let (a, b) = (new_id(t1), new_id(t2));
        assert!(a.starts_with("20260422T101530.123Z-"), "{a}");
        assert!(a < b);
        validate_name("backup id", &a).unwrap();
        assert!(validate_name("target", "../etc").is_err());
        assert!(validate_name("target", "a/b").is_err());
        assert!(validate_name("target", "").is_err());
    }

    #[test]
    fn prune_keeps_newest_verified_protected_and_pending() {
        use KeepReason::*;
        let backups = [
            b("6", false), // newer than every verified: awaiting verification
            b("5", true),
            b("4", false), // superseded by 5
            b("3", true),
            b("2", true),
            b("1", true),
        ];
        assert_eq!(
            plan_prune(&backups, 2, &["1".into()]),
            [
                Some(AwaitingVerification),
                Some(Retained),
                None,
                Some(Retained),
                None,
                Some(Protected)
            ]
        );
        // keep 0 still keeps the latest verified one.
        assert_eq!(
            plan_prune(&backups, 0, &[]),
            [
                Some(AwaitingVerification),
                Some(LatestVerified),
                None,
                None,
                None,
                None
            ]
        );
        // Each kind by its own count: two emergency backups do not push out the undo's
        // snapshot or the deployment's backup.
        use BackupKind::*;
        let mixed = [
            ("e2", true, Emergency),
            ("e1", true, Emergency),
            ("d2", true, PreDeployment),
            ("d1", true, PreDeployment),
            ("u1", true, PreUndo),
        ]
        .map(|(id, v, k)| (id.to_owned(), v, k));
        assert_eq!(
            plan_prune_by_kind(&mixed, 1, &[]),
            [Some(Retained), None, Some(Retained), None, Some(Retained)]
        );
        // Nothing verified: nothing supersedes anything, nothing is deleted.
        let unverified = [b("2", false), b("1", false)];
        assert_eq!(
            plan_prune(&unverified, 0, &[]),
            [Some(AwaitingVerification), Some(AwaitingVerification)]
        );
    }
}
