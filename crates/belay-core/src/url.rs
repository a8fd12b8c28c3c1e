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
            reason: match unescaped_in_password(input) {
                Some(c) => format!(
                    "{e} (the password holds an unescaped {c:?}: percent-encode it, e.g. {c:?} as %{:02X})",
                    c as u32
                ),
                None => e.to_string(),
            },
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

    /// The server this URL reaches, as `host:port` (the host lower-cased; a unix socket
    /// directory given as `?host=/path` counts as the host; the port defaults to 5432, as
    /// libpq's does): what a [`crate::ConnectionBudget`] counts connections by.
    pub fn server(&self) -> String {
        let Ok(u) = url::Url::parse(&self.raw) else {
            return self.redacted.clone();
        };
        let query = |key: &str| {
            u.query_pairs()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.into_owned())
        };
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .map(str::to_string)
            .or_else(|| query("host"))
            .unwrap_or_default()
            .to_ascii_lowercase();
        let port = u
            .port()
            .map(|p| p.to_string())
            .or_else(|| query("port"))
            .unwrap_or_else(|| "5432".to_string());
        format!("{host}:{port}")
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

/// Read from configuration as a string; a malformed URL is an error naming it redacted.
impl<'de> serde::Deserialize<'de> for DatabaseUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        DatabaseUrl::parse(&raw).map_err(serde::de::Error::custom)
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

/// Replaces every password in `input` with `***`: the one redaction path of belay.
///
/// It covers the three places a password is written: a URL's userinfo
/// (`scheme://user:SECRET@host`, of every URL in the text), a `password=` key in a URL query
/// or a libpq key=value conninfo (`password=SECRET`, `password = 'a \' b'`), and a
/// `password = "SECRET"` line of a TOML file (as a parser's error snippet quotes it).
/// It works on text that does not parse as a URL, because the text most in need of
/// redaction is the one a user mistyped: a password with an unescaped `/`, `?`, `#`, `@` or
/// whitespace ends at the last `@` before the end of its line or the next URL, not at the
/// first delimiter. When unsure it hides too much (a URL followed by an `@` on the same
/// line loses the text up to it) rather than too little.
pub fn redact_url(input: &str) -> String {
    redact_password_keys(&redact_userinfo(input))
}

