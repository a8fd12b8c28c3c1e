//! Other migration tools' section markers, read line by line as those tools read them.
//!
//! goose and dbmate keep a migration and its undo in one file, separated by marker
//! comments. Run as plain SQL such a file applies its undo right after the migration, so
//! belay either reads the markers exactly (the goose and dbmate layouts) or refuses the
//! file: every marker of a tool belay does not read (sql-migrate, Liquibase formatted
//! SQL), every goose annotation belay does not support, and every marker found in a file
//! of another layout is an error naming its line, before anything runs.
//!
//! The markers are line-based in both tools, so they are here too: a marker line inside a
//! dollar-quoted body is still a marker, as it is for goose and dbmate.

use crate::directives::NoTransactionSource;
use std::fmt;

/// A tool whose section markers belay recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Goose,
    Dbmate,
    SqlMigrate,
    Liquibase,
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tool::Goose => "goose",
            Tool::Dbmate => "dbmate",
            Tool::SqlMigrate => "sql-migrate",
            Tool::Liquibase => "Liquibase",
        })
    }
}

/// A line another tool reads as a marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// 1-based.
    pub line: usize,
    pub tool: Tool,
    /// The line as written, without its line ending.
    pub text: String,
}

/// Why a file's markers cannot be read (1-based line of the file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct SectionError {
    pub line: usize,
    pub message: String,
}

fn err(line: usize, message: impl Into<String>) -> SectionError {
    SectionError {
        line,
        message: message.into(),
    }
}

/// Which tool, if any, reads `line` as a marker. Detection is deliberately wider than each
/// tool's own grammar (any case, indented): a near-miss marker is refused, not run.
///
/// goose's own gate is wider than its documented form: any `--` line containing `+goose`
/// anywhere is an annotation to it, every `--` on the line removed (`--- +goose Down` is its
/// Down marker). So is it here, or a Down section could run as part of the up section.
fn marker_tool(line: &str) -> Option<Tool> {
    let body = line.trim_start().strip_prefix("--")?.trim_start();
    let lower = body.to_ascii_lowercase();
    if lower.contains("+goose") {
        return Some(Tool::Goose);
    }
    if lower.starts_with("+migrate") {
        return Some(Tool::SqlMigrate);
    }
    if lower
        .strip_prefix("migrate:")
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_alphabetic()))
    {
        return Some(Tool::Dbmate);
    }
    if lower.starts_with("liquibase formatted sql") {
        return Some(Tool::Liquibase);
    }
    // `--changeset author:id`: a colon between two words keeps prose such as
    // "-- changeset notes: none" out.
    if let Some(rest) = lower.strip_prefix("changeset")
        && rest.starts_with(char::is_whitespace)
        && rest
            .split_whitespace()
            .next()
            .and_then(|w| w.split_once(':'))
            .is_some_and(|(author, id)| !author.is_empty() && !id.is_empty())
    {
        return Some(Tool::Liquibase);
    }
    None
}

/// Every marker line in `text`, in order.
pub fn markers(text: &str) -> Vec<Marker> {
    text.lines()
        .enumerate()
        .filter_map(|(i, l)| {
            marker_tool(l).map(|tool| Marker {
                line: i + 1,
                tool,
                text: l.trim_end().to_string(),
            })
        })
        .collect()
}

/// The error for `marker` in a file belay reads as plain SQL (`within` is `None`: every
/// line runs) or as a migration of another tool, whose markers alone it reads there.
pub fn foreign(marker: &Marker, within: Option<Tool>) -> SectionError {
    let m = marker.text.trim();
    let tool = marker.tool;
    let reading = match within {
        None => "belay reads this file as plain SQL, where every line runs, so its down section would run right after its up section".to_string(),
        Some(own) => format!("this is a {own} migration, where belay reads {own}'s markers only"),
    };
    let fix = match tool {
        Tool::Goose | Tool::Dbmate => format!(
            "keep {tool} migrations as <version>_<description>.sql files in a directory of {tool} migrations only, or remove the marker"
        ),
        Tool::SqlMigrate => "belay does not read sql-migrate files: split the file into <version>_<description>.up.sql and .down.sql (or make it a goose file)".to_string(),
        Tool::Liquibase => "belay does not read Liquibase formatted SQL (changesets, rollbacks, preconditions): split the changesets into migration files of a layout belay reads".to_string(),
    };
    err(
        marker.line,
        format!("`{m}` is a {tool} section marker, but {reading}; {fix}"),
    )
}

