//! One flagged and one safe form per rule, plus parse errors and output formats.

use std::collections::BTreeSet;
use std::path::Path;

use belay_lint::{
    Finding, LintContext, RULES, Severity, format_compiler, lint, rule, statements, to_json,
};

fn ctx() -> LintContext {
    LintContext {
        in_transaction: true,
        has_undo: true,
        undo_preserves_data: false,
        ..LintContext::default()
    }
}

fn no_tx() -> LintContext {
    LintContext {
        in_transaction: false,
        ..ctx()
    }
}

fn run(sql: &str, c: &LintContext) -> Vec<Finding> {
    lint(Path::new("V1__m.sql"), sql, c)
}

struct Case {
    rule: &'static str,
    flagged: &'static str,
    safe: &'static str,
    ctx: fn() -> LintContext,
}

const CASES: &[Case] = &[
    Case {
        rule: "constraint-not-valid",
        flagged: "ALTER TABLE orders ADD CONSTRAINT fk FOREIGN KEY (user_id) REFERENCES users (id);",
        safe: "ALTER TABLE orders ADD CONSTRAINT fk FOREIGN KEY (user_id) REFERENCES users (id) NOT VALID;",
        ctx,
    },
    Case {
        rule: "constraint-not-valid",
        flagged: "ALTER TABLE orders ADD CONSTRAINT pos CHECK (amount > 0);",
        safe: "ALTER TABLE orders ADD CONSTRAINT pos CHECK (amount > 0) NOT VALID;\nALTER TABLE orders VALIDATE CONSTRAINT pos;",
        ctx,
    },
    Case {
        rule: "constraint-not-valid",
        flagged: "ALTER TABLE orders ADD COLUMN user_id int REFERENCES users (id);",
        safe: "CREATE TABLE orders (id int);\nALTER TABLE orders ADD COLUMN user_id int REFERENCES users (id);",
        ctx,
    },
    Case {
        rule: "create-index-concurrently",
        flagged: "CREATE INDEX orders_user ON orders (user_id);",
        safe: "CREATE INDEX CONCURRENTLY orders_user ON orders (user_id);",
        ctx: no_tx,
    },
    Case {
        rule: "create-index-concurrently",
        flagged: "CREATE UNIQUE INDEX orders_ref ON public.orders (ref);",
        safe: "CREATE TABLE orders (ref text);\nCREATE UNIQUE INDEX orders_ref ON orders (ref);",
        ctx,
    },
    Case {
        rule: "drop-index-concurrently",
        flagged: "DROP INDEX orders_user;",
        safe: "DROP INDEX CONCURRENTLY IF EXISTS orders_user;",
        ctx: no_tx,
    },
    Case {
        rule: "reindex-concurrently",
        flagged: "REINDEX INDEX orders_user;",
        safe: "REINDEX INDEX CONCURRENTLY orders_user;",
        ctx: no_tx,
    },
    Case {
        rule: "reindex-concurrently",
        flagged: "REINDEX TABLE orders;",
        safe: "REINDEX (CONCURRENTLY) TABLE orders;",
        ctx: no_tx,
    },
    Case {
        rule: "detach-partition-concurrently",
        flagged: "ALTER TABLE events DETACH PARTITION events_2020;",
        safe: "ALTER TABLE events DETACH PARTITION events_2020 CONCURRENTLY;",
        ctx: no_tx,
    },
    Case {
        rule: "concurrently-in-transaction",
        flagged: "CREATE INDEX CONCURRENTLY orders_user ON orders (user_id);",
        safe: "CREATE INDEX CONCURRENTLY orders_user ON orders (user_id);",
        // flagged under ctx() (in a transaction), safe under no_tx(): see the test below.
        ctx,
    },
    Case {
        rule: "volatile-default",
        flagged: "ALTER TABLE orders ADD COLUMN token uuid DEFAULT gen_random_uuid();",
        safe: "ALTER TABLE orders ADD COLUMN created_at timestamptz DEFAULT now();",
        ctx,
    },
    Case {
        rule: "volatile-default",
        flagged: "ALTER TABLE orders ADD COLUMN seq bigserial;",
        safe: "ALTER TABLE orders ADD COLUMN status text NOT NULL DEFAULT 'new';",
        ctx,
    },
    Case {
        rule: "stored-generated-column",
        flagged: "ALTER TABLE orders ADD COLUMN total numeric GENERATED ALWAYS AS (price * qty) STORED;",
        safe: "ALTER TABLE orders ADD COLUMN total numeric;",
        ctx,
    },
    Case {
        rule: "column-type-rewrite",
        flagged: "ALTER TABLE orders ALTER COLUMN id TYPE bigint;",
        safe: "ALTER TABLE orders ALTER COLUMN note SET DEFAULT '';",
        ctx,
    },
    Case {
        rule: "set-not-null",
        flagged: "ALTER TABLE orders ALTER COLUMN user_id SET NOT NULL;",
        safe: "ALTER TABLE orders ADD CONSTRAINT uid_nn CHECK (user_id IS NOT NULL) NOT VALID;\n\
               ALTER TABLE orders VALIDATE CONSTRAINT uid_nn;\n\
               ALTER TABLE orders ALTER COLUMN user_id SET NOT NULL;",
        ctx,
    },
    Case {
        rule: "unique-without-index",
        flagged: "ALTER TABLE orders ADD CONSTRAINT orders_ref_key UNIQUE (ref);",
        safe: "ALTER TABLE orders ADD CONSTRAINT orders_ref_key UNIQUE USING INDEX orders_ref_idx;",
        ctx,
    },
    Case {
        rule: "unique-without-index",
        flagged: "ALTER TABLE orders ADD PRIMARY KEY (id);",
        safe: "ALTER TABLE orders ADD CONSTRAINT orders_pkey PRIMARY KEY USING INDEX orders_id_idx;",
        ctx,
    },
    Case {
        rule: "unbatched-dml",
        flagged: "UPDATE orders SET status = 'new';",
        safe: "UPDATE orders SET status = 'new' WHERE id BETWEEN 1 AND 1000;",
        ctx,
    },
    Case {
        rule: "unbatched-dml",
        flagged: "DELETE FROM orders;",
        safe: "DELETE FROM orders WHERE created_at < now() - interval '1 year' AND id < 1000;",
        ctx,
    },
    Case {
        rule: "rename",
        flagged: "ALTER TABLE orders RENAME COLUMN note TO comment;",
        safe: "ALTER TABLE orders ADD COLUMN comment text;",
        ctx,
    },
    Case {
        rule: "rename",
        flagged: "ALTER TABLE orders RENAME TO purchases;",
        safe: "CREATE TABLE staging (id int);\nALTER TABLE staging RENAME TO purchases;",
        ctx,
    },
    Case {
        rule: "drop-without-data-undo",
        flagged: "ALTER TABLE orders DROP COLUMN note;",
        safe: "CREATE TABLE tmp (id int, note text);\nALTER TABLE tmp DROP COLUMN note;",
        ctx,
    },
    Case {
        rule: "drop-without-data-undo",
        flagged: "DROP TABLE old_orders;",
        safe: "CREATE TABLE scratch (id int);\nDROP TABLE scratch;",
        ctx,
    },
    Case {
        rule: "vacuum-full",
        flagged: "VACUUM FULL orders;",
        safe: "VACUUM (ANALYZE) orders;",
        ctx: no_tx,
    },
    Case {
        rule: "vacuum-full",
        flagged: "VACUUM (FULL, ANALYZE) orders;",
        safe: "VACUUM (FULL false) orders;",
        ctx: no_tx,
    },
    Case {
        rule: "cluster",
        flagged: "CLUSTER orders USING orders_pkey;",
        safe: "ANALYZE orders;",
        ctx,
    },
    Case {
        rule: "truncate-cascade",
        flagged: "TRUNCATE users CASCADE;",
        safe: "TRUNCATE sessions;",
        ctx,
    },
    Case {
        rule: "enum-add-value-in-transaction",
        flagged: "ALTER TYPE mood ADD VALUE 'meh';\nUPDATE people SET m = 'meh' WHERE id = 1;",
        safe: "ALTER TYPE mood ADD VALUE 'meh';\nUPDATE people SET m = 'meh' WHERE id = 1;",
        // flagged in a transaction, safe in a no-transaction migration
        ctx,
    },
];

