use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid version {input:?}: expected numbers separated by '.' or '_' (1, 1.2, 2_1, 20240101120000, 2024-01-01-120000)"
)]
pub struct VersionError {
    pub input: String,
}

/// A migration version: dot- or underscore-separated numbers compared numerically, so
/// `1.1 < 2 < 10` and `1.2 < 1.10`, and timestamps are plain (arbitrarily long) numbers.
///
/// Diesel's dashed timestamps (`2026-07-30-140000-0000`) are read as diesel reads them,
/// dashes removed, which orders them with plain timestamps as diesel does. Trailing zero
/// parts do not count (`1.0 == 1`), as in Flyway, so they are duplicates of each other.
#[derive(Clone)]
pub struct Version {
    text: String,
    /// Each part without leading zeros; trailing all-zero parts removed.
    parts: Vec<String>,
}

impl Version {
    pub fn parse(input: &str) -> Result<Self, VersionError> {
        let err = || VersionError {
            input: input.to_string(),
        };
        if input.is_empty() {
            return Err(err());
        }
        let dashed = input.contains('-');
        let body: String = if dashed {
            if !input.chars().all(|c| c.is_ascii_digit() || c == '-')
                || input.starts_with('-')
                || input.ends_with('-')
            {
                return Err(err());
            }
            input.chars().filter(char::is_ascii_digit).collect()
        } else {
            input.to_string()
        };
        let mut parts = Vec::new();
        for part in body.split(['.', '_']) {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err());
            }
            let trimmed = part.trim_start_matches('0');
            parts.push(trimmed.to_string());
        }
        while parts.last().is_some_and(String::is_empty) && parts.len() > 1 {
            parts.pop();
        }
        Ok(Version {
            text: input.to_string(),
            parts,
        })
    }

    /// The version as written in the file name (what history rows record).
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

fn cmp_number(a: &str, b: &str) -> Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        let n = self.parts.len().max(other.parts.len());
        for i in 0..n {
            let a = self.parts.get(i).map_or("", String::as_str);
            let b = other.parts.get(i).map_or("", String::as_str);
            match cmp_number(a, b) {
                Ordering::Equal => continue,
                o => return o,
            }
        }
        Ordering::Equal
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Version {}

impl Hash for Version {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Consistent with Eq: trailing empty (zero) parts are already removed.
        let mut parts: &[String] = &self.parts;
        while let [rest @ .., last] = parts {
            if last.is_empty() {
                parts = rest;
            } else {
                break;
            }
        }
        parts.hash(state);
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Version({})", self.text)
    }
}

impl serde::Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl std::str::FromStr for Version {
    type Err = VersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Version::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn orders_numerically_by_parts() {
        let mut input: Vec<Version> = [
            "10",
            "2",
            "1.10",
            "1.2",
            "1.1",
            "1",
            "20140924113530",
            "2026-07-30-140000-0000",
            "3_1",
            "0.9",
        ]
        .iter()
        .map(|s| v(s))
        .collect();
        input.sort();
        let got: Vec<&str> = input.iter().map(Version::as_str).collect();
        assert_eq!(
            got,
            [
                "0.9",
                "1",
                "1.1",
                "1.2",
                "1.10",
                "2",
                "3_1",
                "10",
                "20140924113530",
                "2026-07-30-140000-0000"
            ]
        );
    }

    #[test]
    fn equality_ignores_trailing_zeros_and_leading_zeros() {
        assert_eq!(v("1.0"), v("1"));
        assert_eq!(v("001"), v("1"));
        assert_eq!(v("1_2"), v("1.2"));
        assert_eq!(v("1.01"), v("1.1"));
        assert!(v("00000000000000") < v("1"));
        let set: std::collections::HashSet<Version> = [v("1.0"), v("1"), v("1.0.0")].into();
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn diesel_dashed_timestamps_sort_with_plain_ones() {
        assert!(v("2014-09-24-113530") == v("20140924113530"));
        assert!(v("2026-07-30-140000-0000") > v("20260730135959"));
    }

    #[test]
    fn rejects_non_numeric() {
        for bad in [
            "", "a", "1.a", "1..2", ".1", "1.", "v1", "1-", "-1", "1.2-3", "1 2",
        ] {
            assert!(Version::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    mod generated {
        use super::*;
        use proptest::prelude::*;

        fn version() -> impl Strategy<Value = (Vec<u64>, String)> {
            proptest::collection::vec(0u64..100_000, 1..5).prop_flat_map(|parts| {
                let text = prop_oneof![Just('.'), Just('_')].prop_map({
                    let parts = parts.clone();
                    move |sep| {
                        parts
                            .iter()
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(&sep.to_string())
                    }
                });
                (Just(parts), text)
            })
        }

        /// Numbers with trailing zero parts removed: the order versions must follow.
        fn key(parts: &[u64]) -> Vec<u64> {
            let mut k = parts.to_vec();
            while k.len() > 1 && k.last() == Some(&0) {
                k.pop();
            }
            k
        }

        proptest! {
            #[test]
            fn orders_as_the_numbers_do((a, ta) in version(), (b, tb) in version()) {
                let (va, vb) = (Version::parse(&ta).unwrap(), Version::parse(&tb).unwrap());
                prop_assert_eq!(va.cmp(&vb), key(&a).cmp(&key(&b)), "{} vs {}", ta, tb);
                prop_assert_eq!(va == vb, key(&a) == key(&b));
            }

            #[test]
            fn any_text_parses_or_is_refused_naming_it(text in "\\PC{0,24}") {
                if let Err(e) = Version::parse(&text) {
                    prop_assert_eq!(&e.input, &text);
                    let quoted = format!("{:?}", text);
                    prop_assert!(e.to_string().contains(&quoted), "{}", e);
                }
            }
        }
    }
}
