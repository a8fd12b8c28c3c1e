//! `belay locks`: the live lock monitor (`belay_locks::LockMonitorApi`, local or remote
//! alike) rendered as text or JSON.

use crate::Failure;
use crate::cli::Output;
use belay_core::{DatabaseUrl, parse_duration};
use belay_locks::{
    LocalLocks, LockMonitorApi, LockNode, LockSnapshot, MonitorOptions, SessionInfo,
    SnapshotOptions,
};
use clap::Args;
use std::time::Duration;
use tokio_stream::StreamExt;

#[derive(Debug, Clone, Args)]
pub struct LocksArgs {
    /// Keep sampling every --period and print each snapshot until Ctrl-C (with --output
    /// json: one JSON object per line)
    #[arg(long)]
    pub watch: bool,
    /// Time between samples with --watch. Each sample is one catalog query; a new lock wait
    /// is reported at once whatever the period (a probe looks for one every 20 ms)
    #[arg(long, value_name = "DURATION", default_value = "200ms")]
    pub period: String,
    /// With --watch: stop after printing N snapshots [default: until Ctrl-C]
    #[arg(long, value_name = "N", requires = "watch")]
    pub count: Option<u64>,
    /// Leave out blocking trees whose longest wait is shorter than this [default: 0, every
    /// tree]
    #[arg(long, value_name = "DURATION")]
    pub min_wait: Option<String>,
    /// Report active queries running at least this long [default: 5min]
    #[arg(long, value_name = "DURATION")]
    pub long_running: Option<String>,
    /// Report sessions idle in a transaction at least this long [default: 1min]
    #[arg(long, value_name = "DURATION")]
    pub idle_in_transaction: Option<String>,
    /// Show trees and sessions of every database of the server, not only the target's
    #[arg(long)]
    pub all_databases: bool,
}

fn duration(flag: &str, v: &str) -> Result<Duration, Failure> {
    parse_duration(v).map_err(|e| crate::usage(anyhow::anyhow!("--{flag}: {e}")))
}

fn options(args: &LocksArgs) -> Result<MonitorOptions, Failure> {
    let mut o = SnapshotOptions::default();
    if let Some(v) = &args.min_wait {
        o.min_wait = duration("min-wait", v)?;
    }
    if let Some(v) = &args.long_running {
        o.long_running = duration("long-running", v)?;
    }
    if let Some(v) = &args.idle_in_transaction {
        o.idle_in_transaction = duration("idle-in-transaction", v)?;
    }
    let period = duration("period", &args.period)?;
    if period.is_zero() {
        return Err(crate::usage(anyhow::anyhow!(
            "--period must be greater than zero"
        )));
    }
    if args.count == Some(0) {
        return Err(crate::usage(anyhow::anyhow!("--count must be at least 1")));
    }
    Ok(MonitorOptions {
        snapshot: o,
        all_databases: args.all_databases,
        period,
    })
}

/// Local mode: the one target at `url`.
pub async fn run_local(args: &LocksArgs, url: &DatabaseUrl, output: Output) -> Result<u8, Failure> {
    const TARGET: &str = "local";
    let api = LocalLocks::new([(TARGET.to_string(), url.clone())]);
    run(args, &api, TARGET, output).await
}

pub async fn run(
    args: &LocksArgs,
    api: &dyn LockMonitorApi,
    target: &str,
    output: Output,
) -> Result<u8, Failure> {
    let opts = options(args)?;
    if !args.watch {
        let snap = api.snapshot(target, &opts).await?;
        print(output, &snap, &opts.snapshot, false);
        return Ok(0);
    }
    let mut stream = api.watch(target, &opts).await?;
    let mut shown = 0;
    // A stream that ends right after an error ended because of it (a remote monitor lost).
    let mut last_error = None;
    // Listening from here on, not anew each turn: a Ctrl-C while a snapshot prints would
    // otherwise be swallowed (the handler is installed, so it no longer stops the process).
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(0),
            next = stream.next() => match next {
                None => return last_error.map_or(Ok(0), |e| Err(Failure::from(e))),
                Some(Ok(snap)) => {
                    last_error = None;
                    print(output, &snap, &opts.snapshot, true);
                    shown += 1;
                    if args.count.is_some_and(|n| shown >= n) {
                        return Ok(0);
                    }
                }
                Some(Err(e)) => {
                    eprintln!("error: {}", belay_core::redact_url(&e.message));
                    last_error = Some(e);
                }
            },
        }
    }
}

fn print(output: Output, s: &LockSnapshot, opts: &SnapshotOptions, watching: bool) {
    match output {
        Output::Json => println!("{}", serde_json::to_string(s).unwrap_or_default()),
        Output::Text => {
            if watching {
                println!("── {} ──", s.at.format("%Y-%m-%d %H:%M:%S%.3f UTC"));
            }
            print!("{}", text(s, opts));
        }
    }
}

/// `1.2s`, `340ms`, `3min 05s`, `2h 10min`.
fn human(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}min {:02}s", ms / 60_000, (ms % 60_000) / 1000),
        _ => format!("{}h {:02}min", ms / 3_600_000, (ms % 3_600_000) / 60_000),
    }
}

