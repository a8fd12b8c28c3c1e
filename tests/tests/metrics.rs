//! The metrics that tell the truth: `docs/metrics.md`'s table against what a real agent and
//! controller expose on `/metrics`, from start-up and after deployments, against real
//! PostgreSQL.

use anyhow::{Context, Result, bail};
use belay_e2e::{Daemon, belay, controller, examples, wait_agents, wait_for};
use belay_testkit::{Cluster, TestDb};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn free_port() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

async fn scrape(addr: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: belay\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok(body.to_string())
}

/// One documented metric: its type, its label names and who exposes it.
#[derive(Debug)]
struct Documented {
    kind: String,
    labels: BTreeSet<String>,
    exposed_by: String,
}

/// The table of `docs/metrics.md`, read as a person reads it.
fn documented() -> Result<BTreeMap<String, Documented>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
    let doc = std::fs::read_to_string(&path).context("reading docs/metrics.md")?;
    let mut out = BTreeMap::new();
    for line in doc.lines().filter(|l| l.starts_with("| `belay_")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let [name, kind, labels, exposed_by, _meaning] = cells[..] else {
            bail!("docs/metrics.md: a row with other than 5 cells: {line}");
        };
        let labels = labels
            .split(',')
            .map(|l| l.trim().trim_matches('`').to_string())
            .filter(|l| !l.is_empty() && l != "—")
            .collect();
        out.insert(
            name.trim_matches('`').to_string(),
            Documented {
                kind: kind.to_string(),
                labels,
                exposed_by: exposed_by.to_string(),
            },
        );
    }
    if out.is_empty() {
        bail!("docs/metrics.md has no metrics table");
    }
    Ok(out)
}

/// What one `/metrics` page exposes: each `belay_*` metric's type and the label names of
/// its samples (a histogram's `_bucket`/`_sum`/`_count` folded into it, `le` left out).
#[derive(Debug, Default)]
struct Exposed {
    kinds: BTreeMap<String, String>,
    labels: BTreeMap<String, BTreeSet<BTreeSet<String>>>,
}

fn exposed(page: &str) -> Exposed {
    let mut e = Exposed::default();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, kind)) = rest.split_once(' ')
                && name.starts_with("belay_")
            {
                e.kinds.insert(name.to_string(), kind.to_string());
            }
            continue;
        }
        if line.starts_with('#') || !line.starts_with("belay_") {
            continue;
        }
        let series = line.rsplit_once(' ').map_or(line, |(s, _)| s);
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|b| e.kinds.get(*b).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        let keys: BTreeSet<String> = labels
            .split("\",")
            .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.trim().to_string()))
            .filter(|k| k != "le")
            .collect();
        e.labels.entry(base.to_string()).or_default().insert(keys);
    }
    e
}

/// Series whose labels name something that exists only once it ran (a backfill's name is
/// chosen when it starts): absent from start-up, and required once a backfill ran.
const LABELLED_WHEN_RUN: [&str; 3] = [
    "belay_backfill_rows_total",
    "belay_backfill_progress_ratio",
    "belay_backfill_lock_retries_total",
];

/// Compares the table with one daemon's page, listing every difference; `not_yet`: the
/// documented metrics that may be missing (nothing they count has happened).
fn differences(
    docs: &BTreeMap<String, Documented>,
    who: &str,
    page: &Exposed,
    not_yet: &[&str],
) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, d) in docs {
        let expected =
            d.exposed_by.split(", ").any(|w| w == who) && !not_yet.contains(&name.as_str());
        match (expected, page.kinds.get(name)) {
            (true, None) => problems.push(format!(
                "{name}: documented as exposed by the {who}, missing"
            )),
            (false, Some(_)) => problems.push(format!(
                "{name}: exposed by the {who}, documented as exposed by {}",
                d.exposed_by
            )),
            (true, Some(kind)) if *kind != d.kind => problems.push(format!(
                "{name}: documented as a {}, exposed as a {kind}",
                d.kind
            )),
            _ => {}
        }
        for keys in page.labels.get(name).into_iter().flatten() {
            if *keys != d.labels {
                problems.push(format!(
                    "{name}: a series labelled {keys:?}, documented labels {:?}",
                    d.labels
                ));
            }
        }
    }
    for name in page.kinds.keys() {
        if !docs.contains_key(name) {
            problems.push(format!("{name}: exposed by the {who}, not documented"));
        }
    }
    problems
}

