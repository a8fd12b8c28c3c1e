//! Backups wired into the product (local mode): the pre-deployment backup of `migrate`,
//! the data snapshot of an undo, and `belay backup create | list | verify | restore`, all
//! with the real pg_dump/pg_restore and real files.

mod support;
use support::*;

use std::path::Path;

fn backups() -> tempfile::TempDir {
    tempfile::tempdir().expect("backup dir")
}

fn list(url: &str, dir: &Path, backups: &Path) -> Vec<serde_json::Value> {
    belay_b_ok(url, dir, backups, &["backup", "list", "--output", "json"])
        .json()
        .as_array()
        .expect("backup list is an array")
        .clone()
}

fn history_backup_ids(url: &str, entry_type: &str) -> Vec<String> {
    let out = psql(
        url,
        &format!(
            "SELECT coalesce(backup_id, '-') FROM belay.schema_history \
             WHERE type = '{entry_type}' ORDER BY installed_rank"
        ),
    );
    out.lines().map(str::to_string).collect()
}

#[test]
fn migrate_records_its_verified_backup_in_every_history_row() {
    let db = db();
    let b = backups();
    let dir = migrations(&[
        (
            "V1__orders.sql",
            "CREATE TABLE orders (id int PRIMARY KEY, note text);\nINSERT INTO orders SELECT g, 'n' || g FROM generate_series(1, 50) g;",
        ),
        ("V2__idx.sql", "CREATE INDEX orders_note ON orders (note);"),
    ]);
    let r = belay_b_ok(&db.url, dir.path(), b.path(), &["migrate"]);
    let ids = history_backup_ids(&db.url, "SQL");
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_ne!(ids[0], "-", "backup id recorded: {r:?}");
    assert_eq!(ids[0], ids[1], "one backup for the run: {ids:?}");
    let id = &ids[0];
    assert!(
        r.stdout.contains(&format!("backup {id} (full)")),
        "the backup event is shown: {r:?}"
    );
    // The backup was finished before the first migration: it holds no `orders`.
    let entries = list(&db.url, dir.path(), b.path());
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["id"], id.as_str());
    assert_eq!(entries[0]["scope"], "full");
    assert_eq!(entries[0]["verified"], true);
    let v = belay_b_ok(&db.url, dir.path(), b.path(), &["backup", "verify", id]);
    assert!(v.stdout.contains("verified"), "{v:?}");

    // Nothing pending: no backup.
    belay_b_ok(&db.url, dir.path(), b.path(), &["migrate"]);
    assert_eq!(list(&db.url, dir.path(), b.path()).len(), 1);

    // JSON output carries the event too.
    let dir2 = migrations(&[
        (
            "V1__orders.sql",
            "CREATE TABLE orders (id int PRIMARY KEY, note text);\nINSERT INTO orders SELECT g, 'n' || g FROM generate_series(1, 50) g;",
        ),
        ("V2__idx.sql", "CREATE INDEX orders_note ON orders (note);"),
        (
            "V3__more.sql",
            "-- belay:tables=orders\nALTER TABLE orders ADD COLUMN extra int;\nALTER TABLE IF EXISTS no_such_table ADD COLUMN x int;\nALTER TABLE \"Line Items\" ADD COLUMN x int;\nALTER TABLE \"v1.archive\" ADD COLUMN x int;\nALTER TABLE public.orders ADD COLUMN more int;",
        ),
    ]);
    // A dot inside quotes: not a plain name, looked up on its own.
    belay_testkit::psql(
        &db.url,
        "CREATE TABLE \"Line Items\" (id int); CREATE TABLE \"v1.archive\" (id int)",
    )
    .expect("psql");
    let r = belay_b_ok(
        &db.url,
        dir2.path(),
        b.path(),
        &["migrate", "--backup", "tables", "--output", "json"],
    );
    let doc = r.json();
    let taken: Vec<&serde_json::Value> = doc["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["event"] == "backup_taken")
        .collect();
    assert_eq!(taken.len(), 1, "{doc}");
    assert_eq!(taken[0]["scope"], "tables", "{doc}");
    let id3 = taken[0]["id"].as_str().expect("id").to_string();
    assert_eq!(history_backup_ids(&db.url, "SQL")[2], id3);
    let entries = list(&db.url, dir2.path(), b.path());
    let e = entries
        .iter()
        .find(|e| e["id"] == id3.as_str())
        .expect("listed");
    // In the order named, once each, a missing one left out, whichever query found it.
    assert_eq!(
        e["tables"],
        serde_json::json!([
            "public.orders",
            "public.\"Line Items\"",
            "public.\"v1.archive\""
        ]),
        "{e}"
    );
}

