//! The lint gate with the database's facts, through the real binary: what real projects'
//! migration sets do to tables they have just created applies on an empty database; the
//! same dangerous scripts are refused on a large table and downgraded, with the reason,
//! on an empty one; `lint` says when it is static; `plan` shows each finding's verdict.

mod support;
use support::*;

/// The lint entries of `plan --output json`, all steps.
fn plan_lint(plan: &serde_json::Value) -> Vec<serde_json::Value> {
    plan["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .flat_map(|s| s["lint"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// What projects do in their first hundreds of migrations, each on tables made earlier in
/// the same run: indexes created and dropped (by name, unnamed, by constraint), type
/// changes and renames, whole-table UPDATEs, constraints added without NOT VALID.
const NEW_PROJECT: &[(&str, &str)] = &[
    (
        "V1__tables.sql",
        "CREATE TABLE users (id serial PRIMARY KEY, email text, CONSTRAINT users_email_uq UNIQUE (email));\n\
         CREATE TABLE sessions (id serial PRIMARY KEY, user_id int, token varchar(40), active boolean);\n\
         CREATE TABLE staging (id int, note text);\n",
    ),
    (
        "V2__indexes.sql",
        "CREATE INDEX sessions_user_idx ON sessions (user_id);\nCREATE INDEX ON users (lower(email));\n",
    ),
    (
        "V3__rename.sql",
        "ALTER TABLE staging RENAME TO purchases;\n\
         ALTER TABLE purchases ALTER COLUMN id TYPE bigint;\n\
         ALTER TABLE purchases RENAME COLUMN note TO comment;\n",
    ),
    (
        "V4__backfill.sql",
        "UPDATE sessions SET active = true;\n\
         ALTER TABLE sessions ALTER COLUMN token TYPE bytea USING token::bytea;\n\
         ALTER TABLE sessions ADD CONSTRAINT sessions_user_fk FOREIGN KEY (user_id) REFERENCES users (id);\n\
         ALTER TABLE purchases ADD CONSTRAINT purchases_pk PRIMARY KEY (id);\n",
    ),
    (
        "V5__drop.sql",
        "DROP INDEX sessions_user_idx;\nDROP INDEX users_lower_idx;\n\
         ALTER TABLE users DROP CONSTRAINT users_email_uq;\nDROP INDEX IF EXISTS users_email_uq;\n",
    ),
];

#[test]
fn a_new_projects_migrations_apply_on_an_empty_database() {
    let db = db();
    let files: Vec<(String, String)> = NEW_PROJECT
        .iter()
        .map(|(n, b)| ((*n).to_string(), format!("-- belay:irreversible\n{b}")))
        .collect();
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_str()))
        .collect();
    let dir = migrations(&files);

    // Statically (no database) every one of them is an error.
    let r = belay_cmd(&db.url, dir.path())
        .env_remove("BELAY_DATABASE_URL")
        .args(["lint", "--format", "json"])
        .output()
        .expect("run belay");
    assert_eq!(r.status.code(), Some(2));

    // plan: each finding downgraded, naming the script that created its table.
    let plan = belay_ok(&db.url, dir.path(), &["plan", "--output", "json"]).json();
    let lint = plan_lint(&plan);
    let judged: Vec<&serde_json::Value> = lint
        .iter()
        .filter(|f| f["rule"] != "missing-undo")
        .collect();
    assert!(judged.len() >= 10, "{plan:#}");
    for f in &judged {
        assert_eq!(f["verdict"], "downgraded", "{f:#}");
        assert_eq!(f["severity"], "warning", "{f:#}");
        assert!(
            f["downgraded"]
                .as_str()
                .is_some_and(|r| r.contains("created earlier in this run (V1__tables.sql)")),
            "{f:#}"
        );
    }
    for rule in [
        "create-index-concurrently",
        "drop-index-concurrently",
        "column-type-rewrite",
        "rename",
        "unbatched-dml",
        "constraint-not-valid",
        "unique-without-index",
    ] {
        assert!(judged.iter().any(|f| f["rule"] == rule), "{rule}: {plan:#}");
    }
    // By index name: the index V2 created without naming it, dropped in V5.
    assert!(
        lint.iter().any(|f| f["index"] == "users_lower_idx"
            && f["downgraded"]
                == "index users_lower_idx is on table users, created earlier in this run (V1__tables.sql)"),
        "{plan:#}"
    );
    // The renamed table keeps its origin.
    assert!(
        lint.iter().any(|f| f["rule"] == "rename"
            && f["table"] == "purchases"
            && f["verdict"] == "downgraded"),
        "{plan:#}"
    );

    // Default migrate (backup, preflight and all) applies it. Findings on tables the run
    // itself creates are said in one line (`plan` above lists each): a project's first
    // deployment has hundreds of them.
    let r = belay_ok(&db.url, dir.path(), &["migrate"]);
    let judged_in_plan = lint
        .iter()
        .filter(|f| f["downgraded_because"] == "new_in_run")
        .count();
    assert!(judged_in_plan >= 5, "{plan:#}");
    assert!(
        r.stderr
            .contains(&format!("lint: {judged_in_plan} finding(s) in "))
            && r.stderr
                .contains("downgraded: their tables are created earlier in this run"),
        "{r:?}"
    );
    assert!(
        !r.stderr
            .contains("created earlier in this run (V1__tables.sql)"),
        "one summary, not a line per finding: {r:?}"
    );
    assert_eq!(
        states(&db.url, dir.path())
            .iter()
            .filter(|(_, s)| s == "success")
            .count(),
        5
    );
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*) FROM pg_indexes WHERE indexname IN ('sessions_user_idx', 'users_lower_idx')"
        ),
        "0"
    );
}

