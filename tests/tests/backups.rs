//! Backups through the fleet: the real CLI in remote mode, a real controller and agent,
//! real PostgreSQL and pg_dump. The agent keeps the catalog; the controller routes to it and
//! mirrors the catalog into its store.

use anyhow::{Context, Result};
use belay_e2e::{Daemon, Run, belay, belay_local, psql, wait_agents, wait_for};
use belay_testkit::{Cluster, TestDb};
use std::path::{Path, PathBuf};

/// One target of the agent: its name, database, and backup directory if it has one.
struct Def<'a> {
    name: &'a str,
    db: &'a TestDb,
    backup_dir: Option<&'a Path>,
}

/// An agent whose targets may have a `backup_dir` (the shared helper writes none).
async fn agent(
    dir: &Path,
    controller: &str,
    migrations: &Path,
    defs: &[Def<'_>],
) -> Result<Daemon> {
    let mut text = format!("name = \"agent-1\"\ncontroller = \"{controller}\"\n");
    for d in defs {
        text.push_str(&format!(
            "\n[[targets]]\nname = \"{}\"\nurl = \"{}\"\nmigrations = \"{}\"\n",
            d.name,
            d.db.url,
            migrations.display()
        ));
        if let Some(b) = d.backup_dir {
            text.push_str(&format!("backup_dir = \"{}\"\n", b.display()));
        }
    }
    let path = dir.join("agent-1.toml");
    std::fs::write(&path, text).context("writing agent config")?;
    belay_e2e::agent(&path).await
}

fn ok(r: Run) -> Run {
    assert_eq!(r.code, 0, "{r:?}");
    r
}

/// The controller store's mirror of `target`: (id, verified, deployment_id, sha256 of the
/// first file), newest first.
async fn mirror(store: &Path, target: &str) -> Result<Vec<(String, bool, Option<String>, String)>> {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", store.display())).await?;
    let rows: Vec<(String, i64, Option<String>, String)> = sqlx::query_as(
        "SELECT id, verified, deployment_id, json_extract(manifest, '$.files[0].sha256')
         FROM backups WHERE target = $1 ORDER BY created_at DESC, id DESC",
    )
    .bind(target)
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    Ok(rows
        .into_iter()
        .map(|(id, v, d, sha)| (id, v == 1, d, sha))
        .collect())
}

fn empty_migrations(dir: &Path) -> Result<PathBuf> {
    let m = dir.join("migrations");
    std::fs::create_dir_all(&m)?;
    Ok(m)
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_backups_create_list_verify_restore_and_are_mirrored() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let db = Cluster::shared().create_database().await?;
    let other = Cluster::shared().create_database().await?;
    let migrations = empty_migrations(tmp.path())?;
    let backups = tmp.path().join("agent-backups");
    let store = tmp.path().join("controller.db");
    psql(
        &db.url,
        "CREATE TABLE orders (id int PRIMARY KEY, note text);
         INSERT INTO orders SELECT g, 'n' || g FROM generate_series(1, 50) g;",
    );
    let c = belay_e2e::controller(&store.to_string_lossy(), &[]).await?;
    // Named like its database, so local mode (catalog named after the database) reads the
    // same catalog and the outputs can be compared.
    let t = db.name.as_str();
    let mut a = agent(
        tmp.path(),
        &c.addr,
        &migrations,
        &[
            Def {
                name: t,
                db: &db,
                backup_dir: Some(&backups),
            },
            Def {
                name: "nobackup",
                db: &other,
                backup_dir: None,
            },
        ],
    )
    .await?;
    wait_agents(&c.addr, 1).await?;

    // Create: progress streams back from the agent, the result is a verified backup.
    let created = ok(belay(
        &c.addr,
        &["--target", t, "backup", "create", "--output", "json"],
    )
    .await?);
    let doc = created.json();
    let id = doc["id"].as_str().context("id")?.to_string();
    assert!(
        created.stderr.contains(&format!("backing up {t} ({id})"))
            && created.stderr.contains("done,"),
        "progress lines come from the stream: {created:?}"
    );
    assert_eq!(doc["verified"], true, "{doc}");
    assert!(
        doc["tables_counted"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["name"] == "orders" && x["rows"] == 50)),
        "{doc}"
    );
    assert!(
        backups.join(t).join(&id).join("manifest.json").is_file(),
        "the catalog is the agent's"
    );

    // List: the same backup, with what a catalog entry carries.
    let listed = ok(belay(
        &c.addr,
        &["--target", t, "backup", "list", "--output", "json"],
    )
    .await?);
    let entries = listed.json();
    let e = &entries.as_array().context("array")?[0];
    assert_eq!(entries.as_array().map(Vec::len), Some(1), "{entries}");
    assert_eq!(e["id"], id.as_str());
    assert!(
        e["created_at"].as_str().is_some_and(|s| s.contains('T')),
        "{e}"
    );
    assert_eq!(e["format"], "custom", "{e}");
    assert_eq!(e["scope"], "full", "{e}");
    assert_eq!(e["verified"], true, "{e}");
    let files = e["files"].as_array().context("files")?;
    assert_eq!(files[0]["path"], "dump.pgdump", "{e}");
    assert!(files[0]["size"].as_u64().is_some_and(|n| n > 0), "{e}");
    let sha = files[0]["sha256"].as_str().context("sha256")?.to_string();
    assert_eq!(sha.len(), 64, "{e}");

    // Local mode on the same catalog prints exactly the same.
    let backup_dir = backups.to_string_lossy().into_owned();
    let local = belay_local(
        &db.url,
        &migrations,
        &[
            "--backup-dir",
            &backup_dir,
            "backup",
            "list",
            "--output",
            "json",
        ],
    )
    .await?;
    assert_eq!(local.json(), entries, "{local:?}");
    let remote_text = ok(belay(&c.addr, &["--target", t, "backup", "list"]).await?);
    let local_text = belay_local(
        &db.url,
        &migrations,
        &["--backup-dir", &backup_dir, "backup", "list"],
    )
    .await?;
    assert_eq!(remote_text.stdout, local_text.stdout);

    // The controller mirrored it into its store.
    let m = mirror(&store, t).await?;
    assert_eq!(m, [(id.clone(), true, None, sha.clone())]);

    // Verify, with a restore into a scratch database on the target's server.
    let v = ok(belay(
        &c.addr,
        &["--target", t, "backup", "verify", &id, "--restore-test"],
    )
    .await?);
    assert!(
        v.stdout.contains(&format!("backup {id} verified"))
            && v.stdout.contains("restore test into"),
        "{v:?}"
    );

    // Restore brings changed data back, behind an emergency backup.
    psql(
        &db.url,
        "DELETE FROM orders WHERE id > 10; UPDATE orders SET note = 'changed'",
    );
    let r = ok(belay(
        &c.addr,
        &["--target", t, "backup", "restore", &id, "--output", "json"],
    )
    .await?);
    let report = r.json();
    assert!(r.stderr.contains(&format!("restoring {t} ({id})")), "{r:?}");
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*), count(*) FILTER (WHERE note = 'changed') FROM orders"
        ),
        "50|0"
    );
    let emergency = report["emergency_backup"]
        .as_str()
        .context("emergency backup")?
        .to_string();
    // The mirror follows: the emergency backup is in it too.
    let ids: Vec<String> = mirror(&store, t).await?.into_iter().map(|r| r.0).collect();
    assert_eq!(ids, [emergency.clone(), id.clone()]);

    // Errors keep their meaning and exit codes across the wire.
    let r = belay(
        &c.addr,
        &[
            "--target",
            t,
            "backup",
            "verify",
            "20000101T000000.000Z-000000",
        ],
    )
    .await?;
    assert_eq!(r.code, 66, "no such backup: {r:?}");
    let r = belay(&c.addr, &["--target", "nobackup", "backup", "list"]).await?;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("\"nobackup\"") && r.stderr.contains("backup_dir"),
        "names the target and the key to set: {r:?}"
    );
    let r = belay(&c.addr, &["--target", "nope", "backup", "list"]).await?;
    assert_eq!(r.code, 64, "{r:?}");

    // With the agent down, the listing fails, saying what the controller last saw.
    a.kill().await?;
    wait_for("the agent to be reported unreachable", || async {
        let r = belay(&c.addr, &["agents", "--output", "json"]).await?;
        Ok(r.json()
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["state"] == "unreachable")))
    })
    .await?;
    let r = belay(&c.addr, &["--target", t, "backup", "list"]).await?;
    assert_eq!(r.code, 69, "{r:?}");
    assert!(
        r.stderr.contains(&format!(
            "the controller last saw 2 backup(s) of {t} (newest {emergency}"
        )),
        "{r:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn prune_through_the_controller_keeps_the_backup_of_a_failed_deployment() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let db = Cluster::shared().create_database().await?;
    let migrations = tmp.path().join("migrations");
    std::fs::create_dir_all(&migrations)?;
    std::fs::write(
        migrations.join("V1__t.sql"),
        "CREATE TABLE t (id int);\nINSERT INTO t SELECT generate_series(1, 10);",
    )?;
    // Fails in its own transaction: no history row records the failure, so the target's
    // history alone looks finished; only the controller knows the deployment failed.
    std::fs::write(migrations.join("V2__boom.sql"), "SELECT 1/0;")?;
    let backups = tmp.path().join("agent-backups");
    let store = tmp.path().join("controller.db");
    let c = belay_e2e::controller(&store.to_string_lossy(), &[]).await?;
    let t = db.name.as_str();
    let _a = agent(
        tmp.path(),
        &c.addr,
        &migrations,
        &[Def {
            name: t,
            db: &db,
            backup_dir: Some(&backups),
        }],
    )
    .await?;
    wait_agents(&c.addr, 1).await?;

    let r = belay(&c.addr, &["deploy", "--targets", t, "--output", "json"]).await?;
    assert_eq!(r.code, 1, "{r:?}");
    let deployment = r.json()["id"]
        .as_str()
        .context("deployment id")?
        .to_string();
    assert_eq!(r.json()["state"], "failed", "{r:?}");
    let pre = psql(
        &db.url,
        "SELECT DISTINCT backup_id FROM belay.schema_history",
    );
    assert_eq!(
        psql(
            &db.url,
            "SELECT string_agg(state, ',') FROM belay.schema_history"
        ),
        "success"
    );

    // The controller mirrored at once which backup precedes the deployment.
    let m = mirror(&store, t).await?;
    assert_eq!(
        m.iter()
            .map(|r| (r.0.as_str(), r.1, r.2.as_deref()))
            .collect::<Vec<_>>(),
        [(pre.as_str(), true, Some(deployment.as_str()))],
        "{m:?}"
    );

    // Two newer verified backups: keeping none, retention alone would delete `pre`.
    let c1 = ok(belay(
        &c.addr,
        &["--target", t, "backup", "create", "--output", "json"],
    )
    .await?)
    .json()["id"]
        .as_str()
        .context("id")?
        .to_string();
    ok(belay(&c.addr, &["--target", t, "backup", "create"]).await?);

    // Locally, the history shows nothing unfinished: a dry run keeps `pre` only as the
    // newest pre-deployment backup (retention counts each kind on its own), not as
    // protected.
    let backup_dir = backups.to_string_lossy().into_owned();
    let local = belay_local(
        &db.url,
        &migrations,
        &[
            "--backup-dir",
            &backup_dir,
            "backup",
            "prune",
            "--keep",
            "0",
            "--dry-run",
        ],
    )
    .await?;
    assert!(
        local
            .stdout
            .contains(&format!("kept {pre} (latest_verified)")),
        "{local:?}"
    );

    // Through the controller, the failed deployment keeps it.
    let p = ok(belay(
        &c.addr,
        &[
            "--target", t, "backup", "prune", "--keep", "0", "--output", "json",
        ],
    )
    .await?)
    .json();
    let deleted: Vec<&str> = p["deleted"]
        .as_array()
        .context("deleted")?
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert_eq!(deleted, [c1.as_str()], "{p}");
    let kept = p["kept"]
        .as_array()
        .context("kept")?
        .iter()
        .find(|k| k["id"] == pre.as_str())
        .with_context(|| format!("pre-deployment backup kept: {p}"))?;
    assert_eq!(kept["reason"], "protected", "{p}");
    assert!(
        kept["note"]
            .as_str()
            .is_some_and(|n| n.contains(&deployment) && n.contains("failed")),
        "{p}"
    );
    assert!(backups.join(t).join(&pre).is_dir());
    // The mirror lost the pruned backup and kept the protected one.
    let ids: Vec<String> = mirror(&store, t).await?.into_iter().map(|r| r.0).collect();
    assert!(!ids.contains(&c1) && ids.contains(&pre), "{ids:?}");
    Ok(())
}

