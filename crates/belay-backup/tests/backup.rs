//! Backups against a real PostgreSQL cluster and real files.

// Shared helpers (not `#[test]` functions themselves) unwrap too: a panic is the report.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use belay_backup::{
    BackupError, BackupFormat, BackupManager, BackupRequest, BackupScope, CommandLine, Progress,
    RestoreRequest, VerifyProblem,
};
use belay_core::DatabaseUrl;
use belay_testkit::{Cluster, TestDb, psql};

const TABLES: [&str; 3] = ["public.users", "public.orders", "app.events"];

async fn fixture() -> (TestDb, DatabaseUrl) {
    let db = Cluster::shared()
        .create_database()
        .await
        .expect("test database");
    psql(
        &db.url,
        "CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL, email text UNIQUE);
         CREATE TABLE orders (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                              user_id int NOT NULL REFERENCES users(id),
                              note text, amount numeric(10,2));
         CREATE INDEX orders_note_idx ON orders (note);
         CREATE SCHEMA app;
         CREATE TABLE app.events (id bigserial PRIMARY KEY, payload jsonb, at timestamptz DEFAULT now());
         INSERT INTO users (name, email) SELECT 'user ' || g, 'u' || g || '@example.com' FROM generate_series(1, 300) g;
         INSERT INTO orders (user_id, note, amount) SELECT 1 + g % 300, 'note ' || g, g * 1.5 FROM generate_series(1, 2000) g;
         INSERT INTO app.events (payload) SELECT jsonb_build_object('n', g) FROM generate_series(1, 500) g;",
    )
    .expect("fixture");
    let url = DatabaseUrl::parse(&db.url).expect("url");
    (db, url)
}

/// Per-table checksum of the ordered rows.
fn checksum(url: &str, table: &str) -> String {
    psql(
        url,
        &format!(
            "SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), '') FROM {table} t"
        ),
    )
    .expect("checksum")
    .trim()
    .to_owned()
}

fn checksums(url: &str) -> BTreeMap<&'static str, String> {
    TABLES.iter().map(|t| (*t, checksum(url, t))).collect()
}

fn manager(dir: &Path) -> BackupManager {
    BackupManager::new(dir)
}

fn admin() -> DatabaseUrl {
    DatabaseUrl::parse(&Cluster::shared().url("postgres")).expect("admin url")
}

fn scramble(url: &str) {
    psql(
        url,
        "UPDATE users SET name = 'changed' WHERE id % 3 = 0;
         DELETE FROM orders WHERE id % 2 = 0;
         INSERT INTO orders (user_id, note) VALUES (1, 'after backup');
         DROP TABLE app.events;",
    )
    .expect("scramble");
}

