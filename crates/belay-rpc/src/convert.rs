//! protobuf ↔ domain conversions. Decoding validates: a message that cannot become a
//! domain value is an `invalid_argument` status (server side) or an internal error
//! (client side), never a panic.

use crate::client::Peer;
use belay_history::EntryType;
use belay_migrate::directives::{Directives, NoTransactionSource};
use belay_migrate::{
    ApiError, ApplyOptions, CheckOverride, Direction, ErrorKind, Event, EventKind, MigrationStatus,
    PlanStepView, PlanView, RepairAction, RunReport, RunnerHolder, State, StepResult, Target,
    UndoTarget, Validation,
};
use belay_proto::v1 as pb;
use chrono::{DateTime, TimeZone, Utc};
use std::time::Duration;
use tonic::{Code, Status};
use uuid::Uuid;

/// A message that does not decode into a domain value.
#[derive(Debug, thiserror::Error)]
#[error("malformed {what} in a belay.v1 message: {problem}")]
pub struct DecodeError {
    pub what: &'static str,
    pub problem: String,
}

fn bad(what: &'static str, problem: impl Into<String>) -> DecodeError {
    DecodeError {
        what,
        problem: problem.into(),
    }
}

impl From<DecodeError> for Status {
    fn from(e: DecodeError) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

impl From<DecodeError> for ApiError {
    fn from(e: DecodeError) -> Self {
        ApiError::new(ErrorKind::Internal, e.to_string())
    }
}

/// A protobuf `Struct` (event payloads, outcomes) as JSON, for rendering.
pub fn struct_to_json(s: &prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        // Whole numbers (counts, seqs, ms) come back as integers, as they were sent.
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9.0e15 => {
            serde_json::json!(*n as i64)
        }
        Some(Kind::NumberValue(n)) => serde_json::json!(n),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.iter().map(value_to_json).collect())
        }
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn from_timestamp(t: &prost_types::Timestamp) -> Result<DateTime<Utc>, DecodeError> {
    Utc.timestamp_opt(t.seconds, t.nanos.max(0) as u32)
        .single()
        .ok_or_else(|| {
            bad(
                "timestamp",
                format!("{}s {}ns is out of range", t.seconds, t.nanos),
            )
        })
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

// ---- targets ----

/// The `Target` message naming `name`.
pub(crate) fn target(name: &str) -> Option<pb::Target> {
    Some(pb::Target {
        name: name.to_string(),
    })
}

/// The target a request names, refused when it names none.
pub(crate) fn target_name(t: Option<&pb::Target>) -> Result<String, Status> {
    t.map(|t| t.name.trim().to_string())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Status::invalid_argument("the request names no target: pass --target NAME"))
}

/// A server stream that ended, or broke, before its final message: the outcome of the
/// operation on the agent is unknown, and `check` says where to look.
pub(crate) fn stream_cut_short(
    result: Result<(), &Status>,
    peer: &Peer,
    what: &str,
    check: &str,
) -> ApiError {
    match result {
        Ok(()) => ApiError::new(
            ErrorKind::AgentUnreachable,
            format!("{peer} ended the {what} without a result: the outcome is unknown; {check}"),
        ),
        Err(s) => {
            let mut e = api_error_from(s, peer);
            if e.kind == ErrorKind::AgentUnreachable {
                e.message = format!(
                    "{} (the connection broke mid-{what}: the outcome is unknown; {check})",
                    e.message
                );
            }
            e
        }
    }
}

// ---- errors ----

pub(crate) fn reason_of(kind: ErrorKind) -> pb::ErrorReason {
    match kind {
        ErrorKind::InvalidSource => pb::ErrorReason::InvalidSource,
        ErrorKind::Unavailable => pb::ErrorReason::DatabaseUnavailable,
        ErrorKind::MigrationFailed => pb::ErrorReason::MigrationFailed,
        ErrorKind::Refused => pb::ErrorReason::Refused,
        ErrorKind::Busy => pb::ErrorReason::Busy,
        ErrorKind::Internal => pb::ErrorReason::Internal,
        ErrorKind::UnknownTarget => pb::ErrorReason::UnknownTarget,
        ErrorKind::AgentUnreachable => pb::ErrorReason::AgentUnreachable,
        ErrorKind::Unauthenticated => pb::ErrorReason::Unspecified,
        ErrorKind::InvalidArgument => pb::ErrorReason::InvalidArgument,
        ErrorKind::NotFound => pb::ErrorReason::NotFound,
        ErrorKind::OutOfSpace => pb::ErrorReason::OutOfSpace,
    }
}

pub(crate) fn kind_of(reason: pb::ErrorReason) -> Option<ErrorKind> {
    Some(match reason {
        pb::ErrorReason::InvalidSource => ErrorKind::InvalidSource,
        pb::ErrorReason::DatabaseUnavailable => ErrorKind::Unavailable,
        pb::ErrorReason::MigrationFailed => ErrorKind::MigrationFailed,
        pb::ErrorReason::Refused => ErrorKind::Refused,
        pb::ErrorReason::Busy => ErrorKind::Busy,
        pb::ErrorReason::Internal => ErrorKind::Internal,
        pb::ErrorReason::UnknownTarget => ErrorKind::UnknownTarget,
        pb::ErrorReason::AgentUnreachable => ErrorKind::AgentUnreachable,
        pb::ErrorReason::InvalidArgument => ErrorKind::InvalidArgument,
        pb::ErrorReason::NotFound => ErrorKind::NotFound,
        pb::ErrorReason::OutOfSpace => ErrorKind::OutOfSpace,
        pb::ErrorReason::Unspecified => return None,
    })
}

