//! `belay locks` against real lock conflicts, `belay lint`, and lint in `plan` and
//! `migrate` (refusal, `-- belay:allow=`).

mod support;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// The finding of `rule` in a `plan --output json` step.
fn step_finding<'a>(plan: &'a serde_json::Value, step: usize, rule: &str) -> &'a serde_json::Value {
    plan["steps"][step]["lint"]
        .as_array()
        .and_then(|l| l.iter().find(|f| f["rule"] == rule))
        .unwrap_or_else(|| panic!("{rule} in step {step}: {plan:#}"))
}

fn is_relation(v: &serde_json::Value, table: &str) -> bool {
    v.as_str()
        .is_some_and(|r| r == table || r == format!("public.{table}"))
}

/// Polls `locks --output json` until `ok` holds for the document (10 s at most).
fn locks_until(
    url: &str,
    args: &[&str],
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let dir = migrations(&[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut all = vec!["locks", "--output", "json"];
        all.extend_from_slice(args);
        let doc = belay_ok(url, dir.path(), &all).json();
        if ok(&doc) || Instant::now() > deadline {
            return doc;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn locks_shows_the_blocking_tree_and_a_three_level_chain() {
    let db = db();
    psql(&db.url, "CREATE TABLE t (a int); CREATE TABLE u (a int);");
    let mut root = Session::open(&db.url);
    let root_pid = root.pid();
    root.run("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE;");
    // The child holds u and waits for t; the grandchild waits for u, behind the child.
    let mut child = Session::open(&db.url);
    let child_pid = child.pid();
    child.run("BEGIN; LOCK TABLE u IN ACCESS EXCLUSIVE MODE;");
    child.send("SELECT count(*) FROM t;");
    let mut grandchild = Session::open(&db.url);
    let grandchild_pid = grandchild.pid();
    grandchild.send("SELECT count(*) FROM u;");

    let chain_complete = |doc: &serde_json::Value| {
        doc["trees"].as_array().is_some_and(|t| {
            t.len() == 1 && t[0]["children"][0]["children"][0]["pid"] == grandchild_pid
        })
    };
    let doc = locks_until(&db.url, &[], chain_complete);
    for key in [
        "trees",
        "long_running",
        "idle_in_transaction",
        "replication",
    ] {
        assert!(doc[key].is_array(), "{key} in {doc:#}");
    }
    let trees = doc["trees"].as_array().expect("trees");
    assert_eq!(trees.len(), 1, "one root blocker: {doc:#}");
    let r = &trees[0];
    assert_eq!(r["pid"], root_pid, "{doc:#}");
    assert_eq!(r["mode"], "AccessExclusiveLock", "{doc:#}");
    assert!(is_relation(&r["relation"], "t"), "{doc:#}");
    assert!(
        r["waiting_ms"].is_null(),
        "the root waits for no one: {doc:#}"
    );
    assert!(
        r["query"]
            .as_str()
            .is_some_and(|q| q.contains("LOCK TABLE t"))
    );
    let c = &r["children"][0];
    assert_eq!(c["pid"], child_pid, "{doc:#}");
    assert_eq!(c["mode"], "AccessShareLock", "{doc:#}");
    assert!(is_relation(&c["relation"], "t"), "{doc:#}");
    assert!(c["waiting_ms"].is_u64(), "{doc:#}");
    assert!(c["query"].as_str().is_some_and(|q| q.contains("FROM t")));
    let g = &c["children"][0];
    assert_eq!(g["pid"], grandchild_pid, "{doc:#}");
    assert_eq!(g["mode"], "AccessShareLock", "{doc:#}");
    assert!(is_relation(&g["relation"], "u"), "{doc:#}");
    assert!(g["waiting_ms"].is_u64(), "{doc:#}");
    assert_eq!(g["children"].as_array().map(Vec::len), Some(0));

    // Text: the same tree, indented root → child → grandchild.
    let dir = migrations(&[]);
    let text = belay_ok(&db.url, dir.path(), &["locks"]).stdout;
    assert!(text.contains("blocking trees: 1"), "{text}");
    let line_of = |pid: i64| {
        text.lines()
            .find(|l| l.contains(&format!("pid {pid} ")))
            .unwrap_or_else(|| panic!("pid {pid} in {text}"))
            .to_string()
    };
    assert!(
        line_of(root_pid).starts_with(&format!("pid {root_pid} ")),
        "{text}"
    );
    assert!(line_of(root_pid).contains("holds AccessExclusiveLock on"));
    assert!(
        line_of(child_pid).starts_with("└─ pid"),
        "child one level down: {text}"
    );
    assert!(line_of(child_pid).contains("waits "));
    assert!(
        line_of(grandchild_pid).starts_with("   └─ pid"),
        "grandchild two levels down: {text}"
    );
    assert!(text.contains("long-running queries"), "{text}");
    assert!(
        text.contains("replication: no streaming replicas"),
        "{text}"
    );

    // Another database of the same server sees no tree, unless asked for all databases.
    let other = support::db();
    let mine = belay_ok(&other.url, dir.path(), &["locks", "--output", "json"]).json();
    assert_eq!(mine["trees"].as_array().map(Vec::len), Some(0), "{mine:#}");
    let all = belay_ok(
        &other.url,
        dir.path(),
        &["locks", "--output", "json", "--all-databases"],
    )
    .json();
    assert!(
        all["trees"]
            .as_array()
            .is_some_and(|t| t.iter().any(|n| n["pid"] == root_pid)),
        "{all:#}"
    );

    // --min-wait leaves out trees whose longest wait is shorter.
    let quiet = belay_ok(
        &db.url,
        dir.path(),
        &["locks", "--output", "json", "--min-wait", "1h"],
    )
    .json();
    assert_eq!(quiet["trees"].as_array().map(Vec::len), Some(0));

    root.run("COMMIT;");
    let doc = locks_until(&db.url, &[], |d| {
        d["trees"].as_array().is_some_and(|t| t.is_empty())
    });
    // The child got t and still holds u in its open transaction: the grandchild waits for it.
    let trees = doc["trees"].as_array().expect("trees");
    assert!(trees.is_empty() || trees[0]["pid"] == child_pid, "{doc:#}");
    child.run("COMMIT;");
}

#[test]
fn locks_watch_prints_one_json_object_per_sample_until_interrupted() {
    let db = db();
    let dir = migrations(&[]);
    let mut c = belay_cmd(&db.url, dir.path())
        .args(["locks", "--watch", "--period", "100ms", "--output", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn belay");
    let mut out = BufReader::new(c.stdout.take().expect("stdout"));
    for _ in 0..3 {
        let mut line = String::new();
        assert!(out.read_line(&mut line).expect("read") > 0, "a sample line");
        let v: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON per line");
        assert!(v["trees"].is_array() && v["replication"].is_array(), "{v}");
    }
    let status = Command::new("kill")
        .args(["-INT", &c.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(status.success());
    let o = c.wait_with_output().expect("wait belay");
    assert_eq!(o.status.code(), Some(0), "Ctrl-C ends the watch cleanly");
}

#[test]
fn locks_in_remote_mode_asks_the_controller_not_the_local_url() {
    let db = db();
    let dir = migrations(&[]);
    // The local URL is ignored: the sample comes from the target's agent, here through a
    // controller that cannot be reached (remote mode end to end: tests/monitor.rs).
    let r = belay(
        &db.url,
        dir.path(),
        &["--controller", "127.0.0.1:1", "--target", "x", "locks"],
    );
    assert_eq!(r.code, 69, "{r:?}");
    assert!(
        r.stderr.contains("cannot reach controller at 127.0.0.1:1"),
        "{r:?}"
    );
}

#[test]
fn lint_flags_create_index_without_concurrently_and_passes_the_safe_form() {
    let db = db();
    let unsafe_dir = migrations(&[
        ("V1__idx.sql", "CREATE INDEX t_a_idx ON t (a);\n"),
        ("U1__idx.sql", "DROP INDEX CONCURRENTLY t_a_idx;\n"),
    ]);
    let r = belay(
        &db.url,
        unsafe_dir.path(),
        &["lint", "--format", "compiler"],
    );
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stdout
            .contains("V1__idx.sql:1:1: error[create-index-concurrently]: "),
        "{r:?}"
    );
    // The undo's DROP INDEX CONCURRENTLY inside a transaction is linted too.
    assert!(
        r.stdout
            .contains("U1__idx.sql:1:1: error[concurrently-in-transaction]: "),
        "{r:?}"
    );

    // JSON: an array of findings with the documented keys; --output json means the same.
    for args in [
        &["lint", "--format", "json"][..],
        &["--output", "json", "lint"][..],
    ] {
        let r = belay(&db.url, unsafe_dir.path(), args);
        assert_eq!(r.code, 2, "{r:?}");
        let doc = r.json();
        let f = doc
            .as_array()
            .expect("array")
            .iter()
            .find(|f| f["rule"] == "create-index-concurrently")
            .unwrap_or_else(|| panic!("{doc:#}"));
        assert!(
            f["file"]
                .as_str()
                .is_some_and(|p| p.ends_with("V1__idx.sql"))
        );
        assert_eq!(f["line"], 1);
        assert_eq!(f["severity"], "error");
        assert!(
            f["message"]
                .as_str()
                .is_some_and(|m| m.contains("CONCURRENTLY"))
        );
        assert!(
            f["hint"]
                .as_str()
                .is_some_and(|h| h.contains("CONCURRENTLY"))
        );
    }

    let safe = migrations(&[
        (
            "V1__idx.sql",
            "-- belay:no-transaction\nCREATE INDEX CONCURRENTLY t_a_idx ON t (a);\n",
        ),
        (
            "U1__idx.sql",
            "-- belay:no-transaction\nDROP INDEX CONCURRENTLY t_a_idx;\n",
        ),
    ]);
    let r = belay_ok(&db.url, safe.path(), &["lint", "--format", "compiler"]);
    assert_eq!(r.stdout, "", "{r:?}");
    // A single file, given as a path, is linted with its migration's context.
    let file = safe.path().join("V1__idx.sql");
    belay_ok(
        &db.url,
        safe.path(),
        &["lint", file.to_str().expect("utf-8")],
    );

    // The examples lint clean of blocking findings.
    let examples =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/migrations");
    let r = belay_ok(&db.url, &examples, &["lint", "--format", "json"]);
    let doc = r.json();
    assert!(
        doc.as_array()
            .expect("array")
            .iter()
            .all(|f| f["severity"] != "error"),
        "{doc:#}"
    );
}

#[test]
fn lint_reports_unparseable_sql_with_file_and_line() {
    let db = db();
    let dir = migrations(&[
        ("V1__ok.sql", "CREATE TABLE ok (id int);\n"),
        ("V2__bad.sql", "SELECT 1;\n\nCREATE TABLE (;\n"),
    ]);
    let r = belay(&db.url, dir.path(), &["lint", "--format", "json"]);
    assert_eq!(r.code, 2, "{r:?}");
    let doc = r.json();
    let f = doc
        .as_array()
        .expect("array")
        .iter()
        .find(|f| f["rule"] == "parse-error")
        .unwrap_or_else(|| panic!("{doc:#}"));
    assert!(
        f["file"]
            .as_str()
            .is_some_and(|p| p.ends_with("V2__bad.sql"))
    );
    assert_eq!(f["line"], 3, "{doc:#}");
    assert_eq!(f["severity"], "error");
    let r = belay(&db.url, dir.path(), &["lint", "--format", "compiler"]);
    assert!(r.stdout.contains("V2__bad.sql:3:"), "{r:?}");
    assert!(r.stdout.contains("error[parse-error]"), "{r:?}");
}

#[test]
fn an_allow_directive_must_name_a_known_rule() {
    let db = db();
    let dir = migrations(&[(
        "V1__idx.sql",
        "-- belay:allow=create-index-concurently typo\nCREATE INDEX t_a_idx ON t (a);\n",
    )]);
    let r = belay(&db.url, dir.path(), &["lint"]);
    assert_eq!(r.code, 65, "{r:?}");
    assert!(r.stderr.contains("names no lint rule"), "{r:?}");
    let dir = migrations(&[(
        "V1__idx.sql",
        "-- belay:allow=create-index-concurrently\nCREATE INDEX t_a_idx ON t (a);\n",
    )]);
    let r = belay(&db.url, dir.path(), &["lint"]);
    assert_eq!(r.code, 65, "a reason is required: {r:?}");
    assert!(r.stderr.contains("needs a reason"), "{r:?}");
}

#[test]
fn migrate_refuses_a_lint_error_until_a_directive_allows_it() {
    let db = db();
    let dir = migrations(&[("V1__t.sql", "CREATE TABLE t (a int);\n")]);
    belay_ok(&db.url, dir.path(), &["migrate", "--backup", "none"]);
    // Over the small-table threshold (10 000 rows): an empty t would be downgraded.
    psql(
        &db.url,
        "INSERT INTO t SELECT generate_series(1, 20000); ANALYZE t;",
    );
    let v2 = dir.path().join("V2__idx.sql");
    std::fs::write(
        &v2,
        "-- index for lookups\nCREATE INDEX t_a_idx ON t (a);\n",
    )
    .expect("write");

    // plan shows the finding under the step, and in each step's `lint` in JSON.
    let r = belay_ok(&db.url, dir.path(), &["plan"]);
    assert!(
        r.stdout
            .contains("V2__idx.sql:2: error[create-index-concurrently]"),
        "{r:?}"
    );
    let plan = belay_ok(&db.url, dir.path(), &["plan", "--output", "json"]).json();
    assert_eq!(
        step_finding(&plan, 0, "create-index-concurrently")["rule"],
        "create-index-concurrently",
        "{plan:#}"
    );
    assert_eq!(
        step_finding(&plan, 0, "create-index-concurrently")["line"],
        2,
        "{plan:#}"
    );

    let r = belay(&db.url, dir.path(), &["migrate", "--backup", "none"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("V2__idx.sql:2:1"), "{r:?}");
    assert!(r.stderr.contains("create-index-concurrently"), "{r:?}");
    assert!(
        r.stderr
            .contains("-- belay:allow=create-index-concurrently <why it is safe>"),
        "says how to allow it: {r:?}"
    );
    assert!(r.stderr.contains("nothing was applied"), "{r:?}");
    assert_eq!(
        states(&db.url, dir.path()),
        [
            ("1".into(), "success".into()),
            ("2".into(), "pending".into())
        ]
    );
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*) FROM pg_indexes WHERE indexname = 't_a_idx'"
        ),
        "0"
    );
    let r = belay(
        &db.url,
        dir.path(),
        &["migrate", "--backup", "none", "--output", "json"],
    );
    assert_eq!(r.code, 2, "{r:?}");
    assert_eq!(r.json()["exit_code"], 2);

    std::fs::write(
        &v2,
        "-- index for lookups\n-- belay:allow=create-index-concurrently small table, built at deploy\nCREATE INDEX t_a_idx ON t (a);\n",
    )
    .expect("write");
    let r = belay_ok(&db.url, dir.path(), &["plan"]);
    assert!(
        r.stdout.contains("allows create-index-concurrently"),
        "{r:?}"
    );
    assert!(
        r.stdout.contains("allowed: small table, built at deploy"),
        "{r:?}"
    );
    let plan = belay_ok(&db.url, dir.path(), &["plan", "--output", "json"]).json();
    assert_eq!(
        step_finding(&plan, 0, "create-index-concurrently")["allowed"],
        "small table, built at deploy"
    );
    assert_eq!(
        plan["steps"][0]["directives"]["allow"]["create-index-concurrently"],
        "small table, built at deploy"
    );
    let r = belay_ok(&db.url, dir.path(), &["migrate", "--backup", "none"]);
    assert!(
        r.stderr.contains("allowed: small table, built at deploy"),
        "{r:?}"
    );
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*) FROM pg_indexes WHERE indexname = 't_a_idx'"
        ),
        "1"
    );
    assert_eq!(
        states(&db.url, dir.path()),
        [
            ("1".into(), "success".into()),
            ("2".into(), "success".into())
        ]
    );
}

#[test]
fn no_lint_skips_the_gate_and_tables_new_in_the_same_run_are_not_live() {
    let db = db();
    // Both pending in one run: t is new and empty when the index is built.
    let dir = migrations(&[
        ("V1__t.sql", "CREATE TABLE t (a int);\n"),
        ("V2__idx.sql", "CREATE INDEX t_a_idx ON t (a);\n"),
    ]);
    belay_ok(&db.url, dir.path(), &["migrate", "--backup", "none"]);
    // t is live now, and over the small-table threshold.
    psql(
        &db.url,
        "INSERT INTO t SELECT generate_series(1, 20000); ANALYZE t;",
    );

    std::fs::write(
        dir.path().join("V3__idx.sql"),
        "CREATE INDEX t_a2_idx ON t (a);\n",
    )
    .expect("write");
    let r = belay(&db.url, dir.path(), &["migrate", "--backup", "none"]);
    assert_eq!(r.code, 2, "{r:?}");
    let r = belay_ok(
        &db.url,
        dir.path(),
        &["migrate", "--backup", "none", "--no-lint"],
    );
    assert!(r.stderr.contains("--no-lint"), "{r:?}");
    assert_eq!(
        psql(
            &db.url,
            "SELECT count(*) FROM pg_indexes WHERE indexname = 't_a2_idx'"
        ),
        "1"
    );
}
