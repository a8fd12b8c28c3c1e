//! The incident report sent to webhooks (`[[rollback.notify]]`), through the real binary on
//! real PostgreSQL, to a real HTTP receiver in the test: a generic JSON report and a
//! PagerDuty Events v2 trigger then resolve with one dedup key after a probe fails in the
//! watch window; 5xx retried, 4xx not, each delivery recorded; a secret in a notifier's
//! URL never shown; and `ask`'s recorded command runnable as printed.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    authorization: Option<String>,
    body: serde_json::Value,
}

#[derive(Clone, Default)]
struct State {
    got: Arc<Mutex<Vec<Received>>>,
    /// Per path, the statuses to answer in turn (then 202).
    script: Arc<Mutex<HashMap<String, Vec<u16>>>>,
}

/// An HTTP receiver on 127.0.0.1:0, in a thread of its own (the test drives `belay`
/// synchronously).
struct Receiver {
    port: u16,
    state: State,
}

impl Receiver {
    fn start(script: &[(&str, &[u16])]) -> Receiver {
        let state = State::default();
        {
            let mut s = state.script.lock().expect("the script");
            for (path, statuses) in script {
                s.insert(format!("/{path}"), statuses.to_vec());
            }
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the receiver");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let port = listener.local_addr().expect("its address").port();
        let app_state = state.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the receiver's runtime");
            rt.block_on(async move {
                let app = axum::Router::new()
                    .fallback(axum::routing::post(receive))
                    .with_state(app_state);
                let listener = tokio::net::TcpListener::from_std(listener).expect("the listener");
                axum::serve(listener, app)
                    .await
                    .expect("the receiver serves");
            });
        });
        Receiver { port, state }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    fn got(&self, path: &str) -> Vec<Received> {
        self.state
            .got
            .lock()
            .expect("what the receiver got")
            .iter()
            .filter(|r| r.path == format!("/{path}"))
            .cloned()
            .collect()
    }
}

async fn receive(
    axum::extract::State(state): axum::extract::State<State>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    let path = uri.path().to_string();
    state
        .got
        .lock()
        .expect("what the receiver got")
        .push(Received {
            path: path.clone(),
            authorization: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(String::from),
            body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        });
    let status = {
        let mut script = state.script.lock().expect("the script");
        match script.get_mut(&path) {
            Some(s) if !s.is_empty() => s.remove(0),
            _ => 202,
        }
    };
    axum::http::StatusCode::from_u16(status).expect("a status")
}

fn write(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("write a file");
    p.to_string_lossy().into_owned()
}

/// Polls `cond` until it holds or `limit` passes (then fails naming `what`).
fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

const ACCOUNTS: &str = "CREATE TABLE chaos (id int);
     CREATE TABLE accounts (id serial PRIMARY KEY, name text NOT NULL);
     INSERT INTO accounts (name) VALUES ('a'), ('b');";
const V1: (&str, &str) = (
    "V1__email.sql",
    "ALTER TABLE accounts ADD COLUMN email text;\n",
);
const U1: (&str, &str) = ("U1__email.sql", "ALTER TABLE accounts DROP COLUMN email;\n");

/// A postflight check that blocks once V1 is applied: the deployment fails at
/// validation, and its rollback (auto) runs at once.
const BLOCKING_CHECK: &str = "[[checks]]\nname = \"no_email_yet\"\nquery = \"SELECT count(*) FROM information_schema.columns WHERE table_name = 'accounts' AND column_name = 'email'\"\nexpect = \"zero\"\n";

