//! Generated scripts for the SQL splitter and the directive parser: never a panic; a
//! refusal names a line of the input; statements stay inside the script.

use belay_migrate::{directives, sql};
use proptest::prelude::*;

/// Scripts built from the pieces the lexer cares about (quotes, dollar quotes, comments,
/// psql meta-commands, COPY data, directives), so generated input reaches its corners
/// rather than only plain words.
fn script() -> impl Strategy<Value = String> {
    let pieces = vec![
        "SELECT 1",
        ";",
        "\n",
        " ",
        "'",
        "''",
        "E'\\''",
        "\"",
        "$$",
        "$a$",
        "$1",
        "--",
        "/*",
        "*/",
        "\\",
        "\\.",
        "\\restrict x",
        "\\set x 1",
        "COPY t FROM stdin",
        "1\tx\n",
        "CREATE INDEX CONCURRENTLY i ON t (a)",
        "BEGIN",
        "COMMIT",
        "SET lock_timeout = 0",
        "-- belay:no-transaction",
        "-- belay:lock-timeout=",
        "5s",
        "-- belay:allow=",
        "é",
        "€",
        "\r\n",
        "ALTER TABLE t DROP COLUMN c",
    ];
    proptest::collection::vec(proptest::sample::select(pieces), 0..40).prop_map(|p| p.concat())
}

fn lines(text: &str) -> usize {
    text.lines().count().max(1)
}

proptest! {
    #[test]
    fn the_splitter_never_panics_and_stays_inside_the_script(raw in prop_oneof![script(), "\\PC{0,200}"]) {
        match sql::split_script(&raw) {
            Ok(split) => {
                prop_assert_eq!(split.text.len(), raw.len());
                prop_assert_eq!(lines(&split.text), lines(&raw));
                let mut last = 0;
                for st in &split.statements {
                    prop_assert!(last <= st.start && st.start <= st.end && st.end <= raw.len());
                    prop_assert!(split.text.is_char_boundary(st.start) && split.text.is_char_boundary(st.end));
                    last = st.end;
                }
            }
            Err(e) => prop_assert!(e.line >= 1 && e.line <= lines(&raw) + 1, "{} in {:?}", e, raw),
        }
        for st in sql::split(&raw) {
            prop_assert!(st.start <= st.end && st.end <= raw.len());
            let _ = st.text(&raw);
        }
    }

    #[test]
    fn the_directive_parser_never_panics_and_names_a_line(raw in prop_oneof![script(), "\\PC{0,200}"]) {
        if let Err(e) = directives::parse(&raw) {
            let line = match &e {
                directives::DirectiveError::Unknown { line, .. }
                | directives::DirectiveError::BadValue { line, .. } => *line,
            };
            prop_assert!(line >= 1 && line <= lines(&raw), "{} in {:?}", e, raw);
            let prefix = format!("line {}:", line);
            prop_assert!(e.to_string().starts_with(&prefix), "{}", e);
        }
    }
}
