//! mTLS configurations for tonic servers and clients, built from PEM files that are checked
//! up front so a bad file fails with a message naming it instead of a handshake error later.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::{AuthError, install_crypto_provider};

/// The three PEM files of one TLS endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate(s): a server accepts client certificates signed by it, a client accepts
    /// server certificates signed by it.
    pub ca: PathBuf,
    /// This endpoint's certificate (chain), leaf first.
    pub cert: PathBuf,
    /// This endpoint's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl TlsFiles {
    /// Builds the set from a `(ca, cert, key)` tuple (as `belay_testkit::pki` returns them).
    pub fn from_tuple((ca, cert, key): (PathBuf, PathBuf, PathBuf)) -> Self {
        Self { ca, cert, key }
    }
}

/// A server configuration that presents `files.cert`/`files.key` and **requires** a client
/// certificate signed by `files.ca` (mutual TLS): clients without one, or with one from
/// another CA, fail the handshake.
pub fn server_tls(files: &TlsFiles) -> Result<ServerTlsConfig, AuthError> {
    install_crypto_provider();
    let ca = load_certs("CA certificate", &files.ca)?;
    let identity = load_identity(&files.cert, &files.key)?;
    Ok(ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(Certificate::from_pem(ca)))
}

/// Like [`server_tls`], but clients **may** connect without a certificate (one they do
/// present must still be signed by `files.ca`). For a listener shared by certificate-holding
/// agents and token-holding CLIs: such a server must authenticate every call some other way,
/// e.g. with [`TokenCheck`](crate::TokenCheck), because TLS alone no longer proves anything.
pub fn server_tls_client_optional(files: &TlsFiles) -> Result<ServerTlsConfig, AuthError> {
    Ok(server_tls(files)?.client_auth_optional(true))
}

/// A client configuration that verifies the server against `files.ca` for the name `domain`
/// and presents `files.cert`/`files.key` as its own identity.
pub fn client_tls(files: &TlsFiles, domain: &str) -> Result<ClientTlsConfig, AuthError> {
    let config = client_tls_ca_only(&files.ca, domain)?;
    let identity = load_identity(&files.cert, &files.key)?;
    Ok(config.identity(identity))
}

/// A client configuration that only verifies the server (against `ca`, for the name
/// `domain`) and presents no certificate — for the CLI, which authenticates with a token.
pub fn client_tls_ca_only(ca: &Path, domain: &str) -> Result<ClientTlsConfig, AuthError> {
    install_crypto_provider();
    let ca = load_certs("CA certificate", ca)?;
    Ok(ClientTlsConfig::new()
        .domain_name(domain)
        .ca_certificate(Certificate::from_pem(ca)))
}

/// Reads a file, turning I/O errors into messages naming it.
fn read(role: &'static str, path: &Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(|e| {
        let problem = match e.kind() {
            std::io::ErrorKind::NotFound => "does not exist".to_owned(),
            std::io::ErrorKind::PermissionDenied => "cannot be read: permission denied".to_owned(),
            _ => format!("cannot be read: {e}"),
        };
        file_error(role, path, problem)
    })
}

