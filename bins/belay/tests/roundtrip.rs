//! up → undo all → up round trips, compared with `pg_dump --schema-only`.

mod support;
use std::path::Path;
use support::*;

fn round_trip(dir: &Path) {
    let db = db();
    let start = schema(&db.url);
    belay_ok(&db.url, dir, &["migrate"]);
    let applied = schema(&db.url);
    assert_ne!(start, applied, "migrate changed nothing");
    assert!(states(&db.url, dir).iter().all(|(_, s)| s == "success"));

    belay_ok(&db.url, dir, &["undo", "--all"]);
    assert_eq!(
        schema(&db.url),
        start,
        "undo --all did not restore the starting schema"
    );
    assert!(states(&db.url, dir).iter().all(|(_, s)| s == "undone"));
    // A second undo has nothing to revert, and says so in undo's words.
    let again = belay_ok(&db.url, dir, &["undo", "--all"]);
    assert!(
        again
            .stdout
            .contains("nothing to undo: no applied migration to revert"),
        "{again:?}"
    );

    belay_ok(&db.url, dir, &["migrate"]);
    assert_eq!(
        schema(&db.url),
        applied,
        "re-apply differs from the first apply"
    );
    assert!(states(&db.url, dir).iter().all(|(_, s)| s == "success"));
}

#[test]
fn examples_project_round_trips() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/migrations");
    round_trip(&dir);
}

/// (name, up, down, runs outside a transaction)
const CORPUS: &[(&str, &str, &str, bool)] = &[
    (
        "enum_and_table",
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');\nCREATE TABLE people (\n  id serial PRIMARY KEY,\n  name text NOT NULL,\n  current_mood mood DEFAULT 'ok'\n);\n",
        "DROP TABLE people;\nDROP TYPE mood;\n",
        false,
    ),
    (
        "trigger_with_dollar_quotes",
        "CREATE FUNCTION trim_name() RETURNS trigger LANGUAGE plpgsql AS $fn$\nBEGIN\n  NEW.name := trim(NEW.name); -- a semicolon; in a comment\n  RETURN NEW;\nEND\n$fn$;\nCREATE TRIGGER people_trim BEFORE INSERT OR UPDATE ON people\n  FOR EACH ROW EXECUTE FUNCTION trim_name();\n",
        "DROP TRIGGER people_trim ON people;\nDROP FUNCTION trim_name();\n",
        false,
    ),
    (
        "do_block_and_partitions",
        "DO $$\nBEGIN\n  IF NOT EXISTS (SELECT 1 FROM pg_class WHERE relname = 'events') THEN\n    RAISE NOTICE 'creating; events';\n  END IF;\nEND\n$$;\nCREATE TABLE events (\n  id bigint NOT NULL,\n  at timestamptz NOT NULL,\n  note text DEFAULT E'it\\'s; fine'\n) PARTITION BY RANGE (at);\nCREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');\nCREATE TABLE \"odd;name\" (v text);\n",
        "DROP TABLE \"odd;name\";\nDROP TABLE events;\n",
        false,
    ),
    (
        "index_concurrently",
        "CREATE INDEX CONCURRENTLY people_name_idx ON people (name);\n",
        "DROP INDEX CONCURRENTLY people_name_idx;\n",
        true,
    ),
    (
        "comment_only",
        "-- nothing to do here, on purpose\n",
        "",
        false,
    ),
];

#[test]
fn corpus_round_trips_in_flyway_layout() {
    let mut files = Vec::new();
    for (i, (name, up, down, no_tx)) in CORPUS.iter().enumerate() {
        let v = i + 1;
        files.push((format!("V{v}__{name}.sql"), up.to_string()));
        // Flyway's own convention for the forward script, belay's directive for the undo.
        if *no_tx {
            files.push((
                format!("V{v}__{name}.sql.conf"),
                "executeInTransaction=false\n".into(),
            ));
        }
        let down = if *no_tx {
            format!("-- belay:no-transaction\n{down}")
        } else {
            down.to_string()
        };
        files.push((format!("U{v}__{name}.sql"), down));
    }
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    round_trip(migrations(&refs).path());
}

#[test]
fn corpus_round_trips_in_paired_layout() {
    let mut files = Vec::new();
    for (i, (name, up, down, no_tx)) in CORPUS.iter().enumerate() {
        // Timestamps as versions, as golang-migrate and sqlx generate them.
        let v = 20260101000000u64 + i as u64;
        let prefix = if *no_tx { "-- no-transaction\n" } else { "" };
        files.push((format!("{v}_{name}.up.sql"), format!("{prefix}{up}")));
        files.push((format!("{v}_{name}.down.sql"), format!("{prefix}{down}")));
    }
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    round_trip(migrations(&refs).path());
}

