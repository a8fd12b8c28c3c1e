//! The store's own schema and how it gets there.
//!
//! On PostgreSQL, belay migrates its store with its own engine (history in
//! `belay_store.schema_history`, tables in `belay_controller`). On SQLite, where that
//! engine does not apply, each embedded script runs in its own `BEGIN IMMEDIATE`
//! transaction together with its row in `store_schema_history`; recorded checksums must
//! match the embedded scripts, or the store is refused.

use crate::db;
use crate::error::StoreError;
use belay_core::Checksum;
use sqlx::{Row as _, SqlitePool};

/// One embedded migration script.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Script {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

pub(crate) const SQLITE: &[Script] = &[
    Script {
        version: 1,
        name: "V1__init.sql",
        sql: include_str!("../migrations/sqlite/V1__init.sql"),
    },
    Script {
        version: 2,
        name: "V2__backups.sql",
        sql: include_str!("../migrations/sqlite/V2__backups.sql"),
    },
    Script {
        version: 3,
        name: "V3__target_steps.sql",
        sql: include_str!("../migrations/sqlite/V3__target_steps.sql"),
    },
    Script {
        version: 4,
        name: "V4__rollback_requests.sql",
        sql: include_str!("../migrations/sqlite/V4__rollback_requests.sql"),
    },
];

pub(crate) const POSTGRES: &[Script] = &[
    Script {
        version: 1,
        name: "V1__init.sql",
        sql: include_str!("../migrations/postgres/V1__init.sql"),
    },
    Script {
        version: 2,
        name: "V2__backups.sql",
        sql: include_str!("../migrations/postgres/V2__backups.sql"),
    },
    Script {
        version: 3,
        name: "V3__target_steps.sql",
        sql: include_str!("../migrations/postgres/V3__target_steps.sql"),
    },
    Script {
        version: 4,
        name: "V4__rollback_requests.sql",
        sql: include_str!("../migrations/postgres/V4__rollback_requests.sql"),
    },
];

/// Where belay's engine keeps the PostgreSQL store's migration history.
pub const POSTGRES_HISTORY_SCHEMA: &str = "belay_store";
/// The PostgreSQL schema holding the store's tables.
pub const POSTGRES_SCHEMA: &str = "belay_controller";
/// The SQLite table recording applied store migrations.
pub const SQLITE_HISTORY_TABLE: &str = "store_schema_history";

const CREATE_SQLITE_HISTORY: &str = "CREATE TABLE IF NOT EXISTS store_schema_history (
    version       INTEGER NOT NULL PRIMARY KEY,
    script        TEXT    NOT NULL,
    checksum      TEXT    NOT NULL,
    installed_on  TEXT    NOT NULL
) STRICT";

pub(crate) async fn migrate_sqlite(pool: &SqlitePool, store: &str) -> Result<(), StoreError> {
    let db_err = |doing: &'static str| {
        move |e: sqlx::Error| StoreError::Database {
            store: store.to_string(),
            doing,
            reason: e.to_string(),
        }
    };
    let known = SQLITE.iter().map(|s| s.version).max().unwrap_or(0);
    for script in SQLITE {
        // Re-read the history inside each write transaction: another controller process
        // opening the same file at the same time may have applied the script meanwhile.
        let mut tx = pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_err("starting a schema migration"))?;
        sqlx::query(CREATE_SQLITE_HISTORY)
            .execute(&mut *tx)
            .await
            .map_err(db_err("creating store_schema_history"))?;
        let rows = sqlx::query("SELECT version, script, checksum FROM store_schema_history")
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err("reading store_schema_history"))?;
        let mut applied = false;
        for row in rows {
            let version: i64 = row
                .try_get("version")
                .map_err(db_err("reading store_schema_history"))?;
            let name: String = row
                .try_get("script")
                .map_err(db_err("reading store_schema_history"))?;
            let recorded: String = row
                .try_get("checksum")
                .map_err(db_err("reading store_schema_history"))?;
            let Some(embedded) = SQLITE.iter().find(|s| s.version == version) else {
                return Err(StoreError::SchemaTooNew {
                    store: store.to_string(),
                    found: version,
                    known,
                });
            };
            let expected = Checksum::of(embedded.sql.as_bytes());
            if recorded != expected.as_str() {
                return Err(StoreError::SchemaDrift {
                    store: store.to_string(),
                    script: name,
                    recorded,
                    expected: expected.to_string(),
                });
            }
            applied |= version == script.version;
        }
        if !applied {
            sqlx::raw_sql(script.sql)
                .execute(&mut *tx)
                .await
                .map_err(db_err("applying the store schema"))?;
            sqlx::query(
                "INSERT INTO store_schema_history (version, script, checksum, installed_on)
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(script.version)
            .bind(script.name)
            .bind(Checksum::of(script.sql.as_bytes()).to_string())
            .bind(db::ts_text(db::now()))
            .execute(&mut *tx)
            .await
            .map_err(db_err("recording a store schema migration"))?;
            tracing::info!(
                store,
                script = script.name,
                "applied controller store migration"
            );
        }
        tx.commit()
            .await
            .map_err(db_err("committing a schema migration"))?;
    }
    Ok(())
}

pub(crate) async fn migrate_postgres(
    url: &belay_core::DatabaseUrl,
    store: &str,
) -> Result<(), StoreError> {
    let wrap = |e: belay_migrate::MigrateError| StoreError::Migrate {
        store: store.to_string(),
        source: Box::new(e),
    };
    let open_err = |e: std::io::Error| StoreError::Open {
        store: store.to_string(),
        reason: format!("cannot stage the store's migration scripts in a temporary directory: {e}"),
    };
    // belay's engine reads migrations from a directory: stage the embedded scripts.
    let dir = tempfile::Builder::new()
        .prefix("belay-store-migrations")
        .tempdir()
        .map_err(open_err)?;
    for script in POSTGRES {
        std::fs::write(dir.path().join(script.name), script.sql).map_err(open_err)?;
    }
    let set = belay_migrate::load(dir.path()).map_err(|e| wrap(e.into()))?;
    let config = belay_migrate::ExecConfig {
        history_schema: POSTGRES_HISTORY_SCHEMA.into(),
        ..Default::default()
    };
    let report =
        belay_migrate::Migrator::new(url.clone(), set, config, belay_migrate::events::discard())
            .map_err(wrap)?
            .migrate(&belay_migrate::Target::default())
            .await
            .map_err(wrap)?;
    for step in &report.results {
        tracing::info!(store, script = %step.script, "applied controller store migration");
    }
    Ok(())
}
