//! Real tonic servers on 127.0.0.1:0 serving `grpc.health.v1`, with certificates from
//! `belay_testkit::pki`: mTLS acceptance and refusal, and bearer-token checks.

use std::net::SocketAddr;
use std::time::Duration;

use belay_auth::{
    HEALTH_SERVICE, INVALID_TOKEN_MESSAGE, MISSING_TOKEN_MESSAGE, Secret, TlsFiles, TokenAttach,
    TokenCheck, client_tls, client_tls_ca_only, server_tls, server_tls_client_optional,
};
use belay_testkit::pki::TestPki;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Server, ServerTlsConfig};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const TOKEN: &str = "correct-horse-battery-staple";

/// A running server; dropping it stops the server.
struct TestServer {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

/// Serves `routes` (optionally behind `guard`) on a fresh loopback port.
async fn serve(
    tls: Option<ServerTlsConfig>,
    routes: Routes,
    guard: Option<TokenCheck>,
) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let incoming = TcpListenerStream::new(listener);
    let (stop, stopped) = oneshot::channel::<()>();
    let signal = async move {
        let _ = stopped.await;
    };
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .expect("server TLS config is accepted");
    }
    let routes = routes.prepare();
    tokio::spawn(async move {
        let result = match guard {
            Some(check) => {
                builder
                    .serve_with_incoming_shutdown(check.guard(routes), incoming, signal)
                    .await
            }
            None => {
                builder
                    .serve_with_incoming_shutdown(routes, incoming, signal)
                    .await
            }
        };
        result.expect("server runs");
    });
    TestServer { addr, _stop: stop }
}

fn health_routes() -> Routes {
    let (_reporter, health) = tonic_health::server::health_reporter();
    Routes::new(health)
}

fn endpoint(addr: SocketAddr, tls: Option<ClientTlsConfig>) -> Endpoint {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = Channel::from_shared(format!("{scheme}://{addr}"))
        .expect("valid URI")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    match tls {
        Some(tls) => endpoint.tls_config(tls).expect("client TLS config"),
        None => endpoint,
    }
}

/// The overall health status, or a description of why the call failed (connect or RPC).
async fn check_health(
    endpoint: Endpoint,
    token: Option<&str>,
) -> Result<ServingStatus, tonic::Status> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect failed: {e:?}")))?;
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let response = match token {
        Some(token) => {
            let attach = TokenAttach::new(&Secret::new(token)).expect("header-safe token");
            HealthClient::with_interceptor(channel, attach)
                .check(request)
                .await?
        }
        None => HealthClient::new(channel).check(request).await?,
    };
    Ok(response.into_inner().status())
}

fn files(tuple: (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)) -> TlsFiles {
    TlsFiles::from_tuple(tuple)
}

#[tokio::test]
async fn mtls_client_with_a_valid_certificate_is_served() {
    let pki = TestPki::new().expect("test PKI");
    let tls = server_tls(&files(pki.server_files())).expect("server TLS");
    let server = serve(Some(tls), health_routes(), None).await;

    let client = client_tls(&files(pki.client_files()), "localhost").expect("client TLS");
    let status = check_health(endpoint(server.addr, Some(client)), None)
        .await
        .expect("mTLS call succeeds");
    assert_eq!(status, ServingStatus::Serving);
}

#[tokio::test]
async fn mtls_refuses_a_client_without_a_certificate() {
    let pki = TestPki::new().expect("test PKI");
    let tls = server_tls(&files(pki.server_files())).expect("server TLS");
    let server = serve(Some(tls), health_routes(), None).await;

    let client = client_tls_ca_only(&pki.ca, "localhost").expect("client TLS");
    let result = check_health(endpoint(server.addr, Some(client)), None).await;
    assert!(
        !matches!(result, Ok(ServingStatus::Serving)),
        "a client without a certificate must be refused, got {result:?}"
    );
    // The server's TLS alert, as rustls reports it to the client.
    assert!(
        format!("{result:?}").contains("CertificateRequired"),
        "{result:?}"
    );
}

#[tokio::test]
async fn mtls_refuses_a_client_certificate_from_another_ca() {
    let pki = TestPki::new().expect("test PKI");
    let tls = server_tls(&files(pki.server_files())).expect("server TLS");
    let server = serve(Some(tls), health_routes(), None).await;

    let client = client_tls(&files(pki.other_ca_client()), "localhost").expect("client TLS");
    let result = check_health(endpoint(server.addr, Some(client)), None).await;
    assert!(
        !matches!(result, Ok(ServingStatus::Serving)),
        "a certificate from another CA must be refused, got {result:?}"
    );
    assert!(format!("{result:?}").contains("UnknownCA"), "{result:?}");
}