async fn roundtrip(format: BackupFormat) {
    let (db, url) = fixture().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mgr = manager(dir.path());
    let original = checksums(&db.url);

    let events = Mutex::new(Vec::new());
    let req = BackupRequest {
        format,
        scope: BackupScope::Full,
        label: Some("roundtrip".into()),
        deployment_id: None,
        kind: None,
    };
    let manifest = mgr
        .create(&url, "shop", &req, &|p| events.lock().unwrap().push(p))
        .await
        .expect("create");

    // The manifest describes the backup.
    let backup_dir = dir.path().join("shop").join(&manifest.id);
    assert!(backup_dir.join("manifest.json").is_file());
    assert_eq!(manifest.target, "shop");
    assert_eq!(manifest.format, format);
    assert_eq!(manifest.schema_version, None, "no history table here");
    assert!(manifest.pg_dump_version.contains("pg_dump"));
    assert!(manifest.server_version_num >= 100000);
    assert!(!manifest.verified);
    let rows: BTreeMap<String, Option<i64>> = manifest
        .tables
        .iter()
        .map(|t| (t.qualified(), t.rows))
        .collect();
    assert_eq!(rows["public.users"], Some(300));
    assert_eq!(rows["public.orders"], Some(2000));
    assert_eq!(rows["app.events"], Some(500));
    for f in &manifest.files {
        let meta = std::fs::metadata(backup_dir.join(&f.path)).expect("file of manifest");
        assert_eq!(meta.len(), f.size, "{}", f.path);
        assert_eq!(f.sha256.len(), 64);
    }
    match format {
        BackupFormat::Custom => assert_eq!(manifest.files.len(), 1),
        BackupFormat::Directory { .. } => {
            assert!(manifest.files.iter().any(|f| f.path == "dump/toc.dat"));
            assert!(manifest.files.len() > 3, "{:?}", manifest.files);
        }
    }
    let events = events.into_inner().unwrap();
    assert!(
        matches!(events.first(), Some(Progress::Started { tables: 3, .. })),
        "{events:?}"
    );
    assert!(
        matches!(events.last(), Some(Progress::Finished { .. })),
        "{events:?}"
    );
    let table_events = events
        .iter()
        .filter(|e| matches!(e, Progress::Table { .. }))
        .count();
    assert_eq!(table_events, 3, "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Progress::Bytes { written } if *written > 0))
    );

    // Verify with a restore test; the outcome lands in the manifest.
    let report = mgr
        .verify("shop", &manifest.id, Some(&admin()))
        .await
        .expect("verify");
    assert!(report.ok, "{report:?}");
    let rt = report.restore_test.as_ref().expect("restore test ran");
    assert_eq!(rt.tables_compared, 3);
    assert!(rt.dropped);
    let exists = psql(
        &Cluster::shared().url("postgres"),
        &format!(
            "SELECT count(*) FROM pg_database WHERE datname = '{}'",
            rt.database
        ),
    )
    .expect("psql");
    assert_eq!(exists.trim(), "0", "scratch database dropped");
    let entry = &mgr.catalog("shop").unwrap().list().unwrap()[0];
    assert!(entry.verified && entry.restore_tested && entry.verified_at.is_some());

    // Change everything, restore, compare.
    scramble(&db.url);
    assert_ne!(checksum(&db.url, "public.users"), original["public.users"]);
    let restored = mgr
        .restore(&url, "shop", &manifest.id, &RestoreRequest::full(), &|_| {})
        .await
        .expect("restore");
    assert_eq!(checksums(&db.url), original);
    assert!(restored.mismatches.is_empty(), "{restored:?}");
    assert_eq!(restored.checks.len(), 3);
    let emergency = restored.emergency_backup.expect("emergency backup taken");
    let em = mgr
        .catalog("shop")
        .unwrap()
        .get(&emergency)
        .expect("emergency in catalog");
    assert!(em.verified);
    assert_eq!(em.scope, BackupScope::Full);
    // The emergency backup holds the scrambled state: 1001 orders.
    let em_orders = em.tables.iter().find(|t| t.name == "orders").unwrap();
    assert_eq!(em_orders.rows, Some(1001));

    // Into a new database: the target's own database is left alone.
    let new_db = format!("{}_copy", db.name);
    psql(&db.url, "DELETE FROM orders WHERE id < 10").expect("psql");
    let report = mgr
        .restore(
            &url,
            "shop",
            &manifest.id,
            &RestoreRequest {
                into: Some(new_db.clone()),
                ..Default::default()
            },
            &|_| {},
        )
        .await
        .expect("restore into");
    assert!(report.into_new_database && report.emergency_backup.is_none());
    assert_eq!(checksums(&Cluster::shared().url(&new_db)), original);
    assert_ne!(
        checksum(&db.url, "public.orders"),
        original["public.orders"]
    );
    // The same name again is refused.
    let err = mgr
        .restore(
            &url,
            "shop",
            &manifest.id,
            &RestoreRequest {
                into: Some(new_db.clone()),
                ..Default::default()
            },
            &|_| {},
        )
        .await
        .unwrap_err();
    assert!(matches!(err, BackupError::DatabaseExists { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn custom_format_roundtrip_restores_every_table() {
    roundtrip(BackupFormat::Custom).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn directory_format_with_two_jobs_roundtrip_restores_every_table() {
    roundtrip(BackupFormat::Directory { jobs: 2 }).await;
}

fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).expect("read");
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    std::fs::write(path, bytes).expect("write");
}

fn truncate(path: &Path) {
    let bytes = std::fs::read(path).expect("read");
    std::fs::write(path, &bytes[..bytes.len() / 2]).expect("write");
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupted_or_truncated_backups_fail_verification_and_restore_refuses_them() {
    let (db, url) = fixture().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mgr = manager(dir.path());
    let original = checksums(&db.url);

    // One flipped byte in a custom dump.
    let custom = mgr
        .create(&url, "shop", &BackupRequest::default(), &|_| {})
        .await
        .expect("create");
    assert!(mgr.verify("shop", &custom.id, None).await.unwrap().ok);
    flip_byte(&dir.path().join("shop").join(&custom.id).join("dump.pgdump"));
    let report = mgr
        .verify("shop", &custom.id, None)
        .await
        .expect("verify runs");
    assert!(!report.ok);
    assert!(
        matches!(&report.problems[..], [VerifyProblem::ChecksumMismatch { path, .. }] if path == "dump.pgdump"),
        "{:?}",
        report.problems
    );
    assert!(
        !mgr.catalog("shop")
            .unwrap()
            .get(&custom.id)
            .unwrap()
            .verified
    );
    let err = mgr
        .restore(&url, "shop", &custom.id, &RestoreRequest::full(), &|_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(err, BackupError::VerificationFailed { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("dump.pgdump"), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");

    // A truncated table file of a directory dump.
    let directory = mgr
        .create(
            &url,
            "shop",
            &BackupRequest {
                format: BackupFormat::Directory { jobs: 2 },
                ..Default::default()
            },
            &|_| {},
        )
        .await
        .expect("create");
    let biggest = directory
        .files
        .iter()
        .filter(|f| f.path.ends_with(".dat.gz"))
        .max_by_key(|f| f.size)
        .expect("a data file")
        .path
        .clone();
    truncate(&dir.path().join("shop").join(&directory.id).join(&biggest));
    let report = mgr
        .verify("shop", &directory.id, None)
        .await
        .expect("verify runs");
    assert!(!report.ok);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.to_string().contains(&biggest)),
        "{:?}",
        report.problems
    );
    let err = mgr
        .restore(
            &url,
            "shop",
            &directory.id,
            &RestoreRequest::full(),
            &|_| {},
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&biggest), "{err}");

    // A truncated custom dump: refused; forced, pg_restore fails inside one transaction and
    // the database is left as it was.
    let truncated = mgr
        .create(&url, "shop", &BackupRequest::default(), &|_| {})
        .await
        .expect("create");
    truncate(
        &dir.path()
            .join("shop")
            .join(&truncated.id)
            .join("dump.pgdump"),
    );
    let report = mgr.verify("shop", &truncated.id, None).await.unwrap();
    assert!(
        matches!(&report.problems[0], VerifyProblem::SizeMismatch { path, .. } if path == "dump.pgdump"),
        "{:?}",
        report.problems
    );
    assert!(
        mgr.restore(
            &url,
            "shop",
            &truncated.id,
            &RestoreRequest::full(),
            &|_| {}
        )
        .await
        .is_err()
    );
    psql(&db.url, "UPDATE users SET name = 'kept'").expect("psql");
    let changed = checksums(&db.url);
    let err = mgr
        .restore(
            &url,
            "shop",
            &truncated.id,
            &RestoreRequest {
                force: true,
                emergency_backup: false,
                ..Default::default()
            },
            &|_| {},
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unchanged"), "{err}");
    assert_eq!(checksums(&db.url), changed);
    assert_ne!(changed, original);
}

#[tokio::test(flavor = "multi_thread")]
async fn table_restore_brings_back_one_table_and_leaves_the_others() {
    let (db, url) = fixture().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mgr = manager(dir.path());
    let original = checksums(&db.url);
    let backup = mgr
        .create(&url, "shop", &BackupRequest::default(), &|_| {})
        .await
        .expect("create");

    scramble(&db.url);
    let scrambled_orders = checksum(&db.url, "public.orders");
    let report = mgr
        .restore(
            &url,
            "shop",
            &backup.id,
            &RestoreRequest::tables(["users"]),
            &|_| {},
        )
        .await
        .expect("table restore");
    assert_eq!(checksum(&db.url, "public.users"), original["public.users"]);
    assert_eq!(
        checksum(&db.url, "public.orders"),
        scrambled_orders,
        "orders untouched"
    );
    assert_eq!(
        psql(&db.url, "SELECT to_regclass('app.events') IS NULL")
            .unwrap()
            .trim(),
        "t",
        "app.events stays dropped"
    );
    assert_eq!(
        report.tables.as_deref(),
        Some(&["public.users".to_owned()][..])
    );
    assert_eq!(
        report.foreign_keys_readded,
        ["public.orders.orders_user_id_fkey"]
    );
    assert!(report.mismatches.is_empty(), "{report:?}");
    // Indexes, the primary key, the serial sequence and the foreign key are back.
    let parts = psql(
        &db.url,
        "SELECT (SELECT count(*) FROM pg_indexes WHERE tablename = 'users'),
                (SELECT count(*) FROM pg_constraint WHERE conname = 'orders_user_id_fkey'),
                nextval('users_id_seq')",
    )
    .unwrap();
    assert_eq!(parts.trim(), "2|1|301");
    let emergency = report.emergency_backup.expect("emergency backup of users");
    let em = mgr.catalog("shop").unwrap().get(&emergency).unwrap();
    assert_eq!(
        em.scope,
        BackupScope::Tables(vec!["\"public\".\"users\"".into()])
    );

    // A table an undo dropped comes back, definition and data; nothing to back up first.
    let report = mgr
        .restore(
            &url,
            "shop",
            &backup.id,
            &RestoreRequest::tables(["app.events"]),
            &|_| {},
        )
        .await
        .expect("restore dropped table");
    assert_eq!(checksum(&db.url, "app.events"), original["app.events"]);
    assert!(report.emergency_backup.is_none());

    // A view on the table: refused rather than dropping the view.
    psql(&db.url, "CREATE VIEW user_names AS SELECT name FROM users").unwrap();
    let err = mgr
        .restore(
            &url,
            "shop",
            &backup.id,
            &RestoreRequest::tables(["public.users"]),
            &|_| {},
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, BackupError::TableHasDependents { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("user_names"), "{err}");

    let err = mgr
        .restore(
            &url,
            "shop",
            &backup.id,
            &RestoreRequest::tables(["nope"]),
            &|_| {},
        )
        .await
        .unwrap_err();
    assert!(matches!(err, BackupError::TableNotInBackup { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_before_an_undo_brings_a_dropped_column_back() {
    let (db, url) = fixture().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mgr = manager(dir.path());
    let original = checksum(&db.url, "public.users");
    let snap = mgr
        .snapshot_tables(
            &url,
            "shop",
            &["users".into()],
            "undo of V2 drops users.email",
        )
        .await
        .expect("snapshot");
    assert!(snap.verified);
    assert_eq!(snap.label.as_deref(), Some("undo of V2 drops users.email"));
    assert_eq!(snap.tables.len(), 1);
    assert_eq!(snap.tables[0].rows, Some(300));

    // A snapshot of a table with a foreign key to a table outside it still passes a
    // restore test (into an empty scratch database).
    let orders = mgr
        .snapshot_tables(&url, "shop", &["public.orders".into()], "orders")
        .await
        .expect("snapshot of orders");
    let report = mgr
        .verify("shop", &orders.id, Some(&admin()))
        .await
        .unwrap();
    assert!(report.ok, "{report:?}");
    assert!(report.restore_test.is_some());

    psql(&db.url, "ALTER TABLE users DROP COLUMN email").unwrap();
    mgr.restore(
        &url,
        "shop",
        &snap.id,
        &RestoreRequest::tables(["users"]),
        &|_| {},
    )
    .await
    .expect("restore from snapshot");
    assert_eq!(checksum(&db.url, "public.users"), original);
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_keeps_the_last_verified_backup_even_with_keep_zero() {
    let (_db, url) = fixture().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mgr = manager(dir.path());
    let mut ids = Vec::new();
    for _ in 0..3 {
        let m = mgr
            .create(&url, "shop", &BackupRequest::default(), &|_| {})
            .await
            .expect("create");
        ids.push(m.id);
    }
    let (b1, b2, b3) = (&ids[0], &ids[1], &ids[2]);
    for id in [b1, b2] {
        assert!(mgr.verify("shop", id, None).await.unwrap().ok);
    }
    let junk = dir.path().join("shop").join("20200101T000000.000Z-junk00");
    std::fs::create_dir_all(&junk).unwrap();
    std::fs::write(junk.join("dump.pgdump"), b"partial").unwrap();

    let catalog = mgr.catalog("shop").unwrap();
    let listed: Vec<String> = catalog.list().unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(
        listed,
        [b3.clone(), b2.clone(), b1.clone()],
        "newest first, junk ignored"
    );
    let json = serde_json::to_value(catalog.list().unwrap()).unwrap();
    for key in ["id", "created_at", "format", "scope", "verified", "files"] {
        assert!(json[0].get(key).is_some(), "{key} in {json}");
    }
    assert!(json[0]["files"][0]["sha256"].is_string());

    let dry = catalog.prune(0, &[], true).unwrap();
    let would: Vec<&str> = dry.deleted.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(would, [b1.as_str()]);
    assert_eq!(dry.incomplete_removed, std::slice::from_ref(&junk));
    assert_eq!(catalog.list().unwrap().len(), 3, "dry run deletes nothing");
    assert!(junk.exists());

    let done = catalog.prune(0, &[], false).unwrap();
    assert_eq!(done.deleted.len(), 1);
    assert!(!junk.exists());
    let listed: Vec<String> = catalog.list().unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(
        listed,
        [b3.clone(), b2.clone()],
        "the latest verified survives keep 0"
    );

    // Once b3 is verified it supersedes b2, unless b2 is protected.
    assert!(mgr.verify("shop", b3, None).await.unwrap().ok);
    let kept = catalog.prune(0, std::slice::from_ref(b2), false).unwrap();
    assert!(kept.deleted.is_empty());
    let gone = catalog.prune(0, &[], false).unwrap();
    assert_eq!(gone.deleted[0].id, *b2);
    assert_eq!(catalog.list().unwrap().len(), 1);
}

/// A command line and the passfile content it was given.
type Seen = (CommandLine, Option<String>);

#[tokio::test(flavor = "multi_thread")]
async fn the_password_travels_in_a_passfile_never_on_the_command_line() {
    let (db, _) = fixture().await;
    let role = format!("belay_pw_{}", std::process::id());
    psql(
        &db.url,
        &format!(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
                 CREATE ROLE {role} LOGIN SUPERUSER PASSWORD 'S3cr3t:pw\\x';
               END IF;
             END $$"
        ),
    )
    .expect("role");
    let port = Cluster::shared().port();
    let url = DatabaseUrl::parse(&format!(
        "postgres://{role}:S3cr3t%3Apw%5Cx@127.0.0.1:{port}/{}",
        db.name
    ))
    .unwrap();
    assert!(url.expose().contains("S3cr3t"));

    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let sink = seen.clone();
    let dir = tempfile::tempdir().expect("tempdir");
    let mgr = manager(dir.path()).on_command(Arc::new(move |cmd: &CommandLine| {
        // Read the passfile while it exists, as the child would.
        let passfile = cmd
            .env
            .iter()
            .find(|(k, _)| k == "PGPASSFILE")
            .map(|(_, path)| {
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = std::fs::metadata(path).unwrap().permissions().mode();
                    assert_eq!(mode & 0o777, 0o600, "passfile mode");
                }
                std::fs::read_to_string(path).unwrap()
            });
        sink.lock().unwrap().push((cmd.clone(), passfile));
    }));
    let m = mgr
        .create(&url, "shop", &BackupRequest::default(), &|_| {})
        .await
        .expect("create as the password role");
    mgr.restore(
        &url,
        "shop",
        &m.id,
        &RestoreRequest::tables(["users"]),
        &|_| {},
    )
    .await
    .expect("restore as the password role");

    let seen = seen.lock().unwrap();
    let with_db: Vec<_> = seen
        .iter()
        .filter(|(c, _)| c.args.iter().any(|a| a.contains(&role)))
        .collect();
    assert!(
        with_db.len() >= 3,
        "pg_dump, emergency pg_dump, psql: {seen:?}"
    );
    for (cmd, passfile) in seen.iter() {
        let line = cmd.display();
        assert!(!line.contains("S3cr3t"), "password on argv: {line}");
        assert!(!cmd.env.iter().any(|(_, v)| v.contains("S3cr3t")));
        if line.contains(&role) {
            assert_eq!(
                passfile.as_deref(),
                Some("*:*:*:*:S3cr3t\\:pw\\\\x\n"),
                "{line}"
            );
        }
    }
    // The passfiles are gone afterwards.
    for (cmd, _) in seen.iter() {
        for (k, v) in &cmd.env {
            if k == "PGPASSFILE" {
                assert!(!Path::new(v).exists(), "{v} left behind");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn schema_version_comes_from_the_history_table() {
    let (db, url) = fixture().await;
    psql(
        &db.url,
        "CREATE SCHEMA belay;
         CREATE TABLE belay.schema_history (
            installed_rank integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            version text, description text NOT NULL, type text NOT NULL, script text NOT NULL,
            checksum text, installed_by text NOT NULL DEFAULT current_user,
            installed_on timestamptz NOT NULL DEFAULT now(), execution_time integer NOT NULL DEFAULT 0,
            success boolean NOT NULL, deployment_id uuid, backup_id text,
            lock_wait_ms bigint NOT NULL DEFAULT 0, retries integer NOT NULL DEFAULT 0,
            state text NOT NULL, error text);
         INSERT INTO belay.schema_history (version, description, type, script, success, state) VALUES
            ('1', 'init', 'SQL', 'V1__init.sql', true, 'success'),
            ('1.10', 'orders', 'SQL', 'V1.10__orders.sql', true, 'success'),
            ('2', 'broken', 'SQL', 'V2__broken.sql', false, 'failed'),
            ('1.9', 'late', 'SQL', 'V1.9__late.sql', true, 'success');",
    )
    .expect("history");
    let dir = tempfile::tempdir().expect("tempdir");
    let m = manager(dir.path())
        .create(
            &url,
            "shop",
            &BackupRequest {
                scope: BackupScope::SchemaOnly,
                ..Default::default()
            },
            &|_| {},
        )
        .await
        .expect("create");
    assert_eq!(m.schema_version.as_deref(), Some("1.10"));
    assert_eq!(m.scope, BackupScope::SchemaOnly);
    assert!(m.tables.iter().all(|t| t.rows.is_none()));
    assert!(
        m.tables
            .iter()
            .any(|t| t.qualified() == "belay.schema_history")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_size_limit_removes_the_partial_backup_and_leaves_the_catalog_alone() {
    let (db, url) = fixture().await;
    psql(
        &db.url,
        "INSERT INTO app.events (payload) SELECT jsonb_build_object('r', md5(g::text) || md5((g * 7)::text)) FROM generate_series(1, 50000) g",
    )
    .unwrap();
    let dir = tempfile::tempdir().expect("tempdir");
    let mgr = manager(dir.path());
    let ok = mgr
        .create(&url, "shop", &BackupRequest::default(), &|_| {})
        .await
        .expect("a backup before");
    let limited = manager(dir.path()).with_size_limit(64 * 1024);
    let err = limited
        .create(&url, "shop", &BackupRequest::default(), &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, BackupError::SizeLimit { .. }), "{err}");
    assert!(
        err.to_string().contains("partial backup was removed"),
        "{err}"
    );
    let names: Vec<String> = std::fs::read_dir(dir.path().join("shop"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        // The measured rates live beside the backups (the earlier backup's sample).
        .filter(|n| n != "rates.json")
        .collect();
    assert_eq!(
        names,
        std::slice::from_ref(&ok.id),
        "only the earlier backup remains"
    );
}

/// A real full disk: a 1 MiB tmpfs (needs root and mount; skipped otherwise).
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_removes_the_partial_backup() {
    struct Mount(std::path::PathBuf);
    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let mnt = tempfile::tempdir().expect("tempdir");
    let mounted = belay_testkit::running_as_root()
        && std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(mnt.path())
            .status()
            .is_ok_and(|s| s.success());
    if !mounted {
        belay_testkit::skip(
            "a_full_disk_removes_the_partial_backup",
            "cannot mount a 1 MiB tmpfs here (needs root with CAP_SYS_ADMIN); the size-limit test covers the cleanup",
        );
        return;
    }
    let _mount = Mount(mnt.path().to_path_buf());

    let (db, url) = fixture().await;
    psql(
        &db.url,
        "INSERT INTO app.events (payload) SELECT jsonb_build_object('r', md5(g::text) || md5((g * 7)::text)) FROM generate_series(1, 60000) g",
    )
    .unwrap();
    let mgr = manager(mnt.path());
    let err = mgr
        .create(&url, "shop", &BackupRequest::default(), &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, BackupError::DiskFull { .. }), "{err}");
    assert!(err.to_string().contains("out of disk space"), "{err}");
    let left: Vec<_> = std::fs::read_dir(mnt.path().join("shop"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "partial files left: {left:?}");
    assert!(mgr.catalog("shop").unwrap().list().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_client_tools_say_how_to_install_them() {
    let (_db, url) = fixture().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let err = manager(dir.path())
        .with_bin_dir(dir.path().join("no-such-bin"))
        .create(&url, "shop", &BackupRequest::default(), &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, BackupError::ToolsNotFound { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("apt-get install postgresql-client"),
        "{err}"
    );

    let unreachable = DatabaseUrl::parse("postgres://nobody:pw@127.0.0.1:1/none").unwrap();
    let err = manager(dir.path())
        .create(&unreachable, "shop", &BackupRequest::default(), &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, BackupError::Connect { .. }), "{err}");
    assert!(!err.to_string().contains(":pw@"), "{err}");

    let err = manager(dir.path())
        .create(
            &url,
            "shop",
            &BackupRequest {
                scope: BackupScope::Tables(vec!["missing_table".into()]),
                ..Default::default()
            },
            &|_| {},
        )
        .await
        .unwrap_err();
    assert!(matches!(err, BackupError::TableNotFound { .. }), "{err}");
    assert!(
        !dir.path().join("shop").exists()
            || std::fs::read_dir(dir.path().join("shop"))
                .unwrap()
                .next()
                .is_none()
    );
}

/// An application holding ACCESS EXCLUSIVE on a table: the backup gives up after its lock
/// wait bound with a clear error, instead of waiting for as long as the holder likes.
#[tokio::test(flavor = "multi_thread")]
async fn a_backup_waits_for_table_locks_only_as_long_as_allowed() {
    use sqlx::Connection as _;
    let (db, url) = fixture().await;
    let mut holder = sqlx::PgConnection::connect(&db.url).await.expect("holder");
    sqlx::raw_sql("BEGIN; LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .expect("lock");
    let dir = tempfile::tempdir().expect("tempdir");
    let mgr = manager(dir.path()).with_lock_wait_timeout(std::time::Duration::from_millis(300));
    // The outer bound only turns a hang (the bug) into a failure; it is not a speed check.
    let result = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        mgr.create(&url, "shop", &BackupRequest::default(), &|_| {}),
    )
    .await
    .expect("the backup must not wait for the lock indefinitely");
    let err = result.expect_err("the table is locked");
    let msg = err.to_string();
    assert!(msg.contains("LOCK TABLE public.orders"), "{msg}");
    assert!(msg.contains("holds a table exclusively"), "{msg}");
    let left: Vec<_> = std::fs::read_dir(dir.path().join("shop"))
        .map(|d| d.filter_map(Result::ok).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "a partial backup was left: {left:?}");
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .expect("release");
    mgr.create(&url, "shop", &BackupRequest::default(), &|_| {})
        .await
        .expect("once the lock is gone the backup works");
}

/// A belay history table saying `versions` are applied (the executor's columns).
fn history(url: &str, versions: &[&str]) {
    psql(
        url,
        "CREATE SCHEMA IF NOT EXISTS belay;
         CREATE TABLE IF NOT EXISTS belay.schema_history (
            installed_rank integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            version text, description text NOT NULL, type text NOT NULL, script text NOT NULL,
            checksum text, installed_by text NOT NULL DEFAULT current_user,
            installed_on timestamptz NOT NULL DEFAULT now(), execution_time integer NOT NULL DEFAULT 0,
            success boolean NOT NULL, deployment_id uuid, backup_id text,
            lock_wait_ms bigint NOT NULL DEFAULT 0, retries integer NOT NULL DEFAULT 0,
            state text NOT NULL, error text);",
    )
    .expect("history table");
    for v in versions {
        psql(
            url,
            &format!(
                "INSERT INTO belay.schema_history (version, description, type, script, success, state)
                 VALUES ('{v}', 'm', 'SQL', 'V{v}__m.sql', true, 'success')"
            ),
        )
        .expect("history row");
    }
}

/// The case: `users` restored from a backup taken before a migration that added
/// columns silently dropped them (and their data) while history still said the migration
/// was applied.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_restore_across_schema_versions_is_refused_naming_both_versions() {
    let (db, url) = fixture().await;
    history(&db.url, &["1"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let mgr = manager(dir.path());
    let backup = mgr
        .create(&url, "shop", &BackupRequest::default(), &|_| {})
        .await
        .expect("create");
    assert_eq!(backup.schema_version.as_deref(), Some("1"));
    assert_eq!(backup.applied_versions, ["1"]);
    let users = backup
        .tables
        .iter()
        .find(|t| t.qualified() == "public.users")
        .unwrap();
    assert_eq!(
        users.columns.as_deref().unwrap(),
        ["id integer", "name text", "email text"]
    );
    let orders_before = checksum(&db.url, "public.orders");

    // Migration 2 adds four columns and fills one with data only it holds.
    psql(
        &db.url,
        "ALTER TABLE users ADD COLUMN password_hash text, ADD COLUMN a int, ADD COLUMN b int, ADD COLUMN c int;
         UPDATE users SET password_hash = md5(id::text);
         UPDATE orders SET note = 'changed since';",
    )
    .unwrap();
    history(&db.url, &["2"]);
    let hashes = || {
        psql(&db.url, "SELECT count(password_hash) FROM users")
            .unwrap()
            .trim()
            .to_owned()
    };

    let err = mgr
        .restore(
            &url,
            "shop",
            &backup.id,
            &RestoreRequest::tables(["users"]),
            &|_| {},
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, BackupError::SchemaVersionMismatch { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("schema version 1") && msg.contains("at 2 now"),
        "{msg}"
    );
    assert!(
        msg.contains("--across-versions") && msg.contains("--into"),
        "{msg}"
    );
    assert_eq!(hashes(), "300", "nothing was restored");

    // Stated across versions: refused still, because users changed since.
    let across = |table: &str| RestoreRequest {
        across_versions: true,
        ..RestoreRequest::tables([table])
    };
    let err = mgr
        .restore(&url, "shop", &backup.id, &across("users"), &|_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(err, BackupError::TableChangedSince { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("password_hash text"), "{msg}");
    assert_eq!(hashes(), "300");

    // A table whose definition did not change comes back, with its data, and history
    // stays true.
    let report = mgr
        .restore(&url, "shop", &backup.id, &across("orders"), &|_| {})
        .await
        .expect("orders did not change shape");
    assert!(report.mismatches.is_empty(), "{report:?}");
    assert_eq!(checksum(&db.url, "public.orders"), orders_before);
    assert_eq!(hashes(), "300");
}

/// The case: `--keep 3` counted every kind together, so it deleted the snapshot
/// taken before undo of 4 (the only copy of what that undo dropped) while keeping two
/// emergency backups.
#[tokio::test(flavor = "multi_thread")]
async fn prune_keeps_each_kind_by_its_own_count_and_never_an_undo_snapshot_of_lost_data() {
    use belay_backup::{BackupApi, BackupKind, KeepReason, LocalBackups, PruneRequest};
    let (db, url) = fixture().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mgr = manager(dir.path());
    // Before undo of 4, which drops users.email.
    let undo4 = mgr
        .snapshot_tables(&url, "shop", &["users".into()], "before undo of 4")
        .await
        .unwrap();
    psql(&db.url, "ALTER TABLE users DROP COLUMN email").unwrap();
    // Before undo of 5, which in the end dropped nothing.
    let undo5 = mgr
        .snapshot_tables(&url, "shop", &["orders".into()], "before undo of 5")
        .await
        .unwrap();
    let mut deployments = Vec::new();
    for _ in 0..2 {
        let m = mgr
            .create(
                &url,
                "shop",
                &BackupRequest {
                    deployment_id: Some(uuid::Uuid::new_v4()),
                    ..Default::default()
                },
                &|_| {},
            )
            .await
            .unwrap();
        assert!(mgr.verify("shop", &m.id, None).await.unwrap().ok);
        deployments.push(m);
    }
    let mut emergencies = Vec::new();
    for _ in 0..2 {
        let r = mgr
            .restore(
                &url,
                "shop",
                &deployments[0].id,
                &RestoreRequest::tables(["orders"]),
                &|_| {},
            )
            .await
            .unwrap();
        emergencies.push(r.emergency_backup.unwrap());
    }
    let manual = mgr
        .create(&url, "shop", &BackupRequest::default(), &|_| {})
        .await
        .unwrap();
    assert!(mgr.verify("shop", &manual.id, None).await.unwrap().ok);
    let catalog = mgr.catalog("shop").unwrap();
    let kind = |id: &str| catalog.get(id).unwrap().kind();
    assert_eq!(kind(&undo4.id), BackupKind::PreUndo);
    assert_eq!(kind(&deployments[0].id), BackupKind::PreDeployment);
    assert_eq!(kind(&emergencies[0]), BackupKind::Emergency);
    assert_eq!(kind(&manual.id), BackupKind::Manual);

    let api = LocalBackups::new().with_target("shop", url.clone(), manager(dir.path()));
    let prune = |keep: usize, force: bool| {
        let api = &api;
        async move {
            api.prune(
                "shop",
                &PruneRequest {
                    keep,
                    force,
                    ..Default::default()
                },
            )
            .await
            .unwrap()
        }
    };
    let deleted = |r: &belay_backup::PruneReport| {
        let mut ids: Vec<String> = r.deleted.iter().map(|e| e.id.clone()).collect();
        ids.sort();
        ids
    };
    let sorted = |mut ids: Vec<String>| {
        ids.sort();
        ids
    };

    // --keep 3: no kind has more than three, so nothing goes.
    assert!(prune(3, false).await.deleted.is_empty());
    // --keep 1: the older of each kind goes — but not the snapshot before undo of 4,
    // whose users.email is no longer in the database.
    let report = prune(1, false).await;
    assert_eq!(
        deleted(&report),
        sorted(vec![deployments[0].id.clone(), emergencies[0].clone()])
    );
    let kept = report.kept.iter().find(|k| k.id == undo4.id).unwrap();
    assert_eq!(kept.reason, KeepReason::Protected);
    let note = kept.note.as_deref().unwrap();
    assert!(
        note.contains("public.users lost (email text)") && note.contains("--force"),
        "{note}"
    );
    // --force: the lost data no longer protects it; the newer snapshot stays by count.
    let report = prune(1, true).await;
    assert_eq!(deleted(&report), std::slice::from_ref(&undo4.id));
    assert!(catalog.get(&undo5.id).is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_restore_into_a_new_database_drops_it_and_a_retry_works() {
    let (db, url) = fixture().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mgr = manager(dir.path());
    let bad = mgr
        .create(&url, "shop", &BackupRequest::default(), &|_| {})
        .await
        .unwrap();
    truncate(&dir.path().join("shop").join(&bad.id).join("dump.pgdump"));
    let name = format!("{}_copy", db.name);
    let into = RestoreRequest {
        into: Some(name.clone()),
        force: true,
        ..Default::default()
    };
    let exists = || {
        psql(
            &Cluster::shared().url("postgres"),
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'"),
        )
        .unwrap()
        .trim()
        .to_owned()
    };
    let err = mgr
        .restore(&url, "shop", &bad.id, &into, &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, BackupError::IntoFailed { .. }), "{err}");
    assert!(err.to_string().contains("dropped again"), "{err}");
    assert_eq!(exists(), "0", "the half-restored database is gone");

    // The retry, from a good backup, under the same name.
    let good = mgr
        .create(&url, "shop", &BackupRequest::default(), &|_| {})
        .await
        .unwrap();
    let report = mgr
        .restore(
            &url,
            "shop",
            &good.id,
            &RestoreRequest {
                force: false,
                ..into
            },
            &|_| {},
        )
        .await
        .expect("the retry restores");
    assert_eq!(report.database, name);
    assert_eq!(exists(), "1");
    let copy = Cluster::shared().url(&name);
    assert_eq!(checksums(&copy), checksums(&db.url));
    psql(
        &Cluster::shared().url("postgres"),
        &format!("DROP DATABASE \"{name}\""),
    )
    .unwrap();
}

#[tokio::test]
async fn backups_and_whole_archive_restores_are_measured_but_a_restore_of_some_tables_is_not() {
    let (db, url) = fixture().await;
    // Over 1 MiB of archive, so the samples tell a rate.
    psql(
        &db.url,
        "CREATE TABLE filler AS SELECT g AS id, md5(g::text) || md5((g + 1)::text) AS v FROM generate_series(1, 100000) g",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mgr = manager(dir.path());
    assert_eq!(
        mgr.measured_rates("shop").unwrap(),
        belay_backup::MeasuredRates::default()
    );
    let backup = mgr
        .create(&url, "shop", &BackupRequest::default(), &|_| {})
        .await
        .expect("create");
    assert!(backup.total_size() > 1 << 20, "{}", backup.total_size());
    let rates = mgr.measured_rates("shop").unwrap();
    assert_eq!(rates.create.map(|r| r.samples), Some(1));
    assert_eq!(rates.restore, None);

    // Some tables of the archive: its bytes are not this restore's, so no sample. (Its
    // emergency backup of users is recorded, but under 1 MiB it tells no rate.)
    mgr.restore(
        &url,
        "shop",
        &backup.id,
        &RestoreRequest::tables(["users"]),
        &|_| {},
    )
    .await
    .expect("table restore");
    let rates = mgr.measured_rates("shop").unwrap();
    assert_eq!(rates.restore, None);
    assert_eq!(rates.create.map(|r| r.samples), Some(1));

    // The whole archive, into a new database: measured.
    let copy = format!("{}_rates", db.name);
    let report = mgr
        .restore(
            &url,
            "shop",
            &backup.id,
            &RestoreRequest {
                into: Some(copy.clone()),
                ..RestoreRequest::default()
            },
            &|_| {},
        )
        .await
        .expect("restore into");
    assert!(report.mismatches.is_empty(), "{report:?}");
    psql(&db.url, &format!("DROP DATABASE {copy}")).unwrap();
    let rates = mgr.measured_rates("shop").unwrap();
    let restore = rates.restore.expect("the restore was measured");
    assert_eq!(restore.samples, 1);
    assert!(restore.bytes_per_sec > 0.0);
    assert!(dir.path().join("shop/rates.json").is_file());
    // The catalog does not take the rates file for a backup.
    assert_eq!(
        mgr.catalog("shop").unwrap().incomplete().unwrap(),
        Vec::<std::path::PathBuf>::new()
    );
}