/// A query on one line, at most `max` characters.
fn excerpt(q: &str, max: usize) -> String {
    let one: String = q.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.chars().count() <= max {
        one
    } else {
        format!("{}…", one.chars().take(max).collect::<String>())
    }
}

fn who(user: Option<&str>, app: Option<&str>) -> String {
    let mut s = format!("user={}", user.unwrap_or("?"));
    if let Some(a) = app.filter(|a| !a.is_empty()) {
        s.push_str(&format!(" app={a}"));
    }
    s
}

fn node_line(n: &LockNode) -> String {
    let mut parts = vec![
        format!("pid {}", n.pid),
        who(n.user.as_deref(), n.application.as_deref()),
    ];
    if let Some(st) = &n.state {
        parts.push(st.clone());
    }
    if let Some(w) = &n.wait_event {
        parts.push(format!("wait {w}"));
    }
    let object = n
        .relation
        .clone()
        .or_else(|| n.lock_type.clone())
        .unwrap_or_else(|| "?".into());
    match (n.waiting_ms, &n.mode) {
        (Some(ms), Some(mode)) => parts.push(format!("waits {} for {mode} on {object}", human(ms))),
        (Some(ms), None) => parts.push(format!("waits {} on {object}", human(ms))),
        (None, Some(mode)) => parts.push(format!("holds {mode} on {object}")),
        (None, None) => {}
    }
    if let Some(x) = n.xact_ms {
        parts.push(format!("transaction open {}", human(x)));
    }
    if n.in_cycle {
        parts.push("in a deadlock cycle".into());
    }
    parts.join(" · ")
}

fn draw(n: &LockNode, prefix: &str, last: bool, root: bool, out: &mut String) {
    let (branch, child_prefix) = if root {
        (String::new(), String::new())
    } else if last {
        (format!("{prefix}└─ "), format!("{prefix}   "))
    } else {
        (format!("{prefix}├─ "), format!("{prefix}│  "))
    };
    out.push_str(&format!("{branch}{}\n", node_line(n)));
    let bar = if n.children.is_empty() {
        "   "
    } else {
        "│  "
    };
    if let Some(q) = n.query.as_deref().filter(|q| !q.trim().is_empty()) {
        out.push_str(&format!("{child_prefix}{bar}query: {}\n", excerpt(q, 120)));
    }
    for (i, c) in n.children.iter().enumerate() {
        draw(c, &child_prefix, i + 1 == n.children.len(), false, out);
    }
}

fn session_line(s: &SessionInfo, how_long: Option<u64>, what: &str) -> String {
    let mut parts = vec![
        format!("pid {}", s.pid),
        who(s.user.as_deref(), s.application.as_deref()),
    ];
    if let Some(db) = &s.database {
        parts.push(format!("db={db}"));
    }
    if let Some(a) = &s.client_addr {
        parts.push(format!("from {a}"));
    }
    if let Some(w) = &s.wait_event {
        parts.push(format!("wait {w}"));
    }
    if let Some(ms) = how_long {
        parts.push(format!("{what} {}", human(ms)));
    }
    let mut line = parts.join(" · ");
    if let Some(q) = s.query.as_deref().filter(|q| !q.trim().is_empty()) {
        line.push_str(&format!("\n      query: {}", excerpt(q, 120)));
    }
    line
}