/// The acceptance list's dangerous statements, on table `T`.
fn dangerous(t: &str) -> String {
    format!(
        "-- belay:irreversible\n\
         CREATE INDEX {t}_a_idx ON {t} (a);\n\
         ALTER TABLE {t} ALTER COLUMN a TYPE bigint;\n\
         UPDATE {t} SET u = NULL;\n\
         ALTER TABLE {t} ADD CONSTRAINT {t}_ref_fk FOREIGN KEY (u) REFERENCES ref (id);\n\
         DROP INDEX {t}_old_idx;\n"
    )
}

const DANGEROUS_RULES: [&str; 5] = [
    "create-index-concurrently",
    "column-type-rewrite",
    "unbatched-dml",
    "constraint-not-valid",
    "drop-index-concurrently",
];

fn table_sql(t: &str, extra: &str) -> String {
    format!(
        "CREATE TABLE {t} (id bigint PRIMARY KEY, a int, u int){extra}; CREATE INDEX {t}_old_idx ON {t} (id, a);"
    )
}

#[test]
fn dangerous_scripts_are_refused_on_a_large_table_and_downgraded_on_an_empty_one() {
    let db = db();
    psql(
        &db.url,
        &format!(
            "CREATE TABLE ref (id int PRIMARY KEY); {} {}\
             INSERT INTO big SELECT g, g, NULL FROM generate_series(1, 1000000) g; ANALYZE big;",
            table_sql("big", ""),
            table_sql("empty", "")
        ),
    );
    let big = migrations(&[("V1__big.sql", &dangerous("big"))]);
    let r = belay(&db.url, big.path(), &["migrate", "--backup", "none"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("nothing was applied"), "{r:?}");
    assert!(
        r.stderr.contains("\n    table public.big: ~1000000 rows, ")
            && r.stderr
                .contains("over the small-table limits (10000 rows, 16 MiB)"),
        "the refusal says why the table is not small: {r:?}"
    );
    // One statement per line from line 2, in DANGEROUS_RULES' order.
    for (line, rule) in (2..).zip(DANGEROUS_RULES) {
        assert!(
            r.stderr
                .contains(&format!("V1__big.sql:{line}:1: error[{rule}]")),
            "{rule}: {r:?}"
        );
    }
    assert_eq!(
        states(&db.url, big.path()),
        [("1".into(), "pending".into())]
    );
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*) FROM pg_indexes WHERE indexname IN ('big_a_idx', 'big_old_idx')"
        ),
        "1",
        "nothing applied: no new index, the old one still there"
    );
    // plan says why, in text and JSON.
    let text = belay_ok(&db.url, big.path(), &["plan"]).stdout;
    assert!(
        text.contains("V1__big.sql:2: error[create-index-concurrently]: CREATE INDEX on big without CONCURRENTLY blocks writes for the whole build (takes SHARE) — blocking (table public.big: ~1000000 rows, "),
        "{text}"
    );
    assert!(
        text.contains("lint: judged with the database's facts (PostgreSQL "),
        "{text}"
    );
    let plan = belay_ok(&db.url, big.path(), &["plan", "--output", "json"]).json();
    for f in plan_lint(&plan)
        .iter()
        .filter(|f| DANGEROUS_RULES.contains(&f["rule"].as_str().unwrap_or("")))
    {
        assert_eq!(f["verdict"], "blocking", "{f:#}");
        assert!(f.get("downgraded").is_none(), "{f:#}");
    }
    assert!(
        plan["lint_facts"]
            .as_str()
            .is_some_and(|s| s.contains("2 table(s) measured")),
        "{plan:#}"
    );

    // The same script on an existing empty table: downgraded, with the reason, and applied.
    let empty = migrations(&[("V1__empty.sql", &dangerous("empty"))]);
    let text = belay_ok(&db.url, empty.path(), &["plan"]).stdout;
    assert!(
        text.contains("V1__empty.sql:2: warning[create-index-concurrently]: CREATE INDEX on empty without CONCURRENTLY blocks writes for the whole build (takes SHARE) — downgraded: table public.empty is empty: the SHARE lock is brief"),
        "{text}"
    );
    let plan = belay_ok(&db.url, empty.path(), &["plan", "--output", "json"]).json();
    let lint = plan_lint(&plan);
    for rule in DANGEROUS_RULES {
        let f = lint
            .iter()
            .find(|f| f["rule"] == rule)
            .unwrap_or_else(|| panic!("{rule}: {plan:#}"));
        assert_eq!(f["verdict"], "downgraded", "{f:#}");
        assert!(
            f["downgraded"]
                .as_str()
                .is_some_and(|r| r.contains("public.empty") && r.contains("is empty")),
            "{f:#}"
        );
    }
    let r = belay_ok(&db.url, empty.path(), &["migrate", "--backup", "none"]);
    assert!(
        r.stderr.contains("warning[drop-index-concurrently]: DROP INDEX empty_old_idx without CONCURRENTLY takes ACCESS EXCLUSIVE on its table — downgraded: index empty_old_idx is on table public.empty, which is empty: the ACCESS EXCLUSIVE lock is brief"),
        "{r:?}"
    );
    assert!(
        r.stderr.contains("warning[unbatched-dml]")
            && r.stderr.contains("is empty: the statement is brief"),
        "{r:?}"
    );
    assert_eq!(
        states(&db.url, empty.path()),
        [("1".into(), "success".into())]
    );
    assert_eq!(
        psql(
            &db.url,
            "SELECT format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = 'empty'::regclass AND attname = 'a'"
        ),
        "bigint"
    );
}

