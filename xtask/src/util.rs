//! Small helpers shared by the tasks.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map_or(manifest.clone(), |p| p.to_path_buf())
}

/// The cargo that runs us (`$CARGO`), so toolchain overrides carry over.
pub fn cargo() -> Command {
    let mut cmd =
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    cmd.current_dir(root());
    // `cargo run` gives us xtask's package variables (CARGO_PKG_NAME=xtask, …). Build
    // scripts such as ring's rerun when these change, so a nested cargo that inherits them
    // rebuilds ring and everything above it, and the next build from a shell does it again.
    for (key, _) in std::env::vars_os() {
        if let Some(k) = key.to_str()
            && is_package_var(k)
        {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// The variables cargo sets for the package it runs, which a shell's cargo does not have.
fn is_package_var(key: &str) -> bool {
    key.starts_with("CARGO_PKG_")
        || matches!(
            key,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
        )
}

/// Where cargo puts build output.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// The `belay` binary of a profile (`debug` or `release`), built first.
pub fn build_belay(release: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "-p", "belay"]);
    if release {
        cmd.arg("--release");
    }
    step(&mut cmd)?;
    let bin = target_dir()
        .join(if release { "release" } else { "debug" })
        .join("belay");
    anyhow::ensure!(bin.is_file(), "{} was not built", bin.display());
    Ok(bin)
}

pub fn heading(text: &str) {
    println!("\n==> {text}");
}

pub fn describe(cmd: &Command) -> String {
    let program = cmd.get_program();
    // `$CARGO` is a long toolchain path; "cargo" says the same.
    let program = match Path::new(program).file_name() {
        Some(name) if name == "cargo" => name,
        _ => program,
    };
    std::iter::once(program)
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints the command as a heading, runs it with inherited output, fails on non-zero exit.
pub fn step(cmd: &mut Command) -> Result<()> {
    let text = describe(cmd);
    heading(&text);
    let status = cmd
        .status()
        .with_context(|| format!("could not run `{text}`"))?;
    if !status.success() {
        bail!("`{text}` failed ({status})");
    }
    Ok(())
}

/// Runs the command capturing its output; a non-zero exit is an error carrying stderr.
pub fn capture(cmd: &mut Command) -> Result<Output> {
    let text = describe(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("could not run `{text}`"))?;
    if !out.status.success() {
        bail!(
            "`{text}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}
