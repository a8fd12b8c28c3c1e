//! A lexer over PostgreSQL script text: just enough to split a script into statements
//! (quotes, `E''` strings, quoted identifiers, dollar quotes, nested block comments and
//! `BEGIN ATOMIC` bodies respected), see each statement's leading keywords, and map
//! PostgreSQL's character error positions back to lines. It never interprets SQL
//! semantics; linting with a real parser is a separate concern. Migration files are read
//! with [`split_script`], which also knows the little of psql that plain-format `pg_dump`
//! output needs, and refuses the rest.

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
    /// For `COPY … FROM stdin` in a psql script (as `pg_dump` writes): the inline data
    /// lines that follow the statement, up to (not including) the `\.` line.
    pub copy_data: Option<String>,
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

/// A script as belay runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitScript {
    /// The SQL sent to the server: the raw text with everything that is not SQL (psql
    /// meta-commands, `COPY` inline data) blanked to spaces, so it has the raw text's byte
    /// length and lines, and every offset and line number means the same in both.
    pub text: String,
    pub statements: Vec<Statement>,
}

/// Why a script cannot be run as belay understands it (1-based line of the raw text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ScriptError {
    pub line: usize,
    pub message: String,
}

/// Splits a raw script into what belay sends to the server and its statements.
///
/// Beyond SQL it understands exactly what `pg_dump`'s plain format adds, as `psql -f`
/// would run it: `\restrict`/`\unrestrict` lines (they only guard psql against a
/// malicious server, so they are blanked) and the inline data of `COPY … FROM stdin`
/// (captured in [`Statement::copy_data`] and blanked). Every other psql meta-command is
/// refused, naming its line: belay is not psql, and running the script without it would
/// silently do something else than the author saw psql do.
pub fn split_script(raw: &str) -> Result<SplitScript, ScriptError> {
    let lexed = lex(raw, true)?;
    for st in &lexed.statements {
        check_session_setting(raw, st)?;
    }
    let mut text = String::with_capacity(raw.len());
    let mut kept = 0;
    for range in lexed.blanked {
        text.push_str(&raw[kept..range.start]);
        // One space per byte, so offsets stay the file's; newlines stay, so lines do.
        for c in raw[range.clone()].chars() {
            if c == '\n' {
                text.push('\n');
            } else {
                text.extend(std::iter::repeat_n(' ', c.len_utf8()));
            }
        }
        kept = range.end;
    }
    text.push_str(&raw[kept..]);
    Ok(SplitScript {
        text,
        statements: lexed.statements,
    })
}

/// The value a `SET [SESSION|LOCAL] name {=|TO} value` statement gives `name` (or one of
/// its `aliases`), unquoted and lower-cased; `None` for any other statement.
fn set_value(script: &str, st: &Statement, names: &[&str]) -> Option<String> {
    let w = &st.words;
    let at = match w.get(1) {
        Some(s) if s.eq_ignore_ascii_case("SESSION") || s.eq_ignore_ascii_case("LOCAL") => 2,
        _ => 1,
    };
    let set_name = w.get(at)?;
    if !w.first()?.eq_ignore_ascii_case("SET")
        || !names.iter().any(|n| set_name.eq_ignore_ascii_case(n))
    {
        return None;
    }
    let text = st.text(script);
    let name = set_name.to_ascii_lowercase();
    let after = &text[text.to_ascii_lowercase().find(&name)? + name.len()..];
    let after = after.trim_start();
    let after = match after.get(..2) {
        Some(to) if to.eq_ignore_ascii_case("TO") => &after[2..],
        _ => after.strip_prefix('=').unwrap_or(after),
    };
    let value = after.trim().trim_end_matches(';').trim();
    Some(value.trim_matches('\'').to_ascii_lowercase())
}

