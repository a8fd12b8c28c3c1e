//! `belay.v1.BackfillService`: batched, resumable backfills of one target. [`BackfillGrpc`]
//! serves any [`BackfillApi`] (the agent's `LocalBackfills`, the controller's router),
//! [`BackfillClient`] implements it over gRPC (the CLI's remote mode, the controller's
//! calls to agents), and the conversions between the two live here.
//!
//! Stopping crosses the wire two ways, both as Ctrl-C locally (the batch in flight
//! commits, then the backfill stops, resumable): a caller that cancels its stop token
//! asks `Stop` and reads the stream to its summary; a caller that goes away drops the
//! stream, and the server stops the backfill itself.

use crate::client::Connection;
use crate::convert::{self, DecodeError, target, target_name};
use belay_auth::MaybeTokenAttach;
use belay_backfill::{
    BackfillApi, BackfillEvent, BackfillRequest, BackfillSink, BatchReport, CancellationToken,
    Progress, Start, Started, Summary,
};
use belay_core::ApiError;
use belay_proto::v1 as pb;
use pb::backfill_run_message::Message;
use pb::backfill_service_client::BackfillServiceClient;
use pb::backfill_service_server::{BackfillService, BackfillServiceServer};
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info_span};

fn bad(what: &'static str, problem: impl Into<String>) -> DecodeError {
    DecodeError {
        what,
        problem: problem.into(),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn key(k: &[String]) -> pb::BackfillKey {
    pb::BackfillKey { values: k.to_vec() }
}

fn key_from(k: Option<&pb::BackfillKey>) -> Option<Vec<String>> {
    k.map(|k| k.values.clone())
}

// ---- conversions ----

pub fn run_request(t: &str, r: &BackfillRequest) -> pb::BackfillRunRequest {
    pb::BackfillRunRequest {
        target: target(t),
        table: r.table.clone(),
        set: r.set.clone(),
        r#where: r.filter.clone(),
        name: r.name.clone(),
        batch_size: r.batch_size,
        sleep_ms: millis(r.sleep),
        restart: r.restart,
        lock_timeout_ms: r.lock_timeout.map(millis),
        statement_timeout_ms: r.statement_timeout.map(millis),
        max_attempts: r.max_attempts,
        max_lock_wait_ms: r.max_lock_wait.map(millis),
    }
}

pub fn run_request_from(r: &pb::BackfillRunRequest) -> Result<BackfillRequest, DecodeError> {
    if r.batch_size == 0 {
        return Err(bad(
            "backfill request",
            "has no batch size: give --batch N (at least 1)",
        ));
    }
    Ok(BackfillRequest {
        table: r.table.clone(),
        set: r.set.clone(),
        filter: r.r#where.clone(),
        name: r.name.clone(),
        batch_size: r.batch_size,
        sleep: Duration::from_millis(r.sleep_ms),
        restart: r.restart,
        lock_timeout: r.lock_timeout_ms.map(Duration::from_millis),
        statement_timeout: r.statement_timeout_ms.map(Duration::from_millis),
        max_attempts: r.max_attempts,
        max_lock_wait: r.max_lock_wait_ms.map(Duration::from_millis),
    })
}

pub fn started(s: &Started) -> pb::BackfillStarted {
    let mut m = pb::BackfillStarted {
        name: s.name.clone(),
        table: s.table.clone(),
        key_columns: s.key_columns.clone(),
        estimated_rows: s.estimated_rows,
        progress_schema: s.progress_schema.clone(),
        rows_examined: s.rows_examined,
        ..Default::default()
    };
    m.start = match &s.start {
        Start::Fresh => "fresh",
        Start::Restarted => "restarted",
        Start::Resuming {
            last_key,
            rows_updated,
            batches,
        } => {
            m.resume_after = last_key.as_deref().map(key);
            m.rows_updated = *rows_updated;
            m.batches = *batches;
            "resuming"
        }
        Start::AlreadyDone {
            rows_updated,
            batches,
            finished_at,
        } => {
            m.rows_updated = *rows_updated;
            m.batches = *batches;
            m.finished_at = Some(convert::timestamp(*finished_at));
            "done"
        }
    }
    .to_string();
    m
}

pub fn started_from(s: &pb::BackfillStarted) -> Result<Started, DecodeError> {
    let start = match s.start.as_str() {
        "fresh" => Start::Fresh,
        "restarted" => Start::Restarted,
        "resuming" => Start::Resuming {
            last_key: key_from(s.resume_after.as_ref()),
            rows_updated: s.rows_updated,
            batches: s.batches,
        },
        "done" => Start::AlreadyDone {
            rows_updated: s.rows_updated,
            batches: s.batches,
            finished_at: s
                .finished_at
                .as_ref()
                .map(convert::from_timestamp)
                .transpose()?
                .ok_or_else(|| bad("backfill start", "is done but has no finish time"))?,
        },
        other => {
            return Err(bad(
                "backfill start",
                format!("unknown start {other:?} (fresh, restarted, resuming or done)"),
            ));
        }
    };
    Ok(Started {
        name: s.name.clone(),
        table: s.table.clone(),
        key_columns: s.key_columns.clone(),
        estimated_rows: s.estimated_rows,
        progress_schema: s.progress_schema.clone(),
        start,
        rows_examined: s.rows_examined,
    })
}

pub fn progress(p: &Progress) -> Message {
    match p {
        Progress::Batch(b) => Message::Batch(pb::BackfillBatch {
            batch: b.batch,
            rows_updated: b.rows_updated,
            rows_examined: b.rows_examined,
            total_updated: b.total_updated,
            total_examined: b.total_examined,
            last_key: Some(key(&b.last_key)),
            retries: b.retries,
            duration_ms: millis(b.duration),
            finished: b.finished,
        }),
        Progress::LockRetry {
            batch,
            attempt,
            backoff,
            sqlstate,
        } => Message::LockRetry(pb::BackfillLockRetry {
            batch: *batch,
            attempt: *attempt,
            backoff_ms: millis(*backoff),
            sqlstate: sqlstate.clone(),
        }),
    }
}

pub fn batch_from(b: &pb::BackfillBatch) -> Progress {
    Progress::Batch(BatchReport {
        batch: b.batch,
        rows_updated: b.rows_updated,
        rows_examined: b.rows_examined,
        total_updated: b.total_updated,
        total_examined: b.total_examined,
        last_key: key_from(b.last_key.as_ref()).unwrap_or_default(),
        retries: b.retries,
        duration: Duration::from_millis(b.duration_ms),
        finished: b.finished,
    })
}

pub fn lock_retry_from(r: &pb::BackfillLockRetry) -> Progress {
    Progress::LockRetry {
        batch: r.batch,
        attempt: r.attempt,
        backoff: Duration::from_millis(r.backoff_ms),
        sqlstate: r.sqlstate.clone(),
    }
}

pub fn summary(s: &Summary) -> pb::BackfillSummary {
    pb::BackfillSummary {
        name: s.name.clone(),
        table: s.table.clone(),
        key_columns: s.key_columns.clone(),
        rows_updated: s.rows_updated,
        rows_examined: s.rows_examined,
        batches: s.batches,
        done: s.done,
        last_key: s.last_key.as_deref().map(key),
        rows_updated_this_run: s.rows_updated_this_run,
        batches_this_run: s.batches_this_run,
        estimated_rows: s.estimated_rows,
    }
}

pub fn summary_from(s: &pb::BackfillSummary) -> Summary {
    Summary {
        name: s.name.clone(),
        table: s.table.clone(),
        key_columns: s.key_columns.clone(),
        rows_updated: s.rows_updated,
        rows_examined: s.rows_examined,
        batches: s.batches,
        done: s.done,
        last_key: key_from(s.last_key.as_ref()),
        rows_updated_this_run: s.rows_updated_this_run,
        batches_this_run: s.batches_this_run,
        estimated_rows: s.estimated_rows,
    }
}

// ---- server ----

/// The gRPC face of backfills: the agent serves its targets' through it, the controller
/// its router.
#[derive(Clone)]
pub struct BackfillGrpc {
    api: Arc<dyn BackfillApi>,
    runs: crate::InFlight,
}

impl std::fmt::Debug for BackfillGrpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackfillGrpc").finish_non_exhaustive()
    }
}