#[test]
fn a_big_table_never_analyzed_is_not_small() {
    let db = db();
    // Autovacuum off for it: reltuples stays -1 (never analyzed) whatever the timing.
    psql(
        &db.url,
        &format!(
            "CREATE TABLE ref (id int PRIMARY KEY); {}\
             INSERT INTO raw SELECT g, g, NULL FROM generate_series(1, 1000000) g;",
            table_sql("raw", " WITH (autovacuum_enabled = false)")
        ),
    );
    assert_eq!(
        psql(
            &db.url,
            "SELECT reltuples FROM pg_class WHERE relname = 'raw'"
        ),
        "-1"
    );
    let dir = migrations(&[("V1__raw.sql", &dangerous("raw"))]);
    let r = belay(&db.url, dir.path(), &["migrate", "--backup", "none"]);
    assert_eq!(r.code, 2, "{r:?}");
    for rule in DANGEROUS_RULES {
        assert!(
            r.stderr.contains(&format!(": error[{rule}]")),
            "{rule}: {r:?}"
        );
    }
    assert!(!r.stderr.contains("downgraded"), "{r:?}");
    assert_eq!(
        states(&db.url, dir.path()),
        [("1".into(), "pending".into())]
    );
    // The same table, emptied: judged by its size (still never analyzed), downgraded.
    psql(&db.url, "TRUNCATE raw;");
    assert_eq!(
        psql(
            &db.url,
            "SELECT reltuples FROM pg_class WHERE relname = 'raw'"
        ),
        "-1"
    );
    let plan = belay_ok(&db.url, dir.path(), &["plan", "--output", "json"]).json();
    let lint = plan_lint(&plan);
    let f = lint
        .iter()
        .find(|f| f["rule"] == "create-index-concurrently")
        .expect("finding");
    assert_eq!(f["verdict"], "downgraded", "{plan:#}");
}

