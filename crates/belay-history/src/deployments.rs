//! The local deployment log beside the history table: `<schema>.deployments` (one row
//! per deployment of this database: how it started, where it stands, how it ended) and
//! `<schema>.deployment_events` (what happened, `seq` gap-free per deployment).
//!
//! Unlike a migration's history row, which commits or vanishes with the migration, these
//! rows are written by the deployment pipeline on a session of its own, each write one
//! short statement: a migration that fails and rolls back still leaves its attempt here.
//! The statements touch only these two tables, so they neither wait for a migration's
//! locks nor hold any a migration could wait for.

use crate::{History, HistoryError, storable_notes};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

pub const DEPLOYMENTS: &str = "deployments";
pub const DEPLOYMENT_EVENTS: &str = "deployment_events";

/// A deployment as it starts. Steps are text here: their vocabulary belongs to the
/// pipeline (`belay-deploy`), and the table holds whatever it writes.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentStart {
    pub id: Uuid,
    pub target: String,
    pub started_at: DateTime<Utc>,
    pub step: String,
    pub environment: Option<String>,
    pub requested_by: Option<String>,
    pub release: Option<String>,
    pub from_version: Option<String>,
    /// The version asked for (`None`: every pending migration).
    pub to_version: Option<String>,
    pub policy: serde_json::Value,
}

/// How a deployment ended.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentEnd {
    pub state: String,
    pub finished_at: DateTime<Utc>,
    pub failed_step: Option<String>,
    pub reason: Option<String>,
    pub evidence: serde_json::Value,
    /// The newest applied version when it ended.
    pub reached_version: Option<String>,
    pub backup_id: Option<String>,
    /// The migrations it applied (a JSON array).
    pub applied: serde_json::Value,
}

/// A stored deployment: its start, its current step, and its end once it has one.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentRow {
    pub start: DeploymentStart,
    pub end: Option<DeploymentEnd>,
    /// Events appended so far (the last `seq`).
    pub last_seq: i64,
}

/// One event to append; its `seq` comes from the table.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDeploymentEvent {
    pub deployment_id: Uuid,
    pub at: DateTime<Utc>,
    pub step: String,
    pub kind: String,
    pub message: String,
    pub payload: serde_json::Value,
    /// Moves the deployment to `step` (a step transition).
    pub moves_step: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentEventRow {
    pub deployment_id: Uuid,
    pub target: String,
    pub seq: i64,
    pub at: DateTime<Utc>,
    pub step: String,
    pub kind: String,
    pub message: String,
    pub payload: serde_json::Value,
}

/// What a prefix of a deployment id matched.
#[derive(Debug, Clone, PartialEq)]
pub enum PrefixMatch {
    None,
    One(Box<DeploymentRow>),
    /// More than one: the ids (a few of them).
    Many(Vec<Uuid>),
}

/// PostgreSQL text cannot hold NUL: it is dropped rather than failing the write.
fn text(s: &str) -> String {
    s.replace('\0', "")
}

const COLUMNS: &str = "d.id, d.target, d.started_at, d.step, d.environment, d.requested_by, \
    d.release, d.from_version, d.to_version, d.policy, d.finished_at, d.failed_step, d.reason, \
    d.evidence, d.reached_version, d.backup_id, d.applied, d.last_seq";

impl History {
    fn deployments_table(&self) -> String {
        format!("\"{}\".{DEPLOYMENTS}", self.schema)
    }

    fn events_table(&self) -> String {
        format!("\"{}\".{DEPLOYMENT_EVENTS}", self.schema)
    }

    fn log_err(&self, source: sqlx::Error) -> HistoryError {
        HistoryError::Database {
            table: format!("{}.{DEPLOYMENTS}", self.schema),
            source,
        }
    }