#[test]
fn every_rule_flags_its_pattern_and_accepts_the_safe_form() {
    for case in CASES {
        let c = (case.ctx)();
        let flagged = run(case.flagged, &c);
        assert!(
            flagged.iter().any(|f| f.rule == case.rule),
            "{}: not flagged in {:?}: {flagged:#?}",
            case.rule,
            case.flagged
        );
        let f = flagged
            .iter()
            .find(|f| f.rule == case.rule)
            .expect("checked");
        assert!(!f.hint.is_empty() && !f.message.is_empty());
        assert_eq!(f.file, Path::new("V1__m.sql"));

        // Rules about transactions: the safe form is the same SQL outside one.
        let safe_ctx = if matches!(
            case.rule,
            "concurrently-in-transaction" | "enum-add-value-in-transaction"
        ) {
            no_tx()
        } else {
            c
        };
        let safe = run(case.safe, &safe_ctx);
        assert!(
            !safe.iter().any(|f| f.rule == case.rule),
            "{}: safe form flagged {:?}: {safe:#?}",
            case.rule,
            case.safe
        );
        assert!(
            !safe.iter().any(|f| f.severity == Severity::Error),
            "{}: safe form has errors: {safe:#?}",
            case.rule
        );
    }
    // Every rule except the file-level ones has a case.
    let covered: BTreeSet<&str> = CASES.iter().map(|c| c.rule).collect();
    for r in RULES {
        if !matches!(r.id, "parse-error" | "missing-undo") {
            assert!(covered.contains(r.id), "no case for {}", r.id);
        }
    }
}

