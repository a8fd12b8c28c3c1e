//! Transport security between the CLI, the controller and the agents: mutual-TLS
//! configurations for tonic servers and clients (controller ↔ agent), server-only TLS for the
//! CLI, and bearer-token checks (CLI → controller).
//!
//! Secrets never leave this crate in readable form by accident: [`Secret`] prints as `***`,
//! errors name the file and what is wrong with it (missing, not PEM, key does not match the
//! certificate) but never its content, and the `authorization` header is marked sensitive.
//!
//! * [`server_tls`] / [`client_tls`]: mutual TLS, controller ↔ agent; the server refuses
//!   clients without a certificate signed by its CA.
//! * [`client_tls_ca_only`]: the CLI verifies the server and authenticates with a token.
//! * [`server_tls_client_optional`]: one listener for both kinds of client; every call must
//!   then be authenticated by a token, since TLS alone proves nothing.
//! * [`check_claimed_name`]: a name a peer claims (an agent's registration) must be an
//!   identity of the certificate it presented (DNS SAN, or CN without DNS SANs).
//!
//! # Crypto provider
//!
//! rustls needs a process-wide crypto provider before a server config can be built (tonic's
//! server side uses `ServerConfig::builder()`, which panics without one). Every TLS function
//! here calls [`install_crypto_provider`] (ring) first; binaries may also call it early.
//!
//! # Token checks and the health service
//!
//! A tonic [`Interceptor`](tonic::service::Interceptor) does not see the request path, so
//! [`TokenCheck`] offers two ways to protect a server:
//!
//! * **Per service** (interceptor): wrap each protected service,
//!   `InterceptedService::new(svc, check.clone())` or the generated
//!   `FooServer::with_interceptor(impl, check.clone())`, and add the health service unwrapped —
//!   it stays open. The exempt list does not apply here (nothing to match against).
//! * **Whole server** (path-aware): build the server's [`Routes`](tonic::service::Routes) and
//!   wrap them with [`TokenCheck::guard`], which checks every call except those to services on
//!   the exempt list ([`TokenCheck::exempt`], e.g. [`HEALTH_SERVICE`]); serve it with
//!   `Server::builder().serve_with_incoming_shutdown(guard, incoming, signal)`.

mod identity;
mod tls;
mod token;

pub use identity::{IdentityError, PeerIdentity, certificate_identities, check_claimed_name};
pub use tls::{TlsFiles, client_tls, client_tls_ca_only, server_tls, server_tls_client_optional};
pub use token::{
    GuardFuture, HEALTH_SERVICE, INVALID_TOKEN_MESSAGE, MISSING_TOKEN_MESSAGE, MaybeTokenAttach,
    MaybeTokenCheck, Secret, TOKEN_ENV, TokenAttach, TokenCheck, TokenGuard, read_secret,
};

use std::path::PathBuf;

/// Installs rustls' `ring` crypto provider as the process default, unless a provider is
/// already installed (then it does nothing). Safe to call any number of times, from any thread.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another installer is fine: some provider is installed either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Why a TLS configuration or a token could not be set up. Messages name files and
/// environment variables, never secret content.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// A certificate, key or token file is missing, unreadable or malformed.
    #[error("{role} {}: {problem}", path.display())]
    File {
        /// What the file was supposed to be ("CA certificate", "private key", "token file").
        role: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The private key does not belong to the certificate.
    #[error(
        "private key {} does not match certificate {}: use the key the certificate was issued for",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The token environment variable is set but not valid UTF-8.
    #[error("environment variable {var} does not hold valid UTF-8")]
    EnvNotUnicode {
        /// The variable's name.
        var: String,
    },
    /// The token holds characters that cannot travel in an HTTP header.
    #[error(
        "the bearer token contains characters not allowed in an HTTP header (use visible ASCII)"
    )]
    TokenNotHeaderSafe,
}