    /// The DDL of the deployment log's two tables (without `CREATE SCHEMA`).
    pub fn deployments_sql(&self) -> String {
        format!(
            r#"CREATE TABLE IF NOT EXISTS {deployments} (
    id              uuid        PRIMARY KEY,
    target          text        NOT NULL,
    started_at      timestamptz NOT NULL,
    step            text        NOT NULL,
    environment     text,
    requested_by    text,
    release         text,
    from_version    text,
    to_version      text,
    policy          jsonb       NOT NULL DEFAULT '{{}}',
    finished_at     timestamptz,
    failed_step     text,
    reason          text,
    evidence        jsonb,
    reached_version text,
    backup_id       text,
    applied         jsonb       NOT NULL DEFAULT '[]',
    last_seq        bigint      NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS "{DEPLOYMENTS}_started_idx" ON {deployments} (started_at DESC);
CREATE TABLE IF NOT EXISTS {events} (
    deployment_id uuid        NOT NULL REFERENCES {deployments} (id),
    seq           bigint      NOT NULL,
    at            timestamptz NOT NULL,
    step          text        NOT NULL,
    kind          text        NOT NULL,
    message       text        NOT NULL,
    payload       jsonb       NOT NULL DEFAULT '{{}}',
    PRIMARY KEY (deployment_id, seq)
);"#,
            deployments = self.deployments_table(),
            events = self.events_table(),
        )
    }