#[test]
fn findings_carry_lock_and_rewrite() {
    let f = run("ALTER TABLE orders ALTER COLUMN id TYPE bigint;", &ctx());
    assert_eq!(f[0].lock.as_deref(), Some("ACCESS EXCLUSIVE"));
    assert!(f[0].rewrites_table);
    let f = run(
        "ALTER TABLE orders ADD CONSTRAINT fk FOREIGN KEY (u) REFERENCES users (id);",
        &ctx(),
    );
    assert_eq!(f[0].lock.as_deref(), Some("SHARE ROW EXCLUSIVE"));
    assert!(!f[0].rewrites_table);
    let f = run("CREATE INDEX i ON orders (u);", &no_tx());
    assert_eq!(f[0].lock.as_deref(), Some("SHARE"));
}

#[test]
fn statement_facts_for_plan() {
    let s = statements(
        "-- header\nCREATE INDEX CONCURRENTLY i ON t (a);\n\n  ALTER TABLE t VALIDATE CONSTRAINT c;\nVACUUM FULL t;",
    )
    .expect("parses");
    assert_eq!(s.len(), 3);
    assert_eq!((s[0].line, s[0].column), (2, 1));
    assert_eq!(s[0].kind, "CREATE INDEX");
    assert_eq!(s[0].lock.as_deref(), Some("SHARE UPDATE EXCLUSIVE"));
    assert_eq!((s[1].line, s[1].column), (4, 3));
    assert_eq!(s[1].lock.as_deref(), Some("SHARE UPDATE EXCLUSIVE"));
    assert!(!s[1].rewrites_table);
    assert_eq!(s[2].kind, "VACUUM FULL");
    assert!(s[2].rewrites_table);
    assert_eq!(s[2].lock.as_deref(), Some("ACCESS EXCLUSIVE"));
}

#[test]
fn findings_point_at_the_statement_line() {
    let sql = "CREATE TABLE a (id int);\n\n/* later */\n  UPDATE orders SET x = 1;\n";
    let f = run(sql, &ctx());
    let u = f
        .iter()
        .find(|f| f.rule == "unbatched-dml")
        .expect("flagged");
    assert_eq!((u.line, u.column), (4, 3));
}

#[test]
fn unparseable_sql_is_a_finding_with_a_line_not_a_panic() {
    let sql = "CREATE TABLE a (id int);\nSELEC 1;\nUPDATE orders SET x = 1;\n";
    let f = run(sql, &ctx());
    let p = f
        .iter()
        .find(|f| f.rule == "parse-error")
        .expect("parse error");
    assert_eq!(p.line, 2);
    assert_eq!(p.column, 1);
    assert_eq!(p.severity, Severity::Error);
    assert!(p.message.contains("SELEC"), "{}", p.message);
    // The statements around it are still linted.
    assert!(f.iter().any(|f| f.rule == "unbatched-dml" && f.line == 3));

    for bad in [
        "SELECT 'unterminated",
        "CREATE TABLE (",
        "ALTER TABLE t ADD COLUMN;",
        "\0",
        "SELECT 1;\n\nSELECT $$oops",
        "",
        "-- only a comment",
    ] {
        let f = run(bad, &ctx());
        for x in &f {
            assert!(x.line >= 1 && x.column >= 1);
        }
    }
    let f = run("SELECT 1;\n\nSELECT $$oops", &ctx());
    assert!(
        f.iter().any(|x| x.rule == "parse-error" && x.line == 3),
        "{f:#?}"
    );
    let f = run("SELECT 1;\nSELECT 'a\n", &ctx());
    assert!(
        f.iter().any(|x| x.rule == "parse-error" && x.line == 2),
        "{f:#?}"
    );
    assert!(statements("SELEC 1").is_err());
}

