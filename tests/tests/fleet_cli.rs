//! The small things a user of the fleet CLI hits: `deployments show` with an id prefix
//! (unknown: exit 66), `belay agents` naming each target's environment, and a deployment
//! whose events outgrow a default gRPC message.

use anyhow::Result;
use belay_e2e::{TargetDef, agent, agent_config, belay, controller, examples, wait_agents};
use belay_testkit::Cluster;

#[tokio::test(flavor = "multi_thread")]
async fn deployments_show_takes_a_prefix_and_agents_show_environments() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (db1, db2) = (
        Cluster::shared().create_database().await?,
        Cluster::shared().create_database().await?,
    );
    let ex = examples();
    let store = tmp
        .path()
        .join("controller.db")
        .to_string_lossy()
        .into_owned();
    let c = controller(&store, &[]).await?;
    let a = agent_config(
        tmp.path(),
        "agent-1",
        &c.addr,
        &[
            TargetDef {
                name: "shop_staging",
                url: &db1.url,
                migrations: &ex,
                environment: Some("staging"),
            },
            TargetDef {
                name: "shop_plain",
                url: &db2.url,
                migrations: &ex,
                environment: None,
            },
        ],
    )?;
    let _a = agent(&a).await?;
    wait_agents(&c.addr, 1).await?;

    let r = belay(&c.addr, &["agents"]).await?;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("shop_staging (staging)"), "{r:?}");
    assert!(r.stdout.contains("shop_plain (no environment)"), "{r:?}");
    let r = belay(&c.addr, &["agents", "--output", "json"]).await?;
    let env = &r.json()[0]["target_environments"];
    assert_eq!(env["shop_staging"], "staging", "{r:?}");
    assert!(env["shop_plain"].is_null(), "{r:?}");

    let r = belay(&c.addr, &["deploy", "--targets", "shop_staging"]).await?;
    assert_eq!(r.code, 0, "{r:?}");
    let id = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("deployment "))
        .and_then(|l| l.split(':').next())
        .expect("id")
        .to_string();

    // A unique prefix finds it, as locally.
    let r = belay(
        &c.addr,
        &["deployments", "show", &id[..8], "--output", "json"],
    )
    .await?;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["id"], id.as_str(), "{r:?}");

    // A prefix nothing starts with, and a well-formed id nobody recorded: 66, not 64.
    let other = if id.starts_with('f') { "eeee" } else { "ffff" };
    for missing in [other, "00000000-0000-4000-8000-000000000000"] {
        let r = belay(&c.addr, &["deployments", "show", missing]).await?;
        assert_eq!(r.code, 66, "{missing}: {r:?}");
        assert!(r.stderr.contains("no deployment"), "{r:?}");
    }
    // Too short to mean one deployment, or not an id at all: usage.
    for bad in ["ab", "not-an-id"] {
        let r = belay(&c.addr, &["deployments", "show", bad]).await?;
        assert_eq!(r.code, 64, "{bad}: {r:?}");
    }
    Ok(())
}

/// A deployment to a thousand targets stores megabytes of events (9 MiB at 1,000 in
/// `bench fleet`). Following it asked the controller for every event again at the end,
/// in one reply past gRPC's 4 MiB default, and `deploy` failed after the deployment had
/// succeeded; `deployments show` of it failed the same way.
#[tokio::test(flavor = "multi_thread")]
async fn a_deployment_whose_events_outgrow_a_grpc_message_can_be_followed_and_shown() -> Result<()>
{
    let tmp = tempfile::tempdir()?;
    let db = Cluster::shared().create_database().await?;
    let ex = examples();
    let store_path = tmp
        .path()
        .join("controller.db")
        .to_string_lossy()
        .into_owned();
    let c = controller(&store_path, &[]).await?;
    let a = agent_config(
        tmp.path(),
        "agent-1",
        &c.addr,
        &[TargetDef {
            name: "shop",
            url: &db.url,
            migrations: &ex,
            environment: None,
        }],
    )?;
    let _a = agent(&a).await?;
    wait_agents(&c.addr, 1).await?;
    let r = belay(
        &c.addr,
        &["deploy", "--targets", "shop", "--output", "json"],
    )
    .await?;
    assert_eq!(r.code, 0, "{r:?}");
    let id = r.json()["id"].as_str().expect("id").to_string();

    // 5 MiB more of the target's notes, as a fleet's worth of targets would leave.
    let store = belay_store::Store::open(&store_path).await?;
    let note = "x".repeat(100 << 10);
    for _ in 0..50 {
        store
            .append_event(&belay_store::NewEvent {
                deployment_id: id.parse()?,
                target: Some("shop".into()),
                kind: "note".into(),
                message: note.clone(),
                payload: serde_json::json!({}),
            })
            .await?;
    }
    store.close().await;

    // The controller leaves the events out when asked to (what a follow asks).
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", c.addr))?
        .connect()
        .await?;
    let mut history = belay_proto::v1::history_service_client::HistoryServiceClient::new(channel)
        .max_decoding_message_size(64 << 20);
    for without_events in [true, false] {
        let d = history
            .get_deployment(belay_proto::v1::GetDeploymentRequest {
                id: id.clone(),
                without_events,
            })
            .await?
            .into_inner();
        assert_eq!(d.targets.len(), 1);
        assert_eq!(d.events.is_empty(), without_events, "{}", d.events.len());
    }

    let r = belay(&c.addr, &["deployments", "watch", &id, "--output", "json"]).await?;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc = r.json();
    assert_eq!(doc["state"], "succeeded", "{}", r.stderr);
    let events = doc["events"].as_array().expect("events");
    assert!(events.len() > 50, "{} events", events.len());
    assert_eq!(doc["targets"][0]["state"], "succeeded");
    // Each target's events, as `deployments show` gives them, from what was streamed.
    let per_target = doc["targets"][0]["events"].as_array().map_or(0, Vec::len);
    assert!(per_target > 50, "{per_target} events under the target");

    let r = belay(&c.addr, &["deployments", "show", &id, "--output", "json"]).await?;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let shown = r.json()["targets"][0]["events"]
        .as_array()
        .map_or(0, Vec::len);
    let streamed = events.iter().filter(|e| e["target"] == "shop").count();
    assert_eq!(
        shown, streamed,
        "show lists every event of the target the watch streamed"
    );
    Ok(())
}
