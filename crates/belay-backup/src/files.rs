//! Files of a backup: sizes, sha256, the manifest written atomically.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::BackupError;
use crate::model::{FileEntry, Manifest};

pub(crate) const MANIFEST: &str = "manifest.json";

/// Every regular file under `dir` except the manifest, relative paths with `/`, sorted.
pub(crate) fn list_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, BackupError> {
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.retain(|(rel, _)| rel != MANIFEST && !rel.starts_with(".manifest"));
    out.sort();
    Ok(out)
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<(), BackupError> {
    let entries = std::fs::read_dir(dir).map_err(BackupError::io("could not read", dir))?;
    for entry in entries {
        let entry = entry.map_err(BackupError::io("could not read", dir))?;
        let path = entry.path();
        let ty = entry
            .file_type()
            .map_err(BackupError::io("could not stat", &path))?;
        if ty.is_dir() {
            walk(root, &path, out)?;
        } else if ty.is_file() {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            out.push((rel, path));
        }
    }
    Ok(())
}

/// Total bytes under `path` (a file or a directory); 0 if it does not exist yet.
pub(crate) fn size_of(path: &Path) -> u64 {
    let Ok(meta) = std::fs::metadata(path) else {
        return 0;
    };
    if meta.is_file() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| size_of(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

pub(crate) fn sha256_file(path: &Path) -> Result<(u64, String), BackupError> {
    let mut file = std::fs::File::open(path).map_err(BackupError::io("could not open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(BackupError::io("could not read", path))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    let digest = hasher.finalize();
    let hex = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok((size, hex))
}

/// Sizes and sha256 of every file of the backup in `dir` (blocking; call off the runtime).
pub(crate) fn describe_files(dir: &Path) -> Result<Vec<FileEntry>, BackupError> {
    list_files(dir)?
        .into_iter()
        .map(|(rel, path)| {
            let (size, sha256) = sha256_file(&path)?;
            Ok(FileEntry {
                path: rel,
                size,
                sha256,
            })
        })
        .collect()
}

/// Writes `manifest.json` through a temporary file and a rename, synced, so a reader sees
/// the old manifest or the new one, never half of one.
pub(crate) fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), BackupError> {
    let json = serde_json::to_vec_pretty(manifest)
        .map_err(|e| BackupError::Invalid(format!("cannot serialise manifest: {e}")))?;
    let tmp = dir.join(format!(".manifest.{}.tmp", uuid::Uuid::new_v4().simple()));
    let path = dir.join(MANIFEST);
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        BackupError::Io {
            action: "could not write".into(),
            path: path.clone(),
            source: e,
        }
    })
}

pub(crate) fn read_manifest(dir: &Path) -> Result<Manifest, BackupError> {
    let path = dir.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(BackupError::io("could not read", &path))?;
    serde_json::from_slice(&bytes).map_err(|e| BackupError::ManifestInvalid {
        path,
        reason: e.to_string(),
    })
}
