//! Transport failures are classified from their typed cause (tonic → hyper/h2 →
//! `std::io::Error` kinds, rustls errors), over real failures: a closed port, a TLS
//! server called in plaintext and the reverse, a certificate from another CA, an mTLS
//! server called without a client certificate.

use belay_core::ErrorKind;
use belay_rpc::convert::{TransportFailure, api_error_from, transport_failure};
use belay_rpc::{Connection, Peer};
use belay_testkit::pki::TestPki;
use tonic::transport::ServerTlsConfig;

/// A real gRPC server (the health service) on a free port, with or without TLS.
async fn serve(tls: Option<ServerTlsConfig>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let addr = listener.local_addr().expect("bound").to_string();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).expect("TLS config");
    }
    tokio::spawn(
        builder
            .add_service(health)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    addr
}

/// One call through a belay [`Connection`]; its failure.
async fn call(conn: &Connection) -> tonic::Status {
    let mut client = tonic_health::pb::health_client::HealthClient::new(conn.channel.clone());
    client
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect_err("the call fails")
}

fn conn(addr: &str, tls: Option<tonic::transport::ClientTlsConfig>) -> Connection {
    Connection::new(addr, tls, None, format!("controller at {addr}")).expect("a connection")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_port_is_refused() {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        l.local_addr().expect("bound").to_string()
    }; // closed again here
    let c = conn(&addr, None);
    let status = call(&c).await;
    assert_eq!(
        transport_failure(&status),
        Some(TransportFailure::Refused),
        "{status:?}"
    );
    let e = api_error_from(&status, &c.peer);
    assert_eq!(e.kind, ErrorKind::AgentUnreachable);
    assert!(
        e.message.contains("nothing listens at that address"),
        "{}",
        e.message
    );
    assert!(
        e.message.contains(&format!("controller at {addr}")),
        "{}",
        e.message
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_to_a_tls_server_says_it_speaks_tls_and_to_pass_ca() {
    let pki = TestPki::new().expect("test PKI");
    let files = belay_auth::TlsFiles::from_tuple(pki.server_files());
    let addr = serve(Some(
        belay_auth::server_tls_client_optional(&files).expect("server TLS"),
    ))
    .await;
    let c = conn(&addr, None);
    let status = call(&c).await;
    let failure = transport_failure(&status).expect("a typed transport cause");
    assert!(
        matches!(
            failure,
            TransportFailure::Closed | TransportFailure::NotHttp2
        ),
        "{failure:?} from {status:?}"
    );
    let e = api_error_from(&status, &c.peer);
    assert_eq!(e.kind, ErrorKind::AgentUnreachable);
    assert!(e.message.contains("it speaks TLS"), "{}", e.message);
    assert!(e.message.contains("--ca FILE"), "{}", e.message);
    assert!(e.message.contains("--tls-server-name"), "{}", e.message);
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_to_a_plaintext_server_says_it_does_not_speak_tls() {
    let pki = TestPki::new().expect("test PKI");
    let addr = serve(None).await;
    let tls = belay_auth::client_tls_ca_only(&pki.ca, "localhost").expect("client TLS");
    let c = conn(&addr, Some(tls));
    let status = call(&c).await;
    assert_eq!(
        transport_failure(&status),
        Some(TransportFailure::PeerNotTls),
        "{status:?}"
    );
    let e = api_error_from(&status, &c.peer);
    assert_eq!(e.kind, ErrorKind::AgentUnreachable);
    assert!(e.message.contains("does not speak TLS"), "{}", e.message);
    assert!(e.message.contains("leave out --ca"), "{}", e.message);
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_failures_are_told_apart() {
    let pki = TestPki::new().expect("test PKI");
    let files = belay_auth::TlsFiles::from_tuple(pki.server_files());
    let optional = serve(Some(
        belay_auth::server_tls_client_optional(&files).expect("server TLS"),
    ))
    .await;

    // A server certificate from a CA we do not trust.
    let tls = belay_auth::client_tls_ca_only(&pki.other_ca, "localhost").expect("client TLS");
    let c = conn(&optional, Some(tls));
    let status = call(&c).await;
    let failure = transport_failure(&status);
    assert!(
        matches!(&failure, Some(TransportFailure::CertificateRefused(why)) if why.contains("UnknownIssuer")),
        "{failure:?} from {status:?}"
    );
    assert!(
        api_error_from(&status, &c.peer)
            .message
            .contains("--ca FILE")
    );

    // A name the certificate is not issued for.
    let tls = belay_auth::client_tls_ca_only(&pki.ca, "db.example").expect("client TLS");
    let status = call(&conn(&optional, Some(tls))).await;
    assert!(
        matches!(transport_failure(&status), Some(TransportFailure::CertificateRefused(why)) if why.contains("db.example")),
        "{status:?}"
    );

    // An mTLS server called without a client certificate closes the handshake: with TLS
    // on our side that is not "speak TLS", it is "present a certificate".
    let strict = serve(Some(belay_auth::server_tls(&files).expect("server TLS"))).await;
    let tls = belay_auth::client_tls_ca_only(&pki.ca, "localhost").expect("client TLS");
    let c = conn(&strict, Some(tls));
    let status = call(&c).await;
    let failure = transport_failure(&status).expect("a typed transport cause");
    let e = api_error_from(&status, &c.peer);
    assert!(
        e.message.contains("client certificate"),
        "{failure:?}: {}",
        e.message
    );
    assert!(!e.message.contains("it speaks TLS"), "{}", e.message);
}

#[test]
fn a_status_from_the_peer_has_no_transport_cause() {
    let status = tonic::Status::unavailable("tcp connect error: connection refused");
    assert_eq!(transport_failure(&status), None);
    let e = api_error_from(&status, &Peer::new("agent-1", false));
    assert_eq!(e.kind, ErrorKind::AgentUnreachable);
}
