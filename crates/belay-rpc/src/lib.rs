//! The gRPC edge of belay's capabilities: conversions between protobuf messages and the
//! engine's domain types (in one place, `convert`), a tonic server adapter serving any
//! [`belay_migrate::MigrationApi`], and a client implementing that same trait over gRPC.
//! Wiring decides in-process or remote; callers see one trait. It must hold no migration
//! logic of its own and must never carry a database URL over the wire.

pub mod backfill;
pub mod backup;
pub mod client;
pub mod convert;
pub mod daemon;
pub mod deploy;
pub mod health;
pub mod inflight;
pub mod locks;
pub mod rollback;
pub mod server;
pub mod stream;

pub use backfill::{BackfillClient, BackfillGrpc};
pub use backup::{BackupClient, BackupGrpc};
pub use client::{Connection, Keepalive, MigrationClient, Peer};
pub use deploy::{DeployClient, DeployGrpc};
pub use health::{HealthClient, HealthGrpc};
pub use inflight::InFlight;
pub use locks::{LockMonitorClient, LockMonitorGrpc};
pub use rollback::{RollbackClient, RollbackGrpc};
pub use server::MigrationGrpc;

/// Metadata key carrying an error's machine-readable class (`ErrorReason` name).
pub const REASON_KEY: &str = "belay-reason";
