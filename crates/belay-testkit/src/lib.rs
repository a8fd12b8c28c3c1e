//! Test support for belay: throwaway PostgreSQL clusters on free ports, fresh databases,
//! and the `psql`/`pg_dump` helpers tests use to inspect them. It owns starting real
//! PostgreSQL servers (as the `postgres` OS user when run as root) and cleaning them up on
//! `Drop`, at process exit, or — as a backstop — when the test process dies. It never
//! touches a server it did not start (such as the service on 127.0.0.1:5432) and must not
//! ship in binaries: only dev-dependencies and `xtask` may depend on it.

mod bins;
mod cluster;
mod error;
mod os;
pub mod pki;
mod template;
mod tools;

pub use bins::{BINDIR_ENV, bin_dir};
pub use cluster::{Cluster, TestDb};
pub use error::Error;
pub use tools::{dump_schema, psql};

/// Whether the current process runs as root (effective uid 0). When it does, PostgreSQL
/// processes are started as the `postgres` OS user.
pub fn running_as_root() -> bool {
    os::euid() == 0
}