#[test]
fn an_undo_dropping_a_column_leaves_a_snapshot_that_restores_the_data() {
    let db = db();
    let b = backups();
    let dir = migrations(&[
        (
            "V1__customers.sql",
            "CREATE TABLE customers (id int PRIMARY KEY, name text);\nINSERT INTO customers SELECT g, 'c' || g FROM generate_series(1, 20) g;",
        ),
        ("U1__customers.sql", "DROP TABLE customers;"),
        (
            "V2__email.sql",
            "ALTER TABLE customers ADD COLUMN email text;\nUPDATE customers SET email = 'c' || id || '@example.com';",
        ),
        ("U2__email.sql", "ALTER TABLE customers DROP COLUMN email;"),
        ("V3__t.sql", "CREATE TABLE other (id int);"),
        (
            "U3__t.sql",
            "DROP INDEX IF EXISTS nothing_here;\nDROP TABLE other;",
        ),
    ]);
    belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &["migrate", "--backup", "none"],
    );
    let before = psql(
        &db.url,
        "SELECT string_agg(id || ':' || email, ',' ORDER BY id) FROM customers",
    );
    assert!(before.starts_with("1:c1@example.com,2:"), "{before}");

    // Undo V3 and V2: V2's undo drops customers.email, V3's drops the empty table `other`.
    let r = belay_b_ok(&db.url, dir.path(), b.path(), &["undo", "--steps", "2"]);
    assert!(r.stderr.contains("snapshotting"), "{r:?}");
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'customers' AND column_name = 'email'"
        ),
        "0"
    );
    // One snapshot per undo script, each of what that script drops, in the order the
    // undos run: V3's first.
    let undo_ids = history_backup_ids(&db.url, "UNDO_SQL");
    assert_eq!(undo_ids.len(), 2, "{undo_ids:?}");
    assert!(!undo_ids.contains(&"-".to_string()), "{undo_ids:?}");
    assert_ne!(undo_ids[0], undo_ids[1]);
    let entries = list(&db.url, dir.path(), b.path());
    for (id, table) in undo_ids.iter().zip(["public.other", "public.customers"]) {
        let e = entries
            .iter()
            .find(|e| e["id"] == id.as_str())
            .expect("snapshot listed");
        assert_eq!(e["scope"], "tables");
        assert_eq!(e["tables"], serde_json::json!([table]), "{e}");
        assert_eq!(e["verified"], true);
    }
    let snapshot = undo_ids[1].clone();

    // Put back as it is, customers would have its email column again while history says
    // V2 is undone: refused, naming both schema versions.
    let r = belay_b(
        &db.url,
        dir.path(),
        b.path(),
        &["backup", "restore", &snapshot, "--tables", "customers"],
    );
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        // Taken after V3's undo, just before V2's.
        r.stderr.contains("schema version 2") && r.stderr.contains("at 1 now"),
        "{r:?}"
    );
    // The honest way back: re-apply V2 (the column, empty), then the column's data comes
    // back from the snapshot, the table's shape being the same as then.
    belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &["migrate", "--to", "2", "--backup", "none"],
    );
    let r = belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &[
            "backup",
            "restore",
            &snapshot,
            "--tables",
            "customers",
            "--across-versions",
        ],
    );
    assert!(r.stdout.contains("restored table(s)"), "{r:?}");
    let after = psql(
        &db.url,
        "SELECT string_agg(id || ':' || email, ',' ORDER BY id) FROM customers",
    );
    assert_eq!(after, before);

    // An undo that drops nothing with data takes no snapshot; `--backup none` skips it
    // knowingly.
    let n = list(&db.url, dir.path(), b.path()).len();
    let r = belay_b_ok(&db.url, dir.path(), b.path(), &["undo", "--backup", "none"]);
    assert!(r.stderr.contains("--backup none"), "{r:?}");
    assert_eq!(list(&db.url, dir.path(), b.path()).len(), n);
}

