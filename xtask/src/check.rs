//! `cargo xtask test` and `cargo xtask lint`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::pg::ensure_postgres;
use crate::util::{cargo, heading, root, step};

pub fn test() -> Result<()> {
    heading("checking PostgreSQL programs");
    let bin = ensure_postgres()?;
    println!("using {}", bin.display());
    lint()?;
    step(cargo().args(["test", "--workspace"]))?;
    println!("\nall checks passed");
    Ok(())
}

pub fn lint() -> Result<()> {
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