/// Refuses the two settings that change how belay itself must read the script and talk to
/// the server; pg_dump writes both with the values belay works with.
fn check_session_setting(script: &str, st: &Statement) -> Result<(), ScriptError> {
    let line = line_of_offset(script, st.start);
    if let Some(v) = set_value(script, st, &["client_encoding", "names"])
        && !matches!(v.as_str(), "utf8" | "utf-8" | "unicode")
    {
        return Err(ScriptError {
            line,
            message: format!(
                "the script sets client_encoding to `{v}`: belay reads scripts as UTF-8 and talks UTF-8 to the server (its history row is written in the same session); dump with `pg_dump -E UTF8`, or delete the line if the file is UTF-8 already"
            ),
        });
    }
    if let Some(v) = set_value(script, st, &["standard_conforming_strings"])
        && !matches!(v.as_str(), "on" | "true" | "1" | "yes")
    {
        return Err(ScriptError {
            line,
            message: format!(
                "the script sets standard_conforming_strings to `{v}`: belay splits scripts where backslashes in '' strings are literal (the default since PostgreSQL 9.1); write escapes as E'' strings and delete the line"
            ),
        });
    }
    Ok(())
}

/// Splits a script into top-level statements. Empty statements (stray `;`) and
/// comment-only text produce nothing, so a comment-only script is a valid no-op.
///
/// Plain SQL: a backslash is just a character and `COPY … FROM stdin` has no inline data
/// (see [`split_script`] for psql scripts).
pub fn split(script: &str) -> Vec<Statement> {
    // Without psql rules the lexer has nothing to refuse.
    lex(script, false).map(|l| l.statements).unwrap_or_default()
}

struct Lexed {
    statements: Vec<Statement>,
    /// Byte ranges of the raw text that are not SQL (meta-commands, COPY data).
    blanked: Vec<std::ops::Range<usize>>,
}

/// The end of the line containing `i`: the offset of its `\n`, or the end of the text.
fn line_end(b: &[u8], i: usize) -> usize {
    b[i..]
        .iter()
        .position(|&c| c == b'\n')
        .map_or(b.len(), |p| i + p)
}

/// What a `COPY` statement exchanges with the client.
#[derive(Debug, PartialEq, Eq)]
enum CopyIo {
    /// Not a COPY, or one reading or writing a server-side file or program.
    None,
    FromStdin {
        binary: bool,
    },
    ToStdout,
}

fn copy_io(text: &str) -> CopyIo {
    let toks = tokens(text);
    if !toks.first().is_some_and(|t| t.is_kw("COPY")) {
        return CopyIo::None;
    }
    let binary = toks.iter().any(|t| t.is_kw("BINARY"));
    let mut depth = 0usize;
    for (k, t) in toks.iter().enumerate() {
        match t {
            Tok::Punct('(') => depth += 1,
            Tok::Punct(')') => depth = depth.saturating_sub(1),
            _ if depth == 0 => {
                let next = toks.get(k + 1);
                if t.is_kw("FROM") && next.is_some_and(|n| n.is_kw("STDIN")) {
                    return CopyIo::FromStdin { binary };
                }
                if t.is_kw("TO") && next.is_some_and(|n| n.is_kw("STDOUT")) {
                    return CopyIo::ToStdout;
                }
            }
            _ => {}
        }
    }
    CopyIo::None
}

/// The psql meta-command starting at the backslash at `i`: its name (what follows the
/// backslash up to whitespace) and the whole command as written (to the end of its line).
fn meta_command(script: &str, i: usize) -> (&str, &str) {
    let b = script.as_bytes();
    let end = line_end(b, i);
    let whole = script[i..end].trim_end();
    let name_end = whole[1..]
        .find(|c: char| c.is_whitespace())
        .map_or(whole.len(), |p| p + 1);
    (&whole[1..name_end], whole)
}

fn refuse_meta(script: &str, i: usize, in_statement: bool) -> ScriptError {
    let (name, whole) = meta_command(script, i);
    let line = line_of_offset(script, i);
    let message = match name {
        "connect" | "c" => format!(
            "psql meta-command `{whole}`: a migration runs on the database belay was given and cannot switch to another; take one dump per database without `--create` and migrate each database with its own migrations directory, or remove the line"
        ),
        _ if in_statement => format!(
            "psql meta-command `{whole}` inside a statement: belay sends SQL to the server, not through psql; end the statement with `;` and remove the meta-command"
        ),
        _ => format!(
            "psql meta-command `{whole}`: belay sends SQL to the server, not through psql, so it cannot run `\\{name}`; remove it (belay understands only what pg_dump writes: `\\restrict`/`\\unrestrict` lines and `COPY … FROM stdin` data ending in `\\.`)"
        ),
    };
    ScriptError { line, message }
}

