//! Running a client tool while following its stderr and checking on it periodically.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::BackupError;

pub(crate) struct ToolRun {
    pub status: ExitStatus,
    pub stderr: String,
}

/// Most of stderr we keep for messages (verbose output can be long).
const STDERR_KEEP: usize = 256 * 1024;

/// Runs `cmd` to completion: `on_line` sees every stderr line, `on_tick` runs every
/// `tick`; an error from `on_tick` kills the child and is returned.
pub(crate) async fn run_watched(
    mut cmd: tokio::process::Command,
    tool: &str,
    tick: Duration,
    on_line: &mut (dyn FnMut(&str) + Send),
    on_tick: &mut (dyn FnMut() -> Result<(), BackupError> + Send),
) -> Result<ToolRun, BackupError> {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let program = std::path::PathBuf::from(cmd.as_std().get_program());
    let mut child = cmd
        .spawn()
        .map_err(BackupError::io("could not start", &program))?;
    let Some(stderr) = child.stderr.take() else {
        return Err(BackupError::Invalid(format!(
            "{tool}: stderr was not captured"
        )));
    };
    let mut lines = BufReader::new(stderr).lines();
    let mut kept = String::new();
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut eof = false;
    let status = loop {
        tokio::select! {
            line = lines.next_line(), if !eof => match line {
                Ok(Some(line)) => {
                    on_line(&line);
                    if kept.len() < STDERR_KEEP {
                        kept.push_str(&line);
                        kept.push('\n');
                    }
                }
                _ => eof = true,
            },
            _ = interval.tick() => {
                if let Err(err) = on_tick() {
                    let _ = child.kill().await;
                    return Err(err);
                }
            }
            status = child.wait(), if eof => {
                break status.map_err(BackupError::io("could not wait for", &program))?;
            }
        }
    };
    Ok(ToolRun {
        status,
        stderr: kept,
    })
}

/// `pg_dump: dumping contents of table "public.t"` → `public.t` (pg_restore says
/// `processing data for table "public.t"`).
pub(crate) fn table_of_line(line: &str) -> Option<&str> {
    let rest = line
        .split_once("dumping contents of table \"")
        .or_else(|| line.split_once("processing data for table \""))?
        .1;
    rest.strip_suffix('"')
}

pub(crate) fn is_disk_full(stderr: &str) -> bool {
    stderr.contains("No space left on device")
}