/// The value of the sample `series` (exactly as rendered) on `page`.
fn value(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Migrations whose second script fails (a missing table), for a failed deployment.
fn failing_migrations(dir: &Path) -> Result<std::path::PathBuf> {
    let m = dir.join("failing");
    std::fs::create_dir_all(&m)?;
    std::fs::write(m.join("V1__t.sql"), "CREATE TABLE t (id int);\n")?;
    std::fs::write(
        m.join("V2__broken.sql"),
        "ALTER TABLE missing ADD COLUMN x int;\n",
    )?;
    Ok(m)
}

/// A controller and one agent with two targets, both daemons serving `/metrics`:
/// `shop` (the examples, a probe, a backup directory), `broken` (a failing migration).
struct Fleet {
    c: Daemon,
    _a: Daemon,
    cm: String,
    am: String,
}

async fn fleet(dir: &Path, shop: &TestDb, broken: &TestDb) -> Result<Fleet> {
    let (cm, am) = (free_port()?, free_port()?);
    let store = dir.join("controller.db").to_string_lossy().into_owned();
    let c = controller(&store, &["--metrics-listen", &cm]).await?;
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"agent-1\"\ncontroller = \"{}\"\n\
             \n[[targets]]\nname = \"shop\"\nurl = \"{}\"\nmigrations = \"{}\"\nbackup_dir = \"{}\"\n\
             [[targets.probes]]\nname = \"users_readable\"\nperiod = \"100ms\"\n\
             sql = {{ query = \"SELECT 0\", expect = \"zero\" }}\n\
             \n[[targets]]\nname = \"broken\"\nurl = \"{}\"\nmigrations = \"{}\"\n",
            c.addr,
            shop.url,
            examples().display(),
            dir.join("backups").display(),
            broken.url,
            failing_migrations(dir)?.display(),
        ),
    )?;
    let config = config.to_string_lossy().into_owned();
    let a = Daemon::start(
        "belay-agent",
        &[
            "--listen",
            "127.0.0.1:0",
            "--config",
            &config,
            "--metrics-listen",
            &am,
        ],
        &[],
    )
    .await?;
    wait_agents(&c.addr, 1).await?;
    Ok(Fleet { c, _a: a, cm, am })
}

