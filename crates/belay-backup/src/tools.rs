//! The PostgreSQL client programs: finding them, their versions, and running them with a
//! password that never appears on a command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use belay_core::DatabaseUrl;

use crate::BackupError;

/// A command line as belay built it, handed to a [`CommandHook`] before it runs: what the
/// process list of the machine shows. Environment values listed here are not secrets
/// (`PGPASSFILE` names a file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl CommandLine {
    /// Program and arguments joined by spaces, for messages and assertions.
    pub fn display(&self) -> String {
        std::iter::once(self.program.display().to_string())
            .chain(self.args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Observes every child process before it starts (debugging, auditing, tests).
pub type CommandHook = Arc<dyn Fn(&CommandLine) + Send + Sync>;

/// `pg_dump`, `pg_restore` and `psql` from one directory, and their version.
#[derive(Debug, Clone)]
pub struct PgTools {
    pub bin_dir: PathBuf,
    /// `pg_dump --version`, e.g. `pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)`.
    pub pg_dump_version: String,
    /// The same as `server_version_num` would spell it (150020).
    pub version_num: u32,
}

const PROGRAMS: [&str; 3] = ["pg_dump", "pg_restore", "psql"];

impl PgTools {
    /// Finds the client tools: `explicit` if given (and nothing else), otherwise
    /// `pg_config --bindir`, then the newest `/usr/lib/postgresql/*/bin`, `/usr/pgsql-*/bin`,
    /// `/usr/local/pgsql/bin`, then `PATH`.
    pub async fn locate(explicit: Option<&Path>) -> Result<PgTools, BackupError> {
        let mut searched = Vec::new();
        let candidates = match explicit {
            Some(dir) => vec![dir.to_path_buf()],
            None => {
                let mut c = Vec::new();
                match tokio::process::Command::new("pg_config")
                    .arg("--bindir")
                    .output()
                    .await
                {
                    Ok(out) if out.status.success() => {
                        let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                        if !dir.is_empty() {
                            c.push(PathBuf::from(dir));
                        }
                    }
                    _ => searched.push("pg_config --bindir (not on PATH)".to_owned()),
                }
                c.extend(newest_first(Path::new("/usr/lib/postgresql"), "", "bin"));
                c.extend(newest_first(Path::new("/usr"), "pgsql-", "bin"));
                c.push(PathBuf::from("/usr/local/pgsql/bin"));
                if let Some(path) = std::env::var_os("PATH") {
                    c.extend(std::env::split_paths(&path));
                }
                c
            }
        };
        for dir in candidates {
            if PROGRAMS.iter().all(|p| dir.join(p).is_file()) {
                return PgTools::in_dir(dir).await;
            }
            searched.push(dir.display().to_string());
        }
        Err(BackupError::ToolsNotFound {
            searched: searched.join(", "),
        })
    }

    async fn in_dir(bin_dir: PathBuf) -> Result<PgTools, BackupError> {
        let pg_dump = bin_dir.join("pg_dump");
        let out = tokio::process::Command::new(&pg_dump)
            .arg("--version")
            .output()
            .await
            .map_err(BackupError::io("could not run", &pg_dump))?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let version_num = parse_version_num(&text).ok_or_else(|| BackupError::ToolFailed {
            tool: "pg_dump --version".into(),
            target: "-".into(),
            status: out.status.to_string(),
            stderr: format!("unexpected output {text:?}"),
        })?;
        Ok(PgTools {
            bin_dir,
            pg_dump_version: text,
            version_num,
        })
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// Refuses when `pg_dump` is of an older major version than the server: it would abort
    /// (or, across minor oddities, miss objects) halfway through.
    pub fn check_server(
        &self,
        target: &str,
        server_version_num: u32,
        server_version: &str,
    ) -> Result<(), BackupError> {
        if major_key(self.version_num) < major_key(server_version_num) {
            return Err(BackupError::ClientTooOld {
                target: target.to_owned(),
                client: self.pg_dump_version.clone(),
                server: server_version.to_owned(),
                server_major: major_of(server_version_num),
                bin_dir: self.bin_dir.clone(),
            });
        }
        Ok(())
    }
}

/// `pg_dump (PostgreSQL) 15.20 (Debian …)` → 150020; `… 9.6.24` → 90624; `16beta1` → 160000.
pub fn parse_version_num(text: &str) -> Option<u32> {
    let rest = text.split(')').nth(1)?.trim_start();
    let token = rest.split_whitespace().next()?;
    let mut parts = token.split('.').map(|p| {
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    let major = parts.next()??;
    let second = parts.next().flatten().unwrap_or(0);
    if major >= 10 {
        Some(major * 10000 + second)
    } else {
        let third = parts.next().flatten().unwrap_or(0);
        Some(major * 10000 + second * 100 + third)
    }
}

/// Comparable major version: 150020 → 1500, 90624 → 906.
fn major_key(num: u32) -> u32 {
    if num >= 100_000 {
        num / 10000 * 100
    } else {
        num / 100
    }
}

fn major_of(num: u32) -> u32 {
    if num >= 100_000 {
        num / 10000
    } else {
        num / 100
    }
}

/// `<parent>/<prefix><version>/<leaf>` for each version-named entry, highest first.
fn newest_first(parent: &Path, prefix: &str, leaf: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut found: Vec<(Vec<u64>, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.strip_prefix(prefix)?;
            let key = version
                .split('.')
                .map(|p| p.parse::<u64>().ok())
                .collect::<Option<Vec<_>>>()?;
            Some((key, e.path().join(leaf)))
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0));
    found.into_iter().map(|(_, p)| p).collect()
}

/// How a child process reaches a database: a connection URI without the password, plus a
/// private passfile (mode 0600, deleted on drop) when the URL carries one.
#[derive(Debug)]
pub(crate) struct ChildConn {
    /// Safe to put on a command line.
    pub conninfo: String,
    passfile: Option<tempfile::NamedTempFile>,
}

impl ChildConn {
    pub fn new(url: &DatabaseUrl) -> Result<ChildConn, BackupError> {
        // `expose` is used here only to split the secret off into the passfile.
        let mut parsed = url::Url::parse(url.expose())
            .map_err(|e| BackupError::Invalid(format!("cannot parse database URL {url}: {e}")))?;
        let mut password = parsed.password().map(percent_decode);
        let _ = parsed.set_password(None);
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if pairs.iter().any(|(k, _)| k == "password") {
            let mut kept = Vec::new();
            for (k, v) in pairs {
                if k == "password" {
                    password = Some(v);
                } else {
                    kept.push((k, v));
                }
            }
            if kept.is_empty() {
                parsed.set_query(None);
            } else {
                parsed.query_pairs_mut().clear().extend_pairs(kept);
            }
        }
        let passfile = match password {
            Some(pw) => Some(write_passfile(&pw)?),
            None => None,
        };
        Ok(ChildConn {
            conninfo: parsed.to_string(),
            passfile,
        })
    }

    /// The same server, another database (scratch databases, `--into`).
    pub fn with_database(&self, db: &str) -> Result<ChildConn, BackupError> {
        let mut parsed = url::Url::parse(&self.conninfo)
            .map_err(|e| BackupError::Invalid(format!("cannot parse connection URI: {e}")))?;
        parsed.set_path(&format!("/{}", percent_encode_path(db)));
        let passfile = match &self.passfile {
            Some(f) => Some(
                tempfile::Builder::new()
                    .prefix("belay-pgpass-")
                    .tempfile()
                    .and_then(|mut t| {
                        std::fs::copy(f.path(), t.path())?;
                        t.flush()?;
                        Ok(t)
                    })
                    .map_err(BackupError::io(
                        "could not write a passfile",
                        std::env::temp_dir(),
                    ))?,
            ),
            None => None,
        };
        Ok(ChildConn {
            conninfo: parsed.to_string(),
            passfile,
        })
    }

    /// Environment for the child: `PGPASSFILE` when we hold the password (and no inherited
    /// `PGPASSWORD` that would take precedence over it).
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("PGAPPNAME".to_owned(), "belay-backup".to_owned()),
            ("PGCONNECT_TIMEOUT".to_owned(), "10".to_owned()),
        ];
        if let Some(f) = &self.passfile {
            env.push(("PGPASSFILE".to_owned(), f.path().display().to_string()));
        }
        env
    }

    pub fn has_passfile(&self) -> bool {
        self.passfile.is_some()
    }
}

fn write_passfile(password: &str) -> Result<tempfile::NamedTempFile, BackupError> {
    let mut file = tempfile::Builder::new()
        .prefix("belay-pgpass-")
        .tempfile()
        .map_err(BackupError::io(
            "could not create a passfile in",
            std::env::temp_dir(),
        ))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o600))
            .map_err(BackupError::io("could not restrict", file.path()))?;
    }
    let line = format!("*:*:*:*:{}\n", escape_passfile(password));
    file.write_all(line.as_bytes())
        .and_then(|()| file.flush())
        .map_err(BackupError::io("could not write", file.path()))?;
    Ok(file)
}

