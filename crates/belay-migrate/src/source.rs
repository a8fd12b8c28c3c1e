//! Migration sources: finds the migrations in a directory in any of the five layouts,
//! reads their directives and checksums, and refuses anything ambiguous before a single
//! statement runs.
//!
//! What each layout's own tool ignores is skipped with a warning, never run and never an
//! error: files that are not SQL (README) in every layout, and in the folder
//! layout every loose file beside the migration folders and every unknown file inside
//! one (diesel reads only `<version>_<name>/` folders and their `up.sql`/`down.sql`).
//! A loose `.sql` file whose name is no migration name is an error in the other layouts:
//! there migrations are loose files, so it is far more likely a migration with a
//! mistyped name that would otherwise never run. A name that looks like a migration but
//! is malformed (`V1_x.sql`, `1_x.up.sq`, a folder holding `up.sql` without a version)
//! is an error in every layout. Hidden files that are not SQL (`.gitkeep`, `.DS_Store`)
//! are skipped without a word: no tool reads them, and a warning about them on every
//! command would teach users to skip belay's warnings. A hidden loose `.sql` file (an
//! editor's `.#V2__x.sql`, a draft put aside) is still named, as it may be a migration
//! mislaid.

use crate::directives::{self, DirectiveError, Directives, NoTransactionSource};
use crate::sections::{self, SectionError, Tool};
use crate::sql::{self, Statement};
use belay_core::{Checksum, Version};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// `V<version>__<desc>.sql`, `U<version>__<desc>.sql`, `R__<desc>.sql`
    Flyway,
    /// `<version>_<desc>.up.sql` + `<version>_<desc>.down.sql` (golang-migrate, sqlx, dbmate habit)
    Paired,
    /// `<version>_<desc>/up.sql`, `down.sql`, `verify.sql` (diesel, sqitch habit)
    Folder,
    /// `<version>_<desc>.sql` holding `-- +goose Up` and `-- +goose Down` sections
    Goose,
    /// `<version>_<desc>.sql` holding `-- migrate:up` and `-- migrate:down` sections
    Dbmate,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Flyway => "Flyway (V1__desc.sql)",
            Layout::Paired => "paired files (1_desc.up.sql/1_desc.down.sql)",
            Layout::Folder => "folder per migration (1_desc/up.sql)",
            Layout::Goose => "goose (1_desc.sql with -- +goose Up/Down)",
            Layout::Dbmate => "dbmate (1_desc.sql with -- migrate:up/down)",
        })
    }
}

/// One SQL file, read once: its exact bytes' checksum, directives and statements.
#[derive(Debug, Clone)]
pub struct Script {
    pub path: PathBuf,
    /// What belay runs and lints: the file's text with everything that is not SQL for the
    /// server blanked to spaces (same byte length and lines; see `sql::split_script`), so
    /// offsets and line numbers mean the same in the file and here.
    pub text: String,
    /// Of the file's exact bytes.
    pub checksum: Checksum,
    pub directives: Directives,
    pub statements: Vec<Statement>,
}

impl Script {
    /// Whether it runs outside belay's per-migration transaction, and why.
    pub fn no_transaction(&self) -> Option<NoTransactionSource> {
        self.directives.no_transaction
    }

    /// A script with no statement (empty or comments only) is a valid no-op.
    pub fn is_empty(&self) -> bool {
        self.statements.is_empty()
    }

    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone)]
pub struct Migration {
    pub version: Version,
    pub description: String,
    pub up: Script,
    /// In the goose and dbmate layouts, the file's down section (a `Script` of the same
    /// path whose text is that section alone, the file's other lines blanked).
    pub down: Option<Script>,
    pub verify: Option<Script>,
    /// Covers the forward script and its undo: an edited undo is drift too, since it is
    /// what a rollback would run. For a goose or dbmate file, of its exact bytes.
    pub checksum: Checksum,
    /// The name recorded as `script` in history, relative to the migrations directory.
    pub script_name: String,
}

#[derive(Debug, Clone)]
pub struct Repeatable {
    pub description: String,
    pub script: Script,
    pub script_name: String,
}

#[derive(Debug, Clone)]
pub struct MigrationSet {
    pub dir: PathBuf,
    pub layout: Option<Layout>,
    /// Sorted by version.
    pub migrations: Vec<Migration>,
    pub repeatables: Vec<Repeatable>,
    pub warnings: Vec<String>,
}

impl MigrationSet {
    pub fn find(&self, version: &Version) -> Option<&Migration> {
        self.migrations.iter().find(|m| &m.version == version)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "migrations directory {} does not exist: pass --dir, set `dir` in belay.toml, or create it",
        .0.display()
    )]
    NoDirectory(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not valid UTF-8; save the script as UTF-8", .0.display())]
    NotUtf8(PathBuf),
    #[error("{}: malformed migration name: {expected}", path.display())]
    MalformedName { path: PathBuf, expected: String },
    #[error(
        "duplicate version {version}: {} and {}; give one of them a new version",
        first.display(),
        second.display()
    )]
    Duplicate {
        version: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error(
        "{}: undo script without a forward migration of version {version}; add the forward script or remove the undo",
        path.display()
    )]
    UndoWithoutForward { path: PathBuf, version: String },
    #[error(
        "mixed migration layouts in {}: {} is {first_layout} but {} is {second_layout}; keep one layout per directory",
        dir.display(),
        first.display(),
        second.display()
    )]
    MixedLayouts {
        dir: PathBuf,
        first: PathBuf,
        first_layout: Layout,
        second: PathBuf,
        second_layout: Layout,
    },
    #[error("{}:{source}", path.display())]
    Directive {
        path: PathBuf,
        source: DirectiveError,
    },
    #[error("{}:{source}", path.display())]
    Script {
        path: PathBuf,
        source: sql::ScriptError,
    },
    #[error(
        "{}: no section markers, but {} is {layout}: add `{marker}` above its statements (and a down section if it has an undo); belay does not run a file of this directory whole",
        path.display(),
        other.display()
    )]
    NoSections {
        path: PathBuf,
        layout: Layout,
        other: PathBuf,
        marker: &'static str,
    },
    #[error("{}:{source}", path.display())]
    Sections { path: PathBuf, source: SectionError },
    #[error("{}: {reason}", path.display())]
    BadSidecar { path: PathBuf, reason: String },
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Many(Vec<SourceError>),
}

