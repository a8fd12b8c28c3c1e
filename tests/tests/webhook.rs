//! The controller's Alertmanager webhook over HTTP, with the real binaries: a real fleet
//! deployment (controller, agent, PostgreSQL), then Alertmanager's payloads posted to
//! `POST /webhooks/alertmanager` on the controller's `--http-listen` address.

use anyhow::{Context, Result, ensure};
use belay_e2e::{Daemon, belay, controller, examples};
use belay_testkit::Cluster;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn free_addr() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

/// `POST path` with `body` (and a bearer token), as Alertmanager sends it: the status
/// code and the JSON body of the answer.
async fn post(addr: &str, path: &str, body: &[u8], token: Option<&str>) -> Result<(u16, Value)> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: belay\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let status: u16 = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status line in {out:?}"))?;
    let json = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim())
        .unwrap_or_default();
    Ok((status, serde_json::from_str(json).unwrap_or(Value::Null)))
}

fn payload(alerts: &[Value]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "receiver": "belay-controller", "status": "firing", "alerts": alerts,
        "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093", "version": "4",
        "groupKey": "{}/{action=\"rollback\"}:{alertname=\"BelayProbeUnhealthy\"}",
        "truncatedAlerts": 0
    }))
    .unwrap_or_default()
}

fn alert(name: &str, fingerprint: &str, labels: Value) -> Value {
    let mut l = labels;
    l["alertname"] = json!(name);
    json!({
        "status": "firing", "labels": l,
        "annotations": { "summary": "probe checkout of wh_1 is unhealthy" },
        "startsAt": "2026-12-02T05:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus:9090/graph", "fingerprint": fingerprint
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn alertmanager_deliveries_request_one_rollback_and_malformed_payloads_nothing() -> Result<()>
{
    let tmp = tempfile::tempdir()?;
    let db = Cluster::shared().create_database().await?;
    let ex = examples();
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, "webhook-token\n")?;
    let http = free_addr()?;
    let store = tmp
        .path()
        .join("controller.db")
        .to_string_lossy()
        .into_owned();
    let token_arg = token_file.to_string_lossy().into_owned();
    let c = controller(
        &store,
        &["--http-listen", &http, "--token-file", &token_arg],
    )
    .await?;
    let cfg = belay_e2e::agent_config_with(
        tmp.path(),
        "agent-1",
        &c.addr,
        &format!("token_file = \"{token_arg}\""),
        &[],
    )?;
    // A rollback takes an emergency backup first: the target has a place for it.
    let mut text = std::fs::read_to_string(&cfg)?;
    text.push_str(&belay_e2e::target_toml(
        "wh_1",
        &db,
        &ex,
        &format!(
            "backup_dir = \"{}\"\n[targets.rollback]\nsettle = \"300ms\"\n",
            tmp.path().join("backups").display()
        ),
    ));
    std::fs::write(&cfg, text)?;
    let _agent = belay_e2e::agent(&cfg).await?;
    let cli = |args: &[&str]| {
        let mut v = vec!["--token-file", token_arg.as_str()];
        v.extend_from_slice(args);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    belay_e2e::wait_agents_with(&c.addr, 1, &["--token-file", &token_arg]).await?;
    let args = cli(&["deploy", "--targets", "wh_1", "--output", "json"]);
    let r = belay(
        &c.addr,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await?;
    ensure!(r.code == 0, "deploy: {r:?}");
    let id = r.json()["id"]
        .as_str()
        .context("deployment id")?
        .to_string();
    let events = |id: String| {
        let (addr, token) = (c.addr.clone(), token_arg.clone());
        async move {
            let shown = belay_e2e::show_deployment(&addr, &["--token-file", &token], &id).await?;
            Ok::<Vec<String>, anyhow::Error>(belay_e2e::rollback_requests(&shown))
        }
    };
    let path = "/webhooks/alertmanager";
    let good = payload(&[alert(
        "BelayProbeUnhealthy",
        "3f2a1b",
        json!({ "belay_target": "wh_1" }),
    )]);

    // No token: 401, nothing recorded.
    let (status, body) = post(&http, path, &good, None).await?;
    assert_eq!(status, 401, "{body}");
    // Malformed payloads: 400 naming what is wrong, nothing recorded.
    for (bad, names) in [
        (b"{\"version\": \"4\", \"alerts\": [".to_vec(), "not JSON"),
        (
            br#"{"version": "3", "alerts": []}"#.to_vec(),
            "`version` is \"3\"",
        ),
        (
            br#"{"version": "4", "status": "firing"}"#.to_vec(),
            "no `alerts`",
        ),
        (
            br#"{"version": "4", "alerts": [{"status": "burning"}]}"#.to_vec(),
            "alerts[0].status",
        ),
    ] {
        let (status, body) = post(&http, path, &bad, Some("webhook-token")).await?;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains(names)),
            "{names}: {body}"
        );
    }
    assert_eq!(events(id.clone()).await?, Vec::<String>::new());

    // The same alert three times, then two other alerts naming the same deployment.
    let mut claims = Vec::new();
    for _ in 0..3 {
        let (status, body) = post(&http, path, &good, Some("webhook-token")).await?;
        assert_eq!(status, 200, "{body}");
        claims.push(
            body["requests"][0]["claim"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    let others = payload(&[
        alert(
            "BelayMigrationFailed",
            "77aa01",
            json!({ "belay_deployment": &id[..8] }),
        ),
        alert(
            "BelayLongLockWait",
            "77aa02",
            json!({ "belay_deployment": &id, "belay_target": "wh_1" }),
        ),
    ]);
    let (status, body) = post(&http, path, &others, Some("webhook-token")).await?;
    assert_eq!(status, 200, "{body}");
    for r in body["requests"].as_array().into_iter().flatten() {
        claims.push(r["claim"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(
        claims,
        ["first", "duplicate", "duplicate", "duplicate", "duplicate"]
    );
    // The one request started the rollback of wh_1 on its agent.
    assert_eq!(body["requests"][0]["state"], "started", "{body}");
    assert_eq!(body["requests"][1]["deliveries"], 5, "{body}");
    let logged = events(id.clone()).await?;
    assert_eq!(logged.len(), 2, "{logged:?}");
    assert_eq!(
        logged[0],
        "rollback requested by alert BelayProbeUnhealthy (3f2a1b)"
    );
    assert!(
        logged[1].starts_with("rollback request started"),
        "{logged:?}"
    );
    let step = || {
        let (addr, token, id) = (c.addr.clone(), token_arg.clone(), id.clone());
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
    belay_e2e::wait_for("the alert's rollback to end", || async {
        Ok(matches!(
            step().await?.as_str(),
            "rolled_back" | "escalated"
        ))
    })
    .await?;
    assert_eq!(step().await?, "rolled_back");
    // Delivered again after the rollback: a duplicate, nothing more happens.
    let (status, body) = post(&http, path, &good, Some("webhook-token")).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["requests"][0]["claim"], "duplicate", "{body}");
    assert_eq!(events(id.clone()).await?.len(), 2);

    // An id matching nothing can never succeed: 422 with the reason.
    let unknown = payload(&[alert("X", "1", json!({ "belay_deployment": "ffffffff" }))]);
    let (status, body) = post(&http, path, &unknown, Some("webhook-token")).await?;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["errors"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("matches no deployment")),
        "{body}"
    );

    // /metrics is still served on the same listener.
    let mut s = tokio::net::TcpStream::connect(&http).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: belay\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    assert!(
        out.starts_with("HTTP/1.1 200") && out.contains("belay_agents_connected"),
        "{out}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_listen_still_works_as_an_alias() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let http = free_addr()?;
    let store = tmp
        .path()
        .join("controller.db")
        .to_string_lossy()
        .into_owned();
    let _c: Daemon = controller(&store, &["--metrics-listen", &http]).await?;
    let (status, body) = post(&http, "/webhooks/alertmanager", b"[]", None).await?;
    assert_eq!(status, 400, "{body}");
    let help = std::process::Command::new(belay_e2e::binary("belay-controller")?)
        .arg("--help")
        .output()?;
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--http-listen <ADDR>") && help.contains("--metrics-listen is an alias"),
        "{help}"
    );
    assert!(help.contains("--alert-grace <DURATION>"), "{help}");
    Ok(())
}
