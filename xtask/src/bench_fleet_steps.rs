//! `bench fleet`'s breakdown: where a target's time goes on each side, read from the
//! records the deployments keep (the controller's store for the fleet, each database's own
//! deployment log for the local runs), and the history check of every database.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use chrono::{DateTime, Utc};
use sqlx::Connection as _;

use crate::bench_deploy::STEPS;

/// What a stage of a target's run covers, by the marker it starts at.
fn describe(stage: &str) -> &'static str {
    match stage {
        "dispatch" => "controller → agent: gRPC, agent budget wait, history read, log begin",
        "outside" => "process start, files, history read, exit (outside the pipeline)",
        "begin" => "log begin (log session, deployment row)",
        "planned" => "plan read (agent: no file catalog) / none",
        "preflight" => "preflight checks",
        "backing_up" => "runner lock, lint gate, backup, guard",
        "migrating" => "the 3 migrations",
        "validating" => "postflight, history read for the record",
        "watching" => "probe window",
        "succeeded" => "log finish, stream end, controller store write",
        _ => "",
    }
}

/// Time per stage, summed over targets, with the number of targets.
#[derive(Debug, Default)]
pub struct Steps {
    targets: usize,
    stages: BTreeMap<&'static str, f64>,
    order: Vec<&'static str>,
}

impl Steps {
    fn add(&mut self, stage: &'static str, secs: f64) {
        if !self.order.contains(&stage) {
            self.order.push(stage);
        }
        *self.stages.entry(stage).or_default() += secs.max(0.0);
    }

    /// Mean milliseconds per target in `stage`.
    fn mean_ms(&self, stage: &str) -> f64 {
        self.stages.get(stage).copied().unwrap_or_default() * 1000.0 / self.targets.max(1) as f64
    }

    fn total_ms(&self) -> f64 {
        self.stages.values().sum::<f64>() * 1000.0 / self.targets.max(1) as f64
    }
}

/// The fleet side, from the controller's store: per target, from its dispatch (the
/// controller sets it `running`) through each transition the agent streamed to the
/// controller's record of its end; plus what happened around the targets.
#[derive(Debug, Default)]
pub struct FleetSteps {
    pub steps: Steps,
    /// Deployment created → first target dispatched.
    before_first: f64,
    /// Last target recorded → deployment finished.
    after_last: f64,
    /// First dispatch → last target recorded.
    span: f64,
    /// Time within the span with no target in flight (wave gates).
    idle: f64,
    waves: usize,
    /// Targets in flight at once, most seen.
    peak_in_flight: usize,
    events: usize,
}

fn ts(text: &str) -> Result<DateTime<Utc>> {
    Ok(DateTime::parse_from_rfc3339(text)
        .with_context(|| format!("not RFC 3339: {text}"))?
        .with_timezone(&Utc))
}

fn secs(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    (b - a).num_microseconds().unwrap_or_default() as f64 / 1e6
}

fn stage_name(step: &str) -> Option<&'static str> {
    STEPS
        .iter()
        .chain(&["succeeded", "failed"])
        .find(|s| **s == step)
        .copied()
}