/// The lexer behind [`split`] and [`split_script`]; with `psql`, backslashes outside
/// literals are meta-commands and `COPY … FROM stdin;` is followed by its data.
fn lex(script: &str, psql: bool) -> Result<Lexed, ScriptError> {
    let b = script.as_bytes();
    let mut out = Vec::new();
    let mut blanked = Vec::new();
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
            copy_data: None,
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
            copy_data: None,
        });
    };

    while i < b.len() {
        if let Some(end) = comment_end(b, i) {
            i = end;
            continue;
        }
        let c = b[i];
        match c {
            b'\\' if psql => {
                let (name, _) = meta_command(script, i);
                if cur.is_some() || !matches!(name, "restrict" | "unrestrict") {
                    return Err(refuse_meta(script, i, cur.is_some()));
                }
                // psql's guard against a malicious server while restoring; meaningless
                // when belay sends the statements itself.
                let end = line_end(b, i);
                blanked.push(i..end);
                i = end;
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
                    if psql {
                        i = copy_data(script, &mut st, &mut blanked)?;
                    }
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
        if psql && reads_stdin(script, &st)? {
            // psql sends a statement at its `;`: without one this COPY never runs, and
            // there is no data after it anyway.
            return Err(ScriptError {
                line: line_of_offset(script, st.start),
                message: "COPY … FROM stdin without `;` at the end of the script: end it with `;`, followed by its data lines and a `\\.` line".into(),
            });
        }
        out.push(st);
    }
    Ok(Lexed {
        statements: out,
        blanked,
    })
}

/// Whether `st` is a text `COPY … FROM stdin`; a COPY exchanging data with the client in
/// any other way is refused.
fn reads_stdin(script: &str, st: &Statement) -> Result<bool, ScriptError> {
    let refuse = |message: &str| {
        Err(ScriptError {
            line: line_of_offset(script, st.start),
            message: message.to_string(),
        })
    };
    match copy_io(st.text(script)) {
        CopyIo::None => Ok(false),
        CopyIo::FromStdin { binary: false } => Ok(true),
        CopyIo::ToStdout => refuse(
            "COPY … TO STDOUT sends rows to the client, and a migration has nowhere to put them; remove it (or COPY to a server-side file, if that is really meant)",
        ),
        CopyIo::FromStdin { binary: true } => refuse(
            "COPY … FROM stdin in binary format: binary data cannot follow the statement in a text script; dump with text COPY (pg_dump's plain format does)",
        ),
    }
}

/// For a `COPY … FROM stdin` statement just ended by its `;` (at `st.end`), takes the data
/// lines that follow, up to the `\.` line, into `st.copy_data`, marks them blanked, and
/// returns where lexing resumes; for any other statement returns `st.end`.
fn copy_data(
    script: &str,
    st: &mut Statement,
    blanked: &mut Vec<std::ops::Range<usize>>,
) -> Result<usize, ScriptError> {
    if !reads_stdin(script, st)? {
        return Ok(st.end);
    }
    let b = script.as_bytes();
    let line = line_of_offset(script, st.start);
    let refuse = |message: String| Err(ScriptError { line, message });
    // As psql reads it: the data starts on the line after the statement's `;`.
    let eol = line_end(b, st.end);
    if !script[st.end..eol].trim().is_empty() {
        return refuse(format!(
            "text after `COPY … FROM stdin;` on the same line (`{}`): its data must start on the next line",
            script[st.end..eol].trim()
        ));
    }
    let data_start = (eol + 1).min(b.len());
    let mut p = data_start;
    while p < b.len() {
        let end = line_end(b, p);
        let content = &script[p..end];
        if content.strip_suffix('\r').unwrap_or(content) == "\\." {
            st.copy_data = Some(script[data_start..p].to_string());
            blanked.push(data_start..end);
            return Ok(end);
        }
        p = end + 1;
    }
    refuse(
        "COPY … FROM stdin has no `\\.` line ending its data (psql would read the rest of the file as data); add a line holding only `\\.` after its last data line".into(),
    )
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

/// Tables a statement touches, as far as its tokens tell (a lexer, not a parser): names as
/// written (`schema.table`, quoted identifiers keep their quotes), in order, deduplicated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableTargets {
    /// Dropped (`DROP TABLE`), emptied (`TRUNCATE`) or losing columns
    /// (`ALTER TABLE … DROP [COLUMN]`): their data is gone once the statement runs.
    pub data_lost: Vec<String>,
    /// Altered in other ways (`ALTER TABLE` without a dropped column).
    pub altered: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Word(String),
    Punct(char),
}

impl Tok {
    fn is_kw(&self, kw: &str) -> bool {
        matches!(self, Tok::Word(w) if w.eq_ignore_ascii_case(kw))
    }
}

/// Where the comment starting at `i` ends (a `--` comment before its newline, a `/* */`
/// comment, nested as PostgreSQL allows, after its close), or `None` when none starts there.
fn comment_end(b: &[u8], i: usize) -> Option<usize> {
    match (b.get(i), b.get(i + 1)) {
        (Some(b'-'), Some(b'-')) => Some(
            b[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |p| i + p),
        ),
        (Some(b'/'), Some(b'*')) => {
            let mut depth = 1;
            let mut j = i + 2;
            while j < b.len() && depth > 0 {
                if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                    depth += 1;
                    j += 2;
                } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            Some(j)
        }
        _ => None,
    }
}

/// Words (quoted identifiers verbatim) and punctuation; comments skipped, strings and
/// dollar-quoted bodies reduced to one punctuation token.
fn tokens(text: &str) -> Vec<Tok> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if let Some(end) = comment_end(b, i) {
            i = end;
            continue;
        }
        let c = b[i];
        match c {
            b'\'' => {
                let escapes =
                    matches!(out.last(), Some(Tok::Word(w)) if w.eq_ignore_ascii_case("E"));
                i = skip_quoted(b, i, b'\'', escapes);
                out.push(Tok::Punct('\''));
            }
            b'"' => {
                let start = i;
                i = skip_quoted(b, i, b'"', false);
                out.push(Tok::Word(text[start..i].to_string()));
            }
            b'$' => match dollar_tag_end(b, i) {
                Some(tag_end) => {
                    let tag = &b[i..=tag_end];
                    let mut j = tag_end + 1;
                    while j + tag.len() <= b.len() && &b[j..j + tag.len()] != tag {
                        j += 1;
                    }
                    i = (j + tag.len()).min(b.len());
                    out.push(Tok::Punct('$'));
                }
                None => {
                    i += 1;
                    out.push(Tok::Punct('$'));
                }
            },
            c if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 => {
                let start = i;
                while i < b.len()
                    && (b[i].is_ascii_alphanumeric()
                        || b[i] == b'_'
                        || b[i] == b'$'
                        || b[i] >= 0x80)
                {
                    i += 1;
                }
                out.push(Tok::Word(text[start..i].to_string()));
            }
            c if c.is_ascii_whitespace() => i += 1,
            c => {
                out.push(Tok::Punct(c as char));
                i += 1;
            }
        }
    }
    out
}

