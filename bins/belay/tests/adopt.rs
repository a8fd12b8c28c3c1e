//! `belay adopt`: each tool's history table created and filled as that tool does, then
//! adopted, checked with `status`, and extended with a migration belay applies itself.

mod support;
use std::path::{Path, PathBuf};
use support::*;

/// A migrations directory the test adds files to later.
fn write(dir: &Path, name: &str, body: &str) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, body).expect("write migration");
}

fn adopt(url: &str, dir: &Path, args: &[&str]) -> Run {
    let mut all = vec!["adopt"];
    all.extend_from_slice(args);
    belay(url, dir, &all)
}

/// `migrate` without the pre-deployment backup, which these tests are not about.
fn migrate(url: &str, dir: &Path) {
    belay_ok(url, dir, &["migrate", "--backup", "none"]);
}

fn all_success(url: &str, dir: &Path, versions: &[&str]) {
    let states = states(url, dir);
    let want: Vec<(String, String)> = versions
        .iter()
        .map(|v| (v.to_string(), "success".to_string()))
        .collect();
    assert_eq!(states, want);
}

fn history_rows(url: &str) -> String {
    psql(
        url,
        "SELECT string_agg(version || ':' || type, ',' ORDER BY installed_rank) FROM belay.schema_history",
    )
}

// ---- Flyway ----

const FLYWAY_DDL: &str = r#"
CREATE TABLE "public"."flyway_schema_history" (
    "installed_rank" INT NOT NULL,
    "version" VARCHAR(50),
    "description" VARCHAR(200) NOT NULL,
    "type" VARCHAR(20) NOT NULL,
    "script" VARCHAR(1000) NOT NULL,
    "checksum" INT,
    "installed_by" VARCHAR(100) NOT NULL,
    "installed_on" TIMESTAMP NOT NULL DEFAULT now(),
    "execution_time" INT NOT NULL,
    "success" BOOLEAN NOT NULL
);
ALTER TABLE "public"."flyway_schema_history" ADD CONSTRAINT "flyway_schema_history_pk" PRIMARY KEY ("installed_rank");
CREATE INDEX "flyway_schema_history_s_idx" ON "public"."flyway_schema_history" ("success");
"#;

const V1: &str = "CREATE TABLE users (\n  id bigint PRIMARY KEY,\n  email text NOT NULL\n);\n";
const V1_1: &str = "-- a Windows checkout\r\nALTER TABLE users ADD COLUMN name text;\r\n";
/// Flyway's checksums of V1 and V1_1, computed outside belay (Python's `zlib.crc32` fed
/// line by line without line endings, as Flyway's `ChecksumCalculator` does, then read as
/// a signed 32-bit integer).
const V1_CRC: i32 = 1_955_042_946;
const V1_1_CRC: i32 = 1_241_653_696;

fn flyway_project() -> (TestDb, tempfile::TempDir) {
    let db = db();
    let dir = migrations(&[
        ("V1__create_users.sql", V1),
        ("V1.1__add_name.sql", V1_1),
        (
            "U1.1__add_name.sql",
            "ALTER TABLE users DROP COLUMN name;\n",
        ),
    ]);
    // What Flyway did: ran the scripts, recorded them.
    psql(&db.url, V1);
    psql(&db.url, "ALTER TABLE users ADD COLUMN name text;");
    psql(&db.url, FLYWAY_DDL);
    psql(
        &db.url,
        &format!(
            "INSERT INTO flyway_schema_history VALUES \
             (1, '1', 'create users', 'SQL', 'V1__create_users.sql', {V1_CRC}, 'alice', '2024-01-02 03:04:05', 12, true), \
             (2, '1.1', 'add name', 'SQL', 'V1.1__add_name.sql', {V1_1_CRC}, 'alice', '2024-01-03 03:04:05', 5, true)"
        ),
    );
    (db, dir)
}

use belay_testkit::TestDb;

