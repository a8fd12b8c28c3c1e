//! What belay prints, whoever reads it: a reader that goes away early changes nothing but
//! the output, and the README's exit-code table lists every code the binaries use.

mod support;
use std::process::Stdio;
use support::*;

/// Runs belay with stdout and stderr on pipes whose read ends are already closed: every
/// write belay makes fails with EPIPE, as after `| head` has read what it wanted.
fn with_readers_gone(url: &str, dir: &std::path::Path, args: &[&str]) -> std::process::ExitStatus {
    let (out_r, out_w) = std::io::pipe().expect("pipe");
    let (err_r, err_w) = std::io::pipe().expect("pipe");
    drop(out_r);
    drop(err_r);
    belay_cmd(url, dir)
        .args(args)
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w))
        .status()
        .expect("run belay")
}

#[test]
fn a_reader_that_closes_early_neither_panics_belay_nor_stops_its_work() {
    let db = db();
    let files: Vec<(String, String)> = (1..=30)
        .map(|i| {
            (
                format!("V{i}__t{i}.sql"),
                format!("CREATE TABLE t{i} (id int);"),
            )
        })
        .collect();
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_str()))
        .collect();
    let dir = migrations(&files);

    // migrate prints every step and migration into the closed pipes, and still applies
    // all thirty (SIGPIPE's default would have killed it at its first line).
    let status = with_readers_gone(
        &db.url,
        dir.path(),
        &["migrate", "--backup", "none", "--no-preflight"],
    );
    assert_eq!(status.code(), Some(0), "{status:?}");
    let applied = psql(
        &db.url,
        "SELECT count(*) FROM belay.schema_history WHERE success",
    );
    assert_eq!(applied.trim(), "30");

    // status: thirty lines into a closed pipe, exit 0 — and no panic, which would exit 70
    // (and, without the guard, 101 with "failed printing to stdout").
    let status = with_readers_gone(&db.url, dir.path(), &["status"]);
    assert_eq!(status.code(), Some(0), "{status:?}");

    // An error, too, keeps its documented code when nobody reads stderr.
    let status = with_readers_gone(&db.url, dir.path(), &["undo", "--to", "nope"]);
    let r = belay(&db.url, dir.path(), &["undo", "--to", "nope"]);
    assert_ne!(r.code, 0, "{r:?}");
    assert_eq!(status.code(), Some(r.code), "{r:?}");

    // And a reader that stays sees everything, in order.
    let r = belay_ok(&db.url, dir.path(), &["status"]);
    assert_eq!(r.stdout.matches("success").count(), 30, "{r:?}");
    assert!(!r.stderr.contains("panicked"), "{r:?}");
}

/// `pub const NAME: u8 = N;` lines of a source file.
fn codes_in(source: &str) -> Vec<(String, u8)> {
    source
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("pub const ")?;
            let (name, value) = rest.split_once(": u8 = ")?;
            Some((
                name.to_string(),
                value.trim_end_matches(';').trim().parse().ok()?,
            ))
        })
        .collect()
}

#[test]
fn the_readme_exit_code_table_lists_every_code_the_binaries_use() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let read = |p: &str| std::fs::read_to_string(format!("{root}/{p}")).expect(p);
    let main = read("bins/belay/src/main.rs");
    let exit_mod = &main[main.find("mod exit {").expect("mod exit in main.rs")..];
    let exit_mod = &exit_mod[..exit_mod.find("\n}").expect("end of mod exit")];
    let mut used = codes_in(exit_mod);
    used.extend(codes_in(&read("bins/belay/src/backfill_cmd.rs")));
    let daemon = read("crates/belay-rpc/src/daemon.rs");
    let daemon_exit = &daemon[daemon.find("pub mod exit {").expect("daemon exit")..];
    used.extend(codes_in(
        &daemon_exit[..daemon_exit.find("\n}").expect("end")],
    ));
    assert!(used.len() >= 15, "found only {used:?}");

    let readme = read("README.md");
    let table = &readme[readme.find("### Exit codes").expect("exit code section")..];
    let table: Vec<u8> = table
        .lines()
        .skip_while(|l| !l.starts_with("| code"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| {
            l.trim_start_matches('|')
                .split('|')
                .next()?
                .trim()
                .parse()
                .ok()
        })
        .collect();
    for (name, code) in &used {
        assert!(
            table.contains(code),
            "exit code {code} ({name}) is missing from README's table {table:?}"
        );
    }
    for code in &table {
        assert!(
            *code == 0 || used.iter().any(|(_, c)| c == code),
            "README lists exit code {code}, which no binary uses ({used:?})"
        );
    }
}