/// Whether `text`'s parentheses (outside strings and comments) close in order. The
/// splitter ends a statement at every `;` outside quotes, comments and `BEGIN ATOMIC`, so
/// a statement that holds `;` inside parentheses (a multi-action rule, `DO INSTEAD (…;
/// …)`) comes out in pieces that do not balance: the server would see one statement where
/// belay counts several.
pub fn parens_balanced(text: &str) -> bool {
    let mut depth = 0usize;
    for t in tokens(text) {
        match t {
            Tok::Punct('(') => depth += 1,
            Tok::Punct(')') => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            _ => {}
        }
    }
    depth == 0
}

/// Whether `text` (one statement from [`split`]) ends with its terminating `;`, not in a
/// trailing comment.
pub fn ends_with_terminator(text: &str) -> bool {
    matches!(tokens(text).last(), Some(Tok::Punct(';')))
}

/// A possibly qualified name starting at `i`: (`a.b` as written, index after it).
fn name_at(toks: &[Tok], mut i: usize) -> Option<(String, usize)> {
    let Some(Tok::Word(first)) = toks.get(i) else {
        return None;
    };
    let mut name = first.clone();
    i += 1;
    while let (Some(Tok::Punct('.')), Some(Tok::Word(next))) = (toks.get(i), toks.get(i + 1)) {
        name.push('.');
        name.push_str(next);
        i += 2;
    }
    Some((name, i))
}

