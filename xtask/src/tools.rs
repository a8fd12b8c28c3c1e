//! Other migration tools the test suite runs for real: `belay adopt` is tested against
//! the history a real dbmate writes. Installed once into a cache under the target
//! directory, from npm's prebuilt binary.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{step, target_dir};

/// The dbmate release the tests were written against.
const DBMATE_VERSION: &str = "2.36.0";

/// The environment variable that tells the tests where dbmate is.
pub const DBMATE_ENV: &str = "BELAY_DBMATE";

/// npm's name for this platform's dbmate package (`@dbmate/<platform>`).
fn dbmate_platform() -> Result<&'static str> {
    Ok(match (std::env::consts::OS, std::env::consts::ARCH) {
        ("linux", "x86_64") => "linux-x64",
        ("linux", "aarch64") => "linux-arm64",
        ("macos", "x86_64") => "darwin-x64",
        ("macos", "aarch64") => "darwin-arm64",
        (os, arch) => bail!(
            "no prebuilt dbmate for {os}/{arch}; install dbmate {DBMATE_VERSION} and set {DBMATE_ENV} to it"
        ),
    })
}

/// The dbmate binary: `BELAY_DBMATE` when set, else the cached npm install, installing
/// it (and node/npm from Debian's packages, when root) only when missing.
pub fn ensure_dbmate() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(DBMATE_ENV) {
        let path = PathBuf::from(path);
        anyhow::ensure!(
            path.is_file(),
            "{DBMATE_ENV}={} is not a file",
            path.display()
        );
        return Ok(path);
    }
    let dir = target_dir().join("tools/dbmate");
    let bin = dir
        .join("node_modules/@dbmate")
        .join(dbmate_platform()?)
        .join("bin/dbmate");
    if bin.is_file() {
        return Ok(bin);
    }
    ensure_npm()?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    step(
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg(format!("dbmate@{DBMATE_VERSION}")),
    )?;
    anyhow::ensure!(
        bin.is_file(),
        "npm installed dbmate {DBMATE_VERSION} but {} is missing",
        bin.display()
    );
    Ok(bin)
}

fn npm_present() -> bool {
    Command::new("npm")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

pub(crate) fn ensure_npm() -> Result<()> {
    if npm_present() {
        return Ok(());
    }
    if !belay_testkit::running_as_root() {
        bail!(
            "npm not found (the tests install dbmate {DBMATE_VERSION} with it); install it with \
             `sudo apt-get install nodejs npm`, or install dbmate yourself and set {DBMATE_ENV}"
        );
    }
    step(Command::new("apt-get").arg("update"))?;
    step(
        Command::new("apt-get")
            .args(["install", "-y", "nodejs", "npm"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    anyhow::ensure!(
        npm_present(),
        "npm still missing after `apt-get install nodejs npm`"
    );
    Ok(())
}