/// A single-file migration split into its sections. Each section's text is the whole file
/// with every line outside the section blanked to spaces (byte length and line breaks
/// kept), so offsets and line numbers in a section are the file's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sections {
    /// The lines before the first marker (comments only) and the up section.
    pub up: String,
    pub up_no_transaction: Option<NoTransactionSource>,
    /// `None` when the file has no down marker.
    pub down: Option<String>,
    pub down_no_transaction: Option<NoTransactionSource>,
}

/// What the goose and dbmate readers share about a line: whose marker it is, where
/// markers may stand, and what comes before the first.
struct Grammar {
    tool: Tool,
    /// The marker that must come first (`-- +goose Up`).
    first: &'static str,
    /// What a refused indented marker is called, and what the tool would do with it.
    indented: (&'static str, &'static str),
}

const GOOSE: Grammar = Grammar {
    tool: Tool::Goose,
    first: "-- +goose Up",
    indented: (
        "goose annotation",
        "goose reads annotations only at the start of a line and would run this as SQL",
    ),
};

const DBMATE: Grammar = Grammar {
    tool: Tool::Dbmate,
    first: "-- migrate:up",
    indented: (
        "dbmate marker",
        "dbmate reads markers only at the start of a line and would run this as part of the section above",
    ),
};

impl Grammar {
    /// Line `line_no` of a file of this grammar's tool, in `part`: `None` for a line of
    /// the current section (recorded in `parts`), or the text after a marker's dashes
    /// (recorded as a marker). Refused: another tool's marker, anything but comments
    /// before the first marker, an indented marker.
    fn marker<'l>(
        &self,
        line_no: usize,
        line: &'l str,
        part: Part,
        parts: &mut Vec<Part>,
    ) -> Result<Option<&'l str>, SectionError> {
        if let Some(e) = other_tool(line_no, line, self.tool) {
            return Err(e);
        }
        if marker_tool(line) != Some(self.tool) {
            if part == Part::Preamble {
                preamble_line(line_no, line, self.first)?;
            }
            parts.push(part);
            return Ok(None);
        }
        if line.starts_with(char::is_whitespace) {
            let (what, why) = self.indented;
            return Err(err(
                line_no,
                format!(
                    "{what} `{}` is indented: {why}; remove the indentation",
                    line.trim()
                ),
            ));
        }
        parts.push(Part::Marker);
        Ok(Some(line.trim_start_matches('-').trim_start()))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Before the first section marker: belongs to the up script (its directives).
    Preamble,
    Up,
    Down,
    /// A marker line: in neither section.
    Marker,
}

/// Lines of `text` with their byte ranges (line break included).
fn line_spans(text: &str) -> impl Iterator<Item = (usize, usize, &str)> {
    let mut start = 0;
    text.split_inclusive('\n').map(move |l| {
        let s = start;
        start += l.len();
        (s, start, l.trim_end_matches(['\n', '\r']))
    })
}

