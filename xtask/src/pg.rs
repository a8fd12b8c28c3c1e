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

/// Build-time system libraries the workspace needs: libclang, for the bindgen step of
/// `pg_query` (belay-lint's real PostgreSQL parser). Installed from Debian's packages when
/// missing and running as root.
pub fn ensure_build_deps() -> Result<()> {
    if libclang_present() {
        return Ok(());
    }
    if !belay_testkit::running_as_root() {
        bail!(
            "libclang not found (pg_query's build needs it); install it with `sudo apt-get \
             install libclang-dev`, or set LIBCLANG_PATH to the directory holding libclang.so"
        );
    }
    step(Command::new("apt-get").arg("update"))?;
    step(
        Command::new("apt-get")
            .args(["install", "-y", "libclang-dev"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    if !libclang_present() {
        bail!("libclang still missing after `apt-get install libclang-dev`; set LIBCLANG_PATH");
    }
    Ok(())
}

fn libclang_present() -> bool {
    // On Debian, ask the package manager: the image may carry libclang-cpp (a different
    // library) or the runtime libclang without the headers bindgen needs.
    if let Ok(out) = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "libclang-dev"])
        .output()
    {
        return String::from_utf8_lossy(&out.stdout).contains("install ok installed");
    }
    let is_libclang = |name: &str| {
        name.starts_with("libclang.so")
            || name
                .strip_prefix("libclang-")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
    };
    let has_lib = |dir: &std::path::Path| {
        std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .filter_map(Result::ok)
                .any(|e| is_libclang(&e.file_name().to_string_lossy()))
        })
    };
    if let Some(dir) = std::env::var_os("LIBCLANG_PATH") {
        return has_lib(std::path::Path::new(&dir));
    }
    let llvm_dirs = std::fs::read_dir("/usr/lib")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("llvm-"))
                .map(|e| e.path().join("lib"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    llvm_dirs.iter().any(|d| has_lib(d))
}
