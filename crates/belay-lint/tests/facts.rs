//! The downgrade logic: facts from the run and the database in, verdict and reason out.

use std::collections::BTreeMap;
use std::path::Path;

use belay_lint::{
    DatabaseFacts, Finding, LintContext, RunMemory, Severity, SmallTable, TableFacts, Verdict,
    lint, relations_to_look_up,
};

fn ctx() -> LintContext {
    LintContext {
        in_transaction: true,
        has_undo: true,
        ..LintContext::default()
    }
}

fn run(sql: &str, c: &LintContext) -> Vec<Finding> {
    lint(Path::new("V9__m.sql"), sql, c)
}

fn one<'a>(findings: &'a [Finding], rule: &str) -> &'a Finding {
    findings
        .iter()
        .find(|f| f.rule == rule)
        .unwrap_or_else(|| panic!("{rule} in {findings:#?}"))
}

fn table(name: &str, rows: Option<u64>, heap: u64, total: u64) -> TableFacts {
    TableFacts {
        name: name.into(),
        estimated_rows: rows,
        heap_bytes: heap,
        total_bytes: total,
    }
}

fn with_db(relations: &[(&str, TableFacts)], version: u32) -> LintContext {
    LintContext {
        database: Some(DatabaseFacts {
            server_version_num: version,
            small_table: SmallTable::default(),
            relations: relations
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            missing: ["gone_idx".to_string()].into(),
        }),
        ..ctx()
    }
}

/// Every lock-duration pattern of the acceptance list, on one table.
const DANGEROUS: &[(&str, &str)] = &[
    ("create-index-concurrently", "CREATE INDEX t_a ON t (a);"),
    (
        "column-type-rewrite",
        "ALTER TABLE t ALTER COLUMN a TYPE bigint;",
    ),
    ("unbatched-dml", "UPDATE t SET a = 1;"),
    (
        "constraint-not-valid",
        "ALTER TABLE t ADD CONSTRAINT fk FOREIGN KEY (a) REFERENCES u (id);",
    ),
    ("drop-index-concurrently", "DROP INDEX t_a;"),
];

#[test]
fn statically_every_dangerous_statement_blocks_and_names_what_to_look_up() {
    for (rule, sql) in DANGEROUS {
        let f = run(sql, &ctx());
        let f = one(&f, rule);
        assert_eq!(f.verdict, Verdict::Blocking, "{sql}");
        assert!(f.downgraded.is_none());
        let names = relations_to_look_up(std::slice::from_ref(f));
        let want = if *rule == "drop-index-concurrently" {
            "t_a"
        } else {
            "t"
        };
        assert!(names.contains(want), "{sql}: {names:?}");
    }
}

#[test]
fn an_empty_table_downgrades_lock_findings_with_the_reason() {
    let c = with_db(
        &[
            ("t", table("public.t", Some(0), 0, 16384)),
            // DROP INDEX t_a: the catalog gives the index's table.
            ("t_a", table("public.t", Some(0), 0, 16384)),
        ],
        150_004,
    );
    for (rule, sql) in DANGEROUS {
        let f = run(sql, &c);
        let f = one(&f, rule);
        assert_eq!(f.verdict, Verdict::Downgraded, "{sql}: {f:#?}");
        assert_eq!(f.severity, Severity::Warning, "one step down: {sql}");
        assert!(!f.is_blocking());
        let reason = f.downgraded.as_deref().expect("a reason");
        assert!(
            reason.contains("public.t") && reason.contains("is empty"),
            "{reason}"
        );
    }
    let f = run("CREATE INDEX t_a ON t (a);", &c);
    assert_eq!(
        one(&f, "create-index-concurrently").downgraded.as_deref(),
        Some("table public.t is empty: the SHARE lock is brief")
    );
    let f = run("DROP INDEX t_a;", &c);
    assert_eq!(
        one(&f, "drop-index-concurrently").downgraded.as_deref(),
        Some("index t_a is on table public.t, which is empty: the ACCESS EXCLUSIVE lock is brief")
    );
}

