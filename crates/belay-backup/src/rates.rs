//! Rates measured on a target: the archive bytes and wall time of each successful backup
//! and restore, kept in `<root>/<target>/rates.json` beside the backups, so the rollback
//! planner estimates from what this target did rather than from an assumed rate.
//!
//! A restore counts only when it read the whole archive (a full restore, one into a new
//! database, or a table restore of every table holding data but belay's history): the
//! archive does not say how many of its bytes one table's part takes. Samples smaller than
//! [`MIN_SAMPLE_BYTES`] are kept out of the median, as their time is the tools' start-up
//! rather than their rate. The file holds the newest [`KEEP`] samples of each kind and is
//! replaced atomically; two writers at once may lose one sample, never the file.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::BackupError;

pub(crate) const RATES_FILE: &str = "rates.json";
/// Samples kept per kind.
pub const KEEP: usize = 20;
/// Smaller backups and restores are recorded but not used for the rate.
pub const MIN_SAMPLE_BYTES: u64 = 1 << 20;

/// One measured backup or restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateSample {
    pub at: DateTime<Utc>,
    pub backup_id: String,
    /// Archive bytes written (a backup) or read (a restore).
    pub bytes: u64,
    /// Wall time: the dump and hashing of a backup; the verification and restore proper of
    /// a restore (not its emergency backup, which is a backup of its own).
    pub ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RateKind {
    Create,
    Restore,
}

/// The median of a target's samples of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeasuredRate {
    pub bytes_per_sec: f64,
    /// Samples the median is of.
    pub samples: usize,
}

/// What was measured on a target; `None` where nothing usable was.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MeasuredRates {
    /// Backups (`pg_dump` and hashing): what an emergency backup will take.
    pub create: Option<MeasuredRate>,
    /// Restores (verification, then `pg_restore`): what a restore of a backup will take.
    pub restore: Option<MeasuredRate>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RatesFile {
    #[serde(default)]
    creates: Vec<RateSample>,
    #[serde(default)]
    restores: Vec<RateSample>,
}

fn path(catalog_dir: &Path) -> PathBuf {
    catalog_dir.join(RATES_FILE)
}

fn read(catalog_dir: &Path) -> Result<RatesFile, BackupError> {
    let path = path(catalog_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            BackupError::Invalid(format!(
                "{} is not a rates file ({e}); delete it and the next backups and restores measure anew",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RatesFile::default()),
        Err(e) => Err(BackupError::Io {
            action: "could not read".into(),
            path,
            source: e,
        }),
    }
}

/// The target's measured rates.
pub(crate) fn measured(catalog_dir: &Path) -> Result<MeasuredRates, BackupError> {
    let file = read(catalog_dir)?;
    Ok(MeasuredRates {
        create: median_rate(&file.creates),
        restore: median_rate(&file.restores),
    })
}

/// Adds `sample`, dropping the oldest beyond [`KEEP`].
pub(crate) fn record(
    catalog_dir: &Path,
    kind: RateKind,
    sample: RateSample,
) -> Result<(), BackupError> {
    // A file that cannot be read is replaced: it only ever held measurements.
    let mut file = read(catalog_dir).unwrap_or_default();
    let list = match kind {
        RateKind::Create => &mut file.creates,
        RateKind::Restore => &mut file.restores,
    };
    list.push(sample);
    let excess = list.len().saturating_sub(KEEP);
    list.drain(..excess);
    let json = serde_json::to_vec_pretty(&file)
        .map_err(|e| BackupError::Invalid(format!("cannot serialise the rates: {e}")))?;
    let target = path(catalog_dir);
    std::fs::create_dir_all(catalog_dir)
        .map_err(BackupError::io("could not create", catalog_dir))?;
    let tmp = catalog_dir.join(format!(".rates.{}.tmp", uuid::Uuid::new_v4().simple()));
    let write = || -> std::io::Result<()> {
        std::fs::write(&tmp, &json)?;
        std::fs::rename(&tmp, &target)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        BackupError::Io {
            action: "could not write".into(),
            path: target.clone(),
            source: e,
        }
    })
}

/// The median bytes per second of the samples large enough to tell a rate.
pub fn median_rate(samples: &[RateSample]) -> Option<MeasuredRate> {
    let mut rates: Vec<f64> = samples
        .iter()
        .filter(|s| s.bytes >= MIN_SAMPLE_BYTES && s.ms > 0)
        .map(|s| s.bytes as f64 * 1000.0 / s.ms as f64)
        .collect();
    if rates.is_empty() {
        return None;
    }
    rates.sort_by(f64::total_cmp);
    let mid = rates.len() / 2;
    let bytes_per_sec = if rates.len().is_multiple_of(2) {
        f64::midpoint(rates[mid - 1], rates[mid])
    } else {
        rates[mid]
    };
    Some(MeasuredRate {
        bytes_per_sec,
        samples: rates.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(bytes: u64, ms: u64) -> RateSample {
        RateSample {
            at: Utc::now(),
            backup_id: "b".into(),
            bytes,
            ms,
        }
    }

    #[test]
    fn the_median_leaves_out_samples_too_small_to_tell_a_rate() {
        const MB: u64 = 1_000_000;
        assert_eq!(median_rate(&[]), None);
        assert_eq!(median_rate(&[sample(1000, 300), sample(5 * MB, 0)]), None);
        // 10, 20 and 40 MB/s, and a tiny one that would drag the median down.
        let r = median_rate(&[
            sample(10 * MB, 1000),
            sample(40 * MB, 1000),
            sample(20 * MB, 1000),
            sample(1000, 500),
        ])
        .unwrap();
        assert_eq!(r.samples, 3);
        assert!((r.bytes_per_sec - 20e6).abs() < 1.0, "{r:?}");
        let even = median_rate(&[sample(10 * MB, 1000), sample(20 * MB, 1000)]).unwrap();
        assert!((even.bytes_per_sec - 15e6).abs() < 1.0, "{even:?}");
    }

    #[test]
    fn the_file_keeps_the_newest_samples_of_each_kind() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = dir.path().join("shop");
        assert_eq!(measured(&catalog).unwrap(), MeasuredRates::default());
        for i in 0..(KEEP as u64 + 5) {
            record(
                &catalog,
                RateKind::Restore,
                sample((i + 1) * 2_000_000, 1000),
            )
            .unwrap();
        }
        record(&catalog, RateKind::Create, sample(8_000_000, 1000)).unwrap();
        let file = read(&catalog).unwrap();
        assert_eq!(file.restores.len(), KEEP);
        assert_eq!(
            file.restores[0].bytes,
            6 * 2_000_000,
            "the oldest five dropped"
        );
        let m = measured(&catalog).unwrap();
        assert_eq!(m.restore.unwrap().samples, KEEP);
        assert_eq!(m.create.unwrap().samples, 1);
        assert!((m.create.unwrap().bytes_per_sec - 8e6).abs() < 1.0);

        std::fs::write(catalog.join(RATES_FILE), "not json").unwrap();
        let err = measured(&catalog).unwrap_err().to_string();
        assert!(
            err.contains("rates.json") && err.contains("delete it"),
            "{err}"
        );
        // Recording over a broken file starts it anew.
        record(&catalog, RateKind::Create, sample(4_000_000, 1000)).unwrap();
        assert_eq!(measured(&catalog).unwrap().create.unwrap().samples, 1);
    }
}