fn file_error(role: &'static str, path: &Path, problem: impl Into<String>) -> AuthError {
    AuthError::File {
        role,
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// Reads a PEM file that must hold at least one well-formed certificate; returns its bytes.
fn load_certs(role: &'static str, path: &Path) -> Result<Vec<u8>, AuthError> {
    let pem = read(role, path)?;
    parse_certs(role, path, &pem)?;
    Ok(pem)
}

fn parse_certs(
    role: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, AuthError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(role, path, format!("is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(
            role,
            path,
            "is not a PEM certificate: no `-----BEGIN CERTIFICATE-----` block found",
        ));
    }
    Ok(certs)
}

/// Reads a certificate and its key, checks that they belong together, and builds the
/// tonic identity.
fn load_identity(cert_path: &Path, key_path: &Path) -> Result<Identity, AuthError> {
    let cert_pem = read("certificate", cert_path)?;
    let certs = parse_certs("certificate", cert_path, &cert_pem)?;
    let key_pem = read("private key", key_path)?;
    // Never put parser details into the message: they could quote key material.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        let problem = match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "is not a PEM private key: no `-----BEGIN ... PRIVATE KEY-----` block found"
            }
            _ => "is not a valid PEM private key",
        };
        file_error("private key", key_path, problem)
    })?;
    let provider = rustls::crypto::ring::default_provider();
    match rustls::sign::CertifiedKey::from_der(certs, key, &provider) {
        Ok(_) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(AuthError::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            });
        }
        Err(rustls::Error::General(_)) => {
            return Err(file_error(
                "private key",
                key_path,
                "is not a supported private key (expected RSA, ECDSA P-256/P-384 or Ed25519)",
            ));
        }
        Err(e) => {
            return Err(file_error(
                "certificate",
                cert_path,
                format!(
                    "cannot be used with private key {}: {e}",
                    key_path.display()
                ),
            ));
        }
    }
    Ok(Identity::from_pem(cert_pem, key_pem))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).expect("temp file is writable");
        path
    }

    #[test]
    fn errors_name_the_file_and_the_problem_without_content() {
        let pki = belay_testkit::pki::TestPki::new().expect("test PKI");
        let good = TlsFiles::from_tuple(pki.server_files());
        let dir = tempfile::tempdir().expect("temp dir");

        let missing = TlsFiles {
            ca: dir.path().join("nope.pem"),
            ..good.clone()
        };
        let err = server_tls(&missing).expect_err("missing CA is an error");
        let msg = err.to_string();
        assert!(msg.contains("CA certificate"), "{msg}");
        assert!(msg.contains("nope.pem"), "{msg}");
        assert!(msg.contains("does not exist"), "{msg}");

        let not_pem = write(dir.path(), "garbage.pem", b"hello, not a certificate\n");
        let err = server_tls(&TlsFiles {
            cert: not_pem.clone(),
            ..good.clone()
        })
        .expect_err("non-PEM cert is an error");
        let msg = err.to_string();
        assert!(
            msg.contains("garbage.pem") && msg.contains("not a PEM certificate"),
            "{msg}"
        );

        // A certificate where the key should be.
        let err = server_tls(&TlsFiles {
            key: good.cert.clone(),
            ..good.clone()
        })
        .expect_err("a certificate is not a key");
        let msg = err.to_string();
        assert!(
            msg.contains("private key") && msg.contains("not a PEM private key"),
            "{msg}"
        );

        // The client's key with the server's certificate.
        let (_, _, client_key) = pki.client_files();
        let err = server_tls(&TlsFiles {
            key: client_key.clone(),
            ..good.clone()
        })
        .expect_err("mismatched key is an error");
        assert!(matches!(err, AuthError::KeyMismatch { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("does not match"), "{msg}");
        let key_text = std::fs::read_to_string(&client_key).expect("key readable");
        let key_body = key_text.lines().nth(1).expect("key has a body line");
        assert!(
            !msg.contains(key_body),
            "the message leaks key material: {msg}"
        );

        // A key file whose base64 is corrupt must not be quoted.
        let corrupt = write(
            dir.path(),
            "corrupt-key.pem",
            b"-----BEGIN PRIVATE KEY-----\nS3CR3T!!!notbase64\n-----END PRIVATE KEY-----\n",
        );
        let err = client_tls(
            &TlsFiles {
                key: corrupt,
                ..good.clone()
            },
            "localhost",
        )
        .expect_err("corrupt key is an error");
        let msg = err.to_string();
        assert!(!msg.contains("S3CR3T"), "{msg}");
        assert!(msg.contains("corrupt-key.pem"), "{msg}");

        server_tls(&good).expect("the good files work");
        client_tls(&TlsFiles::from_tuple(pki.client_files()), "localhost")
            .expect("the client files work");
        client_tls_ca_only(&good.ca, "localhost").expect("the CA alone works");
    }
}