/// Skips `IF EXISTS` at `i`.
fn skip_if_exists(toks: &[Tok], i: usize) -> usize {
    if toks.get(i).is_some_and(|t| t.is_kw("IF"))
        && toks.get(i + 1).is_some_and(|t| t.is_kw("EXISTS"))
    {
        i + 2
    } else {
        i
    }
}

/// A comma-separated list of table names from `i` (`ONLY` and a trailing `*` allowed).
fn name_list(toks: &[Tok], mut i: usize) -> Vec<String> {
    let mut names = Vec::new();
    loop {
        if toks.get(i).is_some_and(|t| t.is_kw("ONLY")) {
            i += 1;
        }
        let Some((name, next)) = name_at(toks, i) else {
            break;
        };
        names.push(name);
        i = next;
        if toks.get(i) == Some(&Tok::Punct('*')) {
            i += 1;
        }
        if toks.get(i) == Some(&Tok::Punct(',')) {
            i += 1;
        } else {
            break;
        }
    }
    names
}

impl Statement {
    /// The tables this statement drops, truncates, drops columns of, or otherwise alters.
    /// Best effort from tokens: `DROP TABLE`, `TRUNCATE`, `ALTER TABLE` are recognised;
    /// anything else (functions, `DROP SCHEMA … CASCADE`) names no table.
    pub fn table_targets(&self, script: &str) -> TableTargets {
        let mut t = TableTargets::default();
        let first = self.words.first().map(|w| w.to_ascii_uppercase());
        let second = self.words.get(1).map(|w| w.to_ascii_uppercase());
        match (first.as_deref(), second.as_deref()) {
            (Some("DROP"), Some("TABLE"))
            | (Some("TRUNCATE"), _)
            | (Some("ALTER"), Some("TABLE")) => {}
            _ => return t,
        }
        let toks = tokens(self.text(script));
        match (first.as_deref(), second.as_deref()) {
            (Some("DROP"), _) => t.data_lost = name_list(&toks, skip_if_exists(&toks, 2)),
            (Some("TRUNCATE"), _) => {
                let i = if toks.get(1).is_some_and(|t| t.is_kw("TABLE")) {
                    2
                } else {
                    1
                };
                t.data_lost = name_list(&toks, i);
            }
            _ => {
                let mut i = skip_if_exists(&toks, 2);
                if toks.get(i).is_some_and(|t| t.is_kw("ONLY")) {
                    i += 1;
                }
                if toks.get(i).is_some_and(|t| t.is_kw("ALL")) {
                    return t; // ALTER TABLE ALL IN TABLESPACE
                }
                let Some((name, mut i)) = name_at(&toks, i) else {
                    return t;
                };
                if toks.get(i) == Some(&Tok::Punct('*')) {
                    i += 1;
                }
                // Actions are separated by commas outside parentheses; one starting with
                // DROP (other than DROP CONSTRAINT) drops a column.
                let mut depth = 0usize;
                let mut action_start = true;
                let mut drops_column = false;
                while i < toks.len() {
                    match &toks[i] {
                        Tok::Punct('(') => depth += 1,
                        Tok::Punct(')') => depth = depth.saturating_sub(1),
                        Tok::Punct(',') if depth == 0 => {
                            action_start = true;
                            i += 1;
                            continue;
                        }
                        tok if action_start
                            && depth == 0
                            && tok.is_kw("DROP")
                            && !toks.get(i + 1).is_some_and(|n| n.is_kw("CONSTRAINT")) =>
                        {
                            drops_column = true;
                        }
                        _ => {}
                    }
                    action_start = false;
                    i += 1;
                }
                if drops_column {
                    t.data_lost.push(name);
                } else {
                    t.altered.push(name);
                }
            }
        }
        t.data_lost.dedup();
        t
    }
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
    fn a_statement_split_inside_parentheses_does_not_balance() {
        let rule = "CREATE RULE r AS ON INSERT TO t DO INSTEAD (INSERT INTO a VALUES (1); \
                    UPDATE b SET x = 1; );\nCREATE TABLE c (id int, note text DEFAULT ')');";
        let pieces = split(rule);
        assert_eq!(
            pieces.len(),
            4,
            "the splitter cuts the rule's actions apart"
        );
        let balanced: Vec<bool> = pieces
            .iter()
            .map(|p| parens_balanced(p.text(rule)))
            .collect();
        assert_eq!(balanced, [false, true, false, true]);
        assert!(parens_balanced("SELECT f(g(1)) /* ( */ -- )\n"));
        assert!(!parens_balanced(") ("));
    }