#[test]
fn flyway_history_is_adopted_once_and_belay_carries_on() {
    let (db, dir) = flyway_project();
    let dir = dir.path();

    // A dry run shows what would be recorded and writes nothing.
    let dry = adopt(&db.url, dir, &["--dry-run", "--output", "json"]);
    assert_eq!(dry.code, 0, "{dry:?}");
    let doc = dry.json();
    assert_eq!(doc["outcome"], "would_adopt");
    assert_eq!(doc["tool"], "flyway");
    assert_eq!(doc["rows"].as_array().map(Vec::len), Some(2));
    for row in doc["rows"].as_array().into_iter().flatten() {
        assert!(
            row["compared"]
                .as_str()
                .is_some_and(|c| c.starts_with("match")),
            "{row}"
        );
    }
    assert!(!history_schema_exists(&db.url), "a dry run wrote something");

    let r = adopt(&db.url, dir, &[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("adopted 2 migration(s) from flyway"),
        "{r:?}"
    );
    all_success(&db.url, dir, &["1", "1.1"]);
    assert_eq!(history_rows(&db.url), "1:ADOPTED,1.1:ADOPTED");
    let status = belay_ok(&db.url, dir, &["status", "--output", "json"]).json();
    assert_eq!(
        status[0]["type"], "ADOPTED",
        "status shows the origin: {status}"
    );
    // Flyway's record of who and when is kept.
    assert_eq!(
        psql(
            &db.url,
            "SELECT installed_by || ' ' || to_char(installed_on AT TIME ZONE current_setting('TimeZone'), 'YYYY-MM-DD HH24:MI:SS') || ' ' || execution_time \
             FROM belay.schema_history WHERE version = '1'"
        ),
        "alice 2024-01-02 03:04:05 12"
    );
    assert_eq!(
        psql(
            &db.url,
            "SELECT notes->'adopted'->>'from' FROM belay.schema_history WHERE version = '1.1'"
        ),
        "flyway"
    );
    // The other tool's table is untouched.
    assert_eq!(
        psql(&db.url, "SELECT count(*) FROM flyway_schema_history"),
        "2"
    );
    belay_ok(&db.url, dir, &["validate"]);

    // Twice changes nothing.
    let again = adopt(&db.url, dir, &[]);
    assert_eq!(again.code, 0, "{again:?}");
    assert!(again.stdout.contains("nothing to do"), "{again:?}");
    assert_eq!(history_rows(&db.url), "1:ADOPTED,1.1:ADOPTED");

    // belay carries on from there, and still knows nothing more to adopt.
    write(
        dir,
        "V2__orders.sql",
        "CREATE TABLE orders (id bigint PRIMARY KEY);\n",
    );
    write(dir, "U2__orders.sql", "DROP TABLE orders;\n");
    migrate(&db.url, dir);
    all_success(&db.url, dir, &["1", "1.1", "2"]);
    let again = adopt(&db.url, dir, &["--output", "json"]);
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(again.json()["outcome"], "nothing_to_do");

    // An adopted migration undoes with its undo script like any other.
    belay_ok(&db.url, dir, &["undo", "--steps", "2", "--backup", "none"]);
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'users' AND column_name = 'name'"
        ),
        "0"
    );
    let states = states(&db.url, dir);
    assert_eq!(
        states,
        [("1", "success"), ("1.1", "undone"), ("2", "undone")]
            .map(|(v, s)| (v.to_string(), s.to_string()))
    );
}

#[test]
fn flyway_mismatches_are_refused_naming_each_version() {
    let (db, dir) = flyway_project();
    // A row with no file, and a file edited since Flyway ran it.
    psql(
        &db.url,
        "INSERT INTO flyway_schema_history VALUES \
         (3, '3', 'gone', 'SQL', 'V3__gone.sql', 42, 'alice', now(), 1, true)",
    );
    write(
        dir.path(),
        "V1__create_users.sql",
        &V1.replace("NOT NULL", "NULL"),
    );
    let r = adopt(&db.url, dir.path(), &[]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("nothing was written"), "{r:?}");
    assert!(
        r.stderr.contains(
            "version 3 is applied per public.flyway_schema_history but no migration file"
        ),
        "{r:?}"
    );
    assert!(
        r.stderr.contains("version 1: ")
            && r.stderr
                .contains(&format!("Flyway recorded checksum {V1_CRC}")),
        "{r:?}"
    );
    assert!(!history_schema_exists(&db.url));

    // A failed row is refused with Flyway's own way out.
    let (db, dir) = flyway_project();
    psql(
        &db.url,
        "UPDATE flyway_schema_history SET success = false WHERE version = '1.1'",
    );
    let r = adopt(&db.url, dir.path(), &[]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("version 1.1") && r.stderr.contains("flyway repair"),
        "{r:?}"
    );
    assert!(!history_schema_exists(&db.url));
}

// ---- sqlx ----

