//! Every failure mode: a message that names the file, a documented exit code, and nothing
//! applied that should not be.

mod support;
use support::*;

#[test]
fn failure_in_migration_k_keeps_earlier_ones_and_records_nothing_for_k() {
    let db = db();
    let dir = migrations(&[
        ("V1__one.sql", "CREATE TABLE one (id int);"),
        ("V2__two.sql", "CREATE TABLE two (id int);"),
        (
            "V3__bad.sql",
            "-- a comment\nCREATE TABLE three (id int);\nSELEC 1;\n",
        ),
        ("V4__four.sql", "CREATE TABLE four (id int);"),
    ]);
    // --no-lint: the linter would refuse V3's syntax error before anything runs; this test
    // is about the executor's handling of a failing statement.
    let r = belay(&db.url, dir.path(), &["migrate", "--no-lint"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("V3__bad.sql:3:1: syntax error at or near \"SELEC\""),
        "{r:?}"
    );
    assert!(r.stderr.contains("SQLSTATE 42601"), "{r:?}");
    let s = states(&db.url, dir.path());
    let want: Vec<(String, String)> = [
        ("1", "success"),
        ("2", "success"),
        ("3", "pending"),
        ("4", "pending"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(s, want);
    // Nothing of migration 3 is left: its CREATE TABLE rolled back with it, no history row.
    assert_eq!(psql(&db.url, "SELECT to_regclass('three') IS NULL"), "t");
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*) FROM belay.schema_history WHERE version = '3'"
        ),
        "0"
    );
}

