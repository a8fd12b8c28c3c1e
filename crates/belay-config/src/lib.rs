//! belay's configuration files read exactly: `agent.toml` ([`agent`]), and for every file
//! (belay.toml too) errors in the user's words — the file, the line, the key and what is
//! accepted there — instead of serde's.

pub mod agent;

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use toml::de::{DeTable, DeValue};

/// A configuration file that cannot be used as written. `Display` reads
/// `FILE:LINE: `KEY`: MESSAGE`; the message never holds a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; `None` when the problem is the file as a whole (or it cannot be read).
    pub line: Option<usize>,
    /// Dotted path of the key, arrays of tables indexed: `targets[1].probes[0].sql`.
    pub key: Option<String>,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if let Some(k) = &self.key {
            write!(f, ": `{k}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl ConfigError {
    /// A problem with `key` (a dotted path, see [`ConfigError::key`]) of the file whose
    /// text is `text`; the line is where the key is written, when it is.
    pub fn at(file: &Path, text: &str, key: &str, message: impl std::fmt::Display) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            line: line_of_key(text, key),
            key: (!key.is_empty()).then(|| key.to_string()),
            message: belay_core::redact_url(&message.to_string()),
        }
    }

    /// A problem with the file as a whole.
    pub fn file(file: &Path, message: impl std::fmt::Display) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            line: None,
            key: None,
            message: belay_core::redact_url(&message.to_string()),
        }
    }
}

/// Reads a whole file, refusing a missing or unreadable one by name.
pub fn read(file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file).map_err(|e| ConfigError::file(file, format!("cannot read: {e}")))
}

/// Parses `text` (the content of `file`) as `T`. A syntax error or a value `T` does not
/// accept comes back naming the line, the key and, in plain words, what is accepted.
pub fn parse<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let at = e.span().map(|s| s.start);
        ConfigError {
            file: file.to_path_buf(),
            line: at.map(|o| line_at(text, o)),
            key: at.and_then(|o| key_at(text, o)),
            // The parser's own message may quote a value, which may be a `url =` one.
            message: belay_core::redact_url(&plain_words(e.message())),
        }
    })
}

/// The 1-based line holding byte `offset`.
fn line_at(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    // A span may point inside a multi-byte character's bytes only if the parser erred;
    // count on the bytes, which never panics.
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// One step of a key path.
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

fn steps(path: &str) -> Vec<Step<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (name, rest) = part.split_once('[').unwrap_or((part, ""));
        out.push(Step::Key(name));
        for idx in rest.split('[') {
            if let Ok(i) = idx.trim_end_matches(']').parse() {
                out.push(Step::Index(i));
            }
        }
    }
    out
}

/// The line where the key at `path` is written (its last step that is written).
fn line_of_key(text: &str, path: &str) -> Option<usize> {
    let doc = DeTable::parse(text).ok()?;
    let mut table: &DeTable = doc.get_ref();
    let mut value: Option<&toml::Spanned<DeValue>> = None;
    let mut best = None;
    for step in steps(path) {
        match step {
            Step::Key(k) => {
                let t = match value.map(|v| v.get_ref()) {
                    None => table,
                    Some(DeValue::Table(t)) => t,
                    _ => break,
                };
                let Some((key, v)) = t.iter().find(|(key, _)| key.get_ref() == k) else {
                    break;
                };
                best = Some(key.span().start);
                table = t;
                value = Some(v);
            }
            Step::Index(i) => {
                let Some(DeValue::Array(a)) = value.map(|v| v.get_ref()) else {
                    break;
                };
                let Some(item) = a.get(i) else { break };
                // An array of tables' item: its header line.
                best = Some(item.span().start);
                value = Some(item);
            }
        }
    }
    let _ = table;
    best.map(|o| line_at(text, o))
}