/// Reads deployment `id` from the controller's SQLite store at `store`.
pub async fn fleet_from_store(store: &Path, id: &str) -> Result<FleetSteps> {
    let url = format!("sqlite:{}?mode=ro", store.display());
    let mut conn = sqlx::SqliteConnection::connect(&url)
        .await
        .with_context(|| format!("could not open the controller's store {}", store.display()))?;
    let (created, finished): (String, Option<String>) =
        sqlx::query_as("SELECT created_at, finished_at FROM deployments WHERE id = ?")
            .bind(id)
            .fetch_one(&mut conn)
            .await
            .with_context(|| format!("deployment {id} in the controller's store"))?;
    let rows: Vec<(String, Option<String>, String, String)> = sqlx::query_as(
        "SELECT at, target, kind, payload FROM deployment_events WHERE deployment_id = ? ORDER BY seq",
    )
    .bind(id)
    .fetch_all(&mut conn)
    .await
    .context("reading the deployment's events")?;
    conn.close().await.ok();

    let mut out = FleetSteps {
        events: rows.len(),
        ..FleetSteps::default()
    };
    // Per target: the marker it is in and since when.
    let mut at: BTreeMap<String, (&'static str, DateTime<Utc>)> = BTreeMap::new();
    let mut intervals: Vec<(DateTime<Utc>, DateTime<Utc>)> = Vec::new();
    let mut starts: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
    for (when, target, kind, payload) in &rows {
        let when = ts(when)?;
        let payload: serde_json::Value = serde_json::from_str(payload).unwrap_or_default();
        if kind == "wave" {
            out.waves += 1;
            continue;
        }
        let Some(target) = target else { continue };
        match kind.as_str() {
            "target_state" => match payload["state"].as_str() {
                Some("running") => {
                    at.insert(target.clone(), ("dispatch", when));
                    starts.insert(target.clone(), when);
                }
                Some("succeeded" | "failed") => {
                    if let Some((stage, since)) = at.remove(target) {
                        out.steps.add(stage, secs(since, when));
                    }
                    if let Some(start) = starts.remove(target) {
                        intervals.push((start, when));
                        out.steps.targets += 1;
                    }
                }
                _ => {}
            },
            "transition" => {
                let Some(to) = payload["to"].as_str().and_then(stage_name) else {
                    continue;
                };
                if let Some((stage, since)) = at.insert(target.clone(), (to, when)) {
                    out.steps.add(stage, secs(since, when));
                }
            }
            _ => {}
        }
    }
    ensure!(!intervals.is_empty(), "no target of {id} was recorded");
    let first = intervals.iter().map(|i| i.0).min().unwrap_or_default();
    let last = intervals.iter().map(|i| i.1).max().unwrap_or_default();
    out.before_first = secs(ts(&created)?, first);
    out.after_last = finished
        .as_deref()
        .map_or(Ok(0.0), |f| Ok::<_, anyhow::Error>(secs(last, ts(f)?)))?;
    out.span = secs(first, last);
    // Sweep: in flight over time, and the time with none.
    let mut edges: Vec<(DateTime<Utc>, i64)> = intervals
        .iter()
        .flat_map(|(a, b)| [(*a, 1), (*b, -1)])
        .collect();
    edges.sort_by_key(|(t, d)| (*t, *d));
    let (mut n, mut idle_since) = (0i64, None);
    for (t, d) in edges {
        if n == 0
            && d > 0
            && let Some(s) = idle_since.take()
        {
            out.idle += secs(s, t);
        }
        n += d;
        out.peak_in_flight = out.peak_in_flight.max(usize::try_from(n).unwrap_or(0));
        if n == 0 {
            idle_since = Some(t);
        }
    }
    Ok(out)
}

/// Per database: whether its history records `expected` successful migrations, and the
/// transitions of its newest deployment in its own log (the local side's breakdown).
pub async fn check_databases(
    urls: &[(String, String)],
    expected: usize,
    local_walls: &BTreeMap<String, f64>,
) -> Result<Steps> {
    let mut steps = Steps::default();
    for (db, url) in urls {
        let mut conn = sqlx::PgConnection::connect(url)
            .await
            .with_context(|| format!("could not connect to {db}"))?;
        let applied: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM belay.schema_history WHERE success AND state = 'success'",
        )
        .fetch_one(&mut conn)
        .await
        .with_context(|| format!("could not read the history of {db}"))?;
        ensure!(
            applied == i64::try_from(expected).unwrap_or(i64::MAX),
            "{db}: {applied} successful history rows, expected {expected}"
        );
        let Some(wall) = local_walls.get(db) else {
            conn.close().await.ok();
            continue;
        };
        let rows: Vec<(DateTime<Utc>, DateTime<Utc>, Option<String>)> = sqlx::query_as(
            "SELECT d.started_at, e.at, e.payload->>'to'
             FROM belay.deployments d JOIN belay.deployment_events e ON e.deployment_id = d.id
             WHERE d.id = (SELECT id FROM belay.deployments ORDER BY started_at DESC LIMIT 1)
               AND e.kind = 'transition'
             ORDER BY e.seq",
        )
        .fetch_all(&mut conn)
        .await
        .with_context(|| format!("could not read the deployment log of {db}"))?;
        conn.close().await.ok();
        let Some((started, ..)) = rows.first() else {
            continue;
        };
        let mut marker: (&'static str, DateTime<Utc>) = ("begin", *started);
        let mut end = *started;
        for (_, when, to) in &rows {
            let Some(to) = to.as_deref().and_then(stage_name) else {
                continue;
            };
            steps.add(marker.0, secs(marker.1, *when));
            marker = (to, *when);
            end = *when;
        }
        steps.add("outside", wall - secs(*started, end));
        steps.targets += 1;
    }
    Ok(steps)
}

/// The breakdown table: both sides' mean milliseconds per target by stage.
pub fn render(fleet: &FleetSteps, local: &Steps, fleet_wall: f64, local_wall: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "mean ms per target by stage (fleet: controller's store, a target's wall time from \
         dispatch to its record; local: each database's own deployment log and the process)"
    );
    let _ = writeln!(out, "  {:<11} {:>9} {:>9}  what", "stage", "fleet", "local");
    let mut stages: Vec<&'static str> = vec!["dispatch", "outside", "begin"];
    stages.extend(STEPS);
    stages.push("succeeded");
    for stage in stages {
        let (f, l) = (fleet.steps.mean_ms(stage), local.mean_ms(stage));
        if f == 0.0 && l == 0.0 {
            continue;
        }
        let _ = writeln!(out, "  {stage:<11} {f:>9.1} {l:>9.1}  {}", describe(stage));
    }
    let _ = writeln!(
        out,
        "  {:<11} {:>9.1} {:>9.1}  one target's wall time",
        "total",
        fleet.steps.total_ms(),
        local.total_ms()
    );
    let n = fleet.steps.targets.max(1) as f64;
    let _ = writeln!(
        out,
        "fleet: {} targets in {} wave(s), {} events stored; {:.2}s from the CLI's start to its \
         end: {:.2}s before the first target's dispatch (CLI, planning, store), {:.2}s of \
         targets in flight (on average {:.1} at once, at most {}; {:.2}s with none between \
         waves), {:.2}s from the last target's record to the deployment's end, the rest the \
         CLI's start-up and final read; {:.1} ms of wall per target",
        fleet.steps.targets,
        fleet.waves,
        fleet.events,
        fleet_wall,
        fleet.before_first,
        fleet.span,
        fleet.steps.total_ms() / 1000.0 * n / fleet.span.max(1e-9),
        fleet.peak_in_flight,
        fleet.idle,
        fleet.after_last,
        fleet_wall * 1000.0 / n
    );
    let _ = writeln!(
        out,
        "local: {} databases one after another in {:.2}s; {:.1} ms of wall per database",
        local.targets,
        local_wall,
        local_wall * 1000.0 / local.targets.max(1) as f64
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_sum_per_target_and_mean() {
        let mut s = Steps::default();
        s.add("planned", 0.010);
        s.add("planned", 0.030);
        s.add("migrating", 0.100);
        s.targets = 2;
        assert!((s.mean_ms("planned") - 20.0).abs() < 1e-9);
        assert!((s.total_ms() - 70.0).abs() < 1e-9);
        assert_eq!(stage_name("backing_up"), Some("backing_up"));
        assert_eq!(stage_name("rolling_back"), None);
    }
}