#[test]
fn create_and_list_show_formats_scopes_and_files() {
    let db = db();
    let b = backups();
    let dir = migrations(&[(
        "V1__t.sql",
        "CREATE TABLE t (id int);\nINSERT INTO t SELECT generate_series(1, 10);\nCREATE TABLE u (id int);",
    )]);
    belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &["migrate", "--backup", "none"],
    );
    let c = belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &["backup", "create", "--output", "json"],
    );
    let created = c.json();
    assert_eq!(created["verified"], true, "{created}");
    let r = belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &[
            "backup",
            "create",
            "--format",
            "directory",
            "--jobs",
            "2",
            "--tables",
            "t",
            "--label",
            "just t",
        ],
    );
    assert!(r.stdout.contains("verified"), "{r:?}");
    assert!(!r.stderr.is_empty(), "progress lines on stderr: {r:?}");
    belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &["backup", "create", "--scope", "schema"],
    );

    let entries = list(&db.url, dir.path(), b.path());
    assert_eq!(entries.len(), 3, "{entries:?}");
    // Newest first.
    let scopes: Vec<&str> = entries
        .iter()
        .map(|e| e["scope"].as_str().expect("scope"))
        .collect();
    assert_eq!(scopes, ["schema_only", "tables", "full"]);
    let formats: Vec<&str> = entries
        .iter()
        .map(|e| e["format"].as_str().expect("format"))
        .collect();
    assert_eq!(formats, ["custom", "directory", "custom"]);
    assert_eq!(entries[1]["label"], "just t");
    assert_eq!(entries[2]["id"], created["id"]);
    for e in &entries {
        assert!(e["id"].as_str().is_some_and(|s| !s.is_empty()), "{e}");
        assert!(
            e["created_at"].as_str().is_some_and(|s| s.contains('T')),
            "{e}"
        );
        assert_eq!(e["verified"], true, "{e}");
        let files = e["files"].as_array().expect("files");
        assert!(!files.is_empty(), "{e}");
        for f in files {
            assert!(f["path"].as_str().is_some_and(|p| !p.is_empty()), "{f}");
            assert!(f["size"].as_u64().is_some(), "{f}");
            let sha = f["sha256"].as_str().expect("sha256");
            assert_eq!(sha.len(), 64, "{f}");
            assert!(sha.chars().all(|c| c.is_ascii_hexdigit()), "{f}");
        }
    }
    let text = belay_b_ok(&db.url, dir.path(), b.path(), &["backup", "list"]);
    assert!(text.stdout.contains("just t"), "{text:?}");
    // `verified` stays a yes/no; the restore test has its own yes/no column.
    let mut lines = text.stdout.lines();
    let header = lines.next().expect("header");
    let col = |name: &str| {
        header
            .find(name)
            .unwrap_or_else(|| panic!("{name}: {header}"))
    };
    let (verified, tested) = (col("verified"), col("restore-test"));
    for row in lines {
        let word = |at: usize| row[at..].split_whitespace().next().unwrap_or("");
        assert!(matches!(word(verified), "yes" | "no"), "{row}");
        assert!(matches!(word(tested), "yes" | "no"), "{row}");
    }

    // Retention keeps the newest verified backup even when asked to keep none.
    let p = belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &["backup", "prune", "--keep", "0", "--dry-run"],
    );
    assert_eq!(p.stdout.matches("would delete").count(), 2, "{p:?}");
    assert_eq!(list(&db.url, dir.path(), b.path()).len(), 3);
    belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &["backup", "prune", "--keep", "0"],
    );
    let left = list(&db.url, dir.path(), b.path());
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["scope"], "schema_only");
}

