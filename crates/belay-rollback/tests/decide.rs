//! The decision tree and the resolution of `<to>`, case by case: pure functions over
//! records and facts, so every branch is shown without a database.

use belay_backup::{
    BackupFormat, BackupKind, BackupScope, FileEntry, Manifest, MeasuredRate, MeasuredRates,
    TableCount,
};
use belay_deploy::{AppliedMigration, DeploymentOutcome, DeploymentRecord, NewDeployment, Step};
use belay_rollback::{
    LiveTable, PlanInput, RevertedMigration, RollbackError, RollbackTo, Strategy, Trigger, decide,
    resolve_in,
};
use chrono::Utc;
use uuid::Uuid;

fn migration(
    version: &str,
    undo: bool,
    irreversible: bool,
    writes: Option<&[&str]>,
) -> RevertedMigration {
    RevertedMigration {
        deployment_id: Uuid::nil(),
        version: Some(version.into()),
        script: format!("V{version}__m.sql"),
        has_undo: undo,
        irreversible,
        writes: writes.map(|w| w.iter().map(|s| s.to_string()).collect()),
        undo_drops: if undo {
            vec!["public.accounts".into()]
        } else {
            vec![]
        },
    }
}

fn backup(scope: BackupScope, verified: bool) -> Manifest {
    Manifest {
        manifest_version: 1,
        id: "B1".into(),
        target: "shop".into(),
        label: None,
        created_at: Utc::now(),
        duration_ms: 10,
        database: Some("shop".into()),
        server_version: "15".into(),
        server_version_num: 150000,
        pg_dump_version: "15".into(),
        schema_version: Some("1".into()),
        applied_versions: vec!["1".into()],
        kind: Some(BackupKind::PreDeployment),
        format: BackupFormat::Custom,
        scope,
        snapshot: None,
        files: vec![],
        tables: vec![TableCount {
            schema: "public".into(),
            name: "accounts".into(),
            rows: Some(10),
            columns: None,
        }],
        verified,
        verified_at: None,
        restore_tested: false,
        deployment_id: None,
    }
}

fn input(migrations: Vec<RevertedMigration>, b: Option<Manifest>, suspect: bool) -> PlanInput {
    PlanInput {
        target: "shop".into(),
        deployments: vec![Uuid::nil()],
        to_version: Some("1".into()),
        trigger: Trigger::operator("test", suspect),
        migrations,
        backup: b,
        backup_problem: None,
        live: vec![LiveTable {
            table: "public.accounts".into(),
            rows: Some(12),
        }],
        rates: MeasuredRates::default(),
    }
}

#[test]
fn each_branch_of_the_tree_picks_its_strategy_and_says_why() {
    let full = || Some(backup(BackupScope::Full, true));
    let cases: Vec<(&str, PlanInput, Strategy, &str)> = vec![
        (
            "undo everywhere: the path that loses nothing",
            input(
                vec![migration("2", true, false, Some(&["accounts"]))],
                full(),
                false,
            ),
            Strategy::Undo,
            "chosen: undo loses no data",
        ),
        (
            "no undo, tables known: table restore",
            input(
                vec![migration("2", false, false, Some(&["accounts"]))],
                full(),
                false,
            ),
            Strategy::TableRestore,
            "table restore, the smallest restore",
        ),
        (
            "no undo, tables unknown: full restore",
            input(vec![migration("2", false, false, None)], full(), false),
            Strategy::FullRestore,
            "tables written are unknown",
        ),
        (
            "data suspect: a restore even though undo exists",
            input(
                vec![migration("2", true, false, Some(&["accounts"]))],
                full(),
                true,
            ),
            Strategy::TableRestore,
            "the data is suspect",
        ),
        (
            "irreversible, no backup: escalate",
            input(
                vec![migration("2", true, true, Some(&["accounts"]))],
                None,
                false,
            ),
            Strategy::Escalate,
            "no automatic path is safe",
        ),
        (
            "unverified backup cannot be restored",
            input(
                vec![migration("2", false, false, None)],
                Some(backup(BackupScope::Full, false)),
                false,
            ),
            Strategy::Escalate,
            "no automatic path is safe",
        ),
        (
            "a tables backup without the written table: no table restore",
            input(
                vec![migration("2", false, false, Some(&["orders"]))],
                Some(backup(
                    BackupScope::Tables(vec!["public.accounts".into()]),
                    true,
                )),
                false,
            ),
            Strategy::Escalate,
            "no automatic path is safe",
        ),
    ];
    for (name, case, strategy, why) in cases {
        let plan = decide(&case);
        assert_eq!(plan.strategy, strategy, "{name}: {plan:#?}");
        let decision = plan
            .reasons
            .iter()
            .find(|r| r.branch == "decision")
            .expect("a decision");
        assert!(decision.why.contains(why), "{name}: {}", decision.why);
        // One reason per branch, always.
        let branches: Vec<&str> = plan.reasons.iter().map(|r| r.branch.as_str()).collect();
        assert_eq!(
            branches,
            ["undo", "table_restore", "full_restore", "decision"],
            "{name}"
        );
        // The chosen path's loss comes first.
        if strategy != Strategy::Escalate {
            assert_eq!(plan.losses[0].strategy, strategy, "{name}");
        }
    }
}

