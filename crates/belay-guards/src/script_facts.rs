//! [`FileScriptFacts`]: `belay_rollback::ScriptFacts` from the migration files — which
//! tables each migration writes and which data its undo drops — for the CLI (its
//! migrations directory) and the agent (each target's), so `belay-rollback` reads no file.

use std::path::PathBuf;

use belay_migrate::{ApiError, MigrationSet};
use belay_rollback::{ScriptFact, ScriptFacts};

/// Where the scripts are read from.
#[derive(Debug, Clone)]
enum Source {
    /// Loaded once by the caller (`None`: the directory could not be read).
    Set(Option<MigrationSet>),
    /// Read at each question, so an agent that runs for weeks sees the files as they are.
    Dir(PathBuf),
}

/// Which tables each migration writes and which data its undo drops, from the files.
#[derive(Debug, Clone)]
pub struct FileScriptFacts {
    source: Source,
}

impl FileScriptFacts {
    /// Over a set already loaded (`None`: every migration's tables unknown).
    pub fn new(set: Option<MigrationSet>) -> Self {
        FileScriptFacts {
            source: Source::Set(set),
        }
    }

    /// Over a migrations directory, read when asked.
    pub fn dir(dir: impl Into<PathBuf>) -> Self {
        FileScriptFacts {
            source: Source::Dir(dir.into()),
        }
    }
}

/// Statements whose tables the lexer names exactly (`ALTER TABLE`, `DROP TABLE`,
/// `TRUNCATE`), or that write no existing table's rows.
fn attributable(words: &[String]) -> bool {
    let w: Vec<String> = words
        .iter()
        .take(3)
        .map(|w| w.to_ascii_uppercase())
        .collect();
    let w: Vec<&str> = w.iter().map(String::as_str).collect();
    matches!(
        w.as_slice(),
        ["ALTER", "TABLE", ..]
            | ["DROP", "TABLE", ..]
            | ["TRUNCATE", ..]
            | ["CREATE", "TABLE", ..]
            | ["CREATE", "INDEX", ..]
            | ["CREATE", "UNIQUE", ..]
            | ["CREATE", "SEQUENCE", ..]
            | ["CREATE", "SCHEMA", ..]
            | ["CREATE", "TYPE", ..]
            | ["COMMENT", ..]
            | ["SET", ..]
            | ["DROP", "INDEX", ..]
    )
}

fn fact_of(set: &MigrationSet, script: &str) -> Option<ScriptFact> {
    let m = set.migrations.iter().find(|m| m.script_name == script)?;
    let mut named: Vec<String> = m.up.directives.tables.clone();
    let mut known = true;
    for st in &m.up.statements {
        if !attributable(&st.words) {
            known = false;
        }
        let t = st.table_targets(&m.up.text);
        named.extend(t.data_lost);
        named.extend(t.altered);
    }
    named.dedup();
    // `-- belay:tables=` is the author's word for what the script writes.
    let writes = (known || !m.up.directives.tables.is_empty()).then_some(named);
    let mut undo_drops = Vec::new();
    if let Some(down) = &m.down {
        for st in &down.statements {
            for t in st.table_targets(&down.text).data_lost {
                if !undo_drops.contains(&t) {
                    undo_drops.push(t);
                }
            }
        }
    }
    Some(ScriptFact { writes, undo_drops })
}

#[async_trait::async_trait]
impl ScriptFacts for FileScriptFacts {
    async fn fact(&self, _target: &str, script: &str) -> Result<Option<ScriptFact>, ApiError> {
        match &self.source {
            Source::Set(set) => Ok(set.as_ref().and_then(|s| fact_of(s, script))),
            // A directory that cannot be read now answers "unknown", as a missing file
            // does: the planner then assumes the worst about the tables written.
            Source::Dir(dir) => Ok(belay_migrate::load(dir)
                .ok()
                .and_then(|s| fact_of(&s, script))),
        }
    }
}
