//! Migration files as other tools write them: goose and dbmate sections read exactly,
//! markers belay does not read refused before anything runs, and the files a layout's
//! own tool ignores skipped with a warning the user sees.

mod support;
use support::*;

/// A table holding one row, created outside belay: the data a down section run by
/// mistake would destroy.
fn table_with_a_row(url: &str) {
    psql(
        url,
        "CREATE TABLE users (id int PRIMARY KEY, name text); INSERT INTO users VALUES (1, 'ada');",
    );
}

fn users_rows(url: &str) -> String {
    psql(url, "SELECT count(*) FROM users")
}

#[test]
fn section_markers_belay_does_not_read_are_refused_and_nothing_runs() {
    // Each file adds a column in its first section and drops the table in its second:
    // run whole, as a plain script, the data would be gone.
    type Case<'a> = (&'a str, &'a str, &'a [&'a str]);
    let cases: &[Case] = &[
        (
            "V2__add_email.sql",
            "-- +goose Up\nALTER TABLE users ADD COLUMN email text;\n-- +goose Down\nDROP TABLE users;\n",
            &[
                "V2__add_email.sql:line 1",
                "`-- +goose Up`",
                "goose section marker",
            ],
        ),
        (
            "2_add_email.up.sql",
            "ALTER TABLE users ADD COLUMN email text;\n\n-- migrate:down\nDROP TABLE users;\n",
            &["2_add_email.up.sql:line 3", "`-- migrate:down`", "dbmate"],
        ),
        (
            "2_add_email/up.sql",
            "-- +migrate Up\nALTER TABLE users ADD COLUMN email text;\n-- +migrate Down\nDROP TABLE users;\n",
            &["up.sql:line 1", "`-- +migrate Up`", "sql-migrate"],
        ),
        (
            "20240101000000_add_email.sql",
            "-- +migrate Up\nALTER TABLE users ADD COLUMN email text;\n-- +migrate Down\nDROP TABLE users;\n",
            &["20240101000000_add_email.sql:line 1", "sql-migrate"],
        ),
        (
            "20240101000000_add_email.sql",
            "--liquibase formatted sql\n--changeset ada:1\nALTER TABLE users ADD COLUMN email text;\n--rollback DROP TABLE users;\n",
            &["20240101000000_add_email.sql:line 1", "Liquibase"],
        ),
        (
            "20240101000000_add_email.sql",
            "-- +goose envsub on\n-- +goose Up\nALTER TABLE users ADD COLUMN email text;\n-- +goose Down\nDROP TABLE users;\n",
            &[
                "20240101000000_add_email.sql:line 1",
                "`-- +goose envsub on`",
            ],
        ),
        (
            "20240101000000_add_email.sql",
            "-- +goose Up\nALTER TABLE users ADD COLUMN email text;\n-- migrate:down\nDROP TABLE users;\n",
            &[
                "20240101000000_add_email.sql:line 3",
                "dbmate section marker",
            ],
        ),
        (
            "20240101000000_add_email.sql",
            "-- migrate:up\nALTER TABLE users ADD COLUMN email text;\n-- migrate:down cascade:true\nDROP TABLE users;\n",
            &[
                "20240101000000_add_email.sql:line 3",
                "unknown dbmate option `cascade:true`",
            ],
        ),
        (
            "20240101000000_add_email.sql",
            "-- +goose Up\n-- +goose StatementBegin\nALTER TABLE users ADD COLUMN email text;\n-- +goose Down\nDROP TABLE users;\n",
            &["20240101000000_add_email.sql:line 2", "StatementEnd"],
        ),
    ];
    for (name, body, wants) in cases {
        let db = db();
        table_with_a_row(&db.url);
        let dir = migrations(&[(name, body)]);
        for cmd in ["migrate", "plan"] {
            let r = belay(&db.url, dir.path(), &[cmd]);
            assert_eq!(r.code, 65, "{name}: {cmd}: {r:?}");
            for w in *wants {
                assert!(
                    r.stderr.contains(w),
                    "{name}: {cmd}: stderr lacks {w:?}: {r:?}"
                );
            }
        }
        assert_eq!(users_rows(&db.url), "1", "{name}: the data is gone");
        assert_eq!(
            psql(
                &db.url,
                "SELECT count(*) FROM information_schema.columns WHERE table_name = 'users' AND column_name = 'email'"
            ),
            "0",
            "{name}: the first section ran"
        );
        assert!(
            !history_schema_exists(&db.url),
            "{name}: something was written"
        );
    }
}

#[test]
fn goose_and_dbmate_down_sections_are_undo_scripts_only() {
    let layouts: &[(&str, &[(&str, &str)])] = &[
        (
            "goose",
            &[
                (
                    "20240101000000_no_undo.sql",
                    "-- +goose Up\nCREATE TABLE other (id int);\n-- +goose Down\n-- no way back\n",
                ),
                (
                    "20240102000000_keep.sql",
                    "-- +goose Up\nCREATE TABLE keep (v text);\nINSERT INTO keep VALUES ('first');\n\n-- +goose Down\nDROP TABLE keep;\n",
                ),
                (
                    "20240103000000_more.sql",
                    "-- +goose NO TRANSACTION\n-- +goose Up\nINSERT INTO keep VALUES ('second');\nCREATE INDEX CONCURRENTLY keep_v ON keep (v);\n-- +goose Down\nDROP INDEX CONCURRENTLY keep_v;\nDELETE FROM keep WHERE v = 'second';\n",
                ),
            ],
        ),
        (
            "dbmate",
            &[
                (
                    "20240101000000_no_undo.sql",
                    "-- migrate:up\nCREATE TABLE other (id int);\n-- migrate:down\n",
                ),
                (
                    "20240102000000_keep.sql",
                    "-- migrate:up\nCREATE TABLE keep (v text);\nINSERT INTO keep VALUES ('first');\n\n-- migrate:down\nDROP TABLE keep;\n",
                ),
                (
                    "20240103000000_more.sql",
                    "-- migrate:up transaction:false\nINSERT INTO keep VALUES ('second');\nCREATE INDEX CONCURRENTLY keep_v ON keep (v);\n-- migrate:down transaction:false\nDROP INDEX CONCURRENTLY keep_v;\nDELETE FROM keep WHERE v = 'second';\n",
                ),
            ],
        ),
    ];
    for (tool, files) in layouts {
        let db = db();
        let dir = migrations(files);
        let r = belay_ok(&db.url, dir.path(), &["plan"]);
        assert!(
            r.stdout.contains(&format!("no transaction ({tool}_")),
            "{tool}: plan does not say why: {r:?}"
        );
        belay_ok(&db.url, dir.path(), &["migrate"]);
        assert_eq!(
            psql(&db.url, "SELECT string_agg(v, ',' ORDER BY v) FROM keep"),
            "first,second",
            "{tool}: a down section ran during migrate"
        );
        assert_eq!(
            psql(
                &db.url,
                "SELECT count(*) FROM pg_indexes WHERE indexname = 'keep_v'"
            ),
            "1"
        );

        // The down section is the undo, and only its own statements run.
        belay_ok(&db.url, dir.path(), &["undo"]);
        assert_eq!(
            states(&db.url, dir.path())[2],
            ("20240103000000".into(), "undone".into()),
            "{tool}"
        );
        assert_eq!(
            psql(&db.url, "SELECT string_agg(v, ',' ORDER BY v) FROM keep"),
            "first",
            "{tool}: the undo did not run exactly the down section"
        );
        assert_eq!(
            psql(
                &db.url,
                "SELECT count(*) FROM pg_indexes WHERE indexname = 'keep_v'"
            ),
            "0"
        );
        belay_ok(&db.url, dir.path(), &["undo"]);
        assert_eq!(psql(&db.url, "SELECT to_regclass('keep') IS NULL"), "t");

        // An empty down section is no undo: refused, nothing undone.
        let r = belay(&db.url, dir.path(), &["undo"]);
        assert_eq!(r.code, 2, "{tool}: {r:?}");
        assert!(
            r.stderr
                .contains("20240101000000_no_undo.sql has no undo script")
                && r.stderr.contains("in the same file"),
            "{tool}: {r:?}"
        );
        assert_eq!(
            psql(&db.url, "SELECT to_regclass('other') IS NOT NULL"),
            "t"
        );
        assert_eq!(
            states(&db.url, dir.path())[0],
            ("20240101000000".into(), "success".into())
        );
    }
}

#[test]
fn errors_in_a_section_point_at_the_files_own_line() {
    let db = db();
    let dir = migrations(&[(
        "20240101000000_bad.sql",
        "-- +goose Up\nCREATE TABLE t (id int);\n\n-- +goose Down\nDROP TABLE t;\nDROP TABLE nope;\n",
    )]);
    belay_ok(&db.url, dir.path(), &["migrate"]);
    let r = belay(&db.url, dir.path(), &["undo"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("20240101000000_bad.sql:6"),
        "the error does not name the file's line 6: {r:?}"
    );
    assert_eq!(
        psql(&db.url, "SELECT to_regclass('t') IS NOT NULL"),
        "t",
        "the failed undo's transaction was not rolled back"
    );
}

#[test]
fn files_the_layouts_tool_ignores_are_skipped_with_a_warning() {
    let db = db();
    let dir = migrations(&[
        (
            "2024-01-01-000000_create_t/up.sql",
            "CREATE TABLE t (id int);",
        ),
        ("2024-01-01-000000_create_t/down.sql", "DROP TABLE t;"),
        ("2024-01-01-000000_create_t/README.md", "notes"),
        ("README.md", "how we migrate"),
        (".gitkeep", ""),
        ("seed_data.sql", "CREATE TABLE stray (id int);"),
    ]);
    let r = belay_ok(&db.url, dir.path(), &["plan"]);
    assert!(
        r.stdout.contains("warning: ")
            && r.stdout.contains("seed_data.sql: skipped, not a migration"),
        "{r:?}"
    );
    let r = belay_ok(&db.url, dir.path(), &["status"]);
    assert!(
        r.stderr
            .contains("skipped 1 file(s) that are not migrations: README.md"),
        "{r:?}"
    );
    assert!(!r.stderr.contains(".gitkeep"), "{r:?}");
    assert!(r.stderr.contains("create_t/README.md: skipped"), "{r:?}");
    let r = belay_ok(&db.url, dir.path(), &["migrate"]);
    assert!(r.stdout.contains("seed_data.sql: skipped"), "{r:?}");
    assert_eq!(psql(&db.url, "SELECT to_regclass('t') IS NOT NULL"), "t");
    assert_eq!(
        psql(&db.url, "SELECT to_regclass('stray') IS NULL"),
        "t",
        "a skipped file ran"
    );

    // A name that looks like a migration is still an error, and nothing runs.
    let db = support::db();
    std::fs::write(
        dir.path().join("2024-02-01-000000_typo.up.sq"),
        "DROP TABLE t;",
    )
    .expect("write");
    let r = belay(&db.url, dir.path(), &["migrate"]);
    assert_eq!(r.code, 65, "{r:?}");
    assert!(r.stderr.contains("2024-02-01-000000_typo.up.sq"), "{r:?}");
    assert!(!history_schema_exists(&db.url));
}
