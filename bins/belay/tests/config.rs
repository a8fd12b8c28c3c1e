//! `belay config check` and `belay init`: configuration a newcomer writes on the first
//! try. No database is needed: the URL is never connected to, only shown redacted.

mod support;
use std::path::Path;
use support::*;

/// A URL whose password must never be printed.
const URL: &str = "postgres://app:s3cr3t-pw@db.invalid:5432/shop";

fn run_in(dir: &Path, args: &[&str]) -> Run {
    belay(URL, dir, args)
}

#[test]
fn init_writes_a_starter_that_config_check_accepts_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let r = run_in(dir.path(), &["init"]);
    assert_eq!(r.code, 0, "{r:?}");
    let path = dir.path().join("belay.toml");
    let written = std::fs::read_to_string(&path).unwrap();
    // Every section is there, with a commented example where it has no default.
    for section in [
        "[execution]",
        "[lint]",
        "[preflight]",
        "[postflight]",
        "# [[checks]]",
        "# [[smoke]]",
        "# [[probes]]",
        "[deploy]",
        "[rollback]",
        "# [rollback.before]",
        "url_file",
    ] {
        assert!(written.contains(section), "{section} missing:\n{written}");
    }

    let r = run_in(
        dir.path(),
        &["config", "check", "--config", path.to_str().unwrap()],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("valid"), "{r:?}");
    assert!(r.stdout.contains("lock_timeout = \"100ms\""), "{r:?}");

    // A second init refuses (73), and the file is untouched.
    std::fs::write(&path, "dir = \"mine\"\n").unwrap();
    let r = run_in(dir.path(), &["init"]);
    assert_eq!(r.code, 73, "{r:?}");
    assert!(r.stderr.contains("already exists"), "{r:?}");
    assert!(r.stderr.contains(d), "{r:?}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "dir = \"mine\"\n");
}

#[test]
fn config_check_prints_the_effective_configuration_with_defaults_and_no_password() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("belay.toml");
    std::fs::write(
        &path,
        "[execution]\nlock_timeout = \"250ms\"\n[[checks]]\nname = \"filled\"\nquery = \"SELECT count(*) FROM t WHERE x IS NULL\"\nexpect = \"at_most=3\"\n[[probes]]\nname = \"q\"\nsql = { url = \"postgres://probe:pr0be-pw@db.invalid/shop\", query = \"SELECT 0\", expect = \"zero\" }\n",
    )
    .unwrap();
    let config = path.to_str().unwrap();
    let r = run_in(dir.path(), &["config", "check", "--config", config]);
    assert_eq!(r.code, 0, "{r:?}");
    for want in [
        "lock_timeout = \"250ms\"", // from the file
        "max_blocking = \"50ms\"",  // a default
        "settle = \"5s\"",          // [rollback]'s default
        "expect = \"at_most=3\"",   // the same spelling as --expect
        "postgres://app:***@db.invalid:5432/shop",
    ] {
        assert!(r.stdout.contains(want), "{want}: {r:?}");
    }
    assert!(
        !r.stdout.contains("s3cr3t-pw") && !r.stdout.contains("pr0be-pw"),
        "{r:?}"
    );

    let r = run_in(
        dir.path(),
        &["config", "check", "--config", config, "--output", "json"],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let v = r.json();
    let eff = &v["belay_toml"]["effective"];
    assert_eq!(eff["execution"]["lock_timeout"], "250ms");
    assert_eq!(eff["execution"]["max_attempts"], 60);
    assert_eq!(eff["checks"][0]["expect"], "at_most=3");
    assert_eq!(eff["rollback"]["policy"], "auto");
    assert!(
        !r.stdout.contains("s3cr3t-pw") && !r.stdout.contains("pr0be-pw"),
        "{r:?}"
    );

    // What it prints is itself a belay.toml that reads back the same.
    let text = run_in(dir.path(), &["config", "check", "--config", config]).stdout;
    let again = dir.path().join("effective.toml");
    std::fs::write(
        &again,
        text.replace("postgres://app:***@", "postgres://app@")
            .replace("postgres://probe:***@", "postgres://probe@"),
    )
    .unwrap();
    let r = run_in(
        dir.path(),
        &[
            "config",
            "check",
            "--config",
            again.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.json()["belay_toml"]["effective"]["execution"],
        eff["execution"]
    );
}

#[test]
fn config_errors_name_the_file_line_key_and_what_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str)] = &[
        (
            "dir = \"m\"\n[execution]\nlock_timout = \"1s\"\n",
            ":3: `execution.lock_timout`: unknown key `lock_timout`; the keys accepted here are `lock_timeout`",
        ),
        (
            "[[probes]]\nname = \"p\"\nperiod = \"1s\"\n",
            ":1: `probes[0]`: probe \"p\" says neither what to probe: give exactly one of `http = {",
        ),
        (
            "[[checks]]\nname = \"c\"\nquery = \"SELECT 1\"\nexpect = { equals = \"one\" }\n",
            ":4: `checks[0].expect`: `expect` must be one of \"no_rows\", \"zero\", \"equals=N\"",
        ),
        (
            "[[checks]]\nname = \"c\"\nquery = \"SELECT 1\"\nexpect = \"equals 1\"\n",
            ":4: `checks[0].expect`: \"equals 1\" is not an expectation: use \"no_rows\"",
        ),
        (
            "\n[execution]\nlock_timeout = \"0s\"\n",
            ":3: `execution.lock_timeout`: must be greater than zero",
        ),
        (
            "[rollback]\nsettle = \"soon\"\n",
            ":2: `rollback.settle`: invalid duration \"soon\"",
        ),
        (
            "[lint]\nsmall_table_bytes = true\n",
            ":2: `lint.small_table_bytes`: expected a number of bytes or a size with a unit",
        ),
        (
            "backup = \"sometimes\"\n",
            ":1: `backup`: unknown value `sometimes`; accepted: `full`, `schema`, `tables`, `none`",
        ),
        (
            "[deploy]\non_failure = \"rollback\"\nrollback_scope = \"fleet\"\n",
            ":3: `deploy.rollback_scope`: unknown value `fleet`; accepted: `wave` or `deployment`",
        ),
        (
            "[deploy]\non_failure = \"stop\"\n[rollback]\non_failure = \"rollback\"\n",
            ":4: `rollback.on_failure`: the file sets on_failure twice",
        ),
        (
            "[[probes]]\nname = \"p\"\nhttp = { url = \"http://a/\" }\n[[probes]]\nname = \"p\"\nhttp = { url = \"http://b/\" }\n",
            ":5: `probes[1].name`: two probes are named \"p\"",
        ),
        ("url = \"postgres://u:pa/ss@h/d\" trailing\n", ":1: "),
    ];
    for (i, (body, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case{i}.toml"));
        std::fs::write(&path, body).unwrap();
        let r = run_in(
            dir.path(),
            &["config", "check", "--config", path.to_str().unwrap()],
        );
        assert_eq!(r.code, 64, "{body}: {r:?}");
        let shown = format!("{}{}", path.display(), want);
        assert!(r.stderr.contains(&shown), "{body}\nwant {shown}\n{r:?}");
        for serde_word in ["variant", "flattened", "untagged", "field `"] {
            assert!(!r.stderr.contains(serde_word), "{serde_word}: {r:?}");
        }
        assert!(!r.stderr.contains("pa/ss"), "{r:?}");
        // The same file fails every other command the same way, before anything runs.
        let r2 = run_in(dir.path(), &["--config", path.to_str().unwrap(), "status"]);
        assert_eq!(r2.code, 64, "{r2:?}");
        assert!(r2.stderr.contains(&shown), "{r2:?}");
    }
}