/// `(kind, scope)` of every manifest in a backup catalog directory, sorted.
fn manifest_kinds(catalog: &Path) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for target in std::fs::read_dir(catalog)? {
        for backup in std::fs::read_dir(target?.path())? {
            let manifest = backup?.path().join("manifest.json");
            if !manifest.is_file() {
                continue;
            }
            let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest)?)?;
            out.push((doc["kind"].to_string(), doc["scope"].to_string()));
        }
    }
    out.sort();
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_and_local_undo_take_the_same_kind_of_pre_undo_snapshot() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let migrations = tmp.path().join("m");
    std::fs::create_dir_all(&migrations)?;
    std::fs::write(
        migrations.join("V1__keep.sql"),
        "CREATE TABLE keep_me (id int PRIMARY KEY);\nINSERT INTO keep_me SELECT generate_series(1, 10);\n",
    )?;
    std::fs::write(migrations.join("U1__keep.sql"), "DROP TABLE keep_me;\n")?;
    let local_db = Cluster::shared().create_database().await?;
    let remote_db = Cluster::shared().create_database().await?;

    // Local: migrate, then undo, each with its default backup.
    let local_catalog = tmp.path().join("local-backups");
    let dir = local_catalog.to_string_lossy().into_owned();
    ok(belay_local(
        &local_db.url,
        &migrations,
        &["--backup-dir", &dir, "migrate"],
    )
    .await?);
    ok(belay_local(&local_db.url, &migrations, &["--backup-dir", &dir, "undo"]).await?);

    // Remote: the same through the controller and the agent, with the agent's defaults.
    let remote_catalog = tmp.path().join("remote-backups");
    let mut c = belay_e2e::controller(&tmp.path().join("c.db").to_string_lossy(), &[]).await?;
    let mut a = agent(
        tmp.path(),
        &c.addr,
        &migrations,
        &[Def {
            name: "undo_1",
            db: &remote_db,
            backup_dir: Some(&remote_catalog),
        }],
    )
    .await?;
    wait_agents(&c.addr, 1).await?;
    ok(belay(&c.addr, &["--target", "undo_1", "migrate"]).await?);
    ok(belay(&c.addr, &["--target", "undo_1", "undo"]).await?);
    assert_eq!(
        psql(&remote_db.url, "SELECT to_regclass('keep_me') IS NULL"),
        "t"
    );

    let local = manifest_kinds(&local_catalog)?;
    let remote = manifest_kinds(&remote_catalog)?;
    assert_eq!(
        local, remote,
        "local and remote runs took different backups"
    );
    assert!(
        remote
            .iter()
            .any(|(kind, scope)| kind.contains("pre_undo") && scope.contains("keep_me")),
        "no pre-undo snapshot of the dropped table: {remote:?}"
    );
    a.stop().await?;
    c.stop().await?;
    Ok(())
}
