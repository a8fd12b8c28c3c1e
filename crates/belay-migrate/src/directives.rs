//! Per-script directives read from a script's leading comment block.

use belay_core::parse_duration;
use std::collections::BTreeMap;
use std::time::Duration;

/// Why a script runs outside a transaction; shown by `plan` so nobody has to guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoTransactionSource {
    /// `-- belay:no-transaction`
    Directive,
    /// sqlx's leading `-- no-transaction`
    Sqlx,
    /// Flyway's `<script>.sql.conf` with `executeInTransaction=false`
    FlywayConf,
    /// diesel's `metadata.toml` with `run_in_transaction = false`
    DieselMetadata,
    /// the script carries its own `BEGIN`/`COMMIT`
    OwnTransactionControl,
    /// goose's `-- +goose NO TRANSACTION` (both sections of the file)
    GooseNoTransaction,
    /// dbmate's `transaction:false` option on the section's marker
    DbmateTransactionFalse,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Directives {
    pub no_transaction: Option<NoTransactionSource>,
    pub irreversible: bool,
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_duration")]
    pub lock_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_duration")]
    pub statement_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<String>,
    /// Lint rule id → reason, from `-- belay:allow=<rule> <reason>`: the linter's findings
    /// of that rule in this script are accepted (still shown, with the reason). The rule id
    /// is checked against the linter's rules by the caller: this crate does not know them.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub allow: BTreeMap<String, String>,
}

mod opt_duration {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&belay_core::format_duration(*d)),
            None => s.serialize_none(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DirectiveError {
    #[error(
        "line {line}: unknown directive `belay:{name}`; known: no-transaction, irreversible, lock-timeout=DURATION, statement-timeout=DURATION, tables=a,b, allow=RULE REASON"
    )]
    Unknown { line: usize, name: String },
    #[error("line {line}: directive `belay:{name}` {problem}")]
    BadValue {
        line: usize,
        name: String,
        problem: String,
    },
}

