//! `belay repair` in parts: one migration (`--version`), checksums only, failed rows only;
//! every row it changes says so in its history notes.

mod support;
use support::*;

fn checksum_recorded(url: &str, version: &str) -> String {
    psql(
        url,
        &format!(
            "SELECT checksum FROM belay.schema_history WHERE version = '{version}' AND state = 'success'"
        ),
    )
}

#[test]
fn repair_touches_only_what_it_is_asked_to_and_records_each_change() {
    let db = db();
    let dir = migrations(&[
        ("V1__one.sql", "CREATE TABLE one (id int);"),
        ("V2__two.sql", "CREATE TABLE two (id int);"),
    ]);
    belay_ok(&db.url, dir.path(), &["migrate"]);
    let v1_before = checksum_recorded(&db.url, "1");
    // Two deliberate edits (drift on 1 and 2) and a no-transaction migration that fails
    // half-way (a `failed` row for 3).
    std::fs::write(
        dir.path().join("V1__one.sql"),
        "CREATE TABLE one (id bigint);",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("V2__two.sql"),
        "CREATE TABLE two (id bigint);",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("V3__three.sql"),
        "-- belay:no-transaction\nCREATE TABLE three (id int);\nSELECT 1/0;\n",
    )
    .unwrap();
    let r = belay(&db.url, dir.path(), &["migrate"]);
    assert_eq!(r.code, 2, "drift refuses: {r:?}");
    // Only version 1's checksum: 2 keeps its drift.
    let r = belay_ok(
        &db.url,
        dir.path(),
        &["repair", "--version", "1", "--checksums-only"],
    );
    assert!(
        r.stdout.contains("repaired 1 (V1__one.sql): realigned"),
        "{r:?}"
    );
    assert!(!r.stdout.contains("V2__two"), "{r:?}");
    let v1_after = checksum_recorded(&db.url, "1");
    assert_ne!(v1_after, v1_before);
    let note = psql(
        &db.url,
        "SELECT notes->'repairs'->0->>'action', notes->'repairs'->0->>'from', notes->'repairs'->0->>'to', notes->'repairs'->0 ? 'at' FROM belay.schema_history WHERE version = '1'",
    );
    assert_eq!(note, format!("checksum_realigned|{v1_before}|{v1_after}|t"));
    let r = belay(&db.url, dir.path(), &["validate"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stdout.contains("V2__two.sql: changed") && !r.stdout.contains("V1__one.sql"),
        "{r:?}"
    );

    // Version 2 too, then the failure of 3.
    belay_ok(&db.url, dir.path(), &["repair", "--version", "2"]);
    let r = belay(&db.url, dir.path(), &["migrate"]);
    assert_eq!(r.code, 1, "3 fails: {r:?}");
    // --checksums-only leaves the failed row alone...
    let r = belay_ok(&db.url, dir.path(), &["repair", "--checksums-only"]);
    assert!(r.stdout.contains("nothing to repair"), "{r:?}");
    assert_eq!(
        psql(
            &db.url,
            "SELECT state FROM belay.schema_history WHERE version = '3'"
        ),
        "failed"
    );
    // ... --failed-only sets it aside, saying what it was.
    std::fs::write(
        dir.path().join("V2__two.sql"),
        "CREATE TABLE two (id text);",
    )
    .unwrap();
    let r = belay_ok(&db.url, dir.path(), &["repair", "--failed-only"]);
    assert!(
        r.stdout
            .contains("repaired 3 (V3__three.sql): marked the failed attempt"),
        "{r:?}"
    );
    assert!(
        !r.stdout.contains("V2__two"),
        "the new drift of 2 stays: {r:?}"
    );
    assert_eq!(
        psql(
            &db.url,
            "SELECT state, notes->'repairs'->0->>'action', notes->'repairs'->0->>'was' FROM belay.schema_history WHERE version = '3'"
        ),
        "repaired|set_aside|failed"
    );
    let r = belay(&db.url, dir.path(), &["validate"]);
    assert!(r.stdout.contains("V2__two.sql: changed"), "{r:?}");
    // A second realignment of 2 appends to its notes; the first stays.
    belay_ok(&db.url, dir.path(), &["repair", "--version", "2"]);
    assert_eq!(
        psql(
            &db.url,
            "SELECT jsonb_array_length(notes->'repairs') FROM belay.schema_history WHERE version = '2'"
        ),
        "2"
    );

    // A version no migration has is refused, naming it; the two "only"s exclude each other.
    let r = belay(&db.url, dir.path(), &["repair", "--version", "9"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains('9'), "{r:?}");
    let r = belay(
        &db.url,
        dir.path(),
        &["repair", "--checksums-only", "--failed-only"],
    );
    assert_eq!(r.code, 64, "{r:?}");
}

#[test]
fn repair_help_explains_each_option_and_where_repairs_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let r = belay_ok(
        "postgres://x@db.invalid/x",
        dir.path(),
        &["repair", "--help"],
    );
    for want in [
        "--version",
        "--checksums-only",
        "--failed-only",
        "notes.repairs",
    ] {
        assert!(r.stdout.contains(want), "{want}: {r:?}");
    }
}
