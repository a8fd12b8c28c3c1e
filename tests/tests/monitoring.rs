//! The monitoring stack in `deploy/`, checked with the real tools: Prometheus' promtool
//! (rules, their unit tests, the scrape config, every dashboard query), Alertmanager's
//! amtool (config and routing), TypeScript against Grafana's published dashboard types
//! (`@grafana/schema`), `kubernetes-validate` against Kubernetes' schemas, and the real
//! `belay-agent` and `belay-controller` binaries (their `--help` and their `/metrics`).
//!
//! `cargo xtask test` installs the tools and passes their paths (`BELAY_PROMTOOL`,
//! `BELAY_AMTOOL`, `BELAY_GRAFANA_TOOLS`, `BELAY_PYTHON_TOOLS`); without those, the
//! tests look on `PATH` and in `target/tools/`, and fail naming what to install.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail, ensure};
use belay_e2e::{Daemon, Run, TargetDef, agent_config_with, belay, wait_agents, wait_for};
use belay_testkit::Cluster;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---- where things are ----

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn deploy(path: &str) -> PathBuf {
    root().join("deploy").join(path)
}

/// A program from `env`, else from `PATH`.
fn program(name: &str, env: &str, package: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    let paths = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "{name} not found: run `cargo xtask test`, which installs it, or `apt-get \
                 install {package}`, or set {env} to its path"
            )
        })
}

/// A directory `cargo xtask test` installs tools into, or `env` when set.
fn tools_dir(env: &str, name: &str, check: &str, how: &str) -> Result<PathBuf> {
    let dir = std::env::var_os(env).map_or_else(
        || {
            Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join("../tools")
                .join(name)
        },
        PathBuf::from,
    );
    ensure!(
        dir.join(check).is_file(),
        "{} not found: run `cargo xtask test`, which installs it, or {how} and set {env} to that directory",
        dir.join(check).display()
    );
    Ok(dir)
}

fn promtool() -> Result<PathBuf> {
    program("promtool", "BELAY_PROMTOOL", "prometheus")
}

fn amtool() -> Result<PathBuf> {
    program("amtool", "BELAY_AMTOOL", "prometheus-alertmanager")
}

fn grafana_tools() -> Result<PathBuf> {
    tools_dir(
        "BELAY_GRAFANA_TOOLS",
        "grafana",
        "node_modules/@grafana/schema/package.json",
        "`npm install --prefix DIR typescript@5.9.3 @grafana/schema@13.2.3`",
    )
}

fn python_tools() -> Result<PathBuf> {
    tools_dir(
        "BELAY_PYTHON_TOOLS",
        "python",
        "bin/kubernetes-validate",
        "`python3 -m venv DIR && DIR/bin/pip install kubernetes-validate==1.37.0`",
    )
}