#[tokio::test(flavor = "multi_thread")]
async fn the_metrics_table_is_what_the_daemons_expose() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (shop, broken) = (
        Cluster::shared().create_database().await?,
        Cluster::shared().create_database().await?,
    );
    let f = fleet(tmp.path(), &shop, &broken).await?;
    let docs = documented()?;

    // From start-up, before anything ran: every documented series is there, but for the
    // backfill series, whose labels name a backfill. The lock gauges come with the agent's
    // first lock sample, taken at start-up.
    let mut agent_page = String::new();
    wait_for("the agent's first lock sample", || {
        let am = f.am.clone();
        async move {
            Ok(value(
                &scrape(&am).await?,
                r#"belay_blocked_sessions{target="broken"}"#,
            )
            .is_some())
        }
    })
    .await?;
    for (who, addr) in [("agent", &f.am), ("controller", &f.cm)] {
        let page = scrape(addr).await?;
        let problems = differences(&docs, who, &exposed(&page), &LABELLED_WHEN_RUN);
        assert!(
            problems.is_empty(),
            "{who}:\n{}\n\n{page}",
            problems.join("\n")
        );
        if who == "agent" {
            agent_page = page;
        }
    }
    for series in [
        r#"belay_deployments_total{status="failed"}"#,
        r#"belay_migrations_total{target="shop",status="applied"}"#,
        r#"belay_validation_errors_total{target="broken",kind="postflight"}"#,
        r#"belay_backup_failures_total{target="shop"}"#,
        r#"belay_backup_last_success_timestamp_seconds{target="shop"}"#,
        r#"belay_deployment_targets{step="migrating"}"#,
        r#"belay_rollbacks_total{strategy="undo",trigger="alert",result="rolled_back"}"#,
    ] {
        assert_eq!(
            value(&agent_page, series),
            Some(0.0),
            "{series}\n{agent_page}"
        );
    }
    assert_eq!(
        value(
            &agent_page,
            r#"belay_probe_healthy{target="shop",probe="users_readable"}"#
        ),
        Some(1.0),
        "{agent_page}"
    );
    // No backup series for a target that takes none.
    assert!(!agent_page.contains(r#"belay_backup_failures_total{target="broken"}"#));

    // After deployments the pages still match the table: nothing is emitted that the
    // table does not name, with labels it does not name.
    let r = belay(
        &f.c.addr,
        &["deploy", "--targets", "shop", "--watch", "300ms"],
    )
    .await?;
    assert_eq!(r.code, 0, "{r:?}");
    let r = belay(&f.c.addr, &["deploy", "--targets", "broken"]).await?;
    assert_ne!(r.code, 0, "{r:?}");
    // A backfill run through the controller runs on the agent, which exports its series:
    // from here on every metric documented for the agent must be on its page.
    belay_testkit::psql(
        &shop.url,
        "CREATE TABLE fill (id int PRIMARY KEY, v int); INSERT INTO fill SELECT g FROM generate_series(1, 30) g",
    )?;
    let r = belay(
        &f.c.addr,
        &[
            "--target", "shop", "backfill", "--table", "fill", "--set", "v = id", "--batch", "10",
            "--name", "fill_v",
        ],
    )
    .await?;
    assert_eq!(r.code, 0, "{r:?}");
    for (who, addr) in [("agent", &f.am), ("controller", &f.cm)] {
        let page = scrape(addr).await?;
        let problems = differences(&docs, who, &exposed(&page), &[]);
        assert!(
            problems.is_empty(),
            "{who}:\n{}\n\n{page}",
            problems.join("\n")
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_deployment_end_is_counted_once_where_its_pipeline_ran() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (shop, broken) = (
        Cluster::shared().create_database().await?,
        Cluster::shared().create_database().await?,
    );
    let f = fleet(tmp.path(), &shop, &broken).await?;

    let r = belay(
        &f.c.addr,
        &["deploy", "--targets", "shop", "--watch", "300ms"],
    )
    .await?;
    assert_eq!(r.code, 0, "{r:?}");
    // A failure at migrating: the path that used to skip the count.
    let r = belay(&f.c.addr, &["deploy", "--targets", "broken"]).await?;
    assert_eq!(r.code, 1, "{r:?}");

    let agent = scrape(&f.am).await?;
    let at = |series: &str| value(&agent, series);
    assert_eq!(
        at(r#"belay_deployments_total{status="succeeded"}"#),
        Some(1.0),
        "{agent}"
    );
    assert_eq!(
        at(r#"belay_deployments_total{status="failed"}"#),
        Some(1.0),
        "{agent}"
    );
    assert_eq!(
        at(r#"belay_deployment_duration_seconds_count{status="succeeded"}"#),
        Some(1.0),
        "{agent}"
    );
    assert_eq!(
        at(r#"belay_deployment_duration_seconds_count{status="failed"}"#),
        Some(1.0),
        "{agent}"
    );
    // Both pipelines are over: no target is left counted in a step.
    for step in belay_telemetry_steps() {
        assert_eq!(
            at(&format!(r#"belay_deployment_targets{{step="{step}"}}"#)),
            Some(0.0),
            "{step}\n{agent}"
        );
    }
    // Fleet deployments are counted in the migration metrics, where they ran.
    assert_eq!(
        at(r#"belay_migrations_total{target="shop",status="applied"}"#),
        Some(4.0),
        "{agent}"
    );
    assert_eq!(
        at(r#"belay_migrations_total{target="broken",status="applied"}"#),
        Some(1.0),
        "{agent}"
    );
    assert_eq!(
        at(r#"belay_migrations_total{target="broken",status="failed"}"#),
        Some(1.0),
        "{agent}"
    );
    // The pre-deployment backup.
    assert_eq!(
        at(r#"belay_backup_duration_seconds_count{target="shop"}"#),
        Some(1.0),
        "{agent}"
    );
    assert!(
        at(r#"belay_backup_size_bytes{target="shop"}"#).is_some_and(|v| v > 0.0),
        "{agent}"
    );
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let last = at(r#"belay_backup_last_success_timestamp_seconds{target="shop"}"#)
        .context("the last backup's time")?;
    // The backup happened during this test, an hour being far more than it takes.
    assert!(
        last > started - 3600.0 && last <= started,
        "{last} vs {started}"
    );
    assert_eq!(
        at(r#"belay_backup_failures_total{target="shop"}"#),
        Some(0.0)
    );
    // The watch window's probe ran and was healthy; it is still 1 after its window.
    assert_eq!(
        at(r#"belay_probe_failures_total{target="shop",probe="users_readable"}"#),
        Some(0.0),
        "{agent}"
    );
    assert_eq!(
        at(r#"belay_probe_healthy{target="shop",probe="users_readable"}"#),
        Some(1.0),
        "{agent}"
    );

    // The controller counts none of it: a sum over both jobs counts each end once.
    let controller = scrape(&f.cm).await?;
    assert!(
        !controller.contains("belay_deployments_total"),
        "{controller}"
    );
    assert!(
        !controller.contains("belay_migrations_total"),
        "{controller}"
    );
    assert!(!controller.contains("belay_probe_"), "{controller}");
    Ok(())
}

fn belay_telemetry_steps() -> [&'static str; 7] {
    [
        "planned",
        "preflight",
        "backing_up",
        "migrating",
        "validating",
        "watching",
        "rolling_back",
    ]
}