#[tokio::test]
async fn client_refuses_a_server_for_another_name() {
    let pki = TestPki::new().expect("test PKI");
    let tls = server_tls(&files(pki.server_files())).expect("server TLS");
    let server = serve(Some(tls), health_routes(), None).await;

    let client = client_tls(&files(pki.client_files()), "not-the-server.example").expect("TLS");
    let result = check_health(endpoint(server.addr, Some(client)), None).await;
    assert!(result.is_err(), "wrong server name must fail: {result:?}");
}

fn assert_unauthenticated(result: Result<ServingStatus, tonic::Status>, message: &str) {
    let status = result.expect_err("the call must be rejected");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert_eq!(status.message(), message);
}

/// CLI style: server-only TLS (client certificates optional) plus a bearer token checked by
/// the path-aware guard around all routes.
#[tokio::test]
async fn guard_requires_the_right_bearer_token() {
    let pki = TestPki::new().expect("test PKI");
    let tls = server_tls_client_optional(&files(pki.server_files())).expect("server TLS");
    let check = TokenCheck::new(Secret::new(TOKEN));
    let server = serve(Some(tls), health_routes(), Some(check)).await;
    let client = || Some(client_tls_ca_only(&pki.ca, "localhost").expect("client TLS"));

    let none = check_health(endpoint(server.addr, client()), None).await;
    assert_unauthenticated(none, MISSING_TOKEN_MESSAGE);

    let wrong = check_health(endpoint(server.addr, client()), Some("not-the-token")).await;
    assert_unauthenticated(wrong, INVALID_TOKEN_MESSAGE);

    let right = check_health(endpoint(server.addr, client()), Some(TOKEN)).await;
    assert_eq!(
        right.expect("right token is accepted"),
        ServingStatus::Serving
    );
}

/// Calls `/belay.v1.Nothing/Call` (no such service) with an empty message.
async fn call_unknown_service(addr: SocketAddr, token: Option<&str>) -> tonic::Status {
    let channel = endpoint(addr, None).connect().await.expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let mut request = tonic::Request::new(());
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii"),
        );
    }
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    grpc.unary::<(), (), _>(
        request,
        PathAndQuery::from_static("/belay.v1.Nothing/Call"),
        codec,
    )
    .await
    .expect_err("there is no such service")
}

#[tokio::test]
async fn guard_lets_exempt_health_through_but_checks_everything_else() {
    let check = TokenCheck::new(Secret::new(TOKEN)).exempt(HEALTH_SERVICE);
    let server = serve(None, health_routes(), Some(check)).await;

    let open = check_health(endpoint(server.addr, None), None).await;
    assert_eq!(open.expect("health is exempt"), ServingStatus::Serving);

    let status = call_unknown_service(server.addr, None).await;
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert_eq!(status.message(), MISSING_TOKEN_MESSAGE);
    let status = call_unknown_service(server.addr, Some(TOKEN)).await;
    assert_eq!(
        status.code(),
        tonic::Code::Unimplemented,
        "with the token the call reaches the router: {status:?}"
    );
}

/// Per-service form: the interceptor wraps one service; here that is the health service
/// itself, so it needs the token too.
#[tokio::test]
async fn interceptor_checks_the_wrapped_service() {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let check = TokenCheck::new(Secret::new(TOKEN));
    let routes = Routes::new(InterceptedService::new(health, check));
    let server = serve(None, routes, None).await;

    let none = check_health(endpoint(server.addr, None), None).await;
    assert_unauthenticated(none, MISSING_TOKEN_MESSAGE);
    let wrong = check_health(endpoint(server.addr, None), Some("nope")).await;
    assert_unauthenticated(wrong, INVALID_TOKEN_MESSAGE);
    let right = check_health(endpoint(server.addr, None), Some(TOKEN)).await;
    assert_eq!(right.expect("right token"), ServingStatus::Serving);
}

#[test]
fn secret_debug_does_not_contain_the_secret() {
    let secret = Secret::new(TOKEN);
    assert!(!format!("{secret:?}").contains(TOKEN));
    assert_eq!(format!("{secret:?}"), "***");
    assert_eq!(format!("{secret}"), "***");
}
