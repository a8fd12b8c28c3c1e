//! Thin wrappers over the PostgreSQL client programs.

use std::process::{Command, Output, Stdio};

use crate::{Error, bin_dir};

/// Runs `cmd` to completion; a non-zero exit becomes [`Error::Command`] with its stderr.
pub(crate) fn run_checked(cmd: &mut Command, what: &str) -> Result<Output, Error> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(Error::io(format!(
            "could not run `{what}` ({})",
            cmd.get_program().to_string_lossy()
        )))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(Error::Command {
            command: describe(cmd),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A client program from [`bin_dir`], so its version matches the server's.
fn client(name: &str) -> Result<Command, Error> {
    let mut cmd = Command::new(bin_dir()?.join(name));
    // Fail fast instead of hanging when a test server has died.
    cmd.env("PGCONNECT_TIMEOUT", "10");
    Ok(cmd)
}

/// The schema of the database at `url` as `pg_dump --schema-only --no-owner
/// --no-privileges` prints it, minus comment lines and the `\restrict`/`\unrestrict` lines
/// (newer `pg_dump` versions emit them with a random key), so that two dumps of equal
/// schemas compare equal.
pub fn dump_schema(url: &str) -> Result<String, Error> {
    let out = run_checked(
        client("pg_dump")?.args([
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--dbname",
            url,
        ]),
        "pg_dump",
    )?;
    Ok(strip_dump_noise(&String::from_utf8_lossy(&out.stdout)))
}

fn strip_dump_noise(dump: &str) -> String {
    let mut kept = String::with_capacity(dump.len());
    for line in dump.lines() {
        if line.starts_with("--")
            || line.starts_with("\\restrict")
            || line.starts_with("\\unrestrict")
        {
            continue;
        }
        kept.push_str(line);
        kept.push('\n');
    }
    kept
}

/// Runs `sql` with `psql -X -q -At -v ON_ERROR_STOP=1` against `url` and returns its stdout
/// (unaligned, tuples only: one row per line, columns separated by `|`).
pub fn psql(url: &str, sql: &str) -> Result<String, Error> {
    let out = run_checked(
        client("psql")?.args([
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ]),
        "psql",
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_noise_is_stripped() {
        let dump = "--\n-- PostgreSQL database dump\n--\n\\restrict AbC123\nSET x = 1;\n\nCREATE TABLE t (id int);\n\\unrestrict AbC123\n";
        assert_eq!(
            strip_dump_noise(dump),
            "SET x = 1;\n\nCREATE TABLE t (id int);\n"
        );
    }
}