#[test]
fn size_thresholds_decide_and_a_never_analyzed_table_is_judged_by_size() {
    let mib = 1 << 20;
    let cases = [
        // (facts, small?)
        (table("public.t", Some(9_000), 8 * mib, 12 * mib), true),
        (table("public.t", Some(10_000), mib, 16 * mib), true),
        (table("public.t", Some(10_001), mib, 2 * mib), false),
        (table("public.t", Some(100), 8 * mib, 17 * mib), false),
        // Never analyzed (reltuples = -1): size alone.
        (table("public.t", None, 40 * mib, 60 * mib), false),
        (table("public.t", None, 8192, 16384), true),
        // ... and its heap may hold more rows than the limit: 1 MiB holds up to 37 449.
        (table("public.t", None, mib, 2 * mib), false),
        // Analyzed when empty, filled since: the size tells.
        (table("public.t", Some(0), 35 * mib, 57 * mib), false),
    ];
    for (facts, small) in cases {
        let c = with_db(&[("t", facts.clone())], 150_004);
        let f = run("CREATE INDEX t_a ON t (a);", &c);
        let f = one(&f, "create-index-concurrently");
        assert_eq!(f.verdict == Verdict::Downgraded, small, "{facts:?}: {f:#?}");
        // Refused: the facts say why.
        assert_eq!(
            f.measured
                .as_ref()
                .is_some_and(|m| m.starts_with("table public.t: ")
                    && m.ends_with("over the small-table limits (10000 rows, 16 MiB)")),
            !small,
            "{f:#?}"
        );
        if small {
            let reason = f.downgraded.as_deref().expect("reason");
            assert!(reason.contains("is small ("), "{reason}");
            assert!(reason.contains("at most 10000 rows and 16 MiB"), "{reason}");
        }
    }
    // Thresholds are the caller's.
    let mut c = with_db(
        &[("t", table("public.t", Some(50_000), mib, 4 * mib))],
        150_004,
    );
    let f = run("CREATE INDEX t_a ON t (a);", &c);
    assert_eq!(
        one(&f, "create-index-concurrently").verdict,
        Verdict::Blocking
    );
    if let Some(db) = c.database.as_mut() {
        db.small_table.max_rows = 100_000;
    }
    let f = run("CREATE INDEX t_a ON t (a);", &c);
    assert_eq!(
        one(&f, "create-index-concurrently").verdict,
        Verdict::Downgraded
    );
}

#[test]
fn rules_not_about_lock_duration_are_not_downgraded_by_size() {
    let c = LintContext {
        in_transaction: true,
        has_undo: false,
        ..with_db(
            &[
                ("t", table("public.t", Some(0), 0, 0)),
                ("sessions", table("public.sessions", Some(0), 0, 0)),
            ],
            150_004,
        )
    };
    let sql = "ALTER TABLE t RENAME COLUMN a TO b;\nCREATE INDEX CONCURRENTLY i ON t (a);\nTRUNCATE sessions CASCADE;\nALTER TABLE t DROP COLUMN c;\n";
    let f = run(sql, &c);
    for rule in [
        "rename",
        "concurrently-in-transaction",
        "truncate-cascade",
        "drop-without-data-undo",
        "missing-undo",
    ] {
        let f = one(&f, rule);
        assert!(f.downgraded.is_none(), "{rule}: {f:#?}");
        assert_ne!(f.verdict, Verdict::Downgraded);
    }
    assert_eq!(one(&f, "rename").verdict, Verdict::Blocking);
    let f = run("this is not sql;", &c);
    assert_eq!(one(&f, "parse-error").verdict, Verdict::Blocking);
}