/// An engine failure as a gRPC status: the code for generic clients, the reason in
/// metadata for belay's own, the human message as is.
pub fn status_from(e: &ApiError) -> Status {
    let code = match e.kind {
        ErrorKind::InvalidSource | ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::Unavailable | ErrorKind::AgentUnreachable => Code::Unavailable,
        ErrorKind::MigrationFailed => Code::Aborted,
        ErrorKind::Refused => Code::FailedPrecondition,
        ErrorKind::Busy | ErrorKind::OutOfSpace => Code::ResourceExhausted,
        ErrorKind::Internal => Code::Internal,
        ErrorKind::UnknownTarget | ErrorKind::NotFound => Code::NotFound,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
    };
    let mut status = Status::new(code, e.message.clone());
    if let Ok(v) = reason_of(e.kind).as_str_name().parse() {
        status.metadata_mut().insert(crate::REASON_KEY, v);
    }
    status
}

/// A gRPC status back into the engine's terms. A status without belay's reason came from
/// the transport or a proxy: its typed error chain ([`transport_failure`]) says what broke
/// (nothing listening, the peer speaking TLS or not, a refused certificate), and the
/// message says what to do about it.
pub fn api_error_from(status: &Status, peer: &Peer) -> ApiError {
    let reason = status
        .metadata()
        .get(crate::REASON_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(pb::ErrorReason::from_str_name)
        .and_then(kind_of);
    if let Some(kind) = reason {
        return ApiError::new(kind, status.message());
    }
    if let Some(failure) = transport_failure(status) {
        return ApiError::new(
            ErrorKind::AgentUnreachable,
            format!("cannot reach {peer}: {}", failure.explain(peer.tls())),
        );
    }
    let (kind, message) = match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => (
            ErrorKind::AgentUnreachable,
            format!("cannot reach {peer}: {}", status.message()),
        ),
        Code::Unauthenticated | Code::PermissionDenied => (
            ErrorKind::Unauthenticated,
            format!("{peer} refused the call: {}", status.message()),
        ),
        Code::NotFound => (ErrorKind::UnknownTarget, status.message().to_string()),
        Code::InvalidArgument => (ErrorKind::InvalidSource, status.message().to_string()),
        Code::FailedPrecondition => (ErrorKind::Refused, status.message().to_string()),
        Code::Aborted => (ErrorKind::MigrationFailed, status.message().to_string()),
        Code::ResourceExhausted => (ErrorKind::Busy, status.message().to_string()),
        _ => (ErrorKind::Internal, format!("{peer}: {}", status.message())),
    };
    ApiError::new(kind, message)
}

/// What broke below gRPC, read from the typed source chain of a status (tonic's transport
/// error, hyper's, h2's, `std::io::Error` kinds, rustls' errors), never from its words.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportFailure {
    /// Nothing listens at the address (connection refused).
    Refused,
    /// The network did not lead there (host or network unreachable, address unavailable).
    Unreachable(std::io::ErrorKind),
    /// Connecting or a call timed out.
    TimedOut,
    /// We spoke TLS and the peer answered in plaintext: it does not speak TLS.
    PeerNotTls,
    /// The peer's certificate was refused (unknown CA, wrong name, expired): rustls' words.
    CertificateRefused(String),
    /// Another TLS failure (an alert from the peer, say because it wants a client
    /// certificate): rustls' words.
    Tls(String),
    /// The peer broke the HTTP/2 protocol (an h2 protocol or frame error): it speaks
    /// something else — over plaintext, most likely TLS.
    NotHttp2,
    /// The peer closed or reset the connection before answering.
    Closed,
    /// Another I/O failure.
    Io(std::io::ErrorKind),
}

impl TransportFailure {
    /// What happened and what to do, knowing whether we spoke TLS.
    pub fn explain(&self, we_spoke_tls: bool) -> String {
        const PASS_CA: &str = "pass --ca FILE (the CA certificate that signed its certificate), \
             and --tls-server-name NAME when its certificate is issued for another name than \
             the address";
        match self {
            TransportFailure::Refused => {
                "connection refused: nothing listens at that address (is it running? is the \
                 address right?)"
                    .to_string()
            }
            TransportFailure::Unreachable(kind) => {
                format!("the network does not lead there ({kind}); check the address and the network")
            }
            TransportFailure::TimedOut => "timed out; check the address and the network".to_string(),
            TransportFailure::PeerNotTls => {
                "it does not speak TLS (it answered a TLS handshake in plaintext): leave out --ca \
                 to call it without TLS, or start it with its TLS certificate and key"
                    .to_string()
            }
            TransportFailure::CertificateRefused(why) => format!(
                "its TLS certificate was refused ({why}): {PASS_CA}"
            ),
            TransportFailure::Tls(why) => format!(
                "the TLS handshake failed ({why}): it may require a client certificate from \
                 its CA, or refuse the one presented"
            ),
            TransportFailure::NotHttp2 | TransportFailure::Closed if !we_spoke_tls => format!(
                "it speaks TLS and this call did not (it {} a plaintext HTTP/2 handshake): {PASS_CA}",
                if *self == TransportFailure::NotHttp2 { "broke off" } else { "closed the connection on" }
            ),
            TransportFailure::NotHttp2 => {
                "it does not speak gRPC over HTTP/2 behind TLS (h2 protocol error); check the address"
                    .to_string()
            }
            TransportFailure::Closed => {
                "it closed the connection during the TLS handshake: it may require a client \
                 certificate from its CA, or refuse the one presented"
                    .to_string()
            }
            // With TLS on our side, data the TLS layer could not accept: the peer's alert
            // after our handshake (an mTLS server refusing a missing or foreign client
            // certificate) can arrive as this rather than as the alert, depending on timing.
            TransportFailure::Io(std::io::ErrorKind::InvalidData) if we_spoke_tls => {
                "the TLS session failed (invalid data): it may require a client certificate \
                 from its CA, or refuse the one presented"
                    .to_string()
            }
            TransportFailure::Io(kind) => format!("I/O error ({kind})"),
        }
    }
}

