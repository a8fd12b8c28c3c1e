//! `cargo xtask`: the project's automation (checks, demo, benchmarks), in Rust so it runs
//! the same on every machine and in CI.

mod bench;
mod bench_backup;
mod bench_corpus;
mod bench_deploy;
mod bench_fleet;
mod bench_fleet_steps;
mod bench_locks;
mod bench_probes;
mod bench_restore;
mod bench_rollback;
mod check;
mod demo;
mod monitoring_tools;
mod pg;
mod tools;
mod util;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "belay project automation")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install PostgreSQL and the checkers of deploy/ if missing, then fmt check, clippy, tidy,
    /// `cargo test --workspace` and the demo (`cargo xtask demo`, its steps checked).
    Test,
    /// fmt check, clippy (warnings are errors) and the tidy checks.
    Lint,
    /// Only the tidy checks (`//!` atop every lib.rs; no todo/unimplemented/ignored tests).
    Tidy,
    /// The whole story on a throwaway cluster, through a real controller and agent: a
    /// deployment, a lock-guard save, a bad release rolled back by undo with its incident
    /// report, the dropped data brought back. Exits non-zero when a step does not end as
    /// the story says (`cargo xtask test` runs it last).
    Demo,
    /// Benchmarks against throwaway clusters (release build of `belay`).
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Migration runner overhead: `belay migrate` vs. one psql session doing the same work,
    /// on generated migrations, examples/ and real corpora (up and down), with a breakdown
    /// of what each side sends per migration.
    Runner {
        /// Interleaved repetitions per side, each on a fresh database.
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Number of generated migrations.
        #[arg(long, default_value_t = 500)]
        migrations: usize,
        /// Benchmark this `belay` binary instead of building target/release/belay.
        #[arg(long)]
        belay_bin: Option<PathBuf>,
        /// A real project's migrations (the corpus dir or its `migrations` folder), applied
        /// and reverted; repeatable [default: $BENCH_HOME/corpus/kratos and lemmy-0.19.20,
        /// BENCH_HOME=/tmp/belay-bench, skipped with a note when absent]; with
        /// BENCH_KEEP_LOG=DIR the breakdown runs' server logs are kept there
        #[arg(long, value_name = "DIR")]
        corpus: Vec<PathBuf>,
    },
    /// Each step of a local `belay migrate` deployment (lint, preflight, full backup, lock
    /// guard, postflight with an assertion, a short --watch) from its recorded transition
    /// timestamps, vs. one psql session applying the same scripts; also with steps off.
    Deploy {
        /// Interleaved repetitions per side, each on a fresh database.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// A real project's migrations directory [default:
        /// /tmp/belay-bench/corpus/kratos/migrations, skipped when absent]
        #[arg(long, value_name = "DIR")]
        corpus: Option<PathBuf>,
        /// Benchmark this `belay` binary instead of building target/release/belay.
        #[arg(long)]
        belay_bin: Option<PathBuf>,
    },
    /// Application latency under pgbench while an ALTER TABLE waits behind a long
    /// transaction (no migration vs. naive psql vs. `belay migrate`), how fast the lock
    /// monitor reports a queued ALTER, and what its sampling costs pgbench.
    #[command(alias = "lock")]
    Locks {
        /// pgbench duration in seconds for each latency run.
        #[arg(long, default_value_t = 12)]
        seconds: u64,
        /// Queued ALTERs the monitor must report, for its latency.
        #[arg(long, default_value_t = 10)]
        trials: usize,
        /// Seconds of each unthrottled pgbench run for the monitor's overhead.
        #[arg(long, default_value_t = 8)]
        overhead_secs: u64,
        /// Runs of scenario (b) for belay and the retry script each (interleaved): whether
        /// it lands in 2 attempts is chance, counted over the runs.
        #[arg(long, default_value_t = 1)]
        row_lock_runs: usize,
        /// Benchmark this `belay` binary instead of building target/release/belay.
        #[arg(long)]
        belay_bin: Option<PathBuf>,
    },
    /// A 3-migration deploy to many tenant databases through controller + agent vs.
    /// local-mode `belay migrate` on each in turn; then the controller's CPU and memory
    /// with many simulated agents heartbeating every second.
    Fleet {
        /// Tenant databases (targets) per side.
        #[arg(long, default_value_t = 200)]
        tenants: usize,
        /// Targets the deploy migrates at once within a wave.
        #[arg(long, default_value_t = 8)]
        parallel: u32,
        /// The agent's `[limits] max_connections_per_server` (its default: 10).
        #[arg(long, default_value_t = 10)]
        budget: u32,
        /// Skip preflight on both sides (`deploy --no-preflight`, `migrate
        /// --no-preflight`); by default both run it, as both commands do.
        #[arg(long)]
        no_preflight: bool,
        /// Simulated agents in the heartbeat bench.
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        /// Length of the heartbeat bench's measured window, in seconds.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Take belay, belay-agent and belay-controller from this directory instead of
        /// building them in release mode.
        #[arg(long)]
        bin_dir: Option<PathBuf>,
    },
    /// belay backup create/verify/restore vs. raw pg_dump/pg_restore on a pgbench database.
    Backup {
        /// pgbench scale factor (60 is about 1 GB).
        #[arg(long, default_value_t = 60)]
        scale: u32,
        /// Interleaved repetitions of every comparison.
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// Time from a probe crossing its threshold (period 1 s, threshold 3) to the verified
    /// end of the undo rollback `migrate --on-failure rollback` runs.
    Rollback {
        /// Repetitions, each on a fresh database.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Benchmark this `belay` binary instead of building target/release/belay.
        #[arg(long)]
        belay_bin: Option<PathBuf>,
    },
    /// Table restore of one large table: `belay backup restore --tables` (a rollback's
    /// `table_restore`) vs. `TRUNCATE` + `pg_restore --data-only -t` by hand, interleaved.
    Restore {
        /// Heap size of the generated table, in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mb: u64,
        /// Interleaved repetitions per side.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Benchmark this `belay` binary instead of building target/release/belay.
        #[arg(long)]
        belay_bin: Option<PathBuf>,
    },
    /// Time from an HTTP endpoint starting to fail to the probe's trigger event.
    Probes {
        /// Repetitions, each switching at a different phase of the probe period.
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Probe period in milliseconds.
        #[arg(long, default_value_t = 1000)]
        period_ms: u64,
        /// Consecutive failures that trigger.
        #[arg(long, default_value_t = 3)]
        threshold: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Printed here rather than returned from main: a returned anyhow error prints a
    // backtrace when RUST_BACKTRACE is set, which buries the one line that matters.
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("\nerror: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> anyhow::Result<()> {
    match task {
        Task::Test => check::test(),
        Task::Lint => check::lint(),
        Task::Tidy => check::tidy_step(),
        Task::Demo => demo::run(),
        Task::Bench { which } => match which {
            Bench::Runner {
                reps,
                migrations,
                belay_bin,
                corpus,
            } => bench::runner(reps, migrations, belay_bin, corpus),
            Bench::Deploy {
                reps,
                corpus,
                belay_bin,
            } => bench_deploy::deploy(reps, corpus, belay_bin),
            Bench::Locks {
                seconds,
                trials,
                overhead_secs,
                row_lock_runs,
                belay_bin,
            } => bench_locks::locks(seconds, trials, overhead_secs, row_lock_runs, belay_bin),
            Bench::Fleet {
                tenants,
                parallel,
                budget,
                no_preflight,
                agents,
                seconds,
                bin_dir,
            } => bench_fleet::fleet(
                tenants,
                agents,
                seconds,
                parallel,
                budget,
                no_preflight,
                bin_dir,
            ),
            Bench::Backup { scale, reps } => bench_backup::backup(scale, reps),
            Bench::Probes {
                reps,
                period_ms,
                threshold,
            } => bench_probes::probes(reps, period_ms, threshold),
            Bench::Rollback { reps, belay_bin } => bench_rollback::rollback(reps, belay_bin),
            Bench::Restore {
                size_mb,
                reps,
                belay_bin,
            } => bench_restore::restore(size_mb, reps, belay_bin),
        },
    }
}
