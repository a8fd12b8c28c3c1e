//! Free space on the filesystem holding a directory (`statvfs(3)`).

use std::path::{Path, PathBuf};

/// Space on the filesystem that holds a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpace {
    /// Bytes available to an unprivileged user (`f_bavail`; what a backup can use).
    pub available: u64,
    /// Size of the filesystem.
    pub total: u64,
}

/// Space on the filesystem that holds `dir`. A directory that does not exist yet (a
/// backup directory created on first use) is measured at its nearest existing ancestor.
pub fn disk_space(dir: &Path) -> std::io::Result<DiskSpace> {
    let existing = nearest_existing(dir).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no existing ancestor of {}", dir.display()),
        )
    })?;
    sys::statvfs(&existing)
}

fn nearest_existing(dir: &Path) -> Option<PathBuf> {
    let abs = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir().ok()?.join(dir)
    };
    abs.ancestors().find(|p| p.exists()).map(Path::to_path_buf)
}

// The one FFI call of this crate: std has no portable free-space query.
#[allow(unsafe_code)]
mod sys {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    use super::DiskSpace;

    pub fn statvfs(path: &Path) -> std::io::Result<DiskSpace> {
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        // SAFETY: `statvfs` is plain old data, so an all-zero value is valid; `c_path` is a
        // NUL-terminated string that outlives the call, and `out` is a valid, exclusively
        // borrowed buffer the call fills in.
        let mut out: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(c_path.as_ptr(), &raw mut out) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        #[allow(clippy::useless_conversion)] // field widths differ across platforms
        let frsize = u64::from(out.f_frsize);
        #[allow(clippy::useless_conversion)]
        let (bavail, blocks) = (u64::from(out.f_bavail), u64::from(out.f_blocks));
        Ok(DiskSpace {
            available: bavail.saturating_mul(frsize),
            total: blocks.saturating_mul(frsize),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_missing_directories_at_their_ancestor() {
        let tmp = std::env::temp_dir();
        let here = disk_space(&tmp).unwrap();
        assert!(here.total > 0 && here.available <= here.total);
        let missing = disk_space(&tmp.join("belay-health-missing/a/b")).unwrap();
        assert_eq!(missing.total, here.total);
    }
}