    /// Whether the deployment log's tables exist (read-only commands must not create them).
    pub async fn deployments_exist(&self, conn: &mut PgConnection) -> Result<bool, HistoryError> {
        sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL")
            .bind(self.deployments_table())
            .bind(self.events_table())
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| self.log_err(e))
    }

    /// Creates the schema and the deployment log's tables when missing. Safe without the
    /// runner lock (the pipeline records a deployment before the executor takes it): two
    /// sessions creating them at once make one fail on a catalog unique index, and that
    /// one finds them there.
    pub async fn ensure_deployments(&self, conn: &mut PgConnection) -> Result<(), HistoryError> {
        if self.deployments_exist(conn).await? {
            return Ok(());
        }
        let ddl = format!(
            "SET LOCAL lock_timeout = '10s'; CREATE SCHEMA IF NOT EXISTS \"{}\"; {}",
            self.schema,
            self.deployments_sql()
        );
        // One multi-statement query: one implicit transaction, all or nothing.
        match sqlx::raw_sql(sqlx::AssertSqlSafe(ddl))
            .execute(&mut *conn)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let raced = e
                    .as_database_error()
                    .and_then(|d| d.code())
                    .is_some_and(|c| matches!(&*c, "23505" | "42P06" | "42P07"));
                if raced && self.deployments_exist(conn).await? {
                    return Ok(());
                }
                Err(self.log_err(e))
            }
        }
    }

    /// Records a deployment's start. Its id is the primary key: recording the same
    /// deployment twice is an error, not a second row.
    pub async fn insert_deployment(
        &self,
        conn: &mut PgConnection,
        d: &DeploymentStart,
    ) -> Result<(), HistoryError> {
        let sql = format!(
            "INSERT INTO {} (id, target, started_at, step, environment, requested_by, release, \
             from_version, to_version, policy) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            self.deployments_table()
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(d.id)
            .bind(text(&d.target))
            .bind(d.started_at)
            .bind(&d.step)
            .bind(d.environment.as_deref().map(text))
            .bind(d.requested_by.as_deref().map(text))
            .bind(d.release.as_deref().map(text))
            .bind(&d.from_version)
            .bind(&d.to_version)
            .bind(sqlx::types::Json(storable_notes(&d.policy)))
            .execute(&mut *conn)
            .await
            .map_err(|e| self.log_err(e))?;
        Ok(())
    }

    /// Appends an event and returns its `seq`: one statement that bumps the deployment's
    /// `last_seq` and inserts the event with it. The row lock the bump takes orders
    /// concurrent appends to one deployment (the second waits for the first's commit, then
    /// reads its `last_seq`), and a failed insert undoes the bump: no gaps, no collisions.
    /// `None` when the deployment is not recorded.
    pub async fn append_deployment_event(
        &self,
        conn: &mut PgConnection,
        e: &NewDeploymentEvent,
    ) -> Result<Option<i64>, HistoryError> {
        let sql = format!(
            "WITH d AS (UPDATE {deployments} SET last_seq = last_seq + 1, \
                 step = CASE WHEN $7 THEN $3 ELSE step END \
               WHERE id = $1 RETURNING last_seq) \
             INSERT INTO {events} (deployment_id, seq, at, step, kind, message, payload) \
             SELECT $1, d.last_seq, $2, $3, $4, $5, $6 FROM d RETURNING seq",
            deployments = self.deployments_table(),
            events = self.events_table(),
        );
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(e.deployment_id)
            .bind(e.at)
            .bind(&e.step)
            .bind(text(&e.kind))
            .bind(text(&e.message))
            .bind(sqlx::types::Json(storable_notes(&e.payload)))
            .bind(e.moves_step)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|err| self.log_err(err))
    }

    /// Appends several events of one deployment in one statement and returns their `seq`s,
    /// in order: [`History::append_deployment_event`]'s bump, by their count, with the
    /// deployment's step moved to the last transition among them. All or none are stored.
    /// `None` when the deployment is not recorded.
    pub async fn append_deployment_events(
        &self,
        conn: &mut PgConnection,
        deployment_id: Uuid,
        events: &[NewDeploymentEvent],
    ) -> Result<Option<Vec<i64>>, HistoryError> {
        if events.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let sql = format!(
            "WITH e AS (SELECT * FROM unnest($2::timestamptz[], $3::text[], $4::text[], \
                 $5::text[], $6::jsonb[], $7::bool[]) WITH ORDINALITY \
                 AS e(at, step, kind, message, payload, moves, n)), \
             d AS (UPDATE {deployments} SET last_seq = last_seq + $8, \
                 step = coalesce((SELECT step FROM e WHERE moves ORDER BY n DESC LIMIT 1), step) \
               WHERE id = $1 RETURNING last_seq) \
             INSERT INTO {events} (deployment_id, seq, at, step, kind, message, payload) \
             SELECT $1, d.last_seq - $8 + e.n, e.at, e.step, e.kind, e.message, e.payload \
             FROM d, e RETURNING seq",
            deployments = self.deployments_table(),
            events = self.events_table(),
        );
        let count = i64::try_from(events.len()).unwrap_or(i64::MAX);
        let mut seqs: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(deployment_id)
            .bind(events.iter().map(|e| e.at).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.step.clone()).collect::<Vec<_>>())
            .bind(events.iter().map(|e| text(&e.kind)).collect::<Vec<_>>())
            .bind(events.iter().map(|e| text(&e.message)).collect::<Vec<_>>())
            .bind(
                events
                    .iter()
                    .map(|e| sqlx::types::Json(storable_notes(&e.payload)))
                    .collect::<Vec<_>>(),
            )
            .bind(events.iter().map(|e| e.moves_step).collect::<Vec<_>>())
            .bind(count)
            .fetch_all(&mut *conn)
            .await
            .map_err(|err| self.log_err(err))?;
        if seqs.is_empty() {
            return Ok(None);
        }
        seqs.sort_unstable();
        Ok(Some(seqs))
    }

    /// Records how a deployment ended; `false` when it is not recorded.
    pub async fn finish_deployment(
        &self,
        conn: &mut PgConnection,
        id: Uuid,
        end: &DeploymentEnd,
    ) -> Result<bool, HistoryError> {
        let sql = format!(
            "UPDATE {} SET step = $2, finished_at = $3, failed_step = $4, reason = $5, \
             evidence = $6, reached_version = $7, backup_id = $8, applied = $9 WHERE id = $1",
            self.deployments_table()
        );
        let done = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(&end.state)
            .bind(end.finished_at)
            .bind(&end.failed_step)
            .bind(end.reason.as_deref().map(text))
            .bind(sqlx::types::Json(storable_notes(&end.evidence)))
            .bind(&end.reached_version)
            .bind(end.backup_id.as_deref().map(text))
            .bind(sqlx::types::Json(storable_notes(&end.applied)))
            .execute(&mut *conn)
            .await
            .map_err(|e| self.log_err(e))?;
        Ok(done.rows_affected() == 1)
    }

    fn decode_deployment(&self, r: &sqlx::postgres::PgRow) -> Result<DeploymentRow, HistoryError> {
        let e = |e| self.log_err(e);
        let finished_at: Option<DateTime<Utc>> = r.try_get("finished_at").map_err(e)?;
        let step: String = r.try_get("step").map_err(e)?;
        let end = match finished_at {
            Some(finished_at) => Some(DeploymentEnd {
                state: step.clone(),
                finished_at,
                failed_step: r.try_get("failed_step").map_err(e)?,
                reason: r.try_get("reason").map_err(e)?,
                evidence: r
                    .try_get::<Option<serde_json::Value>, _>("evidence")
                    .map_err(e)?
                    .unwrap_or(serde_json::Value::Null),
                reached_version: r.try_get("reached_version").map_err(e)?,
                backup_id: r.try_get("backup_id").map_err(e)?,
                applied: r.try_get("applied").map_err(e)?,
            }),
            None => None,
        };
        Ok(DeploymentRow {
            start: DeploymentStart {
                id: r.try_get("id").map_err(e)?,
                target: r.try_get("target").map_err(e)?,
                started_at: r.try_get("started_at").map_err(e)?,
                step,
                environment: r.try_get("environment").map_err(e)?,
                requested_by: r.try_get("requested_by").map_err(e)?,
                release: r.try_get("release").map_err(e)?,
                from_version: r.try_get("from_version").map_err(e)?,
                to_version: r.try_get("to_version").map_err(e)?,
                policy: r.try_get("policy").map_err(e)?,
            },
            end,
            last_seq: r.try_get("last_seq").map_err(e)?,
        })
    }

    /// One deployment; `None` when it is not recorded (or the log does not exist yet).
    pub async fn deployment(
        &self,
        conn: &mut PgConnection,
        id: Uuid,
    ) -> Result<Option<DeploymentRow>, HistoryError> {
        if !self.deployments_exist(conn).await? {
            return Ok(None);
        }
        let sql = format!(
            "SELECT {COLUMNS} FROM {} d WHERE d.id = $1",
            self.deployments_table()
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| self.log_err(e))?;
        row.as_ref().map(|r| self.decode_deployment(r)).transpose()
    }

    /// The deployment whose id starts with `prefix` (case-insensitive; text that cannot be
    /// part of an id matches nothing).
    pub async fn deployment_by_prefix(
        &self,
        conn: &mut PgConnection,
        prefix: &str,
    ) -> Result<PrefixMatch, HistoryError> {
        let prefix = prefix.trim().to_ascii_lowercase();
        if prefix.is_empty()
            || !prefix.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
            || !self.deployments_exist(conn).await?
        {
            return Ok(PrefixMatch::None);
        }
        // Only hex digits and dashes reach LIKE: no wildcard to escape.
        let sql = format!(
            "SELECT {COLUMNS} FROM {} d WHERE d.id::text LIKE $1 || '%' ORDER BY d.started_at DESC LIMIT 5",
            self.deployments_table()
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&prefix)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| self.log_err(e))?;
        Ok(match rows.as_slice() {
            [] => PrefixMatch::None,
            [one] => PrefixMatch::One(Box::new(self.decode_deployment(one)?)),
            many => PrefixMatch::Many(
                many.iter()
                    .map(|r| r.try_get("id").map_err(|e| self.log_err(e)))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }

    /// The newest `limit` deployments, newest first, of `target` when given.
    pub async fn recent_deployments(
        &self,
        conn: &mut PgConnection,
        limit: usize,
        target: Option<&str>,
    ) -> Result<Vec<DeploymentRow>, HistoryError> {
        if !self.deployments_exist(conn).await? {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT {COLUMNS} FROM {} d WHERE $2::text IS NULL OR d.target = $2 \
             ORDER BY d.started_at DESC, d.id LIMIT $1",
            self.deployments_table()
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(target)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| self.log_err(e))?;
        rows.iter().map(|r| self.decode_deployment(r)).collect()
    }

    /// A deployment's events in `seq` order (empty when there are none or no log).
    pub async fn deployment_events(
        &self,
        conn: &mut PgConnection,
        id: Uuid,
    ) -> Result<Vec<DeploymentEventRow>, HistoryError> {
        if !self.deployments_exist(conn).await? {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT e.deployment_id, d.target, e.seq, e.at, e.step, e.kind, e.message, e.payload \
             FROM {} e JOIN {} d ON d.id = e.deployment_id \
             WHERE e.deployment_id = $1 ORDER BY e.seq",
            self.events_table(),
            self.deployments_table()
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| self.log_err(e))?;
        rows.iter()
            .map(|r| {
                let e = |e| self.log_err(e);
                Ok(DeploymentEventRow {
                    deployment_id: r.try_get(0).map_err(e)?,
                    target: r.try_get(1).map_err(e)?,
                    seq: r.try_get(2).map_err(e)?,
                    at: r.try_get(3).map_err(e)?,
                    step: r.try_get(4).map_err(e)?,
                    kind: r.try_get(5).map_err(e)?,
                    message: r.try_get(6).map_err(e)?,
                    payload: r.try_get(7).map_err(e)?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    async fn tables(conn: &mut PgConnection) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = 'belay' ORDER BY 1",
        )
        .fetch_all(conn)
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_fresh_database_gets_the_log_with_the_history_table() {
        let db = belay_testkit::Cluster::shared()
            .create_database()
            .await
            .unwrap();
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        let h = History::new("belay").unwrap();
        assert!(!h.deployments_exist(&mut conn).await.unwrap());
        assert!(
            h.recent_deployments(&mut conn, 10, None)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(tables(&mut conn).await.is_empty(), "reads create nothing");
        h.ensure_and_read(&mut conn).await.unwrap();
        assert_eq!(
            tables(&mut conn).await,
            vec!["deployment_events", "deployments", "schema_history"]
        );
        // seq is part of the key: the same seq twice for a deployment is refused.
        let id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO belay.deployments (id, target, started_at, step) VALUES ($1, 't', now(), 'planned')",
        )
        .bind(id)
        .execute(&mut conn)
        .await
        .unwrap();
        let event = "INSERT INTO belay.deployment_events (deployment_id, seq, at, step, kind, message) \
                     VALUES ($1, 1, now(), 'planned', 'x', 'x')";
        sqlx::query(event)
            .bind(id)
            .execute(&mut conn)
            .await
            .unwrap();
        assert!(
            sqlx::query(event)
                .bind(id)
                .execute(&mut conn)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn an_older_belay_schema_gains_the_log_and_keeps_its_rows() {
        let db = belay_testkit::Cluster::shared()
            .create_database()
            .await
            .unwrap();
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        let h = History::new("belay").unwrap();
        // The schema as a belay before the log created it, with a row in it.
        let old = h.create_sql().replace(&h.deployments_sql(), "");
        sqlx::raw_sql(sqlx::AssertSqlSafe(old))
            .execute(&mut conn)
            .await
            .unwrap();
        let dep = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO belay.schema_history (version, description, type, script, checksum, \
             success, deployment_id, backup_id, state, installed_on) \
             VALUES ('1', 'old', 'SQL', 'V1__old.sql', 'abc', true, $1, 'b-1', 'success', '2024-01-02T03:04:05Z')",
        )
        .bind(dep)
        .execute(&mut conn)
        .await
        .unwrap();
        let before: String = sqlx::query_scalar(
            "SELECT string_agg(to_jsonb(h)::text, ',') FROM belay.schema_history h",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(tables(&mut conn).await, vec!["schema_history"]);
        // Reading neither creates the log nor fails on its absence.
        assert_eq!(h.rows(&mut conn).await.unwrap().len(), 1);
        assert!(h.deployment(&mut conn, dep).await.unwrap().is_none());
        assert!(
            h.deployment_events(&mut conn, dep)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(tables(&mut conn).await, vec!["schema_history"]);
        // The runner's ensure adds it.
        let rows = h.ensure_and_read(&mut conn).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            tables(&mut conn).await,
            vec!["deployment_events", "deployments", "schema_history"]
        );
        let after: String = sqlx::query_scalar(
            "SELECT string_agg(to_jsonb(h)::text, ',') FROM belay.schema_history h",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(before, after, "the history rows are untouched");
        // Ensuring again (or from the log's side) changes nothing.
        h.ensure_and_read(&mut conn).await.unwrap();
        h.ensure_deployments(&mut conn).await.unwrap();
    }

    /// A database with the deployment log's tables in `schema`.
    async fn log_db(schema: &str) -> (belay_testkit::TestDb, PgConnection, History) {
        let db = belay_testkit::Cluster::shared()
            .create_database()
            .await
            .unwrap();
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        let h = History::new(schema).unwrap();
        h.ensure_deployments(&mut conn).await.unwrap();
        (db, conn, h)
    }

    #[tokio::test]
    async fn a_batch_of_events_takes_the_next_seqs_in_order_and_moves_the_step() {
        let (_db, mut conn, h) = log_db("belay").await;
        let at: DateTime<Utc> = "2026-01-02T03:04:05Z".parse().unwrap();
        let start = DeploymentStart {
            id: Uuid::new_v4(),
            target: "shop".into(),
            started_at: at,
            step: "planned".into(),
            environment: None,
            requested_by: None,
            release: None,
            from_version: None,
            to_version: None,
            policy: serde_json::json!({}),
        };
        h.insert_deployment(&mut conn, &start).await.unwrap();
        let event = |step: &str, moves_step, message: &str| NewDeploymentEvent {
            deployment_id: start.id,
            at,
            step: step.into(),
            kind: if moves_step {
                "transition"
            } else {
                "migration"
            }
            .into(),
            message: message.into(),
            payload: serde_json::json!({ "m": message }),
            moves_step,
        };
        assert_eq!(
            h.append_deployment_event(&mut conn, &event("backing_up", true, "one"))
                .await
                .unwrap(),
            Some(1)
        );
        let batch = [
            event("migrating", true, "two"),
            event("migrating", false, "three\0"),
            event("validating", true, "four"),
            event("validating", false, "five"),
        ];
        assert_eq!(
            h.append_deployment_events(&mut conn, start.id, &batch)
                .await
                .unwrap(),
            Some(vec![2, 3, 4, 5])
        );
        assert_eq!(
            h.append_deployment_events(&mut conn, start.id, &[])
                .await
                .unwrap(),
            Some(vec![])
        );
        assert_eq!(
            h.append_deployment_events(&mut conn, Uuid::new_v4(), &batch)
                .await
                .unwrap(),
            None,
            "no deployment, nothing stored"
        );
        let row = h.deployment(&mut conn, start.id).await.unwrap().unwrap();
        assert_eq!((row.start.step.as_str(), row.last_seq), ("validating", 5));
        let events = h.deployment_events(&mut conn, start.id).await.unwrap();
        assert_eq!(
            events
                .iter()
                .map(|e| (e.seq, e.step.as_str(), e.message.as_str()))
                .collect::<Vec<_>>(),
            vec![
                (1, "backing_up", "one"),
                (2, "migrating", "two"),
                (3, "migrating", "three"),
                (4, "validating", "four"),
                (5, "validating", "five"),
            ]
        );
        assert_eq!(events[4].payload["m"], "five");
        // The next single append follows the batch.
        assert_eq!(
            h.append_deployment_event(&mut conn, &event("validating", false, "six"))
                .await
                .unwrap(),
            Some(6)
        );
    }

    #[tokio::test]
    async fn deployments_and_events_round_trip() {
        let (_db, mut conn, h) = log_db("ops").await;
        let at: DateTime<Utc> = "2026-01-02T03:04:05Z".parse().unwrap();
        let start = DeploymentStart {
            id: Uuid::new_v4(),
            target: "shop".into(),
            started_at: at,
            step: "planned".into(),
            environment: Some("staging".into()),
            requested_by: Some("alice".into()),
            release: Some("1.6.0".into()),
            from_version: Some("3".into()),
            to_version: None,
            policy: serde_json::json!({ "watch": "5m" }),
        };
        h.insert_deployment(&mut conn, &start).await.unwrap();
        assert!(
            h.insert_deployment(&mut conn, &start).await.is_err(),
            "one row per id"
        );
        let event = |step: &str, moves_step| NewDeploymentEvent {
            deployment_id: start.id,
            at,
            step: step.into(),
            kind: if moves_step {
                "transition"
            } else {
                "migration"
            }
            .into(),
            message: "it's a \0test".into(),
            payload: serde_json::json!({ "error": "V2__x.sql:3: boom\0" }),
            moves_step,
        };
        assert_eq!(
            h.append_deployment_event(&mut conn, &event("migrating", true))
                .await
                .unwrap(),
            Some(1)
        );
        assert_eq!(
            h.append_deployment_event(&mut conn, &event("migrating", false))
                .await
                .unwrap(),
            Some(2)
        );
        let unknown = NewDeploymentEvent {
            deployment_id: Uuid::new_v4(),
            ..event("migrating", false)
        };
        assert_eq!(
            h.append_deployment_event(&mut conn, &unknown)
                .await
                .unwrap(),
            None
        );
        let row = h.deployment(&mut conn, start.id).await.unwrap().unwrap();
        assert_eq!(
            row.start.step, "migrating",
            "a transition moves the deployment"
        );
        assert_eq!((row.end.clone(), row.last_seq), (None, 2));
        let end = DeploymentEnd {
            state: "failed".into(),
            finished_at: at,
            failed_step: Some("migrating".into()),
            reason: Some("V2__x.sql failed".into()),
            evidence: serde_json::json!({ "error": "boom" }),
            reached_version: Some("3".into()),
            backup_id: Some("b-7".into()),
            applied: serde_json::json!([]),
        };
        assert!(
            h.finish_deployment(&mut conn, start.id, &end)
                .await
                .unwrap()
        );
        assert!(
            !h.finish_deployment(&mut conn, unknown.deployment_id, &end)
                .await
                .unwrap()
        );
        let row = h.deployment(&mut conn, start.id).await.unwrap().unwrap();
        assert_eq!(
            row.start,
            DeploymentStart {
                step: "failed".into(),
                ..start.clone()
            }
        );
        assert_eq!(row.end, Some(end));
        let events = h.deployment_events(&mut conn, start.id).await.unwrap();
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(events[1].target, "shop");
        assert_eq!(events[1].message, "it's a test", "NUL dropped, not refused");
        assert_eq!(events[1].payload["error"], "V2__x.sql:3: boom");
        let prefix = &start.id.to_string()[..8];
        assert!(matches!(
            h.deployment_by_prefix(&mut conn, &prefix.to_uppercase()).await.unwrap(),
            PrefixMatch::One(d) if d.start.id == start.id
        ));
        for nothing in ["", "zz", "%", "_"] {
            assert_eq!(
                h.deployment_by_prefix(&mut conn, nothing).await.unwrap(),
                PrefixMatch::None,
                "{nothing:?}"
            );
        }
        assert_eq!(
            h.recent_deployments(&mut conn, 5, Some("shop"))
                .await
                .unwrap()
                .len(),
            1
        );
        assert!(
            h.recent_deployments(&mut conn, 5, Some("other"))
                .await
                .unwrap()
                .is_empty()
        );
    }
}