/// Reads the typed cause of a transport failure out of `status`'s source chain; `None`
/// when the status has no transport cause (it came from the peer itself).
pub fn transport_failure(status: &Status) -> Option<TransportFailure> {
    use std::error::Error as _;
    let mut found = None;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = status.source().map(|e| e as _);
    while let Some(e) = cur {
        let here = if let Some(io) = e.downcast_ref::<std::io::Error>() {
            // rustls' errors travel inside an `io::Error`, whose `source` skips them.
            match io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                Some(tls) => Some(from_rustls(tls)),
                None => Some(from_io(io.kind())),
            }
        } else if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            Some(from_rustls(tls))
        } else if let Some(h2) = e.downcast_ref::<h2::Error>() {
            // An h2 error wrapping I/O is classified by the I/O error below it.
            (!h2.is_io()).then_some(TransportFailure::NotHttp2)
        } else if let Some(hyper) = e.downcast_ref::<hyper::Error>() {
            if hyper.is_timeout() {
                Some(TransportFailure::TimedOut)
            } else if hyper.is_canceled() || hyper.is_closed() || hyper.is_incomplete_message() {
                Some(TransportFailure::Closed)
            } else {
                None
            }
        } else {
            None
        };
        // The deepest typed cause is the most precise (hyper's "closed" wraps io's
        // "refused"); keep looking.
        if here.is_some() {
            found = here;
        }
        cur = e.source();
    }
    found
}

fn from_io(kind: std::io::ErrorKind) -> TransportFailure {
    use std::io::ErrorKind as K;
    match kind {
        K::ConnectionRefused => TransportFailure::Refused,
        K::TimedOut => TransportFailure::TimedOut,
        K::HostUnreachable | K::NetworkUnreachable | K::AddrNotAvailable | K::NotFound => {
            TransportFailure::Unreachable(kind)
        }
        K::BrokenPipe | K::ConnectionReset | K::ConnectionAborted | K::UnexpectedEof => {
            TransportFailure::Closed
        }
        other => TransportFailure::Io(other),
    }
}

fn from_rustls(e: &rustls::Error) -> TransportFailure {
    match e {
        rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType) => {
            TransportFailure::PeerNotTls
        }
        rustls::Error::InvalidCertificate(_) => TransportFailure::CertificateRefused(e.to_string()),
        other => TransportFailure::Tls(other.to_string()),
    }
}

// ---- enums ----

fn entry_type(t: EntryType) -> pb::MigrationType {
    match t {
        EntryType::Sql => pb::MigrationType::Sql,
        EntryType::UndoSql => pb::MigrationType::UndoSql,
        EntryType::Repeatable => pb::MigrationType::Repeatable,
        EntryType::Baseline => pb::MigrationType::Baseline,
        EntryType::Adopted => pb::MigrationType::Adopted,
    }
}

fn entry_type_from(t: i32) -> Result<EntryType, DecodeError> {
    Ok(match pb::MigrationType::try_from(t) {
        Ok(pb::MigrationType::Sql) => EntryType::Sql,
        Ok(pb::MigrationType::UndoSql) => EntryType::UndoSql,
        Ok(pb::MigrationType::Repeatable) => EntryType::Repeatable,
        Ok(pb::MigrationType::Baseline) => EntryType::Baseline,
        Ok(pb::MigrationType::Adopted) => EntryType::Adopted,
        _ => return Err(bad("migration type", format!("unknown value {t}"))),
    })
}

fn state(s: State) -> pb::MigrationState {
    match s {
        State::Success => pb::MigrationState::Success,
        State::Pending => pb::MigrationState::Pending,
        State::Failed => pb::MigrationState::Failed,
        State::Running => pb::MigrationState::Running,
        State::Missing => pb::MigrationState::Missing,
        State::Future => pb::MigrationState::Future,
        State::Undone => pb::MigrationState::Undone,
        State::ChecksumMismatch => pb::MigrationState::ChecksumMismatch,
        State::Baseline => pb::MigrationState::Baseline,
    }
}

fn state_from(s: i32) -> Result<State, DecodeError> {
    Ok(match pb::MigrationState::try_from(s) {
        Ok(pb::MigrationState::Success) => State::Success,
        Ok(pb::MigrationState::Pending) => State::Pending,
        Ok(pb::MigrationState::Failed) => State::Failed,
        Ok(pb::MigrationState::Running) => State::Running,
        Ok(pb::MigrationState::Missing) => State::Missing,
        Ok(pb::MigrationState::Future) => State::Future,
        Ok(pb::MigrationState::Undone) => State::Undone,
        Ok(pb::MigrationState::ChecksumMismatch) => State::ChecksumMismatch,
        Ok(pb::MigrationState::Baseline) => State::Baseline,
        _ => return Err(bad("migration state", format!("unknown value {s}"))),
    })
}

pub fn direction(d: Direction) -> pb::Direction {
    match d {
        Direction::Forward => pb::Direction::Forward,
        Direction::Undo => pb::Direction::Undo,
        Direction::Repeatable => pb::Direction::Repeatable,
    }
}

fn direction_from(d: i32) -> Result<Direction, DecodeError> {
    Ok(match pb::Direction::try_from(d) {
        Ok(pb::Direction::Forward) => Direction::Forward,
        Ok(pb::Direction::Undo) => Direction::Undo,
        Ok(pb::Direction::Repeatable) => Direction::Repeatable,
        _ => return Err(bad("direction", format!("unknown value {d}"))),
    })
}

fn no_tx_name(s: NoTransactionSource) -> &'static str {
    match s {
        NoTransactionSource::Directive => "directive",
        NoTransactionSource::Sqlx => "sqlx",
        NoTransactionSource::FlywayConf => "flyway_conf",
        NoTransactionSource::DieselMetadata => "diesel_metadata",
        NoTransactionSource::OwnTransactionControl => "own_transaction_control",
        NoTransactionSource::GooseNoTransaction => "goose_no_transaction",
        NoTransactionSource::DbmateTransactionFalse => "dbmate_transaction_false",
    }
}

