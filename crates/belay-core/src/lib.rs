//! Shared vocabulary of belay: migration versions and their ordering, script checksums,
//! database URLs that redact their password wherever they are shown, human durations, and the
//! error type every capability API returns (`ApiError`), and the per-server budget of
//! connections (`ConnectionBudget`: counting only), and Nagle's algorithm off on the
//! process's sockets (`send_without_delay`, for sqlx 0.9.0's connections).
//! It owns parsing and display of these values and nothing else: it must not talk to a
//! database, read migration directories, or depend on any other belay crate.

mod api;
mod budget;
mod checksum;
mod duration;
mod net;
mod url;
mod version;

pub use api::{ApiError, ErrorKind};
pub use budget::{
    ConnectionBudget, DEFAULT_CONNECTIONS_PER_SERVER, Reservation, SLOW_WAIT as BUDGET_SLOW_WAIT,
};
pub use checksum::Checksum;
pub use duration::{DurationError, format_duration, parse_duration};
pub use net::send_without_delay;
pub use url::{DatabaseUrl, UrlError, redact_url};
pub use version::{Version, VersionError};
