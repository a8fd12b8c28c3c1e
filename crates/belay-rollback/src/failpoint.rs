//! Failpoints, for tests only: `BELAY_FAILPOINTS=rollback.after_emergency_backup=pause`
//! (comma-separated `name=pause`) makes the process stop dead at that rollback step
//! boundary — it writes `belay failpoint NAME: paused` to stderr and never returns — so a
//! test can wait for the line and SIGKILL the process at exactly that point. Read once;
//! unset (the only production setting) it costs one lookup per step boundary.
//!
//! Names: `rollback.before_<step>` (the step's start is on record, none of its work done)
//! and `rollback.after_<step>` (its work done, its end not yet on record), for the steps
//! `before_hook`, `emergency_backup`, `undo`, `table_restore`, `full_restore`,
//! `record_history`, `verify_history`, `verify_postflight`, `verify_probes`, `after_hook`,
//! `incident_report`.

use std::collections::HashSet;
use std::sync::OnceLock;

/// The environment variable naming the failpoints.
pub const ENV: &str = "BELAY_FAILPOINTS";

fn armed() -> &'static HashSet<String> {
    static ARMED: OnceLock<HashSet<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let text = std::env::var(ENV).unwrap_or_default();
        let mut armed = HashSet::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            match entry.strip_suffix("=pause") {
                Some(name) => {
                    armed.insert(name.to_string());
                }
                // Said, not silently ignored: a test that armed nothing would hang elsewhere.
                None => eprintln!("belay: {ENV}: {entry:?} is not NAME=pause; ignored"),
            }
        }
        armed
    })
}

/// Stops here forever when `name` is armed.
pub async fn hit(name: &str) {
    if !armed().contains(name) {
        return;
    }
    tracing::warn!(failpoint = name, "failpoint reached: pausing (test-only)");
    eprintln!("belay failpoint {name}: paused");
    std::future::pending::<()>().await;
}
