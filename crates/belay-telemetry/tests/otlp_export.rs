//! Spans really reach an OTLP/gRPC collector: a minimal `TraceService/Export` server counts
//! the export calls it receives. Its own test binary, since the subscriber is process-global.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use belay_telemetry::{LogFormat, init_with_otlp};
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};

/// Accepts any `Export` call, decoding the request as an empty message (prost skips unknown
/// fields) and answering with an empty `ExportTraceServiceResponse`.
#[derive(Clone, Default)]
struct Collector {
    exports: Arc<AtomicUsize>,
}

impl tonic::server::NamedService for Collector {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

struct Export(Arc<AtomicUsize>);

impl tonic::server::UnaryService<()> for Export {
    type Response = ();
    type Future = std::future::Ready<Result<tonic::Response<()>, tonic::Status>>;

    fn call(&mut self, _request: tonic::Request<()>) -> Self::Future {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(tonic::Response::new(())))
    }
}

impl Service<http::Request<tonic::body::Body>> for Collector {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let exports = self.exports.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<(), ()>::default());
            Ok(grpc.unary(Export(exports), request).await)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_and_flushed_on_drop() {
    let collector = Collector::default();
    let exports = collector.exports.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(collector)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let endpoint = format!("http://{addr}");
    let guard = init_with_otlp(LogFormat::Text, "info", Some(&endpoint), "belay-test")
        .expect("init with a live collector");
    {
        let span = tracing::info_span!("deployment_step", step = "apply");
        let _entered = span.enter();
        tracing::info!("exported span");
    }
    let started = Instant::now();
    drop(guard);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "dropping the guard took {took:?}"
    );
    assert!(
        exports.load(Ordering::SeqCst) >= 1,
        "the collector received no export call"
    );
}