#[test]
fn a_corrupted_backup_fails_verification_and_is_not_restored_without_force() {
    let db = db();
    let b = backups();
    let dir = migrations(&[(
        "V1__t.sql",
        "CREATE TABLE t (id int, payload text);\nINSERT INTO t SELECT g, repeat(md5(g::text), 20) FROM generate_series(1, 500) g;",
    )]);
    belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &["migrate", "--backup", "none"],
    );
    let created = belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &["backup", "create", "--output", "json"],
    )
    .json();
    let id = created["id"].as_str().expect("id").to_string();
    let dump = Path::new(created["path"].as_str().expect("path")).join("dump.pgdump");
    let mut bytes = std::fs::read(&dump).expect("read dump");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&dump, &bytes).expect("write dump");

    let v = belay_b(&db.url, dir.path(), b.path(), &["backup", "verify", &id]);
    assert_eq!(v.code, 1, "{v:?}");
    assert!(v.stdout.contains("dump.pgdump"), "names the file: {v:?}");
    let r = belay_b(
        &db.url,
        dir.path(),
        b.path(),
        &["backup", "restore", &id, "--tables", "t"],
    );
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("--force"), "{r:?}");
    assert_eq!(psql(&db.url, "SELECT count(*) FROM t"), "500");

    let missing = belay_b(
        &db.url,
        dir.path(),
        b.path(),
        &["backup", "verify", "20200101T000000.000Z-abcdef"],
    );
    assert_eq!(missing.code, 66, "{missing:?}");
}

#[test]
fn migrate_with_backup_none_takes_no_backup_and_says_so() {
    let db = db();
    let b = backups();
    let dir = migrations(&[("V1__t.sql", "CREATE TABLE t (id int);")]);
    let r = belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &["migrate", "--backup", "none"],
    );
    assert!(r.stderr.contains("warning"), "{r:?}");
    assert!(r.stderr.contains("no backup"), "{r:?}");
    assert_eq!(history_backup_ids(&db.url, "SQL"), ["-"]);
    assert!(list(&db.url, dir.path(), b.path()).is_empty());
    assert!(!b.path().join(&db.name).exists());
}

#[test]
fn a_failing_backup_refuses_the_migration_with_nothing_applied() {
    let db = db();
    let dir = migrations(&[
        ("V1__t.sql", "CREATE TABLE t (id int);"),
        ("V2__u.sql", "CREATE TABLE u (id int);"),
    ]);
    let not_a_dir = tempfile::NamedTempFile::new().expect("file");
    let r = belay_b(&db.url, dir.path(), not_a_dir.path(), &["migrate"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("backup"), "{r:?}");
    assert!(r.stderr.contains("nothing was changed"), "{r:?}");
    assert_eq!(psql(&db.url, "SELECT to_regclass('t') IS NULL"), "t");
    let s = states(&db.url, dir.path());
    assert!(s.iter().all(|(_, st)| st == "pending"), "{s:?}");

    // The same with a directory the backup cannot write into (unless we are root, whom
    // permissions do not stop).
    let ro = backups();
    let mut perms = std::fs::metadata(ro.path()).expect("meta").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o500);
    std::fs::set_permissions(ro.path(), perms).expect("chmod");
    let probe = ro.path().join("probe");
    if std::fs::write(&probe, b"x").is_err() {
        let r = belay_b(&db.url, dir.path(), ro.path(), &["migrate"]);
        assert_eq!(r.code, 2, "{r:?}");
        assert!(r.stderr.contains("nothing was changed"), "{r:?}");
        assert_eq!(psql(&db.url, "SELECT to_regclass('t') IS NULL"), "t");
    }
}