#[test]
fn corpus_round_trips_in_folder_layout() {
    let mut files = Vec::new();
    for (i, (name, up, down, no_tx)) in CORPUS.iter().enumerate() {
        // diesel's dashed timestamps, and a folder name with spaces.
        let folder = format!("2026-07-30-14000{i}_{} step", name.replace('_', " "));
        files.push((format!("{folder}/up.sql"), up.to_string()));
        files.push((format!("{folder}/down.sql"), down.to_string()));
        if *no_tx {
            files.push((
                format!("{folder}/metadata.toml"),
                "run_in_transaction = false\n".into(),
            ));
        }
    }
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    round_trip(migrations(&refs).path());
}

/// The corpus as single files with sections (goose, dbmate). An empty down section means
/// "no undo" in these layouts, so the comment-only migration's undo is a harmless query.
fn single_files(section: impl Fn(&str, &str, &str, bool) -> String) -> Vec<(String, String)> {
    CORPUS
        .iter()
        .enumerate()
        .map(|(i, (name, up, down, no_tx))| {
            let down = if down.is_empty() {
                "SELECT 'nothing to undo';\n"
            } else {
                down
            };
            (
                format!("{}_{name}.sql", 20260101000000u64 + i as u64),
                section(name, up, down, *no_tx),
            )
        })
        .collect()
}

#[test]
fn corpus_round_trips_in_goose_layout() {
    let files = single_files(|name, up, down, no_tx| {
        let mut f = String::new();
        if no_tx {
            f.push_str("-- +goose NO TRANSACTION\n");
        }
        f.push_str(&format!("-- {name}, as goose writes it\n-- +goose Up\n"));
        // goose needs StatementBegin/End around bodies with semicolons; belay checks them
        // and splits by its own lexer.
        if up.contains('$') {
            f.push_str(&format!(
                "-- +goose StatementBegin\n{up}-- +goose StatementEnd\n"
            ));
        } else {
            f.push_str(up);
        }
        f.push_str(&format!("\n-- +goose Down\n{down}"));
        f
    });
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    round_trip(migrations(&refs).path());
}

#[test]
fn corpus_round_trips_in_dbmate_layout() {
    let files = single_files(|name, up, down, no_tx| {
        let option = if no_tx { " transaction:false" } else { "" };
        format!(
            "-- {name}, as dbmate writes it\n-- migrate:up{option}\n{up}\n-- migrate:down{option}\n{down}"
        )
    });
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    round_trip(migrations(&refs).path());
}

/// A single file's down section runs only when undoing: applying leaves the data its
/// down section would destroy.
#[test]
fn a_down_section_never_runs_during_migrate() {
    for (tool, body) in [
        (
            "goose",
            "-- +goose Up\nCREATE TABLE precious (v text);\nINSERT INTO precious VALUES ('kept');\n-- +goose Down\nDROP TABLE precious;\n",
        ),
        (
            "dbmate",
            "-- migrate:up\nCREATE TABLE precious (v text);\nINSERT INTO precious VALUES ('kept');\n-- migrate:down\nDROP TABLE precious;\n",
        ),
    ] {
        let db = db();
        let dir = migrations(&[("20240101000000_precious.sql", body)]);
        let r = belay_ok(&db.url, dir.path(), &["migrate"]);
        assert!(
            r.stdout.contains("applied 20240101000000_precious.sql"),
            "{tool}: {r:?}"
        );
        assert_eq!(
            psql(&db.url, "SELECT string_agg(v, ',') FROM precious"),
            "kept",
            "{tool}: the down section ran"
        );
        belay_ok(&db.url, dir.path(), &["migrate"]);
        assert_eq!(
            psql(&db.url, "SELECT count(*) FROM precious"),
            "1",
            "{tool}"
        );
        assert_eq!(
            states(&db.url, dir.path()),
            [("20240101000000".to_string(), "success".to_string())],
            "{tool}"
        );
    }
}

#[test]
fn plan_sql_shows_transactions_directives_and_history_rows() {
    let db = db();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/migrations");
    let r = belay_ok(&db.url, &dir, &["plan", "--sql"]);
    let sql = &r.stdout;
    assert!(
        sql.contains("CREATE TABLE IF NOT EXISTS \"belay\".\"schema_history\""),
        "{sql}"
    );
    assert!(
        sql.contains("BEGIN;\nSET LOCAL lock_timeout = '10s';\nCREATE TABLE users"),
        "{sql}"
    );
    assert!(
        sql.contains("INSERT INTO \"belay\".\"schema_history\""),
        "{sql}"
    );
    assert!(sql.contains("no transaction: directive"), "{sql}");
    assert!(
        sql.contains("SET lock_timeout = '30min';\nCREATE INDEX CONCURRENTLY"),
        "{sql}"
    );
    assert!(!history_schema_exists(&db.url), "plan must not write");
    // plan text lists the four migrations in order
    let r = belay_ok(&db.url, &dir, &["plan"]);
    let order: Vec<usize> = ["V001", "V002", "V003", "V004"]
        .iter()
        .map(|v| r.stdout.find(v).expect("listed"))
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{}", r.stdout);
}