#[test]
fn error_position_maps_to_line_and_column_mid_script() {
    let db = db();
    let dir = migrations(&[(
        "1_x.up.sql",
        "CREATE TABLE a (id int); SELECT nope FROM a;\n\nSELECT 1;\n",
    )]);
    let r = belay(&db.url, dir.path(), &["migrate"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("1_x.up.sql:1:33: column \"nope\" does not exist"),
        "{r:?}"
    );
    // The script's statements go to the server in one message: the position the server
    // gives counts characters from the message's start, é and the statements before
    // included, and still lands on the failing statement's own line and column.
    let dir = migrations(&[(
        "1_x.up.sql",
        "-- café\nCREATE TABLE b (id int, note text DEFAULT 'é');\nINSERT INTO b (id)\n  SELECT nope FROM b;\n",
    )]);
    let r = belay(&db.url, dir.path(), &["migrate"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("1_x.up.sql:4:10: column \"nope\" does not exist"),
        "{r:?}"
    );
}

#[test]
fn edited_applied_migration_fails_validate_and_migrate_until_repaired() {
    let db = db();
    let dir = migrations(&[
        ("V1__one.sql", "CREATE TABLE one (id int);"),
        ("V2__two.sql", "CREATE TABLE two (id int);"),
    ]);
    belay_ok(&db.url, dir.path(), &["migrate"]);
    belay_ok(&db.url, dir.path(), &["validate"]);
    std::fs::write(
        dir.path().join("V2__two.sql"),
        "CREATE TABLE two (id bigint);",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("V3__three.sql"),
        "CREATE TABLE three (id int);",
    )
    .unwrap();

    let r = belay(&db.url, dir.path(), &["validate"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stdout
            .contains("V2__two.sql: changed after it was applied"),
        "{r:?}"
    );
    let r = belay(&db.url, dir.path(), &["migrate"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .contains("V2__two.sql) changed after it was applied"),
        "{r:?}"
    );
    assert!(r.stderr.contains("belay validate"), "{r:?}");
    assert_eq!(
        psql(&db.url, "SELECT to_regclass('three') IS NULL"),
        "t",
        "migrate refused, yet applied V3"
    );

    let r = belay_ok(&db.url, dir.path(), &["repair"]);
    assert!(r.stdout.contains("realigned"), "{r:?}");
    belay_ok(&db.url, dir.path(), &["validate"]);
    belay_ok(&db.url, dir.path(), &["migrate"]);
    assert_eq!(
        psql(&db.url, "SELECT to_regclass('three') IS NOT NULL"),
        "t"
    );
}

#[test]
fn bad_migration_sources_name_the_file_and_apply_nothing() {
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        (
            &[
                ("V1__ok.sql", "CREATE TABLE a();"),
                ("V2_missing_underscore.sql", ""),
            ],
            &["V2_missing_underscore.sql", "malformed"],
        ),
        (
            &[("V1__ok.sql", "CREATE TABLE a();"), ("V1.0__again.sql", "")],
            &["duplicate version", "V1__ok.sql", "V1.0__again.sql"],
        ),
        (
            &[("V1__ok.sql", "-- belay:lock-timout=1s\nCREATE TABLE a();")],
            &["V1__ok.sql", "unknown directive `belay:lock-timout`"],
        ),
        (
            &[("V1__ok.sql", "CREATE TABLE a();"), ("2_other.up.sql", "")],
            &["mixed migration layouts", "V1__ok.sql", "2_other.up.sql"],
        ),
        (
            &[("V1__ok.sql", "CREATE TABLE a();"), ("U2__orphan.sql", "")],
            &["U2__orphan.sql", "undo script without a forward"],
        ),
    ];
    for (files, wants) in cases {
        let db = db();
        let dir = migrations(files);
        let r = belay(&db.url, dir.path(), &["migrate"]);
        assert_eq!(r.code, 65, "{files:?}: {r:?}");
        for w in *wants {
            assert!(r.stderr.contains(w), "{files:?}: stderr lacks {w:?}: {r:?}");
        }
        assert!(
            !history_schema_exists(&db.url),
            "{files:?}: something was written"
        );
        assert_eq!(psql(&db.url, "SELECT to_regclass('a') IS NULL"), "t");
    }
}

#[test]
fn missing_directory_bad_url_and_unreachable_database_are_clear() {
    let db = db();
    let dir = migrations(&[("V1__a.sql", "SELECT 1;")]);
    let r = belay(&db.url, &dir.path().join("nope"), &["migrate"]);
    assert_eq!(r.code, 65, "{r:?}");
    assert!(
        r.stderr.contains("nope does not exist") && r.stderr.contains("--dir"),
        "{r:?}"
    );

    let r = belay("mysql://root:hunter2@db/x", dir.path(), &["status"]);
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("mysql://root:***@db/x"), "{r:?}");
    assert!(!format!("{r:?}").contains("hunter2"));

    // Nothing listens on port 1.
    let r = belay(
        "postgres://app:hunter2@127.0.0.1:1/x",
        dir.path(),
        &["migrate"],
    );
    assert_eq!(r.code, 69, "{r:?}");
    assert!(
        r.stderr
            .contains("cannot connect to postgres://app:***@127.0.0.1:1/x"),
        "{r:?}"
    );
    assert!(!format!("{r:?}").contains("hunter2"));

    let r = belay_cmd("", dir.path())
        .env_remove("BELAY_DATABASE_URL")
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&r.stderr).contains("BELAY_DATABASE_URL"));

    // A password on argv works but earns a warning, and is never echoed.
    let url_with_pw = db.url.replace("postgres@", "postgres:s3cretpw@");
    let o = std::process::Command::new(BELAY)
        .env_remove("BELAY_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .env("BELAY_BACKUP_DIR", default_backup_dir())
        .args(["--url", &url_with_pw, "--dir"])
        .arg(dir.path())
        .arg("migrate")
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.status.code(), Some(0), "{all}");
    assert!(all.contains("password is on the command line"), "{all}");
    assert!(!all.contains("s3cretpw"), "{all}");

    let r = belay(&db.url, dir.path(), &["migrate", "--lock-timeout", "0"]);
    assert_eq!(r.code, 64, "{r:?}");
    let r = belay(&db.url, dir.path(), &["frobnicate"]);
    assert_eq!(r.code, 64, "{r:?}");
}