#[test]
fn prune_keeps_the_backup_of_an_unfinished_deployment_until_it_is_repaired() {
    let db = db();
    let b = backups();
    let dir = migrations(&[
        ("V1__t.sql", "CREATE TABLE t (id int);"),
        ("V2__boom.sql", "-- belay:no-transaction\nSELECT 1/0;"),
    ]);
    let r = belay_b(&db.url, dir.path(), b.path(), &["migrate"]);
    assert_eq!(r.code, 1, "V2 fails: {r:?}");
    let ids = history_backup_ids(&db.url, "SQL");
    assert_eq!(
        ids.len(),
        2,
        "V1 success and V2 failed, both with the backup: {ids:?}"
    );
    let pre = ids[0].clone();
    let deployment = psql(
        &db.url,
        "SELECT DISTINCT deployment_id FROM belay.schema_history",
    );
    // Two newer verified backups: retention alone, keeping none, would delete `pre`.
    let c1 = belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &["backup", "create", "--output", "json"],
    )
    .json()["id"]
        .as_str()
        .expect("id")
        .to_string();
    belay_b_ok(&db.url, dir.path(), b.path(), &["backup", "create"]);

    let p = belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &["backup", "prune", "--keep", "0", "--output", "json"],
    )
    .json();
    let deleted: Vec<&str> = p["deleted"]
        .as_array()
        .expect("deleted")
        .iter()
        .map(|e| e["id"].as_str().expect("id"))
        .collect();
    assert_eq!(deleted, [c1.as_str()], "{p}");
    let kept = p["kept"]
        .as_array()
        .expect("kept")
        .iter()
        .find(|k| k["id"] == pre.as_str())
        .unwrap_or_else(|| panic!("the pre-deployment backup is kept: {p}"));
    assert_eq!(kept["reason"], "protected", "{p}");
    let note = kept["note"].as_str().expect("a note says why");
    assert!(
        note.contains(&deployment) && note.contains("V2__boom.sql is failed"),
        "{note}"
    );
    // The text says why too.
    let t = belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &["backup", "prune", "--keep", "0", "--dry-run"],
    );
    assert!(
        t.stdout
            .contains(&format!("kept {pre} (protected: deployment {deployment}")),
        "{t:?}"
    );
    assert!(
        list(&db.url, dir.path(), b.path())
            .iter()
            .any(|e| e["id"] == pre.as_str())
    );

    // Once repaired, the deployment is settled and its backup is ordinary again: the
    // newest verified pre-deployment backup, kept as such (retention counts each kind on
    // its own, so the newer manual backups do not push it out).
    belay_b_ok(&db.url, dir.path(), b.path(), &["repair"]);
    let p = belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &["backup", "prune", "--keep", "0", "--output", "json"],
    )
    .json();
    assert_eq!(p["deleted"], serde_json::json!([]), "{p}");
    let kept = p["kept"]
        .as_array()
        .expect("kept")
        .iter()
        .find(|k| k["id"] == pre.as_str())
        .unwrap_or_else(|| panic!("{p}"));
    assert_eq!(kept["reason"], "latest_verified", "{p}");
    assert_eq!(list(&db.url, dir.path(), b.path()).len(), 2);
}

#[test]
fn prune_refuses_without_the_history_rather_than_delete_blind() {
    let db = db();
    let b = backups();
    let dir = migrations(&[]);
    belay_b_ok(&db.url, dir.path(), b.path(), &["backup", "create"]);
    // The same catalog, but the database is unreachable now.
    let name = psql(&db.url, "SELECT current_database()");
    let gone = format!("postgres://nobody@127.0.0.1:1/{name}");
    let r = belay_b(
        &gone,
        dir.path(),
        b.path(),
        &["backup", "prune", "--keep", "0"],
    );
    assert_eq!(r.code, 69, "{r:?}");
    assert_eq!(list(&db.url, dir.path(), b.path()).len(), 1);
}

#[test]
fn remote_backup_commands_go_to_the_controller_and_backup_flags_stay_local() {
    let db = db();
    let dir = migrations(&[]);
    let r = belay(
        &db.url,
        dir.path(),
        &[
            "--controller",
            "127.0.0.1:1",
            "--target",
            "x",
            "backup",
            "list",
        ],
    );
    assert_eq!(r.code, 69, "{r:?}");
    assert!(r.stderr.contains("controller at 127.0.0.1:1"), "{r:?}");
    let r = belay(
        &db.url,
        dir.path(),
        &["--controller", "127.0.0.1:1", "migrate", "--backup", "none"],
    );
    assert_eq!(r.code, 64, "{r:?}");
    assert!(
        r.stderr.contains("not yet available in remote mode"),
        "{r:?}"
    );
}

