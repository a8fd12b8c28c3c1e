//! Test support for belay: throwaway PostgreSQL clusters on free ports, fresh databases,
//! and the `psql`/`pg_dump` helpers tests use to inspect them. It owns starting real
//! PostgreSQL servers (as the `postgres` OS user when run as root) and cleaning them up on
//! `Drop`, at process exit, or — as a backstop — when the test process dies. It never
//! touches a server it did not start (such as the service on 127.0.0.1:5432) and must not
//! ship in binaries: only dev-dependencies and `xtask` may depend on it.

mod bins;
mod cluster;
mod error;
mod os;
pub mod pki;
mod template;
mod tools;

pub use bins::{BINDIR_ENV, bin_dir};
pub use cluster::{Cluster, TestDb};
pub use error::Error;
pub use tools::{dump_schema, psql};

/// The environment variable naming the file where skipped tests are listed; `cargo xtask
/// test` sets it and prints the list at the end, so a skip is never silent.
pub const SKIPPED_LOG_ENV: &str = "BELAY_SKIPPED_LOG";

/// Records that `test` did not run its checks here, and why: on stderr (shown with
/// `--nocapture`) and as a line `test: reason` in the file `BELAY_SKIPPED_LOG` names.
/// The caller returns right after.
pub fn skip(test: &str, reason: &str) {
    eprintln!("skipped {test}: {reason}");
    if let Some(log) = std::env::var_os(SKIPPED_LOG_ENV) {
        record_skip(std::path::Path::new(&log), test, reason);
    }
}

fn record_skip(log: &std::path::Path, test: &str, reason: &str) {
    use std::io::Write;
    let line = format!("{test}: {}\n", reason.replace('\n', " "));
    // One write of one line in append mode: tests running in parallel do not interleave.
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("cannot record the skip in {}: {e}", log.display());
    }
}

/// Whether the current process runs as root (effective uid 0). When it does, PostgreSQL
/// processes are started as the `postgres` OS user.
pub fn running_as_root() -> bool {
    os::euid() == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn skips_are_appended_one_line_each() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("skipped.txt");
        super::record_skip(&log, "a", "no tmpfs\nhere");
        super::record_skip(&log, "b", "not root");
        assert_eq!(
            std::fs::read_to_string(&log).expect("log"),
            "a: no tmpfs here\nb: not root\n"
        );
    }
}