#[test]
fn statement_timeout_directive_cancels_a_slow_migration() {
    let db = db();
    let dir = migrations(&[(
        "V1__slow.sql",
        "-- belay:statement-timeout=200ms\nSELECT pg_sleep(5);\n",
    )]);
    let r = belay(&db.url, dir.path(), &["migrate"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("V1__slow.sql:2") && r.stderr.contains("statement timeout"),
        "{r:?}"
    );
    assert_eq!(states(&db.url, dir.path())[0].1, "pending");
}

#[test]
fn scripts_with_their_own_transaction_control_keep_history_honest() {
    let db = db();
    let dir = migrations(&[
        (
            "1_own.up.sql",
            "BEGIN;\nCREATE TABLE own (id int);\nCOMMIT;\n",
        ),
        ("2_open.up.sql", "BEGIN;\nCREATE TABLE open_tx (id int);\n"),
    ]);
    let r = belay(&db.url, dir.path(), &["migrate"]);
    assert!(
        r.stdout
            .contains("1_own.up.sql:1: script has its own transaction control"),
        "{r:?}"
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("2_open.up.sql:1: transaction opened here is never committed"),
        "{r:?}"
    );
    assert_eq!(
        psql(
            &db.url,
            "SELECT to_regclass('own') IS NOT NULL, to_regclass('open_tx') IS NULL"
        ),
        "t|t"
    );
    let s = states(&db.url, dir.path());
    assert_eq!(s[0].1, "success");
    assert_eq!(s[1].1, "failed", "a no-transaction failure stays visible");
}

#[test]
fn undo_refuses_without_undo_scripts_and_changes_nothing() {
    let db = db();
    let dir = migrations(&[
        ("V1__a.sql", "CREATE TABLE a (id int);"),
        ("U1__a.sql", "DROP TABLE a;"),
        ("V2__b.sql", "CREATE TABLE b (id int);"),
        (
            "V3__c.sql",
            "-- belay:irreversible\nCREATE TABLE c (id int);",
        ),
        ("U3__c.sql", "DROP TABLE c;"),
    ]);
    belay_ok(&db.url, dir.path(), &["migrate"]);
    let r = belay(&db.url, dir.path(), &["undo", "--all"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .contains("V3__c.sql is marked `-- belay:irreversible`"),
        "{r:?}"
    );
    assert!(r.stderr.contains("V2__b.sql has no undo script"), "{r:?}");
    assert!(
        states(&db.url, dir.path())
            .iter()
            .all(|(_, s)| s == "success")
    );
}

#[test]
fn baseline_adopts_an_existing_database() {
    let db = db();
    psql(&db.url, "CREATE TABLE legacy (id int)");
    let dir = migrations(&[
        ("V1__legacy.sql", "CREATE TABLE legacy (id int);"),
        ("V2__new.sql", "CREATE TABLE fresh (id int);"),
    ]);
    belay_ok(&db.url, dir.path(), &["baseline", "--version", "1"]);
    belay_ok(&db.url, dir.path(), &["migrate"]);
    let s = states(&db.url, dir.path());
    assert_eq!(s[1], ("1".into(), "baseline".into()));
    assert_eq!(s[2], ("2".into(), "success".into()));
    let r = belay(&db.url, dir.path(), &["baseline", "--version", "2"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("baseline only adopts"), "{r:?}");
}

/// A deferred constraint fails at COMMIT, which now travels in one message with the
/// history row and the session reset: the failure is the script's (named at its last
/// statement), nothing of it is recorded or kept, and the session the next run starts
/// from is clean.
#[test]
fn a_deferred_constraint_failing_at_commit_is_the_scripts_failure() {
    let db = db();
    let dir = migrations(&[
        (
            "V1__parent.sql",
            "CREATE TABLE parent (id int PRIMARY KEY);\n",
        ),
        (
            "V2__child.sql",
            "SET search_path = pg_catalog;\n\
             CREATE TABLE public.child (id int, parent_id int REFERENCES public.parent \
             DEFERRABLE INITIALLY DEFERRED);\n\
             INSERT INTO public.child VALUES (1, 42);\n",
        ),
    ]);
    let r = belay(&db.url, dir.path(), &["migrate", "--no-lint"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("V2__child.sql:3:"), "{r:?}");
    assert!(r.stderr.contains("SQLSTATE 23503"), "{r:?}");
    assert_eq!(
        psql(&db.url, "SELECT to_regclass('public.child') IS NULL"),
        "t"
    );
    let s = states(&db.url, dir.path());
    assert_eq!(s[0], ("1".to_string(), "success".to_string()));
    assert_eq!(s[1], ("2".to_string(), "pending".to_string()));
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*) FROM belay.schema_history WHERE version = '2'"
        ),
        "0"
    );
    // Fixed, it applies; its `SET search_path` did not outlive it (V3 creates in public).
    std::fs::write(
        dir.path().join("V2__child.sql"),
        "SET search_path = pg_catalog;\n\
         CREATE TABLE public.child (id int, parent_id int REFERENCES public.parent \
         DEFERRABLE INITIALLY DEFERRED);\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("V3__after.sql"),
        "CREATE TABLE after_v2 (id int);\n",
    )
    .unwrap();
    belay_ok(&db.url, dir.path(), &["migrate", "--no-lint"]);
    assert_eq!(
        psql(&db.url, "SELECT to_regclass('public.after_v2') IS NOT NULL"),
        "t"
    );
    let s = states(&db.url, dir.path());
    assert_eq!(s[2], ("3".to_string(), "success".to_string()));
}