const FLYWAY_EXPECTED: &str = "expected V<version>__<description>.sql, U<version>__<description>.sql or R__<description>.sql (two underscores)";
const PAIRED_EXPECTED: &str =
    "expected <version>_<description>.up.sql / .down.sql, with a numeric version";
const ANY_EXPECTED: &str = "a .sql file in a migrations directory must be named V<version>__<desc>.sql (Flyway), <version>_<desc>.up.sql/.down.sql (paired), <version>_<desc>.sql (goose, dbmate, sqlx), or live in a <version>_<desc>/ folder as up.sql/down.sql; move other SQL elsewhere";
const NOT_SQL_EXPECTED: &str = "named like a migration but not a .sql file; fix the extension, or move the file out of the migrations directory";

enum Kind {
    Forward,
    Undo,
    Verify,
}

struct Found {
    layout: Layout,
    kind: Kind,
    version: Version,
    description: String,
    path: PathBuf,
    no_tx_sidecar: Option<NoTransactionSource>,
    /// The file as read to tell a goose or dbmate file from a plain one, kept so that the
    /// layout and the checksum come from the same bytes.
    read: Option<(Checksum, String)>,
}

/// What a directory holds besides migrations, judged once its layout is known.
#[derive(Default)]
struct Scan {
    found: Vec<Found>,
    repeatables: Vec<(String, PathBuf, Option<NoTransactionSource>)>,
    errors: Vec<SourceError>,
    /// `.sql` files with no migration name, outside migration folders.
    loose_sql: Vec<PathBuf>,
    /// Files inside a migration folder that diesel does not read.
    folder_extras: Vec<PathBuf>,
    /// Files that are not SQL and not a sidecar belay reads (README, `.gitkeep`).
    not_sql: Vec<PathBuf>,
}

/// Loads every migration under `dir`. All problems are collected and reported together,
/// each naming its file, so one run shows everything to fix.
pub fn load(dir: &Path) -> Result<MigrationSet, SourceError> {
    if !dir.is_dir() {
        return Err(SourceError::NoDirectory(dir.to_path_buf()));
    }
    let mut sc = Scan::default();
    scan(dir, &mut sc);
    let Scan {
        found,
        repeatables: repeatables_found,
        mut errors,
        loose_sql,
        folder_extras,
        not_sql,
    } = sc;

    // One layout per directory.
    let mut first_layout: Option<(Layout, &PathBuf)> = None;
    for (layout, path) in found.iter().map(|f| (f.layout, &f.path)).chain(
        repeatables_found
            .iter()
            .map(|(_, p, _)| (Layout::Flyway, p)),
    ) {
        match first_layout {
            None => first_layout = Some((layout, path)),
            Some((l, p)) if l != layout => {
                errors.push(mixed(dir, (l, p), (layout, path)));
                break;
            }
            _ => {}
        }
    }
    let layout = first_layout.map(|(l, _)| l);

    let mut warnings = Vec::new();
    // Scripts with their own BEGIN/COMMIT, said once for the set (below).
    let mut own_tc = Vec::new();
    skipped_files(
        dir,
        layout,
        loose_sql,
        folder_extras,
        not_sql,
        &mut warnings,
        &mut errors,
    );

    // Pair forward, undo and verify scripts by version.
    let mut by_version: BTreeMap<Version, [Option<Found>; 3]> = BTreeMap::new();
    for f in found {
        let slot = match f.kind {
            Kind::Forward => 0,
            Kind::Undo => 1,
            Kind::Verify => 2,
        };
        let entry = by_version.entry(f.version.clone()).or_default();
        if let Some(existing) = &entry[slot] {
            errors.push(SourceError::Duplicate {
                version: f.version.to_string(),
                first: existing.path.clone(),
                second: f.path.clone(),
            });
            continue;
        }
        entry[slot] = Some(f);
    }

    let mut migrations = Vec::new();
    for (version, [up, down, verify]) in by_version {
        let Some(up) = up else {
            if let Some(undo) = down.or(verify) {
                errors.push(SourceError::UndoWithoutForward {
                    path: undo.path,
                    version: version.to_string(),
                });
            }
            continue;
        };
        let script_name = relative_name(dir, &up.path);
        if let Some(tool) = match up.layout {
            Layout::Goose => Some(Tool::Goose),
            Layout::Dbmate => Some(Tool::Dbmate),
            _ => None,
        } {
            match read_sectioned(up.path.clone(), up.read, tool, &mut own_tc) {
                Ok((up_script, down_script, checksum)) => migrations.push(Migration {
                    version,
                    description: up.description,
                    up: up_script,
                    down: down_script,
                    verify: None,
                    checksum,
                    script_name,
                }),
                Err(e) => errors.push(e),
            }
            continue;
        }
        let up_script = match read_script(&up.path, up.read, up.no_tx_sidecar, &mut own_tc) {
            Ok(s) => s,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let down_script =
            match down.map(|d| read_script(&d.path, d.read, d.no_tx_sidecar, &mut own_tc)) {
                Some(Ok(s)) => Some(s),
                Some(Err(e)) => {
                    errors.push(e);
                    continue;
                }
                None => None,
            };
        let verify_script = match verify.map(|v| read_script(&v.path, v.read, None, &mut own_tc)) {
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                errors.push(e);
                continue;
            }
            None => None,
        };
        let checksum = combined_checksum(&up_script, down_script.as_ref());
        migrations.push(Migration {
            version,
            description: up.description,
            up: up_script,
            down: down_script,
            verify: verify_script,
            checksum,
            script_name,
        });
    }

    let mut repeatables = Vec::new();
    let mut seen_repeatable: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (description, path, sidecar) in repeatables_found {
        if let Some(first) = seen_repeatable.get(&description) {
            errors.push(SourceError::Duplicate {
                version: format!("R__{description}"),
                first: first.clone(),
                second: path.clone(),
            });
            continue;
        }
        seen_repeatable.insert(description.clone(), path.clone());
        match read_script(&path, None, sidecar, &mut own_tc) {
            Ok(script) => repeatables.push(Repeatable {
                description,
                script_name: relative_name(dir, &path),
                script,
            }),
            Err(e) => errors.push(e),
        }
    }

    match own_tc.len() {
        0..=3 => warnings.append(&mut own_tc),
        n => warnings.push(format!(
            "{n} scripts have their own transaction control and run without belay's transaction (as if `-- belay:no-transaction`), statement by statement; `belay plan` marks them `own_transaction_control`; the first: {}",
            own_tc[0]
        )),
    }
    match errors.len() {
        0 => Ok(MigrationSet {
            dir: dir.to_path_buf(),
            layout,
            migrations,
            repeatables,
            warnings,
        }),
        1 => Err(errors.remove(0)),
        _ => Err(SourceError::Many(errors)),
    }
}