#[test]
fn tables_and_indexes_created_earlier_in_the_run_downgrade_naming_the_script() {
    let mut mem = RunMemory::default();
    mem.record(
        "V1__tables.sql",
        "CREATE TABLE sessions (id int, a int);\nCREATE TABLE staging (id int);\n",
    );
    mem.record(
        "V3__idx.sql",
        "CREATE INDEX sessions_a_idx ON sessions (a);\nALTER TABLE staging RENAME TO purchases;\n",
    );
    let mut c = ctx();
    mem.context(&mut c);
    // By index name alone (migration 40 drops what migration 3 created).
    let f = run("DROP INDEX sessions_a_idx;", &c);
    let d = one(&f, "drop-index-concurrently");
    assert_eq!(d.verdict, Verdict::Downgraded, "{d:#?}");
    assert_eq!(
        d.downgraded.as_deref(),
        Some(
            "index sessions_a_idx is on table sessions, created earlier in this run (V1__tables.sql)"
        )
    );
    // The renamed table keeps its origin; renaming or retyping a new table is harmless.
    for (rule, sql) in [
        (
            "column-type-rewrite",
            "ALTER TABLE purchases ALTER COLUMN id TYPE bigint;",
        ),
        (
            "rename",
            "ALTER TABLE purchases RENAME COLUMN id TO purchase_id;",
        ),
        ("rename", "ALTER TABLE public.purchases RENAME TO orders;"),
        ("unbatched-dml", "UPDATE sessions SET a = 0;"),
        (
            "constraint-not-valid",
            "ALTER TABLE sessions ADD CONSTRAINT pos CHECK (a > 0);",
        ),
        (
            "create-index-concurrently",
            "CREATE INDEX ON sessions (id);",
        ),
    ] {
        let f = run(sql, &c);
        let f = one(&f, rule);
        assert_eq!(f.verdict, Verdict::Downgraded, "{sql}: {f:#?}");
        assert!(
            f.downgraded
                .as_deref()
                .is_some_and(|r| r.contains("created earlier in this run (V1__tables.sql)")),
            "{sql}: {f:#?}"
        );
    }
    // The old name is gone, and a table not created in the run is still live.
    let f = run("ALTER TABLE staging ALTER COLUMN id TYPE bigint;", &c);
    assert_eq!(one(&f, "column-type-rewrite").verdict, Verdict::Blocking);
    let f = run("ALTER TABLE users RENAME COLUMN a TO b;", &c);
    assert_eq!(one(&f, "rename").verdict, Verdict::Blocking);
    // A dropped index is forgotten.
    mem.record("V4__drop.sql", "DROP INDEX CONCURRENTLY sessions_a_idx;");
    mem.context(&mut c);
    assert!(c.indexes_created_earlier_in_run.is_empty(), "{c:?}");
}

#[test]
fn an_index_created_earlier_in_the_run_on_an_existing_table_is_judged_by_that_table() {
    let mut mem = RunMemory::default();
    mem.record("V2__idx.sql", "CREATE INDEX CONCURRENTLY big_a ON big (a);");
    let mut c = with_db(
        &[(
            "big",
            table("public.big", Some(1_000_000), 40 << 20, 70 << 20),
        )],
        150_004,
    );
    mem.context(&mut c);
    let f = run("DROP INDEX big_a;", &c);
    let f = one(&f, "drop-index-concurrently");
    assert_eq!(f.table.as_deref(), Some("big"), "{f:#?}");
    assert_eq!(f.verdict, Verdict::Blocking);
    assert_eq!(
        relations_to_look_up(std::slice::from_ref(f)),
        ["big".to_string(), "big_a".to_string()].into()
    );
}

