//! One trace per deployment: a real controller and a real agent export spans over OTLP/gRPC
//! to a collector served by this test on a real socket; the agent's step spans carry the
//! controller's trace id, carried across `DeployTarget` as W3C `traceparent`.

use anyhow::{Context, Result};
use belay_e2e::{Daemon, belay, controller, examples, wait_agents, wait_for};
use belay_testkit::Cluster;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use std::sync::{Arc, Mutex};

/// One received span: which service sent it, its name, ids and its `deployment` or
/// `target` attribute.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Received>>>);

impl Collector {
    fn spans(&self) -> Vec<Received> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                out.push(Received {
                    service: service.clone(),
                    name: span.name,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                });
            }
        }
        if let Ok(mut spans) = self.0.lock() {
            spans.extend(out);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

const STEPS: [&str; 5] = [
    "planned",
    "preflight",
    "backing_up",
    "migrating",
    "validating",
];

#[tokio::test(flavor = "multi_thread")]
async fn the_agents_step_spans_join_the_controllers_deployment_trace() -> Result<()> {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let tmp = tempfile::tempdir()?;
    let db = Cluster::shared().create_database().await?;
    let store = tmp
        .path()
        .join("controller.db")
        .to_string_lossy()
        .into_owned();
    let c = controller(&store, &["--otlp-endpoint", &endpoint]).await?;
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"agent-1\"\ncontroller = \"{}\"\n\n[[targets]]\nname = \"shop\"\nurl = \"{}\"\nmigrations = \"{}\"\n",
            c.addr,
            db.url,
            examples().display()
        ),
    )?;
    let config = config.to_string_lossy().into_owned();
    let _a = Daemon::start(
        "belay-agent",
        &[
            "--listen",
            "127.0.0.1:0",
            "--config",
            &config,
            "--otlp-endpoint",
            &endpoint,
        ],
        &[],
    )
    .await?;
    wait_agents(&c.addr, 1).await?;
    let r = belay(&c.addr, &["deploy", "--targets", "shop"]).await?;
    assert_eq!(r.code, 0, "{r:?}");

    // Spans leave in batches: wait until both daemons sent the deployment's spans.
    wait_for("the deployment's spans from both daemons", || {
        let spans = collector.spans();
        async move {
            let has = |service: &str, name: &str| {
                spans.iter().any(|s| s.service == service && s.name == name)
            };
            Ok(has("belay-controller", "deployment")
                && has("belay-controller", "validating")
                && STEPS.iter().all(|step| has("belay-agent", step)))
        }
    })
    .await?;
    let spans = collector.spans();
    let find = |service: &str, name: &str| {
        spans
            .iter()
            .find(|s| s.service == service && s.name == name)
            .with_context(|| format!("{service}'s span {name}: {spans:#?}"))
    };
    let deployment = find("belay-controller", "deployment")?;
    assert!(
        deployment.parent_span_id.is_empty(),
        "the deployment's span is its trace's root: {deployment:?}"
    );
    let trace = &deployment.trace_id;
    for step in STEPS {
        for service in ["belay-controller", "belay-agent"] {
            let span = find(service, step)?;
            assert_eq!(
                &span.trace_id, trace,
                "{service}'s {step} span is not in the deployment's trace: {spans:#?}"
            );
        }
    }
    // The agent's side of the call hangs under the controller's span for the target.
    let called = find("belay-controller", "deploy_target")?;
    let served = find("belay-agent", "deploy_target_rpc")?;
    assert_eq!(served.parent_span_id, called.span_id, "{spans:#?}");
    // The agent's step spans are children of its pipeline's span, one per step.
    let pipeline = find("belay-agent", "deploy")?;
    let migrating = find("belay-agent", "migrating")?;
    assert_eq!(migrating.parent_span_id, pipeline.span_id, "{spans:#?}");
    server.abort();
    Ok(())
}