/// The snapshot for people: blocking trees, then long-running queries, sessions idle in a
/// transaction and replication lag.
pub fn text(s: &LockSnapshot, opts: &SnapshotOptions) -> String {
    let fmt = belay_core::format_duration;
    let mut out = String::new();
    if s.trees.is_empty() {
        out.push_str("blocking trees: none\n");
    } else {
        out.push_str(&format!(
            "blocking trees: {} ({} session(s) waiting, longest wait {})\n",
            s.trees.len(),
            s.waiting_count(),
            human(s.longest_wait_ms())
        ));
        for t in &s.trees {
            draw(t, "", true, true, &mut out);
        }
    }
    for p in &s.pending_ddl {
        out.push_str(&format!(
            "belay's pending DDL: migration pid {} is between attempts, waiting for {} session(s) its last attempt was blocked by:\n",
            p.migration_pid,
            p.blockers.len()
        ));
        for b in &p.blockers {
            let what = match &b.session.state {
                Some(st) => format!("{st}, transaction open"),
                None => "transaction open".to_string(),
            };
            let mut line = session_line(&b.session, b.session.xact_ms, &what);
            if let Some(h) = &b.holds {
                line.push_str(&format!("\n      holds: {h}"));
            }
            out.push_str(&format!("  {line}\n"));
        }
    }
    let section = |out: &mut String,
                   title: String,
                   rows: &[SessionInfo],
                   pick: &dyn Fn(&SessionInfo) -> Option<u64>,
                   what: &str| {
        if rows.is_empty() {
            out.push_str(&format!("{title}: none\n"));
        } else {
            out.push_str(&format!("{title}: {}\n", rows.len()));
            for r in rows {
                out.push_str(&format!("  {}\n", session_line(r, pick(r), what)));
            }
        }
    };
    section(
        &mut out,
        format!("long-running queries (over {})", fmt(opts.long_running)),
        &s.long_running,
        &|r| r.query_ms,
        "running",
    );
    section(
        &mut out,
        format!(
            "idle in transaction (over {})",
            fmt(opts.idle_in_transaction)
        ),
        &s.idle_in_transaction,
        &|r| r.state_ms,
        "idle",
    );
    if s.replication.is_empty() {
        out.push_str("replication: no streaming replicas\n");
    } else {
        out.push_str(&format!(
            "replication: {} replica(s)\n",
            s.replication.len()
        ));
        for r in &s.replication {
            let lag = |v: Option<u64>| v.map_or_else(|| "-".to_string(), human);
            out.push_str(&format!(
                "  pid {} · {} · {} · {} · write {} · flush {} · replay {}{}\n",
                r.pid,
                r.application.as_deref().unwrap_or("?"),
                r.client_addr.as_deref().unwrap_or("local"),
                [r.state.as_deref(), r.sync_state.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join("/"),
                lag(r.write_lag_ms),
                lag(r.flush_lag_ms),
                lag(r.replay_lag_ms),
                r.replay_lag_bytes
                    .map(|b| format!(" · {b} bytes behind"))
                    .unwrap_or_default(),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(pid: i32, db: &str, waiting: Option<u64>, children: Vec<LockNode>) -> LockNode {
        LockNode {
            pid,
            user: Some("app".into()),
            application: Some("psql".into()),
            database: Some(db.into()),
            state: Some("active".into()),
            wait_event: waiting.map(|_| "Lock:relation".into()),
            mode: Some(if waiting.is_some() {
                "AccessShareLock".into()
            } else {
                "AccessExclusiveLock".into()
            }),
            lock_type: Some("relation".into()),
            relation: Some("public.t".into()),
            waiting_ms: waiting,
            xact_ms: Some(5_000),
            query: Some("SELECT *\n  FROM t".into()),
            blocked_by: vec![],
            in_cycle: false,
            children,
        }
    }

    fn snap(trees: Vec<LockNode>) -> LockSnapshot {
        LockSnapshot {
            at: chrono::Utc::now(),
            trees,
            pending_ddl: vec![],
            long_running: vec![],
            idle_in_transaction: vec![],
            replication: vec![],
        }
    }

    #[test]
    fn draws_a_chain_as_an_indented_tree() {
        let s = snap(vec![node(
            1,
            "shop",
            None,
            vec![node(
                2,
                "shop",
                Some(1_500),
                vec![node(3, "shop", Some(700), vec![])],
            )],
        )]);
        let t = text(&s, &SnapshotOptions::default());
        assert!(
            t.contains("blocking trees: 1 (2 session(s) waiting, longest wait 1.5s)"),
            "{t}"
        );
        assert!(
            t.contains(
                "pid 1 · user=app app=psql · active · holds AccessExclusiveLock on public.t"
            ),
            "{t}"
        );
        assert!(t.contains("└─ pid 2 "), "{t}");
        assert!(t.contains("   └─ pid 3 "), "{t}");
        assert!(
            t.contains("waits 700ms for AccessShareLock on public.t"),
            "{t}"
        );
        assert!(t.contains("query: SELECT * FROM t"), "{t}");
        assert!(t.contains("replication: no streaming replicas"), "{t}");
    }

    #[test]
    fn names_who_blocks_belays_pending_ddl_between_attempts() {
        let mut s = snap(vec![]);
        s.pending_ddl.push(belay_locks::PendingDdl {
            migration_pid: 77,
            guard_pid: 78,
            blockers: vec![belay_locks::PendingBlocker {
                session: SessionInfo {
                    pid: 4242,
                    user: Some("app".into()),
                    application: Some("report".into()),
                    database: Some("shop".into()),
                    client_addr: Some("10.0.0.5".into()),
                    state: Some("idle in transaction".into()),
                    wait_event: None,
                    backend_type: Some("client backend".into()),
                    query_ms: Some(14_000),
                    xact_ms: Some(14_000),
                    state_ms: Some(13_000),
                    query: Some("SELECT count(*) FROM accounts".into()),
                },
                holds: Some("AccessShareLock on public.accounts".into()),
            }],
        });
        let t = text(&s, &SnapshotOptions::default());
        assert!(t.contains("blocking trees: none"), "{t}");
        assert!(
            t.contains("belay's pending DDL: migration pid 77 is between attempts, waiting for 1 session(s)"),
            "{t}"
        );
        assert!(
            t.contains("pid 4242 · user=app app=report · db=shop · from 10.0.0.5 · idle in transaction, transaction open 14.0s"),
            "{t}"
        );
        assert!(
            t.contains("holds: AccessShareLock on public.accounts"),
            "{t}"
        );
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(340), "340ms");
        assert_eq!(human(1_234), "1.2s");
        assert_eq!(human(185_000), "3min 05s");
        assert_eq!(human(7_800_000), "2h 10min");
    }
}
