//! Plain-format `pg_dump` output as a migration (`V1__baseline.sql`): taken the way teams
//! take a baseline, it applies with a default `belay migrate` (lint and backup on),
//! reproduces schema and data exactly, leaves none of its session settings to the next
//! migration, and what belay cannot run exactly is refused before anything runs.

mod support;
use std::path::PathBuf;
use std::process::Command;
use support::*;

/// A database with what a baseline meets in practice: enums, domains, composite types,
/// plpgsql with dollar quotes, arrays, jsonb, sequences, identity columns, views, a
/// materialized view, partitions, triggers, foreign keys, a second schema, and text that
/// looks like script syntax (tabs, newlines, backslashes, semicolons, `\.`, non-ASCII).
const SOURCE: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE SEQUENCE ticket_seq START 100;
CREATE TABLE people (
  id bigserial PRIMARY KEY,
  name text NOT NULL,
  current mood NOT NULL DEFAULT 'ok',
  tags text[] NOT NULL DEFAULT '{}',
  profile jsonb,
  note text,
  ticket bigint DEFAULT nextval('ticket_seq')
);
CREATE TABLE visits (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  person_id bigint NOT NULL REFERENCES people(id),
  at timestamptz NOT NULL DEFAULT '2026-01-01 00:00:00+00'
);
CREATE INDEX visits_person_idx ON visits (person_id);
CREATE FUNCTION shout(t text) RETURNS text LANGUAGE plpgsql AS $fn$
BEGIN
  -- a semicolon; a backslash \ and \connect in a body
  RETURN upper(t) || E'!\\;';
END
$fn$;
CREATE VIEW loud_people AS SELECT id, shout(name) AS loud FROM people;
INSERT INTO people (name, current, tags, profile, note) VALUES
  ('tab	and', 'happy', '{a,"b c","d\"e"}', '{"k": [1, 2, {"x": "y\\z"}]}', E'line1\nline2\ttab\\back; semi'),
  (E'\\.', 'sad', '{}', NULL, E'a\n\\.\nb'),
  ('ünïcødé ✓ 日本', 'ok', '{"ü"}', '{"ü": "✓"}', NULL),
  ('semi;colon', 'ok', '{NULL}', '[]', E'\r\n\\.\n'),
  (E'\\connect other', 'ok', '{"\\\\set x 1"}', '{"s": "\\\\."}', '');
INSERT INTO visits (person_id) SELECT id FROM people;
SELECT setval('ticket_seq', 500);

CREATE SCHEMA app;
CREATE DOMAIN app.positive AS int CHECK (VALUE > 0);
CREATE TYPE app.pair AS (a int, b text);
CREATE TABLE app.orders (
  id int PRIMARY KEY,
  qty app.positive NOT NULL,
  code text UNIQUE,
  person_id bigint REFERENCES public.people(id) ON DELETE CASCADE,
  pair app.pair,
  CONSTRAINT qty_small CHECK (qty < 1000)
);
COMMENT ON TABLE app.orders IS 'orders; with a semicolon and a \ backslash';
CREATE TABLE app.events (id int NOT NULL, at date NOT NULL, payload jsonb) PARTITION BY RANGE (at);
CREATE TABLE app.events_2026 PARTITION OF app.events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE INDEX events_at_idx ON app.events (at);
CREATE UNIQUE INDEX orders_code_lower ON app.orders (lower(code));
CREATE FUNCTION app.touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.qty := NEW.qty; RETURN NEW; END $$;
CREATE TRIGGER orders_touch BEFORE UPDATE ON app.orders FOR EACH ROW EXECUTE FUNCTION app.touch();
CREATE MATERIALIZED VIEW app.order_totals AS SELECT person_id, sum(qty) AS total FROM app.orders GROUP BY person_id;
INSERT INTO app.orders VALUES (1, 5, 'A;b', 1, ROW(1, E'x\ty')), (2, 7, E'tab\there', 3, NULL);
INSERT INTO app.events VALUES (1, '2026-03-01', '{"a": "\\\\."}');
REFRESH MATERIALIZED VIEW app.order_totals;

