//! Transport security end to end: mTLS between controller and agents, a bearer token for
//! every caller, and no secret in any output of a whole run.

use anyhow::Result;
use belay_e2e::{Daemon, TargetDef, agent_config_with, belay, wait_agents_with, wait_for};
use belay_proto::v1 as pb;
use belay_testkit::Cluster;
use belay_testkit::pki::TestPki;
use std::path::Path;

const DB_PASSWORD: &str = "Pa55w0rd-never-logged";
const TOKEN: &str = "tok-4f1c9a7e-never-logged";

#[tokio::test(flavor = "multi_thread")]
async fn mtls_and_tokens_guard_every_hop_and_no_secret_is_ever_printed() -> Result<()> {
    let pki = TestPki::new()?;
    let tmp = tempfile::tempdir()?;
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n"))?;
    let wrong_token = tmp.path().join("wrong");
    std::fs::write(&wrong_token, "not-the-token\n")?;
    let db = Cluster::shared().create_database().await?;
    // The test cluster trusts every local login, so the password is never checked; what
    // matters is that it never shows up anywhere.
    let url = db
        .url
        .replace("postgres@", &format!("postgres:{DB_PASSWORD}@"));
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/migrations");
    let s = |p: &Path| p.to_string_lossy().into_owned();

    let mut c = Daemon::start(
        "belay-controller",
        &[
            "--listen",
            "127.0.0.1:0",
            "--store",
            &s(&tmp.path().join("c.db")),
            "--heartbeat-interval",
            "200ms",
            "--tls-ca",
            &s(&pki.ca),
            "--tls-cert",
            &s(&pki.server_cert),
            "--tls-key",
            &s(&pki.server_key),
            "--token-file",
            &s(&token_file),
        ],
        &[],
    )
    .await?;
    let (_, agent_cert, agent_key) = pki.agent_files("agent-1")?;
    let tls = format!(
        "token_file = \"{}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        s(&token_file),
        s(&pki.ca),
        s(&agent_cert),
        s(&agent_key)
    );
    // The [tls] table must come after the top-level keys and before [[targets]].
    let cfg = agent_config_with(
        tmp.path(),
        "agent-1",
        &c.addr,
        &tls,
        &[TargetDef {
            name: "sec_1",
            url: &url,
            migrations: &ex,
            environment: None,
        }],
    )?;
    let mut a = Daemon::start(
        "belay-agent",
        &["--listen", "127.0.0.1:0", "--config", &s(&cfg)],
        &[],
    )
    .await?;
    let ca = s(&pki.ca);
    let good = ["--ca", ca.as_str(), "--token-file", &s(&token_file)];
    wait_agents_with(&c.addr, 1, &good).await?;
    let mut outputs = String::new();

    // No token, a wrong token: refused by the controller, exit 77.
    let r = belay(&c.addr, &["--ca", &ca, "agents"]).await?;
    assert_eq!(r.code, 77, "{r:?}");
    assert!(r.stderr.contains("missing bearer token"), "{r:?}");
    outputs.push_str(&format!("{r:?}"));
    let r = belay(
        &c.addr,
        &[
            "--ca",
            &ca,
            "--token-file",
            &s(&wrong_token),
            "deploy",
            "--targets",
            "sec_1",
        ],
    )
    .await?;
    assert_eq!(r.code, 77, "{r:?}");
    assert!(r.stderr.contains("invalid bearer token"), "{r:?}");
    outputs.push_str(&format!("{r:?}"));
    // Plain text to a TLS controller: no connection, and the message says why and what
    // to pass (not "h2 protocol error").
    let r = belay(&c.addr, &["--token-file", &s(&token_file), "agents"]).await?;
    assert_eq!(r.code, 69, "{r:?}");
    assert!(
        r.stderr.contains("it speaks TLS and this call did not")
            && r.stderr.contains("pass --ca FILE")
            && r.stderr.contains("--tls-server-name NAME"),
        "{r:?}"
    );
    outputs.push_str(&format!("{r:?}"));
    // Straight to the agent with the token but without a client certificate: the agent
    // only talks to holders of a certificate from its CA.
    let r = belay(
        &a.addr,
        &[
            "--ca",
            &ca,
            "--tls-server-name",
            "127.0.0.1",
            "--token-file",
            &s(&token_file),
            "--target",
            "sec_1",
            "status",
        ],
    )
    .await?;
    assert_eq!(r.code, 69, "{r:?}");
    outputs.push_str(&format!("{r:?}"));

    // With the right credentials everything works, across both mTLS hops.
    let mut args = good.to_vec();
    args.extend(["deploy", "--targets", "sec_1"]);
    let r = belay(&c.addr, &args).await?;
    assert_eq!(r.code, 0, "{r:?}");
    outputs.push_str(&format!("{r:?}"));
    let mut args = good.to_vec();
    args.extend(["--target", "sec_1", "status", "--output", "json"]);
    let r = belay(&c.addr, &args).await?;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.json()
            .as_array()
            .is_some_and(|a| a.iter().all(|m| m["state"] == "success"))
    );
    outputs.push_str(&format!("{r:?}"));

    let (_, agent_log) = a.stop().await?;
    let (_, controller_log) = c.stop().await?;
    let everything = format!("{outputs}\n{agent_log}\n{controller_log}");
    assert!(
        agent_log.contains("registered with the controller"),
        "agent log is not the whole run: {agent_log}"
    );
    assert!(
        !everything.contains(DB_PASSWORD),
        "the database password leaked:\n{everything}"
    );
    assert!(
        !everything.contains(TOKEN),
        "the token leaked:\n{everything}"
    );
    Ok(())
}

