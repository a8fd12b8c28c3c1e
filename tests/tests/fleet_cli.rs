//! The small things a user of the fleet CLI hits: `deployments show` with an id prefix
//! (unknown: exit 66), and `belay agents` naming each target's environment.

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
