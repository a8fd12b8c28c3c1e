//! Backfills in remote mode: `belay --controller … --target T backfill …` through the
//! controller to the agent owning the target, which runs the batches beside the database
//! and exports `belay_backfill_*` on its `/metrics`. Real controller and agent processes,
//! the real CLI, real PostgreSQL.

use anyhow::{Context, Result};
use belay_e2e::{Daemon, belay, binary, controller, psql, wait_agents, wait_for};
use belay_testkit::{Cluster, TestDb};
use std::path::Path;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};

const ROWS: u32 = 250;

/// `orders` with `total` to fill in; every tenth row already has it (and a wrong value,
/// which `--where total IS NULL` must leave alone).
fn orders(db: &TestDb) {
    psql(
        &db.url,
        &format!(
            "CREATE TABLE orders (id bigint PRIMARY KEY, price int NOT NULL, qty int NOT NULL, total int);
             INSERT INTO orders SELECT g, g % 7 + 1, g % 5 + 1, CASE WHEN g % 10 = 0 THEN -1 END
             FROM generate_series(1, {ROWS}) g;
             ANALYZE orders;"
        ),
    );
}

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
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

fn value(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A controller and one agent (serving `/metrics` on the returned address) owning `shop`.
async fn fleet(dir: &Path, shop: &TestDb) -> Result<(Daemon, Daemon, String)> {
    let c = controller(&dir.join("controller.db").to_string_lossy(), &[]).await?;
    let m = dir.join("m");
    std::fs::create_dir_all(&m)?;
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"agent-1\"\ncontroller = \"{}\"\n\n[[targets]]\nname = \"shop\"\nurl = \"{}\"\nmigrations = \"{}\"\n",
            c.addr,
            shop.url,
            m.display()
        ),
    )?;
    let am = free_port()?;
    let a = Daemon::start(
        "belay-agent",
        &[
            "--listen",
            "127.0.0.1:0",
            "--config",
            &config.to_string_lossy(),
            "--metrics-listen",
            &am,
        ],
        &[],
    )
    .await?;
    wait_agents(&c.addr, 1).await?;
    Ok((c, a, am))
}

const SET: &str = "total = price * qty";
const WHERE: &str = "total IS NULL";