#[test]
fn explicit_transactions_in_the_file_are_tracked() {
    // belay runs a script with its own BEGIN/COMMIT statement by statement.
    let sql =
        "BEGIN;\nALTER TABLE t ADD COLUMN a int;\nCOMMIT;\nCREATE INDEX CONCURRENTLY i ON t (a);";
    let f = run(sql, &ctx());
    assert!(
        !f.iter().any(|f| f.rule == "concurrently-in-transaction"),
        "{f:#?}"
    );
    let sql = "BEGIN;\nCREATE INDEX CONCURRENTLY i ON t (a);\nCOMMIT;";
    let f = run(sql, &no_tx());
    assert!(
        f.iter()
            .any(|f| f.rule == "concurrently-in-transaction" && f.line == 2)
    );
}

#[test]
fn enum_value_unused_in_the_transaction_is_only_a_warning() {
    let f = run("ALTER TYPE mood ADD VALUE 'meh';", &ctx());
    let e = f
        .iter()
        .find(|f| f.rule == "enum-add-value-in-transaction")
        .expect("flagged");
    assert_eq!(e.severity, Severity::Warning);
    let f = run(
        "ALTER TYPE mood ADD VALUE 'meh';\nUPDATE people SET m = 'meh' WHERE id = 1;",
        &ctx(),
    );
    let e = f
        .iter()
        .find(|f| f.rule == "enum-add-value-in-transaction")
        .expect("flagged");
    assert_eq!(e.severity, Severity::Error);
    assert!(e.message.contains("line 2"));
}

#[test]
fn unknown_default_functions_and_maybe_coercible_types_are_warnings() {
    let f = run("ALTER TABLE t ADD COLUMN a int DEFAULT my_func();", &ctx());
    assert_eq!(f[0].rule, "volatile-default");
    assert_eq!(f[0].severity, Severity::Warning);
    let f = run("ALTER TABLE t ALTER COLUMN name TYPE varchar(200);", &ctx());
    assert_eq!(f[0].rule, "column-type-rewrite");
    assert_eq!(f[0].severity, Severity::Warning);
    let f = run(
        "ALTER TABLE t ALTER COLUMN name TYPE text USING upper(name);",
        &ctx(),
    );
    assert_eq!(f[0].severity, Severity::Error);
}

#[test]
fn missing_undo_depends_on_what_the_migration_does() {
    let no_undo = LintContext {
        has_undo: false,
        ..ctx()
    };
    let f = run("ALTER TABLE t ADD COLUMN a int;", &no_undo);
    let m = f
        .iter()
        .find(|f| f.rule == "missing-undo")
        .expect("flagged");
    assert_eq!(m.severity, Severity::Warning);
    assert_eq!((m.line, m.column), (1, 1));
    let f = run("INSERT INTO t VALUES (1);", &no_undo);
    let m = f
        .iter()
        .find(|f| f.rule == "missing-undo")
        .expect("flagged");
    assert_eq!(m.severity, Severity::Info);
    assert!(run("ALTER TABLE t ADD COLUMN a int;", &ctx()).is_empty());
}

#[test]
fn context_knows_tables_and_data_snapshots() {
    let mut c = ctx();
    c.tables_created_in_this_migration
        .insert("public.fresh".into());
    assert!(run("CREATE INDEX i ON fresh (a);", &c).is_empty());
    c.undo_preserves_data = true;
    assert!(run("ALTER TABLE orders DROP COLUMN note;", &c).is_empty());
}

#[test]
fn allow_directives_mark_findings_without_hiding_them() {
    let mut c = no_tx();
    c.allow
        .insert("create-index-concurrently".into(), "table is tiny".into());
    let f = run("CREATE INDEX i ON t (a);", &c);
    assert_eq!(f[0].allowed.as_deref(), Some("table is tiny"));
    assert!(!f[0].is_blocking());
    let f = run("CREATE INDEX i ON t (a);", &no_tx());
    assert!(f[0].is_blocking());
}

#[test]
fn compiler_and_json_output() {
    let f = run("\n  CREATE INDEX i ON t (a);", &no_tx());
    let text = format_compiler(&f);
    assert!(
        text.starts_with("V1__m.sql:2:3: error[create-index-concurrently]: "),
        "{text}"
    );
    assert!(text.contains("\n    hint: CREATE INDEX CONCURRENTLY"));
    let v: serde_json::Value = serde_json::from_str(&to_json(&f)).expect("json");
    let first = &v[0];
    for k in [
        "file",
        "line",
        "column",
        "rule",
        "severity",
        "message",
        "hint",
        "lock",
        "rewrites_table",
    ] {
        assert!(first.get(k).is_some(), "missing {k}");
    }
    assert_eq!(first["severity"], "error");
    assert_eq!(first["file"], "V1__m.sql");
    assert_eq!(rule("vacuum-full").severity, Severity::Error);
}