/// Two layouts in one directory. A plain `<version>_<desc>.sql` among goose or dbmate
/// files is most likely one whose markers were forgotten: said so, since "mixed layouts"
/// would not tell why.
fn mixed(dir: &Path, first: (Layout, &PathBuf), second: (Layout, &PathBuf)) -> SourceError {
    let is_plain_single = |(l, p): (Layout, &PathBuf)| {
        l == Layout::Paired
            && p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                !n.ends_with(".up.sql") && !n.ends_with(".down.sql")
            })
    };
    for (sectioned, plain) in [(first, second), (second, first)] {
        let marker = match sectioned.0 {
            Layout::Goose => "-- +goose Up",
            Layout::Dbmate => "-- migrate:up",
            _ => continue,
        };
        if is_plain_single(plain) {
            return SourceError::NoSections {
                path: plain.1.clone(),
                layout: sectioned.0,
                other: sectioned.1.clone(),
                marker,
            };
        }
    }
    SourceError::MixedLayouts {
        dir: dir.to_path_buf(),
        first: first.1.clone(),
        first_layout: first.0,
        second: second.1.clone(),
        second_layout: second.0,
    }
}

/// Judges the files that are not migrations once the layout is known (see the module
/// documentation): warnings for what the layout's tool ignores, errors for the rest.
fn skipped_files(
    dir: &Path,
    layout: Option<Layout>,
    loose_sql: Vec<PathBuf>,
    folder_extras: Vec<PathBuf>,
    not_sql: Vec<PathBuf>,
    warnings: &mut Vec<String>,
    errors: &mut Vec<SourceError>,
) {
    for path in loose_sql {
        if layout == Some(Layout::Folder) {
            warnings.push(format!(
                "{}: skipped, not a migration: diesel reads only <version>_<name>/ folders here; move it out of the migrations directory to silence this",
                path.display()
            ));
        } else {
            errors.push(SourceError::MalformedName {
                path,
                expected: ANY_EXPECTED.into(),
            });
        }
    }
    for path in folder_extras {
        warnings.push(format!(
            "{}: skipped: a migration folder's up.sql, down.sql, verify.sql and metadata.toml are read, nothing else",
            path.display()
        ));
    }
    if !not_sql.is_empty() {
        let names: Vec<String> = not_sql.iter().map(|p| relative_name(dir, p)).collect();
        warnings.push(format!(
            "{}: skipped {} file(s) that are not migrations: {}",
            dir.display(),
            names.len(),
            names.join(", ")
        ));
    }
}

/// A script's path relative to its migrations directory, as history records it.
pub fn relative_name(dir: &Path, path: &Path) -> String {
    path.strip_prefix(dir)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

fn combined_checksum(up: &Script, down: Option<&Script>) -> Checksum {
    match down {
        None => up.checksum.clone(),
        Some(down) => {
            let joined = format!("{}\0undo\0{}", up.checksum, down.checksum);
            Checksum::of(joined.as_bytes())
        }
    }
}

fn sorted_entries(dir: &Path, errors: &mut Vec<SourceError>) -> Vec<PathBuf> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(source) => {
            errors.push(SourceError::Io {
                path: dir.to_path_buf(),
                source,
            });
            return Vec::new();
        }
    };
    let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    paths
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