#[test]
fn config_check_reads_an_agent_toml_as_the_agent_does() {
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("agent.toml");
    std::fs::write(
        &agent,
        "name = \"a1\"\n[[targets]]\nname = \"shop\"\nurl_env = \"BELAY_TEST_CONFIG_SHOP_URL\"\nmigrations = \"m\"\nenvironment = \"staging\"\n[[targets.probes]]\nname = \"nulls\"\nsql = { query = \"SELECT 0\", expect = \"zero\" }\n",
    )
    .unwrap();
    let r = to_run_env(dir.path(), &agent);
    assert_eq!(r.code, 0, "{r:?}");
    let v = r.json();
    let t = &v["agent_toml"]["effective"]["targets"][0];
    assert_eq!(t["environment"], "staging");
    assert_eq!(t["url"], "postgres://agent:***@db.invalid/shop");
    assert_eq!(t["max_blocking"], "50ms");
    assert_eq!(t["probes"][0]["sql"]["expect"], "zero");
    assert!(!r.stdout.contains("ag3nt-pw"), "{r:?}");

    std::fs::write(
        &agent,
        "[[targets]]\nname = \"shop\"\nurl_env = \"BELAY_TEST_CONFIG_SHOP_URL\"\nmigrations = \"m\"\n[[targets.probes]]\nname = \"p\"\n",
    )
    .unwrap();
    let r = to_run_env(dir.path(), &agent);
    assert_eq!(r.code, 64, "{r:?}");
    let want = format!(
        "{}:5: `targets[0].probes[0]`: target \"shop\": probe \"p\": give exactly one of http or sql",
        agent.display()
    );
    assert!(r.stderr.contains(&want), "{want}\n{r:?}");
}

fn to_run_env(dir: &Path, agent: &Path) -> Run {
    let o = belay_cmd(URL, dir)
        .env(
            "BELAY_TEST_CONFIG_SHOP_URL",
            "postgres://agent:ag3nt-pw@db.invalid/shop",
        )
        .args(["config", "check", "--output", "json", "--agent"])
        .arg(agent)
        .output()
        .expect("run belay");
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// The belay.toml of docs/configuration.md is the starter, and both agent.toml and the
/// belay.toml there are accepted as written.
#[test]
fn the_documented_files_are_valid() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let doc = std::fs::read_to_string(format!("{root}/docs/configuration.md")).unwrap();
    let blocks: Vec<&str> = doc
        .split("```toml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert_eq!(blocks.len(), 2, "a belay.toml and an agent.toml block");
    let starter = std::fs::read_to_string(format!("{root}/bins/belay/src/starter.toml")).unwrap();
    assert_eq!(
        blocks[0], starter,
        "docs/configuration.md shows what `belay init` writes"
    );
    let dir = tempfile::tempdir().unwrap();
    let belay_toml = dir.path().join("belay.toml");
    std::fs::write(&belay_toml, blocks[0]).unwrap();
    let r = run_in(
        dir.path(),
        &["config", "check", "--config", belay_toml.to_str().unwrap()],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let agent_toml = dir.path().join("agent.toml");
    std::fs::write(&agent_toml, blocks[1].replace("/srv/shop/migrations", "m")).unwrap();
    let o = belay_cmd(URL, dir.path())
        .env("SHOP_EU_DATABASE_URL", "postgres://belay@db.invalid/shop")
        .args(["config", "check", "--agent"])
        .arg(&agent_toml)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(shown.contains("environment = \"production\""), "{shown}");
}
