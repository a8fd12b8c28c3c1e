//! The initialised data directory every cluster is copied from, and the temp-dir hygiene
//! around it. `initdb` costs about a second; copying its result costs a fraction of that,
//! so it runs once per machine (per PostgreSQL build and OS user) and is reused by every
//! test process afterwards.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, Once, OnceLock};

use crate::Error;
use crate::os::{self, RunAs};
use crate::tools::run_checked;

/// Bump when the template's initdb options change, so stale templates are not reused.
const FORMAT: &str = "v1";
/// Every directory this crate creates in the temp dir starts with this.
pub(crate) const PREFIX: &str = "belay-testkit-";
/// Written into a template only once `initdb` has fully succeeded.
const READY_MARKER: &str = "ready";

/// The OS user PostgreSQL processes run as: `None` means "as ourselves"; as root it is the
/// `postgres` user, because PostgreSQL refuses to run as root.
pub(crate) fn run_as() -> Result<Option<RunAs>, Error> {
    if os::euid() != 0 {
        return Ok(None);
    }
    static POSTGRES: OnceLock<Option<RunAs>> = OnceLock::new();
    if let Some(found) = POSTGRES.get() {
        return found.map(Some).ok_or(Error::NoPostgresUser);
    }
    let found =
        os::lookup_user("postgres").map_err(Error::io("could not look up OS user `postgres`"))?;
    POSTGRES
        .get_or_init(|| found)
        .map(Some)
        .ok_or(Error::NoPostgresUser)
}

/// Gives `path` to the server's OS user with `mode`.
pub(crate) fn hand_over(path: &Path, run_as: Option<RunAs>, mode: u32) -> Result<(), Error> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(Error::io(format!("could not chmod {}", path.display())))?;
    if let Some(ids) = run_as {
        std::os::unix::fs::chown(path, Some(ids.uid), Some(ids.gid)).map_err(Error::io(
            format!("could not chown {} to postgres", path.display()),
        ))?;
    }
    Ok(())
}

/// The template data directory for the PostgreSQL in `bin`, created if needed.
pub(crate) fn data_dir(bin: &Path, run_as: Option<RunAs>) -> Result<PathBuf, Error> {
    // Serialises template creation between threads of this process; other processes race
    // safely through the atomic rename below.
    static CACHED: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut cached = CACHED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(dir) = cached.as_ref() {
        return Ok(dir.clone());
    }

    let version = server_version(bin)?;
    let mut hasher = DefaultHasher::new();
    (FORMAT, bin, &version).hash(&mut hasher);
    // "postgres (PostgreSQL) 15.20 (Debian ...)" -> "15.20"; the hash tells builds apart.
    let slug: String = version
        .split_whitespace()
        .find(|word| word.starts_with(|c: char| c.is_ascii_digit()))
        .unwrap_or("unknown")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.')
        .collect();
    let name = format!(
        "{PREFIX}template-pg{slug}-{:016x}-u{}",
        hasher.finish(),
        os::euid()
    );
    let home = std::env::temp_dir().join(name);
    let data = home.join("data");

    if !is_usable(&home, run_as) {
        build(bin, run_as, &home)?;
    }
    *cached = Some(data.clone());
    Ok(data)
}

fn is_usable(home: &Path, run_as: Option<RunAs>) -> bool {
    let data = home.join("data");
    let expected_owner = run_as.map_or_else(os::euid, |ids| ids.uid);
    home.join(READY_MARKER).is_file()
        && data.join("PG_VERSION").is_file()
        // Someone else's directory in a shared /tmp is not ours to trust.
        && fs::metadata(&data).is_ok_and(|m| m.uid() == expected_owner)
}

/// Runs `initdb` in a private staging directory and renames it into place, so concurrent
/// processes never see a half-built template: the first rename wins, later ones discard
/// their copy.
fn build(bin: &Path, run_as: Option<RunAs>, home: &Path) -> Result<(), Error> {
    let tmp = std::env::temp_dir();
    let staging = tempfile::Builder::new()
        .prefix(&format!("{PREFIX}{}-template-", std::process::id()))
        .tempdir_in(&tmp)
        .map_err(Error::io(format!(
            "could not create a directory in {}",
            tmp.display()
        )))?;
    // The server's OS user must traverse into staging to reach its data directory.
    hand_over(staging.path(), None, 0o755)?;
    let data = staging.path().join("data");
    fs::create_dir(&data).map_err(Error::io(format!("could not create {}", data.display())))?;
    hand_over(&data, run_as, 0o700)?;

    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ])
        // Avoid "could not change directory" warnings when the cwd is root's.
        .current_dir(staging.path())
        .stdin(Stdio::null());
    os::prepare_child(&mut initdb, run_as, false);
    run_checked(&mut initdb, "initdb")?;

    let marker = staging.path().join(READY_MARKER);
    fs::write(&marker, b"ok\n")
        .map_err(Error::io(format!("could not write {}", marker.display())))?;

    let staged = staging.keep();
    match fs::rename(&staged, home) {
        Ok(()) => Ok(()),
        Err(_) if is_usable(home, run_as) => {
            // Another process won the race; its template is as good as ours.
            let _ = fs::remove_dir_all(&staged);
            Ok(())
        }
        Err(err) => {
            let _ = fs::remove_dir_all(&staged);
            Err(Error::Io {
                what: format!(
                    "could not move the template data directory into {} (remove it if it is stale)",
                    home.display()
                ),
                source: err,
            })
        }
    }
}

fn server_version(bin: &Path) -> Result<String, Error> {
    let out = run_checked(
        Command::new(bin.join("postgres")).arg("--version"),
        "postgres --version",
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Removes directories left in the temp dir by test processes that died without cleaning
/// up (killed with SIGKILL, for instance). Runs once per process.
pub(crate) fn sweep_stale() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let Some(owner) = name
                .to_str()
                .and_then(|n| n.strip_prefix(PREFIX))
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if owner == std::process::id() || os::alive(owner) {
                continue;
            }
            // The server may have outlived its test process if the death signal was lost;
            // never delete a running server's files.
            if postmaster_pid(&entry.path().join("data")).is_some_and(os::alive) {
                continue;
            }
            let _ = fs::remove_dir_all(entry.path());
        }
    });
}

/// The pid recorded in a data directory's `postmaster.pid`, if any.
pub(crate) fn postmaster_pid(data: &Path) -> Option<u32> {
    fs::read_to_string(data.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}
