use sha2::{Digest, Sha256};
use std::fmt;

/// SHA-256 of a script's exact bytes, shown as lowercase hex.
///
/// Exact bytes on purpose: a changed line ending or a trailing space is a changed
/// migration as far as the history is concerned, and belay must say so rather than guess.
#[derive(Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Checksum(String);

impl Checksum {
    pub fn of(bytes: &[u8]) -> Self {
        let digest = Sha256::digest(bytes);
        let mut hex = String::with_capacity(64);
        for b in digest {
            hex.push_str(&format!("{b:02x}"));
        }
        Checksum(hex)
    }

    /// A checksum as stored in a history table (no validation: imported histories carry
    /// other tools' checksums, which must still compare unequal rather than fail to load).
    pub fn from_stored(s: impl Into<String>) -> Self {
        Checksum(s.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex digits, enough to tell two scripts apart in a table.
    pub fn short(&self) -> &str {
        self.0.get(..12).unwrap_or(&self.0)
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Checksum({})", self.short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_covers_exact_bytes() {
        let a = Checksum::of(b"select 1;\n");
        let b = Checksum::of(b"select 1;\r\n");
        assert_ne!(a, b);
        assert_eq!(a, Checksum::of(b"select 1;\n"));
        assert_eq!(
            Checksum::of(b"").as_str(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(a.short().len(), 12);
    }
}
