//! Byte offsets (what libpg_query reports) to 1-based lines and character columns, and
//! statement boundaries from PostgreSQL's own scanner (for the parse-error path).

use pg_query::protobuf::{ScanToken, Token};

/// 1-based line and character column of a byte offset.
pub(crate) fn line_col(sql: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(sql.len());
    while !sql.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &sql[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = sql[line_start..offset].chars().count() + 1;
    (line, col)
}

fn is_comment(t: &ScanToken) -> bool {
    t.token == Token::SqlComment as i32 || t.token == Token::CComment as i32
}

/// The scanner's tokens, or `None` when even the scanner fails (an unterminated string).
pub(crate) fn tokens(sql: &str) -> Option<Vec<ScanToken>> {
    pg_query::scan(sql).ok().map(|r| r.tokens)
}

/// The first real token at or after `from` (skipping whitespace and comments).
pub(crate) fn first_token_at(tokens: Option<&[ScanToken]>, sql: &str, from: usize) -> usize {
    if let Some(tokens) = tokens
        && let Some(t) = tokens
            .iter()
            .find(|t| usize::try_from(t.start).is_ok_and(|s| s >= from) && !is_comment(t))
    {
        return usize::try_from(t.start).unwrap_or(from);
    }
    // No tokens: skip whitespace at least.
    let rest = sql.get(from..).unwrap_or("");
    from + (rest.len() - rest.trim_start().len())
}

/// Statement pieces `(start, end)` split at top-level semicolons, as the scanner sees them
/// (quotes, dollar quotes and comments are tokens, so their semicolons do not split).
pub(crate) fn split(sql: &str, tokens: &[ScanToken]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0usize;
    for t in tokens {
        if t.token == Token::Ascii59 as i32 {
            let end = usize::try_from(t.start).unwrap_or(start);
            out.push((start, end));
            start = usize::try_from(t.end).unwrap_or(end);
        }
    }
    out.push((start, sql.len()));
    out.retain(|(s, e)| {
        let piece = sql.get(*s..*e).unwrap_or("");
        tokens
            .iter()
            .any(|t| usize::try_from(t.start).is_ok_and(|ts| ts >= *s && ts < *e) && !is_comment(t))
            && !piece.trim().is_empty()
    });
    out
}

/// Where in `sql[start..end]` a parser message "… at or near \"X\"" points, if X is found.
pub(crate) fn near(sql: &str, start: usize, end: usize, message: &str) -> Option<usize> {
    let needle = message
        .split_once("at or near \"")
        .map(|(_, rest)| rest.strip_suffix('"').unwrap_or(rest))?;
    let hay = sql.get(start..end.min(sql.len()))?;
    hay.find(needle).map(|i| start + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_columns() {
        let s = "a\nbé c\nd";
        assert_eq!(line_col(s, 0), (1, 1));
        assert_eq!(line_col(s, 2), (2, 1));
        // 'c' is after a two-byte 'é': byte 6, character column 4.
        assert_eq!(line_col(s, 6), (2, 4));
        assert_eq!(line_col(s, 100), (3, 2));
    }

    #[test]
    fn split_respects_quotes_and_comments() {
        let sql = "SELECT ';'; -- a;b\nSELECT $$;$$; /* ; */";
        let toks = tokens(sql).unwrap_or_default();
        let parts = split(sql, &toks);
        assert_eq!(parts.len(), 2, "{parts:?}");
    }
}
