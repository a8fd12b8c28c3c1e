//! Transport security end to end: mTLS between controller and agents, a bearer token for
//! every caller, and no secret in any output of a whole run.

use anyhow::Result;
use belay_e2e::{Daemon, TargetDef, agent_config_with, belay, wait_agents_with};
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
    let tls = format!(
        "token_file = \"{}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        s(&token_file),
        s(&pki.ca),
        s(&pki.server_cert),
        s(&pki.server_key)
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
    // Plain text to a TLS controller: no connection.
    let r = belay(&c.addr, &["--token-file", &s(&token_file), "agents"]).await?;
    assert_eq!(r.code, 69, "{r:?}");
    outputs.push_str(&format!("{r:?}"));
    // Straight to the agent with the token but without a client certificate: the agent
    // only talks to holders of a certificate from its CA.
    let r = belay(
        &a.addr,
        &[
            "--ca",
            &ca,
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