#[test]
fn the_server_version_decides_what_rewrites() {
    let sql = "ALTER TABLE t ADD COLUMN status text NOT NULL DEFAULT 'new';";
    let big = table("public.t", Some(1_000_000), 64 << 20, 90 << 20);
    // PostgreSQL 11+ stores a non-volatile default in the catalog: no rewrite.
    let f = run(sql, &with_db(&[("t", big.clone())], 110_000));
    assert!(f.iter().all(|f| f.rule != "volatile-default"), "{f:#?}");
    let f = run(sql, &ctx());
    assert!(f.iter().all(|f| f.rule != "volatile-default"), "{f:#?}");
    // PostgreSQL 10 rewrites every row for it.
    let f = run(sql, &with_db(&[("t", big.clone())], 100_023));
    let v = one(&f, "volatile-default");
    assert_eq!(v.verdict, Verdict::Blocking);
    assert!(v.rewrites_table);
    // ... which is brief on an empty table.
    let f = run(
        sql,
        &with_db(&[("t", table("public.t", Some(0), 0, 0))], 100_023),
    );
    assert_eq!(one(&f, "volatile-default").verdict, Verdict::Downgraded);

    // SET NOT NULL uses a validated CHECK only from PostgreSQL 12.
    let nn = "ALTER TABLE t ADD CONSTRAINT nn CHECK (a IS NOT NULL) NOT VALID;\nALTER TABLE t VALIDATE CONSTRAINT nn;\nALTER TABLE t ALTER COLUMN a SET NOT NULL;";
    let f = run(nn, &with_db(&[("t", big.clone())], 120_000));
    assert!(f.iter().all(|f| f.rule != "set-not-null"), "{f:#?}");
    let f = run(nn, &with_db(&[("t", big.clone())], 110_005));
    assert_eq!(one(&f, "set-not-null").severity, Severity::Warning);

    // ADD VALUE in a transaction: refused outright before PostgreSQL 12.
    let add = "ALTER TYPE mood ADD VALUE 'meh';";
    let f = run(add, &with_db(&[], 150_000));
    assert_eq!(
        one(&f, "enum-add-value-in-transaction").severity,
        Severity::Warning
    );
    let f = run(add, &with_db(&[], 110_000));
    assert_eq!(
        one(&f, "enum-add-value-in-transaction").verdict,
        Verdict::Blocking
    );
}

#[test]
fn json_carries_the_verdict_and_the_reason() {
    let c = with_db(&[("t", table("public.t", Some(0), 0, 0))], 150_004);
    let f = run("CREATE INDEX t_a ON t (a);\nCREATE INDEX u_a ON u (a);", &c);
    let v: serde_json::Value = serde_json::from_str(&belay_lint::to_json(&f)).expect("json");
    let by_table: BTreeMap<String, &serde_json::Value> = v
        .as_array()
        .expect("array")
        .iter()
        .filter(|f| f["rule"] == "create-index-concurrently")
        .map(|f| (f["table"].as_str().unwrap_or("").to_string(), f))
        .collect();
    assert_eq!(by_table["t"]["verdict"], "downgraded");
    assert_eq!(by_table["t"]["severity"], "warning");
    assert_eq!(
        by_table["t"]["downgraded"],
        "table public.t is empty: the SHARE lock is brief"
    );
    assert_eq!(by_table["u"]["verdict"], "blocking");
    assert!(by_table["u"].get("downgraded").is_none());
    let text = belay_lint::format_compiler(&f);
    assert!(
        text.contains("warning[create-index-concurrently]: CREATE INDEX on t without CONCURRENTLY blocks writes for the whole build (downgraded: table public.t is empty"),
        "{text}"
    );
}

#[test]
fn indexes_postgresql_names_itself_are_traced_to_their_table() {
    let mut mem = RunMemory::default();
    mem.record(
        "V1__t.sql",
        "CREATE TABLE reserved (name text PRIMARY KEY, email text UNIQUE, CONSTRAINT uq_pair UNIQUE (name, email));\n\
         CREATE UNIQUE INDEX ON reserved (canon(name));\n\
         CREATE INDEX ON reserved (email, lower(email));\n\
         CREATE TABLE export (root text);\n\
         ALTER TABLE Export ADD CONSTRAINT root_unique UNIQUE (root);\n",
    );
    let mut c = ctx();
    mem.context(&mut c);
    for index in [
        "reserved_pkey",
        "reserved_email_key",
        "uq_pair",
        "reserved_canon_idx",
        "reserved_email_lower_idx",
        "root_unique",
    ] {
        let f = run(&format!("DROP INDEX {index};"), &c);
        let d = one(&f, "drop-index-concurrently");
        assert_eq!(d.verdict, Verdict::Downgraded, "{index}: {d:#?}");
    }
    // Dropping the constraint drops its index: a DROP INDEX IF EXISTS after it does nothing.
    let f = run(
        "ALTER TABLE export DROP CONSTRAINT IF EXISTS root_unique;\nDROP INDEX IF EXISTS root_unique;",
        &c,
    );
    assert!(
        f.iter().all(|f| f.rule != "drop-index-concurrently"),
        "{f:#?}"
    );
}

