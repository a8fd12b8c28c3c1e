//! `belay backfill`: batched, resumable updates (`belay-backfill`) with a progress bar on a
//! terminal, plain lines otherwise, and signals that never leave half a batch: the first
//! SIGINT/SIGTERM lets the batch in flight commit and stops; a second abandons it (the
//! server rolls it back).

use crate::cli::{Cli, ExecArgs, Output};
use crate::{Failure, exit};
use anyhow::anyhow;
use belay_backfill::{
    Backfill, BackfillApi, BackfillError, BackfillEvent, BackfillRequest, BackfillSpec,
    CancellationToken, ErrorKind, Limits, Progress, Start, Started, Summary,
};
use belay_core::{DatabaseUrl, format_duration, parse_duration};
use clap::Args;
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Exit code after SIGINT (128 + 2), as shells report a Ctrl-C'd command.
pub const INTERRUPTED: u8 = 130;
/// Exit code after SIGTERM (128 + 15).
pub const TERMINATED: u8 = 143;

/// Statement timeout of a batch unless `--statement-timeout` or belay.toml says otherwise:
/// a batch that needs longer holds its row locks too long and should be smaller.
const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

pub const ABOUT: &str =
    "Update a table in primary-key batches, resumably: never in one long UPDATE";

pub const LONG_ABOUT: &str = "\
Update a table in primary-key batches, resumably: never in one long UPDATE.

Why batches: a single `UPDATE big_table SET ...` locks every row it touches until it
commits, so the application's writes to those rows queue behind it for the whole run; it
bloats the table and the WAL at once and lags replicas; and if it fails or is cancelled
after an hour, all of it rolls back. belay walks the primary key instead: each batch takes
the next --batch keys, updates those of their rows that match --where, and commits, in its
own short transaction with a low lock_timeout (rolled back and retried with backoff when
the application holds a row) and a statement_timeout. --sleep pauses between batches so
replicas, autovacuum and the application keep up.

Resuming: the backfill's position (the last key done) is saved in belay.backfill_progress
in the same transaction as each batch, so a batch is either done and recorded or neither.
After Ctrl-C, a crash or a failed batch, run the same command again: it resumes after the
last committed key and says so. A finished backfill says it is already done; --restart runs
it again from the first key. A backfill is identified by its name: by default the table and
a hash of --table, --set and --where (or choose one with --name); --batch, --sleep and the
timeouts may change between runs.

Stopping: on Ctrl-C (SIGINT) or SIGTERM the batch in flight commits, then belay stops and
prints how far it got and the exact command that resumes (exit 130 for SIGINT, 143 for
SIGTERM). A second Ctrl-C stops at once: the batch in flight is rolled back by PostgreSQL,
never half-applied.

