//! A failed user query as text: PostgreSQL's message, placed in the query.

use sqlx::postgres::{PgDatabaseError, PgErrorPosition};

/// `message (line L, column C of the query); detail; hint: …`, or without the position when PostgreSQL gave
/// no position in the query. Never sqlx's `Display`, which appends "at line N" where N is
/// the line of PostgreSQL's C source that raised the error: a number that reads as a line
/// of the user's SQL and is not one.
pub(crate) fn describe(e: &sqlx::Error, query: &str) -> String {
    let Some(pg) = e
        .as_database_error()
        .and_then(|d| d.try_downcast_ref::<PgDatabaseError>())
    else {
        return e.to_string();
    };
    let mut out = pg.message().to_string();
    if let Some(PgErrorPosition::Original(p)) = pg.position() {
        let (line, column) = line_col(query, p);
        out.push_str(&format!(" (line {line}, column {column} of the query)"));
    }
    if let Some(detail) = pg.detail() {
        out.push_str(&format!("; {detail}"));
    }
    if let Some(hint) = pg.hint() {
        out.push_str(&format!("; hint: {hint}"));
    }
    out
}

/// PostgreSQL's 1-based character position as a 1-based line and column.
fn line_col(text: &str, char_pos: usize) -> (usize, usize) {
    let (mut line, mut col) = (1, 1);
    for ch in text.chars().take(char_pos.saturating_sub(1)) {
        if ch == '\n' {
            line += 1;
            col = 1;
        } else {
            col += 1;
        }
    }
    (line, col)
}

#[cfg(test)]
mod tests {
    #[test]
    fn positions_count_characters_and_lines() {
        let q = "SELECT é,\n  nope";
        assert_eq!(super::line_col(q, 1), (1, 1));
        assert_eq!(super::line_col(q, 8), (1, 8));
        assert_eq!(super::line_col(q, 13), (2, 3));
    }
}
