//! `cargo xtask test` and `cargo xtask lint`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::pg::{ensure_build_deps, ensure_postgres};
use crate::util::{cargo, heading, root, step};

pub fn test() -> Result<()> {
    heading("checking PostgreSQL programs");
    let bin = ensure_postgres()?;
    ensure_build_deps()?;
    println!("using {}", bin.display());
    heading("checking other migration tools (for `belay adopt`'s tests)");
    let dbmate = crate::tools::ensure_dbmate()?;
    println!("using {}", dbmate.display());
    heading("checking the tools that check deploy/ (promtool, amtool, tsc, kubernetes-validate)");
    let mut tools = crate::monitoring_tools::ensure_all()?;
    for (_, path) in &tools {
        println!("using {}", path.display());
    }
    tools.push((crate::tools::DBMATE_ENV, dbmate));
    lint()?;
    let (passed, failed, skipped) = run_tests(&tools)?;
    // Last, on the binaries the tests just built: the README's first command must keep
    // telling a true story, and it checks each of its steps' outcomes itself.
    heading("cargo xtask demo (every step's outcome checked)");
    crate::demo::run().context("the demo failed")?;
    println!("\nall checks passed");
    // The last line totals every test binary: CI reads it, and the last line cargo
    // itself prints belongs to a doc-test binary with nothing in it.
    println!("tests: {passed} passed, {failed} failed, {skipped} skipped");
    Ok(())
}

/// `cargo test --workspace` with `tools` (environment variable, path) in its environment,
/// echoed as it runs, with the `test result:` lines totalled, and the tests that skipped
/// themselves (`belay_testkit::skip`) listed at the end: (passed, failed, skipped).
fn run_tests(tools: &[(&str, PathBuf)]) -> Result<(u64, u64, usize)> {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let skipped_log = std::env::current_dir()?.join("target/skipped-tests.txt");
    match std::fs::remove_file(&skipped_log) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            bail!("cannot clear {}: {e}", skipped_log.display())
        }
        _ => {}
    }
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--no-fail-fast"])
        .envs(tools.iter().map(|(k, v)| (k, v)))
        .env(belay_testkit::SKIPPED_LOG_ENV, &skipped_log)
        .stdout(Stdio::piped());
    let text = crate::util::describe(&cmd);
    heading(&text);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not run `{text}`"))?;
    let stdout = child.stdout.take().context("no stdout from cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split([';', '.']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(kind)) = (words.next(), words.next()) {
                    let n: u64 = n.parse().unwrap_or(0);
                    match kind {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{text}`"))?;
    let skipped: Vec<String> = match std::fs::read_to_string(&skipped_log) {
        Ok(t) => t.lines().map(String::from).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => bail!("cannot read {}: {e}", skipped_log.display()),
    };
    if !skipped.is_empty() {
        heading(&format!(
            "{} test(s) skipped their checks on this machine",
            skipped.len()
        ));
        for s in &skipped {
            println!("skipped {s}");
        }
    }
    if !status.success() {
        println!(
            "tests: {passed} passed, {failed} failed, {} skipped",
            skipped.len()
        );
        bail!("`{text}` failed ({status})");
    }
    Ok((passed, failed, skipped.len()))
}

pub fn lint() -> Result<()> {
    ensure_build_deps()?;
    step(cargo().args(["fmt", "--all", "--", "--check"]))?;
    step(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    tidy_step()
}

pub fn tidy_step() -> Result<()> {
    heading("tidy");
    let problems = tidy(&root())?;
    if !problems.is_empty() {
        for problem in &problems {
            eprintln!("{problem}");
        }
        bail!("tidy found {} problem(s)", problems.len());
    }
    println!("tidy ok");
    Ok(())
}

/// Markers that must not be committed: unfinished code, and tests that never run. Built
/// from pieces so this file does not trip over itself if it is ever scanned.
fn forbidden() -> [String; 3] {
    [
        format!("{}!(", "todo"),
        format!("{}!(", "unimplemented"),
        format!("#[{}", "ignore"),
    ]
}

/// Project conventions that rustc and clippy do not check.
fn tidy(root: &Path) -> Result<Vec<String>> {
    let mut problems = Vec::new();

    // Every library opens with a `//!` paragraph saying what it owns and must not do.
    let crates = root.join("crates");
    for entry in
        fs::read_dir(&crates).with_context(|| format!("could not list {}", crates.display()))?
    {
        let lib = entry
            .context("could not read crates/")?
            .path()
            .join("src/lib.rs");
        if !lib.is_file() {
            continue;
        }
        let text = fs::read_to_string(&lib)
            .with_context(|| format!("could not read {}", lib.display()))?;
        if !text.trim_start().starts_with("//!") {
            problems.push(format!(
                "{}: must start with a `//!` paragraph (what the crate owns, what it must not do)",
                lib.display()
            ));
        }
    }

    let patterns = forbidden();
    let mut files = Vec::new();
    rust_files(root, &mut files)?;
    for file in files {
        let text = fs::read_to_string(&file)
            .with_context(|| format!("could not read {}", file.display()))?;
        for (n, line) in text.lines().enumerate() {
            for pattern in &patterns {
                if line.contains(pattern.as_str()) {
                    problems.push(format!(
                        "{}:{}: `{pattern}` is not allowed",
                        file.display(),
                        n + 1
                    ));
                }
            }
        }
    }
    Ok(problems)
}

/// All `.rs` files under `dir`, skipping build output, hidden directories and xtask itself.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("could not list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("could not list {}", dir.display()))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let kind = entry
            .file_type()
            .with_context(|| format!("could not stat {}", path.display()))?;
        if kind.is_dir() {
            if name.starts_with('.') || name == "target" || name == "xtask" {
                continue;
            }
            rust_files(&path, out)?;
        } else if kind.is_file() && name.ends_with(".rs") {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tidy_flags_missing_docs_and_forbidden_markers() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let good = dir.path().join("crates/good/src");
        let bad = dir.path().join("crates/bad/src");
        fs::create_dir_all(&good)?;
        fs::create_dir_all(&bad)?;
        fs::write(good.join("lib.rs"), "//! Owns things.\n\npub fn f() {}\n")?;
        fs::write(
            bad.join("lib.rs"),
            format!("pub fn f() {{ {}!() }}\n", "todo"),
        )?;
        let skipped = dir.path().join("target/debug");
        fs::create_dir_all(&skipped)?;
        fs::write(skipped.join("gen.rs"), format!("#[{}]\n", "ignore"))?;

        let problems = tidy(dir.path())?;
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("bad/src/lib.rs: must start"))
        );
        assert!(problems.iter().any(|p| p.contains("bad/src/lib.rs:1:")));
        Ok(())
    }
}