Remote: with --controller ADDR --target NAME it works the same way, run by the target's
agent beside the database (its batch settings from the target's [execution] in agent.toml
unless the flags above say otherwise, its connection from the agent's budget, its progress
on the agent's /metrics as belay_backfill_*): the same lines, resume command and exit codes.
Ctrl-C asks the agent to stop after the batch in flight; if this command goes away (a
closed laptop, a lost connection), the agent does the same, so no batch is left half-done
and the same command resumes.

--set and --where are PostgreSQL's own SQL, checked by PostgreSQL (EXPLAIN) before the
first batch; an error names the option. Prefer an idempotent backfill (--where \"total IS
NULL\"), and never assign primary-key columns. Keys are walked in order, so rows inserted
behind the current position are not visited: have the application write the new value
before backfilling the old rows.

Examples:
  belay backfill --table orders --set \"total = price * qty\" --where \"total IS NULL\" \\
      --batch 1000 --sleep 100ms
  belay backfill --table orders --set \"total = price * qty\" --where \"total IS NULL\" \\
      --batch 1000 --restart
  belay --controller ctl:7400 --target shop backfill --table orders \\
      --set \"total = price * qty\" --where \"total IS NULL\" --batch 1000

Exit codes: 0 done (or already done) · 1 a batch failed (earlier batches stay done; rerun
to resume) · 2 refused (no primary key, not a table) · 3 this backfill is already running ·
64 bad flags, unknown table or target, invalid --set or --where · 69 database (or the
controller, or the target's agent) unreachable ·
130/143 interrupted (resume with the printed command)";

#[derive(Debug, Clone, Args)]
pub struct BackfillArgs {
    /// Table to update: `table` or `schema.table`, as a query would name it (search_path)
    #[arg(long, value_name = "TABLE")]
    pub table: String,
    /// Assignments of `UPDATE ... SET`, e.g. "total = price * qty" (several: "a = 1, b = c")
    #[arg(long, value_name = "ASSIGNMENTS")]
    pub set: String,
    /// Update only the rows matching this condition, e.g. "total IS NULL"
    #[arg(long = "where", value_name = "CONDITION")]
    pub filter: Option<String>,
    /// Primary keys per batch; each batch is one transaction updating at most N rows
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,
    /// Pause between batches, e.g. 100ms [default: 0]
    #[arg(long, value_name = "DURATION")]
    pub sleep: Option<String>,
    /// Name of the backfill in the progress table [default: <table>_<hash of the table,
    /// --set and --where>]
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Start again from the first key, even if this backfill finished or was interrupted
    #[arg(long)]
    pub restart: bool,
    /// Longest a batch waits for a row lock before it rolls back and retries; also the
    /// longest an application write queues behind it [default: 100ms]
    #[arg(long, value_name = "DURATION")]
    pub lock_timeout: Option<String>,
    /// Longest one batch may run [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub statement_timeout: Option<String>,
    /// Attempts per batch before giving up on locks [default: 60]
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Time budget per batch for lock waits and backoff [default: 2min]
    #[arg(long, value_name = "DURATION")]
    pub max_lock_wait: Option<String>,
}

fn failure(e: &BackfillError) -> Failure {
    Failure {
        code: match e.kind() {
            ErrorKind::Usage => exit::USAGE,
            ErrorKind::Refused => exit::REFUSED,
            ErrorKind::Busy => exit::BUSY,
            ErrorKind::Unavailable => exit::UNAVAILABLE,
            ErrorKind::Failed => exit::FAILED,
            ErrorKind::Internal => exit::SOFTWARE,
        },
        message: e.to_string(),
    }
}

pub async fn run(cli: &Cli, args: &BackfillArgs, url_from_argv: bool) -> Result<u8, Failure> {
    // The shared lock-safety flags and `[execution]` in belay.toml, resolved and checked
    // the same way as for migrations.
    let exec = ExecArgs {
        lock_timeout: args.lock_timeout.clone(),
        max_attempts: args.max_attempts,
        max_lock_wait: args.max_lock_wait.clone(),
        statement_timeout: args.statement_timeout.clone(),
        ..ExecArgs::default()
    };
    let settings =
        crate::settings::resolve(cli, url_from_argv, Some(&exec)).map_err(crate::usage)?;
    if settings.url_from_argv_with_password {
        eprintln!(
            "warning: the database password is on the command line, where other users can read it; use BELAY_DATABASE_URL, --url-file or a .pgpass file"
        );
    }
    let url = settings.url.clone().ok_or_else(|| {
        crate::usage(anyhow!(
            "no database URL: set BELAY_DATABASE_URL (or DATABASE_URL), pass --url-file, or set `url_file` in belay.toml"
        ))
    })?;
    let sleep = sleep_of(args)?;
    let e = &settings.exec;
    let spec = BackfillSpec {
        table: args.table.clone(),
        set: args.set.clone(),
        filter: args.filter.clone(),
        name: args.name.clone(),
        batch_size: args.batch,
        sleep,
        restart: args.restart,
        progress_schema: e.history_schema.clone(),
        limits: Limits {
            lock_timeout: e.lock_timeout,
            statement_timeout: e.statement_timeout.unwrap_or(DEFAULT_STATEMENT_TIMEOUT),
            max_attempts: e.max_attempts,
            max_lock_wait: e.max_lock_wait,
            backoff_initial: e.backoff_initial,
            backoff_max: e.backoff_max,
        },
    };
    // Before the first batch: from here on a signal must stop us between batches, not
    // kill us inside one.
    let mut stop = StopSignals::install()?;
    let mut conn = belay_backfill::connect(&url)
        .await
        .map_err(|e| failure(&e))?;
    let mut bf = Backfill::prepare(&mut conn, spec)
        .await
        .map_err(|e| failure(&e))?;
    let resume = resume_command(cli, args, bf.name(), &local_flags(cli, url_from_argv, &url));
    let started = bf.started(&settings.exec.history_schema);
    announce(&started, args.batch, sleep);
    if let Start::AlreadyDone { .. } = bf.start() {
        already_done(cli, &started, &bf.summary());
        let _ = sqlx::Connection::close(conn).await;
        return Ok(0);
    }

    let printer = Printer::new(&started);
    let progress = |p: &Progress| printer.show(p);
    let token = stop.token.clone();
    let outcome = tokio::select! {
        r = bf.run(&mut conn, &token, &progress) => Some(r),
        () = stop.second() => None,
    };
    printer.end_bar();
    let summary = bf.summary();
    let signal = stop.code();
    match outcome {
        None => {
            // Dropping the connection with its transaction open: PostgreSQL rolls the
            // batch back as a whole.
            drop(conn);
            eprintln!(
                "stopped at once: the batch in flight was abandoned and PostgreSQL rolls it back. {}",
                so_far(&summary)
            );
            Ok(stopped(cli, &summary, &resume, signal))
        }
        Some(Err(e)) => {
            let _ = sqlx::Connection::close(conn).await;
            failed(&summary, &resume);
            Err(failure(&e))
        }
        Some(Ok(summary)) => {
            let _ = sqlx::Connection::close(conn).await;
            Ok(ended(cli, &summary, &resume, signal))
        }
    }
}

/// `belay --controller … --target T backfill …`: the target's agent runs it; the same
/// lines, resume command and exit codes as [`run`], rendered from its stream.
pub async fn remote(
    cli: &Cli,
    args: &BackfillArgs,
    api: &dyn BackfillApi,
    target: &str,
) -> Result<u8, Failure> {
    let duration = |flag: &str, v: &Option<String>| -> Result<Option<Duration>, Failure> {
        v.as_deref()
            .map(|s| parse_duration(s).map_err(|e| crate::usage(anyhow!("{flag}: {e}"))))
            .transpose()
    };
    let sleep = sleep_of(args)?;
    let request = BackfillRequest {
        table: args.table.clone(),
        set: args.set.clone(),
        filter: args.filter.clone(),
        name: args.name.clone(),
        batch_size: args.batch,
        sleep,
        restart: args.restart,
        lock_timeout: duration("--lock-timeout", &args.lock_timeout)?,
        statement_timeout: duration("--statement-timeout", &args.statement_timeout)?,
        max_attempts: args.max_attempts,
        max_lock_wait: duration("--max-lock-wait", &args.max_lock_wait)?,
    };
    if request.max_attempts == Some(0) {
        return Err(crate::usage(anyhow!("--max-attempts must be at least 1")));
    }
    let mut stop = StopSignals::install()?;
    // What the stream said so far: its start, the committed state (for the lines printed
    // after an error or a second Ctrl-C), and the progress printer.
    let seen: Arc<Mutex<Option<(Started, Summary, Printer)>>> = Arc::default();
    let sink = {
        let (seen, batch) = (seen.clone(), args.batch);
        Arc::new(move |e: &BackfillEvent| {
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            match e {
                BackfillEvent::Started(s) => {
                    announce(s, batch, sleep);
                    *seen = Some((s.clone(), initial_summary(s), Printer::new(s)));
                }
                BackfillEvent::Progress(p) => {
                    if let Some((_, summary, printer)) = seen.as_mut() {
                        if let Progress::Batch(b) = p {
                            summary.rows_updated = b.total_updated;
                            summary.rows_examined = b.total_examined;
                            summary.batches = b.batch;
                            summary.done = b.finished;
                            summary.last_key = Some(b.last_key.clone());
                            summary.rows_updated_this_run += b.rows_updated;
                            summary.batches_this_run += 1;
                        }
                        printer.show(p);
                    }
                }
            }
        })
    };
    let outcome = tokio::select! {
        r = api.run(target, request, stop.token.clone(), sink) => Some(r),
        () = stop.second() => None,
    };
    let signal = stop.code();
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some((started, so_far_summary, printer)) = seen else {
        // It never started: refused (bad options, unknown target, already running) or
        // unreachable, and nothing was written.
        return match outcome {
            Some(Ok(_)) => Err(Failure {
                code: exit::SOFTWARE,
                message: "the agent ended the backfill without saying it started".into(),
            }),
            Some(Err(e)) => Err(e.into()),
            None => Ok(signal.unwrap_or(INTERRUPTED)),
        };
    };
    printer.end_bar();
    let resume = resume_command(cli, args, &started.name, &remote_flags(cli, target));
    match outcome {
        None => {
            eprintln!(
                "stopped waiting: the agent finishes the batch in flight and stops (nothing is half-done). {}",
                so_far(&so_far_summary)
            );
            Ok(stopped(cli, &so_far_summary, &resume, signal))
        }
        Some(Err(e)) => {
            failed(&so_far_summary, &resume);
            Err(e.into())
        }
        Some(Ok(summary)) => {
            if let Start::AlreadyDone { .. } = started.start {
                already_done(cli, &started, &summary);
                return Ok(0);
            }
            Ok(ended(cli, &summary, &resume, signal))
        }
    }
}

fn sleep_of(args: &BackfillArgs) -> Result<Duration, Failure> {
    match &args.sleep {
        Some(s) => parse_duration(s).map_err(|e| crate::usage(anyhow!("--sleep: {e}"))),
        None => Ok(Duration::ZERO),
    }
}

/// The committed state as the start describes it, before any batch of this run.
fn initial_summary(s: &Started) -> Summary {
    let (rows_updated, batches, last_key, done) = match &s.start {
        Start::Fresh | Start::Restarted => (0, 0, None, false),
        Start::Resuming {
            last_key,
            rows_updated,
            batches,
        } => (*rows_updated, *batches, last_key.clone(), false),
        Start::AlreadyDone {
            rows_updated,
            batches,
            ..
        } => (*rows_updated, *batches, None, true),
    };
    Summary {
        name: s.name.clone(),
        table: s.table.clone(),
        key_columns: s.key_columns.clone(),
        rows_updated,
        rows_examined: s.rows_examined,
        batches,
        done,
        last_key,
        rows_updated_this_run: 0,
        batches_this_run: 0,
        estimated_rows: s.estimated_rows,
    }
}

fn already_done(cli: &Cli, started: &Started, summary: &Summary) {
    let Start::AlreadyDone {
        rows_updated,
        batches,
        finished_at,
    } = &started.start
    else {
        return;
    };
    match cli.output {
        Output::Json => print_json(summary, false, None),
        Output::Text => println!(
            "backfill {} is already done: {rows_updated} rows updated in {batches} batches, finished {}; pass --restart to run it again",
            started.name,
            finished_at.format("%Y-%m-%d %H:%M:%S UTC")
        ),
    }
}

/// Stopped by a second signal: the resume command, and the signal's exit code.
fn stopped(cli: &Cli, summary: &Summary, resume: &str, signal: Option<u8>) -> u8 {
    eprintln!("resume with:\n  {resume}");
    if cli.output == Output::Json {
        print_json(summary, true, Some(resume));
    }
    signal.unwrap_or(INTERRUPTED)
}

fn failed(summary: &Summary, resume: &str) {
    eprintln!(
        "backfill {} stopped by an error. {} Fix the cause, then resume with:\n  {resume}",
        summary.name,
        so_far(summary)
    );
}

/// The run returned: done, or stopped between batches by a signal.
fn ended(cli: &Cli, summary: &Summary, resume: &str, signal: Option<u8>) -> u8 {
    if summary.done {
        match cli.output {
            Output::Json => print_json(summary, false, None),
            Output::Text => println!(
                "backfill {}: done: {} rows updated ({} examined) in {} batches{}",
                summary.name,
                summary.rows_updated,
                summary.rows_examined,
                summary.batches,
                if summary.batches_this_run == summary.batches {
                    String::new()
                } else {
                    format!(
                        "; {} rows in {} batches this run",
                        summary.rows_updated_this_run, summary.batches_this_run
                    )
                }
            ),
        }
        return 0;
    }
    // Not done and no error: a signal stopped it between batches.
    eprintln!(
        "interrupted: the batch in flight finished; nothing is half-done. {}",
        so_far(summary)
    );
    eprintln!("resume with:\n  {resume}");
    if cli.output == Output::Json {
        print_json(summary, true, Some(resume));
    }
    signal.unwrap_or(INTERRUPTED)
}

fn key_text(key: &[String]) -> String {
    format!("({})", key.join(", "))
}

fn so_far(s: &Summary) -> String {
    format!(
        "Backfill {}: {} rows updated in {} batches so far{}.",
        s.name,
        s.rows_updated,
        s.batches,
        s.last_key
            .as_deref()
            .map(|k| format!(", up to key {}", key_text(k)))
            .unwrap_or_default()
    )
}

fn print_json(s: &Summary, interrupted: bool, resume: Option<&str>) {
    let mut v = json!({
        "name": s.name,
        "table": s.table,
        "key_columns": s.key_columns,
        "rows_updated": s.rows_updated,
        "rows_examined": s.rows_examined,
        "batches": s.batches,
        "done": s.done,
        "last_key": s.last_key,
        "rows_updated_this_run": s.rows_updated_this_run,
        "batches_this_run": s.batches_this_run,
        "interrupted": interrupted,
    });
    if let Some(r) = resume {
        v["resume"] = json!(r);
    }
    println!("{v}");
}

fn announce(s: &Started, batch: u32, sleep: Duration) {
    let keys = s.key_columns.join(", ");
    let rows = s
        .estimated_rows
        .map_or_else(|| "unknown number of".to_string(), |n| format!("~{n}"));
    let pause = if sleep.is_zero() {
        String::new()
    } else {
        format!(", {} between batches", format_duration(sleep))
    };
    let what = format!(
        "{} ({rows} rows) by ({keys}) in batches of {batch}{pause}; progress in {}.{}",
        s.table,
        s.progress_schema,
        belay_backfill::PROGRESS_TABLE
    );
    match &s.start {
        Start::Fresh => eprintln!("backfill {}: {what}", s.name),
        Start::Restarted => eprintln!(
            "backfill {}: restarting from the first key (--restart): {what}",
            s.name
        ),
        Start::Resuming {
            last_key: Some(k),
            rows_updated,
            batches,
        } => eprintln!(
            "resuming backfill {} after key {}: {rows_updated} rows updated in {batches} batches so far; {what}",
            s.name,
            key_text(k)
        ),
        Start::Resuming { last_key: None, .. } => eprintln!(
            "resuming backfill {} from the first key (no batch had committed): {what}",
            s.name
        ),
        Start::AlreadyDone { .. } => {}
    }
}

/// `sh` quoting: bare when safe, single quotes otherwise.
fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Local mode's connection and configuration flags given on the command line (the URL
/// redacted; environment variables are not repeated, the resuming shell has them).
fn local_flags(cli: &Cli, url_from_argv: bool, url: &DatabaseUrl) -> Vec<(&'static str, String)> {
    let mut w = Vec::new();
    if url_from_argv {
        w.push(("--url", url.redacted().to_string()));
    }
    if let Some(p) = &cli.url_file {
        w.push(("--url-file", p.to_string_lossy().into_owned()));
    }
    if let Some(p) = &cli.config {
        w.push(("--config", p.to_string_lossy().into_owned()));
    }
    if let Some(s) = &cli.history_schema {
        w.push(("--history-schema", s.clone()));
    }
    w
}

/// Remote mode's: the controller and the target always (either may have come from the
/// environment, and resuming elsewhere must reach the same backfill), the TLS and token
/// files when given.
fn remote_flags(cli: &Cli, target: &str) -> Vec<(&'static str, String)> {
    let mut w = Vec::new();
    if let Some(c) = &cli.controller {
        w.push(("--controller", c.clone()));
    }
    w.push(("--target", target.to_string()));
    if let Some(p) = &cli.ca {
        w.push(("--ca", p.to_string_lossy().into_owned()));
        w.push(("--tls-server-name", cli.tls_server_name.clone()));
    }
    if let Some(p) = &cli.token_file {
        w.push(("--token-file", p.to_string_lossy().into_owned()));
    }
    w
}

/// The command that continues this backfill: its own flags after the connection flags.
fn resume_command(
    cli: &Cli,
    args: &BackfillArgs,
    name: &str,
    connection: &[(&'static str, String)],
) -> String {
    let mut w: Vec<String> = vec!["belay".into()];
    for (f, v) in connection {
        w.push((*f).into());
        w.push(v.clone());
    }
    if cli.output == Output::Json {
        w.push("--output".into());
        w.push("json".into());
    }
    let mut rest = vec![
        ("--table", Some(args.table.clone())),
        ("--set", Some(args.set.clone())),
        ("--where", args.filter.clone()),
        ("--batch", Some(args.batch.to_string())),
        ("--sleep", args.sleep.clone()),
        ("--lock-timeout", args.lock_timeout.clone()),
        ("--statement-timeout", args.statement_timeout.clone()),
        ("--max-attempts", args.max_attempts.map(|n| n.to_string())),
        ("--max-lock-wait", args.max_lock_wait.clone()),
    ];
    rest.push(("--name", Some(name.to_string())));
    let mut out = w.into_iter().map(|s| shell_quote(&s)).collect::<Vec<_>>();
    out.push("backfill".into());
    for (f, v) in rest {
        if let Some(v) = v {
            out.push(f.into());
            out.push(shell_quote(&v));
        }
    }
    out.join(" ")
}

/// First SIGINT/SIGTERM: cancel the token (stop between batches). Second: resolve
/// [`StopSignals::second`] (abandon the batch in flight).
struct StopSignals {
    token: CancellationToken,
    code: std::sync::Arc<AtomicU8>,
    second: tokio::sync::oneshot::Receiver<()>,
}

impl StopSignals {
    fn install() -> Result<Self, Failure> {
        use tokio::signal::unix::{SignalKind, signal};
        let cannot = |e: std::io::Error| Failure {
            code: exit::SOFTWARE,
            message: format!("cannot install signal handlers: {e}"),
        };
        let mut int = signal(SignalKind::interrupt()).map_err(cannot)?;
        let mut term = signal(SignalKind::terminate()).map_err(cannot)?;
        let token = CancellationToken::new();
        let code = std::sync::Arc::new(AtomicU8::new(0));
        let (tx, second) = tokio::sync::oneshot::channel();
        let (t, c) = (token.clone(), code.clone());
        tokio::spawn(async move {
            let got = tokio::select! {
                _ = int.recv() => INTERRUPTED,
                _ = term.recv() => TERMINATED,
            };
            c.store(got, Ordering::SeqCst);
            t.cancel();
            // On a terminal the progress bar's line is still open.
            let newline = if std::io::stderr().is_terminal() {
                "\n"
            } else {
                ""
            };
            eprintln!(
                "{newline}stopping after the batch in flight commits (press Ctrl-C again to roll it back and stop now)"
            );
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            let _ = tx.send(());
        });
        Ok(StopSignals {
            token,
            code,
            second,
        })
    }

    async fn second(&mut self) {
        if (&mut self.second).await.is_err() {
            // The signal task is gone: no second signal can come.
            std::future::pending::<()>().await;
        }
    }

    fn code(&self) -> Option<u8> {
        match self.code.load(Ordering::SeqCst) {
            0 => None,
            c => Some(c),
        }
    }
}

/// Progress on stderr: a bar on a terminal, otherwise a plain line for the first batch, at
/// most one a second after that, and the last.
struct Printer {
    tty: bool,
    name: String,
    estimate: Option<u64>,
    started: Instant,
    examined_before: u64,
    state: Mutex<PrinterState>,
}

struct PrinterState {
    last_line: Option<Instant>,
    bar_drawn: bool,
}

impl Printer {
    fn new(s: &Started) -> Self {
        Printer {
            tty: std::io::stderr().is_terminal(),
            name: s.name.clone(),
            estimate: s.estimated_rows,
            started: Instant::now(),
            examined_before: s.rows_examined,
            state: Mutex::new(PrinterState {
                last_line: None,
                bar_drawn: false,
            }),
        }
    }

    fn show(&self, p: &Progress) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut err = std::io::stderr().lock();
        match p {
            Progress::LockRetry {
                batch,
                attempt,
                backoff,
                sqlstate,
            } => {
                let why = match sqlstate.as_str() {
                    "40P01" => "chosen as a deadlock victim",
                    "40001" => "a row it updates was changed by another transaction meanwhile",
                    _ => "a row lock was not granted within lock_timeout",
                };
                if st.bar_drawn {
                    let _ = write!(err, "\r\x1b[K");
                    st.bar_drawn = false;
                }
                let _ = writeln!(
                    err,
                    "  batch {batch}: {why} (attempt {attempt}); rolled back, application writes go first; retrying in {} ms",
                    backoff.as_millis()
                );
            }
            Progress::Batch(b) => {
                let secs = self.started.elapsed().as_secs_f64().max(0.001);
                let rate = (b.total_examined.saturating_sub(self.examined_before)) as f64 / secs;
                let total = self.estimate.map(|e| e.max(b.total_examined));
                let pct = |t: u64| {
                    if b.finished {
                        100
                    } else {
                        (b.total_examined * 100).checked_div(t).unwrap_or(0).min(99)
                    }
                };
                if self.tty {
                    let width = 24u64;
                    let filled = total.map_or(0, |t| pct(t) * width / 100);
                    let eta = match total {
                        Some(t) if rate > 0.0 && !b.finished => format!(
                            " · ~{} left",
                            format_duration(Duration::from_secs(
                                (t.saturating_sub(b.total_examined) as f64 / rate) as u64
                            ))
                        ),
                        _ => String::new(),
                    };
                    let _ = write!(
                        err,
                        "\r\x1b[K{} [{}{}] {}/{} rows{} · {} updated · {:.0} rows/s{eta}",
                        self.name,
                        "#".repeat(filled as usize),
                        " ".repeat((width - filled) as usize),
                        b.total_examined,
                        total.map_or_else(|| "?".to_string(), |t| format!("~{t}")),
                        total.map(|t| format!(" ({}%)", pct(t))).unwrap_or_default(),
                        b.total_updated,
                        rate
                    );
                    let _ = err.flush();
                    st.bar_drawn = true;
                    return;
                }
                let due = st
                    .last_line
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                if due || b.finished {
                    st.last_line = Some(Instant::now());
                    let _ = writeln!(
                        err,
                        "backfill {}: batch {}: {}{} rows examined{}, {} updated, up to key {}, {:.0} rows/s",
                        self.name,
                        b.batch,
                        b.total_examined,
                        total.map(|t| format!("/~{t}")).unwrap_or_default(),
                        total.map(|t| format!(" ({}%)", pct(t))).unwrap_or_default(),
                        b.total_updated,
                        key_text(&b.last_key),
                        rate
                    );
                }
            }
        }
    }

    /// Ends the bar's line so what follows starts on its own.
    fn end_bar(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.bar_drawn {
            eprintln!();
            st.bar_drawn = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_survives_sql() {
        assert_eq!(shell_quote("orders"), "orders");
        assert_eq!(shell_quote("public.orders"), "public.orders");
        assert_eq!(shell_quote("total = price * qty"), "'total = price * qty'");
        assert_eq!(
            shell_quote("note = 'it''s'"),
            r"'note = '\''it'\'''\''s'\'''"
        );
        assert_eq!(shell_quote(""), "''");
    }
}