/// `[tls]` and the token for an agent presenting `cert`/`key`.
fn agent_tls(token_file: &Path, ca: &Path, cert: &Path, key: &Path) -> String {
    format!(
        "token_file = \"{}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        token_file.display(),
        ca.display(),
        cert.display(),
        key.display()
    )
}

/// The controller's `ControllerService` over mTLS with `cert`/`key` as the client's
/// certificate, and the token on every call.
async fn controller_client(
    addr: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<
    pb::controller_service_client::ControllerServiceClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            impl tonic::service::Interceptor + use<>,
        >,
    >,
> {
    let tls = tonic::transport::ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(ca)?))
        .identity(tonic::transport::Identity::from_pem(
            std::fs::read(cert)?,
            std::fs::read(key)?,
        ));
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect()
        .await?;
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {TOKEN}").parse()?;
    Ok(
        pb::controller_service_client::ControllerServiceClient::with_interceptor(
            channel,
            move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", bearer.clone());
                Ok(req)
            },
        ),
    )
}

fn registration(name: &str, target: &str) -> pb::RegisterAgentRequest {
    pb::RegisterAgentRequest {
        name: name.to_string(),
        address: "127.0.0.1:1".to_string(),
        version: "test".to_string(),
        targets: vec![pb::TargetInfo {
            name: target.to_string(),
            ..Default::default()
        }],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_registers_only_under_the_name_its_certificate_carries() -> Result<()> {
    let pki = TestPki::new()?;
    let tmp = tempfile::tempdir()?;
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n"))?;
    let db = Cluster::shared().create_database().await?;
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/migrations");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let mut c = Daemon::start(
        "belay-controller",
        &[
            "--listen",
            "127.0.0.1:0",
            "--store",
            &s(&tmp.path().join("c.db")),
            "--heartbeat-interval",
            "200ms",
            "--tls-ca",
            &s(&pki.ca),
            "--tls-cert",
            &s(&pki.server_cert),
            "--tls-key",
            &s(&pki.server_key),
            "--token-file",
            &s(&token_file),
        ],
        &[],
    )
    .await?;
    let (_, b_cert, b_key) = pki.agent_files("b")?;
    let (_, c_cert, c_key) = pki.agent_files("c")?;

    // Agent "a" holds the token and a valid certificate, but one issued for "b".
    let spoof_cfg = agent_config_with(
        tmp.path(),
        "a",
        &c.addr,
        &agent_tls(&token_file, &pki.ca, &b_cert, &b_key),
        &[TargetDef {
            name: "spoofed",
            url: &db.url,
            migrations: &ex,
            environment: None,
        }],
    )?;
    let mut spoof = Daemon::start(
        "belay-agent",
        &["--listen", "127.0.0.1:0", "--config", &s(&spoof_cfg)],
        &[],
    )
    .await?;
    wait_for("the spoofing agent's refusal", || async {
        Ok(spoof
            .log_so_far()
            .contains("cannot register with the controller"))
    })
    .await?;
    let spoof_log = spoof.log_so_far();
    assert!(
        spoof_log.contains("is not an identity of the certificate it presented (identities: b)"),
        "{spoof_log}"
    );
    let controller_log = c.log_so_far();
    assert!(
        controller_log
            .contains("refused an agent whose certificate does not carry the name it claims")
            && controller_log.contains("identities: b"),
        "{controller_log}"
    );

    // The same call made by hand: PermissionDenied, for registrations and heartbeats.
    let mut with_b = controller_client(&c.addr, &pki.ca, &b_cert, &b_key).await?;
    let refused = with_b
        .register_agent(registration("a", "spoofed"))
        .await
        .expect_err("a name the certificate does not carry is refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains(r#""a""#) && refused.message().contains("identities: b"),
        "{refused:?}"
    );

    // The agent whose certificate carries its name registers.
    let b_cfg = agent_config_with(
        tmp.path(),
        "b",
        &c.addr,
        &agent_tls(&token_file, &pki.ca, &b_cert, &b_key),
        &[TargetDef {
            name: "owned_by_b",
            url: &db.url,
            migrations: &ex,
            environment: None,
        }],
    )?;
    let _b = Daemon::start(
        "belay-agent",
        &["--listen", "127.0.0.1:0", "--config", &s(&b_cfg)],
        &[],
    )
    .await?;
    let ca = s(&pki.ca);
    let creds = ["--ca", ca.as_str(), "--token-file", &s(&token_file)];
    wait_agents_with(&c.addr, 1, &creds).await?;
    let mut args = creds.to_vec();
    args.extend(["agents", "--output", "json"]);
    let r = belay(&c.addr, &args).await?;
    assert_eq!(r.code, 0, "{r:?}");
    let doc = r.json();
    let names: Vec<&str> = doc
        .as_array()
        .map(|a| a.iter().filter_map(|x| x["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, vec!["b"], "only the matching agent is listed: {r:?}");
    assert!(!r.stdout.contains("spoofed"), "{r:?}");

    // b's certificate cannot heartbeat for another agent either.
    let hb = with_b
        .heartbeat(pb::HeartbeatRequest { name: "c".into() })
        .await
        .expect_err("a heartbeat under another name is refused");
    assert_eq!(hb.code(), tonic::Code::PermissionDenied, "{hb:?}");

    // Agent "c", rightly named, claims a target agent "b" owns and is alive: refused,
    // naming the owner; b keeps it.
    let mut with_c = controller_client(&c.addr, &pki.ca, &c_cert, &c_key).await?;
    let owned = with_c
        .register_agent(registration("c", "owned_by_b"))
        .await
        .expect_err("a target owned by a live agent is refused");
    assert_eq!(owned.code(), tonic::Code::FailedPrecondition, "{owned:?}");
    assert!(
        owned
            .message()
            .contains(r#"target "owned_by_b" belongs to agent "b""#),
        "{owned:?}"
    );
    let r = belay(&c.addr, &args).await?;
    let agents = r.json();
    let list = agents.as_array().cloned().unwrap_or_default();
    assert_eq!(list.len(), 1, "{r:?}");
    assert_eq!(list[0]["name"], "b", "{r:?}");
    assert!(r.stdout.contains("owned_by_b"), "{r:?}");

    spoof.stop().await?;
    c.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plaintext_controller_says_names_are_asserted_and_a_tls_client_is_told_it_has_no_tls()
-> Result<()> {
    let tmp = tempfile::tempdir()?;
    let pki = TestPki::new()?;
    let mut c = Daemon::start(
        "belay-controller",
        &[
            "--listen",
            "127.0.0.1:0",
            "--store",
            &tmp.path().join("c.db").to_string_lossy(),
        ],
        &[],
    )
    .await?;
    // `--ca` against a controller without TLS: the message says it does not speak TLS.
    let r = belay(&c.addr, &["--ca", &pki.ca.to_string_lossy(), "agents"]).await?;
    assert_eq!(r.code, 69, "{r:?}");
    assert!(
        r.stderr.contains("does not speak TLS") && r.stderr.contains("leave out --ca"),
        "{r:?}"
    );
    let (_, log) = c.stop().await?;
    assert!(
        log.contains("agent identities are asserted, not checked"),
        "{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_controller_calls_an_agent_only_at_an_endpoint_presenting_that_agents_certificate()
-> Result<()> {
    let pki = TestPki::new()?;
    let tmp = tempfile::tempdir()?;
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n"))?;
    let db = Cluster::shared().create_database().await?;
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/migrations");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let tls_args = [
        "--tls-ca".to_string(),
        s(&pki.ca),
        "--tls-cert".to_string(),
        s(&pki.server_cert),
        "--tls-key".to_string(),
        s(&pki.server_key),
        "--token-file".to_string(),
        s(&token_file),
    ];

    // A shared agent certificate name is refused before anything runs.
    let out = tokio::process::Command::new(belay_e2e::binary("belay-controller")?)
        .args(["--listen", "127.0.0.1:0", "--store"])
        .arg(tmp.path().join("refused.db"))
        .args(&tls_args)
        .args(["--agent-tls-name", "belay-agent"])
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("--agent-tls-name \"belay-agent\" is no longer accepted")
            && stderr.contains("DNS SAN is its `name`"),
        "{stderr}"
    );
    assert!(!tmp.path().join("refused.db").exists(), "it ran: {stderr}");

    let store = s(&tmp.path().join("c.db"));
    let mut args = vec!["--listen", "127.0.0.1:0", "--store", &store];
    args.extend(tls_args.iter().map(String::as_str));
    let mut c = Daemon::start("belay-controller", &args, &[]).await?;
    let (_, b_cert, b_key) = pki.agent_files("b")?;
    let (_, c_cert, c_key) = pki.agent_files("c")?;
    let b_cfg = agent_config_with(
        tmp.path(),
        "b",
        &c.addr,
        &agent_tls(&token_file, &pki.ca, &b_cert, &b_key),
        &[TargetDef {
            name: "owned_by_b",
            url: &db.url,
            migrations: &ex,
            environment: None,
        }],
    )?;
    let mut b = Daemon::start(
        "belay-agent",
        &["--listen", "127.0.0.1:0", "--config", &s(&b_cfg)],
        &[],
    )
    .await?;
    let ca = s(&pki.ca);
    let creds = ["--ca", ca.as_str(), "--token-file", &s(&token_file)];
    wait_agents_with(&c.addr, 1, &creds).await?;

    // Each agent's own certificate is verified against its own name: b is reachable.
    let mut status_b = creds.to_vec();
    status_b.extend(["--target", "owned_by_b", "status"]);
    let r = belay(&c.addr, &status_b).await?;
    assert_eq!(r.code, 0, "{r:?}");

    // "c" registers rightly (its certificate carries "c") but advertises b's endpoint,
    // which presents b's certificate: the controller refuses to talk to it.
    let mut with_c = controller_client(&c.addr, &pki.ca, &c_cert, &c_key).await?;
    let mut reg = registration("c", "owned_by_c");
    reg.address = b.addr.clone();
    with_c.register_agent(reg).await?;
    with_c
        .heartbeat(pb::HeartbeatRequest { name: "c".into() })
        .await?;
    let mut status_c = creds.to_vec();
    status_c.extend(["--target", "owned_by_c", "status"]);
    let r = belay(&c.addr, &status_c).await?;
    assert_eq!(r.code, 69, "{r:?}");
    assert!(
        r.stderr.contains("agent c at") && r.stderr.contains("certificate"),
        "{r:?}"
    );
    let b_log = b.log_so_far();
    assert!(!b_log.contains("owned_by_c"), "b was called for c: {b_log}");

    b.stop().await?;
    c.stop().await?;
    Ok(())
}
