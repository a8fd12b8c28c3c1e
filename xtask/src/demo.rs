//! `cargo xtask demo`: the sample project through a full migrate/undo cycle.

use std::process::Command;

use anyhow::{Context, Result, bail};
use belay_testkit::Cluster;

use crate::pg::{ensure_build_deps, ensure_postgres};
use crate::util::{build_belay, heading, root};

pub fn run() -> Result<()> {
    ensure_postgres()?;
    ensure_build_deps()?;
    let belay = build_belay(false)?;
    let dir = root().join("examples/migrations");
    anyhow::ensure!(dir.is_dir(), "{} does not exist", dir.display());

    heading("starting a throwaway PostgreSQL cluster");
    let cluster = Cluster::start().context("could not start a PostgreSQL cluster")?;
    let db = cluster
        .create_database_blocking()
        .context("could not create the demo database")?;
    println!("database {} ({})", db.name, db.url);

    let steps: [&[&str]; 6] = [
        &["status"],
        &["plan"],
        &["migrate"],
        &["status"],
        &["undo", "--all"],
        &["status"],
    ];
    for args in steps {
        heading(&format!("belay {}", args.join(" ")));
        let status = Command::new(&belay)
            .arg("--dir")
            .arg(&dir)
            .args(args)
            .env("BELAY_DATABASE_URL", &db.url)
            .current_dir(root())
            .status()
            .with_context(|| format!("could not run {}", belay.display()))?;
        if !status.success() {
            bail!("`belay {}` failed ({status})", args.join(" "));
        }
    }
    println!("\ndemo finished");
    Ok(())
}
