//! The planner: which deployments `<to>` names ([`resolve`]), the facts a decision needs
//! (gathered over the capability traits by [`Planner`]), and the decision tree itself
//! ([`decide`], a pure function with one reason per branch).

use std::cmp::Ordering;
use std::sync::Arc;

use belay_backup::{BackupApi, Manifest, MeasuredRate, MeasuredRates};
use belay_core::{ApiError, ErrorKind, Version};
use belay_deploy::{DeploymentLog, DeploymentRecord, Step};
use uuid::Uuid;

use crate::error::RollbackError;
use crate::facts::{LiveTable, ScriptFacts, TableStats};
use crate::model::{
    BackupUse, PathLoss, Reason, RevertedMigration, RollbackPlan, Strategy, Trigger,
};

/// What `belay rollback plan|execute <to>` names.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum RollbackTo {
    /// A deployment id or a unique prefix of one (at least 4 characters).
    Deployment(String),
    /// A schema version: every deployment that applied a newer one is rolled back.
    Version(String),
    /// An application release recorded at deploy time (`migrate --release`): back to the
    /// schema that release ran on.
    Release(String),
    /// What the command line gave as `<to>`, read by [`RollbackTo::positional`] against
    /// the records where they are (an agent's log, not the caller's).
    Positional(String),
}

impl RollbackTo {
    /// A positional `<to>`: a deployment when it is a prefix (4+ characters) of exactly
    /// one recorded deployment id, else a schema version.
    pub fn positional(text: &str, records: &[DeploymentRecord]) -> RollbackTo {
        let lower = text.to_ascii_lowercase();
        let is_prefix = lower.len() >= 4
            && lower.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
            && records
                .iter()
                .filter(|r| r.start.id.to_string().starts_with(&lower))
                .count()
                == 1;
        if is_prefix {
            RollbackTo::Deployment(lower)
        } else {
            RollbackTo::Version(text.to_string())
        }
    }
}

/// The deployments a rollback reverts, newest first, and the version it returns to.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub deployments: Vec<DeploymentRecord>,
    pub to_version: Option<String>,
}

fn cmp_versions(a: &str, b: &str) -> Ordering {
    match (Version::parse(a), Version::parse(b)) {
        (Ok(a), Ok(b)) => a.cmp(&b),
        _ => a.cmp(b),
    }
}

/// Whether a deployment's migrations are still in place (a rollback may revert them).
fn in_place(r: &DeploymentRecord) -> bool {
    matches!(r.step, Step::Succeeded | Step::Failed)
        && r.outcome.as_ref().is_some_and(|o| !o.applied.is_empty())
}

/// A deployment no rollback may act on without a person: one in progress, or one whose
/// rollback failed.
fn blocking(r: &DeploymentRecord) -> Option<String> {
    match r.step {
        Step::RollingBack => Some(format!(
            "deployment {} is being rolled back (or its rollback was interrupted); see `belay rollback status {}`",
            r.start.id, r.start.id
        )),
        Step::Escalated => Some(format!(
            "the rollback of deployment {} escalated: a person must decide first; see `belay rollback status {}`",
            r.start.id, r.start.id
        )),
        Step::Succeeded | Step::Failed | Step::RolledBack => None,
        _ => Some(format!(
            "deployment {} is still running (at {}); wait for it to end",
            r.start.id, r.step
        )),
    }
}

/// The deployments `to` names, from the log's newest `limit`.
pub async fn resolve(
    log: &dyn DeploymentLog,
    to: &RollbackTo,
    limit: usize,
) -> Result<Resolved, RollbackError> {
    let records = log.list(limit).await?;
    resolve_in(&records, to)
}