fn scan(dir: &Path, sc: &mut Scan) {
    for path in sorted_entries(dir, &mut sc.errors) {
        if path.is_dir() {
            if is_hidden(&path) {
                continue; // .git and the like
            }
            if path.join("up.sql").is_file() || path.join("down.sql").is_file() {
                scan_folder(&path, sc);
            } else {
                // Flyway scans locations recursively; so do we, for loose files.
                scan(&path, sc);
            }
            continue;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stem = match name.strip_suffix(".sql") {
            Some(stem) if !is_hidden(&path) => stem,
            _ => {
                not_sql(path, &name, sc);
                continue;
            }
        };
        match name.as_bytes().first() {
            Some(b'V' | b'U' | b'R') => match parse_flyway(stem) {
                Some(FlywayName::Versioned {
                    undo,
                    version,
                    description,
                }) => {
                    let sidecar = match flyway_conf(&path) {
                        Ok(s) => s,
                        Err(e) => {
                            sc.errors.push(e);
                            None
                        }
                    };
                    sc.found.push(Found {
                        layout: Layout::Flyway,
                        kind: if undo { Kind::Undo } else { Kind::Forward },
                        version,
                        description,
                        path,
                        no_tx_sidecar: sidecar,
                        read: None,
                    })
                }
                Some(FlywayName::Repeatable { description }) => {
                    let sidecar = flyway_conf(&path).unwrap_or_else(|e| {
                        sc.errors.push(e);
                        None
                    });
                    sc.repeatables.push((description, path, sidecar))
                }
                None => sc.errors.push(SourceError::MalformedName {
                    path,
                    expected: FLYWAY_EXPECTED.into(),
                }),
            },
            Some(c) if c.is_ascii_digit() => match parse_paired(stem) {
                Some((kind, version, description)) => {
                    let single_file = !stem.ends_with(".up") && !stem.ends_with(".down");
                    let (layout, read) = if single_file {
                        // `<version>_<desc>.sql` is sqlx's simple migration, or a goose or
                        // dbmate file: only its markers tell.
                        match read_file(&path) {
                            Ok((checksum, text)) => {
                                (single_file_layout(&text), Some((checksum, text)))
                            }
                            Err(e) => {
                                sc.errors.push(e);
                                continue;
                            }
                        }
                    } else {
                        (Layout::Paired, None)
                    };
                    sc.found.push(Found {
                        layout,
                        kind,
                        version,
                        description,
                        path,
                        no_tx_sidecar: None,
                        read,
                    })
                }
                None => sc.errors.push(SourceError::MalformedName {
                    path,
                    expected: PAIRED_EXPECTED.into(),
                }),
            },
            _ => sc.loose_sql.push(path),
        }
    }
}

/// The layout of a `<version>_<desc>.sql` file: the tool of its first goose or dbmate
/// marker; paired (sqlx's simple migration) when it has none.
fn single_file_layout(text: &str) -> Layout {
    sections::markers(text)
        .iter()
        .find_map(|m| match m.tool {
            Tool::Goose => Some(Layout::Goose),
            Tool::Dbmate => Some(Layout::Dbmate),
            Tool::SqlMigrate | Tool::Liquibase => None,
        })
        .unwrap_or(Layout::Paired)
}

/// A file that is not a `.sql` script: a sidecar belay reads, a malformed migration name,
/// or something no layout's tool reads.
fn not_sql(path: PathBuf, name: &str, sc: &mut Scan) {
    if is_hidden(&path) && !name.ends_with(".sql") {
        return; // see the module documentation
    }
    if let Some(script) = name.strip_suffix(".conf")
        && script.ends_with(".sql")
        && path.with_file_name(script).is_file()
    {
        return; // Flyway's per-script config, read with its script
    }
    if looks_like_migration(name) {
        sc.errors.push(SourceError::MalformedName {
            path,
            expected: NOT_SQL_EXPECTED.into(),
        });
    } else {
        sc.not_sql.push(path);
    }
}

/// A name starting the way migration names start (`V1…`, `U1…`, `R__…`, `<version>_…`).
fn looks_like_migration(name: &str) -> bool {
    match name.as_bytes() {
        [b'V' | b'U', d, ..] if d.is_ascii_digit() => true,
        [b'R', b'_', b'_', ..] => true,
        [d, ..] if d.is_ascii_digit() => name
            .split_once('_')
            .is_some_and(|(v, _)| Version::parse(v).is_ok()),
        _ => false,
    }
}

fn scan_folder(path: &Path, sc: &mut Scan) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (version_part, description) = match name.split_once('_') {
        Some((v, d)) => (v, d.replace('_', " ")),
        None => (name.as_str(), String::new()),
    };
    let Ok(version) = Version::parse(version_part) else {
        sc.errors.push(SourceError::MalformedName {
            path: path.to_path_buf(),
            expected: "a migration folder is named <version>_<description> (e.g. 2024-01-31-120000_add_users or 3_add_users)".into(),
        });
        return;
    };
    let sidecar = match diesel_metadata(&path.join("metadata.toml")) {
        Ok(s) => s,
        Err(e) => {
            sc.errors.push(e);
            None
        }
    };
    for entry in sorted_entries(path, &mut sc.errors) {
        let known = entry.file_name().is_some_and(|n| {
            ["up.sql", "down.sql", "verify.sql", "metadata.toml"]
                .iter()
                .any(|k| n == *k)
        });
        if !known && !is_hidden(&entry) {
            sc.folder_extras.push(entry);
        }
    }
    for (file, kind) in [
        ("up.sql", Kind::Forward),
        ("down.sql", Kind::Undo),
        ("verify.sql", Kind::Verify),
    ] {
        let p = path.join(file);
        if p.is_file() {
            sc.found.push(Found {
                layout: Layout::Folder,
                kind,
                version: version.clone(),
                description: description.clone(),
                path: p,
                no_tx_sidecar: sidecar,
                read: None,
            });
        }
    }
}

enum FlywayName {
    Versioned {
        undo: bool,
        version: Version,
        description: String,
    },
    Repeatable {
        description: String,
    },
}