fn no_tx_from(s: &str) -> Result<Option<NoTransactionSource>, DecodeError> {
    Ok(Some(match s {
        "" => return Ok(None),
        "directive" => NoTransactionSource::Directive,
        "sqlx" => NoTransactionSource::Sqlx,
        "flyway_conf" => NoTransactionSource::FlywayConf,
        "diesel_metadata" => NoTransactionSource::DieselMetadata,
        "own_transaction_control" => NoTransactionSource::OwnTransactionControl,
        "goose_no_transaction" => NoTransactionSource::GooseNoTransaction,
        "dbmate_transaction_false" => NoTransactionSource::DbmateTransactionFalse,
        other => return Err(bad("no_transaction", format!("unknown source {other:?}"))),
    }))
}

// ---- status ----

pub fn migration_info(s: &MigrationStatus) -> pb::MigrationInfo {
    pb::MigrationInfo {
        version: s.version.clone().unwrap_or_default(),
        description: s.description.clone(),
        r#type: entry_type(s.entry_type) as i32,
        state: state(s.state) as i32,
        script: s.script.clone(),
        installed_on: s.installed_on.map(timestamp),
        execution_time_ms: s.execution_time_ms,
        retries: s.retries,
        lock_wait_ms: s.lock_wait_ms,
        installed_rank: s.installed_rank,
        error: s.error.clone(),
        undoable: s.undoable,
        lock_trips: s.lock_trips,
        notes_json: s.notes.as_ref().map(|n| n.to_string()),
        deployment_id: s.deployment_id.map(|id| id.to_string()),
        backup_id: s.backup_id.clone(),
    }
}

pub fn migration_status(m: &pb::MigrationInfo) -> Result<MigrationStatus, DecodeError> {
    Ok(MigrationStatus {
        version: opt(&m.version),
        description: m.description.clone(),
        entry_type: entry_type_from(m.r#type)?,
        script: m.script.clone(),
        state: state_from(m.state)?,
        installed_on: m.installed_on.as_ref().map(from_timestamp).transpose()?,
        execution_time_ms: m.execution_time_ms,
        retries: m.retries,
        lock_wait_ms: m.lock_wait_ms,
        installed_rank: m.installed_rank,
        error: m.error.clone(),
        undoable: m.undoable,
        lock_trips: m.lock_trips,
        notes: m
            .notes_json
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| bad("notes_json", e.to_string()))?,
        deployment_id: m.deployment_id.as_deref().map(parse_uuid).transpose()?,
        backup_id: m.backup_id.clone(),
    })
}

// ---- targets ----

pub fn forward(t: &Target) -> pb::ForwardTarget {
    pb::ForwardTarget {
        to_version: t.to.clone(),
        steps: t.steps.map(|n| n.min(u32::MAX as usize) as u32),
    }
}

pub fn forward_from(t: Option<&pb::ForwardTarget>) -> Target {
    Target {
        to: t.and_then(|t| t.to_version.clone()),
        steps: t.and_then(|t| t.steps).map(|n| n as usize),
    }
}

pub fn undo(t: &UndoTarget) -> pb::UndoTarget {
    use pb::undo_target::Target as T;
    pb::UndoTarget {
        target: Some(match t {
            UndoTarget::Steps(n) => T::Steps(*n as u32),
            UndoTarget::To(v) => T::ToVersion(v.clone()),
            UndoTarget::All => T::All(true),
        }),
    }
}

/// How far an `Undo` goes back, exactly as the caller said it. Undo drops data, so a
/// message that does not say how far (no target, `steps = 0`, `all = false`, a version
/// that is not one) is refused naming the field, never read as "the newest migration".
pub fn undo_from(t: Option<&pb::UndoTarget>) -> Result<UndoTarget, DecodeError> {
    use pb::undo_target::Target as T;
    let Some(t) = t else {
        return Err(bad(
            "undo",
            "the request says nothing about how far to undo: set undo.steps, undo.to_version or undo.all",
        ));
    };
    match &t.target {
        Some(T::Steps(0)) => Err(bad("undo.steps", "0 undoes nothing: give at least 1")),
        Some(T::Steps(n)) => Ok(UndoTarget::Steps(*n as usize)),
        Some(T::ToVersion(v)) => belay_core::Version::parse(v)
            .map(|_| UndoTarget::To(v.clone()))
            .map_err(|e| bad("undo.to_version", format!("{v:?} is not a version: {e}"))),
        Some(T::All(true)) => Ok(UndoTarget::All),
        Some(T::All(false)) => Err(bad(
            "undo.all",
            "false is not a target: set undo.all = true, or undo.steps or undo.to_version",
        )),
        None => Err(bad(
            "undo.target",
            "none of undo.steps, undo.to_version or undo.all is set",
        )),
    }
}

// ---- apply ----

pub fn apply_request(target: &str, forward: &Target, options: &ApplyOptions) -> pb::ApplyRequest {
    pb::ApplyRequest {
        target: Some(pb::Target {
            name: target.to_string(),
        }),
        forward: Some(self::forward(forward)),
        deployment_id: options
            .deployment_id
            .map(|u| u.to_string())
            .unwrap_or_default(),
        overrides: options
            .overrides
            .iter()
            .map(|o| pb::CheckOverride {
                check: o.check.clone(),
                reason: o.reason.clone(),
            })
            .collect(),
    }
}