const SQLX_DDL: &str = "CREATE TABLE IF NOT EXISTS _sqlx_migrations (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    installed_on TIMESTAMPTZ NOT NULL DEFAULT now(),
    success BOOLEAN NOT NULL,
    checksum BYTEA NOT NULL,
    execution_time BIGINT NOT NULL
);";

const SQLX_1: &str = "CREATE TABLE users (id bigint PRIMARY KEY);\n";
const SQLX_2: &str = "-- no-transaction\nCREATE INDEX CONCURRENTLY users_id ON users (id);\n";

/// A sqlx project with both migrations applied; `applied_2` is the text sqlx ran as 2.
fn sqlx_project(applied_2: &str) -> (TestDb, tempfile::TempDir) {
    let db = db();
    let dir = migrations(&[
        ("1_users.up.sql", SQLX_1),
        ("1_users.down.sql", "DROP TABLE users;\n"),
        ("2_index.up.sql", SQLX_2),
        ("2_index.down.sql", "DROP INDEX users_id;\n"),
    ]);
    psql(&db.url, SQLX_1);
    psql(&db.url, "CREATE INDEX users_id ON users (id);");
    psql(&db.url, SQLX_DDL);
    // The checksum as sqlx stores it, computed here by PostgreSQL's own sha384.
    psql(
        &db.url,
        &format!(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES \
             (1, 'users', true, sha384(convert_to($s${SQLX_1}$s$, 'UTF8')), 3000000), \
             (2, 'index', true, sha384(convert_to($s${applied_2}$s$, 'UTF8')), 1000000)"
        ),
    );
    (db, dir)
}

