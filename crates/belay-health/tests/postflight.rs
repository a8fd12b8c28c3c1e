//! Postflight validation against a real PostgreSQL.

// Test helpers unwrap: a panic is the report.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use belay_health::{
    CheckResult, CheckStatus, Expectation, MigrationSummary, PostflightSpec, Severity, SmokeQuery,
    UserCheck, VerifyScript, any_blocks, postflight,
};
use belay_testkit::{Cluster, TestDb};
use sqlx::{Connection, PgConnection};

async fn fixture() -> (TestDb, PgConnection) {
    let db = Cluster::shared().create_database().await.unwrap();
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE users (id serial PRIMARY KEY, email text);
         CREATE TABLE orders (id serial PRIMARY KEY, user_id int, amount numeric(10,2));
         INSERT INTO users (email) SELECT 'u' || g || '@example.com' FROM generate_series(1, 50) g;
         INSERT INTO orders (user_id, amount) SELECT 1 + g % 50, g FROM generate_series(1, 100) g;",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    (db, conn)
}

fn get<'a>(results: &'a [CheckResult], name: &str) -> &'a CheckResult {
    results
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no {name} in {results:#?}"))
}

fn check(name: &str, query: &str, expect: Expectation) -> UserCheck {
    UserCheck {
        name: name.into(),
        query: query.into(),
        expect,
    }
}

#[tokio::test]
async fn a_clean_database_passes() {
    let (_db, mut conn) = fixture().await;
    let spec = PostflightSpec {
        checks: vec![
            check(
                "no_null_emails",
                "SELECT count(*) FROM users WHERE email IS NULL",
                Expectation::Zero,
            ),
            check(
                "user_count",
                "SELECT count(*) FROM users",
                Expectation::Equals(50),
            ),
            check(
                "big_orders",
                "SELECT count(*) FROM orders WHERE amount > 90",
                Expectation::AtMost(10),
            ),
            check(
                "no_orphans",
                "SELECT o.id FROM orders o LEFT JOIN users u ON u.id = o.user_id WHERE u.id IS NULL",
                Expectation::NoRows,
            ),
        ],
        smoke: vec![SmokeQuery::new(
            "orders_readable",
            "SELECT * FROM orders ORDER BY id LIMIT 5",
        )],
        verify_scripts: vec![VerifyScript::from((
            PathBuf::from("migrations/V2__emails/verify.sql"),
            "SELECT id FROM users WHERE email NOT LIKE '%@%';\nSELECT 1 WHERE false;".to_string(),
        ))],
        history: Some(MigrationSummary::default()),
        ..PostflightSpec::default()
    };
    let results = postflight(&mut conn, &spec).await.unwrap();
    for r in &results {
        assert_eq!(r.status, CheckStatus::Pass, "{r:?}");
    }
    assert_eq!(results.len(), 3 + 4 + 1 + 1);
    assert!(!any_blocks(&results));
}

#[tokio::test]
async fn catches_an_invalid_index_left_by_a_failed_concurrent_build() {
    let (_db, mut conn) = fixture().await;
    sqlx::raw_sql("UPDATE users SET email = 'dup@example.com' WHERE id IN (1, 2)")
        .execute(&mut conn)
        .await
        .unwrap();
    let err = sqlx::raw_sql("CREATE UNIQUE INDEX CONCURRENTLY users_email_key ON users (email)")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("could not create unique index"),
        "{err}"
    );
    let results = postflight(&mut conn, &PostflightSpec::default())
        .await
        .unwrap();
    let r = get(&results, "invalid_indexes");
    assert_eq!(r.status, CheckStatus::Block);
    assert!(r.value.contains("users_email_key on users"), "{r:?}");
    assert!(r.query.as_deref().unwrap().contains("indisvalid"), "{r:?}");
    assert!(r.remedy.contains("DROP INDEX CONCURRENTLY"), "{r:?}");
    assert_eq!(
        get(&results, "not_valid_constraints").status,
        CheckStatus::Pass
    );
}