/// The options of an apply request. An override without a check name or a reason is
/// refused: history would record an override no one can account for.
pub fn apply_options_from(r: &pb::ApplyRequest) -> Result<ApplyOptions, DecodeError> {
    let deployment_id = match r.deployment_id.as_str() {
        "" => None,
        id => Some(parse_uuid(id)?),
    };
    let overrides = r
        .overrides
        .iter()
        .map(|o| {
            let check = o.check.trim();
            let reason = o.reason.trim();
            if check.is_empty() {
                return Err(bad("check override", "names no check"));
            }
            if reason.is_empty() {
                return Err(bad(
                    "check override",
                    format!("{check:?} has no reason: an override needs one"),
                ));
            }
            Ok(CheckOverride {
                check: check.to_string(),
                reason: reason.to_string(),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(ApplyOptions {
        deployment_id,
        overrides,
    })
}

// ---- plan ----

fn directives(d: &Directives) -> pb::Directives {
    pb::Directives {
        no_transaction: d
            .no_transaction
            .map(no_tx_name)
            .unwrap_or_default()
            .to_string(),
        irreversible: d.irreversible,
        lock_timeout_ms: d.lock_timeout.map(|t| t.as_millis() as u64),
        statement_timeout_ms: d.statement_timeout.map(|t| t.as_millis() as u64),
        tables: d.tables.clone(),
        allow: d
            .allow
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

fn directives_from(d: Option<&pb::Directives>) -> Result<Directives, DecodeError> {
    let Some(d) = d else {
        return Ok(Directives::default());
    };
    Ok(Directives {
        no_transaction: no_tx_from(&d.no_transaction)?,
        irreversible: d.irreversible,
        lock_timeout: d.lock_timeout_ms.map(Duration::from_millis),
        statement_timeout: d.statement_timeout_ms.map(Duration::from_millis),
        tables: d.tables.clone(),
        allow: d
            .allow
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

pub fn plan(p: &PlanView) -> pb::PlanResponse {
    pb::PlanResponse {
        steps: p
            .steps
            .iter()
            .map(|s| pb::PlanStep {
                version: s.version.clone().unwrap_or_default(),
                description: s.description.clone(),
                script: s.script.clone(),
                direction: direction(s.direction) as i32,
                directives: Some(directives(&s.directives)),
                empty: s.empty,
            })
            .collect(),
        blockers: p.blockers.clone(),
        warnings: p.warnings.clone(),
        sql: p.sql.clone(),
        lock_timeout_ms: p.lock_timeout_ms,
        max_attempts: p.max_attempts,
    }
}

pub fn plan_from(p: &pb::PlanResponse) -> Result<PlanView, DecodeError> {
    Ok(PlanView {
        steps: p
            .steps
            .iter()
            .map(|s| {
                Ok(PlanStepView {
                    version: opt(&s.version),
                    description: s.description.clone(),
                    script: s.script.clone(),
                    direction: direction_from(s.direction)?,
                    directives: directives_from(s.directives.as_ref())?,
                    empty: s.empty,
                })
            })
            .collect::<Result<_, DecodeError>>()?,
        blockers: p.blockers.clone(),
        warnings: p.warnings.clone(),
        sql: p.sql.clone(),
        lock_timeout_ms: p.lock_timeout_ms,
        max_attempts: p.max_attempts,
    })
}

// ---- events and reports ----

fn holder(h: &RunnerHolder) -> pb::RunnerHolder {
    pb::RunnerHolder {
        pid: h.pid,
        since: h.since.map(timestamp),
        application_name: h.application_name.clone(),
        user: h.user.clone(),
        client_addr: h.client_addr.clone(),
    }
}

fn holder_from(h: &pb::RunnerHolder) -> Result<RunnerHolder, DecodeError> {
    Ok(RunnerHolder {
        pid: h.pid,
        since: h.since.as_ref().map(from_timestamp).transpose()?,
        application_name: h.application_name.clone(),
        user: h.user.clone(),
        client_addr: h.client_addr.clone(),
    })
}

pub fn event(e: &Event, target: &str) -> pb::MigrationEvent {
    use pb::migration_event::Event as E;
    let v = |v: &Option<String>| v.clone().unwrap_or_default();
    let kind = match &e.kind {
        EventKind::RunnerWaiting { holder: h } => E::RunnerWaiting(pb::RunnerWaiting {
            holder: h.as_ref().map(holder),
        }),
        EventKind::RunnerAcquired { waited_ms } => E::RunnerAcquired(pb::RunnerAcquired {
            waited_ms: *waited_ms,
        }),
        EventKind::Warning { message } => E::Warning(pb::Warning {
            message: message.clone(),
        }),
        EventKind::Started {
            version,
            script,
            direction: d,
            in_transaction,
        } => E::Started(pb::MigrationStarted {
            version: v(version),
            script: script.clone(),
            direction: direction(*d) as i32,
            in_transaction: *in_transaction,
        }),
        EventKind::LockTimeout {
            version,
            script,
            line,
            attempt,
            waited_ms,
            backoff_ms,
            blocked_by,
        } => E::LockTimeout(pb::LockTimeout {
            version: v(version),
            script: script.clone(),
            line: *line as u32,
            attempt: *attempt,
            waited_ms: *waited_ms,
            backoff_ms: *backoff_ms,
            blocked_by: blocked_by.iter().map(blocking_session).collect(),
        }),
        EventKind::LockGuardTripped {
            version,
            script,
            line,
            attempt,
            blocked_sessions,
            longest_wait_ms,
            blockers,
            blocked_by,
            cancelled,
        } => E::LockGuardTripped(pb::LockGuardTripped {
            version: v(version),
            script: script.clone(),
            line: u32::try_from(*line).unwrap_or(u32::MAX),
            attempt: *attempt,
            blocked_sessions: *blocked_sessions,
            longest_wait_ms: *longest_wait_ms,
            blockers: blockers.clone(),
            cancelled: *cancelled,
            blocked_by: blocked_by.iter().map(blocking_session).collect(),
        }),
        EventKind::InvalidIndexDropped { script, index } => {
            E::InvalidIndexDropped(pb::InvalidIndexDropped {
                script: script.clone(),
                index: index.clone(),
            })
        }
        EventKind::Succeeded {
            version,
            script,
            direction: d,
            execution_ms,
            retries,
            lock_wait_ms,
        } => E::Succeeded(pb::MigrationSucceeded {
            version: v(version),
            script: script.clone(),
            direction: direction(*d) as i32,
            execution_ms: *execution_ms,
            retries: *retries,
            lock_wait_ms: *lock_wait_ms,
        }),
        EventKind::Failed {
            version,
            script,
            direction: d,
            error,
        } => E::Failed(pb::MigrationFailed {
            version: v(version),
            script: script.clone(),
            direction: direction(*d) as i32,
            error: error.clone(),
        }),
        EventKind::BackupTaken { id, scope, ms } => E::BackupTaken(pb::BackupTaken {
            id: id.clone(),
            scope: scope.clone(),
            ms: *ms,
        }),
    };
    pb::MigrationEvent {
        deployment_id: e.deployment_id.to_string(),
        target: Some(pb::Target {
            name: target.to_string(),
        }),
        at: Some(timestamp(e.at)),
        event: Some(kind),
    }
}

pub fn event_from(e: &pb::MigrationEvent) -> Result<Event, DecodeError> {
    use pb::migration_event::Event as E;
    let kind = match e.event.as_ref().ok_or_else(|| bad("event", "empty"))? {
        E::RunnerWaiting(w) => EventKind::RunnerWaiting {
            holder: w.holder.as_ref().map(holder_from).transpose()?,
        },
        E::RunnerAcquired(a) => EventKind::RunnerAcquired {
            waited_ms: a.waited_ms,
        },
        E::Warning(w) => EventKind::Warning {
            message: w.message.clone(),
        },
        E::Started(s) => EventKind::Started {
            version: opt(&s.version),
            script: s.script.clone(),
            direction: direction_from(s.direction)?,
            in_transaction: s.in_transaction,
        },
        E::LockTimeout(l) => EventKind::LockTimeout {
            version: opt(&l.version),
            script: l.script.clone(),
            line: l.line as usize,
            attempt: l.attempt,
            waited_ms: l.waited_ms,
            backoff_ms: l.backoff_ms,
            blocked_by: l.blocked_by.iter().map(blocking_session_from).collect(),
        },
        E::LockGuardTripped(t) => EventKind::LockGuardTripped {
            version: opt(&t.version),
            script: t.script.clone(),
            line: t.line as usize,
            attempt: t.attempt,
            blocked_sessions: t.blocked_sessions,
            longest_wait_ms: t.longest_wait_ms,
            blockers: t.blockers.clone(),
            blocked_by: t.blocked_by.iter().map(blocking_session_from).collect(),
            cancelled: t.cancelled,
        },
        E::InvalidIndexDropped(i) => EventKind::InvalidIndexDropped {
            script: i.script.clone(),
            index: i.index.clone(),
        },
        E::Succeeded(s) => EventKind::Succeeded {
            version: opt(&s.version),
            script: s.script.clone(),
            direction: direction_from(s.direction)?,
            execution_ms: s.execution_ms,
            retries: s.retries,
            lock_wait_ms: s.lock_wait_ms,
        },
        E::Failed(f) => EventKind::Failed {
            version: opt(&f.version),
            script: f.script.clone(),
            direction: direction_from(f.direction)?,
            error: f.error.clone(),
        },
        E::BackupTaken(b) => EventKind::BackupTaken {
            id: b.id.clone(),
            scope: b.scope.clone(),
            ms: b.ms,
        },
    };
    Ok(Event {
        deployment_id: parse_uuid(&e.deployment_id)?,
        at: e
            .at
            .as_ref()
            .map(from_timestamp)
            .transpose()?
            .unwrap_or_else(Utc::now),
        kind,
    })
}

pub fn parse_uuid(s: &str) -> Result<Uuid, DecodeError> {
    Uuid::parse_str(s).map_err(|e| bad("deployment id", format!("{s:?}: {e}")))
}

pub fn report(r: &RunReport) -> pb::RunReport {
    pb::RunReport {
        deployment_id: r.deployment_id.to_string(),
        results: r
            .results
            .iter()
            .map(|s| pb::StepResult {
                version: s.version.clone().unwrap_or_default(),
                script: s.script.clone(),
                direction: direction(s.direction) as i32,
                execution_ms: s.execution_ms,
                retries: s.retries,
                lock_wait_ms: s.lock_wait_ms,
            })
            .collect(),
        other_runner: r.other_runner.as_ref().map(holder),
    }
}

pub fn report_from(r: &pb::RunReport) -> Result<RunReport, DecodeError> {
    Ok(RunReport {
        deployment_id: parse_uuid(&r.deployment_id)?,
        results: r
            .results
            .iter()
            .map(|s| {
                Ok(StepResult {
                    version: opt(&s.version),
                    script: s.script.clone(),
                    direction: direction_from(s.direction)?,
                    execution_ms: s.execution_ms,
                    retries: s.retries,
                    lock_wait_ms: s.lock_wait_ms,
                })
            })
            .collect::<Result<_, DecodeError>>()?,
        other_runner: r.other_runner.as_ref().map(holder_from).transpose()?,
    })
}

/// `repair`'s scope on the wire: an empty `version` is every migration.
pub fn repair_request(
    target: Option<pb::Target>,
    s: &belay_migrate::RepairScope,
) -> pb::RepairRequest {
    pb::RepairRequest {
        target,
        version: s.version.clone().unwrap_or_default(),
        checksums_only: s.checksums_only,
        failed_only: s.failed_only,
    }
}

pub fn repair_scope_from(r: &pb::RepairRequest) -> belay_migrate::RepairScope {
    belay_migrate::RepairScope {
        version: (!r.version.is_empty()).then(|| r.version.clone()),
        checksums_only: r.checksums_only,
        failed_only: r.failed_only,
    }
}

pub fn repair_actions(a: &[RepairAction]) -> pb::RepairResponse {
    pb::RepairResponse {
        actions: a
            .iter()
            .map(|a| pb::RepairAction {
                version: a.version.clone().unwrap_or_default(),
                script: a.script.clone(),
                action: a.action.clone(),
            })
            .collect(),
    }
}

pub fn repair_actions_from(r: &pb::RepairResponse) -> Vec<RepairAction> {
    r.actions
        .iter()
        .map(|a| RepairAction {
            version: opt(&a.version),
            script: a.script.clone(),
            action: a.action.clone(),
        })
        .collect()
}

pub fn validation(v: &Validation) -> pb::ValidateResponse {
    pb::ValidateResponse {
        problems: v.problems.clone(),
        checked: v.checked as u32,
    }
}

pub fn validation_from(v: &pb::ValidateResponse) -> Validation {
    Validation {
        problems: v.problems.clone(),
        checked: v.checked as usize,
    }
}

fn blocking_session(b: &belay_migrate::SessionBrief) -> pb::BlockingSession {
    let text = |o: &Option<String>| o.clone().unwrap_or_default();
    pb::BlockingSession {
        pid: b.pid,
        user: text(&b.user),
        application: text(&b.application),
        client: text(&b.client),
        state: text(&b.state),
        xact_ms: b.xact_ms,
        query: text(&b.query),
        mode: text(&b.mode),
        relation: text(&b.relation),
    }
}

fn blocking_session_from(b: &pb::BlockingSession) -> belay_migrate::SessionBrief {
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
    belay_migrate::SessionBrief {
        pid: b.pid,
        user: opt(&b.user),
        application: opt(&b.application),
        client: opt(&b.client),
        state: opt(&b.state),
        xact_ms: b.xact_ms,
        query: opt(&b.query),
        mode: opt(&b.mode),
        relation: opt(&b.relation),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repair_scopes_cross_the_wire_unchanged() {
        for scope in [
            belay_migrate::RepairScope::default(),
            belay_migrate::RepairScope {
                version: Some("1.2".into()),
                checksums_only: true,
                failed_only: false,
            },
            belay_migrate::RepairScope {
                version: None,
                checksums_only: false,
                failed_only: true,
            },
        ] {
            assert_eq!(repair_scope_from(&repair_request(None, &scope)), scope);
        }
    }

    #[test]
    fn statuses_round_trip() {
        let s = MigrationStatus {
            version: Some("1.1".into()),
            description: "d".into(),
            entry_type: EntryType::UndoSql,
            script: "U1.1__d.sql".into(),
            state: State::ChecksumMismatch,
            installed_on: Some(Utc.timestamp_opt(1_700_000_000, 123_000).unwrap()),
            execution_time_ms: Some(5),
            retries: Some(2),
            lock_wait_ms: Some(300),
            installed_rank: Some(7),
            error: None,
            undoable: true,
            lock_trips: Some(2),
            notes: Some(serde_json::json!({
                "allowed_lint": { "rename-column": "view kept" },
                "lock_guard_trips": [{ "blocked_sessions": 3, "blockers": [{ "pid": 42 }] }],
            })),
            deployment_id: Some(Uuid::new_v4()),
            backup_id: Some("20260101T000000-shop".into()),
        };
        let back = migration_status(&migration_info(&s)).unwrap();
        assert_eq!(serde_json_like(&back), serde_json_like(&s));
    }

    #[test]
    fn every_no_transaction_source_crosses_the_wire_by_its_json_name() {
        use NoTransactionSource as N;
        for s in [
            N::Directive,
            N::Sqlx,
            N::FlywayConf,
            N::DieselMetadata,
            N::OwnTransactionControl,
            N::GooseNoTransaction,
            N::DbmateTransactionFalse,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), no_tx_name(s));
            assert_eq!(no_tx_from(no_tx_name(s)).unwrap(), Some(s));
        }
    }

    #[test]
    fn plans_round_trip_with_directives() {
        let mut d = Directives {
            no_transaction: Some(NoTransactionSource::Directive),
            irreversible: true,
            lock_timeout: Some(Duration::from_millis(250)),
            statement_timeout: Some(Duration::from_secs(60)),
            tables: vec!["users".into()],
            ..Directives::default()
        };
        d.allow.insert(
            "create-index-concurrently".into(),
            "small table, built at deploy".into(),
        );
        d.allow.insert("rename".into(), "view kept".into());
        let p = PlanView {
            steps: vec![PlanStepView {
                version: Some("2".into()),
                description: "idx".into(),
                script: "V2__idx.sql".into(),
                direction: Direction::Forward,
                directives: d,
                empty: false,
            }],
            blockers: vec![],
            warnings: vec!["w".into()],
            sql: None,
            lock_timeout_ms: 100,
            max_attempts: 60,
        };
        assert_eq!(plan_from(&plan(&p)).unwrap(), p);
    }

    #[test]
    fn apply_requests_carry_the_deployment_and_the_overrides() {
        let options = ApplyOptions {
            deployment_id: Some(Uuid::new_v4()),
            overrides: vec![
                CheckOverride {
                    check: "lock_waits".into(),
                    reason: "owner agreed; the ALTER is queued behind a report".into(),
                },
                CheckOverride {
                    check: "long_queries".into(),
                    reason: "nightly export, read-only".into(),
                },
            ],
        };
        let forward = Target {
            to: Some("3".into()),
            steps: None,
        };
        let req = apply_request("tenant_a", &forward, &options);
        assert_eq!(
            req.target.as_ref().map(|t| t.name.as_str()),
            Some("tenant_a")
        );
        assert_eq!(req.overrides.len(), 2);
        assert_eq!(req.overrides[0].check, "lock_waits");
        assert_eq!(apply_options_from(&req).unwrap(), options);
        let back = forward_from(req.forward.as_ref());
        assert_eq!((back.to, back.steps), (forward.to.clone(), forward.steps));

        // Nothing overridden, no deployment: the agent picks the id.
        let req = apply_request("tenant_a", &forward, &ApplyOptions::default());
        assert!(req.deployment_id.is_empty() && req.overrides.is_empty());
        assert_eq!(apply_options_from(&req).unwrap(), ApplyOptions::default());
    }

    #[test]
    fn overrides_without_a_check_or_a_reason_are_refused() {
        let override_of = |check: &str, reason: &str| pb::ApplyRequest {
            overrides: vec![pb::CheckOverride {
                check: check.into(),
                reason: reason.into(),
            }],
            ..pb::ApplyRequest::default()
        };
        let e = apply_options_from(&override_of("lock_waits", "  ")).unwrap_err();
        assert!(
            e.to_string().contains("\"lock_waits\" has no reason"),
            "{e}"
        );
        assert_eq!(Status::from(e).code(), Code::InvalidArgument);
        let e = apply_options_from(&override_of("", "because")).unwrap_err();
        assert!(e.to_string().contains("names no check"), "{e}");
        let bad_id = pb::ApplyRequest {
            deployment_id: "not-a-uuid".into(),
            ..pb::ApplyRequest::default()
        };
        assert!(apply_options_from(&bad_id).is_err());
    }

    fn serde_json_like(s: &MigrationStatus) -> String {
        format!("{s:?}")
    }

    #[test]
    fn events_round_trip() {
        let id = Uuid::new_v4();
        let kinds = vec![
            EventKind::LockTimeout {
                version: Some("2".into()),
                script: "V2__x.sql".into(),
                line: 3,
                attempt: 1,
                waited_ms: 100,
                backoff_ms: 0,
                blocked_by: vec![belay_migrate::SessionBrief {
                    pid: 4242,
                    user: Some("app".into()),
                    application: Some("report".into()),
                    client: Some("10.0.0.5".into()),
                    state: Some("idle in transaction".into()),
                    xact_ms: Some(14_000),
                    query: Some("SELECT count(*) FROM accounts".into()),
                    mode: Some("AccessShareLock".into()),
                    relation: Some("public.accounts".into()),
                }],
            },
            EventKind::Failed {
                version: None,
                script: "R__v.sql".into(),
                direction: Direction::Repeatable,
                error: "R__v.sql:1: boom".into(),
            },
            EventKind::BackupTaken {
                id: "20260422T101530.123Z-3f9a1c".into(),
                scope: "full".into(),
                ms: 420,
            },
            EventKind::LockGuardTripped {
                version: Some("3".into()),
                script: "V3__col.sql".into(),
                line: 2,
                attempt: 1,
                blocked_sessions: 4,
                longest_wait_ms: 612,
                blockers: vec![4242, 4243],
                blocked_by: vec![
                    belay_migrate::SessionBrief::pid(4242),
                    belay_migrate::SessionBrief::pid(4243),
                ],
                cancelled: true,
            },
        ];
        for kind in kinds {
            let e = Event {
                deployment_id: id,
                at: Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
                kind,
            };
            let pbe = event(&e, "tenant_a");
            assert_eq!(pbe.target.as_ref().unwrap().name, "tenant_a");
            let back = event_from(&pbe).unwrap();
            assert_eq!(format!("{back:?}"), format!("{e:?}"));
        }
    }

    #[test]
    fn a_stream_cut_short_says_the_outcome_is_unknown_and_where_to_look() {
        let ended = stream_cut_short(
            Ok(()),
            &Peer::new("agent a1", false),
            "run",
            "check `belay status`",
        );
        assert_eq!(ended.kind, ErrorKind::AgentUnreachable);
        assert!(
            ended
                .message
                .contains("agent a1 ended the run without a result")
        );
        assert!(ended.message.ends_with("check `belay status`"));
        let broke = stream_cut_short(
            Err(&Status::unavailable("connection reset")),
            &Peer::new("agent a1", false),
            "restore",
            "`belay backup list` shows the catalog",
        );
        assert_eq!(broke.kind, ErrorKind::AgentUnreachable);
        assert!(
            broke.message.contains("broke mid-restore"),
            "{}",
            broke.message
        );
        // A real failure from the agent keeps its class and message untouched.
        let failed = ApiError::new(ErrorKind::MigrationFailed, "V2__x.sql:3: boom");
        let kept = stream_cut_short(
            Err(&status_from(&failed)),
            &Peer::new("agent a1", false),
            "run",
            "x",
        );
        assert_eq!(kept.kind, ErrorKind::MigrationFailed);
        assert_eq!(kept.message, failed.message);
    }

    #[test]
    fn errors_keep_their_class_across_the_wire() {
        for kind in [
            ErrorKind::InvalidSource,
            ErrorKind::Unavailable,
            ErrorKind::MigrationFailed,
            ErrorKind::Refused,
            ErrorKind::Busy,
            ErrorKind::Internal,
            ErrorKind::UnknownTarget,
            ErrorKind::AgentUnreachable,
            ErrorKind::InvalidArgument,
            ErrorKind::NotFound,
            ErrorKind::OutOfSpace,
        ] {
            let e = ApiError::new(kind, "V1__x.sql:3: boom");
            let back = api_error_from(&status_from(&e), &Peer::new("agent-1", true));
            assert_eq!(back.kind, kind);
            assert_eq!(back.message, e.message);
        }
        let transport = api_error_from(
            &Status::unavailable("connection refused"),
            &Peer::new("agent-1 at 127.0.0.1:1", false),
        );
        assert_eq!(transport.kind, ErrorKind::AgentUnreachable);
        assert!(transport.message.contains("agent-1 at 127.0.0.1:1"));
        // Words are not causes: an internal error that mentions the transport, without a
        // typed transport cause, keeps its class (real transport failures are in
        // tests/transport_errors.rs).
        for words in [
            "h2 protocol error: http2 error",
            "tls connection lost",
            "index out of range",
        ] {
            let internal =
                api_error_from(&Status::internal(words), &Peer::new("controller", false));
            assert_eq!(internal.kind, ErrorKind::Internal, "{words}");
        }
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let mut m = migration_info(&MigrationStatus {
            version: None,
            description: String::new(),
            entry_type: EntryType::Sql,
            script: String::new(),
            state: State::Pending,
            installed_on: None,
            execution_time_ms: None,
            retries: None,
            lock_wait_ms: None,
            installed_rank: None,
            error: None,
            undoable: false,
            lock_trips: None,
            notes: None,
            deployment_id: None,
            backup_id: None,
        });
        m.state = 99;
        assert!(migration_status(&m).is_err());
        assert!(parse_uuid("not-a-uuid").is_err());
        assert!(event_from(&pb::MigrationEvent::default()).is_err());
    }
}