#[test]
fn steps_and_to_limit_migrate_and_undo() {
    let db = db();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/migrations");
    belay_ok(&db.url, &dir, &["migrate", "--steps", "1"]);
    belay_ok(&db.url, &dir, &["migrate", "--to", "003"]);
    let s = states(&db.url, &dir);
    assert_eq!(
        s.iter().filter(|(_, st)| st == "success").count(),
        3,
        "{s:?}"
    );
    belay_ok(&db.url, &dir, &["undo", "--to", "001"]);
    let s = states(&db.url, &dir);
    assert_eq!(s[0], ("001".into(), "success".into()));
    assert_eq!(s[1].1, "undone");
    assert_eq!(s[3].1, "pending");
    belay_ok(&db.url, &dir, &["undo"]);
    assert_eq!(states(&db.url, &dir)[0].1, "undone");
    let r = belay(&db.url, &dir, &["migrate", "--to", "77"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("no migration with version 77"), "{r:?}");
}

#[test]
fn repeatable_migrations_rerun_when_their_checksum_changes() {
    let db = db();
    let dir = migrations(&[
        ("V1__t.sql", "CREATE TABLE t (id int, v text);"),
        (
            "R__view.sql",
            "CREATE OR REPLACE VIEW t_view AS SELECT id FROM t;",
        ),
    ]);
    let r = belay_ok(&db.url, dir.path(), &["migrate"]);
    assert!(
        r.stdout.contains("applied (repeatable) R__view.sql"),
        "{r:?}"
    );
    let r = belay_ok(&db.url, dir.path(), &["migrate"]);
    assert!(r.stdout.contains("nothing to migrate"), "{r:?}");
    std::fs::write(
        dir.path().join("R__view.sql"),
        "CREATE OR REPLACE VIEW t_view AS SELECT id, v FROM t;",
    )
    .unwrap();
    assert_eq!(
        states(&db.url, dir.path())[1],
        ("R".into(), "pending".into())
    );
    belay_ok(&db.url, dir.path(), &["migrate"]);
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 't_view'"
        ),
        "2"
    );
    assert_eq!(
        states(&db.url, dir.path())[1],
        ("R".into(), "success".into())
    );
}

#[test]
fn directives_reach_the_executed_sql() {
    let db = db();
    let dir = migrations(&[(
        "V1__t.sql",
        "-- belay:lock-timeout=250ms\n-- belay:statement-timeout=5min\nCREATE TABLE t (id int);",
    )]);
    let r = belay_ok(&db.url, dir.path(), &["plan", "--sql"]);
    assert!(
        r.stdout
            .contains("SET LOCAL lock_timeout = '250ms';\nSET LOCAL statement_timeout = '5min';"),
        "{r:?}"
    );
    let r = belay_ok(&db.url, dir.path(), &["plan"]);
    assert!(
        r.stdout
            .contains("lock-timeout 250ms; statement-timeout 5min"),
        "{r:?}"
    );
}

#[test]
fn a_version_older_than_the_newest_applied_is_applied_with_a_warning() {
    let db = db();
    let dir = migrations(&[
        ("V1__a.sql", "CREATE TABLE a (id int);"),
        ("V3__c.sql", "CREATE TABLE c (id int);"),
    ]);
    belay_ok(&db.url, dir.path(), &["migrate"]);
    std::fs::write(dir.path().join("V2__b.sql"), "CREATE TABLE b (id int);").unwrap();
    let r = belay_ok(&db.url, dir.path(), &["migrate"]);
    assert!(
        r.stdout
            .contains("V2__b.sql is applied out of order: version 3 is already applied"),
        "{r:?}"
    );
    assert!(
        states(&db.url, dir.path())
            .iter()
            .all(|(_, s)| s == "success")
    );
}

#[test]
fn the_history_row_times_the_script_it_records() {
    // The row travels in the script's own message, and the server times it: at least
    // the script's sleep, whatever the client's latency. A message that long is no
    // warning: sqlx's "slow statement" log would print it, history row and all.
    let db = db();
    let dir = migrations(&[
        (
            "V1__slow.sql",
            "CREATE TABLE slow (id int);\nSELECT pg_sleep(1.05);\n",
        ),
        ("V2__quick.sql", "CREATE TABLE quick (id int);\n"),
    ]);
    let r = belay_ok(&db.url, dir.path(), &["migrate"]);
    assert!(!r.stderr.contains("slow statement"), "{r:?}");
    assert_eq!(
        psql(
            &db.url,
            "SELECT string_agg(version || ':' || (version <> '1' OR execution_time >= 1050)::text \
             || ':' || state, ',' ORDER BY installed_rank) FROM belay.schema_history"
        ),
        "1:true:success,2:true:success"
    );
}