#[tokio::test]
async fn catches_a_not_valid_constraint() {
    let (_db, mut conn) = fixture().await;
    sqlx::raw_sql(
        "ALTER TABLE orders ADD CONSTRAINT orders_amount_positive CHECK (amount > 0) NOT VALID;
         ALTER TABLE orders ADD CONSTRAINT orders_user_fk FOREIGN KEY (user_id) REFERENCES users (id) NOT VALID;
         ALTER TABLE orders VALIDATE CONSTRAINT orders_user_fk;",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let results = postflight(&mut conn, &PostflightSpec::default())
        .await
        .unwrap();
    let r = get(&results, "not_valid_constraints");
    assert_eq!(r.status, CheckStatus::Block);
    assert!(
        r.value.contains("orders_amount_positive on orders: CHECK"),
        "{r:?}"
    );
    assert!(!r.value.contains("orders_user_fk"), "validated: {r:?}");
    assert!(r.remedy.contains("VALIDATE CONSTRAINT"), "{r:?}");

    let lenient = PostflightSpec {
        not_valid_constraints: Severity::Warn,
        ..PostflightSpec::default()
    };
    let results = postflight(&mut conn, &lenient).await.unwrap();
    assert_eq!(
        get(&results, "not_valid_constraints").status,
        CheckStatus::Warn
    );
}

#[tokio::test]
async fn failing_user_assertions_name_the_query_and_the_value() {
    let (_db, mut conn) = fixture().await;
    sqlx::raw_sql("INSERT INTO users (email) VALUES (NULL), (NULL)")
        .execute(&mut conn)
        .await
        .unwrap();
    let null_query = "SELECT count(*) FROM users WHERE email IS NULL";
    let spec = PostflightSpec {
        checks: vec![
            check("no_null_emails", null_query, Expectation::Zero),
            check("few_nulls", null_query, Expectation::AtMost(1)),
            check(
                "user_count",
                "SELECT count(*) FROM users",
                Expectation::Equals(50),
            ),
            check(
                "broken",
                "SELECT count(*) FROM no_such_table",
                Expectation::Zero,
            ),
        ],
        smoke: vec![SmokeQuery::new(
            "old_column_gone",
            "SELECT legacy_name FROM users LIMIT 1",
        )],
        ..PostflightSpec::default()
    };
    let results = postflight(&mut conn, &spec).await.unwrap();
    let r = get(&results, "no_null_emails");
    assert_eq!(r.status, CheckStatus::Block);
    assert_eq!(r.value, "got 1 row, first value 2");
    assert_eq!(r.threshold, "expect = 0");
    assert_eq!(r.query.as_deref(), Some(null_query));
    assert_eq!(get(&results, "few_nulls").status, CheckStatus::Block);
    let r = get(&results, "user_count");
    assert_eq!(
        (r.status, r.value.as_str()),
        (CheckStatus::Block, "got 1 row, first value 52")
    );
    let r = get(&results, "broken");
    assert_eq!(r.status, CheckStatus::Block);
    assert!(r.value.contains("no_such_table"), "{r:?}");
    let r = get(&results, "old_column_gone");
    assert_eq!(r.status, CheckStatus::Block);
    assert!(r.value.contains("legacy_name"), "{r:?}");
}

#[tokio::test]
async fn failing_verify_scripts_block() {
    let (_db, mut conn) = fixture().await;
    sqlx::raw_sql("UPDATE users SET email = 'not-an-address' WHERE id = 7")
        .execute(&mut conn)
        .await
        .unwrap();
    let spec = PostflightSpec {
        verify_scripts: vec![
            VerifyScript::from((
                PathBuf::from("V3__emails/verify.sql"),
                "SELECT id, email FROM users WHERE email NOT LIKE '%@%'".to_string(),
            )),
            VerifyScript::from((
                PathBuf::from("V4__orders/verify.sql"),
                "DO $$ BEGIN IF (SELECT count(*) FROM orders) < 1000 THEN
                   RAISE EXCEPTION 'orders were lost: %', (SELECT count(*) FROM orders);
                 END IF; END $$;"
                    .to_string(),
            )),
        ],
        history: Some(MigrationSummary {
            pending: 0,
            failed: vec!["4".into()],
            drift: vec![],
            lock_tables: vec![],
        }),
        ..PostflightSpec::default()
    };
    let results = postflight(&mut conn, &spec).await.unwrap();
    let r = get(&results, "verify:V3__emails/verify.sql");
    assert_eq!(r.status, CheckStatus::Block);
    assert!(
        r.value
            .contains("V3__emails/verify.sql returned 1 row, first value 7"),
        "{r:?}"
    );
    let r = get(&results, "verify:V4__orders/verify.sql");
    assert_eq!(r.status, CheckStatus::Block);
    assert!(r.value.contains("orders were lost: 100"), "{r:?}");
    assert_eq!(get(&results, "history").status, CheckStatus::Block);
}

#[tokio::test]
async fn postflight_never_changes_the_database() {
    let (_db, mut conn) = fixture().await;
    let spec = PostflightSpec {
        smoke: vec![SmokeQuery::new(
            "can_insert",
            "INSERT INTO users (email) VALUES ('smoke@example.com') RETURNING id",
        )],
        checks: vec![check(
            "sneaky",
            "DELETE FROM orders RETURNING id",
            Expectation::AtMost(1000),
        )],
        ..PostflightSpec::default()
    };
    let results = postflight(&mut conn, &spec).await.unwrap();
    assert_eq!(get(&results, "can_insert").status, CheckStatus::Pass);
    let (users, orders): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM orders)")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!((users, orders), (50, 100));

    // A query past the statement timeout fails instead of hanging postflight.
    let slow = PostflightSpec {
        smoke: vec![SmokeQuery::new("slow", "SELECT pg_sleep(5)")],
        statement_timeout: std::time::Duration::from_millis(100),
        ..PostflightSpec::default()
    };
    let results = postflight(&mut conn, &slow).await.unwrap();
    let r = get(&results, "slow");
    assert_eq!(r.status, CheckStatus::Block);
    assert!(r.value.contains("statement timeout"), "{r:?}");

    let dup = PostflightSpec {
        checks: vec![check("invalid_indexes", "SELECT 1", Expectation::NoRows)],
        ..PostflightSpec::default()
    };
    assert!(postflight(&mut conn, &dup).await.is_err());
}

