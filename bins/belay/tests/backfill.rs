//! `belay backfill` through the real binary against real PostgreSQL: interrupted and
//! resumed, refusals that change nothing, `--where`, the JSON summary and the help.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use support::*;

/// `items` and an identical `items_copy`, so a one-shot UPDATE of the copy is the
/// reference for what the backfill must produce.
fn seed(url: &str) {
    psql(
        url,
        "CREATE TABLE items (id int PRIMARY KEY, price int NOT NULL, qty int NOT NULL, total int, note text);
         INSERT INTO items SELECT i, i % 17 + 1, i % 5, NULL, CASE WHEN i % 4 = 0 THEN 'kept' END
           FROM generate_series(1, 200) i;
         CREATE TABLE items_copy AS SELECT * FROM items;
         ALTER TABLE items_copy ADD PRIMARY KEY (id);",
    );
}

/// A digest of a table's whole content, to prove it unchanged.
fn content(url: &str, table: &str) -> String {
    psql(
        url,
        &format!("SELECT md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {table} t"),
    )
}

const SET: &str = "total = price * qty, note = coalesce(note, 'filled')";
const WHERE: &str = "qty > 0";

#[test]
fn interrupted_by_sigint_then_resumed_ends_like_a_one_shot_update() {
    let db = db();
    seed(&db.url);
    let dir = migrations(&[]);
    let mut child = belay_cmd(&db.url, dir.path())
        .args([
            "backfill", "--table", "items", "--set", SET, "--where", WHERE, "--batch", "10",
            "--sleep", "250ms",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn belay");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut seen = String::new();
    // The first progress line means a batch has committed and 19 more, 250 ms apart, are
    // still to come: the signal lands mid-run.
    loop {
        let mut line = String::new();
        let n = stderr.read_line(&mut line).expect("read stderr");
        assert!(n > 0, "belay ended before its first batch:\n{seen}");
        seen.push_str(&line);
        if line.contains(": batch 1: ") {
            break;
        }
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(status.success());
    stderr.read_to_string(&mut seen).expect("read stderr");
    let out = child.wait_with_output().expect("wait belay");
    assert_eq!(
        out.status.code(),
        Some(130),
        "SIGINT exit code; stderr:\n{seen}"
    );
    assert!(
        seen.contains("interrupted: the batch in flight finished; nothing is half-done"),
        "{seen}"
    );

    // What was reported, what was saved and what is in the table agree: whole batches only.
    let saved = psql(
        &db.url,
        "SELECT concat_ws(' ', rows_updated, batches, last_key[1], finished_at IS NULL) FROM belay.backfill_progress",
    );
    let parts: Vec<&str> = saved.split(' ').collect();
    let (rows, batches, last_key) = (parts[0], parts[1], parts[2]);
    assert_eq!(parts[3], "t", "not finished: {saved}");
    assert!(
        seen.contains(&format!(
            "{rows} rows updated in {batches} batches so far, up to key ({last_key})"
        )),
        "{seen}"
    );
    assert_eq!(last_key.parse::<u32>().expect("key") % 10, 0, "{saved}");
    assert!(last_key != "200", "stopped mid-run: {saved}");
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*) FROM items WHERE total IS NOT NULL"
        ),
        rows
    );
    assert_eq!(
        psql(
            &db.url,
            &format!("SELECT count(*) FROM items WHERE total IS NOT NULL AND id > {last_key}")
        ),
        "0"
    );

    // Resume with exactly the command belay printed.
    let resume = seen
        .lines()
        .skip_while(|l| !l.starts_with("resume with:"))
        .nth(1)
        .expect("a resume command")
        .trim()
        .to_string();
    assert!(
        resume.starts_with("belay backfill --table items --set ")
            && resume.contains(" --name items_"),
        "{resume}"
    );
    let bin_dir = Path::new(BELAY).parent().expect("bin dir");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let r = Command::new("sh")
        .args(["-c", &resume])
        .env("PATH", path)
        .env("BELAY_DATABASE_URL", &db.url)
        .env_remove("DATABASE_URL")
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .output()
        .expect("run the resume command");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr),
    );
    assert_eq!(r.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "after key ({last_key}): {rows} rows updated in {batches} batches so far"
        )),
        "{stderr}"
    );
    assert!(stdout.contains(": done: "), "{stdout}");

    // The reference: one UPDATE of the identical copy. Compare row by row.
    psql(
        &db.url,
        &format!("UPDATE items_copy SET {SET} WHERE {WHERE}"),
    );
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*) FROM items i FULL JOIN items_copy c USING (id) \
             WHERE i.id IS NULL OR c.id IS NULL \
                OR (i.price, i.qty, i.total, i.note) IS DISTINCT FROM (c.price, c.qty, c.total, c.note)"
        ),
        "0",
        "backfilled table differs from the one-shot UPDATE"
    );
    assert_eq!(
        psql(&db.url, "SELECT count(*) FROM items WHERE note = 'filled'"),
        "120",
        "the comparison saw real changes"
    );
    assert_eq!(
        psql(
            &db.url,
            "SELECT concat_ws(' ', rows_updated, finished_at IS NOT NULL) FROM belay.backfill_progress"
        ),
        "160 t"
    );

    // Run again: it says it is done and changes nothing.
    let again = belay(
        &db.url,
        dir.path(),
        &[
            "backfill", "--table", "items", "--set", SET, "--where", WHERE, "--batch", "10",
        ],
    );
    assert_eq!(again.code, 0, "{again:?}");
    assert!(
        again.stdout.contains("is already done: 160 rows updated"),
        "{again:?}"
    );
    assert!(again.stdout.contains("--restart"), "{again:?}");
}