#[test]
fn sqlx_history_is_adopted_with_its_checksums_compared() {
    let (db, dir) = sqlx_project(SQLX_2);
    let dir = dir.path();
    let r = adopt(&db.url, dir, &["--from", "sqlx", "--output", "json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let doc = r.json();
    assert_eq!(doc["outcome"], "adopted");
    assert!(
        doc["rows"][1]["compared"]
            .as_str()
            .is_some_and(|c| c.contains("match") && c.contains("SHA-384")),
        "{doc}"
    );
    assert_eq!(doc["rows"][0]["execution_time_ms"], 3);
    all_success(&db.url, dir, &["1", "2"]);
    write(dir, "3_posts.up.sql", "CREATE TABLE posts (id bigint);\n");
    migrate(&db.url, dir);
    all_success(&db.url, dir, &["1", "2", "3"]);
    assert_eq!(history_rows(&db.url), "1:ADOPTED,2:ADOPTED,3:SQL");
    assert_eq!(psql(&db.url, "SELECT count(*) FROM _sqlx_migrations"), "2");
}

#[test]
fn sqlx_checksum_difference_is_refused_and_nothing_written() {
    let (db, dir) = sqlx_project("CREATE INDEX users_id ON users (id);\n");
    let r = adopt(&db.url, dir.path(), &[]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("version 2:")
            && r.stderr.contains("2_index.up.sql")
            && r.stderr.contains("sqlx recorded SHA-384"),
        "{r:?}"
    );
    assert!(!history_schema_exists(&db.url));

    // A failed sqlx migration is refused with sqlx's way out.
    let (db, dir) = sqlx_project(SQLX_2);
    psql(
        &db.url,
        "UPDATE _sqlx_migrations SET success = false WHERE version = 2",
    );
    let r = adopt(&db.url, dir.path(), &[]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("sqlx recorded version 2 as failed"),
        "{r:?}"
    );
    assert!(!history_schema_exists(&db.url));
}

// ---- diesel ----

#[test]
fn diesel_history_is_adopted_by_dashless_version() {
    let db = db();
    let dir = migrations(&[
        ("2024-01-01-000000_create_users/up.sql", SQLX_1),
        (
            "2024-01-01-000000_create_users/down.sql",
            "DROP TABLE users;\n",
        ),
        (
            "2024-02-01-120000_posts/up.sql",
            "CREATE TABLE posts (id bigint);\n",
        ),
        ("2024-02-01-120000_posts/down.sql", "DROP TABLE posts;\n"),
    ]);
    let dir = dir.path();
    psql(&db.url, SQLX_1);
    psql(&db.url, "CREATE TABLE posts (id bigint);");
    psql(
        &db.url,
        "CREATE TABLE IF NOT EXISTS __diesel_schema_migrations (
           version VARCHAR(50) PRIMARY KEY NOT NULL,
           run_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
         );
         INSERT INTO __diesel_schema_migrations (version) VALUES ('20240101000000'), ('20240201120000');",
    );
    let r = adopt(&db.url, dir, &[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("not compared"), "{r:?}");
    all_success(&db.url, dir, &["2024-01-01-000000", "2024-02-01-120000"]);
    write(
        dir,
        "2024-03-01-000000_tags/up.sql",
        "CREATE TABLE tags (id bigint);\n",
    );
    migrate(&db.url, dir);
    all_success(
        &db.url,
        dir,
        &[
            "2024-01-01-000000",
            "2024-02-01-120000",
            "2024-03-01-000000",
        ],
    );
}

// ---- golang-migrate ----

const GOLANG_MIGRATE_DDL: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (version bigint not null primary key, dirty boolean not null)";

fn golang_migrate_project(version: i64, dirty: bool) -> (TestDb, tempfile::TempDir) {
    let db = db();
    let dir = migrations(&[
        ("000001_users.up.sql", SQLX_1),
        ("000001_users.down.sql", "DROP TABLE users;\n"),
        ("000002_posts.up.sql", "CREATE TABLE posts (id bigint);\n"),
        ("000002_posts.down.sql", "DROP TABLE posts;\n"),
        ("000003_tags.up.sql", "CREATE TABLE tags (id bigint);\n"),
        ("000003_tags.down.sql", "DROP TABLE tags;\n"),
    ]);
    psql(&db.url, SQLX_1);
    psql(&db.url, "CREATE TABLE posts (id bigint);");
    psql(&db.url, GOLANG_MIGRATE_DDL);
    psql(
        &db.url,
        &format!("INSERT INTO schema_migrations (version, dirty) VALUES ({version}, {dirty})"),
    );
    (db, dir)
}

#[test]
fn golang_migrate_version_adopts_every_file_up_to_it() {
    let (db, dir) = golang_migrate_project(2, false);
    let dir = dir.path();
    let r = adopt(&db.url, dir, &[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("golang-migrate"), "{r:?}");
    assert!(
        r.stdout.contains("000003_tags.up.sql"),
        "pending shown: {r:?}"
    );
    let states = states(&db.url, dir);
    assert_eq!(
        states,
        [
            ("000001", "success"),
            ("000002", "success"),
            ("000003", "pending")
        ]
        .map(|(v, s)| (v.to_string(), s.to_string()))
    );
    migrate(&db.url, dir);
    all_success(&db.url, dir, &["000001", "000002", "000003"]);
}

#[test]
fn dirty_golang_migrate_is_refused_with_the_way_out() {
    let (db, dir) = golang_migrate_project(2, true);
    let r = adopt(&db.url, dir.path(), &["--from", "golang-migrate"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("golang-migrate is dirty at version 2")
            && r.stderr.contains("`migrate force 2`"),
        "{r:?}"
    );
    assert!(!history_schema_exists(&db.url));
}

// ---- goose ----

#[test]
fn goose_history_latest_row_per_version_decides() {
    let db = db();
    // Paired files here; goose's own single-file layout is tested below.
    let dir = migrations(&[
        ("00001_users.up.sql", SQLX_1),
        ("00001_users.down.sql", "DROP TABLE users;\n"),
        ("00002_posts.up.sql", "CREATE TABLE posts (id bigint);\n"),
        ("00002_posts.down.sql", "DROP TABLE posts;\n"),
        ("00003_tags.up.sql", "CREATE TABLE tags (id bigint);\n"),
        ("00003_tags.down.sql", "DROP TABLE tags;\n"),
    ]);
    let dir = dir.path();
    psql(&db.url, SQLX_1);
    psql(&db.url, "CREATE TABLE posts (id bigint);");
    // goose's table and its marker row, then 1, 2, 3 applied and 3 rolled back (older
    // goose logged a rollback as an is_applied = false row).
    psql(
        &db.url,
        "CREATE TABLE goose_db_version (
            id serial NOT NULL,
            version_id bigint NOT NULL,
            is_applied boolean NOT NULL,
            tstamp timestamp NULL default now(),
            PRIMARY KEY(id)
        );
        INSERT INTO goose_db_version (version_id, is_applied) VALUES (0, true), (1, true), (2, true), (3, true), (3, false);",
    );
    let r = adopt(&db.url, dir, &["--output", "json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let doc = r.json();
    assert_eq!(doc["tool"], "goose");
    assert_eq!(doc["pending"], serde_json::json!(["00003_tags.up.sql"]));
    migrate(&db.url, dir);
    all_success(&db.url, dir, &["00001", "00002", "00003"]);
    assert_eq!(
        history_rows(&db.url),
        "00001:ADOPTED,00002:ADOPTED,00003:SQL"
    );
}

// ---- detection ----

#[test]
fn several_tools_tables_are_refused_naming_them() {
    let (db, dir) = sqlx_project(SQLX_2);
    psql(&db.url, GOLANG_MIGRATE_DDL);
    let r = adopt(&db.url, dir.path(), &["--dry-run"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("sqlx (public._sqlx_migrations)")
            && r.stderr
                .contains("golang-migrate (public.schema_migrations)")
            && r.stderr.contains("--from"),
        "{r:?}"
    );
    // Naming the tool settles it.
    let r = adopt(&db.url, dir.path(), &["--from", "sqlx"]);
    assert_eq!(r.code, 0, "{r:?}");

    // dbmate's reading of golang-migrate's table would adopt only its one version.
    let (gm, gm_dir) = golang_migrate_project(2, false);
    let r = adopt(&gm.url, gm_dir.path(), &["--from", "dbmate"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("golang-migrate's `dirty` column"),
        "{r:?}"
    );
    assert!(!history_schema_exists(&gm.url));

    let empty = support::db();
    let r = adopt(&empty.url, dir.path(), &[]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("flyway_schema_history"), "{r:?}");
    let r = adopt(&empty.url, dir.path(), &["--from", "diesel"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("__diesel_schema_migrations"), "{r:?}");

    // Local mode only: through a controller it is refused before anything is contacted.
    let r = belay(
        &empty.url,
        dir.path(),
        &["--controller", "127.0.0.1:1", "adopt"],
    );
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("not available in remote mode"), "{r:?}");
}

#[test]
fn a_belay_history_that_disagrees_is_refused() {
    let (db, dir) = sqlx_project(SQLX_2);
    // belay already applied something else here.
    let other = migrations(&[("1_other.up.sql", "CREATE TABLE other (id int);\n")]);
    migrate(&db.url, other.path());
    let before = history_rows(&db.url);
    let r = adopt(&db.url, dir.path(), &[]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .contains("2_index.up.sql (version 2) is applied per sqlx but pending"),
        "{r:?}"
    );
    assert_eq!(history_rows(&db.url), before);
}

// ---- dbmate, for real ----

/// The dbmate binary: `BELAY_DBMATE`, else where `cargo xtask test` installs it.
fn dbmate() -> PathBuf {
    let platform = match std::env::consts::ARCH {
        "aarch64" => "linux-arm64",
        _ => "linux-x64",
    };
    let path = std::env::var_os("BELAY_DBMATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join("../tools/dbmate/node_modules/@dbmate")
                .join(platform)
                .join("bin/dbmate")
        });
    assert!(
        path.is_file(),
        "dbmate not found at {}: run `cargo xtask test`, which installs it, or `npm install dbmate@2.36.0` in a directory and set BELAY_DBMATE to its node_modules/@dbmate/linux-x64/bin/dbmate",
        path.display()
    );
    path
}

#[test]
fn dbmate_history_written_by_real_dbmate_is_adopted() {
    let dbmate = dbmate();
    let db = db();
    let dir = migrations(&[
        (
            "20240101000001_create_users.sql",
            "-- migrate:up\nCREATE TABLE users (id bigint PRIMARY KEY);\n\n-- migrate:down\nDROP TABLE users;\n",
        ),
        (
            "20240101000002_create_posts.sql",
            "-- migrate:up\nCREATE TABLE posts (id bigint PRIMARY KEY);\n\n-- migrate:down\nDROP TABLE posts;\n",
        ),
    ]);
    let dir = dir.path();
    let out = std::process::Command::new(&dbmate)
        .arg("--url")
        .arg(format!("{}?sslmode=disable", db.url))
        .arg("--migrations-dir")
        .arg(dir)
        .args(["--no-dump-schema", "up"])
        .output()
        .expect("run dbmate");
    assert!(
        out.status.success(),
        "dbmate up: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        psql(
            &db.url,
            "SELECT string_agg(version, ',' ORDER BY version) FROM schema_migrations"
        ),
        "20240101000001,20240101000002"
    );

    let r = adopt(&db.url, dir, &[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout
            .contains("dbmate history in public.schema_migrations"),
        "{r:?}"
    );
    all_success(&db.url, dir, &["20240101000001", "20240101000002"]);

    // The next migration, applied by belay.
    write(
        dir,
        "20240101000003_create_tags.sql",
        "-- migrate:up\nCREATE TABLE tags (id bigint PRIMARY KEY);\n\n-- migrate:down\n",
    );
    migrate(&db.url, dir);
    all_success(
        &db.url,
        dir,
        &["20240101000001", "20240101000002", "20240101000003"],
    );
    assert_eq!(psql(&db.url, "SELECT to_regclass('tags') IS NOT NULL"), "t");
    let again = adopt(&db.url, dir, &[]);
    assert_eq!(again.code, 0, "{again:?}");
    assert!(again.stdout.contains("nothing to do"), "{again:?}");
}

#[test]
fn adopt_writes_under_the_runner_lock() {
    let (db, dir) = sqlx_project(SQLX_2);
    // Another runner holds the lock `migrate` takes ("bela", the history schema).
    let mut other = Session::open(&db.url);
    other.run("SELECT pg_advisory_lock(x'62656c61'::int, hashtext('belay'));");
    let r = adopt(&db.url, dir.path(), &["--runner-wait", "0s"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(!history_schema_exists(&db.url), "written without the lock");
    // A dry run takes no lock: it only reads.
    let dry = adopt(&db.url, dir.path(), &["--dry-run", "--runner-wait", "0s"]);
    assert_eq!(dry.code, 0, "{dry:?}");
    drop(other);
    let r = adopt(&db.url, dir.path(), &[]);
    assert_eq!(r.code, 0, "{r:?}");
    all_success(&db.url, dir.path(), &["1", "2"]);
}

// ---- goose's and dbmate's own single-file layouts ----

#[test]
fn goose_files_in_gooses_layout_are_adopted_and_undone() {
    let db = db();
    let dir = migrations(&[
        (
            "00001_users.sql",
            "-- +goose Up\nCREATE TABLE users (id bigint PRIMARY KEY);\n\n-- +goose Down\nDROP TABLE users;\n",
        ),
        (
            "00002_posts.sql",
            "-- +goose Up\nCREATE TABLE posts (id bigint);\n\n-- +goose Down\nDROP TABLE posts;\n",
        ),
    ]);
    let dir = dir.path();
    psql(&db.url, SQLX_1);
    psql(&db.url, "CREATE TABLE posts (id bigint);");
    psql(
        &db.url,
        "CREATE TABLE goose_db_version (
            id serial NOT NULL,
            version_id bigint NOT NULL,
            is_applied boolean NOT NULL,
            tstamp timestamp NULL default now(),
            PRIMARY KEY(id)
        );
        INSERT INTO goose_db_version (version_id, is_applied) VALUES (0, true), (1, true), (2, true);",
    );
    let r = adopt(&db.url, dir, &[]);
    assert_eq!(r.code, 0, "{r:?}");
    all_success(&db.url, dir, &["00001", "00002"]);
    // The adopted migration's Down section is its undo.
    belay_ok(&db.url, dir, &["undo", "--backup", "none"]);
    assert_eq!(psql(&db.url, "SELECT to_regclass('posts') IS NULL"), "t");
    belay_ok(&db.url, dir, &["migrate", "--backup", "none"]);
    all_success(&db.url, dir, &["00001", "00002"]);
}

#[test]
fn dbmate_adopted_migration_undoes_with_its_down_section() {
    let dbmate = dbmate();
    let db = db();
    let dir = migrations(&[(
        "20240101000001_create_users.sql",
        "-- migrate:up\nCREATE TABLE users (id bigint PRIMARY KEY);\n\n-- migrate:down\nDROP TABLE users;\n",
    )]);
    let dir = dir.path();
    let out = std::process::Command::new(&dbmate)
        .arg("--url")
        .arg(format!("{}?sslmode=disable", db.url))
        .arg("--migrations-dir")
        .arg(dir)
        .args(["--no-dump-schema", "up"])
        .output()
        .expect("run dbmate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(adopt(&db.url, dir, &[]).code, 0);
    belay_ok(&db.url, dir, &["undo", "--backup", "none"]);
    assert_eq!(psql(&db.url, "SELECT to_regclass('users') IS NULL"), "t");
}