/// The rows of `table` in a backup's dump, one COPY line each, as pg_restore prints them.
fn dumped_rows(backup: &serde_json::Value, table: &str) -> Vec<String> {
    let dir = Path::new(backup["path"].as_str().expect("backup path"));
    let bin = belay_testkit::bin_dir().expect("postgres binaries");
    let out = std::process::Command::new(bin.join("pg_restore"))
        .args(["--data-only", "--table", table, "--file", "-"])
        .arg(dir.join("dump.pgdump"))
        .output()
        .expect("run pg_restore");
    assert!(out.status.success(), "pg_restore: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut rows = Vec::new();
    let mut in_copy = false;
    for line in text.lines() {
        if line.starts_with("COPY ") {
            in_copy = true;
        } else if line == "\\." {
            in_copy = false;
        } else if in_copy {
            rows.push(line.to_string());
        }
    }
    rows
}

/// Polls (deadline 60 s) until a belay session waits for a lock on `table`.
fn wait_until_belay_waits_on(url: &str, table: &str) {
    let sql = format!(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
          WHERE NOT l.granted AND a.application_name = 'belay' \
            AND l.relation = '{table}'::regclass"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while psql(url, &sql) == "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "belay never waited for a lock on {table}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn spawn_belay_b(url: &str, dir: &Path, backups: &Path, args: &[&str]) -> std::process::Child {
    belay_cmd(url, dir)
        .arg("--backup-dir")
        .arg(backups)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start belay")
}

fn finish(child: std::process::Child) -> (i32, String) {
    let out = child.wait_with_output().expect("wait for belay");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "--- stdout\n{}\n--- stderr\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_row_committed_while_the_undo_waits_is_in_its_snapshot() {
    let db = db();
    let b = backups();
    let dir = migrations(&[
        (
            "V1__customers.sql",
            "CREATE TABLE customers (id int PRIMARY KEY, name text);\nINSERT INTO customers SELECT g, 'c' || g FROM generate_series(1, 5) g;",
        ),
        ("U1__customers.sql", "DROP TABLE customers;"),
        (
            "V2__email.sql",
            "ALTER TABLE customers ADD COLUMN email text;",
        ),
        ("U2__email.sql", "ALTER TABLE customers DROP COLUMN email;"),
    ]);
    belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &["migrate", "--backup", "none"],
    );
    // The application's write, in flight when the rollback starts.
    let mut writer = Session::open(&db.url);
    writer.run("BEGIN; INSERT INTO customers VALUES (99, 'late', 'late@example.com');");
    // A long lock_timeout: the undo keeps waiting (rather than retrying) while we look.
    let undo = spawn_belay_b(
        &db.url,
        dir.path(),
        b.path(),
        &["undo", "--steps", "1", "--lock-timeout", "60s"],
    );
    wait_until_belay_waits_on(&db.url, "customers");
    writer.run("COMMIT;");
    let (code, out) = finish(undo);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'customers' AND column_name = 'email'"
        ),
        "0",
        "{out}"
    );
    let snapshot = history_backup_ids(&db.url, "UNDO_SQL")[0].clone();
    let entries = list(&db.url, dir.path(), b.path());
    let e = entries
        .iter()
        .find(|e| e["id"] == snapshot.as_str())
        .expect("snapshot listed");
    let rows = dumped_rows(e, "customers");
    assert!(
        rows.contains(&"99\tlate\tlate@example.com".to_string()),
        "the row committed during the undo is in its snapshot: {rows:?}\n{out}"
    );
    assert_eq!(rows.len(), 6, "{rows:?}");
}