#[test]
fn a_table_without_a_primary_key_is_refused_and_left_alone() {
    let db = db();
    psql(
        &db.url,
        "CREATE TABLE events (kind text, n int); INSERT INTO events SELECT 'k' || i, i FROM generate_series(1, 20) i;",
    );
    let before = content(&db.url, "events");
    let dir = migrations(&[]);
    let r = belay(
        &db.url,
        dir.path(),
        &[
            "backfill", "--table", "events", "--set", "n = 0", "--batch", "5",
        ],
    );
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("table public.events has no primary key"),
        "{r:?}"
    );
    assert!(
        r.stderr.contains("ADD PRIMARY KEY"),
        "says what to do: {r:?}"
    );
    assert_eq!(content(&db.url, "events"), before);
    assert!(!history_schema_exists(&db.url), "no progress table either");
}

#[test]
fn a_bad_set_or_where_is_reported_by_option_and_changes_nothing() {
    let db = db();
    seed(&db.url);
    let before = content(&db.url, "items");
    let dir = migrations(&[]);
    let run = |extra: &[&str]| {
        let mut args = vec!["backfill", "--table", "items", "--batch", "10"];
        args.extend_from_slice(extra);
        belay(&db.url, dir.path(), &args)
    };

    let r = run(&["--set", "total = price * nope"]);
    assert_eq!(r.code, 64, "{r:?}");
    assert!(
        r.stderr.contains("--set is not valid for public.items"),
        "{r:?}"
    );
    assert!(r.stderr.contains("column \"nope\" does not exist"), "{r:?}");
    assert!(r.stderr.contains("at character 17 of --set"), "{r:?}");

    // Parsed as one prepared statement: a second command is an error, never run.
    let r = run(&["--set", "total = 1; DROP TABLE items_copy"]);
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("--set is not valid"), "{r:?}");
    assert_eq!(
        psql(&db.url, "SELECT to_regclass('items_copy') IS NOT NULL"),
        "t"
    );

    let r = run(&["--set", "total = 1", "--where", "qty >"]);
    assert_eq!(r.code, 64, "{r:?}");
    assert!(
        r.stderr.contains("--where is not valid for public.items"),
        "{r:?}"
    );

    let r = run(&["--set", "total = 1", "--where", "qty"]);
    assert_eq!(r.code, 64, "{r:?}");
    assert!(
        r.stderr.contains("--where") && r.stderr.contains("boolean"),
        "{r:?}"
    );

    assert_eq!(content(&db.url, "items"), before);
    assert!(!history_schema_exists(&db.url));
}

#[test]
fn where_limits_the_rows_and_json_summarises_the_run() {
    let db = db();
    seed(&db.url);
    let dir = migrations(&[]);
    let r = belay_ok(
        &db.url,
        dir.path(),
        &[
            "--output",
            "json",
            "backfill",
            "--table",
            "items",
            "--set",
            "total = -1",
            "--where",
            "id % 10 = 0",
            "--batch",
            "7",
        ],
    );
    let v = r.json();
    assert!(
        v["name"].as_str().is_some_and(|n| n.starts_with("items_")),
        "{v}"
    );
    assert_eq!(v["table"], "public.items");
    assert_eq!(v["rows_updated"], 20);
    assert_eq!(v["rows_examined"], 200);
    assert_eq!(
        v["batches"], 29,
        "28 full batches of 7, then the last 4 keys"
    );
    assert_eq!(v["done"], true);
    assert_eq!(v["last_key"], serde_json::json!(["200"]));
    assert_eq!(
        psql(
            &db.url,
            "SELECT string_agg(DISTINCT (id % 10 = 0)::text, ',') FROM items WHERE total = -1"
        ),
        "true"
    );
    assert_eq!(
        psql(&db.url, "SELECT count(*) FROM items WHERE total = -1"),
        "20"
    );
    assert_eq!(
        psql(&db.url, "SELECT count(*) FROM items WHERE total IS NULL"),
        "180"
    );
}

