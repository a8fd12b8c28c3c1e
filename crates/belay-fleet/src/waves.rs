//! Waves of a fleet deployment: a canary first, then growing batches.

/// Size of the waves after the canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    /// A share of all targets, rounded up.
    Percent(u32),
    Count(usize),
}

impl Batch {
    pub fn parse(s: &str) -> Result<Batch, String> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Batch::Percent(100));
        }
        let bad = || format!("batch {s:?}: expected a percentage like 25% or a count like 10");
        if let Some(p) = s.strip_suffix('%') {
            let p: u32 = p.trim().parse().map_err(|_| bad())?;
            if p == 0 || p > 100 {
                return Err(bad());
            }
            Ok(Batch::Percent(p))
        } else {
            let n: usize = s.parse().map_err(|_| bad())?;
            if n == 0 {
                return Err(bad());
            }
            Ok(Batch::Count(n))
        }
    }

    fn size(self, total: usize) -> usize {
        match self {
            Batch::Percent(p) => (total * p as usize).div_ceil(100).max(1),
            Batch::Count(n) => n,
        }
    }
}

/// Splits `total` targets (in deployment order) into waves: `canary` first, then
/// batches of `batch` of the total.
pub fn plan(total: usize, canary: usize, batch: Batch) -> Vec<std::ops::Range<usize>> {
    let mut waves = Vec::new();
    let mut start = 0;
    if canary > 0 && total > 0 {
        let end = canary.min(total);
        waves.push(0..end);
        start = end;
    }
    let size = batch.size(total);
    while start < total {
        let end = (start + size).min(total);
        waves.push(start..end);
        start = end;
    }
    waves
}

/// `*` matches any run of characters, `?` one; anything else matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_start_with_the_canary_then_batches() {
        let cases = [
            (8, 1, "50%", vec![0..1, 1..5, 5..8]),
            (8, 0, "25%", vec![0..2, 2..4, 4..6, 6..8]),
            (3, 1, "", vec![0..1, 1..3]),
            (
                200,
                1,
                "10",
                (0..21)
                    .map(|i| {
                        if i == 0 {
                            0..1
                        } else {
                            (1 + (i - 1) * 10)..(1 + i * 10).min(200)
                        }
                    })
                    .collect(),
            ),
            (2, 5, "50%", std::iter::once(0..2).collect()),
            (0, 1, "50%", vec![]),
        ];
        for (total, canary, batch, want) in cases {
            assert_eq!(
                plan(total, canary, Batch::parse(batch).unwrap()),
                want,
                "{total} {canary} {batch}"
            );
        }
        for bad in ["0", "0%", "101%", "x", "-1"] {
            assert!(Batch::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn globs_match_tenant_names() {
        assert!(glob_match("tenant_*", "tenant_a"));
        assert!(glob_match("tenant_*", "tenant_"));
        assert!(!glob_match("tenant_*", "tenants"));
        assert!(glob_match("t?_db", "t1_db"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(glob_match("*a*b", "xxaxxb"));
    }
}