#[test]
fn each_undo_script_snapshots_the_rows_committed_before_its_own_drop() {
    let db = db();
    let b = backups();
    let dir = migrations(&[
        (
            "V1__customers.sql",
            "CREATE TABLE customers (id int PRIMARY KEY, name text);\nINSERT INTO customers SELECT g, 'c' || g FROM generate_series(1, 5) g;",
        ),
        ("U1__customers.sql", "DROP TABLE customers;"),
        (
            "V2__email.sql",
            "ALTER TABLE customers ADD COLUMN email text;",
        ),
        ("U2__email.sql", "ALTER TABLE customers DROP COLUMN email;"),
        (
            "V3__orders.sql",
            "CREATE TABLE orders (id int PRIMARY KEY, total int);\nINSERT INTO orders VALUES (1, 10);",
        ),
        ("U3__orders.sql", "DROP TABLE orders;"),
    ]);
    belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &["migrate", "--backup", "none"],
    );
    // Two writes in flight, one to each table the undo scripts drop data from.
    let mut to_orders = Session::open(&db.url);
    to_orders.run("BEGIN; INSERT INTO orders VALUES (2, 20);");
    let mut to_customers = Session::open(&db.url);
    to_customers.run("BEGIN; INSERT INTO customers VALUES (99, 'late', 'late@example.com');");
    let undo = spawn_belay_b(
        &db.url,
        dir.path(),
        b.path(),
        &["undo", "--steps", "2", "--lock-timeout", "60s"],
    );
    // U3 waits for the write to orders; once that is in, it drops orders, and U2 waits
    // for the write to customers, which commits after U3's snapshot was taken.
    wait_until_belay_waits_on(&db.url, "orders");
    to_orders.run("COMMIT;");
    wait_until_belay_waits_on(&db.url, "customers");
    to_customers.run("COMMIT;");
    let (code, out) = finish(undo);
    assert_eq!(code, 0, "{out}");
    assert_eq!(psql(&db.url, "SELECT to_regclass('orders') IS NULL"), "t");
    let undo_ids = history_backup_ids(&db.url, "UNDO_SQL");
    assert_eq!(undo_ids.len(), 2, "{undo_ids:?}\n{out}");
    let entries = list(&db.url, dir.path(), b.path());
    let rows_of = |id: &str, table: &str| {
        let e = entries
            .iter()
            .find(|e| e["id"] == id)
            .expect("snapshot listed");
        dumped_rows(e, table)
    };
    assert_eq!(
        rows_of(&undo_ids[0], "orders"),
        ["1\t10", "2\t20"],
        "U3's snapshot holds the write committed while it waited\n{out}"
    );
    let customers = rows_of(&undo_ids[1], "customers");
    assert!(
        customers.contains(&"99\tlate\tlate@example.com".to_string()),
        "U2's snapshot holds the write committed after U3 ran: {customers:?}\n{out}"
    );
    assert_eq!(customers.len(), 6, "{customers:?}");
}

#[test]
fn a_no_transaction_undo_dropping_data_says_its_snapshot_is_not_fenced() {
    let db = db();
    let b = backups();
    let dir = migrations(&[
        (
            "V1__customers.sql",
            "CREATE TABLE customers (id int PRIMARY KEY, name text);\nINSERT INTO customers VALUES (1, 'a');",
        ),
        (
            "U1__customers.sql",
            "-- belay:no-transaction\nDROP TABLE customers;",
        ),
    ]);
    belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &["migrate", "--backup", "none"],
    );
    let r = belay_b_ok(&db.url, dir.path(), b.path(), &["undo"]);
    assert!(
        r.stdout
            .contains("warning: U1__customers.sql runs outside a transaction")
            && r.stdout.contains("public.customers")
            && r.stdout.contains("not in the snapshot"),
        "{r:?}"
    );
    let id = history_backup_ids(&db.url, "UNDO_SQL")[0].clone();
    let entries = list(&db.url, dir.path(), b.path());
    let e = entries
        .iter()
        .find(|e| e["id"] == id.as_str())
        .expect("snapshot listed");
    assert_eq!(dumped_rows(e, "customers"), ["1\ta"]);
}