fn redact_userinfo(input: &str) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(p) = rest.find("://") {
        let (head, tail) = rest.split_at(p + 3);
        out.push_str(head);
        // The URL cannot reach past its line or into the next URL.
        let line_end = tail.find('\n').unwrap_or(tail.len());
        let limit = next_url(&tail[..line_end]).unwrap_or(line_end);
        match userinfo_password(&tail[..limit]) {
            Some((start, end)) => {
                out.push_str(&tail[..start]);
                out.push_str("***");
                rest = &tail[end..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

/// Where the next URL starts in `seg` (the text after a `://`): at a `://` whose scheme
/// stands on its own, after whitespace, a quote or a delimiter. A `://` whose scheme runs
/// on from this URL's own text is part of it — a password may hold `//` (`app://x@db`
/// is user `app`, password `//x`).
fn next_url(seg: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(p) = seg[from..].find("://") {
        let q = from + p;
        let scheme_start = seg[..q]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-')))
            .map_or(0, |i| i + 1);
        let stands_alone = scheme_start > 0
            && seg[..scheme_start].chars().next_back().is_some_and(|c| {
                c.is_whitespace()
                    || matches!(
                        c,
                        '"' | '\'' | '<' | '>' | '(' | ')' | ',' | ';' | '=' | '[' | ']'
                    )
            });
        if stands_alone && scheme_start < q {
            return Some(scheme_start);
        }
        from = q + 3;
    }
    None
}

/// The first URL delimiter written raw in the password, which makes the URL mean
/// something else (`/` starts the path, `?` the query, `#` the fragment).
fn unescaped_in_password(input: &str) -> Option<char> {
    let tail = &input[input.find("://")? + 3..];
    let (start, end) = userinfo_password(tail)?;
    tail[start..end]
        .chars()
        .find(|c| matches!(c, '/' | '?' | '#'))
}

/// Byte range of the password in the text after a `://`, when there is one.
fn userinfo_password(seg: &str) -> Option<(usize, usize)> {
    // The user name ends at its colon; an `@` may belong to it (Azure's `user@server`).
    let user_end = seg.find(|c: char| matches!(c, ':' | '/' | '?' | '#') || c.is_whitespace())?;
    if !seg[user_end..].starts_with(':') {
        return None;
    }
    let start = user_end + 1;
    // The host cannot contain `@`, so the last one of the URL's line ends the password
    // (a password may hold `@`, `/`, `?`, `#` and even whitespace when written unescaped).
    let at = seg[start..].rfind('@')?;
    Some((start, start + at))
}

fn redact_password_keys(input: &str) -> String {
    const KEY: &str = "password";
    let lower = input.to_ascii_lowercase();
    let mut out = String::with_capacity(input.len());
    let mut copied = 0;
    let mut search = 0;
    while let Some(p) = lower[search..].find(KEY) {
        let key_start = search + p;
        let after_key = key_start + KEY.len();
        search = after_key;
        let bytes = input.as_bytes();
        let mut i = after_key;
        while i < bytes.len() && (bytes[i] == b' ' || bytes[i] == b'\t') {
            i += 1;
        }
        if bytes.get(i) != Some(&b'=') {
            continue;
        }
        i += 1;
        while i < bytes.len() && (bytes[i] == b' ' || bytes[i] == b'\t') {
            i += 1;
        }
        let in_query = key_start > 0 && matches!(bytes[key_start - 1], b'?' | b'&');
        let (start, end) = match bytes.get(i) {
            Some(&q @ (b'\'' | b'"')) => (i + 1, quoted_end(input, i + 1, q)),
            _ => {
                let stop = |c: char| c.is_whitespace() || (in_query && matches!(c, '&' | '#'));
                (i, input[i..].find(stop).map_or(input.len(), |e| i + e))
            }
        };
        out.push_str(&input[copied..start]);
        out.push_str("***");
        copied = end;
        search = end.max(search);
    }
    out.push_str(&input[copied..]);
    out
}

/// Where a quoted value starting at `from` ends (its closing quote; a backslash escapes the
/// next character, as in libpq conninfo and TOML basic strings); unterminated, the line's
/// end.
fn quoted_end(input: &str, from: usize, quote: u8) -> usize {
    let bytes = input.as_bytes();
    let mut i = from;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'\n' => return i,
            b if b == quote => return i,
            _ => i += 1,
        }
    }
    bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_is_host_and_port() {
        let server = |u: &str| DatabaseUrl::parse(u).expect(u).server();
        assert_eq!(
            server("postgres://app:pw@DB.example:6432/shop"),
            "db.example:6432"
        );
        assert_eq!(
            server("postgres://app@db/a"),
            "db:5432",
            "libpq's default port"
        );
        assert_eq!(
            server("postgres://db/a"),
            server("postgresql://u:p@db:5432/b")
        );
        assert_eq!(
            server("postgres:///shop?host=/var/run/postgresql&port=5433"),
            "/var/run/postgresql:5433"
        );
        assert!(!server("postgres://a:s3cret@db/x").contains("s3cret"));
    }

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
            // Unescaped delimiters in the password: the last `@` ends it.
            ("postgres://a:p/ss@db/x", "postgres://a:***@db/x"),
            ("postgres://a:p?ss@db/x", "postgres://a:***@db/x"),
            ("postgres://a:p#ss@db/x", "postgres://a:***@db/x"),
            ("postgres://a:p@s/s?#@db:5/x", "postgres://a:***@db:5/x"),
            ("postgres://a:p ss@db/x", "postgres://a:***@db/x"),
            // A user name with an `@` (Azure's user@server) keeps its password hidden.
            ("postgres://u@srv:pw@db/x", "postgres://u@srv:***@db/x"),
            // No password: ports and IPv6 hosts are not passwords.
            ("postgres://db:5432/x", "postgres://db:5432/x"),
            ("postgres://u@[::1]:5432/x", "postgres://u@[::1]:5432/x"),
            // Conninfo and TOML spellings.
            (
                "host=db password = 'a b\\' c' user=x",
                "host=db password = '***' user=x",
            ),
            ("PGPASSWORD=s3cret psql", "PGPASSWORD=*** psql"),
            ("3 | password = \"s3\\\"cret\"", "3 | password = \"***\""),
            (
                "postgres://db/x?password=a#b&user=u",
                "postgres://db/x?password=***#b&user=u",
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
        // A raw delimiter in the password is named, with the spelling that works.
        let msg = DatabaseUrl::parse("postgres://u:hun/ter2@db/x")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("unescaped '/'") && msg.contains("%2F"),
            "{msg}"
        );
        assert!(!msg.contains("hun") && !msg.contains("ter2"), "{msg}");
        assert!(DatabaseUrl::parse("postgres:///db?host=/var/run/postgresql").is_ok());
    }

    mod generated {
        use super::*;
        use proptest::prelude::*;

        /// Passwords of the characters users pick, delimiters and quotes included; at
        /// least 8 long so that finding one in the output cannot be a coincidence.
        fn password() -> impl Strategy<Value = String> {
            let chars: Vec<char> = ('a'..='z')
                .chain('A'..='Z')
                .chain('0'..='9')
                .chain("/?#@:&=%!$^*()[]{}+,.;~-_ '\"\\|<>".chars())
                .collect();
            proptest::collection::vec(proptest::sample::select(chars), 8..24)
                .prop_map(|c| c.into_iter().collect::<String>())
                .prop_filter("a URL ends at `://`", |p| !p.contains("://"))
        }

        /// libpq's quoting of a conninfo value.
        fn conninfo_value(p: &str) -> String {
            // A value opening with `"` is quoted too: redaction reads `"` as a TOML quote.
            if p.starts_with('"')
                || p.chars()
                    .any(|c| c.is_whitespace() || c == '\'' || c == '\\')
            {
                format!("'{}'", p.replace('\\', "\\\\").replace('\'', "\\'"))
            } else {
                p.to_string()
            }
        }

        fn percent_encode(p: &str) -> String {
            p.bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect()
        }

        fn toml_basic(p: &str) -> String {
            p.replace('\\', "\\\\").replace('"', "\\\"")
        }

        proptest! {
            #[test]
            fn url_userinfo_password_never_shows(pw in password()) {
                let input = format!("cannot connect to postgres://app:{pw}@db.example:5432/shop: refused");
                let want = "cannot connect to postgres://app:***@db.example:5432/shop: refused";
                prop_assert_eq!(redact_url(&input), want);
            }

            #[test]
            fn query_password_never_shows(pw in password()) {
                let input = format!("postgres://app@db/shop?password={}&sslmode=require", percent_encode(&pw));
                prop_assert_eq!(redact_url(&input), "postgres://app@db/shop?password=***&sslmode=require");
            }

            #[test]
            fn conninfo_password_never_shows(pw in password()) {
                let value = conninfo_value(&pw);
                let input = format!("host=db user=app password={value} dbname=shop");
                let want = if value.starts_with('\'') {
                    "host=db user=app password='***' dbname=shop"
                } else {
                    "host=db user=app password=*** dbname=shop"
                };
                prop_assert_eq!(redact_url(&input), want);
            }

            #[test]
            fn toml_error_snippets_never_show_it(pw in password()) {
                let written = toml_basic(&pw);
                for doc in [
                    format!("name = \"a\"\nurl = \"postgres://app:{written}@db/shop\" oops\n"),
                    format!("url = \"postgres://app:{written}@db/shop\nname = 1\n"),
                    format!("password = \"{written}\" oops\n"),
                ] {
                    let err = toml::from_str::<toml::Table>(&doc)
                        .expect_err("the document is malformed")
                        .to_string();
                    // The parser quotes the line (what makes this test worth having)...
                    prop_assert!(err.contains(&written), "{}", err);
                    // ... and redaction leaves nothing of the password.
                    let shown = redact_url(&err);
                    prop_assert!(!shown.contains(&written), "{}", shown);
                    prop_assert!(!shown.contains(&pw), "{}", shown);
                }
            }

            #[test]
            fn redaction_is_idempotent_and_total(text in "\\PC*") {
                let once = redact_url(&text);
                prop_assert_eq!(redact_url(&once), once);
            }
        }
    }
}