/// Reads directives from the leading comment block: the lines before the first line that
/// is neither blank nor a `--` comment. Directives further down are not read, on purpose:
/// a directive must be visible at the top of the file to whoever reviews it.
pub fn parse(text: &str) -> Result<Directives, DirectiveError> {
    let mut d = Directives::default();
    for (idx, raw) in text.lines().enumerate() {
        let line = idx + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            continue;
        }
        let Some(comment) = trimmed.strip_prefix("--") else {
            break;
        };
        let comment = comment.trim();
        if line == 1 && comment == "no-transaction" {
            d.no_transaction.get_or_insert(NoTransactionSource::Sqlx);
            continue;
        }
        let Some(body) = comment.strip_prefix("belay:") else {
            continue;
        };
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (body.split_whitespace().next().unwrap_or(""), None),
        };
        let bad = |problem: &str| DirectiveError::BadValue {
            line,
            name: name.to_string(),
            problem: problem.to_string(),
        };
        let duration = |v: Option<&str>| -> Result<Duration, DirectiveError> {
            let v = v.ok_or_else(|| bad("needs a value, like =200ms"))?;
            parse_duration(v).map_err(|e| bad(&format!("has a bad value: {e}")))
        };
        match name {
            "no-transaction" => d.no_transaction = Some(NoTransactionSource::Directive),
            "irreversible" => d.irreversible = true,
            "lock-timeout" => {
                let t = duration(value)?;
                if t.is_zero() {
                    return Err(bad(
                        "must be greater than zero: a migration waiting for its lock without a timeout stalls every query queued behind it",
                    ));
                }
                d.lock_timeout = Some(t);
            }
            "statement-timeout" => d.statement_timeout = Some(duration(value)?),
            "tables" => {
                let v = value.ok_or_else(|| bad("needs a value, like =users,user_sessions"))?;
                d.tables = v
                    .split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(String::from)
                    .collect();
                if d.tables.is_empty() {
                    return Err(bad("names no table"));
                }
            }
            "allow" => {
                let v = value.filter(|v| !v.is_empty()).ok_or_else(|| {
                    bad("needs a rule and a reason, like =create-index-concurrently small table")
                })?;
                let (rule, reason) = match v.split_once(char::is_whitespace) {
                    Some((r, why)) => (r.trim(), why.trim()),
                    None => (v, ""),
                };
                if rule.is_empty()
                    || !rule
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                {
                    return Err(bad(&format!(
                        "needs a lint rule id (like create-index-concurrently), not `{rule}`"
                    )));
                }
                if reason.is_empty() {
                    return Err(bad(&format!(
                        "needs a reason after the rule: `-- belay:allow={rule} <why this is safe here>`"
                    )));
                }
                if d.allow.contains_key(rule) {
                    return Err(bad(&format!("allows rule `{rule}` twice")));
                }
                d.allow.insert(rule.to_string(), reason.to_string());
            }
            other => {
                return Err(DirectiveError::Unknown {
                    line,
                    name: other.to_string(),
                });
            }
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_leading_directives() {
        let d = parse(
            "-- belay:no-transaction\n--belay:lock-timeout=200ms\n-- belay:statement-timeout=5min\n\n-- belay:tables=users, user_sessions\n-- belay:irreversible\ncreate table x();\n-- belay:bogus\n",
        )
        .unwrap();
        assert_eq!(d.no_transaction, Some(NoTransactionSource::Directive));
        assert_eq!(d.lock_timeout, Some(Duration::from_millis(200)));
        assert_eq!(d.statement_timeout, Some(Duration::from_secs(300)));
        assert_eq!(d.tables, ["users", "user_sessions"]);
        assert!(d.irreversible);
    }

    #[test]
    fn reads_allow_directives_with_reasons() {
        let d = parse(
            "-- belay:allow=create-index-concurrently small table, built at deploy\n-- belay:allow=rename   view kept for old readers  \n-- belay:no-transaction\nselect 1;\n-- belay:allow=vacuum-full too late\n",
        )
        .unwrap();
        assert_eq!(
            d.allow.get("create-index-concurrently").map(String::as_str),
            Some("small table, built at deploy")
        );
        assert_eq!(
            d.allow.get("rename").map(String::as_str),
            Some("view kept for old readers")
        );
        assert!(
            !d.allow.contains_key("vacuum-full"),
            "below the first statement"
        );
        assert_eq!(d.allow.len(), 2);
        assert_eq!(d.no_transaction, Some(NoTransactionSource::Directive));
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["allow"]["rename"], "view kept for old readers");
        assert!(
            serde_json::to_value(parse("select 1;").unwrap()).unwrap()["allow"].is_null(),
            "no allow key when there is none"
        );
    }

    #[test]
    fn sqlx_no_transaction_only_on_first_line() {
        assert_eq!(
            parse("-- no-transaction\nselect 1;")
                .unwrap()
                .no_transaction,
            Some(NoTransactionSource::Sqlx)
        );
        assert_eq!(parse("\n-- no-transaction\n").unwrap().no_transaction, None);
    }

    #[test]
    fn rejects_unknown_and_bad_values() {
        let cases = [
            (
                "-- belay:no-transactoin\n",
                "line 1: unknown directive `belay:no-transactoin`",
            ),
            (
                "\n-- belay:lock-timeout=fast\n",
                "line 2: directive `belay:lock-timeout` has a bad value",
            ),
            ("-- belay:lock-timeout=0\n", "must be greater than zero"),
            ("-- belay:lock-timeout\n", "needs a value"),
            ("-- belay:tables=\n", "names no table"),
            ("-- belay:allow\n", "needs a rule and a reason"),
            ("-- belay:allow=\n", "needs a rule and a reason"),
            (
                "-- belay:allow=create-index-concurrently\n",
                "line 1: directive `belay:allow` needs a reason after the rule",
            ),
            (
                "-- belay:allow=Create_Index small table\n",
                "needs a lint rule id",
            ),
            (
                "-- belay:allow=rename a\n-- belay:allow=rename b\n",
                "line 2: directive `belay:allow` allows rule `rename` twice",
            ),
        ];
        for (input, want) in cases {
            let err = parse(input).unwrap_err().to_string();
            assert!(err.contains(want), "{input:?}: {err}");
        }
    }
}