#[test]
fn a_table_renamed_in_the_script_keeps_what_the_run_and_the_catalog_know() {
    let mut mem = RunMemory::default();
    mem.record(
        "V1__user.sql",
        "CREATE TABLE user_aggregates (user_id int);",
    );
    let mut c = ctx();
    mem.context(&mut c);
    let sql = "ALTER TABLE user_aggregates RENAME TO person_aggregates;\n\
               ALTER TABLE person_aggregates RENAME COLUMN user_id TO person_id;";
    let f = run(sql, &c);
    let renames: Vec<&Finding> = f.iter().filter(|f| f.rule == "rename").collect();
    assert_eq!(renames.len(), 2, "{f:#?}");
    assert!(
        renames.iter().all(|f| f.verdict == Verdict::Downgraded),
        "{f:#?}"
    );
    // An existing small table renamed in the script is measured under its old name.
    let c = with_db(
        &[("users", table("public.users", Some(3), 8192, 24576))],
        150_004,
    );
    let f = run(
        "ALTER TABLE users RENAME TO people;\nCREATE INDEX people_a ON people (a);",
        &c,
    );
    let i = one(&f, "create-index-concurrently");
    assert_eq!(i.table_before.as_deref(), Some("users"));
    assert_eq!(i.verdict, Verdict::Downgraded, "{i:#?}");
    assert_eq!(one(&f, "rename").verdict, Verdict::Blocking);
}

#[test]
fn drop_index_if_exists_of_an_index_nowhere_to_be_found_does_nothing() {
    // `gone_idx` was looked up and the catalog does not know it.
    let c = with_db(&[], 150_004);
    let f = run("DROP INDEX IF EXISTS gone_idx;", &c);
    let d = one(&f, "drop-index-concurrently");
    assert_eq!(d.verdict, Verdict::Downgraded, "{d:#?}");
    assert!(
        d.downgraded
            .as_deref()
            .is_some_and(|r| r.contains("DROP INDEX IF EXISTS does nothing")),
        "{d:#?}"
    );
    // Without IF EXISTS the statement fails rather than locks; without facts nothing is
    // known; an index created earlier in the run is judged by its table instead.
    let f = run("DROP INDEX gone_idx;", &c);
    assert_eq!(
        one(&f, "drop-index-concurrently").verdict,
        Verdict::Blocking
    );
    let f = run("DROP INDEX IF EXISTS gone_idx;", &ctx());
    assert_eq!(
        one(&f, "drop-index-concurrently").verdict,
        Verdict::Blocking
    );
    let mut mem = RunMemory::default();
    mem.record(
        "V1__i.sql",
        "CREATE INDEX CONCURRENTLY gone_idx ON big (a);",
    );
    let mut c = c;
    mem.context(&mut c);
    let f = run("DROP INDEX IF EXISTS gone_idx;", &c);
    assert_eq!(
        one(&f, "drop-index-concurrently").verdict,
        Verdict::Blocking
    );
}

