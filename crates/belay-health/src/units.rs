//! Byte sizes and durations as operators write them in `belay.toml` (`"1GiB"`, `"5min"`),
//! with serde adapters.

use std::time::Duration;

use belay_core::{format_duration, parse_duration};
use serde::{Deserialize, Deserializer, Serializer};

/// Parses `1024`, `512kB`, `16MB`, `1GiB`, `2 TB` (PostgreSQL's units: `kB`/`MB`/`GB`/`TB`
/// are powers of 1024, as in `postgresql.conf`; `KiB`/`MiB`/`GiB`/`TiB` too; `B` or no
/// unit are bytes).
pub fn parse_bytes(input: &str) -> Option<u64> {
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = value * mult;
    // u64::MAX as f64 rounds up to 2^64, which does not fit: stay strictly below it.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// `1.5 GiB`, `12 MiB`, `300 B`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    #[allow(clippy::cast_precision_loss)]
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrText {
    Num(u64),
    Float(f64),
    Text(String),
}

pub(crate) mod bytes {
    use super::*;

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match NumOrText::deserialize(d)? {
            NumOrText::Num(n) => Ok(n),
            NumOrText::Float(_) => Err(serde::de::Error::custom(
                "a byte size is a whole number or a string like \"1GiB\"",
            )),
            NumOrText::Text(t) => parse_bytes(&t).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "invalid size {t:?}: expected bytes or a unit (kB, MB, GB, TB, KiB, MiB, GiB)"
                ))
            }),
        }
    }
}

pub(crate) mod opt_bytes {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_some(v),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        super::bytes::deserialize(d).map(Some)
    }
}

pub(crate) mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match NumOrText::deserialize(d)? {
            NumOrText::Num(n) => Ok(Duration::from_secs(n)),
            NumOrText::Float(f) if f.is_finite() && f >= 0.0 => Ok(Duration::from_secs_f64(f)),
            NumOrText::Float(f) => Err(serde::de::Error::custom(format!("invalid duration {f}"))),
            NumOrText::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_postgres_spells_them() {
        assert_eq!(parse_bytes("1024"), Some(1024));
        assert_eq!(parse_bytes("16MB"), Some(16 << 20));
        assert_eq!(parse_bytes("1GiB"), Some(1 << 30));
        assert_eq!(parse_bytes("1.5 kB"), Some(1536));
        assert_eq!(parse_bytes("2TB"), Some(2 << 40));
        for bad in ["", "GB", "-1MB", "3 parsecs", "1e30TB"] {
            assert_eq!(parse_bytes(bad), None, "{bad}");
        }
        assert_eq!(format_bytes(300), "300 B");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
    }
}