/// Runs `cmd`, returning its output whatever the exit status.
fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output()
        .with_context(|| format!("running {:?}", cmd.get_program()))
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` and fails with its output unless it succeeds.
fn succeed(cmd: &mut Command) -> Result<Output> {
    let out = output(cmd)?;
    ensure!(out.status.success(), "{cmd:?} failed:\n{}", text(&out));
    Ok(out)
}

/// Every document of a YAML file, as JSON (PyYAML, from the tools' Python).
fn yaml(path: &Path) -> Result<Vec<Value>> {
    let python = python_tools()?.join("bin/python");
    let out = succeed(
        Command::new(python)
            .arg("-c")
            .arg(
                "import json, sys, yaml\n\
         with open(sys.argv[1]) as f:\n    json.dump(list(yaml.safe_load_all(f)), sys.stdout)",
            )
            .arg(path),
    )?;
    serde_json::from_slice(&out.stdout).with_context(|| format!("reading {}", path.display()))
}

fn one_yaml(path: &Path) -> Result<Value> {
    yaml(path)?
        .into_iter()
        .next()
        .with_context(|| format!("{} is empty", path.display()))
}

// ---- Prometheus rules ----

const RULES: &str = "prometheus/rules/belay.yml";
const RULE_TESTS: [&str; 2] = [
    "prometheus/tests/belay.test.yml",
    "prometheus/tests/belay-daily.test.yml",
];

/// Every alerting rule in the rules file.
fn alerts(rules: &Value) -> Vec<Value> {
    rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter(|r| r.get("alert").is_some())
        .cloned()
        .collect()
}

#[test]
fn prometheus_config_rules_and_their_unit_tests_pass_promtool() -> Result<()> {
    let promtool = promtool()?;
    let out = succeed(
        Command::new(&promtool)
            .args(["check", "config"])
            .arg(deploy("prometheus/prometheus.yml")),
    )?;
    let said = String::from_utf8_lossy(&out.stdout);
    // check config also checks every rule file it loads: rules/*.yml must be found.
    assert!(said.contains("rules/belay.yml"), "{said}");
    succeed(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(deploy(RULES)),
    )?;
    succeed(
        Command::new(&promtool)
            .args(["test", "rules"])
            .args(RULE_TESTS.map(deploy)),
    )?;
    Ok(())
}

#[test]
fn every_alert_is_tested_firing_and_quiet_and_links_its_runbook_section() -> Result<()> {
    let rules = one_yaml(&deploy(RULES))?;
    let alerts = alerts(&rules);
    ensure!(alerts.len() >= 18, "only {} alerts", alerts.len());

    // alertname -> (has a firing case, has a quiet case)
    let mut cases: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for file in RULE_TESTS {
        let doc = one_yaml(&deploy(file))?;
        for test in doc["tests"].as_array().into_iter().flatten() {
            for case in test["alert_rule_test"].as_array().into_iter().flatten() {
                let name = case["alertname"].as_str().unwrap_or_default().to_string();
                let fires = case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty());
                let entry = cases.entry(name).or_default();
                if fires {
                    entry.0 = true;
                } else {
                    entry.1 = true;
                }
            }
        }
    }

    let runbook = std::fs::read_to_string(root().join("docs/runbook.md"))
        .context("reading docs/runbook.md")?;
    let headings: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| h.trim().to_string())
        .collect();

    let mut problems = Vec::new();
    for alert in &alerts {
        let name = alert["alert"].as_str().unwrap_or_default();
        match cases.get(name) {
            Some((true, true)) => {}
            Some((fires, _)) => problems.push(format!(
                "{name}: unit tests lack a {} case",
                if *fires { "quiet" } else { "firing" }
            )),
            None => problems.push(format!("{name}: no unit test")),
        }
        let severity = alert["labels"]["severity"].as_str().unwrap_or_default();
        if !matches!(severity, "critical" | "warning") {
            problems.push(format!(
                "{name}: severity {severity:?} is neither critical nor warning"
            ));
        }
        for key in ["summary", "description", "runbook_url"] {
            if alert["annotations"][key].as_str().is_none_or(str::is_empty) {
                problems.push(format!("{name}: no {key} annotation"));
            }
        }
        // GitHub's anchor for the heading `## BelayX` is `#belayx`.
        let url = alert["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_default();
        let anchor = name.to_lowercase();
        if !url.ends_with(&format!("runbook.md#{anchor}")) {
            problems.push(format!(
                "{name}: runbook_url {url} is not runbook.md#{anchor}"
            ));
        }
        if !headings.contains(name) {
            problems.push(format!(
                "{name}: docs/runbook.md has no `## {name}` section"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

/// The first comparison with a number in `expr`: the alert's threshold, as (byte range
/// of the number, its value).
fn threshold(expr: &str) -> Option<(std::ops::Range<usize>, f64)> {
    let bytes = expr.as_bytes();
    for (i, _) in expr.match_indices(['>', '<', '=']) {
        let mut j = i + 1;
        while j < bytes.len() && matches!(bytes[j], b'=' | b' ') {
            j += 1;
        }
        let start = j;
        while j < bytes.len() && (bytes[j].is_ascii_digit() || bytes[j] == b'.') {
            j += 1;
        }
        if j > start
            && let Ok(n) = expr[start..j].parse::<f64>()
        {
            return Some((start..j, n));
        }
    }
    None
}

/// Breaking any alert's threshold, up or down, makes its unit tests fail: the firing case
/// catches a raised threshold, the near-miss quiet case a lowered one.
#[test]
fn breaking_any_alert_threshold_fails_its_unit_tests() -> Result<()> {
    let promtool = promtool()?;
    let rules = one_yaml(&deploy(RULES))?;
    let tests: Vec<Value> = RULE_TESTS
        .iter()
        .map(|f| one_yaml(&deploy(f)))
        .collect::<Result<_>>()?;
    let tmp = tempfile::tempdir()?;
    std::fs::create_dir_all(tmp.path().join("rules"))?;
    std::fs::create_dir_all(tmp.path().join("tests"))?;

    // Runs `name`'s own test groups against `rules` (JSON is YAML).
    let run = |name: &str, rules: &Value| -> Result<Output> {
        std::fs::write(
            tmp.path().join("rules/belay.yml"),
            serde_json::to_vec(rules)?,
        )?;
        let mut files = Vec::new();
        for (i, doc) in tests.iter().enumerate() {
            let mine: Vec<Value> = doc["tests"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|t| {
                    t["alert_rule_test"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["alertname"] == name)
                })
                .cloned()
                .collect();
            if mine.is_empty() {
                continue;
            }
            let mut doc = doc.clone();
            doc["tests"] = Value::Array(mine);
            let file = tmp.path().join(format!("tests/{i}.yml"));
            std::fs::write(&file, serde_json::to_vec(&doc)?)?;
            files.push(file);
        }
        ensure!(!files.is_empty(), "{name} has no unit test");
        output(Command::new(&promtool).args(["test", "rules"]).args(&files))
    };

    let mut survived = Vec::new();
    for alert in alerts(&rules) {
        let name = alert["alert"].as_str().unwrap_or_default().to_string();
        let expr = alert["expr"].as_str().unwrap_or_default().to_string();
        let (range, value) =
            threshold(&expr).with_context(|| format!("{name}: no threshold in {expr}"))?;
        let out = run(&name, &rules)?;
        ensure!(
            out.status.success(),
            "{name}'s tests fail unmutated:\n{}",
            text(&out)
        );
        for broken in [value * 2.0 + 1.0, value / 2.0 - 1.0] {
            let mutated = format!("{}{broken}{}", &expr[..range.start], &expr[range.end..]);
            let mut rules = rules.clone();
            for group in rules["groups"].as_array_mut().into_iter().flatten() {
                for rule in group["rules"].as_array_mut().into_iter().flatten() {
                    if rule["alert"] == name.as_str() {
                        rule["expr"] = Value::from(mutated.clone());
                    }
                }
            }
            if run(&name, &rules)?.status.success() {
                survived.push(format!("{name}: {mutated}"));
            }
        }
    }
    assert!(
        survived.is_empty(),
        "these broken thresholds still pass the unit tests:\n{}",
        survived.join("\n")
    );
    Ok(())
}

// ---- Alertmanager ----

const ALERTMANAGER: &str = "alertmanager/alertmanager.yml";

fn routes(labels: &[String]) -> Result<Output> {
    output(
        Command::new(amtool()?)
            .args(["config", "routes", "test", "--config.file"])
            .arg(deploy(ALERTMANAGER))
            .args(labels),
    )
}

#[test]
fn alertmanager_config_passes_amtool_and_routes_every_alert_where_it_belongs() -> Result<()> {
    succeed(
        Command::new(amtool()?)
            .arg("check-config")
            .arg(deploy(ALERTMANAGER)),
    )?;

    let config = one_yaml(&deploy(ALERTMANAGER))?;
    let urls: Vec<&str> = config["receivers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["name"] == "belay-controller")
        .flat_map(|r| r["webhook_configs"].as_array().into_iter().flatten())
        .filter_map(|w| w["url"].as_str())
        .collect();
    assert!(
        urls.len() == 1 && urls[0].ends_with(":9400/webhooks/alertmanager"),
        "the controller receiver must post to its /webhooks/alertmanager: {urls:?}"
    );
    // No secret inline: every credential comes from a file.
    let raw = std::fs::read_to_string(deploy(ALERTMANAGER))?;
    for inline in ["api_url:", "credentials:", "password:"] {
        assert!(!raw.contains(inline), "{inline} inline in {ALERTMANAGER}");
    }

    // Every alert of the rules, with its own labels, reaches the receivers its
    // severity and action promise, in that order.
    let rules = one_yaml(&deploy(RULES))?;
    for alert in alerts(&rules) {
        let name = alert["alert"].as_str().unwrap_or_default();
        let mut labels = vec![format!("alertname={name}"), "target=orders".to_string()];
        let mut expected = Vec::new();
        if let Some(map) = alert["labels"].as_object() {
            for (k, v) in map {
                labels.push(format!("{k}={}", v.as_str().unwrap_or_default()));
            }
            if map.get("action").and_then(Value::as_str) == Some("rollback") {
                expected.push("belay-controller");
            }
            expected.push(match map.get("severity").and_then(Value::as_str) {
                Some("critical") => "database-team-pager",
                _ => "database-team-chat",
            });
        }
        let out = routes(&labels)?;
        let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(got, expected.join(","), "{name} {labels:?}\n{}", text(&out));
    }
    // An alert of someone else's with no severity still reaches someone.
    let out = routes(&["alertname=Other".to_string()])?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "database-team-chat"
    );
    Ok(())
}

// ---- Grafana ----

const DASHBOARD: &str = "grafana/belay.json";

/// TypeScript that type-checks a dashboard against `@grafana/schema`'s `Dashboard`, in
/// its JSON form (an enum-typed field holds the enum's value), as an object literal so
/// that an unknown or misspelt key is an error too. The schema leaves an annotation's
/// query to its datasource: the Prometheus datasource's annotation fields are declared
/// here.
const DASHBOARD_CHECK: &str = r#"import type { AnnotationQuery, Dashboard } from '@grafana/schema';

type Json<T> = T extends ReadonlyArray<infer U>
  ? Json<U>[]
  : T extends object
    ? { [K in keyof T]: Json<T[K]> }
    : T extends string
      ? `${T}`
      : T;

interface PrometheusAnnotation {
  expr: string;
  step?: string;
  titleFormat?: string;
  textFormat?: string;
  tagKeys?: string;
  useValueForTime?: boolean;
}

type Annotation = Json<AnnotationQuery> | (Json<AnnotationQuery> & PrometheusAnnotation);

type ImportableDashboard = Omit<Json<Dashboard>, 'annotations'> & {
  annotations?: { list?: Annotation[] };
};

export const dashboard: ImportableDashboard = "#;

/// Runs tsc over `dashboard`; the output when it does not type-check.
fn type_check(dashboard: &str) -> Result<Option<String>> {
    let tools = grafana_tools()?;
    let tmp = tempfile::tempdir()?;
    std::fs::write(
        tmp.path().join("check.ts"),
        format!("{DASHBOARD_CHECK}{dashboard};\n"),
    )?;
    let schema = tools.join("node_modules/@grafana/schema");
    let config = json!({
        "compilerOptions": {
            "strict": true, "noEmit": true, "skipLibCheck": true, "types": [],
            "module": "esnext", "moduleResolution": "bundler", "target": "es2022",
            "baseUrl": ".", "paths": {"@grafana/schema": [schema]},
        },
        "files": ["check.ts"],
    });
    std::fs::write(
        tmp.path().join("tsconfig.json"),
        serde_json::to_vec(&config)?,
    )?;
    let out = output(
        Command::new("node")
            .arg(tools.join("node_modules/typescript/bin/tsc"))
            .arg("-p")
            .arg(tmp.path().join("tsconfig.json")),
    )?;
    Ok((!out.status.success()).then(|| text(&out)))
}

#[test]
fn dashboard_is_valid_against_grafanas_dashboard_schema() -> Result<()> {
    let dashboard = std::fs::read_to_string(deploy(DASHBOARD))?;
    let doc: Value = serde_json::from_str(&dashboard).context("the dashboard is not JSON")?;
    if let Some(errors) = type_check(&dashboard)? {
        bail!("{DASHBOARD} does not match @grafana/schema's Dashboard:\n{errors}");
    }

    // The check has teeth: a misspelt key and an impossible value are both refused.
    let mut broken = doc.clone();
    let panel = broken["panels"][1]
        .as_object_mut()
        .context("the second panel is not an object")?;
    let grid = panel.remove("gridPos").context("no gridPos")?;
    panel.insert("gridpos".into(), grid);
    let errors = type_check(&serde_json::to_string(&broken)?)?
        .context("a panel with `gridpos` passed the schema check")?;
    assert!(errors.contains("gridpos"), "{errors}");
    let mut broken = doc.clone();
    broken["graphTooltip"] = json!(7);
    let errors = type_check(&serde_json::to_string(&broken)?)?
        .context("graphTooltip 7 passed the schema check")?;
    assert!(errors.contains("DashboardCursorSync"), "{errors}");

    // Importable anywhere: the datasource and the job/instance/target filters are
    // variables, and every query uses the datasource variable.
    let vars: BTreeSet<&str> = doc["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for name in ["datasource", "job", "instance", "target"] {
        assert!(vars.contains(name), "no `{name}` variable: {vars:?}");
    }
    for query in queries(&doc) {
        if let Some(ds) = query.datasource {
            assert_eq!(ds, "${datasource}", "{} uses {ds}", query.place);
        }
    }
    // Deployments and rollbacks are annotations.
    let annotations: Vec<&str> = doc["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["expr"].as_str())
        .collect();
    assert!(
        annotations
            .iter()
            .any(|e| e.contains("belay_deployments_total"))
    );
    assert!(
        annotations
            .iter()
            .any(|e| e.contains("belay_rollbacks_total"))
    );
    Ok(())
}

struct Query {
    place: String,
    expr: String,
    datasource: Option<String>,
}

/// Every PromQL expression of the dashboard: panel targets, annotations, and the
/// selectors of `label_values(...)` variables.
fn queries(doc: &Value) -> Vec<Query> {
    let uid = |v: &Value| v["datasource"]["uid"].as_str().map(str::to_owned);
    let mut out = Vec::new();
    for panel in doc["panels"].as_array().into_iter().flatten() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            out.push(Query {
                place: format!("panel {:?}", panel["title"]),
                expr: t["expr"].as_str().unwrap_or_default().to_string(),
                datasource: uid(t),
            });
        }
    }
    for a in doc["annotations"]["list"].as_array().into_iter().flatten() {
        if let Some(expr) = a["expr"].as_str() {
            out.push(Query {
                place: format!("annotation {:?}", a["name"]),
                expr: expr.to_string(),
                datasource: uid(a),
            });
        }
    }
    for v in doc["templating"]["list"].as_array().into_iter().flatten() {
        let q = v["query"]["query"].as_str().or(v["query"].as_str());
        if let Some(inner) = q
            .and_then(|q| q.strip_prefix("label_values("))
            .and_then(|q| q.rsplit_once(','))
        {
            out.push(Query {
                place: format!("variable {:?}", v["name"]),
                expr: inner.0.to_string(),
                datasource: uid(v),
            });
        }
    }
    out
}

/// Metric names an expression reads: identifiers outside quoted strings that start with
/// `belay_`, plus `up`. Recording rules (`level:metric:op`) are left out.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut in_quote = false;
    let mut word = String::new();
    let mut flush = |word: &mut String| {
        if (word.starts_with("belay_") || word == "up") && !word.contains(':') {
            names.insert(std::mem::take(word));
        }
        word.clear();
    };
    for c in expr.chars() {
        if c == '"' {
            in_quote = !in_quote;
            flush(&mut word);
        } else if !in_quote && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            word.push(c);
        } else {
            flush(&mut word);
        }
    }
    flush(&mut word);
    names
}

async fn scrape(addr: &str) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: belay\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// Metric names in a scrape (`# TYPE name kind`), with the sample names a histogram
/// adds.
fn exposed(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            names.insert(name.to_string());
            if kind == "histogram" || kind == "summary" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

fn free_addr() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

/// The metric names a real controller and agent expose after a deployment and a backfill
/// through them, and `up`, which Prometheus adds.
async fn exposed_by_the_binaries() -> Result<BTreeSet<String>> {
    let tmp = tempfile::tempdir()?;
    let db = Cluster::shared().create_database().await?;
    let store = tmp.path().join("controller.db");
    let (controller_metrics, agent_metrics) = (free_addr()?, free_addr()?);
    let controller = belay_e2e::controller(
        &store.to_string_lossy(),
        &["--metrics-listen", &controller_metrics],
    )
    .await?;
    let examples = belay_e2e::examples();
    let config = agent_config_with(
        tmp.path(),
        "agent-1",
        &controller.addr,
        "lock_sample_period = \"1s\"",
        &[TargetDef {
            name: "orders",
            url: &db.url,
            migrations: &examples,
            environment: None,
        }],
    )?;
    // A backup directory and a probe beside the target: the backup and probe series exist
    // only for targets that have them.
    let mut text = std::fs::read_to_string(&config)?;
    text.push_str(&format!(
        "backup_dir = \"{}\"\n[[targets.probes]]\nname = \"readable\"\nperiod = \"100ms\"\n\
         sql = {{ query = \"SELECT 0\", expect = \"zero\" }}\n",
        tmp.path().join("backups").display()
    ));
    std::fs::write(&config, text)?;
    let config = config.to_string_lossy().into_owned();
    let _agent = Daemon::start(
        "belay-agent",
        &[
            "--listen",
            "127.0.0.1:0",
            "--config",
            &config,
            "--metrics-listen",
            &agent_metrics,
        ],
        &[],
    )
    .await?;
    wait_agents(&controller.addr, 1).await?;
    let r: Run = belay(&controller.addr, &["deploy", "--targets", "orders"]).await?;
    ensure!(r.code == 0, "the deployment failed: {r:?}");
    // A backfill runs on the agent, which exports its series (labelled by its name, so
    // they exist once one ran).
    belay_testkit::psql(
        &db.url,
        "CREATE TABLE fill (id int PRIMARY KEY, v int); INSERT INTO fill SELECT g FROM generate_series(1, 30) g",
    )?;
    let r: Run = belay(
        &controller.addr,
        &[
            "--target", "orders", "backfill", "--table", "fill", "--set", "v = id", "--batch", "10",
        ],
    )
    .await?;
    ensure!(r.code == 0, "the backfill failed: {r:?}");
    // The lock gauges come from the agent's sampler: wait for its first sample.
    wait_for("the agent's first lock sample", || async {
        Ok(scrape(&agent_metrics)
            .await?
            .contains("belay_blocked_sessions"))
    })
    .await?;
    let mut names = exposed(&scrape(&controller_metrics).await?);
    names.extend(exposed(&scrape(&agent_metrics).await?));
    names.insert("up".to_string());
    Ok(names)
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_and_alert_queries_parse_and_name_only_metrics_the_binaries_expose() -> Result<()>
{
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(deploy(DASHBOARD))?)?;
    let rules = one_yaml(&deploy(RULES))?;
    let mut all: Vec<Query> = queries(&doc);
    for group in rules["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            let name = rule["alert"].as_str().or(rule["record"].as_str());
            all.push(Query {
                place: format!("rule {name:?}"),
                expr: rule["expr"].as_str().unwrap_or_default().to_string(),
                datasource: None,
            });
        }
    }
    ensure!(all.len() > 40, "only {} queries found", all.len());

    // promtool parses each dashboard query, Grafana's range variables replaced by
    // durations, as the expression of a recording rule.
    let tmp = tempfile::tempdir()?;
    let parse = json!({"groups": [{"name": "dashboard", "rules": all.iter().enumerate().map(|(i, q)| json!({
        "record": format!("dashboard:query_{i}"),
        "expr": q.expr.replace("$__rate_interval", "1m").replace("$__range", "1d").replace("$__interval", "1m"),
    })).collect::<Vec<_>>()}]});
    let file = tmp.path().join("queries.yml");
    std::fs::write(&file, serde_json::to_vec(&parse)?)?;
    succeed(
        Command::new(promtool()?)
            .args(["check", "rules"])
            .arg(&file),
    )?;

    let exposed = exposed_by_the_binaries().await?;
    let mut unknown = Vec::new();
    for q in &all {
        for name in metric_names(&q.expr) {
            if !exposed.contains(&name) {
                unknown.push(format!("{}: {name}", q.place));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "queries name metrics no binary exposes (exposed: {exposed:?}):\n{}",
        unknown.join("\n")
    );
    Ok(())
}

// ---- Kubernetes ----

fn manifests() -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy("kubernetes"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    ensure!(files.len() >= 3, "manifests: {files:?}");
    Ok(files)
}

#[test]
fn kubernetes_manifests_are_valid_against_the_kubernetes_schemas() -> Result<()> {
    let validate = python_tools()?.join("bin/kubernetes-validate");
    let files = manifests()?;
    // The oldest and newest Kubernetes the package bundles schemas for that we support
    // (gRPC probes and everything used here are GA from 1.27).
    for version in ["1.29.0", "1.37.0"] {
        succeed(
            Command::new(&validate)
                .args(["--strict", "--quiet", "-k", version])
                .args(&files),
        )?;
    }
    // The validator has teeth: a misspelt field fails strict validation.
    let tmp = tempfile::tempdir()?;
    let controller = std::fs::read_to_string(deploy("kubernetes/controller.yaml"))?;
    let broken = controller.replace("readOnlyRootFilesystem:", "readOnlyRootFileSystem:");
    ensure!(
        broken != controller,
        "controller.yaml changed: update this test"
    );
    std::fs::write(tmp.path().join("broken.yaml"), broken)?;
    let out = output(
        Command::new(&validate)
            .args(["--strict", "--quiet", "-k", "1.29.0"])
            .arg(tmp.path().join("broken.yaml")),
    )?;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("readOnlyRootFileSystem"),
        "{}",
        text(&out)
    );
    Ok(())
}

#[test]
fn kubernetes_manifests_pass_only_flags_and_variables_the_binaries_know() -> Result<()> {
    let mut help = BTreeMap::new();
    for bin in ["belay-agent", "belay-controller"] {
        let out = succeed(Command::new(belay_e2e::binary(bin)?).arg("--help"))?;
        help.insert(bin, String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let mut seen = BTreeSet::new();
    let mut problems = Vec::new();
    for file in manifests()? {
        for doc in yaml(&file)? {
            let containers = doc["spec"]["template"]["spec"]["containers"].as_array();
            for c in containers.into_iter().flatten() {
                let name = c["name"].as_str().unwrap_or_default();
                let Some(help) = help.get(name) else { continue };
                seen.insert(name.to_string());
                let place = format!("{}: container {name}", file.display());
                for arg in c["args"].as_array().into_iter().flatten() {
                    let arg = arg.as_str().unwrap_or_default();
                    let flag = arg.split('=').next().unwrap_or_default();
                    if !flag.starts_with("--") || !help.contains(&format!("{flag} ")) {
                        problems.push(format!("{place}: `{arg}` is not in {name} --help"));
                    }
                }
                for env in c["env"].as_array().into_iter().flatten() {
                    let var = env["name"].as_str().unwrap_or_default();
                    if !help.contains(var) {
                        problems.push(format!("{place}: env {var} is not in {name} --help"));
                    }
                }
                // Secrets come from files or the environment, never argv.
                for arg in c["args"].as_array().into_iter().flatten() {
                    let arg = arg.as_str().unwrap_or_default();
                    if arg.contains("postgres://") || arg.contains("postgresql://") {
                        problems.push(format!("{place}: a database URL in argv: {arg}"));
                    }
                }
            }
        }
    }
    assert_eq!(
        seen,
        BTreeSet::from(["belay-agent".to_string(), "belay-controller".to_string()]),
        "both daemons must be in the manifests"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

// ---- The alert path end to end ----

fn prometheus_server() -> Result<PathBuf> {
    program("prometheus", "BELAY_PROMETHEUS", "prometheus")
}

fn alertmanager_server() -> Result<PathBuf> {
    program(
        "prometheus-alertmanager",
        "BELAY_ALERTMANAGER",
        "prometheus-alertmanager",
    )
}

/// A server started by the test, killed when dropped.
struct Server {
    child: tokio::process::Child,
    name: &'static str,
}

impl Server {
    fn start(name: &'static str, program: &Path, args: &[String]) -> Result<Server> {
        let child = tokio::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Server { child, name })
    }

    /// Its stderr, after stopping it: for failure messages.
    async fn log(mut self) -> String {
        let _ = self.child.kill().await;
        let mut text = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut text).await;
        }
        format!("--- {} log\n{text}", self.name)
    }
}

/// `GET path` on `addr`: the status code and body, or `None` while nothing listens.
async fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: belay\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let code = out.split(' ').nth(1)?.parse().ok()?;
    Some((
        code,
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}

/// Polls `cond` until it holds or `limit` passes: the alert path has its own clocks
/// (scrape, evaluation, group wait), longer than `wait_for`'s 30 s on a loaded machine.
async fn wait_long<F, Fut>(what: &str, limit: std::time::Duration, mut cond: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await? {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The shipped Alertmanager configuration with the test's addresses: the routing tree
/// as shipped (the rollback route's matchers, grouping, waits and `continue`), the
/// controller receiver pointed at the test's controller and token file, and the people's
/// receivers (chat, pager) emptied, since their endpoints do not exist here.
fn alertmanager_config(controller_http: &str, token_file: &Path) -> Result<Value> {
    let mut config = one_yaml(&deploy(ALERTMANAGER))?;
    let receivers = config["receivers"]
        .as_array_mut()
        .context("alertmanager.yml has no receivers")?;
    let mut found = false;
    for r in receivers.iter_mut() {
        let name = r["name"].as_str().unwrap_or_default().to_string();
        if name == "belay-controller" {
            found = true;
            let hook = &mut r["webhook_configs"][0];
            hook["url"] = json!(format!("http://{controller_http}/webhooks/alertmanager"));
            hook["http_config"]["authorization"]["credentials_file"] =
                json!(token_file.to_string_lossy());
        } else {
            *r = json!({ "name": name });
        }
    }
    ensure!(found, "alertmanager.yml has no belay-controller receiver");
    Ok(config)
}

/// The shipped rules, scraped and evaluated every second (the shipped configuration
/// says 15 s), alerts sent to the test's Alertmanager.
fn prometheus_config(agent: &str, controller: &str, alertmanager: &str) -> Value {
    json!({
        "global": { "scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s" },
        "rule_files": [deploy(RULES).to_string_lossy()],
        "alerting": { "alertmanagers": [{ "static_configs": [{ "targets": [alertmanager] }] }] },
        "scrape_configs": [
            { "job_name": "belay-controller", "static_configs": [{ "targets": [controller] }] },
            { "job_name": "belay-agent", "static_configs": [{ "targets": [agent] }] },
        ],
    })
}

/// Issue #12's story with the real parts: a deployment's probe turns unhealthy in its
/// watch window; the agent's `belay_probe_healthy` stays 0; the real Prometheus scrapes it
/// and fires `BelayProbeUnhealthy` (labelled `action=rollback`, `belay_target`); the real
/// Alertmanager routes it with the shipped routing tree to the controller's webhook, which
/// records one rollback request and has the target's agent roll the deployment back (V1
/// undone); the rollback's verification watches the probe again, it passes, and the alert
/// resolves.
#[tokio::test(flavor = "multi_thread")]
async fn an_unhealthy_probe_flows_through_prometheus_and_alertmanager_to_a_rollback() -> Result<()>
{
    let (prometheus, alertmanager) = (prometheus_server()?, alertmanager_server()?);
    let tmp = tempfile::tempdir()?;
    let db = Cluster::shared().create_database().await?;
    let migrations = tmp.path().join("migrations");
    std::fs::create_dir_all(&migrations)?;
    // The probe's verdict: healthy while there is no table `bad`.
    std::fs::write(
        migrations.join("V1__bad.sql"),
        "CREATE TABLE bad (id int);\n",
    )?;
    std::fs::write(migrations.join("U1__bad.sql"), "DROP TABLE bad;\n")?;
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, "alert-path-token\n")?;
    let token = token_file.to_string_lossy().into_owned();

    let (controller_http, agent_http, am_addr, prom_addr) =
        (free_addr()?, free_addr()?, free_addr()?, free_addr()?);
    let store = tmp
        .path()
        .join("controller.db")
        .to_string_lossy()
        .into_owned();
    let controller = belay_e2e::controller(
        &store,
        &["--http-listen", &controller_http, "--token-file", &token],
    )
    .await?;
    let config = agent_config_with(
        tmp.path(),
        "agent-1",
        &controller.addr,
        &format!("token_file = \"{token}\""),
        &[],
    )?;
    let mut text = std::fs::read_to_string(&config)?;
    text.push_str(&belay_e2e::target_toml(
        "alerting_1",
        &db,
        &migrations,
        &format!(
            "backup_dir = \"{}\"\n\
             [[targets.probes]]\nname = \"no_bad\"\nperiod = \"200ms\"\nfailure_threshold = 2\n\
             sql = {{ query = \"SELECT count(*) FROM pg_tables WHERE tablename = 'bad'\", expect = \"zero\" }}\n\
             [targets.rollback]\nsettle = \"500ms\"\n",
            tmp.path().join("backups").display()
        ),
    ));
    std::fs::write(&config, text)?;
    let config = config.to_string_lossy().into_owned();
    let _agent = Daemon::start(
        "belay-agent",
        &[
            "--listen",
            "127.0.0.1:0",
            "--config",
            &config,
            "--metrics-listen",
            &agent_http,
        ],
        &[],
    )
    .await?;
    belay_e2e::wait_agents_with(&controller.addr, 1, &["--token-file", &token]).await?;

    let am_config = tmp.path().join("alertmanager.yml");
    std::fs::write(
        &am_config,
        serde_json::to_vec_pretty(&alertmanager_config(&controller_http, &token_file)?)?,
    )?;
    succeed(Command::new(amtool()?).arg("check-config").arg(&am_config))?;
    let prom_config = tmp.path().join("prometheus.yml");
    std::fs::write(
        &prom_config,
        serde_json::to_vec_pretty(&prometheus_config(&agent_http, &controller_http, &am_addr))?,
    )?;
    succeed(
        Command::new(promtool()?)
            .args(["check", "config"])
            .arg(&prom_config),
    )?;

    let am = Server::start(
        "alertmanager",
        &alertmanager,
        &[
            format!("--config.file={}", am_config.display()),
            format!("--storage.path={}", tmp.path().join("am-data").display()),
            format!("--web.listen-address={am_addr}"),
            // No gossip port: one Alertmanager, and 9094 may be taken.
            "--cluster.listen-address=".into(),
        ],
    )?;
    let prom = Server::start(
        "prometheus",
        &prometheus,
        &[
            format!("--config.file={}", prom_config.display()),
            format!(
                "--storage.tsdb.path={}",
                tmp.path().join("prom-data").display()
            ),
            format!("--web.listen-address={prom_addr}"),
        ],
    )?;
    let ready = async {
        wait_long(
            "Alertmanager and Prometheus to be ready",
            std::time::Duration::from_secs(60),
            || async {
                Ok(get(&am_addr, "/-/ready")
                    .await
                    .is_some_and(|(c, _)| c == 200)
                    && get(&prom_addr, "/-/ready")
                        .await
                        .is_some_and(|(c, _)| c == 200))
            },
        )
        .await?;
        // The probe seen healthy first.
        wait_long(
            "Prometheus to scrape the agent",
            std::time::Duration::from_secs(60),
            || async {
                Ok(get(&prom_addr, "/api/v1/query?query=belay_probe_healthy")
                    .await
                    .is_some_and(|(_, b)| b.contains("alerting_1")))
            },
        )
        .await
    };
    if let Err(e) = ready.await {
        bail!("{e}\n{}\n{}", am.log().await, prom.log().await);
    }

    let r = belay(
        &controller.addr,
        &[
            "--token-file",
            &token,
            "deploy",
            "--targets",
            "alerting_1",
            "--watch",
            "5m",
            "--output",
            "json",
        ],
    )
    .await?;
    // The probe crossed its threshold: the deployment failed at `watching`.
    let failed_at = std::time::Instant::now();
    ensure!(r.code != 0, "the probe should fail the deployment: {r:?}");
    let listed = belay(
        &controller.addr,
        &[
            "--token-file",
            &token,
            "deployments",
            "list",
            "--output",
            "json",
        ],
    )
    .await?;
    let id = listed.json()[0]["id"]
        .as_str()
        .context("deployment id")?
        .to_string();

    let events = || {
        let (addr, token, id) = (controller.addr.clone(), token.clone(), id.clone());
        async move {
            let shown = belay_e2e::show_deployment(&addr, &["--token-file", &token], &id).await?;
            Ok::<Vec<String>, anyhow::Error>(belay_e2e::rollback_requests(&shown))
        }
    };
    let arrived = wait_long(
        "the alert's rollback request",
        std::time::Duration::from_secs(90),
        || async { Ok(!events().await?.is_empty()) },
    )
    .await;
    if let Err(e) = arrived {
        bail!("{e}\n{}\n{}", am.log().await, prom.log().await);
    }
    let latency = failed_at.elapsed();
    // Measured, not asserted (no timing thresholds in tests): the number the runbook's
    // latency budget is checked against.
    eprintln!(
        "alert latency (probe threshold crossed -> rollback requested), 1 s scrape and evaluation: {latency:?}"
    );
    let logged = events().await?;
    assert!(
        logged[0].starts_with("rollback requested by alert BelayProbeUnhealthy ("),
        "{logged:?}"
    );
    assert!(
        !logged
            .iter()
            .any(|m| m.starts_with("rollback request unavailable")),
        "the controller has a routed RollbackService: {logged:?}"
    );
    assert_eq!(
        logged
            .iter()
            .filter(|m| m.starts_with("rollback requested"))
            .count(),
        1,
        "one request, however often Alertmanager delivers: {logged:?}"
    );
    // The agent rolled the target back: V1's undo ran, and the controller's record says so.
    let step = || {
        let (addr, token, id) = (controller.addr.clone(), token.clone(), id.clone());
        async move {
            let shown = belay_e2e::show_deployment(&addr, &["--token-file", &token], &id).await?;
            Ok::<String, anyhow::Error>(
                shown["targets"][0]["step"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        }
    };
    let ended = wait_long(
        "the alert's rollback to end",
        std::time::Duration::from_secs(90),
        || async {
            Ok(matches!(
                step().await?.as_str(),
                "rolled_back" | "escalated"
            ))
        },
    )
    .await;
    if let Err(e) = ended {
        bail!("{e}\n{:?}", events().await?);
    }
    assert_eq!(step().await?, "rolled_back", "{:?}", events().await?);
    let orders = belay_e2e::psql(
        &db.url,
        "SELECT count(*) FROM pg_tables WHERE tablename = 'bad'",
    );
    assert_eq!(orders, "0", "V1 undone: bad dropped");
    // The rollback's verification watched the probe again: it passed, and the alert
    // resolves.
    let resolved = wait_long(
        "BelayProbeUnhealthy to resolve",
        std::time::Duration::from_secs(90),
        || async {
            Ok(get(&prom_addr, "/api/v1/alerts")
                .await
                .is_some_and(|(c, b)| c == 200 && !b.contains("BelayProbeUnhealthy")))
        },
    )
    .await;
    if let Err(e) = resolved {
        bail!("{e}\n{}", prom.log().await);
    }
    drop((am, prom));
    Ok(())
}
