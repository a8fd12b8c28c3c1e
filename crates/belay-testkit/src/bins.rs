//! Finding the PostgreSQL binaries.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::Error;

/// Environment variable that overrides where the PostgreSQL binaries are looked up.
pub const BINDIR_ENV: &str = "BELAY_PG_BINDIR";

/// The directory holding the PostgreSQL server binaries (`initdb`, `postgres`, and the
/// clients `psql`, `pg_dump`, `pgbench` that Debian ships beside them).
///
/// Looks at `$BELAY_PG_BINDIR`, then `pg_config --bindir`, then the newest
/// `/usr/lib/postgresql/*/bin` (Debian/Ubuntu), `/usr/pgsql-*/bin` (RHEL) and
/// `/usr/local/pgsql/bin`. The answer is cached for the life of the process.
pub fn bin_dir() -> Result<PathBuf, Error> {
    static FOUND: OnceLock<PathBuf> = OnceLock::new();
    if let Some(dir) = FOUND.get() {
        return Ok(dir.clone());
    }
    let dir = find()?;
    Ok(FOUND.get_or_init(|| dir).clone())
}

fn find() -> Result<PathBuf, Error> {
    let mut searched = Vec::new();
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os(BINDIR_ENV) {
        // An explicit choice that is wrong must not silently fall back to another install.
        let dir = PathBuf::from(dir);
        return if is_server_dir(&dir) {
            Ok(dir)
        } else {
            Err(Error::BinariesNotFound {
                searched: format!("{} (from {BINDIR_ENV})", dir.display()),
            })
        };
    }
    match Command::new("pg_config").arg("--bindir").output() {
        Ok(out) if out.status.success() => {
            let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if !dir.is_empty() {
                candidates.push(PathBuf::from(dir));
            }
        }
        _ => searched.push("pg_config --bindir (not on PATH)".to_owned()),
    }
    candidates.extend(newest_first("/usr/lib/postgresql", "", "/bin"));
    candidates.extend(newest_first("/usr", "pgsql-", "/bin"));
    candidates.push(PathBuf::from("/usr/local/pgsql/bin"));

    for dir in candidates {
        if is_server_dir(&dir) {
            return Ok(dir);
        }
        searched.push(dir.display().to_string());
    }
    Err(Error::BinariesNotFound {
        searched: searched.join(", "),
    })
}

fn is_server_dir(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("postgres").is_file()
}

/// `<parent>/<prefix><version><suffix>` for every entry, highest version first.
fn newest_first(parent: &str, prefix: &str, suffix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut found: Vec<(Vec<u64>, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name.strip_prefix(prefix)?;
            let key = version
                .split('.')
                .map(|part| part.parse::<u64>().ok())
                .collect::<Option<Vec<_>>>()?;
            Some((key, PathBuf::from(format!("{parent}/{name}{suffix}"))))
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0));
    found.into_iter().map(|(_, path)| path).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_version_directory_comes_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        for v in ["9.6", "15", "16", "notaversion"] {
            std::fs::create_dir(dir.path().join(v)).expect("mkdir");
        }
        let parent = dir.path().to_str().expect("utf-8 temp path");
        let found = newest_first(parent, "", "/bin");
        let names: Vec<String> = found
            .iter()
            .map(|p| p.display().to_string().replace(parent, ""))
            .collect();
        assert_eq!(names, ["/16/bin", "/15/bin", "/9.6/bin"]);
    }
}