/// The dotted path of the innermost key whose key or value holds byte `offset`. A table's
/// span is its header only, so every node is searched and the narrowest match wins.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let doc = DeTable::parse(text).ok()?;
    let mut best: Option<(usize, String)> = None;
    walk_table(doc.get_ref(), offset, "", &mut best);
    best.map(|(_, path)| path)
}

fn consider(
    span: std::ops::Range<usize>,
    offset: usize,
    path: &str,
    best: &mut Option<(usize, String)>,
) {
    // An error at the end of a value (a missing key in an inline table) points just past it.
    if span.contains(&offset) || (span.end == offset && !span.is_empty()) {
        let width = span.len();
        if best.as_ref().is_none_or(|(w, _)| width <= *w) {
            *best = Some((width, path.to_string()));
        }
    }
}

fn walk_table(t: &DeTable, offset: usize, prefix: &str, best: &mut Option<(usize, String)>) {
    for (k, v) in t.iter() {
        let path = if prefix.is_empty() {
            k.get_ref().to_string()
        } else {
            format!("{prefix}.{}", k.get_ref())
        };
        consider(k.span(), offset, &path, best);
        walk_value(v, offset, &path, best);
    }
}

fn walk_value(
    v: &toml::Spanned<DeValue>,
    offset: usize,
    path: &str,
    best: &mut Option<(usize, String)>,
) {
    consider(v.span(), offset, path, best);
    match v.get_ref() {
        DeValue::Table(t) => walk_table(t, offset, path, best),
        DeValue::Array(a) => {
            for (i, item) in a.iter().enumerate() {
                walk_value(item, offset, &format!("{path}[{i}]"), best);
            }
        }
        _ => {}
    }
}

/// serde's phrasing, reworded: "field" is a key, "variant" a value, and an untagged
/// enum's name is replaced by what it accepts.
fn plain_words(message: &str) -> String {
    let m = message.trim();
    if let Some(rest) = m.strip_prefix("unknown field ") {
        return match rest.split_once(", expected one of ") {
            Some((k, accepted)) => {
                format!("unknown key {k}; the keys accepted here are {accepted}")
            }
            None => match rest.split_once(", expected ") {
                Some((k, accepted)) => format!("unknown key {k}; accepted here: {accepted}"),
                None => match rest.split_once(", there are no fields") {
                    Some((k, _)) => format!("unknown key {k}; no keys are accepted here"),
                    None => format!("unknown key {rest}"),
                },
            },
        };
    }
    if let Some(rest) = m.strip_prefix("missing field ") {
        return format!("missing key {rest}: it is required here");
    }
    if let Some(rest) = m.strip_prefix("unknown variant ") {
        return match rest.split_once(", expected one of ") {
            Some((v, accepted)) => format!("unknown value {v}; accepted: {accepted}"),
            None => match rest.split_once(", expected ") {
                Some((v, accepted)) => format!("unknown value {v}; accepted: {accepted}"),
                None => format!("unknown value {rest}"),
            },
        };
    }
    if let Some(rest) = m.strip_prefix("invalid type: ")
        && let Some((found, expected)) = rest.split_once(", expected ")
    {
        return format!("expected {}, found {found}", untagged_forms(expected));
    }
    if let Some(name) = m.strip_prefix("data did not match any variant of untagged enum ") {
        return format!("expected {}", untagged_forms(name.trim()));
    }
    if let Some(rest) = m.strip_prefix("duplicate field ") {
        return format!("key {rest} is given twice");
    }
    m.to_string()
}