#[test]
fn the_lock_guard_lets_writes_queued_behind_a_waiting_fence_through() {
    let db = db();
    let b = backups();
    let dir = migrations(&[
        (
            "V1__customers.sql",
            "CREATE TABLE customers (id int PRIMARY KEY, name text);\nINSERT INTO customers VALUES (1, 'a');",
        ),
        ("U1__customers.sql", "DROP TABLE customers;"),
        (
            "V2__email.sql",
            "ALTER TABLE customers ADD COLUMN email text;",
        ),
        ("U2__email.sql", "ALTER TABLE customers DROP COLUMN email;"),
    ]);
    belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &["migrate", "--backup", "none"],
    );
    let mut open_write = Session::open(&db.url);
    open_write.run("BEGIN; INSERT INTO customers VALUES (99, 'late', 'late@example.com');");
    let undo = spawn_belay_b(
        &db.url,
        dir.path(),
        b.path(),
        &["undo", "--steps", "1", "--lock-timeout", "60s"],
    );
    wait_until_belay_waits_on(&db.url, "customers");
    // A write arriving now queues behind the fence's pending EXCLUSIVE request; the guard
    // cancels the fence's wait, so it goes through long before the 60 s lock_timeout.
    let mut queued = Session::open(&db.url);
    queued.send("INSERT INTO customers VALUES (100, 'queued', 'q@example.com');");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while psql(&db.url, "SELECT count(*) FROM customers WHERE id = 100") == "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "the queued write never went through"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    open_write.run("COMMIT;");
    let (code, out) = finish(undo);
    assert_eq!(code, 0, "{out}");
    assert!(
        psql(
            &db.url,
            "SELECT lock_trips FROM belay.schema_history WHERE type = 'UNDO_SQL'"
        )
        .parse::<i32>()
        .expect("a number")
            >= 1,
        "{out}"
    );
    let snapshot = history_backup_ids(&db.url, "UNDO_SQL")[0].clone();
    let entries = list(&db.url, dir.path(), b.path());
    let e = entries
        .iter()
        .find(|e| e["id"] == snapshot.as_str())
        .expect("snapshot listed");
    let mut rows = dumped_rows(e, "customers");
    rows.sort();
    assert_eq!(
        rows,
        [
            "1\ta\t\\N",
            "100\tqueued\tq@example.com",
            "99\tlate\tlate@example.com"
        ],
        "{out}"
    );
}

#[test]
fn an_undo_snapshot_of_a_table_with_foreign_keys_restores_into_a_new_database() {
    // The recover command a rollback prints restores the undo's snapshot into a new,
    // empty database; the snapshot holds `orders`, whose foreign key points at
    // `accounts`, which it does not hold.
    let db = db();
    let b = backups();
    let dir = migrations(&[
        (
            "V1__shop.sql",
            "CREATE TABLE accounts (id int PRIMARY KEY);\n\
             CREATE TABLE orders (id int PRIMARY KEY, account_id int NOT NULL REFERENCES accounts);\n\
             INSERT INTO accounts SELECT g FROM generate_series(1, 3) g;\n\
             INSERT INTO orders SELECT g, 1 + g % 3 FROM generate_series(1, 9) g;",
        ),
        ("U1__shop.sql", "DROP TABLE orders;\nDROP TABLE accounts;"),
        (
            "V2__coupon.sql",
            "ALTER TABLE orders ADD COLUMN coupon text;\nUPDATE orders SET coupon = 'C' || id;",
        ),
        ("U2__coupon.sql", "ALTER TABLE orders DROP COLUMN coupon;"),
    ]);
    belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &["migrate", "--backup", "none"],
    );
    belay_b_ok(&db.url, dir.path(), b.path(), &["undo"]);
    let snapshot = history_backup_ids(&db.url, "UNDO_SQL")[0].clone();
    assert_ne!(snapshot, "-");
    let recovered = format!("belay_recovered_fk_{}", std::process::id());
    let r = belay_b_ok(
        &db.url,
        dir.path(),
        b.path(),
        &["backup", "restore", &snapshot, "--into", &recovered],
    );
    assert!(r.stdout.contains(&recovered), "{r:?}");
    let url = db
        .url
        .replace(&format!("/{}", db.name), &format!("/{recovered}"));
    assert_eq!(
        psql(
            &url,
            "SELECT string_agg(id || ':' || coupon, ',' ORDER BY id) FROM orders"
        ),
        "1:C1,2:C2,3:C3,4:C4,5:C5,6:C6,7:C7,8:C8,9:C9"
    );
    // A recovery copy beside the live data: the key to a table it does not hold is left
    // out, the table's own primary key is not.
    assert_eq!(
        psql(
            &url,
            "SELECT string_agg(contype::text, ',' ORDER BY contype) FROM pg_constraint WHERE conrelid = 'orders'::regclass"
        ),
        "p"
    );
}