#[tokio::test]
async fn a_smoke_query_that_reads_nothing_blocks_unless_it_says_so() {
    let (_db, mut conn) = fixture().await;
    let gone = "SELECT id FROM users WHERE email = 'ceo@example.com'";
    let spec = PostflightSpec {
        smoke: vec![
            SmokeQuery::new("ceo_can_log_in", gone),
            SmokeQuery {
                allow_no_rows: true,
                ..SmokeQuery::new("lookup_runs", gone)
            },
            SmokeQuery::new("users_readable", "SELECT id FROM users LIMIT 1"),
        ],
        ..PostflightSpec::default()
    };
    let results = postflight(&mut conn, &spec).await.unwrap();
    let r = get(&results, "ceo_can_log_in");
    assert_eq!(r.status, CheckStatus::Block, "{r:?}");
    assert_eq!(r.value, "succeeded but returned no rows");
    assert_eq!(r.threshold, "succeeds with at least 1 row");
    assert!(r.remedy.contains("allow_no_rows = true"), "{r:?}");
    let r = get(&results, "lookup_runs");
    assert_eq!(
        (r.status, r.threshold.as_str()),
        (CheckStatus::Pass, "succeeds (any number of rows)")
    );
    assert_eq!(get(&results, "users_readable").status, CheckStatus::Pass);

    // From TOML: the default is the strict one.
    let toml: PostflightSpec =
        toml::from_str("[[smoke]]\nname = \"a\"\nquery = \"SELECT 1\"\n").unwrap();
    assert!(!toml.smoke[0].allow_no_rows);
}

/// PostgreSQL's error carries the line of its own C source that raised it (sqlx prints
/// it as "at line 1392"); what a user needs is where in the query the error is.
#[tokio::test]
async fn a_failed_query_names_its_own_line_and_column_not_postgres_source_line() {
    let (_db, mut conn) = fixture().await;
    let spec = PostflightSpec {
        checks: vec![check(
            "two_lines",
            "SELECT count(*)\n  FROM no_such_table",
            Expectation::Zero,
        )],
        smoke: vec![SmokeQuery::new("one_line", "SELECT nope FROM users")],
        ..PostflightSpec::default()
    };
    let results = postflight(&mut conn, &spec).await.unwrap();
    let r = get(&results, "two_lines");
    assert_eq!(
        r.value,
        "query failed: relation \"no_such_table\" does not exist (line 2, column 8 of the query)"
    );
    let r = get(&results, "one_line");
    assert_eq!(
        r.value,
        "query failed: column \"nope\" does not exist (line 1, column 8 of the query)"
    );
}