impl BackfillGrpc {
    pub fn new(api: Arc<dyn BackfillApi>) -> Self {
        BackfillGrpc {
            api,
            runs: crate::InFlight::new(),
        }
    }

    /// The backfills in flight. On shutdown a daemon stops them (each commits its batch in
    /// flight) and waits for them within its grace, then cancels the rest (PostgreSQL rolls
    /// a batch in flight back; the same command resumes).
    pub fn runs(&self) -> &crate::InFlight {
        &self.runs
    }

    pub fn into_service(self) -> BackfillServiceServer<Self> {
        BackfillServiceServer::new(self)
    }
}

type RunStream = ReceiverStream<Result<pb::BackfillRunMessage, Status>>;

#[tonic::async_trait]
impl BackfillService for BackfillGrpc {
    type RunStream = RunStream;

    async fn run(
        &self,
        req: Request<pb::BackfillRunRequest>,
    ) -> Result<Response<Self::RunStream>, Status> {
        let r = req.get_ref();
        let t = target_name(r.target.as_ref())?;
        let request = run_request_from(r)?;
        let span = info_span!("backfill_rpc", target = %t, table = %request.table);
        // Bounded, as every event stream: a slow caller slows the backfill down.
        let (tx, rx) = crate::stream::channel(crate::stream::CAPACITY);
        let events = tx.clone();
        let sink: BackfillSink = Arc::new(move |e: &BackfillEvent| {
            let message = match e {
                BackfillEvent::Started(s) => Message::Started(started(s)),
                BackfillEvent::Progress(p) => progress(p),
            };
            let _ = events.send_blocking(Ok(pb::BackfillRunMessage {
                message: Some(message),
            }));
        });
        // A caller that goes away stops the backfill as Ctrl-C does locally: the batch in
        // flight commits, the rest waits for the same request to resume it.
        let stop = CancellationToken::new();
        let gone = {
            let (tx, stop) = (tx.clone(), stop.clone());
            tokio::spawn(async move {
                tx.closed().await;
                stop.cancel();
            })
        };
        let api = self.api.clone();
        let last_word = tx.clone();
        self.runs.spawn(
            async move {
                let msg = match api.run(&t, request, stop, sink).await {
                    Ok(s) => Ok(pb::BackfillRunMessage {
                        message: Some(Message::Summary(summary(&s))),
                    }),
                    Err(e) => Err(convert::status_from(&e)),
                };
                gone.abort();
                let _ = tx.send(msg).await;
            }
            .instrument(span),
            move || async move {
                let _ = last_word
                    .send_now(Err(Status::unavailable(crate::inflight::CANCELLED_AT_STOP)));
            },
        );
        Ok(Response::new(rx))
    }