/// `text` with the bytes of every line whose part is not in `keep` turned into spaces.
/// Whole lines only, so no multi-byte character is ever cut.
fn keep_only(text: &str, parts: &[Part], keep: &[Part]) -> String {
    let mut out = text.as_bytes().to_vec();
    for ((start, end, _), part) in line_spans(text).zip(parts) {
        if !keep.contains(part) {
            for b in &mut out[start..end] {
                if *b != b'\n' {
                    *b = b' ';
                }
            }
        }
    }
    // Only ASCII bytes were written, over whole lines of valid UTF-8.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Checks a line before the first section marker: only blank lines and `--` comments, as
/// both goose and dbmate require.
fn preamble_line(line_no: usize, line: &str, first_marker: &str) -> Result<(), SectionError> {
    let t = line.trim();
    if t.is_empty() || t.starts_with("--") {
        return Ok(());
    }
    Err(err(
        line_no,
        format!(
            "SQL before `{first_marker}`: the tool refuses statements outside a section, and belay cannot tell which section they belong to; move them below `{first_marker}`"
        ),
    ))
}

/// Refuses a marker of another tool in a file of `own`.
fn other_tool(marker_line: usize, line: &str, own: Tool) -> Option<SectionError> {
    let tool = marker_tool(line)?;
    (tool != own).then(|| {
        foreign(
            &Marker {
                line: marker_line,
                tool,
                text: line.to_string(),
            },
            Some(own),
        )
    })
}

/// Reads a goose SQL migration: `-- +goose Up`, `-- +goose Down`, `-- +goose
/// StatementBegin`/`StatementEnd` (balanced, inside a section) and `-- +goose NO
/// TRANSACTION` (both sections). Annotations are case-insensitive and start at the
/// beginning of their line, as goose documents; `envsub` and anything else is refused.
/// StatementBegin/End only tell goose where semicolons do not end a statement: belay's
/// lexer knows that from the SQL itself, so they are checked and then ignored.
pub fn goose(text: &str) -> Result<Sections, SectionError> {
    let mut parts = Vec::new();
    let mut part = Part::Preamble;
    let mut up_line = None;
    let mut down_line = None;
    let mut open_statement: Option<usize> = None;
    let mut no_transaction = false;
    for (idx, (_, _, line)) in line_spans(text).enumerate() {
        let line_no = idx + 1;
        let Some(body) = GOOSE.marker(line_no, line, part, &mut parts)? else {
            continue;
        };
        let words: Vec<String> = body
            .split_whitespace()
            .map(str::to_ascii_lowercase)
            .collect();
        let annotation = words.get(1..).map(|w| w.join(" ")).unwrap_or_default();
        if words.first().map(String::as_str) != Some("+goose") {
            return Err(unknown_goose(line_no, line));
        }
        match annotation.as_str() {
            "up" => {
                if let Some(first) = up_line {
                    return Err(err(
                        line_no,
                        format!(
                            "a second `-- +goose Up` (the first is on line {first}); a goose file has one up section"
                        ),
                    ));
                }
                up_line = Some(line_no);
                part = Part::Up;
            }
            "down" => {
                if up_line.is_none() {
                    return Err(err(
                        line_no,
                        "`-- +goose Down` before `-- +goose Up`: the down section comes after the up section",
                    ));
                }
                if let Some(first) = down_line {
                    return Err(err(
                        line_no,
                        format!(
                            "a second `-- +goose Down` (the first is on line {first}); a goose file has one down section"
                        ),
                    ));
                }
                if let Some(open) = open_statement {
                    return Err(err(
                        open,
                        "`-- +goose StatementBegin` has no `-- +goose StatementEnd` before `-- +goose Down`; add it",
                    ));
                }
                down_line = Some(line_no);
                part = Part::Down;
            }
            "statementbegin" => {
                if part == Part::Preamble {
                    return Err(err(
                        line_no,
                        "`-- +goose StatementBegin` outside a section: put it below `-- +goose Up` or `-- +goose Down`",
                    ));
                }
                if let Some(open) = open_statement {
                    return Err(err(
                        line_no,
                        format!(
                            "`-- +goose StatementBegin` inside another one (opened on line {open}): close that one first with `-- +goose StatementEnd`"
                        ),
                    ));
                }
                open_statement = Some(line_no);
            }
            "statementend" => {
                if open_statement.take().is_none() {
                    return Err(err(
                        line_no,
                        "`-- +goose StatementEnd` without a `-- +goose StatementBegin` before it",
                    ));
                }
            }
            "no transaction" => no_transaction = true,
            "envsub on" | "envsub off" => {
                return Err(err(
                    line_no,
                    format!(
                        "`{}`: belay does not substitute environment variables into SQL, so it cannot run this file as goose would; write the values into the script",
                        line.trim()
                    ),
                ));
            }
            _ => return Err(unknown_goose(line_no, line)),
        }
    }
    if let Some(open) = open_statement {
        return Err(err(
            open,
            "`-- +goose StatementBegin` has no `-- +goose StatementEnd`; add it where the statement ends",
        ));
    }
    if up_line.is_none() {
        return Err(err(
            1,
            "goose annotations but no `-- +goose Up`: a goose file needs an up section; add `-- +goose Up` above its statements",
        ));
    }
    let no_tx = no_transaction.then_some(NoTransactionSource::GooseNoTransaction);
    Ok(Sections {
        up: keep_only(text, &parts, &[Part::Preamble, Part::Up]),
        up_no_transaction: no_tx,
        down: down_line.map(|_| keep_only(text, &parts, &[Part::Down])),
        down_no_transaction: no_tx,
    })
}

fn unknown_goose(line_no: usize, line: &str) -> SectionError {
    err(
        line_no,
        format!(
            "unknown goose annotation `{}`; belay reads `-- +goose Up`, `-- +goose Down`, `-- +goose StatementBegin`, `-- +goose StatementEnd` and `-- +goose NO TRANSACTION`",
            line.trim()
        ),
    )
}

/// Reads a dbmate migration: `-- migrate:up` then `-- migrate:down`, each optionally
/// followed by `transaction:false` (or `:true`), markers at the start of their line in
/// lower case, as dbmate matches them. dbmate requires both markers; so does belay (an
/// empty down section means no undo). Unknown options are refused: dbmate would ignore
/// them, and belay does not guess what they were meant to change.
pub fn dbmate(text: &str) -> Result<Sections, SectionError> {
    let mut parts = Vec::new();
    let mut part = Part::Preamble;
    let mut up_line = None;
    let mut down_line = None;
    let mut no_tx = [None, None];
    for (idx, (_, _, line)) in line_spans(text).enumerate() {
        let line_no = idx + 1;
        let Some(body) = DBMATE.marker(line_no, line, part, &mut parts)? else {
            continue;
        };
        let mut words = body.split_whitespace();
        let direction = words.next().unwrap_or_default();
        let (slot, seen, name) = match direction {
            "migrate:up" => (0, &mut up_line, "-- migrate:up"),
            "migrate:down" => (1, &mut down_line, "-- migrate:down"),
            other => {
                return Err(err(
                    line_no,
                    format!(
                        "unknown dbmate marker `{other}`; dbmate reads `-- migrate:up` and `-- migrate:down`, in lower case, and would not see this one"
                    ),
                ));
            }
        };
        if let Some(first) = *seen {
            return Err(err(
                line_no,
                format!(
                    "a second `{name}` (the first is on line {first}); a dbmate file has one of each"
                ),
            ));
        }
        *seen = Some(line_no);
        if slot == 1 && up_line.is_none() {
            return Err(err(
                line_no,
                "`-- migrate:down` before `-- migrate:up`: dbmate requires the up section first",
            ));
        }
        for option in words {
            match option {
                "transaction:false" => {
                    no_tx[slot] = Some(NoTransactionSource::DbmateTransactionFalse);
                }
                "transaction:true" => no_tx[slot] = None,
                other => {
                    return Err(err(
                        line_no,
                        format!(
                            "unknown dbmate option `{other}` on `{name}`; belay reads transaction:false and transaction:true"
                        ),
                    ));
                }
            }
        }
        part = if slot == 0 { Part::Up } else { Part::Down };
    }
    if up_line.is_none() {
        return Err(err(
            1,
            "dbmate markers but no `-- migrate:up`: a dbmate file needs an up section; add `-- migrate:up` above its statements",
        ));
    }
    if down_line.is_none() {
        return Err(err(
            text.lines().count().max(1),
            "no `-- migrate:down`: dbmate requires one; add it at the end (leave the section empty when the migration has no undo)",
        ));
    }
    Ok(Sections {
        up: keep_only(text, &parts, &[Part::Preamble, Part::Up]),
        up_no_transaction: no_tx[0],
        down: Some(keep_only(text, &parts, &[Part::Down])),
        down_no_transaction: no_tx[1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(s: &str) -> Vec<&str> {
        s.lines().map(str::trim_end).collect()
    }

    #[test]
    fn goose_sections_keep_the_files_lines() {
        let text = "-- belay:lock-timeout=1s\n-- +goose Up\n-- +goose StatementBegin\nCREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$;\n-- +goose StatementEnd\nCREATE TABLE é (id int);\n\n-- +goose Down\nDROP TABLE é;\nDROP FUNCTION f();\n";
        let s = goose(text).unwrap();
        assert_eq!(s.up.len(), text.len());
        assert_eq!(s.up.lines().count(), text.lines().count());
        assert_eq!(
            lines_of(&s.up),
            [
                "-- belay:lock-timeout=1s",
                "",
                "",
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$;",
                "",
                "CREATE TABLE é (id int);",
                "",
                "",
                "",
                ""
            ]
        );
        let down = s.down.unwrap();
        assert_eq!(down.len(), text.len());
        assert_eq!(lines_of(&down)[8], "DROP TABLE é;");
        assert!(lines_of(&down)[..8].iter().all(|l| l.is_empty()));
        assert_eq!(s.up_no_transaction, None);
    }

    #[test]
    fn goose_annotations_are_case_insensitive_and_no_transaction_covers_both() {
        let s = goose("-- +goose NO TRANSACTION\n-- +goose up\nCREATE INDEX CONCURRENTLY i ON t(a);\n--   +GOOSE   DOWN\nDROP INDEX CONCURRENTLY i;\n").unwrap();
        assert_eq!(
            s.up_no_transaction,
            Some(NoTransactionSource::GooseNoTransaction)
        );
        assert_eq!(
            s.down_no_transaction,
            Some(NoTransactionSource::GooseNoTransaction)
        );
        assert!(s.down.unwrap().contains("DROP INDEX"));
        let no_down = goose("-- +goose Up\nSELECT 1;\n").unwrap();
        assert_eq!(no_down.down, None);
    }

    #[test]
    fn goose_refusals_name_the_line() {
        let cases = [
            ("-- +goose Down\nSELECT 1;\n", 1, "before `-- +goose Up`"),
            ("-- +goose NO TRANSACTION\nSELECT 1;\n", 2, "SQL before"),
            (
                "-- just a comment\n-- +goose NO TRANSACTION\n",
                1,
                "no `-- +goose Up`",
            ),
            ("SELECT 0;\n-- +goose Up\nSELECT 1;\n", 1, "SQL before"),
            ("-- +goose Up\n-- +goose Up\n", 2, "second `-- +goose Up`"),
            (
                "-- +goose Up\n-- +goose StatementBegin\nSELECT 1;\n-- +goose Down\n",
                2,
                "no `-- +goose StatementEnd` before",
            ),
            (
                "-- +goose Up\n-- +goose StatementBegin\nSELECT 1;\n",
                2,
                "has no `-- +goose StatementEnd`",
            ),
            ("-- +goose Up\n-- +goose StatementEnd\n", 2, "without a"),
            (
                "-- +goose Up\n-- +goose StatementBegin\n-- +goose StatementBegin\n",
                3,
                "inside another one",
            ),
            (
                "-- +goose envsub on\n-- +goose Up\n",
                1,
                "environment variables",
            ),
            (
                "-- +goose Up\n-- +goose Sideways\n",
                2,
                "unknown goose annotation",
            ),
            ("-- +goose Up\n  -- +goose Down\n", 2, "indented"),
            (
                "-- +goose Up\nSELECT 1;\n-- migrate:down\n",
                3,
                "dbmate section marker",
            ),
            ("-- +goose Up\n-- +migrate Down\n", 2, "sql-migrate"),
        ];
        for (text, line, want) in cases {
            let e = goose(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.message.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn goose_markers_as_goose_reads_them_never_leave_a_down_in_the_up_section() {
        // goose removes every `--` of an annotation line: this is its Down marker.
        let s = goose("-- +goose Up\nCREATE TABLE t (id int);\n--- +goose Down\nDROP TABLE t;\n")
            .unwrap();
        assert!(!s.up.contains("DROP"), "{}", s.up);
        assert!(s.down.unwrap().contains("DROP TABLE t;"));
        // Other spellings goose reads (or refuses) are refused, naming the line.
        for line in [
            "-- -- +goose Down",
            "--+goose--Down",
            "-- now the +goose Down part",
        ] {
            let e =
                goose(&format!("-- +goose Up\nSELECT 1;\n{line}\nDROP TABLE t;\n")).unwrap_err();
            assert_eq!(e.line, 3, "{line}: {e}");
            assert!(
                e.message.contains("unknown goose annotation"),
                "{line}: {e}"
            );
        }
        // In a file read as plain SQL, each is a goose marker and the file is refused.
        for text in [
            "SELECT 1;\n--- +goose Down\n",
            "SELECT 1;\n---+goose down\n",
        ] {
            assert_eq!(
                markers(text)
                    .iter()
                    .map(|m| (m.line, m.tool))
                    .collect::<Vec<_>>(),
                [(2, Tool::Goose)],
                "{text:?}"
            );
        }
    }

    #[test]
    fn dbmate_sections_and_options() {
        let text = "-- a comment\n-- migrate:up transaction:false\nCREATE INDEX CONCURRENTLY i ON t(a);\n--migrate:down\nDROP INDEX i;\n";
        let s = dbmate(text).unwrap();
        assert_eq!(
            s.up_no_transaction,
            Some(NoTransactionSource::DbmateTransactionFalse)
        );
        assert_eq!(s.down_no_transaction, None);
        assert_eq!(
            lines_of(&s.up),
            [
                "-- a comment",
                "",
                "CREATE INDEX CONCURRENTLY i ON t(a);",
                "",
                ""
            ]
        );
        assert_eq!(lines_of(&s.down.unwrap())[4], "DROP INDEX i;");
        let empty_down = dbmate("-- migrate:up\nSELECT 1;\n-- migrate:down\n").unwrap();
        assert!(empty_down.down.unwrap().trim().is_empty());
    }

    #[test]
    fn dbmate_refusals_name_the_line() {
        let cases = [
            ("-- migrate:up\nSELECT 1;\n", 2, "no `-- migrate:down`"),
            (
                "-- migrate:down\n-- migrate:up\n",
                1,
                "before `-- migrate:up`",
            ),
            (
                "SELECT 1;\n-- migrate:up\n-- migrate:down\n",
                1,
                "SQL before",
            ),
            (
                "-- migrate:up foo:bar\n-- migrate:down\n",
                1,
                "unknown dbmate option `foo:bar`",
            ),
            (
                "-- migrate:up\n-- migrate:Down\n",
                2,
                "unknown dbmate marker",
            ),
            ("-- migrate:up\n-- migrate:up\n", 2, "second"),
            ("-- migrate:up\n -- migrate:down\n", 2, "indented"),
            (
                "-- migrate:up\n-- +goose Down\n-- migrate:down\n",
                2,
                "goose section marker",
            ),
            (
                "-- migrate:up\n--changeset alice:1\n-- migrate:down\n",
                2,
                "Liquibase",
            ),
        ];
        for (text, line, want) in cases {
            let e = dbmate(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.message.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn finds_markers_of_each_tool_and_not_prose() {
        let text = "--liquibase formatted sql\n-- +migrate Up\n--  +goose down\n-- migrate:up\n--changeset bob:2 runOnChange:true\n-- changeset notes: none\n-- migrate: later\n-- rollback plan: restore\nSELECT '-- +goose Up';\n";
        let found: Vec<(usize, Tool)> = markers(text).iter().map(|m| (m.line, m.tool)).collect();
        assert_eq!(
            found,
            [
                (1, Tool::Liquibase),
                (2, Tool::SqlMigrate),
                (3, Tool::Goose),
                (4, Tool::Dbmate),
                (5, Tool::Liquibase)
            ]
        );
    }
}