#[test]
fn help_teaches_batches_and_resuming() {
    let dir = migrations(&[]);
    let r = belay(
        "postgres://unused@127.0.0.1:1/x",
        dir.path(),
        &["backfill", "--help"],
    );
    assert_eq!(r.code, 0, "{r:?}");
    for needle in [
        "Why batches",
        "lock_timeout",
        "Resuming",
        "run the same command again",
        "--restart",
        "exit 130",
        "--batch <N>",
        "--where <CONDITION>",
        // It works remotely, run by the target's agent.
        "Remote: with --controller ADDR --target NAME",
        "run by the target's\nagent beside the database",
    ] {
        assert!(
            r.stdout.contains(needle),
            "help lacks {needle:?}:\n{}",
            r.stdout
        );
    }
}

/// Spawns `belay backfill …` with piped output and returns it with its stderr reader.
fn spawn_backfill(
    url: &str,
    dir: &Path,
    args: &[&str],
) -> (std::process::Child, BufReader<std::process::ChildStderr>) {
    let mut child = belay_cmd(url, dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn belay");
    let stderr = BufReader::new(child.stderr.take().expect("stderr"));
    (child, stderr)
}

/// Reads stderr into `seen` up to and including the first line containing `needle`.
fn read_until(stderr: &mut BufReader<std::process::ChildStderr>, seen: &mut String, needle: &str) {
    loop {
        let mut line = String::new();
        let n = stderr.read_line(&mut line).expect("read stderr");
        assert!(n > 0, "belay ended before printing {needle:?}:\n{seen}");
        seen.push_str(&line);
        if line.contains(needle) {
            return;
        }
    }
}

fn signal(child: &std::process::Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[test]
fn sigterm_stops_between_batches_with_a_json_summary_and_the_resume_command() {
    let db = db();
    seed(&db.url);
    let dir = migrations(&[]);
    let (child, mut stderr) = spawn_backfill(
        &db.url,
        dir.path(),
        &[
            "--output", "json", "backfill", "--table", "items", "--set", SET, "--where", WHERE,
            "--batch", "10", "--sleep", "250ms",
        ],
    );
    let mut seen = String::new();
    read_until(&mut stderr, &mut seen, ": batch 1: ");
    signal(&child, "-TERM");
    stderr.read_to_string(&mut seen).expect("read stderr");
    let out = child.wait_with_output().expect("wait belay");
    assert_eq!(out.status.code(), Some(143), "SIGTERM exit code:\n{seen}");
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON summary on stdout");
    assert_eq!(v["done"], false, "{v}");
    assert_eq!(v["interrupted"], true, "{v}");
    let saved = psql(
        &db.url,
        "SELECT concat_ws(' ', rows_updated, batches, last_key[1]) FROM belay.backfill_progress",
    );
    assert_eq!(
        format!(
            "{} {} {}",
            v["rows_updated"],
            v["batches"],
            v["last_key"][0].as_str().unwrap_or("?")
        ),
        saved,
        "{v}"
    );
    let resume = v["resume"].as_str().expect("resume command");
    assert!(
        resume.starts_with("belay --output json backfill --table items ")
            && resume.contains(&format!("--name {}", v["name"].as_str().unwrap_or("?"))),
        "{resume}"
    );
}

#[test]
fn a_second_sigint_abandons_the_batch_in_flight_and_postgres_rolls_it_back() {
    let db = db();
    seed(&db.url);
    let dir = migrations(&[]);
    // Row 14 (matching --where) is locked: batch 2 (keys 11..20) waits for it inside its
    // transaction.
    let mut blocker = Session::open(&db.url);
    blocker.run("BEGIN; SELECT id FROM items WHERE id = 14 FOR UPDATE;");
    let (child, mut stderr) = spawn_backfill(
        &db.url,
        dir.path(),
        &[
            "backfill",
            "--table",
            "items",
            "--set",
            SET,
            "--where",
            WHERE,
            "--batch",
            "10",
            "--lock-timeout",
            "30s",
        ],
    );
    let mut seen = String::new();
    read_until(&mut stderr, &mut seen, ": batch 1: ");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while psql(
        &db.url,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'belay-backfill' AND wait_event_type = 'Lock' AND datname = current_database()",
    ) != "1"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "batch 2 never waited for the lock:\n{seen}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    signal(&child, "-INT");
    read_until(
        &mut stderr,
        &mut seen,
        "stopping after the batch in flight commits",
    );
    signal(&child, "-INT");
    stderr.read_to_string(&mut seen).expect("read stderr");
    let out = child.wait_with_output().expect("wait belay");
    assert_eq!(out.status.code(), Some(130), "{seen}");
    assert!(
        seen.contains("stopped at once: the batch in flight was abandoned"),
        "{seen}"
    );
    assert!(
        seen.contains("8 rows updated in 1 batches so far, up to key (10)"),
        "{seen}"
    );
    blocker.run("ROLLBACK;");
    // Batch 2 may have updated rows 11..13 before it waited; none of it is visible.
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*) FROM items WHERE total IS NOT NULL AND id > 10"
        ),
        "0"
    );
    assert_eq!(
        psql(
            &db.url,
            "SELECT concat_ws(' ', rows_updated, batches, last_key::text) FROM belay.backfill_progress"
        ),
        "8 1 {10}"
    );
}
