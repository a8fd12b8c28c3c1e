//! A lexer over PostgreSQL script text: just enough to split a script into statements
//! (quotes, `E''` strings, quoted identifiers, dollar quotes, nested block comments and
//! `BEGIN ATOMIC` bodies respected), see each statement's leading keywords, and map
//! PostgreSQL's character error positions back to lines. It never interprets SQL
//! semantics; linting with a real parser is a separate concern.

/// One top-level statement of a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// Byte offset of the statement's first significant character in the script.
    pub start: usize,
    /// Byte offset just past the statement's terminating `;` (or the end of the script).
    pub end: usize,
    /// Words of the statement outside strings and comments, as written (the first 12);
    /// quoted identifiers keep their quotes.
    pub words: Vec<String>,
    /// Whether `CONCURRENTLY` appears as a keyword anywhere in the statement.
    pub concurrently: bool,
}

impl Statement {
    pub fn text<'a>(&self, script: &'a str) -> &'a str {
        &script[self.start..self.end]
    }

    fn starts_with(&self, words: &[&str]) -> bool {
        self.words.len() >= words.len()
            && self
                .words
                .iter()
                .zip(words)
                .all(|(a, b)| a.eq_ignore_ascii_case(b))
    }

    /// A statement that opens, ends or aborts a transaction block.
    pub fn is_transaction_control(&self) -> bool {
        self.opens_transaction() || self.closes_transaction()
    }

    pub fn opens_transaction(&self) -> bool {
        // `BEGIN ATOMIC` only occurs inside CREATE FUNCTION, never at the top level.
        self.starts_with(&["BEGIN"]) || self.starts_with(&["START", "TRANSACTION"])
    }

    pub fn closes_transaction(&self) -> bool {
        ["COMMIT", "END", "ROLLBACK", "ABORT"]
            .iter()
            .any(|w| self.starts_with(&[w]))
            && !self.starts_with(&["ROLLBACK", "TO"])
            && !self.starts_with(&["COMMIT", "PREPARED"])
            && !self.starts_with(&["ROLLBACK", "PREPARED"])
    }

    /// The index name of `CREATE [UNIQUE] INDEX CONCURRENTLY [IF NOT EXISTS] name ON ...`,
    /// needed to drop the INVALID index such a statement leaves when it fails.
    /// Returned as PostgreSQL stores it: unquoted names folded to lower case.
    pub fn concurrent_index_name(&self) -> Option<String> {
        let upper: Vec<String> = self.words.iter().map(|w| w.to_ascii_uppercase()).collect();
        let w: Vec<&str> = upper.iter().map(String::as_str).collect();
        let rest = match w.as_slice() {
            ["CREATE", "INDEX", "CONCURRENTLY", rest @ ..] => rest,
            ["CREATE", "UNIQUE", "INDEX", "CONCURRENTLY", rest @ ..] => rest,
            _ => return None,
        };
        let rest = match rest {
            ["IF", "NOT", "EXISTS", rest @ ..] => rest,
            rest => rest,
        };
        let idx = match rest {
            [name, "ON", ..] if *name != "ON" => w.len() - rest.len(),
            _ => return None,
        };
        let raw = &self.words[idx];
        Some(
            match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
                Some(quoted) => quoted.replace("\"\"", "\""),
                None => raw.to_lowercase(),
            },
        )
    }
}

/// Splits a script into top-level statements. Empty statements (stray `;`) and
/// comment-only text produce nothing, so a comment-only script is a valid no-op.
pub fn split(script: &str) -> Vec<Statement> {
    let b = script.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut cur: Option<Statement> = None;
    // Depth of `BEGIN ATOMIC ... END` bodies (and CASE ... END inside them).
    let mut atomic_depth = 0usize;
    let mut prev_word = String::new();

    let push_word = |cur: &mut Option<Statement>, w: &str, start: usize| {
        let st = cur.get_or_insert_with(|| Statement {
            start,
            end: start,
            words: Vec::new(),
            concurrently: false,
        });
        if w.eq_ignore_ascii_case("CONCURRENTLY") {
            st.concurrently = true;
        }
        if st.words.len() < 12 {
            st.words.push(w.to_string());
        }
    };
    let touch = |cur: &mut Option<Statement>, start: usize| {
        cur.get_or_insert_with(|| Statement {
            start,
            end: start,
            words: Vec::new(),
            concurrently: false,
        });
    };

    while i < b.len() {
        let c = b[i];
        match c {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 1;
                i += 2;
                while i < b.len() && depth > 0 {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
            }
            b'\'' => {
                touch(&mut cur, i);
                // E'...' strings allow backslash escapes; the E was lexed as a word.
                let escapes = prev_word.eq_ignore_ascii_case("E");
                i = skip_quoted(b, i, b'\'', escapes);
                prev_word.clear();
            }
            b'"' => {
                let start = i;
                i = skip_quoted(b, i, b'"', false);
                let ident = &script[start..i];
                push_word(&mut cur, ident, start);
                prev_word.clear();
            }
            b'$' => {
                touch(&mut cur, i);
                if let Some(tag_end) = dollar_tag_end(b, i) {
                    let tag = &b[i..=tag_end];
                    let mut j = tag_end + 1;
                    let mut closed = false;
                    while j + tag.len() <= b.len() {
                        if &b[j..j + tag.len()] == tag {
                            j += tag.len();
                            closed = true;
                            break;
                        }
                        j += 1;
                    }
                    i = if closed { j } else { b.len() };
                } else {
                    i += 1;
                }
                prev_word.clear();
            }
            b';' => {
                i += 1;
                if atomic_depth > 0 {
                    continue;
                }
                if let Some(mut st) = cur.take() {
                    st.end = i;
                    out.push(st);
                }
                prev_word.clear();
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = i;
                while i < b.len()
                    && (b[i].is_ascii_alphanumeric()
                        || b[i] == b'_'
                        || b[i] == b'$'
                        || b[i] >= 0x80)
                {
                    i += 1;
                }
                let w = &script[start..i];
                let is_create = cur.as_ref().is_some_and(|s| {
                    s.words
                        .first()
                        .is_some_and(|f| f.eq_ignore_ascii_case("CREATE"))
                });
                let opens_atomic = w.eq_ignore_ascii_case("ATOMIC")
                    && prev_word.eq_ignore_ascii_case("BEGIN")
                    && is_create;
                if opens_atomic || (atomic_depth > 0 && w.eq_ignore_ascii_case("CASE")) {
                    atomic_depth += 1;
                } else if atomic_depth > 0 && w.eq_ignore_ascii_case("END") {
                    atomic_depth -= 1;
                }
                push_word(&mut cur, w, start);
                prev_word = w.to_string();
            }
            c if c.is_ascii_whitespace() => i += 1,
            _ => {
                touch(&mut cur, i);
                i += 1;
                prev_word.clear();
            }
        }
    }
    if let Some(mut st) = cur.take() {
        st.end = script.len();
        // Trim trailing whitespace/comments: the end is where the last token ended.
        out.push(st);
    }
    out
}