/// What one of belay's untagged config enums accepts, by its type name.
fn untagged_forms(name: &str) -> String {
    match name {
        "ByteSize" | "NumOrText" => {
            "a number of bytes or a size with a unit, e.g. 16777216 or \"16MiB\"".into()
        }
        "PeriodSetting" => {
            "a duration, e.g. \"10s\" (a bare number is seconds), or 0 / \"off\"".into()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        name: Option<String>,
        #[serde(default)]
        targets: Vec<Target>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Target {
        name: String,
        lock_timeout: Option<String>,
        #[serde(default)]
        probes: Vec<belay_health::ProbeSpec>,
    }

    #[test]
    fn errors_name_the_file_line_key_and_accepted_forms() {
        let f = Path::new("conf/agent.toml");
        let text = "name = \"a\"\n\n[[targets]]\nname = \"x\"\nlock_timout = \"1s\"\n";
        let e = parse::<Doc>(f, text).unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
        assert_eq!(e.key.as_deref(), Some("targets[0].lock_timout"), "{e}");
        let shown = e.to_string();
        assert!(shown.starts_with("conf/agent.toml:5: `targets[0].lock_timout`: unknown key `lock_timout`; the keys accepted here are `name`, `lock_timeout`"), "{shown}");

        let text = "[[targets]]\nname = \"x\"\n[[targets]]\nname = \"y\"\n[[targets.probes]]\nname = \"p\"\nperiod = \"1s\"\n";
        let e = parse::<Doc>(f, text).unwrap_err();
        assert!(
            e.to_string().contains("give exactly one of `http = {"),
            "{e}"
        );
        assert!(!e.to_string().contains("variant"), "{e}");
        assert!(
            e.key
                .as_deref()
                .is_some_and(|k| k.starts_with("targets[1].probes")),
            "{e:?}"
        );

        let e = parse::<Doc>(f, "name = 3\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "conf/agent.toml:1: `name`: expected a string, found integer `3`"
        );

        // A syntax error on a `url =` line: the line, never the password.
        let e =
            parse::<Doc>(f, "name = \"a\"\nurl = \"postgres://u:s3cr/t@db/x\" oops\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(!e.to_string().contains("s3cr"), "{e}");
    }

    #[test]
    fn keys_are_located_by_path() {
        let text = "name = \"a\"\n[[targets]]\nname = \"x\"\n[[targets]]\nname = \"y\"\nlock_timeout = \"0s\"\n";
        let e = ConfigError::at(
            Path::new("a.toml"),
            text,
            "targets[1].lock_timeout",
            "must be greater than zero",
        );
        assert_eq!(
            e.to_string(),
            "a.toml:6: `targets[1].lock_timeout`: must be greater than zero"
        );
        // A key not written (a default) still names the nearest written one's line.
        let e = ConfigError::at(Path::new("a.toml"), text, "targets[0].lock_timeout", "x");
        assert_eq!(e.line, Some(2));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Garbage — random bytes as text, and TOML-looking lines mixed from real keys —
        /// never panics, and every error names the file.
        #[test]
        fn garbage_never_panics_and_names_the_file(
            lines in proptest::collection::vec(
                proptest::prop_oneof![
                    "[a-z_\\[\\]\\.=\" {}0-9,#\\n]{0,40}",
                    proptest::sample::select(vec![
                        "[[targets]]", "name = \"x\"", "[[targets.probes]]", "http = { url = 3 }",
                        "sql = \"SELECT 1\"", "lock_timeout = 5", "[tls]", "targets = 1",
                        "url = \"postgres://u:p@h/d\"", "expect = { equals = \"x\" }", "[[probes]]",
                        "period = \"1x\"", "migrations = \"m\"", "url_env = \"NOPE_X\"",
                        "shutdown_grace = \"0s\"", "shutdown_grace = 5",
                    ]).prop_map(String::from),
                ],
                0..12,
            )
        ) {
            let text = lines.join("\n");
            let f = Path::new("garbage/agent.toml");
            if let Err(e) = parse::<Doc>(f, &text) {
                proptest::prop_assert!(e.to_string().starts_with("garbage/agent.toml"), "{e}");
                proptest::prop_assert!(!e.to_string().contains("u:p@"), "{e}");
            }
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("agent.toml");
            std::fs::write(&p, &text).unwrap();
            if let Err(e) = agent::load(&p) {
                proptest::prop_assert!(e.to_string().contains("agent.toml"), "{e}");
            }
        }
    }
}