fn wrong_totals(db: &TestDb) -> String {
    psql(
        &db.url,
        "SELECT count(*) FROM orders WHERE total IS DISTINCT FROM price * qty AND total IS DISTINCT FROM -1",
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remote_backfill_runs_on_the_agent_which_counts_it_and_a_rerun_says_done() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let shop = Cluster::shared().create_database().await?;
    orders(&shop);
    let (c, _a, am) = fleet(tmp.path(), &shop).await?;
    let args = [
        "--target", "shop", "backfill", "--table", "orders", "--set", SET, "--where", WHERE,
        "--batch", "40",
    ];

    let r = belay(&c.addr, &args).await?;
    assert_eq!(r.code, 0, "{r:?}");
    // The same lines as local mode: the announcement, progress, the summary.
    assert!(
        r.stderr
            .contains("in batches of 40; progress in belay.backfill_progress"),
        "{r:?}"
    );
    assert!(r.stderr.contains(": batch 1: "), "{r:?}");
    let updated = ROWS - ROWS / 10;
    let done = format!(": done: {updated} rows updated ({ROWS} examined) in 7 batches");
    assert!(r.stdout.contains(&done), "{r:?}");
    let name = r
        .stdout
        .trim()
        .strip_prefix("backfill ")
        .and_then(|l| l.split(':').next())
        .context("the summary names the backfill")?
        .to_string();
    assert!(name.starts_with("orders_"), "{name}");
    assert_eq!(wrong_totals(&shop), "0");
    assert_eq!(
        psql(&shop.url, "SELECT count(*) FROM orders WHERE total = -1"),
        "25",
        "rows outside --where are left alone"
    );
    // Run by the agent: its session was the backfill's, in the target's history schema.
    assert_eq!(
        psql(
            &shop.url,
            &format!(
                "SELECT rows_updated, finished_at IS NOT NULL FROM belay.backfill_progress WHERE name = '{name}'"
            )
        ),
        format!("{updated}|t")
    );

    // The agent counted it, with the target beside the backfill's name.
    let page = scrape(&am).await?;
    let series = |m: &str| format!("{m}{{target=\"shop\",backfill=\"{name}\"}}");
    assert_eq!(
        value(&page, &series("belay_backfill_rows_total")),
        Some(f64::from(updated)),
        "{page}"
    );
    assert_eq!(
        value(&page, &series("belay_backfill_progress_ratio")),
        Some(1.0),
        "{page}"
    );

    // The same command again: it is done, nothing more happens.
    let r = belay(&c.addr, &args).await?;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains(&format!(
            "backfill {name} is already done: {updated} rows updated in 7 batches"
        )),
        "{r:?}"
    );
    let page = scrape(&am).await?;
    assert_eq!(
        value(&page, &series("belay_backfill_rows_total")),
        Some(f64::from(updated)),
        "a rerun counts nothing more: {page}"
    );

    // JSON, as local mode prints it.
    let mut json_args = args.to_vec();
    json_args.extend(["--output", "json"]);
    let r = belay(&c.addr, &json_args).await?;
    assert_eq!(r.code, 0, "{r:?}");
    let v = r.json();
    assert_eq!(v["name"], name.as_str());
    assert_eq!(v["done"], true);
    assert_eq!(v["rows_updated"], u64::from(updated));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_or_a_vanished_caller_stops_after_the_batch_and_the_printed_command_resumes()
-> Result<()> {
    let tmp = tempfile::tempdir()?;
    let shop = Cluster::shared().create_database().await?;
    orders(&shop);
    let (c, _a, _am) = fleet(tmp.path(), &shop).await?;
    // Batches of 10 with a pause: the run lasts long enough to be interrupted mid-way.
    let args = [
        "--controller",
        c.addr.as_str(),
        "--target",
        "shop",
        "backfill",
        "--table",
        "orders",
        "--set",
        SET,
        "--where",
        WHERE,
        "--batch",
        "10",
        "--sleep",
        "300ms",
        "--name",
        "fill_totals",
    ];
    let progress = "SELECT rows_updated, batches, finished_at IS NULL FROM belay.backfill_progress WHERE name = 'fill_totals'";

    // Ctrl-C once the first batch committed: the CLI asks the agent to stop; the batch in
    // flight commits, and the CLI prints how far it got and the resume command.
    let mut cli = tokio::process::Command::new(binary("belay")?)
        .args(args)
        .env_remove("BELAY_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stderr = BufReader::new(cli.stderr.take().context("stderr")?).lines();
    let mut seen = String::new();
    while let Some(line) = stderr.next_line().await? {
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(": batch 1: ") {
            break;
        }
    }
    assert!(seen.contains(": batch 1: "), "{seen}");
    let pid = cli.id().context("running")?;
    std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()?;
    while let Some(line) = stderr.next_line().await? {
        seen.push_str(&line);
        seen.push('\n');
    }
    let status = cli.wait().await?;
    assert_eq!(status.code(), Some(130), "{seen}");
    assert!(
        seen.contains("interrupted: the batch in flight finished; nothing is half-done"),
        "{seen}"
    );
    let resume = seen
        .lines()
        .skip_while(|l| *l != "resume with:")
        .nth(1)
        .context("a resume command")?
        .trim()
        .to_string();
    assert!(
        resume.starts_with(&format!(
            "belay --controller {} --target shop backfill --table orders",
            c.addr
        )),
        "{resume}"
    );
    let stopped = psql(&shop.url, progress);
    let (rows, rest) = stopped.split_once('|').context("a progress row")?;
    assert!(rest.ends_with("|t"), "stopped, not finished: {stopped}");
    // Nothing half-done: the recorded position is exactly what was updated.
    assert_eq!(
        psql(
            &shop.url,
            "SELECT count(*) FROM orders WHERE total = price * qty"
        ),
        rows,
        "{stopped}"
    );
    assert!(seen.contains(&format!("{rows} rows updated in")), "{seen}");

    // The caller vanishing (SIGKILL: no Ctrl-C handling at all) stops it the same way:
    // the agent sees the stream go, commits the batch in flight and stops.
    let mut cli = tokio::process::Command::new(binary("belay")?)
        .args(args)
        .env_remove("BELAY_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stderr = BufReader::new(cli.stderr.take().context("stderr")?).lines();
    let mut seen = String::new();
    while let Some(line) = stderr.next_line().await? {
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(": batch ") {
            break;
        }
    }
    assert!(
        seen.contains("resuming backfill fill_totals after key"),
        "{seen}"
    );
    cli.kill().await?;
    // Stopped: the agent's session on the database is gone, the backfill unfinished.
    wait_for("the agent to stop the backfill", || async {
        Ok(psql(
            &shop.url,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'belay-backfill' AND datname = current_database()",
        ) == "0")
    })
    .await?;
    let stopped = psql(&shop.url, progress);
    let (rows, rest) = stopped.split_once('|').context("a progress row")?;
    assert!(rest.ends_with("|t"), "stopped, not finished: {stopped}");
    assert_eq!(
        psql(
            &shop.url,
            "SELECT count(*) FROM orders WHERE total = price * qty"
        ),
        rows,
        "{stopped}"
    );

    // The printed command resumes it to the end.
    let words: Vec<String> = shell_words(&resume);
    let r = belay(
        &c.addr,
        &words[3..].iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await?;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("resuming backfill fill_totals after key"),
        "{r:?}"
    );
    assert!(
        r.stdout
            .contains("backfill fill_totals: done: 225 rows updated"),
        "{r:?}"
    );
    assert_eq!(wrong_totals(&shop), "0");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_stopping_ends_a_backfill_after_its_batch_in_flight() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let shop = Cluster::shared().create_database().await?;
    orders(&shop);
    let (c, mut a, _am) = fleet(tmp.path(), &shop).await?;
    let mut cli = tokio::process::Command::new(binary("belay")?)
        .args([
            "--controller",
            c.addr.as_str(),
            "--target",
            "shop",
            "backfill",
            "--table",
            "orders",
            "--set",
            SET,
            "--batch",
            "10",
            "--sleep",
            "300ms",
            "--name",
            "fill_totals",
        ])
        .env_remove("BELAY_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stderr = BufReader::new(cli.stderr.take().context("stderr")?).lines();
    let mut seen = String::new();
    while let Some(line) = stderr.next_line().await? {
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(": batch 1: ") {
            break;
        }
    }
    assert!(seen.contains(": batch 1: "), "{seen}");
    // SIGTERM to the agent (a restart, an upgrade): it stops the backfill between
    // batches, the stream ends with how far it got, and the agent exits cleanly.
    let (code, log) = a.stop().await?;
    assert_eq!(code, Some(0), "{log}");
    while let Some(line) = stderr.next_line().await? {
        seen.push_str(&line);
        seen.push('\n');
    }
    let status = cli.wait().await?;
    assert_eq!(status.code(), Some(130), "{seen}");
    assert!(
        seen.contains("interrupted: the batch in flight finished; nothing is half-done"),
        "{seen}"
    );
    assert!(seen.contains("resume with:"), "{seen}");
    let stopped = psql(
        &shop.url,
        "SELECT rows_updated, finished_at IS NULL FROM belay.backfill_progress WHERE name = 'fill_totals'",
    );
    let (rows, unfinished) = stopped.split_once('|').context("a progress row")?;
    assert_eq!(unfinished, "t", "stopped, not finished: {stopped}");
    assert_eq!(
        psql(
            &shop.url,
            "SELECT count(*) FROM orders WHERE total = price * qty"
        ),
        rows,
        "nothing half-done: {stopped}"
    );
    Ok(())
}

/// Splits a command printed for `sh` (bare words and single-quoted ones).
fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for ch in s.chars() {
        match ch {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_target_is_refused_naming_it_and_bad_options_change_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let shop = Cluster::shared().create_database().await?;
    orders(&shop);
    let (c, _a, _am) = fleet(tmp.path(), &shop).await?;

    let r = belay(
        &c.addr,
        &[
            "--target", "nowhere", "backfill", "--table", "orders", "--set", SET, "--batch", "10",
        ],
    )
    .await?;
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("nowhere"), "{r:?}");

    // PostgreSQL's refusal of --set, from the agent, names the option; nothing changed.
    let r = belay(
        &c.addr,
        &[
            "--target",
            "shop",
            "backfill",
            "--table",
            "orders",
            "--set",
            "total = nope",
            "--batch",
            "10",
        ],
    )
    .await?;
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("--set is not valid for"), "{r:?}");
    assert_eq!(
        psql(
            &shop.url,
            "SELECT to_regclass('belay.backfill_progress') IS NULL"
        ),
        "t",
        "refused before anything was written"
    );
    Ok(())
}