#[test]
fn the_estimate_uses_the_rates_measured_on_the_target_and_labels_assumed_ones() {
    let mut b = backup(BackupScope::Full, true);
    b.files = vec![FileEntry {
        path: "dump.pgdump".into(),
        size: 400_000_000,
        sha256: String::new(),
    }];
    let no_undo = || vec![migration("2", false, false, Some(&["accounts"]))];

    // Nothing measured: 400 MB at the assumed 50 MB/s (backup) and 20 MB/s (restore).
    let assumed = decide(&input(no_undo(), Some(b.clone()), false));
    assert_eq!(assumed.strategy, Strategy::TableRestore);
    assert_eq!(assumed.estimated_ms, 8_000 + 20_000 + 200);
    assert!(
        assumed
            .estimate_basis
            .contains("restore at an assumed 20 MB/s (no restore measured on this target yet)")
            && assumed
                .estimate_basis
                .contains("emergency backup at an assumed 50 MB/s (no backup measured"),
        "{}",
        assumed.estimate_basis
    );

    // Restores measured at 80 MB/s (3 of them), one backup at 100 MB/s.
    let mut measured = input(no_undo(), Some(b.clone()), false);
    measured.rates = MeasuredRates {
        create: Some(MeasuredRate {
            bytes_per_sec: 100e6,
            samples: 1,
        }),
        restore: Some(MeasuredRate {
            bytes_per_sec: 80e6,
            samples: 3,
        }),
    };
    let plan = decide(&measured);
    assert_eq!(plan.estimated_ms, 4_000 + 5_000 + 200);
    assert!(
        plan.estimate_basis
            .contains("restore at 80.0 MB/s measured on this target (3 restores)")
            && plan
                .estimate_basis
                .contains("emergency backup at 100.0 MB/s measured on this target (1 backup)"),
        "{}",
        plan.estimate_basis
    );

    // Only the restore measured: the backup's rate is still assumed, and says so; an undo
    // uses the backup rate alone.
    let mut half = input(no_undo(), Some(b.clone()), false);
    half.rates.restore = measured.rates.restore;
    let plan = decide(&half);
    assert_eq!(plan.estimated_ms, 8_000 + 5_000 + 200);
    assert!(
        plan.estimate_basis.contains("an assumed 50 MB/s"),
        "{}",
        plan.estimate_basis
    );
    let mut undo = input(
        vec![migration("2", true, false, Some(&["accounts"]))],
        Some(b),
        false,
    );
    undo.rates = measured.rates;
    let plan = decide(&undo);
    assert_eq!(plan.strategy, Strategy::Undo);
    assert_eq!(plan.estimated_ms, 4_000 + 500 + 200);
}

#[test]
fn an_irreversible_migration_is_named_in_the_refusal_of_undo() {
    let plan = decide(&input(
        vec![
            migration("3", true, false, Some(&["accounts"])),
            migration("2", true, true, Some(&["accounts"])),
        ],
        Some(backup(BackupScope::Full, true)),
        false,
    ));
    let undo = &plan.reasons[0];
    assert!(!undo.possible);
    assert!(
        undo.why
            .contains("V2 (V2__m.sql) is marked `-- belay:irreversible`"),
        "{}",
        undo.why
    );
    assert_ne!(plan.strategy, Strategy::Undo);
}

#[test]
fn a_restore_names_the_rows_it_would_lose() {
    let plan = decide(&input(
        vec![migration("2", false, false, Some(&["accounts"]))],
        Some(backup(BackupScope::Full, true)),
        false,
    ));
    let loss = plan.chosen_loss().expect("a loss entry");
    assert!(!loss.loses_no_data);
    assert_eq!(
        loss.items,
        [
            "accounts: 12 rows now, 10 in the backup: writes since the deployment are lost (at least 2)"
        ]
    );
    assert_eq!(plan.tables, ["accounts"]);
}

fn record(
    id: u128,
    step: Step,
    release: Option<&str>,
    from: Option<&str>,
    versions: &[&str],
) -> DeploymentRecord {
    DeploymentRecord {
        start: NewDeployment {
            id: Uuid::from_u128(id),
            target: "local".into(),
            started_at: Utc::now(),
            environment: None,
            requested_by: None,
            release: release.map(str::to_string),
            from_version: from.map(str::to_string),
            to_version: None,
            policy: serde_json::Value::Null,
        },
        step,
        outcome: Some(DeploymentOutcome {
            state: step,
            finished_at: Utc::now(),
            failed_step: None,
            reason: None,
            evidence: serde_json::Value::Null,
            to_version: versions.last().map(|v| v.to_string()),
            backup_id: None,
            applied: versions
                .iter()
                .map(|v| AppliedMigration {
                    version: Some(v.to_string()),
                    script: format!("V{v}__m.sql"),
                    checksum: None,
                    has_undo: true,
                    irreversible: false,
                })
                .collect(),
        }),
    }
}