fn notifications(url: &str, dir: &Path, cfg: &str) -> Vec<serde_json::Value> {
    let status = belay_ok(
        url,
        dir,
        &["--config", cfg, "rollback", "status", "--output", "json"],
    )
    .json();
    status["notifications"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_probe_failing_in_the_watch_sends_the_report_and_a_pagerduty_trigger_then_resolve() {
    let db = db();
    psql(&db.url, ACCOUNTS);
    let dir = migrations(&[V1, U1]);
    let rx = Receiver::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let key = write(tmp.path(), "pd.key", "R0UTINGKEY\n");
    let token = write(tmp.path(), "hook.token", "B3ARERTOKEN\n");
    let cfg = write(
        tmp.path(),
        "belay.toml",
        &format!(
            "[[probes]]\nname = \"app\"\nperiod = \"100ms\"\nfailure_threshold = 3\n[probes.sql]\nurl = \"{}\"\n\
             query = \"SELECT count(*) FROM chaos WHERE EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'accounts' AND column_name = 'email')\"\nexpect = \"zero\"\n\n\
             [rollback]\nsettle = \"300ms\"\n\n\
             [[rollback.notify]]\nurl = \"{}\"\nformat = \"json\"\nbearer_token_file = \"{token}\"\n\n\
             [[rollback.notify]]\nurl = \"{}\"\nformat = \"pagerduty\"\nrouting_key_file = \"{key}\"\ntimeout = \"5s\"\n",
            db.url,
            rx.url("report"),
            rx.url("enqueue"),
        ),
    );
    let child = belay_cmd(&db.url, dir.path())
        .args([
            "--config",
            &cfg,
            "migrate",
            "--watch",
            "60s",
            "--on-failure",
            "rollback",
            "--backup",
            "none",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start belay migrate");
    wait_for("the watch window", Duration::from_secs(60), || {
        belay_testkit::psql(
            &db.url,
            "SELECT count(*) FROM belay.deployments WHERE step = 'watching'",
        )
        .is_ok_and(|s| s.trim() == "1")
    });
    psql(&db.url, "INSERT INTO chaos VALUES (1);");
    let out = child.wait_with_output().expect("wait for belay");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("the deployment was then rolled_back (undo)"),
        "{stderr}"
    );
    // The rollback's own output names each delivery by host; never a secret.
    let host = format!("127.0.0.1:{}", rx.port);
    assert!(
        stdout.contains(&format!("notify json report to {host}: 202")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("notify pagerduty resolve to {host}: 202")),
        "{stdout}"
    );
    for secret in ["R0UTINGKEY", "B3ARERTOKEN"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} shown:\n{stdout}\n{stderr}"
        );
    }
    let id = belay_ok(
        &db.url,
        dir.path(),
        &["rollback", "list", "--output", "json"],
    )
    .json()["deployments"][0]["id"]
        .as_str()
        .expect("a deployment id")
        .to_string();

    // One generic JSON report: the incident report, its Markdown, the bearer token.
    let reports = rx.got("report");
    assert_eq!(reports.len(), 1, "{reports:#?}");
    let r = &reports[0];
    assert_eq!(r.authorization.as_deref(), Some("Bearer B3ARERTOKEN"));
    assert_eq!(r.body["kind"], "belay.incident_report");
    assert_eq!(r.body["deployment_id"], id.as_str());
    assert_eq!(r.body["result"], "rolled_back");
    assert_eq!(r.body["severity"], "P2");
    assert_eq!(r.body["report"]["strategy"], "undo");
    assert_eq!(r.body["report"]["trigger"]["kind"], "probe_threshold");
    assert!(
        r.body["markdown"]
            .as_str()
            .is_some_and(|m| m.starts_with("# Incident: deployment")),
        "{:#}",
        r.body
    );

    // PagerDuty: a trigger as the rollback started, then a resolve with the same key.
    let pd = rx.got("enqueue");
    assert_eq!(pd.len(), 2, "{pd:#?}");
    let (trigger, resolve) = (&pd[0].body, &pd[1].body);
    assert_eq!(pd[0].authorization, None);
    assert_eq!(trigger["routing_key"], "R0UTINGKEY");
    assert_eq!(trigger["event_action"], "trigger");
    let dedup = trigger["dedup_key"].as_str().expect("a dedup key");
    assert!(dedup.contains(&id), "{dedup}");
    assert_eq!(trigger["payload"]["source"], "local");
    assert_eq!(trigger["payload"]["severity"], "error");
    assert!(
        trigger["payload"]["summary"]
            .as_str()
            .is_some_and(|s| s.contains(&id[..8])),
        "{trigger:#}"
    );
    assert!(trigger["payload"]["timestamp"].is_string(), "{trigger:#}");
    assert_eq!(resolve["routing_key"], "R0UTINGKEY");
    assert_eq!(resolve["event_action"], "resolve");
    assert_eq!(resolve["dedup_key"], dedup);

    // Each delivery is on record, and `rollback status` shows it.
    let notes = notifications(&db.url, dir.path(), &cfg);
    let actions: Vec<(&str, &str)> = notes
        .iter()
        .map(|n| (n["format"].as_str().unwrap(), n["action"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [
            ("pagerduty", "trigger"),
            ("json", "report"),
            ("pagerduty", "resolve")
        ],
        "{notes:#?}"
    );
    for n in &notes {
        assert_eq!(n["host"], host.as_str());
        assert_eq!(n["ok"], true);
        assert_eq!(n["status"], 202);
        assert_eq!(n["attempts"], 1);
    }
    let text = belay_ok(
        &db.url,
        dir.path(),
        &["--config", &cfg, "rollback", "status"],
    );
    assert!(text.stdout.contains("notifications:"), "{}", text.stdout);
    assert!(
        text.stdout.contains(&format!(
            "notify pagerduty trigger to {host}: 202 after 1 attempt(s)"
        )),
        "{}",
        text.stdout
    );
}

#[test]
fn a_receiver_failing_with_5xx_is_retried_and_a_4xx_is_not_and_the_rollback_goes_on() {
    let db = db();
    psql(&db.url, ACCOUNTS);
    let dir = migrations(&[V1, U1]);
    let rx = Receiver::start(&[("flaky", &[500, 503]), ("wrong", &[400, 400, 400, 400])]);
    let tmp = tempfile::tempdir().unwrap();
    let key = write(tmp.path(), "pd.key", "R0UTINGKEY\n");
    let cfg = write(
        tmp.path(),
        "belay.toml",
        &format!(
            "{BLOCKING_CHECK}\n[rollback]\nsettle = \"100ms\"\n\n\
             [[rollback.notify]]\nurl = \"{}\"\nformat = \"json\"\nattempts = 3\ntimeout = \"20s\"\n\n\
             [[rollback.notify]]\nurl = \"{}\"\nformat = \"pagerduty\"\nrouting_key_file = \"{key}\"\nattempts = 3\n",
            rx.url("flaky"),
            rx.url("wrong"),
        ),
    );
    let r = belay(
        &db.url,
        dir.path(),
        &[
            "--config",
            &cfg,
            "migrate",
            "--on-failure",
            "rollback",
            "--backup",
            "none",
        ],
    );
    // The deployment failed at validation and was rolled back, receivers or not.
    assert_eq!(r.code, 5, "{r:?}");
    assert!(
        r.stderr
            .contains("the deployment was then rolled_back (undo)"),
        "{r:?}"
    );
    // 500, 503, then 202: three requests, one delivery.
    assert_eq!(rx.got("flaky").len(), 3);
    // 400 to the trigger and to the resolve: one request each, never retried.
    let wrong = rx.got("wrong");
    assert_eq!(wrong.len(), 2, "{wrong:#?}");
    assert_eq!(wrong[0].body["event_action"], "trigger");
    assert_eq!(wrong[1].body["event_action"], "resolve");

    let notes = notifications(&db.url, dir.path(), &cfg);
    assert_eq!(notes.len(), 3, "{notes:#?}");
    let json = notes
        .iter()
        .find(|n| n["format"] == "json")
        .expect("the JSON delivery");
    assert_eq!(json["ok"], true, "{json:#}");
    assert_eq!(json["status"], 202);
    assert_eq!(json["attempts"], 3);
    for n in notes.iter().filter(|n| n["format"] == "pagerduty") {
        assert_eq!(n["ok"], false, "{n:#}");
        assert_eq!(n["status"], 400);
        assert_eq!(n["attempts"], 1);
        assert!(
            n["error"].as_str().is_some_and(|e| e.contains("400")),
            "{n:#}"
        );
    }
    assert_eq!(
        belay_ok(
            &db.url,
            dir.path(),
            &["rollback", "list", "--output", "json"]
        )
        .json()["deployments"][0]["state"],
        "rolled_back"
    );
}

#[test]
fn a_secret_in_a_notifiers_url_is_never_shown() {
    let db = db();
    psql(&db.url, ACCOUNTS);
    let dir = migrations(&[V1, U1]);
    // Always failing: its errors are printed and recorded, and must not carry the URL.
    let rx = Receiver::start(&[("S3CRETPATH", &[500, 500, 500, 500])]);
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("http://hook:Pa55w0rd@127.0.0.1:{}/S3CRETPATH", rx.port);
    // A notifier nobody listens to (connection refused) is a transport error.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let refused = format!("http://hook:Pa55w0rd@127.0.0.1:{closed}/S3CRETPATH");
    let cfg = write(
        tmp.path(),
        "belay.toml",
        &format!(
            "{BLOCKING_CHECK}\n[rollback]\nsettle = \"100ms\"\n\n\
             [[rollback.notify]]\nurl = \"{url}\"\nformat = \"json\"\nattempts = 2\n\n\
             [[rollback.notify]]\nurl = \"{refused}\"\nformat = \"json\"\nattempts = 1\n"
        ),
    );
    let mut shown = Vec::new();
    let r = belay(
        &db.url,
        dir.path(),
        &[
            "--config",
            &cfg,
            "migrate",
            "--on-failure",
            "rollback",
            "--backup",
            "none",
        ],
    );
    assert_eq!(r.code, 5, "{r:?}");
    assert!(
        r.stdout.contains("failed: the receiver answered 500"),
        "{r:?}"
    );
    assert!(r.stdout.contains("failed: cannot connect"), "{r:?}");
    shown.push(format!("{r:?}"));
    for args in [
        vec!["rollback", "status"],
        vec!["rollback", "status", "--output", "json"],
        vec!["config", "check"],
    ] {
        let mut all = vec!["--config", cfg.as_str()];
        all.extend(args);
        shown.push(format!("{:?}", belay(&db.url, dir.path(), &all)));
    }
    // A notifier the config gets wrong is refused naming file, line and key, before
    // anything runs; the URL's secrets stay hidden there too.
    let bad = write(
        tmp.path(),
        "bad.toml",
        &format!(
            "[rollback]\n\n[[rollback.notify]]\nurl = \"{url}\"\nformat = \"json\"\nrouting_key = \"x\"\n"
        ),
    );
    let r = belay(&db.url, dir.path(), &["--config", &bad, "migrate"]);
    assert_eq!(r.code, 64, "{r:?}");
    assert!(
        r.stderr.contains("bad.toml") && r.stderr.contains("routing_key"),
        "{r:?}"
    );
    shown.push(format!("{r:?}"));
    let bad = write(
        tmp.path(),
        "pd.toml",
        &format!("[rollback]\n\n[[rollback.notify]]\nurl = \"{url}\"\nformat = \"pagerduty\"\n"),
    );
    let r = belay(&db.url, dir.path(), &["--config", &bad, "migrate"]);
    assert_eq!(r.code, 64, "{r:?}");
    assert!(
        r.stderr.contains("pd.toml") && r.stderr.contains("routing_key_file"),
        "{r:?}"
    );
    shown.push(format!("{r:?}"));
    for text in &shown {
        assert!(
            !text.contains("Pa55w0rd") && !text.contains("S3CRETPATH"),
            "a secret shown:\n{text}"
        );
    }
}

/// Splits a command as `sh` would (single quotes and plain words: what
/// `belay_rollback::shell_quote` writes).
fn sh_words(command: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in command.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                any = false;
            }
            '\\' if !quoted => {}
            c => word.push(c),
        }
    }
    if any || !word.is_empty() {
        words.push(word);
    }
    words
}

