//! Commands run around a deployment (`[deploy.before]`/`[deploy.after]`) and a rollback
//! (`[rollback.before]`/`[rollback.after]`): `sh -c` with a timeout, killed when it runs
//! over; stdout and stderr kept (bounded) for the record.

use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

/// A command run around a deployment (maintenance mode on/off, traffic switch, notify).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployHook {
    /// Run by `sh -c`.
    pub command: String,
    #[serde(with = "crate::policy::duration_text")]
    pub timeout: Duration,
}

/// How a hook ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HookRun {
    pub command: String,
    pub ok: bool,
    /// `exit status 3`, `timed out after 5s`, `could not start: …`.
    pub status: String,
    /// The last part of what it printed (stdout then stderr), at most 2 kB.
    pub output: String,
    pub ms: u64,
}

const KEEP: usize = 2048;

/// Runs `command` by `sh -c` with `env` added, killed after `timeout`.
pub async fn run(command: &str, timeout: Duration, env: &[(&str, String)]) -> HookRun {
    let started = std::time::Instant::now();
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group, so a timeout ends what the shell started too: a
        // `sleep` left behind would hold the hook's pipes (and inherited ones) open.
        .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let done = |ok: bool, status: String, output: String| HookRun {
        command: command.to_string(),
        ok,
        status,
        output,
        ms: started.elapsed().as_millis() as u64,
    };
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return done(false, format!("could not start sh: {e}"), String::new()),
    };
    let pid = child.id();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let read = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        // Both at once: a hook that fills one pipe while we wait on the other would hang.
        let o = async {
            if let Some(s) = stdout.as_mut() {
                let _ = s.read_to_end(&mut out).await;
            }
        };
        let e = async {
            if let Some(s) = stderr.as_mut() {
                let _ = s.read_to_end(&mut err).await;
            }
        };
        tokio::join!(o, e);
        out.extend(err);
        out
    };
    let waited = tokio::time::timeout(timeout, async {
        let output = read.await;
        (child.wait().await, output)
    })
    .await;
    match waited {
        Ok((Ok(status), output)) => {
            let text = String::from_utf8_lossy(&output);
            let tail: String = text
                .chars()
                .rev()
                .take(KEEP)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            done(
                status.success(),
                status.to_string(),
                tail.trim().to_string(),
            )
        }
        Ok((Err(e), _)) => done(false, format!("could not wait for it: {e}"), String::new()),
        Err(_) => {
            // kill_on_drop ends the shell; the group ends what it started. Said in the
            // status rather than left running unseen.
            if let Some(pid) = pid
                .and_then(|p| i32::try_from(p).ok())
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            done(
                false,
                format!(
                    "timed out after {} (killed)",
                    belay_core::format_duration(timeout)
                ),
                String::new(),
            )
        }
    }
}
