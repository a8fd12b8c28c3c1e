//! The kit against real PostgreSQL.

use std::path::Path;
use std::thread;

use belay_testkit::{Cluster, dump_schema, psql};

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn parallel_clusters_get_different_ports_and_both_answer() {
    let handles: Vec<_> = (0..2)
        .map(|_| thread::spawn(|| Cluster::start().expect("start cluster")))
        .collect();
    let clusters: Vec<Cluster> = handles
        .into_iter()
        .map(|h| h.join().expect("start thread"))
        .collect();
    assert_ne!(clusters[0].port(), clusters[1].port());
    for cluster in &clusters {
        assert_ne!(
            cluster.port(),
            5432,
            "must never use the system service's port"
        );
        let port = psql(&cluster.url("postgres"), "SHOW port").expect("psql");
        assert_eq!(port.trim(), cluster.port().to_string());
        assert!(
            cluster
                .socket_dir()
                .join(format!(".s.PGSQL.{}", cluster.port()))
                .exists()
        );
    }
}

#[tokio::test]
async fn create_database_gives_distinct_usable_databases() {
    let cluster = Cluster::shared();
    let a = cluster.create_database().await.expect("first database");
    let b = cluster.create_database().await.expect("second database");
    assert_ne!(a.name, b.name);
    assert_eq!(a.url, cluster.url(&a.name));
    psql(&a.url, "CREATE TABLE only_in_a (id int)").expect("create in a");
    psql(&b.url, "CREATE TABLE only_in_b (id int)").expect("create in b");
    let tables = |url: &str| {
        psql(
            url,
            "SELECT string_agg(tablename, ',') FROM pg_tables WHERE schemaname = 'public'",
        )
        .expect("list tables")
    };
    assert_eq!(tables(&a.url).trim(), "only_in_a");
    assert_eq!(tables(&b.url).trim(), "only_in_b");

    let c = cluster.create_database_blocking().expect("blocking create");
    assert_eq!(
        psql(&c.url, "SELECT current_database()")
            .expect("psql")
            .trim(),
        c.name
    );
}

#[test]
fn shared_is_one_cluster() {
    assert!(std::ptr::eq(Cluster::shared(), Cluster::shared()));
    assert!(Cluster::shared().is_running());
}

#[test]
fn drop_stops_the_server_and_removes_its_directory() {
    let cluster = Cluster::start().expect("start cluster");
    let (pid, root) = (cluster.pid(), cluster.socket_dir().to_path_buf());
    assert!(process_exists(pid));
    assert!(root.join("data").join("PG_VERSION").exists());
    drop(cluster);
    assert!(!process_exists(pid), "postmaster {pid} still running");
    assert!(!root.exists(), "{} still exists", root.display());
}

#[test]
fn kill_and_restart_keep_committed_data() {
    let mut cluster = Cluster::start().expect("start cluster");
    let url = cluster.url("postgres");
    psql(
        &url,
        "CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)",
    )
    .expect("write");

    let old = cluster.pid();
    cluster.kill().expect("kill");
    assert!(!process_exists(old));
    assert!(!cluster.is_running());
    assert!(
        psql(&url, "SELECT 1").is_err(),
        "server still answers after kill"
    );

    cluster.restart().expect("restart after kill");
    assert_ne!(cluster.pid(), old);
    let url = cluster.url("postgres");
    assert_eq!(psql(&url, "SELECT v FROM kept").expect("read").trim(), "42");

    cluster.stop().expect("stop");
    assert!(!cluster.is_running());
    cluster.restart().expect("restart after stop");
    let url = cluster.url("postgres");
    assert_eq!(psql(&url, "SELECT v FROM kept").expect("read").trim(), "42");
}

#[tokio::test]
async fn dump_schema_is_stable_and_has_no_restrict_lines() {
    let cluster = Cluster::shared();
    let a = cluster.create_database().await.expect("database a");
    let b = cluster.create_database().await.expect("database b");
    let ddl = "CREATE TABLE t (id bigint PRIMARY KEY, v text); CREATE INDEX t_v ON t (v)";
    psql(&a.url, ddl).expect("ddl in a");
    psql(&b.url, ddl).expect("ddl in b");

    let dump_a = dump_schema(&a.url).expect("dump a");
    let dump_b = dump_schema(&b.url).expect("dump b");
    assert!(dump_a.contains("CREATE TABLE public.t"), "{dump_a}");
    assert!(
        !dump_a.lines().any(|l| l.starts_with("\\restrict")
            || l.starts_with("\\unrestrict")
            || l.starts_with("--")),
        "{dump_a}"
    );
    assert_eq!(dump_a, dump_b);
}

#[test]
fn psql_errors_carry_stderr() {
    let err = psql(
        &Cluster::shared().url("postgres"),
        "SELECT * FROM no_such_table",
    )
    .expect_err("query must fail");
    let text = err.to_string();
    assert!(text.contains("no_such_table"), "{text}");
}