/// `:` and `\` are escaped with `\` in a passfile field.
fn escape_passfile(s: &str) -> String {
    s.replace('\\', "\\\\").replace(':', "\\:")
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn percent_encode_path(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Builds child processes for one operation, reporting each to the hook.
#[derive(Clone)]
pub(crate) struct Runner {
    pub tools: PgTools,
    pub hook: Option<CommandHook>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("tools", &self.tools)
            .finish()
    }
}

impl Runner {
    pub fn command(
        &self,
        program: &str,
        args: Vec<String>,
        conn: Option<&ChildConn>,
    ) -> tokio::process::Command {
        let program = self.tools.program(program);
        let env = conn.map(ChildConn::env).unwrap_or_default();
        if let Some(hook) = &self.hook {
            hook(&CommandLine {
                program: program.clone(),
                args: args.clone(),
                env: env.clone(),
            });
        }
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&args)
            .envs(env)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        if conn.is_some_and(ChildConn::has_passfile) {
            cmd.env_remove("PGPASSWORD");
        }
        cmd
    }
}

/// The lines of a tool's stderr worth showing: errors, details and hints, or the last few.
pub(crate) fn stderr_summary(stderr: &str) -> String {
    let interesting: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("error")
                || l.contains("detail:")
                || l.contains("hint:")
                || l.contains("fatal")
        })
        .collect();
    let lines: Vec<&str> = if interesting.is_empty() {
        let all: Vec<&str> = stderr.lines().collect();
        all[all.len().saturating_sub(5)..].to_vec()
    } else {
        interesting.into_iter().take(20).collect()
    };
    belay_core::redact_url(lines.join(" | ").trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_like_server_version_num() {
        assert_eq!(
            parse_version_num("pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)"),
            Some(150020)
        );
        assert_eq!(
            parse_version_num("pg_dump (PostgreSQL) 9.6.24"),
            Some(90624)
        );
        assert_eq!(
            parse_version_num("pg_dump (PostgreSQL) 17beta1"),
            Some(170000)
        );
        assert_eq!(parse_version_num("garbage"), None);
        assert!(major_key(150020) < major_key(160001));
        assert_eq!(major_key(150002), major_key(150020));
        assert!(major_key(90624) < major_key(100000));
    }

    #[test]
    fn older_client_is_refused_before_dumping() {
        let tools = PgTools {
            bin_dir: PathBuf::from("/usr/lib/postgresql/15/bin"),
            pg_dump_version: "pg_dump (PostgreSQL) 15.20".into(),
            version_num: 150020,
        };
        assert!(tools.check_server("prod", 150001, "15.1").is_ok());
        assert!(tools.check_server("prod", 140010, "14.10").is_ok());
        let err = tools.check_server("prod", 160002, "16.2").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("older than the server") && msg.contains("16.2"),
            "{msg}"
        );
        assert!(msg.contains("postgresql-client-16"), "{msg}");
    }

    #[test]
    fn password_goes_to_a_private_passfile_not_the_uri() {
        let url =
            DatabaseUrl::parse("postgres://app:p%40ss:w\\rd@db.example:6543/shop?sslmode=require")
                .unwrap();
        let conn = ChildConn::new(&url).unwrap();
        assert_eq!(
            conn.conninfo,
            "postgres://app@db.example:6543/shop?sslmode=require"
        );
        let env = conn.env();
        let (_, path) = env.iter().find(|(k, _)| k == "PGPASSFILE").unwrap();
        let content = std::fs::read_to_string(path).unwrap();
        assert_eq!(content, "*:*:*:*:p@ss\\:w\\\\rd\n");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let other = conn.with_database("scratch_1").unwrap();
        assert_eq!(
            other.conninfo,
            "postgres://app@db.example:6543/scratch_1?sslmode=require"
        );
        assert!(other.has_passfile());

        let q = DatabaseUrl::parse("postgres://db/x?password=s3cret&sslmode=disable").unwrap();
        let conn = ChildConn::new(&q).unwrap();
        assert_eq!(conn.conninfo, "postgres://db/x?sslmode=disable");
        assert!(conn.has_passfile());

        let none = DatabaseUrl::parse("postgres://app@db/x").unwrap();
        assert!(!ChildConn::new(&none).unwrap().has_passfile());
    }

    #[test]
    fn stderr_summary_keeps_errors() {
        let s = "pg_dump: reading tables\npg_dump: error: connection to server failed\npg_dump: detail: x";
        assert_eq!(
            stderr_summary(s),
            "pg_dump: error: connection to server failed | pg_dump: detail: x"
        );
    }
}
