use std::fmt;
use std::str::FromStr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("invalid database URL {redacted}: {reason}; expected postgres://user@host:port/dbname")]
    Invalid { redacted: String, reason: String },
    #[error(
        "unsupported database URL scheme {scheme:?} in {redacted}: use postgres:// or postgresql://"
    )]
    Scheme { scheme: String, redacted: String },
}

/// A PostgreSQL connection URL whose password never reaches a log, an error or a terminal.
///
/// `Display` and `Debug` both redact; the secret is only reachable through
/// [`DatabaseUrl::expose`], which callers hand straight to a driver.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    raw: String,
    redacted: String,
}

impl DatabaseUrl {
    pub fn parse(input: &str) -> Result<Self, UrlError> {
        let input = input.trim();
        let redacted = redact_url(input);
        let parsed = url::Url::parse(input).map_err(|e| UrlError::Invalid {
            redacted: redacted.clone(),
            reason: e.to_string(),
        })?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(UrlError::Scheme {
                scheme: parsed.scheme().to_string(),
                redacted,
            });
        }
        if parsed.host_str().is_none_or(str::is_empty)
            && !parsed.query_pairs().any(|(k, _)| k == "host")
        {
            return Err(UrlError::Invalid {
                redacted,
                reason: "no host (give one, or a unix socket dir as ?host=/path)".into(),
            });
        }
        Ok(DatabaseUrl {
            raw: input.to_string(),
            redacted,
        })
    }

    /// The URL with its password: only for handing to a driver, never for printing.
    pub fn expose(&self) -> &str {
        &self.raw
    }

    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// Whether the URL itself carries a password (callers warn when it came from argv,
    /// where every user of the machine can read it in the process list).
    pub fn has_password(&self) -> bool {
        url::Url::parse(&self.raw).is_ok_and(|u| u.password().is_some())
            || self.raw.contains("password=")
    }

    /// The database name, for messages and history ("which database did this").
    pub fn database(&self) -> Option<String> {
        let u = url::Url::parse(&self.raw).ok()?;
        let name = u.path().trim_start_matches('/');
        (!name.is_empty()).then(|| name.to_string())
    }
}

impl FromStr for DatabaseUrl {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DatabaseUrl::parse(s)
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", self.redacted)
    }
}

/// Replaces the password of a URL (and any `password=` query parameter) with `***`.
///
/// Works on text that does not parse as a URL too, because the text most in need of
/// redaction is the one a user mistyped.
pub fn redact_url(input: &str) -> String {
    let mut out = input.to_string();
    // userinfo password: scheme://user:SECRET@host — of every URL in the text (an error
    // message may quote the URL again, e.g. a driver's message after belay's own).
    let mut search_from = 0;
    while let Some(scheme_end) = out[search_from..].find("://") {
        let rest_start = search_from + scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?', '#'])
            .map_or(out.len(), |i| rest_start + i);
        search_from = rest_start;
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let at = rest_start + at;
            if let Some(colon) = out[rest_start..at].find(':') {
                let colon = rest_start + colon;
                out.replace_range(colon + 1..at, "***");
                search_from = colon + 1 + "***".len();
            }
        }
    }
    // query or key=value password: password=SECRET
    let mut search_from = 0;
    while let Some(pos) = out[search_from..].find("password=") {
        let start = search_from + pos + "password=".len();
        let end = out[start..]
            .find(['&', ' ', '#'])
            .map_or(out.len(), |i| start + i);
        out.replace_range(start..end, "***");
        search_from = start + 3;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_every_spelling_of_a_password() {
        let cases = [
            (
                "postgres://app:s3cret@db:5432/app",
                "postgres://app:***@db:5432/app",
            ),
            ("postgres://app@db/app", "postgres://app@db/app"),
            (
                "postgres://db/app?password=s3cret&sslmode=require",
                "postgres://db/app?password=***&sslmode=require",
            ),
            (
                "host=db password=s3cret user=x",
                "host=db password=*** user=x",
            ),
            ("postgres://a:p@ss:w0rd@db/x", "postgres://a:***@db/x"),
            ("not a url at all", "not a url at all"),
            // Every URL of a message, not only the first.
            (
                "cannot connect to postgres://app:***@db/shop: postgres://app:s3cret@db/shop refused",
                "cannot connect to postgres://app:***@db/shop: postgres://app:***@db/shop refused",
            ),
            (
                "from postgres://a@db/x to postgres://b:s3cret@db/y",
                "from postgres://a@db/x to postgres://b:***@db/y",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(redact_url(input), want, "{input}");
        }
    }

    #[test]
    fn display_and_debug_never_show_the_password() {
        let u = DatabaseUrl::parse("postgresql://app:s3cret@localhost:5432/shop").unwrap();
        assert!(!format!("{u}").contains("s3cret"));
        assert!(!format!("{u:?}").contains("s3cret"));
        assert!(u.expose().contains("s3cret"));
        assert!(u.has_password());
        assert_eq!(u.database().as_deref(), Some("shop"));
    }

    #[test]
    fn bad_urls_are_named_redacted() {
        let err = DatabaseUrl::parse("mysql://root:hunter2@db/x").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("mysql"), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
        let err = DatabaseUrl::parse("postgres://u:hunter2@:5432").unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
        assert!(DatabaseUrl::parse("nonsense").is_err());
        assert!(DatabaseUrl::parse("postgres:///db?host=/var/run/postgresql").is_ok());
    }
}
