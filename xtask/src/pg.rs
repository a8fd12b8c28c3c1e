//! Making sure the PostgreSQL programs the tests and benchmarks need are installed.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::step;

/// Programs the test suite and benchmarks run from the PostgreSQL bin directory.
const REQUIRED: &[&str] = &[
    "initdb",
    "postgres",
    "psql",
    "pg_dump",
    "pg_restore",
    "pgbench",
];

/// The PostgreSQL bin directory, installing the `postgresql` package with apt-get first
/// when it is missing and we are root.
pub fn ensure_postgres() -> Result<PathBuf> {
    if let Some(dir) = installed() {
        return Ok(dir);
    }
    if std::env::var_os(belay_testkit::BINDIR_ENV).is_some() {
        // The user chose an install explicitly; installing another one would not help.
        match belay_testkit::bin_dir() {
            Err(err) => bail!("{err}"),
            Ok(dir) => bail!(
                "{} (from BELAY_PG_BINDIR) lacks some of {}",
                dir.display(),
                REQUIRED.join(", ")
            ),
        }
    }
    if !belay_testkit::running_as_root() {
        bail!(
            "PostgreSQL programs ({}) not found; install them with `sudo apt-get install \
             postgresql`, or set BELAY_PG_BINDIR to their directory",
            REQUIRED.join(", ")
        );
    }
    step(Command::new("apt-get").arg("update"))?;
    step(
        Command::new("apt-get")
            .args(["install", "-y", "postgresql"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    installed().context(
        "PostgreSQL programs still missing after `apt-get install postgresql`; set \
         BELAY_PG_BINDIR to the directory holding initdb, postgres, psql, pg_dump and pgbench",
    )
}

fn installed() -> Option<PathBuf> {
    let dir = belay_testkit::bin_dir().ok()?;
    REQUIRED
        .iter()
        .all(|tool| dir.join(tool).is_file())
        .then_some(dir)
}