    async fn stop(
        &self,
        req: Request<pb::BackfillStopRequest>,
    ) -> Result<Response<pb::BackfillStopResponse>, Status> {
        let r = req.get_ref();
        let t = target_name(r.target.as_ref())?;
        self.api
            .stop(&t, &r.name)
            .await
            .map_err(|e| convert::status_from(&e))?;
        Ok(Response::new(pb::BackfillStopResponse {}))
    }
}

// ---- client ----

/// [`BackfillApi`] over gRPC: the CLI's calls to the controller, the controller's to the
/// agent owning a target.
#[derive(Clone, Debug)]
pub struct BackfillClient {
    client: BackfillServiceClient<InterceptedService<Channel, MaybeTokenAttach>>,
    peer: crate::client::Peer,
}

impl BackfillClient {
    pub fn new(conn: &Connection) -> Self {
        BackfillClient {
            client: BackfillServiceClient::new(conn.intercepted()),
            peer: conn.peer.clone(),
        }
    }

    fn err(&self, s: &Status) -> ApiError {
        convert::api_error_from(s, &self.peer)
    }
}

const CHECK: &str = "run the same command again: it resumes after the last committed batch";

#[async_trait::async_trait]
impl BackfillApi for BackfillClient {
    async fn run(
        &self,
        t: &str,
        request: BackfillRequest,
        stop: CancellationToken,
        events: BackfillSink,
    ) -> Result<Summary, ApiError> {
        let mut stream = self
            .client
            .clone()
            .run(run_request(t, &request))
            .await
            .map_err(|s| self.err(&s))?
            .into_inner();
        // Known once it started: `Stop` names it.
        let mut name: Option<String> = None;
        let mut asked = false;
        loop {
            let next = tokio::select! {
                m = stream.message() => m,
                () = stop.cancelled(), if !asked && name.is_some() => {
                    asked = true;
                    let name = name.clone().unwrap_or_default();
                    // Not running any more (it just ended): its summary is on the way.
                    if let Err(e) = self.stop(t, &name).await {
                        tracing::debug!(backfill = %name, error = %e, "stop not delivered");
                    }
                    continue;
                }
            };
            match next {
                Ok(Some(pb::BackfillRunMessage {
                    message: Some(message),
                })) => match message {
                    Message::Started(s) => {
                        let s = started_from(&s)?;
                        name = Some(s.name.clone());
                        events(&BackfillEvent::Started(s));
                    }
                    Message::Batch(b) => events(&BackfillEvent::Progress(batch_from(&b))),
                    Message::LockRetry(r) => {
                        events(&BackfillEvent::Progress(lock_retry_from(&r)));
                    }
                    Message::Summary(s) => return Ok(summary_from(&s)),
                },
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return Err(convert::stream_cut_short(
                        Ok(()),
                        &self.peer,
                        "backfill",
                        CHECK,
                    ));
                }
                Err(s) => {
                    return Err(convert::stream_cut_short(
                        Err(&s),
                        &self.peer,
                        "backfill",
                        CHECK,
                    ));
                }
            }
        }
    }

    async fn stop(&self, t: &str, name: &str) -> Result<(), ApiError> {
        self.client
            .clone()
            .stop(pb::BackfillStopRequest {
                target: target(t),
                name: name.to_string(),
            })
            .await
            .map_err(|s| self.err(&s))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_progress_and_summaries_round_trip() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        for start in [
            Start::Fresh,
            Start::Restarted,
            Start::Resuming {
                last_key: Some(vec!["7".into(), "a b".into()]),
                rows_updated: 3,
                batches: 2,
            },
            Start::Resuming {
                last_key: None,
                rows_updated: 0,
                batches: 0,
            },
            Start::AlreadyDone {
                rows_updated: 9,
                batches: 4,
                finished_at: at,
            },
        ] {
            let s = Started {
                name: "orders_ac3db47b".into(),
                table: "public.orders".into(),
                key_columns: vec!["id".into()],
                estimated_rows: Some(10),
                progress_schema: "belay".into(),
                start,
                rows_examined: 5,
            };
            assert_eq!(started_from(&started(&s)).unwrap(), s);
        }
        let mut odd = started(&Started {
            name: "n".into(),
            table: "t".into(),
            key_columns: vec![],
            estimated_rows: None,
            progress_schema: "belay".into(),
            start: Start::Fresh,
            rows_examined: 0,
        });
        odd.start = "sideways".into();
        assert!(
            started_from(&odd)
                .unwrap_err()
                .to_string()
                .contains("sideways")
        );

        let b = Progress::Batch(BatchReport {
            batch: 2,
            rows_updated: 3,
            rows_examined: 4,
            total_updated: 5,
            total_examined: 8,
            last_key: vec!["8".into()],
            retries: 1,
            duration: Duration::from_millis(12),
            finished: true,
        });
        let Message::Batch(m) = progress(&b) else {
            panic!("a batch")
        };
        assert_eq!(batch_from(&m), b);
        let r = Progress::LockRetry {
            batch: 2,
            attempt: 1,
            backoff: Duration::from_millis(50),
            sqlstate: "55P03".into(),
        };
        let Message::LockRetry(m) = progress(&r) else {
            panic!("a lock retry")
        };
        assert_eq!(lock_retry_from(&m), r);

        let s = Summary {
            name: "n".into(),
            table: "public.t".into(),
            key_columns: vec!["a".into(), "b".into()],
            rows_updated: 1,
            rows_examined: 2,
            batches: 1,
            done: false,
            last_key: Some(vec!["1".into(), "x".into()]),
            rows_updated_this_run: 1,
            batches_this_run: 1,
            estimated_rows: None,
        };
        assert_eq!(summary_from(&summary(&s)), s);
    }

    #[test]
    fn requests_round_trip_and_a_zero_batch_is_refused() {
        let r = BackfillRequest {
            table: "orders".into(),
            set: "total = price * qty".into(),
            filter: Some("total IS NULL".into()),
            name: None,
            batch_size: 100,
            sleep: Duration::from_millis(10),
            restart: true,
            lock_timeout: Some(Duration::from_millis(200)),
            statement_timeout: None,
            max_attempts: Some(3),
            max_lock_wait: None,
        };
        assert_eq!(run_request_from(&run_request("shop", &r)).unwrap(), r);
        let mut zero = run_request("shop", &r);
        zero.batch_size = 0;
        assert!(run_request_from(&zero).is_err());
    }
}