fn parse_flyway(stem: &str) -> Option<FlywayName> {
    let (prefix, rest) = stem.split_at(1);
    if prefix == "R" {
        let desc = rest.strip_prefix("__")?;
        return Some(FlywayName::Repeatable {
            description: desc.replace('_', " "),
        });
    }
    let (version, desc) = rest.split_once("__")?;
    let version = Version::parse(version).ok()?;
    Some(FlywayName::Versioned {
        undo: prefix == "U",
        version,
        description: desc.replace('_', " "),
    })
}

fn parse_paired(stem: &str) -> Option<(Kind, Version, String)> {
    let (kind, base) = if let Some(b) = stem.strip_suffix(".up") {
        (Kind::Forward, b)
    } else if let Some(b) = stem.strip_suffix(".down") {
        (Kind::Undo, b)
    } else {
        // sqlx's simple (irreversible) migrations: <version>_<desc>.sql
        (Kind::Forward, stem)
    };
    let (version, desc) = match base.split_once('_') {
        Some((v, d)) => (v, d.replace('_', " ")),
        None => (base, String::new()),
    };
    if desc.contains('.') {
        return None; // e.g. 1_x.upp.sql: a typo, not a description
    }
    Some((kind, Version::parse(version).ok()?, desc))
}

/// Flyway's per-script config: `<script>.sql.conf` with `executeInTransaction=false`.
fn flyway_conf(sql_path: &Path) -> Result<Option<NoTransactionSource>, SourceError> {
    let mut conf = sql_path.as_os_str().to_owned();
    conf.push(".conf");
    let conf = PathBuf::from(conf);
    let text = match std::fs::read_to_string(&conf) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(SourceError::Io { path: conf, source }),
    };
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=')
            && k.trim() == "executeInTransaction"
        {
            return match v.trim() {
                "false" => Ok(Some(NoTransactionSource::FlywayConf)),
                "true" => Ok(None),
                other => Err(SourceError::BadSidecar {
                    path: conf,
                    reason: format!("executeInTransaction must be true or false, not {other:?}"),
                }),
            };
        }
    }
    Ok(None)
}