-- Several MiB of COPY data, so that it travels in more than one CopyData message.
CREATE TABLE app.bulk (id int PRIMARY KEY, body text);
INSERT INTO app.bulk SELECT g, repeat(md5(g::text), 4) || E'\t\\;' FROM generate_series(1, 20000) g;
"#;

/// Runs unqualified DDL right after the dump, and records the session settings it ran
/// with: a dump's `search_path = ''` would make its CREATE TABLE fail ("no schema has been
/// selected to create in").
const AFTER: &str = "CREATE TABLE after_dump AS SELECT \
    current_setting('search_path') AS search_path, \
    current_setting('check_function_bodies') AS check_function_bodies, \
    current_setting('client_min_messages') AS client_min_messages, \
    current_setting('row_security') AS row_security, \
    current_setting('lock_timeout') AS lock_timeout;\n";

fn pg_bin(name: &str) -> PathBuf {
    belay_testkit::bin_dir()
        .expect("postgres binaries")
        .join(name)
}

/// `pg_dump` of `url` with `args`, exactly as it prints it.
fn pg_dump(url: &str, args: &[&str]) -> String {
    let out = Command::new(pg_bin("pg_dump"))
        .args(args)
        .args(["--dbname", url])
        .output()
        .expect("run pg_dump");
    assert!(
        out.status.success(),
        "pg_dump {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("pg_dump writes UTF-8 here")
}

/// A dump to compare two databases by: without comments, the random `\restrict` lines,
/// belay's history and the table the migration after the baseline creates.
fn comparable(url: &str, args: &[&str]) -> String {
    let mut all = vec![
        "--exclude-schema=belay",
        "--exclude-table=public.after_dump",
    ];
    all.extend_from_slice(args);
    pg_dump(url, &all)
        .lines()
        .filter(|l| {
            !l.starts_with("--") && !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Equal dumps, or a panic showing the first line where they differ (a dump with data is
/// megabytes long).
fn assert_same_dump(target: &str, source: &str, what: &str) {
    if target == source {
        return;
    }
    let (t, s): (Vec<&str>, Vec<&str>) = (target.lines().collect(), source.lines().collect());
    let at = t
        .iter()
        .zip(&s)
        .position(|(a, b)| a != b)
        .unwrap_or(t.len().min(s.len()));
    panic!(
        "{what}: the target differs from the source at line {} ({} vs {} lines)\ntarget: {:?}\nsource: {:?}",
        at + 1,
        t.len(),
        s.len(),
        t.get(at),
        s.get(at)
    );
}

fn source() -> belay_testkit::TestDb {
    let db = db();
    psql(&db.url, SOURCE);
    db
}

fn table_exists(url: &str, name: &str) -> bool {
    psql(url, &format!("SELECT to_regclass('{name}') IS NOT NULL")) == "t"
}

/// What a fresh session of `url` has, with belay's lock_timeout for a statement the lock
/// guard watches (`guarded_lock_timeout`, 10 s: the guard gives way first): what the
/// migration after the dump must see.
fn fresh_session_settings(url: &str) -> String {
    psql(
        url,
        "SELECT current_setting('search_path'), current_setting('check_function_bodies'), \
         current_setting('client_min_messages'), current_setting('row_security'), '10s'",
    )
}

#[test]
fn a_pg_dump_with_data_applies_as_the_baseline_and_reproduces_schema_and_data() {
    let src = source();
    let dump = pg_dump(&src.url, &[]);
    assert!(
        dump.contains(" FROM stdin;\n"),
        "no COPY in the dump: {dump}"
    );
    let target = db();
    let dir = migrations(&[("V1__baseline.sql", &dump), ("V2__after.sql", AFTER)]);

    // plan --sql shows each COPY with a summary of its data, not the data.
    let plan = belay_ok(&target.url, dir.path(), &["plan", "--sql"]);
    assert!(
        plan.stdout.contains(
            "COPY public.people (id, name, current, tags, profile, note, ticket) FROM stdin;\n-- then 5 data line(s)"
        ),
        "{plan:?}"
    );
    assert!(!plan.stdout.contains("ünïcødé"), "{plan:?}");
    assert!(!plan.stdout.contains("\\restrict"), "{plan:?}");
    assert!(
        plan.stdout
            .contains("-- the session reset for the next migration\nSET SESSION AUTHORIZATION DEFAULT; RESET ALL; DISCARD TEMP;"),
        "{plan:?}"
    );

    // Default migrate: lint gate, backup and lock guard on.
    let run = belay_ok(&target.url, dir.path(), &["migrate"]);
    assert!(
        run.stdout.contains("V1__baseline.sql:") && run.stdout.contains("sets lock_timeout itself"),
        "{run:?}"
    );
    assert_eq!(
        states(&target.url, dir.path()),
        [
            ("1".into(), "success".into()),
            ("2".into(), "success".into())
        ]
    );
    assert_same_dump(
        &comparable(&target.url, &["--schema-only"]),
        &comparable(&src.url, &["--schema-only"]),
        "schema",
    );
    let data = comparable(&src.url, &["--data-only"]);
    assert!(data.len() > 2 << 20, "{} bytes of data only", data.len());
    assert_same_dump(&comparable(&target.url, &["--data-only"]), &data, "data");
    // The same rows, byte for byte, also as the application reads them.
    let rows = "SELECT string_agg(format('%s|%s|%s|%s|%s', name, tags, profile, note, ticket), E'\\n' ORDER BY id) FROM public.people";
    assert_eq!(psql(&target.url, rows), psql(&src.url, rows));

    // V2 ran in a session with none of the dump's settings, and belay's lock_timeout.
    assert_eq!(
        psql(&target.url, "SELECT * FROM public.after_dump"),
        fresh_session_settings(&target.url).replace('\n', "|")
    );
}

#[test]
fn a_schema_only_pg_dump_applies_as_the_baseline_with_no_lint_error() {
    let src = source();
    let dump = pg_dump(&src.url, &["--schema-only"]);
    let target = db();
    let dir = migrations(&[("V1__baseline.sql", &dump), ("V2__after.sql", AFTER)]);
    let lint = belay(&target.url, dir.path(), &["lint"]);
    assert_eq!(lint.code, 0, "{lint:?}");
    assert!(lint.stdout.contains("0 error(s)"), "{lint:?}");
    // A dump linted on its own, before it becomes a migration, reads the same.
    let loose = tempfile::tempdir().expect("tempdir");
    let file = loose.path().join("baseline.sql");
    std::fs::write(&file, &dump).expect("write the dump");
    let lint = belay(
        &target.url,
        loose.path(),
        &["lint", file.to_str().expect("utf-8 path")],
    );
    assert_eq!(lint.code, 0, "{lint:?}");
    assert!(lint.stdout.contains("0 error(s)"), "{lint:?}");

    belay_ok(&target.url, dir.path(), &["migrate"]);
    assert_same_dump(
        &comparable(&target.url, &["--schema-only"]),
        &comparable(&src.url, &["--schema-only"]),
        "schema",
    );
    assert_eq!(psql(&target.url, "SELECT count(*) FROM public.people"), "0");
    assert_eq!(
        psql(&target.url, "SELECT * FROM public.after_dump"),
        fresh_session_settings(&target.url).replace('\n', "|")
    );
}

/// Runs `migrate` over a V1 holding `body` after a CREATE TABLE, expecting a refusal of
/// the file before anything ran; returns stderr.
fn refused(body: &str) -> String {
    let target = db();
    let dir = migrations(&[(
        "V1__baseline.sql",
        &format!("CREATE TABLE t (id int, v text);\n{body}"),
    )]);
    let r = belay(&target.url, dir.path(), &["migrate"]);
    assert_eq!(r.code, 65, "{r:?}");
    assert!(!history_schema_exists(&target.url), "{r:?}");
    assert!(!table_exists(&target.url, "public.t"), "{r:?}");
    r.stderr
}

#[test]
fn psql_meta_commands_belay_cannot_run_are_refused_naming_file_line_and_command() {
    let err = refused("SELECT 1;\n\\connect other\nINSERT INTO t VALUES (1, 'x');\n");
    assert!(err.contains("V1__baseline.sql:line 3"), "{err}");
    assert!(err.contains("`\\connect other`"), "{err}");
    assert!(err.contains("without `--create`"), "{err}");

    let err = refused("\n\\set x 1\nINSERT INTO t VALUES (1, 'x');\n");
    assert!(err.contains("V1__baseline.sql:line 3"), "{err}");
    assert!(err.contains("`\\set x 1`"), "{err}");

    let err = refused("COPY public.t (id, v) FROM stdin;\n1\ta\n2\tb\n\nSELECT 1;\n");
    assert!(err.contains("V1__baseline.sql:line 2"), "{err}");
    assert!(err.contains("no `\\.` line"), "{err}");
}

#[test]
fn a_bad_copy_row_fails_at_its_line_and_rolls_the_whole_migration_back() {
    let target = db();
    let dir = migrations(&[(
        "V1__data.sql",
        "CREATE TABLE t (id int, n int);\nCOPY t (id, n) FROM stdin;\n1\t2\n2\tnot a number\n\\.\n",
    )]);
    let r = belay(&target.url, dir.path(), &["migrate"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("V1__data.sql:4"), "{r:?}");
    assert!(
        r.stderr.contains("invalid input syntax for type integer"),
        "{r:?}"
    );
    // The COPY ran in the migration's transaction: the table it loaded is gone too.
    assert!(!table_exists(&target.url, "public.t"), "{r:?}");
}

#[test]
fn copy_data_loads_in_a_no_transaction_script_and_its_session_state_does_not_leak() {
    let target = db();
    let dir = migrations(&[
        (
            "V1__seed.sql",
            "-- belay:no-transaction\nCREATE TABLE t (id int, v text);\nCOPY t (id, v) FROM stdin;\n1\ta\\tb\n2\t\\N\n\\.\nSELECT pg_catalog.set_config('search_path', '', false);\nSET check_function_bodies = false;\n",
        ),
        ("V2__after.sql", AFTER),
    ]);
    belay_ok(&target.url, dir.path(), &["migrate"]);
    assert_eq!(
        psql(
            &target.url,
            "SELECT string_agg(id || '=' || coalesce(v, 'NULL'), ',' ORDER BY id) FROM t"
        ),
        "1=a\tb,2=NULL"
    );
    assert_eq!(
        psql(&target.url, "SELECT * FROM public.after_dump"),
        fresh_session_settings(&target.url).replace('\n', "|")
    );
}

/// pg_dump and hand-written migrations alike `SET ROLE` (or `SET SESSION AUTHORIZATION`)
/// so that what they create has the right owner: belay's own history write after the
/// script runs as the role it connected as, not as the script's role, which need have no
/// rights on belay's history schema.
#[test]
fn a_script_that_sets_its_role_is_recorded_by_the_role_belay_connected_as() {
    let target = db();
    psql(
        &target.url,
        "DO $$ BEGIN CREATE ROLE belay_test_owner NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;\n\
         GRANT CREATE ON SCHEMA public TO belay_test_owner;",
    );
    let dir = migrations(&[
        (
            "V1__no_tx.sql",
            "-- belay:no-transaction\nSET ROLE belay_test_owner;\nCREATE TABLE owned_a (id int);\n",
        ),
        (
            "V2__in_tx.sql",
            "SET ROLE belay_test_owner;\nCREATE TABLE owned_b (id int);\n",
        ),
    ]);
    belay_ok(&target.url, dir.path(), &["migrate"]);
    assert_eq!(
        psql(
            &target.url,
            "SELECT string_agg(relname || '=' || pg_get_userbyid(relowner), ',' ORDER BY relname) \
             FROM pg_class WHERE relname IN ('owned_a', 'owned_b')"
        ),
        "owned_a=belay_test_owner,owned_b=belay_test_owner"
    );
    assert_eq!(
        states(&target.url, dir.path())
            .iter()
            .map(|(v, s)| format!("{v}={s}"))
            .collect::<Vec<_>>(),
        ["1=success", "2=success"]
    );
}