    #[test]
    fn a_statement_ends_with_its_terminator_not_a_comment() {
        assert!(ends_with_terminator("SELECT 1;"));
        assert!(ends_with_terminator("SELECT ';';"));
        assert!(!ends_with_terminator("SELECT 1 -- done;"));
        assert!(!ends_with_terminator("SELECT 1 /* ; */"));
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
    fn finds_tables_that_lose_data_or_are_altered() {
        let script = r#"
            drop table if exists public.orders, "Line Items" cascade;
            TRUNCATE TABLE ONLY a, b;
            alter table only s.t drop column c, add column d int;
            ALTER TABLE u ADD COLUMN x int DEFAULT 0, DROP CONSTRAINT u_fk;
            alter table v alter column w drop default;
            alter table if exists w drop x;
            create function f() returns void as $$ drop table nope; $$ language sql;
            drop index i;
        "#;
        let targets: Vec<TableTargets> = split(script)
            .iter()
            .map(|s| s.table_targets(script))
            .collect();
        assert_eq!(targets[0].data_lost, ["public.orders", "\"Line Items\""]);
        assert_eq!(targets[1].data_lost, ["a", "b"]);
        assert_eq!(targets[2].data_lost, ["s.t"]);
        assert_eq!(
            (targets[3].data_lost.len(), &targets[3].altered[..]),
            (0, &["u".to_string()][..])
        );
        assert_eq!(targets[4].altered, ["v"]);
        assert!(targets[4].data_lost.is_empty());
        assert_eq!(targets[5].data_lost, ["w"]);
        assert_eq!(targets[6], TableTargets::default());
        assert_eq!(targets[7], TableTargets::default());
    }

    fn script_err(raw: &str) -> ScriptError {
        match split_script(raw) {
            Ok(s) => panic!("accepted: {:?}", s.statements),
            Err(e) => e,
        }
    }

    #[test]
    fn pg_dump_restrict_lines_are_blanked_and_copy_data_captured() {
        let raw = "--\n-- dump\n--\n\n\\restrict AbC\n\nSET lock_timeout = 0;\nCOPY public.t (a, b) FROM stdin;\n1\tx\\\\.y\n2\t\\\\.\n\\.\n\nSELECT 'it''s \\ ok', E'\\';', $$ \\x $$; -- \\set\n/* \\c other */\n\\unrestrict AbC\n";
        let s = split_script(raw).unwrap();
        assert_eq!(s.text.len(), raw.len());
        assert_eq!(s.text.lines().count(), raw.lines().count());
        assert!(!s.text.contains("restrict"), "{}", s.text);
        assert!(!s.text.contains("1\tx"), "COPY data left in the text");
        let texts: Vec<&str> = s
            .statements
            .iter()
            .map(|st| st.text(&s.text).trim())
            .collect();
        assert_eq!(
            texts,
            [
                "SET lock_timeout = 0;",
                "COPY public.t (a, b) FROM stdin;",
                "SELECT 'it''s \\ ok', E'\\';', $$ \\x $$;"
            ]
        );
        assert_eq!(
            s.statements[1].copy_data.as_deref(),
            Some("1\tx\\\\.y\n2\t\\\\.\n")
        );
        assert_eq!(line_of_offset(&s.text, s.statements[2].start), 13);
        assert_eq!(s.statements[0].copy_data, None);
        // Plain `split` knows nothing of psql: the same COPY has no data there.
        assert!(
            split("COPY t FROM stdin;")
                .iter()
                .all(|st| st.copy_data.is_none())
        );
    }

    #[test]
    fn empty_copy_data_and_crlf_terminator() {
        let s = split_script("COPY t FROM STDIN;\r\n\\.\r\nselect 1;").unwrap();
        assert_eq!(s.statements[0].copy_data.as_deref(), Some(""));
        assert_eq!(s.statements.len(), 2);
        let s = split_script("copy t (a) from stdin with (format csv);\n\"a\n\\.\n").unwrap();
        assert_eq!(s.statements[0].copy_data.as_deref(), Some("\"a\n"));
        // Non-ASCII data is blanked byte for byte.
        let raw = "COPY t FROM stdin;\nü\t✓ 日本\n\\.\nselect 'é';";
        let s = split_script(raw).unwrap();
        assert_eq!(s.text.len(), raw.len());
        assert_eq!(s.statements[1].text(&s.text), "select 'é';");
        assert_eq!(s.statements[0].copy_data.as_deref(), Some("ü\t✓ 日本\n"));
    }

    #[test]
    fn refuses_meta_commands_and_broken_copies_naming_the_line() {
        let e = script_err("select 1;\n\\connect other\nselect 2;");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("`\\connect other`"), "{e}");
        assert!(e.message.contains("--create"), "{e}");
        let e = script_err("select 1;\n\n  \\c other");
        assert_eq!(e.line, 3);
        let e = script_err("-- x\n\\set x 1\nselect :x;");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("`\\set x 1`"), "{e}");
        let e = script_err("select 1\n\\gset\n");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("inside a statement"), "{e}");
        let e = script_err("select 1;\n\\restrict_not KEY\n");
        assert!(e.message.contains("restrict_not"), "{e}");
        let e = script_err("select 1;\nCOPY t FROM stdin;\n1\n2\nselect 2;\n");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("no `\\.` line"), "{e}");
        let e = script_err("COPY t FROM stdin; 1\n\\.\n");
        assert!(e.message.contains("next line"), "{e}");
        let e = script_err("select 1;\nCOPY t FROM stdin");
        assert_eq!(e.line, 2);
        let e = script_err("\nCOPY t TO STDOUT;");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("STDOUT"), "{e}");
        let e = script_err("COPY t FROM stdin WITH (FORMAT binary);\n\\.\n");
        assert!(e.message.contains("binary"), "{e}");
        let e = script_err("SET client_encoding = 'SQL_ASCII';\nselect 1;");
        assert!(
            script_err("SET NAMES 'LATIN1';")
                .message
                .contains("`latin1`")
        );
        assert!(e.message.contains("`sql_ascii`"), "{e}");
        let e = script_err("select 1;\nSET SESSION standard_conforming_strings TO off;");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("`off`"), "{e}");
        assert!(
            split_script("SET client_encoding = 'UTF8';\nSET standard_conforming_strings = on;")
                .is_ok()
        );
        // A `\.` line outside COPY data is a meta-command like any other.
        assert_eq!(script_err("select 1;\n\\.\n").line, 2);
        // Server-side COPY is SQL.
        assert!(split_script("COPY t FROM '/tmp/x'; COPY (select 1) TO '/tmp/y';").is_ok());
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