/// diesel's `metadata.toml` with `run_in_transaction = false`.
fn diesel_metadata(path: &Path) -> Result<Option<NoTransactionSource>, SourceError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SourceError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let value: toml::Table = toml::from_str(&text).map_err(|e| SourceError::BadSidecar {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    match value.get("run_in_transaction") {
        None => Ok(None),
        Some(toml::Value::Boolean(true)) => Ok(None),
        Some(toml::Value::Boolean(false)) => Ok(Some(NoTransactionSource::DieselMetadata)),
        Some(other) => Err(SourceError::BadSidecar {
            path: path.to_path_buf(),
            reason: format!("run_in_transaction must be true or false, not {other}"),
        }),
    }
}

/// A file's exact bytes' checksum and its text.
fn read_file(path: &Path) -> Result<(Checksum, String), SourceError> {
    let bytes = std::fs::read(path).map_err(|source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let checksum = Checksum::of(&bytes);
    let text = String::from_utf8(bytes).map_err(|_| SourceError::NotUtf8(path.to_path_buf()))?;
    Ok((checksum, text))
}

/// A plain script: every line of it runs, so a section marker of any tool is refused
/// (run whole, a goose or dbmate file would apply its down section right after its up).
fn read_script(
    path: &Path,
    read: Option<(Checksum, String)>,
    sidecar: Option<NoTransactionSource>,
    own_tc: &mut Vec<String>,
) -> Result<Script, SourceError> {
    let (checksum, text) = match read {
        Some(r) => r,
        None => read_file(path)?,
    };
    if let Some(marker) = sections::markers(&text).first() {
        return Err(SourceError::Sections {
            path: path.to_path_buf(),
            source: sections::foreign(marker, None),
        });
    }
    build_script(path, &text, checksum, sidecar, own_tc)
}

/// A goose or dbmate file: its up script, its down script (`None` when the file has no
/// down section or an empty one: no undo) and the migration's checksum, of the file's
/// exact bytes.
fn read_sectioned(
    path: PathBuf,
    read: Option<(Checksum, String)>,
    tool: Tool,
    own_tc: &mut Vec<String>,
) -> Result<(Script, Option<Script>, Checksum), SourceError> {
    let (checksum, text) = match read {
        Some(r) => r,
        None => read_file(&path)?,
    };
    let parsed = match tool {
        Tool::Goose => sections::goose(&text),
        _ => sections::dbmate(&text),
    }
    .map_err(|source| SourceError::Sections {
        path: path.clone(),
        source,
    })?;
    let up = build_script(
        &path,
        &parsed.up,
        checksum.clone(),
        parsed.up_no_transaction,
        own_tc,
    )?;
    let down = match parsed.down {
        Some(down) => Some(build_script(
            &path,
            &down,
            checksum.clone(),
            parsed.down_no_transaction,
            own_tc,
        )?)
        .filter(|s| !s.is_empty()),
        None => None,
    };
    Ok((up, down, checksum))
}

/// Directives, statements and transaction handling of one script's text (a whole file,
/// or one section of it with the file's other lines blanked).
fn build_script(
    path: &Path,
    text: &str,
    checksum: Checksum,
    sidecar: Option<NoTransactionSource>,
    own_tc: &mut Vec<String>,
) -> Result<Script, SourceError> {
    let sql::SplitScript { text, statements } =
        sql::split_script(text).map_err(|source| SourceError::Script {
            path: path.to_path_buf(),
            source,
        })?;
    // Read from what runs, so that directives may sit below a dump's blanked
    // `\restrict` line, still above its first statement.
    let mut directives = directives::parse(&text).map_err(|source| SourceError::Directive {
        path: path.to_path_buf(),
        source,
    })?;
    if directives.no_transaction.is_none() {
        directives.no_transaction = sidecar;
    }
    if let Some(tc) = statements.iter().find(|s| s.is_transaction_control()) {
        // A script that commits on its own would commit belay's history row with it, or
        // without it: either breaks the promise that history matches what happened. So
        // it runs statement by statement, its history row marked running first.
        if directives.no_transaction.is_none() {
            directives.no_transaction = Some(NoTransactionSource::OwnTransactionControl);
            own_tc.push(format!(
                "{}:{}: script has its own transaction control ({}); running it without belay's transaction (as if `-- belay:no-transaction`)",
                path.display(),
                sql::line_of_offset(&text, tc.start),
                tc.words.first().map(String::as_str).unwrap_or("?")
            ));
        }
    }
    Ok(Script {
        path: path.to_path_buf(),
        text,
        checksum,
        directives,
        statements,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, body) in files {
            let p = d.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        d
    }

    fn versions(set: &MigrationSet) -> Vec<String> {
        set.migrations
            .iter()
            .map(|m| m.version.to_string())
            .collect()
    }

    #[test]
    fn detects_each_layout_and_orders_numerically() {
        let flyway = dir_with(&[
            ("V10__ten.sql", "select 10;"),
            ("V2__two.sql", "select 2;"),
            ("V1.1__one_one.sql", "select 11;"),
            ("U2__two.sql", "select -2;"),
            ("R__views.sql", "create or replace view v as select 1;"),
            ("README.md", "not a migration"),
        ]);
        let set = load(flyway.path()).unwrap();
        assert_eq!(set.layout, Some(Layout::Flyway));
        assert_eq!(versions(&set), ["1.1", "2", "10"]);
        assert!(set.migrations[1].down.is_some());
        assert_eq!(set.migrations[0].description, "one one");
        assert_eq!(set.repeatables.len(), 1);

        let paired = dir_with(&[
            ("2_b.up.sql", "select 2;"),
            ("2_b.down.sql", "select -2;"),
            ("1_a.up.sql", "select 1;"),
            ("1_a.down.sql", "select -1;"),
            ("3_simple.sql", "select 3;"),
        ]);
        let set = load(paired.path()).unwrap();
        assert_eq!(set.layout, Some(Layout::Paired));
        assert_eq!(versions(&set), ["1", "2", "3"]);
        assert!(set.migrations[2].down.is_none());

        let folder = dir_with(&[
            ("2026-07-30-140000-0000_new thing/up.sql", "select 2;"),
            ("2026-07-30-140000-0000_new thing/down.sql", "select -2;"),
            ("20140924113530_old/up.sql", "select 1;"),
            ("20140924113530_old/verify.sql", "select 1 where false;"),
            (
                "20140924113530_old/metadata.toml",
                "run_in_transaction = false\n",
            ),
        ]);
        let set = load(folder.path()).unwrap();
        assert_eq!(set.layout, Some(Layout::Folder));
        assert_eq!(versions(&set), ["20140924113530", "2026-07-30-140000-0000"]);
        assert_eq!(set.migrations[1].description, "new thing");
        assert!(set.migrations[0].verify.is_some());
        assert_eq!(
            set.migrations[0].up.no_transaction(),
            Some(NoTransactionSource::DieselMetadata)
        );
    }

    #[test]
    fn many_scripts_with_their_own_transaction_control_are_said_once() {
        let files: Vec<(String, String)> = (1..=5)
            .map(|n| {
                (
                    format!("V{n}__t.sql"),
                    format!("BEGIN;\nCREATE TABLE t{n} (i int);\nCOMMIT;\n"),
                )
            })
            .collect();
        let refs: Vec<(&str, &str)> = files
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let d = dir_with(&refs);
        let set = load(d.path()).unwrap();
        let own: Vec<&String> = set
            .warnings
            .iter()
            .filter(|w| w.contains("own transaction control"))
            .collect();
        assert_eq!(own.len(), 1, "{:?}", set.warnings);
        assert!(own[0].starts_with("5 scripts"), "{}", own[0]);
        assert!(own[0].contains("V1__t.sql:1"), "{}", own[0]);
        assert!(
            set.migrations
                .iter()
                .all(|m| m.up.no_transaction() == Some(NoTransactionSource::OwnTransactionControl))
        );

        let d = dir_with(&refs[..2]);
        let set = load(d.path()).unwrap();
        assert_eq!(
            set.warnings
                .iter()
                .filter(|w| w.contains("own transaction control"))
                .count(),
            2,
            "a few are each named: {:?}",
            set.warnings
        );
    }

    #[test]
    fn layout_conventions_for_no_transaction() {
        let d = dir_with(&[
            ("V1__a.sql", "create index concurrently i on t(a);"),
            ("V1__a.sql.conf", "# flyway\nexecuteInTransaction=false\n"),
            (
                "V2__b.sql",
                "-- no-transaction\ncreate index concurrently j on t(b);",
            ),
            ("V3__c.sql", "BEGIN;\ncreate table x();\nCOMMIT;\n"),
            ("V4__d.sql", "-- just a comment\n"),
            ("V5__e.sql", ""),
        ]);
        let set = load(d.path()).unwrap();
        let src: Vec<_> = set
            .migrations
            .iter()
            .map(|m| m.up.no_transaction())
            .collect();
        assert_eq!(
            src,
            [
                Some(NoTransactionSource::FlywayConf),
                Some(NoTransactionSource::Sqlx),
                Some(NoTransactionSource::OwnTransactionControl),
                None,
                None
            ]
        );
        assert!(
            set.warnings.iter().any(|w| w.contains("V3__c.sql:1")),
            "{:?}",
            set.warnings
        );
        assert!(set.migrations[3].up.is_empty() && set.migrations[4].up.is_empty());
    }

    #[test]
    fn checksum_covers_forward_and_undo_bytes() {
        let a = dir_with(&[("V1__a.sql", "select 1;"), ("U1__a.sql", "select 2;")]);
        let b = dir_with(&[("V1__a.sql", "select 1;"), ("U1__a.sql", "select 2; ")]);
        let c = dir_with(&[("V1__a.sql", "select 1;")]);
        let ca = &load(a.path()).unwrap().migrations[0].checksum;
        let cb = &load(b.path()).unwrap().migrations[0].checksum;
        let cc = &load(c.path()).unwrap().migrations[0].checksum;
        assert_ne!(ca, cb);
        assert_ne!(ca, cc);
        assert_eq!(cc, &Checksum::of(b"select 1;"));
    }

    #[test]
    fn bad_inputs_name_their_files() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case] = &[
            (
                &[("V1_init.sql", "")],
                &["V1_init.sql", "malformed migration name"],
            ),
            (&[("Vx__init.sql", "")], &["Vx__init.sql", "malformed"]),
            (&[("init.sql", "")], &["init.sql", "malformed"]),
            (&[("1_a.upp.sql", "")], &["1_a.upp.sql", "malformed"]),
            (&[("abc_x/up.sql", "")], &["abc_x", "malformed"]),
            (
                &[("V1__a.sql", ""), ("V1.0__b.sql", "")],
                &["duplicate version", "V1__a.sql", "V1.0__b.sql"],
            ),
            (
                &[("V1__a.sql", "-- belay:no-transactoin\n")],
                &["V1__a.sql:line 1: unknown directive"],
            ),
            (
                &[("V1__a.sql", ""), ("2_b.up.sql", "")],
                &["mixed migration layouts", "V1__a.sql", "2_b.up.sql"],
            ),
            (
                &[("U3__a.sql", "")],
                &["U3__a.sql", "undo script without a forward"],
            ),
            (
                &[("3_a.down.sql", "")],
                &["3_a.down.sql", "undo script without a forward"],
            ),
            (
                &[("3_a/down.sql", "")],
                &["down.sql", "undo script without a forward"],
            ),
            (
                &[
                    ("V1__a.sql", ""),
                    ("V1__a.sql.conf", "executeInTransaction=maybe"),
                ],
                &["V1__a.sql.conf", "executeInTransaction"],
            ),
            (
                &[("init.sql", ""), ("V1_x.sql", "")],
                &["init.sql", "V1_x.sql"],
            ),
        ];
        for (files, wants) in cases {
            let d = dir_with(files);
            let err = load(d.path()).unwrap_err().to_string();
            for want in *wants {
                assert!(
                    err.contains(want),
                    "files {files:?}: {err:?} lacks {want:?}"
                );
            }
        }
        let err = load(Path::new("/nonexistent/belay"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/belay") && err.contains("--dir"),
            "{err}"
        );
    }

    #[test]
    fn goose_and_dbmate_files_are_read_by_section() {
        let goose = "-- +goose NO TRANSACTION\n-- +goose Up\nCREATE INDEX CONCURRENTLY i ON t (a);\n\n-- +goose Down\nDROP INDEX CONCURRENTLY i;\n";
        let d = dir_with(&[
            ("20240101000000_index.sql", goose),
            ("20240102000000_no_down.sql", "-- +goose Up\nSELECT 1;\n"),
            (
                "20240103000000_empty_down.sql",
                "-- +goose Up\nSELECT 1;\n-- +goose Down\n-- nothing to undo\n",
            ),
        ]);
        let set = load(d.path()).unwrap();
        assert_eq!(set.layout, Some(Layout::Goose));
        let m = &set.migrations[0];
        assert_eq!(m.description, "index");
        assert_eq!(m.checksum, Checksum::of(goose.as_bytes()));
        let down = m.down.as_ref().unwrap();
        assert_eq!(down.path, m.up.path);
        assert_eq!(
            (m.up.text.len(), down.text.len()),
            (goose.len(), goose.len())
        );
        assert_eq!(m.up.statements.len(), 1);
        assert_eq!(sql::line_of_offset(&m.up.text, m.up.statements[0].start), 3);
        assert_eq!(down.statements.len(), 1);
        assert_eq!(sql::line_of_offset(&down.text, down.statements[0].start), 6);
        assert!(
            down.statements[0]
                .text(&down.text)
                .starts_with("DROP INDEX")
        );
        assert_eq!(
            (m.up.no_transaction(), down.no_transaction()),
            (
                Some(NoTransactionSource::GooseNoTransaction),
                Some(NoTransactionSource::GooseNoTransaction)
            )
        );
        assert!(set.migrations[1].down.is_none());
        assert!(
            set.migrations[2].down.is_none(),
            "an empty down section is no undo"
        );

        let dbmate = "-- migrate:up transaction:false\nCREATE INDEX CONCURRENTLY i ON t (a);\n-- migrate:down\nDROP INDEX i;\n";
        let d = dir_with(&[("20240101000000_index.sql", dbmate)]);
        let set = load(d.path()).unwrap();
        assert_eq!(set.layout, Some(Layout::Dbmate));
        let m = &set.migrations[0];
        assert_eq!(
            m.up.no_transaction(),
            Some(NoTransactionSource::DbmateTransactionFalse)
        );
        let down = m.down.as_ref().unwrap();
        assert_eq!(down.no_transaction(), None);
        assert_eq!(down.statements.len(), 1);
        assert!(!m.up.statements[0].text(&m.up.text).contains("DROP"));
        assert_eq!(m.checksum, Checksum::of(dbmate.as_bytes()));
    }

    #[test]
    fn markers_belay_does_not_read_are_refused_with_file_and_line() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case] = &[
            (
                &[(
                    "V1__users.sql",
                    "CREATE TABLE u ();\n-- +goose Down\nDROP TABLE u;\n",
                )],
                &[
                    "V1__users.sql:line 2",
                    "`-- +goose Down`",
                    "goose section marker",
                ],
            ),
            (
                &[(
                    "1_users.up.sql",
                    "-- migrate:up\nCREATE TABLE u ();\n-- migrate:down\n",
                )],
                &["1_users.up.sql:line 1", "`-- migrate:up`", "dbmate"],
            ),
            (
                &[("1_users/up.sql", "-- +migrate Up\nCREATE TABLE u ();\n")],
                &["up.sql:line 1", "sql-migrate"],
            ),
            (
                &[(
                    "1_users.sql",
                    "--liquibase formatted sql\n--changeset a:1\nCREATE TABLE u ();\n--rollback DROP TABLE u;\n",
                )],
                &["1_users.sql:line 1", "Liquibase"],
            ),
            (
                &[(
                    "1_users.sql",
                    "-- +goose envsub on\n-- +goose Up\nSELECT 1;\n",
                )],
                &["1_users.sql:line 1", "environment variables"],
            ),
            (
                &[(
                    "1_users.sql",
                    "-- +goose Up\nSELECT 1;\n-- migrate:down\nDROP TABLE u;\n",
                )],
                &[
                    "1_users.sql:line 3",
                    "dbmate section marker",
                    "a goose migration",
                ],
            ),
            (
                &[("1_users.sql", "-- migrate:up\nSELECT 1;\n")],
                &["1_users.sql:line 2", "no `-- migrate:down`"],
            ),
            (
                &[
                    ("1_users.sql", "-- +goose Up\nSELECT 1;\n"),
                    ("2_plain.sql", "DROP TABLE users;\n"),
                ],
                &[
                    "2_plain.sql: no section markers",
                    "1_users.sql is goose",
                    "`-- +goose Up`",
                ],
            ),
            (
                &[
                    ("1_plain.sql", "SELECT 1;\n"),
                    ("2_users.sql", "-- migrate:up\nSELECT 1;\n-- migrate:down\n"),
                ],
                &[
                    "1_plain.sql: no section markers",
                    "2_users.sql is dbmate",
                    "`-- migrate:up`",
                ],
            ),
            (
                &[
                    ("1_users.up.sql", "SELECT 1;\n"),
                    ("2_users.sql", "-- migrate:up\nSELECT 1;\n-- migrate:down\n"),
                ],
                &["mixed migration layouts", "1_users.up.sql", "2_users.sql"],
            ),
        ];
        for (files, wants) in cases {
            let d = dir_with(files);
            let err = load(d.path()).unwrap_err().to_string();
            for want in *wants {
                assert!(
                    err.contains(want),
                    "files {files:?}: {err:?} lacks {want:?}"
                );
            }
        }
    }

    #[test]
    fn skips_what_the_layouts_tool_ignores_and_refuses_malformed_names() {
        let d = dir_with(&[
            ("2024-01-01-000000_a/up.sql", "select 1;"),
            ("2024-01-01-000000_a/down.sql", "select 2;"),
            ("2024-01-01-000000_a/notes.txt", "why"),
            ("README.md", "how to"),
            (".gitkeep", ""),
            (".V2__draft.sql", "select 3;"),
            ("data_seed.sql", "insert into t values (1);"),
        ]);
        let set = load(d.path()).unwrap();
        assert_eq!(set.layout, Some(Layout::Folder));
        assert_eq!(versions(&set), ["2024-01-01-000000"]);
        let w = set.warnings.join("\n");
        assert!(w.contains("data_seed.sql: skipped, not a migration"), "{w}");
        assert!(w.contains("notes.txt: skipped"), "{w}");
        assert!(
            w.contains("2 file(s) that are not migrations: .V2__draft.sql, README.md"),
            "{w}"
        );
        assert!(!w.contains(".gitkeep"), "{w}");

        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case] = &[
            // diesel ignores loose files, but these are migrations with a typo
            (
                &[("1_a/up.sql", ""), ("2_b.up.sq", "")],
                &["2_b.up.sq", "not a .sql file"],
            ),
            (
                &[("1_a/up.sql", ""), ("V2_b.sql", "")],
                &["V2_b.sql", "two underscores"],
            ),
            (
                &[("1_a/up.sql", ""), ("x_b/up.sql", "")],
                &["x_b", "malformed"],
            ),
            // where migrations are loose files, a stray script is most likely a misnamed one
            (
                &[("V1__a.sql", ""), ("add_users.sql", "")],
                &["add_users.sql", "malformed"],
            ),
            (
                &[("1_a.up.sql", ""), ("add_users.sql", "")],
                &["add_users.sql", "malformed"],
            ),
        ];
        for (files, wants) in cases {
            let d = dir_with(files);
            let err = load(d.path()).unwrap_err().to_string();
            for want in *wants {
                assert!(
                    err.contains(want),
                    "files {files:?}: {err:?} lacks {want:?}"
                );
            }
        }
    }

    #[test]
    fn non_utf8_script_is_named() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("V1__a.sql"), [0xff, 0xfe, b';']).unwrap();
        let err = load(d.path()).unwrap_err().to_string();
        assert!(err.contains("V1__a.sql") && err.contains("UTF-8"), "{err}");
    }
}