#[test]
fn lint_says_when_it_is_static_and_uses_the_database_when_it_has_one() {
    let db = db();
    psql(&db.url, "CREATE TABLE sessions (id int, a int);");
    let dir = migrations(&[(
        "V1__idx.sql",
        "-- belay:irreversible\nCREATE INDEX sessions_a ON sessions (a);\n",
    )]);
    // No URL: static, said in one line on stderr; the finding blocks.
    let o = belay_cmd(&db.url, dir.path())
        .env_remove("BELAY_DATABASE_URL")
        .args(["lint", "--format", "compiler"])
        .output()
        .expect("run belay");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("lint: static (no database)"), "{stderr}");
    // --offline: static although a URL is configured.
    let r = belay(&db.url, dir.path(), &["lint", "--offline"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("lint: static (no database)"), "{r:?}");
    // With the URL: the table is empty, the finding downgraded with its reason.
    let r = belay_ok(&db.url, dir.path(), &["lint", "--format", "json"]);
    assert!(
        r.stderr.contains("lint: judged with the database's facts"),
        "{r:?}"
    );
    let doc = r.json();
    let f = doc
        .as_array()
        .expect("array")
        .iter()
        .find(|f| f["rule"] == "create-index-concurrently")
        .expect("finding");
    assert_eq!(f["verdict"], "downgraded");
    assert_eq!(
        f["downgraded"],
        "table public.sessions is empty: the SHARE lock is brief"
    );
    let r = belay_ok(&db.url, dir.path(), &["lint"]);
    assert!(
        r.stdout
            .contains("downgraded: table public.sessions is empty"),
        "{r:?}"
    );
    // An unreachable database: static, saying why; never looser.
    let r = belay("postgres://nobody@127.0.0.1:1/none", dir.path(), &["lint"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("lint: cannot read the database's facts"),
        "{r:?}"
    );
}

#[test]
fn small_table_thresholds_come_from_belay_toml() {
    let db = db();
    psql(
        &db.url,
        "CREATE TABLE mid (id int, a int); INSERT INTO mid SELECT g, g FROM generate_series(1, 1000) g; ANALYZE mid;",
    );
    let dir = migrations(&[(
        "V1__idx.sql",
        "-- belay:irreversible\nCREATE INDEX mid_a ON mid (a);\n",
    )]);
    let verdict = |config: Option<&str>| {
        let mut args = Vec::new();
        let cfg = dir.path().join("belay.toml");
        if let Some(body) = config {
            std::fs::write(&cfg, body).expect("write config");
            args.extend(["--config", cfg.to_str().expect("utf-8")]);
        }
        args.extend(["plan", "--output", "json"]);
        let r = belay(&db.url, dir.path(), &args);
        if r.code != 0 {
            return (r.code, r.stderr);
        }
        let plan = r.json();
        let lint = plan_lint(&plan);
        let f = lint
            .iter()
            .find(|f| f["rule"] == "create-index-concurrently")
            .expect("finding");
        (0, f["verdict"].as_str().unwrap_or_default().to_string())
    };
    assert_eq!(
        verdict(None),
        (0, "downgraded".into()),
        "1 000 rows are small by default"
    );
    assert_eq!(
        verdict(Some("[lint]\nsmall_table_rows = 100\n")),
        (0, "blocking".into())
    );
    assert_eq!(
        verdict(Some("[lint]\nsmall_table_bytes = \"8kB\"\n")),
        (0, "blocking".into())
    );
    assert_eq!(
        verdict(Some(
            "[lint]\nsmall_table_rows = 100000\nsmall_table_bytes = \"1MiB\"\n"
        )),
        (0, "downgraded".into())
    );
    let (code, err) = verdict(Some("[lint]\nsmall_rows = 1\n"));
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("`lint.small_rows`: unknown key `small_rows`"),
        "{err}"
    );
    let (code, err) = verdict(Some("[lint]\nsmall_table_bytes = \"huge\"\n"));
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("invalid size \"huge\""), "{err}");
}