#[test]
fn the_command_ask_records_runs_as_printed_from_another_directory() {
    let db = db();
    psql(&db.url, ACCOUNTS);
    let dir = migrations(&[V1, U1]);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(
        tmp.path(),
        "belay.toml",
        &format!("{BLOCKING_CHECK}\n[rollback]\npolicy = \"ask\"\nsettle = \"100ms\"\n"),
    );
    let r = belay(
        &db.url,
        dir.path(),
        &[
            "--config",
            &cfg,
            "migrate",
            "--on-failure",
            "rollback",
            "--backup",
            "none",
        ],
    );
    assert_eq!(r.code, 5, "{r:?}");
    let line = r
        .stdout
        .lines()
        .find_map(|l| {
            l.split_once("to run this plan: ")
                .map(|(_, c)| c.to_string())
        })
        .unwrap_or_else(|| panic!("no command printed: {r:?}"));
    // The same command is on record with the plan.
    let id = belay_ok(
        &db.url,
        dir.path(),
        &["rollback", "list", "--output", "json"],
    )
    .json()["deployments"][0]["id"]
        .as_str()
        .expect("an id")
        .to_string();
    let events = psql(
        &db.url,
        &format!(
            "SELECT payload->>'command' FROM belay.deployment_events WHERE deployment_id = '{id}' AND kind = 'rollback_plan'"
        ),
    );
    assert_eq!(events, line);
    let words = sh_words(&line);
    assert_eq!(words[0], "belay", "{line}");
    assert!(words.contains(&"--dir".to_string()), "{line}");
    // Run as an operator would: from elsewhere, with no belay.toml or migrations there,
    // and nothing but the command's own arguments (the test database's URL has no
    // password, so it is in the command).
    let elsewhere = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BELAY)
        .args(&words[1..])
        .env_remove("BELAY_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .env_remove("BELAY_BACKUP_DIR")
        .current_dir(elsewhere.path())
        .stdin(Stdio::null())
        .output()
        .expect("run the recorded command");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{line}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("rolled_back"), "{stdout}");
    assert_eq!(states(&db.url, dir.path()), [("1".into(), "undone".into())]);
}