/// [`resolve`] over records already read (newest first).
pub fn resolve_in(
    records: &[DeploymentRecord],
    to: &RollbackTo,
) -> Result<Resolved, RollbackError> {
    if let RollbackTo::Positional(text) = to {
        return resolve_in(records, &RollbackTo::positional(text, records));
    }
    let newer_than = |v: &Option<String>| {
        let v = v.clone();
        move |r: &&DeploymentRecord| {
            r.outcome.as_ref().is_some_and(|o| {
                o.applied.iter().any(|a| match (&a.version, &v) {
                    (Some(av), Some(v)) => cmp_versions(av, v) == Ordering::Greater,
                    (Some(_), None) => true,
                    (None, _) => false,
                })
            })
        }
    };
    let (chosen, to_version): (Vec<&DeploymentRecord>, Option<String>) = match to {
        RollbackTo::Deployment(prefix) => {
            let prefix = prefix.to_ascii_lowercase();
            let matches: Vec<&DeploymentRecord> = records
                .iter()
                .filter(|r| r.start.id.to_string().starts_with(&prefix))
                .collect();
            let record = match matches.as_slice() {
                [] => {
                    return Err(RollbackError::NotFound(format!(
                        "no deployment id starts with {prefix:?}; `belay rollback list` shows them"
                    )));
                }
                [one] => *one,
                many => {
                    return Err(RollbackError::Invalid(format!(
                        "{prefix:?} matches {} deployments ({}); give more of the id",
                        many.len(),
                        many.iter()
                            .map(|r| r.start.id.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            };
            if record.step == Step::RolledBack {
                return Err(RollbackError::Refused(format!(
                    "deployment {} is already rolled back; nothing to do",
                    record.start.id
                )));
            }
            if let Some(why) = blocking(record) {
                return Err(RollbackError::Refused(why));
            }
            if !in_place(record) {
                return Err(RollbackError::Refused(format!(
                    "deployment {} applied no migration; nothing to roll back",
                    record.start.id
                )));
            }
            let newer: Vec<String> = records
                .iter()
                .take_while(|r| r.start.id != record.start.id)
                .filter(|r| in_place(r))
                .map(|r| r.start.id.to_string())
                .collect();
            if !newer.is_empty() {
                return Err(RollbackError::Refused(format!(
                    "deployment {} has newer deployments on top of it ({}); roll those back first, or name the version to return to (`belay rollback plan {}`)",
                    record.start.id,
                    newer.join(", "),
                    record.start.from_version.as_deref().unwrap_or("0"),
                )));
            }
            (vec![record], record.start.from_version.clone())
        }
        RollbackTo::Version(v) => {
            if Version::parse(v).is_err() {
                return Err(RollbackError::Invalid(format!(
                    "{v:?} is neither a deployment id (a unique prefix of 4+ characters) nor a schema version"
                )));
            }
            let newer: Vec<&DeploymentRecord> = records
                .iter()
                .filter(newer_than(&Some(v.clone())))
                .collect();
            if let Some(why) = newer.iter().find_map(|r| blocking(r)) {
                return Err(RollbackError::Refused(why));
            }
            (
                newer.into_iter().filter(|r| in_place(r)).collect(),
                Some(v.clone()),
            )
        }
        // Read above: `positional` never returns another `Positional`.
        RollbackTo::Positional(text) => {
            return Err(RollbackError::Invalid(format!(
                "{text:?} is neither a deployment id nor a schema version"
            )));
        }
        RollbackTo::Release(release) => {
            let Some(base) = records.iter().find(|r| {
                r.start.release.as_deref() == Some(release.as_str()) && r.step == Step::Succeeded
            }) else {
                let mut known: Vec<&str> = records
                    .iter()
                    .filter_map(|r| r.start.release.as_deref())
                    .collect();
                known.dedup();
                return Err(RollbackError::NotFound(format!(
                    "no succeeded deployment recorded release {release:?} (recorded: {}); releases are recorded by `migrate --release`",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                )));
            };
            let reached = base
                .outcome
                .as_ref()
                .and_then(|o| o.to_version.clone())
                .or_else(|| base.start.from_version.clone());
            let newer: Vec<&DeploymentRecord> = records
                .iter()
                .take_while(|r| r.start.id != base.start.id)
                .filter(newer_than(&reached))
                .collect();
            if let Some(why) = newer.iter().find_map(|r| blocking(r)) {
                return Err(RollbackError::Refused(why));
            }
            (newer.into_iter().filter(|r| in_place(r)).collect(), reached)
        }
    };
    if chosen.is_empty() {
        return Err(RollbackError::Refused(format!(
            "nothing to roll back: no deployment on record applied a migration newer than {}",
            to_version.as_deref().unwrap_or("the start")
        )));
    }
    // Deployments in between that cannot be acted on stop the whole rollback.
    if let Some(why) = records
        .iter()
        .take_while(|r| chosen.last().is_some_and(|c| c.start.id != r.start.id))
        .find_map(blocking)
    {
        return Err(RollbackError::Refused(why));
    }
    Ok(Resolved {
        deployments: chosen.into_iter().cloned().collect(),
        to_version,
    })
}

/// Everything [`decide`] needs: gathered by [`Planner::gather`], or built by hand in tests.
#[derive(Debug, Clone)]
pub struct PlanInput {
    pub target: String,
    pub deployments: Vec<Uuid>,
    pub to_version: Option<String>,
    pub trigger: Trigger,
    /// Newest first.
    pub migrations: Vec<RevertedMigration>,
    /// The oldest deployment's pre-deployment backup, if it can be read.
    pub backup: Option<Manifest>,
    /// Why there is no backup to use, when there is none.
    pub backup_problem: Option<String>,
    /// Live row counts of the tables a restore would overwrite.
    pub live: Vec<LiveTable>,
    /// The median rates of this target's recent backups and restores, where measured.
    pub rates: MeasuredRates,
}

/// Rates assumed when none was measured on the target (conservative for local disks).
const ASSUMED_RESTORE_RATE: f64 = 20e6;
const ASSUMED_DUMP_RATE: f64 = 50e6;
/// Per migration undone (with its snapshot), as measured by `cargo xtask bench rollback`.
const UNDO_STEP_MS: u64 = 500;
/// Verification's own queries (history, postflight), measured the same way.
const VERIFY_MS: u64 = 200;

/// The decision tree: prefer a path that loses nothing, refuse undo across an
/// irreversible migration (naming it) or a migration without undo, restore only what the
/// migrations wrote when that is known, the whole database (but belay's history) when it
/// is not, and escalate when no verified backup exists.
pub fn decide(input: &PlanInput) -> RollbackPlan {
    let mut reasons = Vec::new();
    let migrations = &input.migrations;
    // A deployment of a whole project reverts hundreds of migrations: a reason or a step
    // names the first and last few, and says how many (the plan's JSON lists each).
    let names = |ms: Vec<&RevertedMigration>| {
        let each: Vec<String> = ms
            .iter()
            .map(|m| match &m.version {
                Some(v) => format!("V{v} ({})", m.script),
                None => m.script.clone(),
            })
            .collect();
        if each.len() <= 6 {
            return each.join(", ");
        }
        format!(
            "{} … {} ({} migrations)",
            each[..3].join(", "),
            each[each.len() - 2..].join(", "),
            each.len()
        )
    };

    // Branch 1: undo.
    let irreversible: Vec<&RevertedMigration> =
        migrations.iter().filter(|m| m.irreversible).collect();
    let without_undo: Vec<&RevertedMigration> = migrations
        .iter()
        .filter(|m| !m.has_undo && !m.irreversible)
        .collect();
    let undo_possible = irreversible.is_empty() && without_undo.is_empty();
    let undo_why = if !irreversible.is_empty() {
        format!(
            "refused: {} is marked `-- belay:irreversible`; its undo cannot bring the old state back",
            names(irreversible.clone())
        )
    } else if !without_undo.is_empty() {
        format!(
            "impossible: {} has no undo script",
            names(without_undo.clone())
        )
    } else if input.trigger.data_suspect {
        "possible, but the data itself is suspect: undo scripts would keep the bad rows".to_string()
    } else {
        format!(
            "possible: every migration ({}) has an undo script and none is irreversible",
            migrations.len()
        )
    };
    reasons.push(Reason {
        branch: "undo".into(),
        possible: undo_possible,
        why: undo_why,
    });

    // Branch 2 and 3: restores need a verified pre-deployment backup.
    let backup = input.backup.as_ref();
    let backup_ok = backup.is_some_and(|b| b.verified && b.scope.has_data());
    let backup_why = match backup {
        None => input
            .backup_problem
            .clone()
            .unwrap_or_else(|| "the deployment recorded no pre-deployment backup".into()),
        Some(b) if !b.verified => format!("backup {} is not verified", b.id),
        Some(b) if !b.scope.has_data() => format!("backup {} holds no data (schema only)", b.id),
        Some(b) => format!("backup {} ({}, verified)", b.id, b.scope.name()),
    };
    let written: Option<Vec<String>> = migrations.iter().try_fold(Vec::new(), |mut acc, m| {
        for t in m.writes.as_ref()? {
            if !acc.contains(t) {
                acc.push(t.clone());
            }
        }
        Some(acc)
    });
    let in_backup = |t: &str| {
        backup.is_some_and(|b| match &b.scope {
            belay_backup::BackupScope::Full => true,
            belay_backup::BackupScope::Tables(ts) => ts.iter().any(|x| same_table(x, t)),
            belay_backup::BackupScope::SchemaOnly => false,
        })
    };
    let unknown: Vec<&RevertedMigration> =
        migrations.iter().filter(|m| m.writes.is_none()).collect();
    let table_possible = backup_ok
        && written
            .as_ref()
            .is_some_and(|w| !w.is_empty() && w.iter().all(|t| in_backup(t)));
    let table_why = if !backup_ok {
        format!("impossible: {backup_why}")
    } else if !unknown.is_empty() {
        format!(
            "impossible: the tables {} writes are unknown (add `-- belay:tables=` to say which)",
            names(unknown)
        )
    } else if written.as_ref().is_some_and(|w| w.is_empty()) {
        "impossible: the migrations write no existing table".to_string()
    } else {
        format!(
            "possible: the migrations write {} and {backup_why} holds them",
            written.clone().unwrap_or_default().join(", ")
        )
    };
    reasons.push(Reason {
        branch: "table_restore".into(),
        possible: table_possible,
        why: table_why,
    });
    let full_possible =
        backup_ok && backup.is_some_and(|b| b.scope == belay_backup::BackupScope::Full);
    reasons.push(Reason {
        branch: "full_restore".into(),
        possible: full_possible,
        why: if full_possible {
            format!(
                "possible: {backup_why} holds the whole database; belay's history is kept as it is"
            )
        } else if backup_ok {
            format!("impossible: {backup_why} is not a full backup")
        } else {
            format!("impossible: {backup_why}")
        },
    });

    // What each path loses.
    let mut losses = Vec::new();
    if undo_possible {
        let mut items: Vec<String> = Vec::new();
        for m in migrations {
            for t in &m.undo_drops {
                items.push(format!(
                    "the undo of {} drops data of {t}: snapshotted (verified) before it runs",
                    m.script
                ));
            }
        }
        losses.push(PathLoss {
            strategy: Strategy::Undo,
            loses_no_data: true,
            items: if items.is_empty() {
                vec!["nothing: the undo scripts drop no data, and rows written since stay".into()]
            } else {
                items
            },
        });
    }
    let restore_loss = |tables: &[String]| -> Vec<String> {
        tables
            .iter()
            .map(|t| {
                let then = backup
                    .and_then(|b| b.tables.iter().find(|c| same_table(&c.qualified(), t)))
                    .and_then(|c| c.rows);
                let now = input.live.iter().find(|l| same_table(&l.table, t)).and_then(|l| l.rows);
                match (then, now) {
                    (Some(then), Some(now)) if now != then => format!(
                        "{t}: {now} rows now, {then} in the backup: writes since the deployment are lost (at least {})",
                        (now - then).abs()
                    ),
                    (Some(then), Some(_)) => format!(
                        "{t}: {then} rows, as in the backup; rows updated since would still be lost"
                    ),
                    (None, Some(now)) => format!("{t}: {now} rows now, not in the backup: replaced"),
                    (_, None) => format!("{t}: does not exist now"),
                }
            })
            .collect()
    };
    if table_possible {
        let tables = written.clone().unwrap_or_default();
        losses.push(PathLoss {
            strategy: Strategy::TableRestore,
            loses_no_data: false,
            items: restore_loss(&tables),
        });
    }
    if full_possible {
        let tables: Vec<String> = backup
            .map(|b| {
                b.tables
                    .iter()
                    .filter(|t| t.rows.is_some())
                    .map(|t| t.qualified())
                    .filter(|t| input.live.iter().any(|l| same_table(&l.table, t)))
                    .collect()
            })
            .unwrap_or_default();
        let mut items = restore_loss(&tables);
        items.push("every write since the backup, in every table but belay's history".into());
        losses.push(PathLoss {
            strategy: Strategy::FullRestore,
            loses_no_data: false,
            items,
        });
    }

    let strategy = if undo_possible && !input.trigger.data_suspect {
        Strategy::Undo
    } else if table_possible {
        Strategy::TableRestore
    } else if full_possible {
        Strategy::FullRestore
    } else if undo_possible {
        Strategy::Undo
    } else {
        Strategy::Escalate
    };
    let preferred = match strategy {
        Strategy::Undo => "chosen: undo loses no data (what it drops is snapshotted first; rows written since stay)".to_string(),
        Strategy::TableRestore if undo_possible => "chosen: table restore, as the data is suspect; it loses the writes listed".into(),
        Strategy::TableRestore => "chosen: table restore, the smallest restore that reverts every migration; no path without loss exists".into(),
        Strategy::FullRestore => "chosen: full restore, as the tables written are unknown; no path without loss exists".into(),
        Strategy::Escalate => "escalate: no automatic path is safe; a person must decide".into(),
    };
    reasons.push(Reason {
        branch: "decision".into(),
        possible: strategy != Strategy::Escalate,
        why: preferred,
    });
    losses.sort_by_key(|l| l.strategy != strategy);

    let mut backups = Vec::new();
    if let Some(b) = backup {
        backups.push(BackupUse {
            id: b.id.clone(),
            role: "pre_deployment".into(),
            verified: b.verified,
            size: b.total_size(),
            scope: b.scope.name().into(),
        });
    }
    let tables = if strategy == Strategy::TableRestore {
        written.unwrap_or_default()
    } else {
        Vec::new()
    };
    let back_to = input
        .to_version
        .as_deref()
        .unwrap_or("before any migration");
    let mut steps = vec![
        "record the rollback (rolling_back) and run the `before` hook, if any".to_string(),
        "take a verified emergency backup of the database as it is now".to_string(),
    ];
    steps.push(match strategy {
        Strategy::Undo => format!(
            "run the undo scripts of {} newest first, back to version {back_to} (each in its transaction, lock-safe; dropped data snapshotted first)",
            names(migrations.iter().collect())
        ),
        Strategy::TableRestore => format!(
            "restore {} from backup {} in place (one transaction, lock_timeout with retries)",
            tables.join(", "),
            backup.map(|b| b.id.as_str()).unwrap_or("?")
        ),
        Strategy::FullRestore => format!(
            "restore backup {} in full but belay's history (one transaction, lock_timeout with retries)",
            backup.map(|b| b.id.as_str()).unwrap_or("?")
        ),
        Strategy::Escalate => "stop and escalate: nothing is changed".into(),
    });
    if matches!(strategy, Strategy::TableRestore | Strategy::FullRestore) {
        steps.push(format!(
            "record {} as reverted in belay's history (UNDO_SQL rows noting the restore)",
            names(migrations.iter().collect())
        ));
    }
    if strategy != Strategy::Escalate {
        steps.push(format!(
            "verify: history at version {back_to}, postflight checks pass, probes pass for the settle period"
        ));
        steps.push("run the `after` hook, if any, and record the outcome (rolled_back) with the incident report".into());
    }

    let size = backup.map(|b| b.total_size()).unwrap_or(0) as f64;
    let (restore_rate, restore_basis) =
        rate_basis(input.rates.restore, ASSUMED_RESTORE_RATE, "restore");
    let (dump_rate, dump_basis) = rate_basis(input.rates.create, ASSUMED_DUMP_RATE, "backup");
    let emergency_ms = (size / dump_rate * 1000.0) as u64;
    let (estimated_ms, estimate_basis) = match strategy {
        Strategy::Undo => (
            emergency_ms + UNDO_STEP_MS * migrations.len() as u64 + VERIFY_MS,
            format!(
                "emergency backup of {} bytes at {dump_basis}, ~{UNDO_STEP_MS} ms per undo script, ~{VERIFY_MS} ms to verify; the settle period comes on top",
                size as u64,
            ),
        ),
        Strategy::TableRestore | Strategy::FullRestore => (
            emergency_ms + (size / restore_rate * 1000.0) as u64 + VERIFY_MS,
            format!(
                "backup of {} bytes: emergency backup at {dump_basis}, restore at {restore_basis}, ~{VERIFY_MS} ms to verify; the settle period comes on top",
                size as u64,
            ),
        ),
        Strategy::Escalate => (0, "nothing runs".into()),
    };

    RollbackPlan {
        target: input.target.clone(),
        deployments: input.deployments.clone(),
        to_version: input.to_version.clone(),
        trigger: input.trigger.clone(),
        strategy,
        reasons,
        steps,
        migrations: migrations.clone(),
        backups,
        tables,
        losses,
        estimated_ms,
        estimate_basis,
        resume: None,
    }
}

/// The rate to estimate with, and how it reads: the target's measured median when there
/// is one, else `assumed` (bytes per second), labelled as assumed.
fn rate_basis(measured: Option<MeasuredRate>, assumed: f64, what: &str) -> (f64, String) {
    match measured {
        Some(m) if m.bytes_per_sec > 0.0 => (
            m.bytes_per_sec,
            format!(
                "{:.1} MB/s measured on this target ({} {what}{})",
                m.bytes_per_sec / 1e6,
                m.samples,
                if m.samples == 1 { "" } else { "s" }
            ),
        ),
        _ => (
            assumed,
            format!(
                "an assumed {:.0} MB/s (no {what} measured on this target yet)",
                assumed / 1e6
            ),
        ),
    }
}

/// `public.accounts` and `accounts` name the same table here (search path `public`).
fn same_table(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        let s = s.replace('"', "");
        if s.contains('.') {
            s
        } else {
            format!("public.{s}")
        }
    };
    norm(a) == norm(b)
}

/// Gathers the facts a plan needs over the capability traits.
#[derive(Clone)]
pub struct Planner {
    pub backups: Arc<dyn BackupApi>,
    /// The target's name in the backup catalog (locally: named after the database).
    pub backup_target: String,
    /// belay's own schema: a restore leaves it as it is, so it is no loss.
    pub history_schema: String,
    pub scripts: Arc<dyn ScriptFacts>,
    pub stats: Arc<dyn TableStats>,
}

impl std::fmt::Debug for Planner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Planner").finish_non_exhaustive()
    }
}

impl Planner {
    /// The facts about `resolved` on `target`, for [`decide`].
    pub async fn gather(
        &self,
        target: &str,
        resolved: &Resolved,
        trigger: Trigger,
    ) -> Result<PlanInput, RollbackError> {
        let mut migrations = Vec::new();
        for record in &resolved.deployments {
            let Some(outcome) = &record.outcome else {
                continue;
            };
            for a in outcome.applied.iter().rev() {
                // Repeatables are re-run, not reverted.
                if a.version.is_none() {
                    continue;
                }
                let fact = self.scripts.fact(target, &a.script).await?;
                migrations.push(RevertedMigration {
                    deployment_id: record.start.id,
                    version: a.version.clone(),
                    script: a.script.clone(),
                    has_undo: a.has_undo,
                    irreversible: a.irreversible,
                    writes: fact.as_ref().and_then(|f| f.writes.clone()),
                    undo_drops: fact.map(|f| f.undo_drops).unwrap_or_default(),
                });
            }
        }
        let oldest = resolved.deployments.last();
        let backup_id = oldest.and_then(|r| r.outcome.as_ref()?.backup_id.clone());
        let (backup, backup_problem) = match &backup_id {
            None => (None, Some("the deployment recorded no pre-deployment backup (was it run with --backup none?)".to_string())),
            Some(id) => match self.backups.manifest(&self.backup_target, id).await {
                Ok(m) => (Some(m), None),
                Err(e) if e.kind == ErrorKind::Unavailable => return Err(RollbackError::Api(e)),
                Err(e) => (None, Some(format!("backup {id} cannot be read: {}", e.message))),
            },
        };
        let mut tables: Vec<String> = Vec::new();
        for m in &migrations {
            for t in m.writes.iter().flatten() {
                if !tables.contains(t) {
                    tables.push(t.clone());
                }
            }
        }
        if let Some(b) = &backup {
            for t in b
                .tables
                .iter()
                .filter(|t| t.rows.is_some() && t.schema != self.history_schema)
            {
                let q = t.qualified();
                if !tables.iter().any(|x| same_table(x, &q)) {
                    tables.push(q);
                }
            }
        }
        let live = if tables.is_empty() {
            Vec::new()
        } else {
            self.stats.rows(target, &tables).await?
        };
        // Only the estimate depends on them: a plan made without is labelled assumed.
        let rates = match self.backups.measured_rates(&self.backup_target).await {
            Ok(rates) => rates,
            Err(err) => {
                tracing::warn!(target, error = %err.message, "measured rates unreadable; estimating with assumed ones");
                MeasuredRates::default()
            }
        };
        Ok(PlanInput {
            target: target.to_string(),
            deployments: resolved.deployments.iter().map(|r| r.start.id).collect(),
            to_version: resolved.to_version.clone(),
            trigger,
            migrations,
            backup,
            backup_problem,
            live,
            rates,
        })
    }

    /// Gathers and decides.
    pub async fn plan(
        &self,
        target: &str,
        resolved: &Resolved,
        trigger: Trigger,
    ) -> Result<RollbackPlan, RollbackError> {
        let input = self.gather(target, resolved, trigger).await?;
        Ok(decide(&input))
    }
}

impl From<ApiError> for RollbackError {
    fn from(e: ApiError) -> Self {
        RollbackError::Api(e)
    }
}