/// What the run's memory and the catalog's facts know by a name must be the table the
/// statement reaches, or a finding on a live table would be downgraded.
#[test]
fn a_name_that_may_be_another_table_is_never_downgraded() {
    let small = table("public.orders", Some(10), 8192, 16384);
    let mut mem = RunMemory::default();
    mem.record(
        "V1__maybe.sql",
        "CREATE TABLE IF NOT EXISTS accounts (id int);\n\
         CREATE TABLE IF NOT EXISTS public.invoices AS SELECT 1 AS id;\n\
         CREATE TEMP TABLE payments (id int);\n\
         CREATE TABLE pg_temp.refunds (id int);\n",
    );
    mem.record(
        "V2__path.sql",
        "SET search_path TO sales;\nCREATE TABLE customers (id int);\nCREATE TABLE sales.leads (id int);\n",
    );
    let mut c = with_db(&[("orders", small.clone())], 150_000);
    mem.context(&mut c);
    assert_eq!(
        c.created_earlier_in_run.keys().collect::<Vec<_>>(),
        ["sales.leads"],
        "{c:?}"
    );
    for sql in [
        "ALTER TABLE accounts ALTER COLUMN id TYPE bigint;",
        "ALTER TABLE public.invoices ALTER COLUMN id TYPE bigint;",
        "ALTER TABLE payments ALTER COLUMN id TYPE bigint;",
        "ALTER TABLE refunds ALTER COLUMN id TYPE bigint;",
        "ALTER TABLE customers ALTER COLUMN id TYPE bigint;",
        // In the same script: the IF NOT EXISTS table may be the live one.
        "CREATE TABLE IF NOT EXISTS big (id int);\nALTER TABLE big ALTER COLUMN id TYPE bigint;",
        // A temporary table shadows its bare name only.
        "CREATE TEMP TABLE big (id int);\nALTER TABLE public.big ALTER COLUMN id TYPE bigint;",
        // The catalog's `orders` (through the facts session's search_path) is small, but
        // this script's `orders` is another schema's.
        "SET search_path = sales, public;\nALTER TABLE orders ALTER COLUMN id TYPE bigint;",
        "SELECT pg_catalog.set_config('search_path', 'sales', false);\nALTER TABLE orders ALTER COLUMN id TYPE bigint;",
    ] {
        let f = run(sql, &c);
        assert_eq!(
            one(&f, "column-type-rewrite").verdict,
            Verdict::Blocking,
            "{sql}: {f:#?}"
        );
    }
    // Without a moved search_path the small table still downgrades, a temporary table
    // created in the same script still counts as new, and so does a qualified name
    // created in the run after the path moved.
    for sql in [
        "ALTER TABLE orders ALTER COLUMN id TYPE bigint;\n",
        "CREATE TEMP TABLE scratch (id int);\nALTER TABLE scratch ALTER COLUMN id TYPE bigint;",
        "ALTER TABLE sales.leads ALTER COLUMN id TYPE bigint;",
    ] {
        let mut c = with_db(&[("orders", small.clone())], 150_000);
        if !sql.contains("orders") {
            mem.context(&mut c);
        }
        let f = run(sql, &c);
        assert!(
            f.iter()
                .filter(|f| f.rule == "column-type-rewrite")
                .all(|f| f.verdict != Verdict::Blocking),
            "{sql}: {f:#?}"
        );
    }
}

/// A name the run created, then gave up, and a table from before the run took: live.
#[test]
fn a_live_table_renamed_to_a_name_the_run_created_is_live() {
    let mut mem = RunMemory::default();
    mem.record(
        "V1__new.sql",
        "CREATE TABLE t (id int);\nCREATE TABLE u (id int);\n",
    );
    mem.record(
        "V2__swap.sql",
        "ALTER TABLE t SET SCHEMA archive;\nALTER TABLE big RENAME TO t;\n\
         ALTER TABLE u RENAME TO u_old;\nALTER TABLE huge RENAME TO u_old;\n",
    );
    let mut c = ctx();
    mem.context(&mut c);
    for sql in [
        "ALTER TABLE t ALTER COLUMN id TYPE bigint;",
        "ALTER TABLE public.t ALTER COLUMN id TYPE bigint;",
    ] {
        let f = run(sql, &c);
        assert_eq!(
            one(&f, "column-type-rewrite").verdict,
            Verdict::Blocking,
            "{sql}: {f:#?}"
        );
    }
}
