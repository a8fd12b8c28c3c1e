//! The other tools' checksums, computed exactly as each tool computes them, so a recorded
//! checksum can be compared with the file belay loaded. Only tools whose computation is
//! reproduced exactly are here; for the others there is nothing to compare. Both were
//! checked, when written, against histories the real tools wrote for public projects'
//! migrations (a Flyway row for a UTF-8 script with non-ASCII text, LF and CRLF; a sqlx
//! row), beyond the tests below.

use sha2::{Digest, Sha384};

/// Flyway's checksum of a SQL script (`ChecksumCalculator`): the script is read line by
/// line (`BufferedReader.readLine`, which drops each `\n`, `\r\n` or lone `\r`), a leading
/// byte-order mark is removed from the first line, and CRC-32 (IEEE, `java.util.zip.CRC32`)
/// runs over the UTF-8 bytes of the lines one after another, with no separators. So it
/// equals the CRC-32 of the text with its BOM and every `\r` and `\n` removed; Flyway
/// stores it as a signed 32-bit integer. `None` when the script is not UTF-8 (belay
/// refuses such files anyway).
pub fn flyway(bytes: &[u8]) -> Option<i32> {
    let text = std::str::from_utf8(bytes).ok()?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
    let mut digest = crc.digest();
    for piece in text.split(['\r', '\n']) {
        digest.update(piece.as_bytes());
    }
    // Java's `(int) crc32.getValue()`: the same 32 bits read as signed.
    Some(digest.finalize() as i32)
}

/// sqlx's checksum of a migration (`Migration::new`): SHA-384 of the file's text exactly
/// as read (`fs::read_to_string`: no normalisation of line endings, BOM kept), 48 bytes.
/// A project that configured sqlx to ignore characters when hashing (`ignored-chars`)
/// records something else; such a difference is reported, never guessed away.
pub fn sqlx(bytes: &[u8]) -> Vec<u8> {
    Sha384::digest(bytes).to_vec()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flyway_crc_is_java_crc32_over_lines() {
        // The CRC-32 check value of "123456789" (0xCBF43926), read as a signed int.
        assert_eq!(flyway(b"123456789"), Some(0xCBF4_3926_u32 as i32));
        // Line endings and a BOM do not count; everything else does.
        let lf = flyway(b"CREATE TABLE t (id int);\nINSERT INTO t VALUES (1);\n");
        assert_eq!(
            lf,
            flyway(b"\xef\xbb\xbfCREATE TABLE t (id int);\r\nINSERT INTO t VALUES (1);")
        );
        assert_eq!(
            lf,
            flyway(b"CREATE TABLE t (id int);INSERT INTO t VALUES (1);")
        );
        assert_ne!(
            lf,
            flyway(b"CREATE TABLE t (id int); \nINSERT INTO t VALUES (1);\n")
        );
        // An empty script has the CRC of nothing.
        assert_eq!(flyway(b""), Some(0));
        assert_eq!(flyway(b"\n\n"), Some(0));
        assert_eq!(flyway(&[0xff]), None);
    }

    #[test]
    fn sqlx_checksum_is_sha384_of_the_exact_bytes() {
        // FIPS 180-2's SHA-384 test vector for "abc".
        assert_eq!(
            hex(&sqlx(b"abc")),
            "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed\
             8086072ba1e7cc2358baeca134c825a7"
        );
        assert_ne!(sqlx(b"select 1;\n"), sqlx(b"select 1;\r\n"));
    }
}