#[test]
fn to_resolves_deployments_versions_and_releases_or_refuses_naming_why() {
    // Newest first.
    let records = vec![
        record(3, Step::Succeeded, Some("1.2.0"), Some("2"), &["3"]),
        record(2, Step::Succeeded, Some("1.1.0"), Some("1"), &["2"]),
        record(1, Step::Succeeded, Some("1.0.0"), None, &["1"]),
    ];
    let ids = |r: Result<belay_rollback::Resolved, RollbackError>| {
        r.expect("resolves")
            .deployments
            .iter()
            .map(|d| d.start.id.as_u128())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(resolve_in(&records, &RollbackTo::Version("1".into()))),
        [3, 2]
    );
    assert_eq!(
        ids(resolve_in(&records, &RollbackTo::Release("1.1.0".into()))),
        [3]
    );
    let newest = Uuid::from_u128(3).to_string();
    assert_eq!(
        ids(resolve_in(
            &records,
            &RollbackTo::Deployment(newest.clone())
        )),
        [3]
    );

    let refused = |to: RollbackTo| resolve_in(&records, &to).expect_err("refused").to_string();
    let older = Uuid::from_u128(2).to_string();
    assert!(refused(RollbackTo::Deployment(older.clone())).contains("newer deployments on top"));
    assert!(refused(RollbackTo::Version("3".into())).contains("nothing to roll back"));
    assert!(refused(RollbackTo::Version("latest".into())).contains("neither a deployment id"));
    assert!(refused(RollbackTo::Release("2.0.0".into())).contains("recorded: 1.2.0, 1.1.0, 1.0.0"));
    assert!(refused(RollbackTo::Deployment("0000".into())).contains("matches 3 deployments"));

    let mut rolled = records.clone();
    rolled[0].step = Step::RolledBack;
    assert!(
        resolve_in(&rolled, &RollbackTo::Deployment(newest.clone()))
            .expect_err("refused")
            .to_string()
            .contains("already rolled back")
    );
    let mut busy = records.clone();
    busy[0].step = Step::RollingBack;
    assert!(
        resolve_in(&busy, &RollbackTo::Version("1".into()))
            .expect_err("refused")
            .to_string()
            .contains("is being rolled back")
    );

    // A positional TO is a deployment only when it is a unique id prefix.
    assert_eq!(
        RollbackTo::positional(&newest, &records),
        RollbackTo::Deployment(newest.clone())
    );
    assert_eq!(
        RollbackTo::positional("2", &records),
        RollbackTo::Version("2".into())
    );
}

#[test]
fn a_hook_that_runs_over_its_timeout_is_killed_and_reported() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let hook = belay_rollback::HookCommand {
        command: "echo started; exec sleep 30".into(),
        timeout: std::time::Duration::from_millis(200),
    };
    let run = rt.block_on(belay_rollback::hooks::run(&hook, &[]));
    assert!(!run.ok);
    assert!(run.status.starts_with("timed out after"), "{run:?}");
    let ok = belay_rollback::HookCommand {
        command: "echo \"phase $BELAY_ROLLBACK_PHASE\"".into(),
        timeout: std::time::Duration::from_secs(10),
    };
    let run = rt.block_on(belay_rollback::hooks::run(
        &ok,
        &[("BELAY_ROLLBACK_PHASE", "before".into())],
    ));
    assert!(run.ok, "{run:?}");
    assert_eq!(run.output, "phase before");
}

#[test]
fn a_plan_over_hundreds_of_migrations_names_the_ends_and_the_count_not_each_one() {
    // A whole project's deployment (lemmy: 233 migrations) made a one-line reason and a
    // step thousands of characters long; the JSON keeps every migration.
    let many: Vec<RevertedMigration> = (2..=201)
        .rev()
        .map(|v| migration(&v.to_string(), true, false, None))
        .collect();
    let plan = decide(&input(many, Some(backup(BackupScope::Full, true)), false));
    assert_eq!(plan.strategy, Strategy::Undo);
    assert_eq!(plan.migrations.len(), 200);
    let undo_step = plan
        .steps
        .iter()
        .find(|s| s.starts_with("run the undo scripts of"))
        .expect("an undo step");
    assert!(undo_step.contains("(200 migrations)"), "{undo_step}");
    assert!(undo_step.contains("V201 (V201__m.sql)"), "{undo_step}");
    assert!(undo_step.contains("V2 (V2__m.sql)"), "{undo_step}");
    assert!(!undo_step.contains("V100 "), "{undo_step}");
    let table = plan
        .reasons
        .iter()
        .find(|r| r.branch == "table_restore")
        .expect("a table_restore reason");
    assert!(
        table.why.contains("(200 migrations) writes are unknown"),
        "{}",
        table.why
    );
    assert!(table.why.len() < 300, "{}", table.why);
}