fn skip_quoted(b: &[u8], start: usize, q: u8, backslash_escapes: bool) -> usize {
    let mut i = start + 1;
    while i < b.len() {
        if backslash_escapes && b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == q {
            if b.get(i + 1) == Some(&q) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    b.len()
}

/// If a dollar-quote tag (`$$` or `$tag$`) starts at `i`, the index of its closing `$`.
fn dollar_tag_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    if b.get(j).is_some_and(u8::is_ascii_digit) {
        return None; // $1 is a parameter, not a quote
    }
    while j < b.len() {
        match b[j] {
            b'$' => return Some(j),
            c if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 => j += 1,
            _ => return None,
        }
    }
    None
}

/// Maps PostgreSQL's 1-based *character* position within `text` to a 1-based line and
/// column.
pub fn line_col(text: &str, char_pos: usize) -> (usize, usize) {
    let mut line = 1;
    let mut col = 1;
    for (n, ch) in text.chars().enumerate() {
        if n + 1 >= char_pos {
            break;
        }
        if ch == '\n' {
            line += 1;
            col = 1;
        } else {
            col += 1;
        }
    }
    (line, col)
}

/// The 1-based line number of a byte offset.
pub fn line_of_offset(text: &str, byte_offset: usize) -> usize {
    text.as_bytes()[..byte_offset.min(text.len())]
        .iter()
        .filter(|&&c| c == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(script: &str) -> Vec<String> {
        split(script)
            .iter()
            .map(|s| s.text(script).trim().to_string())
            .collect()
    }

    #[test]
    fn splits_respecting_quotes_comments_and_bodies() {
        let cases: &[(&str, &[&str])] = &[
            ("select 1; select 2;", &["select 1;", "select 2;"]),
            ("select ';'; select 2", &["select ';';", "select 2"]),
            ("select 'it''s;'; x;", &["select 'it''s;';", "x;"]),
            (r"select E'a\';b'; x;", &[r"select E'a\';b';", "x;"]),
            (
                "select \"a;b\" from t; x;",
                &["select \"a;b\" from t;", "x;"],
            ),
            (
                "-- c;\nselect 1; /* a; /* b; */ c; */ select 2;",
                &["select 1;", "select 2;"],
            ),
            (
                "create function f() returns int as $$ select 1; $$ language sql; x;",
                &[
                    "create function f() returns int as $$ select 1; $$ language sql;",
                    "x;",
                ],
            ),
            (
                "do $body$ begin perform 1; end $body$; x;",
                &["do $body$ begin perform 1; end $body$;", "x;"],
            ),
            ("select $1; x;", &["select $1;", "x;"]),
            (
                "create function f() returns int language sql begin atomic select 1; select case when true then 2 end; end; x;",
                &[
                    "create function f() returns int language sql begin atomic select 1; select case when true then 2 end; end;",
                    "x;",
                ],
            ),
            ("", &[]),
            ("-- only a comment\n/* and another */\n;;\n", &[]),
        ];
        for (script, want) in cases {
            assert_eq!(texts(script), *want, "script: {script}");
        }
    }

    #[test]
    fn recognises_transaction_control_and_concurrently() {
        let s = split(
            "BEGIN; create index concurrently if not exists idx_a on t(a); commit; rollback to s1; end;",
        );
        assert!(s[0].opens_transaction());
        assert!(s[1].concurrently);
        assert_eq!(s[1].concurrent_index_name().as_deref(), Some("idx_a"));
        let q = split(r#"CREATE UNIQUE INDEX CONCURRENTLY "Idx B" ON t(b);"#);
        assert_eq!(q[0].concurrent_index_name().as_deref(), Some("Idx B"));
        assert!(s[2].closes_transaction());
        assert!(!s[3].is_transaction_control());
        assert!(s[4].closes_transaction());
        let body = split("do $$ begin commit; end $$;");
        assert!(!body[0].is_transaction_control());
        assert!(split("start transaction isolation level serializable;")[0].opens_transaction());
    }

    #[test]
    fn maps_character_positions_to_lines() {
        let text = "select 1;\nselect é;\nselect nope;";
        // 'nope' starts at character 28 (é is one character, two bytes)
        let pos = text.chars().position(|c| c == 'n').unwrap() + 1;
        assert_eq!(line_col(text, pos), (3, 8));
        assert_eq!(line_of_offset(text, text.find("nope").unwrap()), 3);
    }
}
